"""The generated motion dataset (vimpac_jax/demo/data.py, `vimpac demo-data`).

Checks that the files are real videos the project's decoder reads, that the lists are mmaction2
lists the project's readers read, that generation is reproducible, and that the dataset is
temporally heavy: one frame cannot tell a class from its opposite, while the frames in order can.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from vimpac_jax.data import annotations, video_decode as vd  # noqa: E402
from vimpac_jax.demo import data as dd  # noqa: E402

COUNTS = {"pool": 16, "train": 48, "val": 16}  # train and val: multiples of the 8 classes
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7)]  # (class, its time-reversed opposite)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "data"
    summary = dd.write_demo_dataset(out, "default", seed=3, workers=0, counts=COUNTS, progress=False)
    return out, summary


def _specs(root: Path) -> dict[str, dd.VideoSpec]:
    out = {}
    for line in (root / "specs.jsonl").read_text().splitlines():
        d = json.loads(line)
        out[d["path"]] = dd.spec_from_dict(d["spec"])
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Files and lists
# ----------------------------------------------------------------------------------------------


def test_lists_read_back_and_videos_decode(dataset):
    root, summary = dataset
    preset = dd.PRESETS["default"]
    names = annotations.read_label_map(str(root / "classes.txt"))
    assert names == list(dd.CLASS_NAMES)
    pool = annotations.read_mmaction_list(str(root / "pool.txt"), video_root=str(root))
    train = annotations.read_mmaction_list(str(root / "train.txt"), video_root=str(root), class_names=names)
    val = annotations.read_mmaction_list(str(root / "val.txt"), video_root=str(root), class_names=names)
    assert (len(pool), len(train), len(val)) == (COUNTS["pool"], COUNTS["train"], COUNTS["val"])
    assert all(it.label is None for it in pool)
    assert all(it.label is not None for it in list(train) + list(val))
    ids = [it.video_id for ann in (pool, train, val) for it in ann]
    assert len(set(ids)) == len(ids)  # token-store keys never collide across splits

    specs = _specs(root)
    for it in list(pool) + list(train) + list(val):
        rel = it.video_id + ".mp4"
        assert it.label is None or specs[rel].label == it.label
        frames = vd.decode_frames(it.path, preset.fps)
        assert frames.shape == (preset.num_frames, preset.size, preset.size, 3)
        assert frames.dtype == np.uint8
    # At half the frame rate the decoder picks every other frame.
    half = vd.decode_frames(train.items[0].path, preset.fps / 2)
    assert half.shape[0] == preset.num_frames // 2

    meta = json.loads((root / "dataset.json").read_text())
    assert meta["counts"] == COUNTS and meta["seed"] == 3 and meta["classes"] == list(dd.CLASS_NAMES)
    assert (meta["size"], meta["fps"], meta["num_frames"]) == (preset.size, preset.fps, preset.num_frames)
    assert summary["counts"] == COUNTS and summary["out_dir"] == str(root)
    assert not list(root.parent.glob(".data.*"))  # no temporary folder left beside it


def test_decoded_frames_match_the_drawing(dataset):
    root, _ = dataset
    specs = _specs(root)
    rel, spec = next(iter(specs.items()))
    preset = dd.PRESETS["default"]
    drawn = dd.render_video(spec, preset.size, preset.num_frames).astype(np.float64)
    decoded = vd.decode_frames(root / rel, preset.fps).astype(np.float64)
    psnr = 10 * math.log10(255**2 / np.mean((drawn - decoded) ** 2))
    assert psnr > 25  # lossy, but the same pictures (the per-pixel noise is what x264 drops)


def test_labels_balanced(dataset):
    root, summary = dataset
    k = len(dd.CLASS_NAMES)
    for split in ("train", "val"):
        ann = annotations.read_mmaction_list(str(root / f"{split}.txt"), video_root=str(root))
        counts = np.bincount([it.label for it in ann], minlength=k)
        assert counts.tolist() == [COUNTS[split] // k] * k
        assert summary["label_counts"][split] == counts.tolist()
        # The order of a list says nothing about the class.
        assert [it.label for it in ann] != sorted(it.label for it in ann)
    pool_labels = [s.label for rel, s in _specs(root).items() if rel.startswith("videos/pool/")]
    assert np.bincount(pool_labels, minlength=k).tolist() == [COUNTS["pool"] // k] * k


def test_same_seed_same_bytes_whatever_the_workers(dataset, tmp_path):
    root, _ = dataset
    first = _files(root)
    # Fewer videos, two spawned workers: video i depends only on (seed, split, i).
    small = {"pool": 8, "train": 8, "val": 8}
    again = dd.write_demo_dataset(tmp_path / "again", seed=3, workers=2, counts=small, progress=False)
    second = _files(Path(again["out_dir"]))
    videos = [name for name in second if name.endswith(".mp4")]
    assert len(videos) == 24
    for name in videos:
        assert second[name] == first[name], name
    other = dd.write_demo_dataset(tmp_path / "other", seed=4, workers=0, counts=small, progress=False)
    third = _files(Path(other["out_dir"]))
    assert all(third[name] != first[name] for name in videos)


# ----------------------------------------------------------------------------------------------
# Temporally heavy: only the order of the frames tells a class from its opposite
# ----------------------------------------------------------------------------------------------


def test_sampler_is_symmetric_under_time_reversal():
    """Same random draws, opposite class == the same video played backwards, exactly."""
    for a, b in PAIRS:
        for k in range(5):
            spec_a = dd.sample_spec(np.random.default_rng([k, a]), a)
            spec_b = dd.sample_spec(np.random.default_rng([k, a]), b)
            assert spec_b == dd.reverse_spec(spec_a)
            assert dd.reverse_spec(spec_b) == spec_a
            assert spec_b.label == dd.OPPOSITE[a] == b


def test_reverse_spec_renders_the_frames_backwards():
    for label in range(len(dd.CLASS_NAMES)):
        spec = dd.sample_spec(np.random.default_rng(label), label, noise_std=0.0)
        frames = dd.render_video(spec, 32, 9)
        assert not (frames[0] == frames[-1]).all()  # it moves
        np.testing.assert_array_equal(dd.render_video(dd.reverse_spec(spec), 32, 9), frames[::-1])


def _target_features(frames: np.ndarray, spec: dd.VideoSpec) -> np.ndarray:
    """Per frame [N, 4]: the target's centroid x, y (pixels), area (pixels) and marker angle
    (radians, screen coordinates), measured on the pixels. The spec gives only colours and the
    static distractors' places (masked out), never the target's motion."""
    f = frames.astype(np.float64) / 255.0
    n, size = f.shape[:2]
    fg = np.abs(f - np.asarray(spec.background)).max(-1) > 0.2  # [N, H, W]
    yy, xx = np.mgrid[:size, :size] + 0.5
    for d in spec.distractors:
        cx, cy = (d.centre[0] + 0.5) * size, (d.centre[1] + 0.5) * size
        fg &= ((xx - cx) ** 2 + (yy - cy) ** 2 > (1.3 * d.radius * size) ** 2)[None]
    to_marker = np.linalg.norm(f - np.asarray(spec.target.marker_colour), axis=-1)
    to_body = np.linalg.norm(f - np.asarray(spec.target.colour), axis=-1)
    marker = fg & (to_marker < to_body) & (to_marker < 0.35)

    def centroid(mask):  # [N, H, W] -> x, y, count [N] (nan where empty)
        count = mask.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (mask * xx).sum(axis=(1, 2)) / count, (mask * yy).sum(axis=(1, 2)) / count, count

    cx, cy, area = centroid(fg)
    mx, my, _ = centroid(marker)
    return np.stack([cx, cy, np.where(area > 0, area, np.nan), np.arctan2(my - cy, mx - cx)], axis=1)


def _temporal_feature(feats: np.ndarray, pair: tuple[int, int]) -> float:
    """How the target's position, size or marker angle changes from the first frame to the
    last, signed so that > 0 means the pair's second class (right, down, ccw, shrink)."""
    if pair == (0, 1):
        return feats[-1, 0] - feats[0, 0]
    if pair == (2, 3):
        return feats[-1, 1] - feats[0, 1]
    if pair == (6, 7):
        return feats[0, 2] - feats[-1, 2]
    turns = np.diff(feats[:, 3])
    turns = turns[~np.isnan(turns)]
    return -float(np.angle(np.exp(1j * turns)).sum())  # summed frame-to-frame turns: < 0 = ccw


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the empirical CDFs."""
    a, b = np.sort(a[~np.isnan(a)]), np.sort(b[~np.isnan(b)])
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, "right") / len(a)
    cdf_b = np.searchsorted(b, grid, "right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def test_one_frame_cannot_tell_opposites_but_frames_in_order_can():
    """For each pair of opposite classes, the target's position, size and marker angle in single
    frames are distributed alike under both classes (independently drawn videos), while the
    change of the same measurements from the first to the last frame separates the pair."""
    per_class, n_frames = 50, 8
    # KS critical distance at alpha = 0.001 for per_class independent samples a side. The
    # frames of one video are correlated, so the video count (not the frame count) sets it.
    critical = 1.95 * math.sqrt(2 / per_class)
    names = ("centroid x", "centroid y", "area", "marker angle")
    for a, b in PAIRS:
        frames_of = {a: [], b: []}
        temporal, truth = [], []
        for label in (a, b):
            for k in range(per_class):
                spec = dd.sample_spec(np.random.default_rng([99, label, k]), label)
                feats = _target_features(dd.render_video(spec, 32, n_frames), spec)
                frames_of[label].append(feats)
                temporal.append(_temporal_feature(feats, (a, b)))
                truth.append(label == b)
        fa, fb = np.concatenate(frames_of[a]), np.concatenate(frames_of[b])
        for j, name in enumerate(names):
            d = _ks_statistic(fa[:, j], fb[:, j])
            assert d < critical, (dd.CLASS_NAMES[a], dd.CLASS_NAMES[b], name, d, critical)
        # The sign of the change alone is the rule: nothing is fitted.
        accuracy = np.mean((np.asarray(temporal) > 0) == np.asarray(truth))
        assert accuracy > 0.95, (dd.CLASS_NAMES[a], dd.CLASS_NAMES[b], accuracy)


def test_decoded_videos_carry_the_motion(dataset):
    """The same first-to-last change, measured on the written files decoded at half their frame
    rate, tells each class from its opposite."""
    root, _ = dataset
    specs = _specs(root)
    correct = total = 0
    for split in ("train", "val"):
        for it in annotations.read_mmaction_list(str(root / f"{split}.txt"), video_root=str(root)):
            spec = specs[it.video_id + ".mp4"]
            pair = next(p for p in PAIRS if it.label in p)
            value = _temporal_feature(_target_features(vd.decode_frames(it.path, 4), spec), pair)
            correct += (value > 0) == (it.label == pair[1])
            total += 1
    assert total == COUNTS["train"] + COUNTS["val"]
    assert correct / total > 0.9


# ----------------------------------------------------------------------------------------------
# Drawing and arguments
# ----------------------------------------------------------------------------------------------


def test_render_video_shape_and_determinism():
    spec = dd.sample_spec(np.random.default_rng(0), 4, max_distractors=2)
    a = dd.render_video(spec, 48, 5)
    assert a.shape == (5, 48, 48, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, dd.render_video(spec, 48, 5))
    assert dd.spec_from_dict(json.loads(json.dumps(dd.spec_to_dict(spec)))) == spec
    with pytest.raises(ValueError, match="label"):
        dd.sample_spec(np.random.default_rng(0), len(dd.CLASS_NAMES))
    with pytest.raises(ValueError, match="shape"):
        dd.render_video(dataclasses.replace(spec, target=dataclasses.replace(spec.target, shape="star")), 32, 2)


def test_refuses_non_empty_out_and_bad_arguments(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        dd.write_demo_dataset(out, counts={"pool": 0, "train": 8, "val": 0}, progress=False)
    assert (out / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="preset"):
        dd.write_demo_dataset(tmp_path / "a", preset="huge", progress=False)
    with pytest.raises(ValueError, match="counts"):
        dd.write_demo_dataset(tmp_path / "b", counts={"test": 3}, progress=False)
    with pytest.raises(ValueError, match="seed"):
        dd.write_demo_dataset(tmp_path / "c", seed=-1, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()

    # --force replaces it, only once the new dataset is complete.
    dd.write_demo_dataset(out, counts={"pool": 0, "train": 8, "val": 0}, force=True, workers=0, progress=False)
    assert not (out / "keep.txt").exists()
    assert len((out / "train.txt").read_text().splitlines()) == 8
    assert (out / "pool.txt").read_text() == ""


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def broken(path, frames, fps, crf=20):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("encoder exploded")
        return real(path, frames, fps, crf)

    real = dd.encode_video
    monkeypatch.setattr(dd, "encode_video", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        dd.write_demo_dataset(tmp_path / "out", counts={"pool": 8, "train": 8, "val": 0}, workers=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    from vimpac_jax import cli

    out = tmp_path / "cli"
    rc = cli.main(["demo-data", "--out", str(out), "--counts", "pool=8,train=8,val=8", "--workers", "0",
                   "--seed", "1", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "pool=8 train=8 val=8" in text and str(out) in text
    assert len(list((out / "videos" / "val").glob("*.mp4"))) == 8
    rc = cli.main(["demo-data", "--out", str(out), "--counts", "train=8", "--workers", "0", "--quiet"])
    assert rc == 2
    assert "--force" in capsys.readouterr().err
