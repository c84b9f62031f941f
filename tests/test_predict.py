"""`vimpac predict` / `vimpac_jax.load_classifier` on the converted released fine-tuned checkpoint.

The checkpoint (golden `vimpac_a/finetuned`: 7 classes, 4x4 tokens of 32-px frames, 8192 codes)
records no tokenizer: with one of its vocabulary it classifies a generated video file and its
scores of the golden input clips are the softmax of the released model's logits; one of another
vocabulary is refused naming both. The tests on a fine-tuned workdir (`vimpac predict` equals
`vimpac evaluate`, bad files, StableHLO, no re-tracing) use the demo chain's run in test_demo.py.
"""

import numpy as np
import pytest

pytest.importorskip("av")

import vimpac_jax  # noqa: E402
from vimpac_jax.commands import predict as predict_cmd  # noqa: E402
from vimpac_jax.predict import PredictError  # noqa: E402


@pytest.fixture(scope="module")
def released(golden_dir, tmp_path_factory):
    """(converted checkpoint, a tokenizer of 8192 codes, one of 512 codes, a generated video)."""
    from vimpac_jax.conversion import dalle as dalle_conversion
    from vimpac_jax.conversion.official import convert_official
    from vimpac_jax.demo import data as demo_data
    from vimpac_jax.tokenizer.testing import write_random_vq_tokenizer

    root = tmp_path_factory.mktemp("released")
    convert_official(golden_dir / "vimpac_a" / "finetuned", root / "ckpt")
    write_random_vq_tokenizer(root / "vq8192", codes=8192)  # untrained: only its vocabulary and grid matter
    assert dalle_conversion.main(["--encoder", str(golden_dir / "dalle_tiny" / "encoder.pkl"), str(root / "dalle")]) == 0
    frames = demo_data.render_video(demo_data.sample_spec(np.random.default_rng(0), 1), 48, 16)
    demo_data.encode_video(root / "video.mp4", frames, fps=4)
    return root / "ckpt", root / "vq8192", root / "dalle", root / "video.mp4"


def test_released_checkpoint_runs_with_a_tokenizer_of_its_vocabulary(released, golden_dir, capsys):
    ckpt, vq8192, _, video = released
    clf = vimpac_jax.load_classifier(ckpt, tokenizer=vq8192, num_clips=2)
    assert clf.num_classes == 7 and clf.protocol.crops[0].crop == 32 and clf.protocol.fps == 2.0
    assert [v.name for v in clf.protocol.crops] == ["r32_start_noflip", "r32_center_noflip", "r32_end_noflip"]
    expected = np.load(golden_dir / "vimpac_a" / "finetuned" / "expected.npz")
    logits = expected["logits"].astype(np.float64)
    golden = np.exp(logits - logits.max(-1, keepdims=True))
    golden /= golden.sum(-1, keepdims=True)
    for clip, probs in zip(expected["input_codes"], golden):  # one view: the softmax of the released logits
        got = dict(clf.predict_tokens(clip, top=None))
        np.testing.assert_allclose([got[str(c)] for c in range(7)], probs, rtol=1e-5, atol=1e-6)
    top = clf.predict(video, top=3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    rc = predict_cmd.main(["--workdir", str(ckpt), "--tokenizer", str(vq8192), str(video), "--clips", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "6 views per video: 2 clips x 3 crops" in out and "1 predicted, 0 failed" in out


def test_mismatched_or_missing_tokenizer_is_refused(released, golden_dir, capsys):
    ckpt, _, dalle512, video = released
    rc = predict_cmd.main(["--workdir", str(ckpt), "--tokenizer", str(dalle512), str(video)])
    err = capsys.readouterr().err
    assert rc == 2 and "512 codes" in err and "8192 codes" in err and str(ckpt) in err and str(dalle512) in err
    with pytest.raises(PredictError, match="pass --tokenizer"):
        vimpac_jax.load_classifier(ckpt)
    with pytest.raises(PredictError, match="neither a model checkpoint"):
        vimpac_jax.load_classifier(video.parent)
    from vimpac_jax.conversion.official import convert_official

    convert_official(golden_dir / "vimpac_a", ckpt.parent / "pretrained")  # the pre-training checkpoint
    with pytest.raises(PredictError, match="not a classifier"):
        vimpac_jax.load_classifier(ckpt.parent / "pretrained", tokenizer=dalle512)


def test_predict_refuses_the_files_tokenize_refuses(released):
    """One rule for `vimpac predict` and `vimpac tokenize` (tests/test_tokenize.py): a file cut
    short and a file whose timestamps jump 1,000 hours are skipped with the reason the store's
    errors.txt gives, not classified on what decoded; an AVI with dropped-frame chunks is whole."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from video_fixtures import write_dropped_frames_avi, write_time_gap_mkv, write_truncated_faststart

    from vimpac_jax.data import video_decode as vd

    ckpt, vq8192, _, video = released
    root = video.parent
    cut = write_truncated_faststart(root / "cut.mp4", n=100)
    gap = write_time_gap_mkv(root / "gap.mkv")
    dropped = write_dropped_frames_avi(root / "dropped.avi", [0, 1, 2, 3, 10, 11, 12, 20, 21, 29])
    clf = vimpac_jax.load_classifier(ckpt, tokenizer=vq8192, num_clips=2)
    results = clf.predict_files([video, cut, dropped, gap], top=3)
    assert [r.error is None for r in results] == [True, False, True, False]
    for result, path in ((results[1], cut), (results[3], gap)):
        with pytest.raises(vd.VideoDecodeError) as refused:
            vd.decode_frames(path, clf.protocol.fps, allow_partial=False)
        assert result.error == refused.value.reason and result.probs is None
    assert results[1].error.startswith("truncated:") and results[3].error.startswith("timestamp gap:")


def test_class_names_beside_a_checkpoint_are_printed_and_exported(released, tmp_path, capsys):
    """A checkpoint's class_names.txt (what `vimpac export` writes beside the weights) names the
    classes of `vimpac predict`; an export of that checkpoint carries it on."""
    import shutil

    from vimpac_jax.commands import export as export_cmd
    from vimpac_jax.export.source import CLASS_NAMES_FILE, write_class_names

    ckpt, vq8192, _, video = released
    named = tmp_path / "named"
    shutil.copytree(ckpt, named)
    names = ["Archery", "Basketball", "Biking", "Bowling", "Diving", "Fencing", "Rowing"]
    write_class_names(named, names)
    clf = vimpac_jax.load_classifier(named, tokenizer=vq8192, num_clips=2)
    assert clf.class_names == names and {name for name, _ in clf.predict(video, top=7)} == set(names)
    assert predict_cmd.main(["--workdir", str(named), "--tokenizer", str(vq8192), str(video), "--clips", "2",
                             "--top", "2"]) == 0
    printed = capsys.readouterr().out
    assert sum(name in printed for name in names) == 2
    assert export_cmd.main(["--workdir", str(named), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    assert (tmp_path / "st" / CLASS_NAMES_FILE).read_text().splitlines() == names
    assert "class_names=7" in capsys.readouterr().out
def test_predictions_go_out_as_they_are_made(released, tmp_path, capsys, monkeypatch, one_device):
    """Stopped at the third of four videos (here Ctrl-C in the model call), `vimpac predict` has
    already printed the first two and --json holds them: before, a run stopped midway printed and
    wrote nothing."""
    import json

    from vimpac_jax import predict as lib

    ckpt, vq8192, _, video = released
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"v{i}.mp4")
        paths[-1].symlink_to(video)
    out = tmp_path / "pred.json"
    real_scores, calls, seen = lib.Classifier.scores, [], []

    def scores(self, views):
        calls.append(len(views))
        if len(calls) == 3:
            seen.append(json.loads(out.read_text()))  # what a kill at this moment would leave
            raise KeyboardInterrupt
        return real_scores(self, views)

    monkeypatch.setattr(lib.Classifier, "scores", scores)
    with pytest.raises(KeyboardInterrupt):
        predict_cmd.main(["--workdir", str(ckpt), "--tokenizer", str(vq8192), *map(str, paths), "--clips", "1",
                          "--batch-size", "1", "--workers", "0", "--json", str(out)])
    assert calls == [1, 1, 1]
    printed = capsys.readouterr().out
    assert f"{paths[0]}\n  1. " in printed and f"{paths[1]}\n  1. " in printed and str(paths[2]) not in printed
    for record in (seen[0], json.loads(out.read_text())):
        assert [p["path"] for p in record["predictions"]] == [str(p) for p in paths[:2]]
        assert record["complete"] is False and record["videos"] == 4
