"""`vimpac predict` and `vimpac_jax.load_classifier`: video files -> top classes.

One runlocal fine-tune (module fixture) on a store that `vimpac tokenize` made from generated
videos with the golden tiny DALL-E tokenizer; predict on those very files must give what
`vimpac evaluate` gives for the same views. The converted released fine-tuned checkpoint
(golden) runs with a tokenizer of its vocabulary and refuses one of another.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

import vimpac_jax  # noqa: E402
from vimpac_jax.commands import evaluate as evaluate_cmd  # noqa: E402
from vimpac_jax.commands import predict as predict_cmd  # noqa: E402
from vimpac_jax.predict import PredictError  # noqa: E402

NUM_VIDEOS, NUM_CLASSES, SIZE = 6, 3, 32


@pytest.fixture(scope="module")
def tiny_tokenizer(golden_dir, tmp_path_factory) -> Path:
    from vimpac_jax.conversion import dalle as dalle_conversion

    src = golden_dir / "dalle_tiny"
    dst = tmp_path_factory.mktemp("tokenizer") / "dalle_tiny"
    assert dalle_conversion.main(["--encoder", str(src / "encoder.pkl"), str(dst)]) == 0
    return dst


@pytest.fixture(scope="module")
def finetuned(tiny_tokenizer, tmp_path_factory):
    """(workdir, video paths, class names): generated videos -> store -> runlocal fine-tune."""
    from vimpac_jax.config_utils import load_config
    from vimpac_jax.data import demo_data
    from vimpac_jax.data.tokenize import TokenizeOptions, tokenize_videos
    from vimpac_jax.training.train import train

    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    paths, lines = [], []
    for i in range(NUM_VIDEOS):
        label = i % NUM_CLASSES
        frames = demo_data.render_video(demo_data.sample_spec(rng, label), 48, 12 + 2 * i)
        path = root / f"video{i}.mp4"
        demo_data.encode_video(path, frames, fps=4)
        paths.append(path)
        lines.append(f"{path} {label}")
    (root / "videos.txt").write_text("\n".join(lines) + "\n")
    store = root / "store"
    tokenize_videos(TokenizeOptions(tokenizer=str(tiny_tokenizer), videos=str(root / "videos.txt"), out=str(store),
                                    fps=2.0, size=SIZE, variants="finetune_noflip", workers=0,
                                    progress_interval=1e9), log=sys.stderr)
    names = [f"class_{c}" for c in range(NUM_CLASSES)]
    config = load_config(["--config", "configs/finetune.py:dataset=ucf101,runlocal",
                          f"--config.model.num_classes={NUM_CLASSES}", f"--config.data.train_store={store}",
                          f"--config.data.eval_store={store}", "--config.train.num_steps=3"])
    with config.unlocked():
        config.class_names = names
    workdir = root / "run"
    train(config, workdir)
    return workdir, paths, names


def read_predictions_csv(workdir: Path) -> dict[str, tuple[int, float]]:
    with open(workdir / "predictions.csv") as f:
        return {Path(row["video_id"]).name: (int(row["prediction"]), float(row["score"])) for row in csv.DictReader(f)}


def test_predict_equals_evaluate_on_the_same_files(finetuned, tmp_path, capsys):
    workdir, paths, names = finetuned
    assert evaluate_cmd.main(["--workdir", str(workdir)]) == 0
    evaluated = read_predictions_csv(workdir)
    out = tmp_path / "pred.json"
    rc = predict_cmd.main(["--workdir", str(workdir), *map(str, paths), "--top", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads(out.read_text())
    assert result["views"]["clips"] == 2 and len(result["views"]["crops"]) == 3  # runlocal: 2 clips x 3 crops
    assert result["model"]["kind"] == "workdir" and result["model"]["step"] == 3 and not result["failed"]
    assert len(result["predictions"]) == NUM_VIDEOS
    for pred in result["predictions"]:
        top_class, top_prob = pred["top"][0]["class"], pred["top"][0]["probability"]
        index, score = evaluated[Path(pred["path"]).stem]
        assert top_class == names[index]
        assert top_prob == pytest.approx(score, abs=2e-6)
        assert len(pred["top"]) == 3 and top_class in printed


def test_api_loads_once_and_does_not_trace_again(finetuned):
    import jax

    from vimpac_jax.data import pipelines, token_store

    workdir, paths, names = finetuned
    clf = vimpac_jax.load_classifier(workdir)
    assert clf.class_names == names and clf.protocol.num_views == 6
    first = clf.predict(paths[0], top=None)
    assert [n for n, _ in first] and sum(p for _, p in first) == pytest.approx(1.0, abs=1e-5)

    # The views of the stored tokens of that video give the same scores: decoding + tokenizing
    # a file here is what `vimpac tokenize` stored.
    index = pipelines.load_index(json.loads((workdir / "config.json").read_text())["data"]["eval_store"])
    video = [Path(v).name for v in index.video_ids].index(paths[0].stem)
    crops = [clf.protocol.crops[c].name for c in range(len(clf.protocol.crops))]
    source = token_store.open_records(index.store_dir)
    stored = [token_store.decode_record(source[int(index.records[video, index.variants.index(n)])])["tokens"]
              for n in crops]
    views = pipelines.test_views(stored, clf.protocol.clip_len, clf.protocol.clip_step, clf.protocol.num_clips)

    traces = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(kw.get("fun_name"))

    clf.predict_tokens(views)  # the one-video shape was compiled by predict(): no trace expected
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        from_tokens = clf.predict_tokens(views, top=None)
        again = clf.predict(paths[0], top=None)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert traces == []
    np.testing.assert_allclose([p for _, p in from_tokens], [p for _, p in first], atol=1e-6)
    assert [n for n, _ in from_tokens] == [n for n, _ in first] and again == first
    with pytest.raises(ValueError, match=r"\[B, 3, 4, 4\]"):
        clf.predict_tokens(np.zeros((2, 5, 4, 4), np.int32))


def test_bad_files_are_listed_and_skipped(finetuned, tmp_path, capsys):
    workdir, paths, _ = finetuned
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video\n" * 50)
    bad = [tmp_path / "missing.mp4", tmp_path / "text.mp4", tmp_path / "empty.mp4"]
    out = tmp_path / "pred.json"
    rc = predict_cmd.main(["--workdir", str(workdir), str(paths[0]), *map(str, bad), str(paths[1]),
                           "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    result = json.loads(out.read_text())
    assert [p["path"] for p in result["predictions"]] == [str(paths[0]), str(paths[1])]
    reasons = {Path(f["path"]).name: f["error"] for f in result["failed"]}
    assert set(reasons) == {"missing.mp4", "text.mp4", "empty.mp4"}
    assert "not found" in reasons["missing.mp4"] and "0 bytes" in reasons["empty.mp4"]
    assert "cannot open" in reasons["text.mp4"]
    for path in bad:
        assert f"skipped {path}" in captured.err
    assert "2 predicted, 3 failed" in captured.out


def test_stablehlo_export_predicts_like_its_workdir(finetuned, tiny_tokenizer, tmp_path):
    from vimpac_jax.commands import export as export_cmd

    workdir, paths, names = finetuned
    export = tmp_path / "export"
    assert export_cmd.main(["--workdir", str(workdir), "--format", "stablehlo", "--out", str(export),
                            "--platforms", "cpu"]) == 0
    with pytest.raises(PredictError, match="pass --tokenizer"):
        vimpac_jax.load_classifier(export)
    # The export records no protocol: give the run's (2 fps is the runlocal config's clip rate).
    exported = vimpac_jax.load_classifier(export, tokenizer=tiny_tokenizer, num_clips=2, class_names=names)
    from_run = vimpac_jax.load_classifier(workdir)
    assert exported.protocol == from_run.protocol
    a, b = exported.predict_files(paths[:3]), from_run.predict_files(paths[:3])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.probs, y.probs, atol=1e-5)
    assert exported.identity["kind"] == "stablehlo" and len(exported.identity["sha256"]) == 64


@pytest.fixture(scope="module")
def released(golden_dir, tmp_path_factory):
    """The converted released fine-tuned checkpoint (7 classes, 4x4 tokens of 32 px, 8192 codes) and
    a tokenizer of 8192 codes (an untrained VQ tokenizer: only its vocabulary and grid matter)."""
    import jax

    from vimpac_jax.conversion.official import convert_official
    from vimpac_jax.tokenizer import store, vq

    root = tmp_path_factory.mktemp("released")
    convert_official(golden_dir / "vimpac_a" / "finetuned", root / "ckpt")
    config = vq.model_json_config(dict(codebook_size=8192, embedding_dim=4, widths=[8, 8, 8, 8], n_blk_per_group=1,
                                       channels=3))
    variables = vq.init_variables(config, jax.random.key(0))
    params = jax.tree.map(np.asarray, vq.tokenizer_params(variables["params"], variables["vq_stats"]))
    store.save_tokenizer(root / "vq8192", {"kind": vq.KIND, "config": config, "step": 0}, params)
    return root / "ckpt", root / "vq8192"


def test_released_checkpoint_runs_with_its_vocabulary(released, golden_dir, finetuned, capsys):
    ckpt, tokenizer = released
    _, paths, _ = finetuned
    clf = vimpac_jax.load_classifier(ckpt, tokenizer=tokenizer, num_clips=2)
    assert clf.num_classes == 7 and clf.protocol.crops[0].crop == 32 and clf.protocol.fps == 2.0
    expected = np.load(golden_dir / "vimpac_a" / "finetuned" / "expected.npz")
    golden = np.exp(expected["logits"]) / np.exp(expected["logits"]).sum(-1, keepdims=True)
    for clip, probs in zip(expected["input_codes"], golden):  # one view: the softmax of the released logits
        got = dict(clf.predict_tokens(clip, top=None))
        np.testing.assert_allclose([got[str(c)] for c in range(7)], probs, rtol=1e-5, atol=1e-6)
    rc = predict_cmd.main(["--workdir", str(ckpt), "--tokenizer", str(tokenizer), str(paths[0]), "--clips", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "1 predicted, 0 failed" in out and "30 views" not in out and "6 views" in out


def test_mismatched_tokenizers_are_refused(released, finetuned, tiny_tokenizer, capsys):
    ckpt, vq8192 = released
    workdir, paths, _ = finetuned
    rc = predict_cmd.main(["--workdir", str(ckpt), "--tokenizer", str(tiny_tokenizer), str(paths[0])])
    err = capsys.readouterr().err
    assert rc == 2 and "512 codes" in err and "8192 codes" in err and str(ckpt) in err
    with pytest.raises(PredictError, match="not the one that made"):  # a run's own tokenizer is recorded
        vimpac_jax.load_classifier(workdir, tokenizer=vq8192)
    with pytest.raises(PredictError, match="pass --tokenizer"):
        vimpac_jax.load_classifier(ckpt)
    with pytest.raises(PredictError, match="neither a model checkpoint"):
        vimpac_jax.load_classifier(paths[0].parent)
