"""TFDS interop: `vimpac tokenize --tfds NAME:SPLIT` and `vimpac export-tfds` (the [tfds] extra).

Datasets come from `tfds.testing.mock_data` (nothing is downloaded): its ucf101 examples are
random 256x256 JPEG frames, 5 to 49 of them, and a random label; it yields the same examples on
every read of a split (with the same decoders), which is what lets the tests rebuild the frames.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from vimpac_jax import cli  # noqa: E402
from vimpac_jax.data import tfds_export, tfds_source, token_store  # noqa: E402
from vimpac_jax.tokenize import job as tk  # noqa: E402
from vimpac_jax.data import video_decode as vd  # noqa: E402
from vimpac_jax.data.testing import write_test_store  # noqa: E402
from vimpac_jax.tokenizer.interface import load_tokenizer  # noqa: E402

NUM_EXAMPLES = 3
FPS, SIZE, UCF_FPS = 5.0, 32, 25.0  # 25 fps -> 5 fps: source frames 0, 5, 10, ...


def mock(num_examples: int = NUM_EXAMPLES):
    # USE_CODE: the features come from TFDS's ucf101 code; no metadata files, no data_dir.
    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def tokenize_args(tokenizer, out, *extra) -> list[str]:
    return ["tokenize", "--tokenizer", str(tokenizer), "--out", str(out), "--fps", str(FPS), "--size", str(SIZE),
            "--workers", "1", "--progress-interval", "0", *extra]


def read_store(out) -> list[dict]:
    return list(token_store.iter_videos(out))


@pytest.fixture(scope="module")
def ucf_store(tiny_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "ucf"
    with mock():
        assert cli.main(tokenize_args(tiny_tokenizer, out, "--tfds", "ucf101:train")) == 0
    return out


def mock_ucf101_examples() -> list[dict]:
    """The mocked ucf101 train examples as TFDS gives them: frames decoded one by one from JPEG."""
    with mock():
        builder = tfds.builder("ucf101")
        ds = builder.as_dataset(split="train", shuffle_files=False, decoders={"video": tfds.decode.SkipDecoding()})
        image = builder.info.features["video"].feature
        return [{"label": int(ex["label"]), "frames": np.stack([image.decode_example(f).numpy() for f in ex["video"]])}
                for ex in tfds.as_numpy(ds)]


# ------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize("num_frames, source_fps, fps, rule", [
    (33, 25.0, 2.0, "floor"), (33, 25.0, 2.0, "ffmpeg"), (100, 30000 / 1001, 2.0, "floor"),
    (100, 30000 / 1001, 2.0, "ffmpeg"), (7, 10.0, 25.0, "floor"), (1, 25.0, 2.0, "floor"), (50, 25.0, 5.0, "ffmpeg"),
])
def test_sample_frame_indices_follow_the_file_rule(num_frames, source_fps, fps, rule):
    """Constant-rate frames get the indices `video_decode` picks from timestamps i / source_fps."""
    times = [i / source_fps for i in range(num_frames)]
    expected = vd.sample_indices(times, num_frames / source_fps, fps, rule)
    got = tfds_source.sample_frame_indices(num_frames, source_fps, fps, sampling=rule)
    np.testing.assert_array_equal(got, expected)


def test_sample_frame_indices_caps():
    assert list(tfds_source.sample_frame_indices(50, 25.0, 5.0)) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert list(tfds_source.sample_frame_indices(50, 25.0, 5.0, max_frames=3)) == [0, 5, 10]
    assert list(tfds_source.sample_frame_indices(50, 25.0, 5.0, max_seconds=1.0)) == [0, 5, 10, 15, 20]
    assert list(tfds_source.sample_frame_indices(3, 10.0, 20.0)) == [0, 0, 1, 1, 2, 2]  # repeats above the rate


@pytest.mark.parametrize("spec, builder, split", [
    ("ucf101:train", "ucf101", "train"), ("ucf101/ucf101_2:test", "ucf101/ucf101_2", "test"),
    ("ucf101:train[:10%]", "ucf101", "train[:10%]"), ("ucf101:2.0.0:train[5:9]", "ucf101:2.0.0", "train[5:9]"),
])
def test_parse_spec(spec, builder, split):
    parsed = tfds_source.parse_spec(spec)
    assert (parsed.builder, parsed.split, parsed.name) == (builder, split, "ucf101")


@pytest.mark.parametrize("spec", ["ucf101", ":train", "ucf101:"])
def test_parse_spec_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="NAME"):
        tfds_source.parse_spec(spec)


# ------------------------------------------------------------------------------------------
# vimpac tokenize --tfds


def test_tokenize_tfds_gives_the_tokens_of_the_sampled_frames(ucf_store, tiny_tokenizer):
    meta = token_store.read_metadata(ucf_store)
    records = read_store(ucf_store)
    examples = mock_ucf101_examples()
    tok = load_tokenizer(tiny_tokenizer)
    variant = vd.variants_for("pretrain", SIZE)[0]
    assert [r["video_id"] for r in records] == [f"ucf101/ucf101_1_256:train:{i}" for i in range(NUM_EXAMPLES)]
    frames_total = 0
    for rec, ex in zip(records, examples):
        assert rec["label"] == ex["label"] and rec["fps"] == FPS and rec["variant"] == variant.name
        num_src = len(ex["frames"])
        n = math.ceil(num_src * FPS / UCF_FPS)  # one frame per sample time k / 5 s inside the clip
        picked = ex["frames"][[k * int(UCF_FPS / FPS) for k in range(n)]]
        pixels = vd.crop_square(vd.resize_short_side(picked, SIZE), SIZE, "center")
        np.testing.assert_array_equal(rec["tokens"], tok.encode_tokens(pixels))
        frames_total += n
    assert meta["complete"] and meta["counts"] == {"videos_ok": NUM_EXAMPLES, "videos_failed": 0,
                                                   "frames": frames_total, "records": NUM_EXAMPLES}
    with mock():
        names = tfds.builder("ucf101").info.features["label"].names
    assert meta["class_names"] == names and len(names) == 101
    assert meta["source"] == "tfds:ucf101:train"
    assert meta["tfds"]["source_fps"] == UCF_FPS and meta["tfds"]["video_feature"] == "video"
    assert (ucf_store / "errors.txt").read_text() == ""


def test_tokenize_tfds_hosts_share_the_split(ucf_store, tiny_tokenizer, tmp_path):
    """Two processes (run one after the other) each take their share and together make the same store."""
    out = tmp_path / "shared"
    base = dict(tokenizer=str(tiny_tokenizer), videos=None, tfds="ucf101:train", out=str(out), fps=FPS, size=SIZE,
                workers=0, progress_interval=0.0, process_count=2)
    with mock():
        first = tk.tokenize_videos(tk.TokenizeOptions(**base, process_index=0))
        second = tk.tokenize_videos(tk.TokenizeOptions(**base, process_index=1))
    assert (first.complete, first.processed, second.complete, second.processed) == (False, 2, True, 1)
    got = {r["video_id"]: r for r in read_store(out)}
    want = {r["video_id"]: r for r in read_store(ucf_store)}
    assert got.keys() == want.keys()
    for vid in want:
        np.testing.assert_array_equal(got[vid]["tokens"], want[vid]["tokens"])
        assert got[vid]["label"] == want[vid]["label"]


@pytest.fixture(scope="module")
def prepared_videos(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A real prepared TFDS dataset (TFRecord files, no mock): PNG-coded frames, a ClassLabel and a
    video_id text feature; its third example has an undecodable first frame."""
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (n, 24, 40, 3), dtype=np.uint8) for n in (6, 3)]
    bad = root / "bad.png"
    bad.write_bytes(b"this is not a png" * 8)
    F = tfds.features
    features = F.FeaturesDict({"video": F.Video((None, 24, 40, 3)), "label": F.ClassLabel(names=["left", "right"]),
                               "video_id": F.Text()})
    examples = [(0, {"video": clips[0], "label": 1, "video_id": "clip-a"}),
                (1, {"video": clips[1], "label": 0, "video_id": "clip-b"}),
                (2, {"video": [str(bad)], "label": 0, "video_id": "clip-bad"})]
    tfds.dataset_builders.store_as_tfds_dataset(
        name="vimpac_test_videos", version="1.0.0", data_dir=root / "data", features=features,
        split_datasets={"train": examples}, disable_shuffling=True)
    return root / "data", clips


def test_tokenize_a_prepared_dataset_lists_undecodable_examples(prepared_videos, tiny_tokenizer, tmp_path, capsys):
    data_dir, clips = prepared_videos
    out = tmp_path / "store"
    # 10 fps source sampled at 5 fps: frames 0, 2, 4, ...
    assert cli.main(tokenize_args(tiny_tokenizer, out, "--tfds", "vimpac_test_videos:train", "--data-dir",
                                  str(data_dir), "--source-fps", "10")) == 0
    tok = load_tokenizer(tiny_tokenizer)
    records = {r["video_id"]: r for r in read_store(out)}
    assert sorted(records) == ["clip-a", "clip-b"]  # the examples' own ids
    for (vid, label), clip in zip((("clip-a", 1), ("clip-b", 0)), clips):
        picked = clip[::2]
        pixels = vd.crop_square(vd.resize_short_side(picked, SIZE), SIZE, "center")  # 24x40 -> 32x53 -> 32x32
        np.testing.assert_array_equal(records[vid]["tokens"], tok.encode_tokens(pixels))
        assert records[vid]["label"] == label
    errors = [line.split("\t") for line in (out / "errors.txt").read_text().splitlines()]
    assert [e[0] for e in errors] == ["vimpac_test_videos/1.0.0:train[2]"] and errors[0][1]
    meta = token_store.read_metadata(out)
    assert meta["class_names"] == ["left", "right"] and meta["tfds"]["id_feature"] == "video_id"
    assert meta["counts"]["videos_failed"] == 1 and meta["tfds"]["source_fps_from"] == "--source-fps"
    # The source frame rate is part of the store's identity: another one is refused, the same one reused.
    assert cli.main(tokenize_args(tiny_tokenizer, out, "--tfds", "vimpac_test_videos:train", "--data-dir",
                                  str(data_dir), "--source-fps", "20")) == 2
    assert "differs in: source_fps" in capsys.readouterr().err
    assert cli.main(tokenize_args(tiny_tokenizer, out, "--tfds", "vimpac_test_videos:train", "--data-dir",
                                  str(data_dir), "--source-fps", "10")) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "videos_ok=2 videos_failed=1 frames=5"  # 3 + 2 frames
    assert token_store.read_metadata(out)["finished"] == meta["finished"]  # found complete, nothing redone


def test_tokenize_tfds_errors(tiny_tokenizer, prepared_videos, tmp_path, capsys):
    out = tmp_path / "out"

    def error(*extra) -> str:
        assert cli.main(tokenize_args(tiny_tokenizer, out, *extra)) == 2
        return capsys.readouterr().err

    with mock():
        assert "exactly one of --videos" in error("--tfds", "ucf101:train", "--videos", str(tmp_path))
        assert "exactly one of --videos" in error()
        assert "--data-dir and --source-fps go with --tfds" in error("--videos", str(tmp_path), "--source-fps", "25")
        assert "TFDS has no dataset 'no_such_dataset'" in error("--tfds", "no_such_dataset:train")
        assert "expected NAME[/CONFIG]:SPLIT" in error("--tfds", "ucf101")
        # moving_mnist's builder records no frame rate
        assert "pass --source-fps" in error("--tfds", "moving_mnist:test")
    # Without the mock: a real data_dir in which ucf101 was never prepared; a split that does not exist.
    assert "not prepared" in error("--tfds", "ucf101:train", "--data-dir", str(tmp_path / "tfds_data"))
    data_dir = str(prepared_videos[0])
    assert "pass --source-fps" in error("--tfds", "vimpac_test_videos:train", "--data-dir", data_dir)
    err = error("--tfds", "vimpac_test_videos:validation", "--data-dir", data_dir, "--source-fps", "10")
    assert "--tfds vimpac_test_videos:validation" in err and "validation" in err.split(":", 3)[-1]
    assert not (out / token_store.METADATA_FILE).exists()


# ------------------------------------------------------------------------------------------
# vimpac export-tfds


def test_export_reads_back_through_data_source_and_grain(ucf_store, tmp_path):
    import grain

    data_dir = tmp_path / "tfds_data"
    assert cli.main(["export-tfds", "--store", f"train={ucf_store}", "--name", "vimpac_test_tokens",
                     "--data-dir", str(data_dir)]) == 0
    ds = tfds.data_source("vimpac_test_tokens", data_dir=str(data_dir), split="train")
    records = read_store(ucf_store)
    assert len(ds) == len(records)
    for i, rec in enumerate(records):
        ex = ds[i]
        np.testing.assert_array_equal(ex["tokens"], rec["tokens"])
        assert ex["tokens"].dtype == np.int16
        assert (int(ex["label"]), ex["video_id"].decode(), float(ex["fps"]), ex["variant"].decode()) == \
            (rec["label"], rec["video_id"], rec["fps"], rec["variant"])
    info = tfds.builder("vimpac_test_tokens", data_dir=str(data_dir)).info
    meta = token_store.read_metadata(ucf_store)
    assert info.features["label"].names == meta["class_names"]
    assert info.metadata["vimpac"]["tokenizer"] == meta["tokenizer"]

    # grain consumes it as it is: the first frame of every record, batched.
    batches = list(grain.MapDataset.source(ds).map(lambda ex: ex["tokens"][0]).batch(2))
    assert [b.shape for b in batches] == [(2, SIZE // 8, SIZE // 8), (1, SIZE // 8, SIZE // 8)]
    np.testing.assert_array_equal(batches[0][1], records[1]["tokens"][0])


def test_export_of_unlabelled_stores_in_two_splits_reads_without_tensorflow(tmp_path):
    videos = [{"video_id": f"v{i}", "num_frames": i + 1, "variants": ("a", "b")} for i in range(3)]
    train = write_test_store(tmp_path / "train", videos, shards=2)
    test = write_test_store(tmp_path / "test", videos[:1], shards=1)
    data_dir = tmp_path / "tfds_data"
    path = tfds_export.export_stores({"train": train, "test": test}, "vimpac_unlabelled", data_dir)
    assert path == data_dir / "vimpac_unlabelled" / tfds_export.DEFAULT_VERSION
    # A fresh process reads it with TFDS and checks that TensorFlow was never imported.
    code = ("import sys, json, tensorflow_datasets as tfds\n"
            f"out = {{}}\n"
            "for split in ('train', 'test'):\n"
            f"    ds = tfds.data_source('vimpac_unlabelled', data_dir={str(data_dir)!r}, split=split)\n"
            "    out[split] = [[ds[i]['video_id'].decode(), ds[i]['variant'].decode(), int(ds[i]['label']),\n"
            "                   ds[i]['tokens'].tolist()] for i in range(len(ds))]\n"
            "out['tf'] = 'tensorflow' in sys.modules\n"
            "print(json.dumps(out))\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["tf"] is False
    for split, store in (("train", train), ("test", test)):
        want = [[r["video_id"], r["variant"], -1, r["tokens"].tolist()] for r in read_store(store)]
        assert got[split] == want  # same records, same order; no label -> -1


def test_export_refuses_incomplete_stores_and_leaves_nothing(tmp_path, capsys):
    store = write_test_store(tmp_path / "store", [{"video_id": "v", "num_frames": 2}])
    data_dir = tmp_path / "tfds_data"

    def error(*args) -> str:
        assert cli.main(["export-tfds", "--name", "vimpac_x", "--data-dir", str(data_dir), *args]) == 2
        return capsys.readouterr().err

    assert "no metadata.json" in error("--store", str(tmp_path / "missing"))
    meta = json.loads((store / token_store.METADATA_FILE).read_text())
    (store / token_store.METADATA_FILE).write_text(json.dumps({**meta, "complete": False}))
    assert "is not complete" in error("--store", str(store))
    (store / token_store.METADATA_FILE).write_text(json.dumps(meta))
    assert "name of a TFDS dataset" in error("--store", str(store), "--name", "ucf101")
    assert "given twice" in error("--store", f"train={store}", "--store", f"train={store}")
    assert not data_dir.exists()


def test_export_killed_midway_leaves_no_dataset(tmp_path, monkeypatch):
    videos = [{"video_id": f"v{i}", "num_frames": 2} for i in range(4)]
    store = write_test_store(tmp_path / "store", videos)
    real = tfds_export.store_examples

    def dies_after_two(store_dir, token_hw):
        for n, example in enumerate(real(store_dir, token_hw)):
            if n == 2:
                raise RuntimeError("killed")
            yield example

    monkeypatch.setattr(tfds_export, "store_examples", dies_after_two)
    data_dir = tmp_path / "tfds_data"
    with pytest.raises(RuntimeError, match="killed"):
        tfds_export.export_stores({"train": store}, "vimpac_half", data_dir)
    assert list((data_dir / "vimpac_half").iterdir()) == []  # no version folder, no temporary left
    monkeypatch.setattr(tfds_export, "store_examples", real)
    tfds_export.export_stores({"train": store}, "vimpac_half", data_dir)  # and a rerun then succeeds
    assert len(tfds.data_source("vimpac_half", data_dir=str(data_dir), split="train")) == 4


def test_importing_the_package_does_not_import_tensorflow():
    code = ("import sys, vimpac_jax.cli, vimpac_jax.tokenize.job, vimpac_jax.data.tfds_source, "
            "vimpac_jax.data.tfds_export, vimpac_jax.commands.tokenize, vimpac_jax.commands.export_tfds\n"
            "assert not [m for m in sys.modules if m.startswith(('tensorflow', 'tensorflow_datasets'))]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
