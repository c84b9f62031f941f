"""grain pipelines over the token store: sampling statistics, padding, test-clip starts, sharding
over processes, checkpointed iterators, errors.

Stores are written with `write_test_store(pattern="frame_index")`: token [f, i, j] == f except
[f, 0, 1] = variant position and [f, 0, 2] = video position, so a clip shows which stored
frames, variant and video it came from.

Statistical checks use fixed seeds and chi-square bounds at the 0.999 quantile of the chi-square
distribution with the stated degrees of freedom (scipy.stats.chi2.ppf(0.999, df)): a correct
sampler exceeds one with probability 0.001, a sampler that ignores part of the range or ties the
two starts together exceeds it by orders of magnitude.
"""

import json
from pathlib import Path

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vimpac_jax.constants import PAD_ID
from vimpac_jax.data import pipelines as P
from vimpac_jax.data import token_store
from vimpac_jax.data.testing import write_test_store

REPO = Path(__file__).resolve().parents[1]

CHI2_999 = {9: 27.877, 11: 31.264, 99: 148.230}
FINETUNE_VARIANTS = [f"r{r}_{p}_{f}" for r in (128, 160) for p in ("start", "center", "end") for f in ("noflip", "flip")]


def _videos(n, frames, variants=("r128_center_noflip",), label=True):
    frames = frames if isinstance(frames, (list, tuple)) else [frames] * n
    return [dict(video_id=f"vid{i:03d}", label=(i % 7) if label else None, num_frames=frames[i], variants=list(variants))
            for i in range(n)]


@pytest.fixture(scope="module")
def pretrain_index(tmp_path_factory):
    """8 videos of 14 frames: with T=5 the starts range over 0..9 (10 values)."""
    store = write_test_store(tmp_path_factory.mktemp("pre") / "store", _videos(8, 14), shards=3, pattern="frame_index")
    return P.load_index(store)


@pytest.fixture(scope="module")
def finetune_index(tmp_path_factory):
    """24 videos x 12 variants, some shorter than a clip (3 frames), in 5 shards."""
    frames = [3 if i % 6 == 0 else 10 + i for i in range(24)]
    store = write_test_store(tmp_path_factory.mktemp("ft") / "store", _videos(24, frames, FINETUNE_VARIANTS),
                             shards=5, pattern="frame_index")
    return P.load_index(store)


def _first_frames(ds, num_batches):
    """Stored frame index of each clip's first frame: int [N, 2] from a pre-training dataset."""
    return np.concatenate([ds[b]["tokens"][:, :, 0, 0, 0] for b in range(num_batches)])


def _chi2(counts):
    counts = np.asarray(counts, float).ravel()
    expected = counts.sum() / counts.size
    return ((counts - expected) ** 2 / expected).sum()


# ---------------------------------------------------------------------------------------------
# Index.
# ---------------------------------------------------------------------------------------------


def test_index_groups_records_by_video(finetune_index):
    idx = finetune_index
    assert idx.num_videos == 24 and idx.variants == tuple(FINETUNE_VARIANTS) and idx.grid == (4, 4)
    assert idx.video_ids == tuple(sorted(idx.video_ids))
    # every (video, variant) exactly once: the record after its header, its chunk 0
    scanned = token_store.scan_headers(idx.store_dir)
    assert len(scanned) == 24 * 12 and sorted(idx.records.ravel().tolist()) == sorted(first for first, _ in scanned)
    source = token_store.open_records(idx.store_dir)
    for v in (0, 7, 23):
        for c in (0, 5, 11):
            rec = token_store.decode_header(source[int(idx.records[v, c]) - 1])
            assert (rec["video_id"], rec["variant"], rec["label"]) == (idx.video_ids[v], idx.variants[c], idx.labels[v])
            assert rec["shape"][0] == idx.num_frames[v, c]


def test_index_cache_is_used_and_invalidated(tmp_path):
    store = write_test_store(tmp_path / "s", _videos(3, 6))
    first = P.load_index(store)
    cache = store / P.INDEX_CACHE_FILE
    assert cache.is_file()
    # A cache whose key matches is trusted: doctor its labels and see them come back.
    with np.load(cache) as z:
        arrays = dict(z)
    arrays["labels"] = arrays["labels"] + 100
    np.savez(cache, **arrays)
    assert list(P.load_index(store).labels) == [l + 100 for l in first.labels]
    # A changed store (metadata rewritten) is indexed again.
    meta = json.loads((store / "metadata.json").read_text())
    meta["note"] = "re-run"
    (store / "metadata.json").write_text(json.dumps(meta))
    assert list(P.load_index(store).labels) == list(first.labels)


# ---------------------------------------------------------------------------------------------
# Pre-training: two clips.
# ---------------------------------------------------------------------------------------------


def test_pair_starts_uniform_and_independent():
    rng = np.random.default_rng(0)
    starts = np.array([P.pair_starts(rng, 9) for _ in range(20000)])
    assert starts.min() == 0 and starts.max() == 9
    assert _chi2(np.bincount(starts[:, 0], minlength=10)) < CHI2_999[9]
    assert _chi2(np.bincount(starts[:, 1], minlength=10)) < CHI2_999[9]
    joint = np.bincount(starts[:, 0] * 10 + starts[:, 1], minlength=100)
    assert _chi2(joint) < CHI2_999[99]  # independence: the 10x10 table is flat
    assert abs(np.corrcoef(starts.T)[0, 1]) < 4 / np.sqrt(len(starts))  # 4 sigma under independence


def test_pretrain_pipeline_starts_uniform_independent(pretrain_index):
    """Through the pipeline (reads, shuffle, per-(seed, epoch, video) RNG): 8 videos x 500 epochs."""
    ds = P.train_dataset(pretrain_index, "pretrain", batch_size=8, clip_len=5, seed=1, process_index=0, process_count=1)
    first = _first_frames(ds, 500)
    assert first.shape == (4000, 2)
    assert _chi2(np.bincount(first[:, 0], minlength=10)) < CHI2_999[9]
    assert _chi2(np.bincount(first[:, 1], minlength=10)) < CHI2_999[9]
    assert _chi2(np.bincount(first[:, 0] * 10 + first[:, 1], minlength=100)) < CHI2_999[99]
    b = ds[3]["tokens"]
    assert b.shape == (8, 2, 5, 4, 4) and b.dtype == np.int32
    # Each clip is 5 consecutive stored frames of one video.
    np.testing.assert_array_equal(b[:, :, :, 0, 0], b[:, :, :1, 0, 0] + np.arange(5))
    assert (b[:, 0, :, 0, 2] == b[:, 1, :, 0, 2]).all()  # both clips from the same video
    videos = [int(v) for v in np.concatenate([ds[i]["tokens"][:, 0, 0, 0, 2] for i in (0, 1, 2)])]
    assert sorted(videos[:8]) == sorted(videos[8:16]) == list(range(8))  # one epoch per 8 examples


def test_relevance_range_is_respected(pretrain_index):
    rng = np.random.default_rng(1)
    pairs = np.array([P.pair_starts(rng, 9, relevance_range=2) for _ in range(5000)])
    assert np.abs(pairs[:, 0] - pairs[:, 1]).max() == 2
    for s1 in range(10):  # the second start covers its whole clipped window, and nothing else
        seen = set(pairs[pairs[:, 0] == s1, 1].tolist())
        assert seen == set(range(max(0, s1 - 2), min(9, s1 + 2) + 1))
    assert set(np.ptp([P.pair_starts(rng, 9, relevance_range=0) for _ in range(50)], axis=1)) == {0}
    ds = P.train_dataset(pretrain_index, "pretrain", batch_size=8, clip_len=5, seed=2, relevance_range=3,
                         process_index=0, process_count=1)
    first = _first_frames(ds, 100)
    assert np.abs(first[:, 0] - first[:, 1]).max() == 3


def test_clip_frame_rate_steps_over_stored_frames(tmp_path):
    """16 fps store, 4 fps clips: step 4, as the released code's max(int(16 / 4), 1)."""
    store = write_test_store(tmp_path / "s", _videos(4, 40), fps=16, pattern="frame_index")
    idx = P.load_index(store)
    ds = P.train_dataset(idx, "pretrain", batch_size=4, clip_len=5, clip_fps=4, seed=0, process_index=0, process_count=1)
    frames = np.concatenate([ds[i]["tokens"][:, :, :, 0, 0] for i in range(50)]).reshape(-1, 5)
    np.testing.assert_array_equal(frames, frames[:, :1] + 4 * np.arange(5))
    # delta = 40 + 3 - 20 = 23; the last start reaches the last stored frame (23 + 16 = 39).
    assert frames[:, 0].max() == 23 and frames[:, 0].min() == 0
    assert P.frame_step(16, 6) == 2 and P.frame_step(2, None) == 1 and P.frame_step(2, 2) == 1
    with pytest.raises(ValueError, match="exceeds"):
        P.frame_step(2, 4)


def test_short_videos_are_padded_at_the_end(tmp_path):
    store = write_test_store(tmp_path / "s", _videos(2, [3, 6]), pattern="frame_index")
    idx = P.load_index(store)
    ds = P.train_dataset(idx, "pretrain", batch_size=2, clip_len=5, seed=0, process_index=0, process_count=1)
    batch = ds[0]["tokens"]
    for example in batch:
        video = example[0, 0, 0, 2]
        n = idx.num_frames[video, 0]
        for clip in example:
            if n == 3:
                assert (clip[3:] == PAD_ID).all()  # every cell of the two missing frames
                np.testing.assert_array_equal(clip[:3, 0, 0], [0, 1, 2])
                assert (clip[:3] != PAD_ID).all()
            else:
                assert (clip != PAD_ID).all()
    # Step 2 on 6 frames: delta = max(6 + 1 - 10, 0) = 0, frames 0, 2, 4, then two PAD frames.
    clip = P.take_clip(np.arange(6)[:, None, None] * np.ones((1, 2, 2), np.int16), 0, 5, 2)
    np.testing.assert_array_equal(clip[:, 0, 0], [0, 2, 4, PAD_ID, PAD_ID])
    assert (clip[3:] == PAD_ID).all() and clip.dtype == np.int32


# ---------------------------------------------------------------------------------------------
# Test clips.
# ---------------------------------------------------------------------------------------------


def _reference_start(num_frames, clip_len, step, k, num_clips):
    """Released code, video_token_dataset_fps.get_start_end_idx with temporal_uniform_sample's
    arguments (video_size = n + step - 1, clip_size = clip_len * step), float division + int()."""
    video_size, clip_size = num_frames + step - 1, clip_len * step
    delta = max(video_size - clip_size, 0)
    return int(delta * k / max(num_clips - 1, 1))


def test_eval_clip_starts_match_reference():
    for n in range(1, 70):
        for clip_len in (1, 5, 10):
            for step in (1, 2, 3):
                for num_clips in (1, 2, 3, 5, 10):
                    expected = [_reference_start(n, clip_len, step, k, num_clips) for k in range(num_clips)]
                    assert P.eval_clip_starts(n, clip_len, step, num_clips).tolist() == expected
    # The released test clips at step 1: (n - clip)·k/(K - 1).
    assert P.eval_clip_starts(20, 5, 1, 4).tolist() == [0, 5, 10, 15]
    assert P.eval_clip_starts(3, 5, 1, 10).tolist() == [0] * 10  # shorter than a clip
    assert P.eval_clip_starts(30, 5, 1, 1).tolist() == [0]  # K == 1: first clip, as released


def test_eval_pipeline_views_and_padding(finetune_index):
    idx = finetune_index
    ds = P.eval_dataset(idx, batch_size=5, clip_len=5, num_clips=4, process_index=0, process_count=1)
    crops = P.default_test_variants(idx.variants)
    assert crops == ("r128_start_noflip", "r128_center_noflip", "r128_end_noflip")
    batches = [ds[i] for i in range(len(ds))]
    assert len(batches) == 5  # 24 videos padded to 25
    tokens = np.concatenate([b["tokens"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    video_index = np.concatenate([b["video_index"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert tokens.shape == (25, 12, 5, 4, 4)
    assert valid.tolist() == [True] * 24 + [False] and video_index.tolist() == list(range(24)) + [-1]
    assert labels[:24].tolist() == idx.labels.tolist()
    for v in range(24):
        n = int(idx.num_frames[v, 0])
        starts = [_reference_start(n, 5, 1, k, 4) for k in range(4)]
        for c, crop in enumerate(crops):
            for k, s in enumerate(starts):
                view = tokens[v, c * 4 + k]
                assert (view[:, 0, 1] == idx.variants.index(crop)).all() or n < 5
                assert (view[:, 0, 2][:min(n, 5)] == v).all()
                frames = view[:, 0, 0]
                expected = [s + t if s + t < n else PAD_ID for t in range(5)]
                assert frames.tolist() == expected
    assert (tokens[24] != PAD_ID).all()  # the padding example holds no all-PAD line


def test_eval_pipeline_center_crop_only(finetune_index):
    ds = P.eval_dataset(finetune_index, batch_size=8, clip_len=5, num_clips=2, variants=["r128_center_noflip"],
                        process_index=0, process_count=1)
    b = ds[0]
    assert b["tokens"].shape == (8, 2, 5, 4, 4)
    center = finetune_index.variants.index("r128_center_noflip")
    assert (b["tokens"][b["valid"]][:, :, 0, 0, 1] == center).all()


# ---------------------------------------------------------------------------------------------
# Fine-tuning.
# ---------------------------------------------------------------------------------------------


def test_finetune_variant_choice_covers_all_variants(finetune_index):
    idx = finetune_index
    ds = P.train_dataset(idx, "finetune", batch_size=8, clip_len=5, seed=3, process_index=0, process_count=1)
    batches = [ds[i] for i in range(150)]  # 1200 examples, 50 epochs
    tokens = np.concatenate([b["tokens"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert tokens.shape == (1200, 5, 4, 4)
    video = tokens[:, 0, 0, 2]
    np.testing.assert_array_equal(labels, idx.labels[video])
    counts = np.bincount(tokens[:, 0, 0, 1], minlength=12)
    assert (counts > 0).all() and _chi2(counts) < CHI2_999[11]
    long_clips = tokens[idx.num_frames[video, 0] >= 5]  # consecutive frames, no padding
    np.testing.assert_array_equal(long_clips[:, :, 0, 0], long_clips[:, :1, 0, 0] + np.arange(5))
    short = tokens[idx.num_frames[video, 0] == 3]
    assert len(short) and (short[:, 3:] == PAD_ID).all() and (short[:, :3, 0, 0] == [0, 1, 2]).all()


def test_same_seed_same_batches_and_epochs_reshuffle(finetune_index):
    make = lambda seed: P.train_dataset(finetune_index, "finetune", batch_size=8, clip_len=5, seed=seed,
                                          process_index=0, process_count=1)
    a, b, c = make(5), make(5), make(6)
    for i in range(6):
        np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
    order = lambda ds, e: np.concatenate([ds[3 * e + i]["tokens"][:, 0, 0, 2] for i in range(3)])
    assert sorted(order(a, 0)) == sorted(order(a, 1)) == list(range(24))
    assert order(a, 0).tolist() != order(a, 1).tolist()  # each epoch shuffled anew
    assert order(a, 0).tolist() != order(c, 0).tolist()  # another seed, another order


def test_each_epoch_drops_its_tail_so_no_batch_repeats_a_video(finetune_index):
    """drop_last per epoch: 24 videos in global batches of 5 read 20 per epoch, never mixing two
    epochs in a batch (a video twice in a batch is its own NCE negative)."""
    ds = P.train_dataset(finetune_index, "finetune", batch_size=5, clip_len=5, seed=2, process_index=0, process_count=1)
    order = P.EpochOrder(24, seed=2)
    for epoch in range(3):
        batches = [ds[4 * epoch + b]["tokens"][:, 0, 0, 2] for b in range(4)]
        assert all(len(set(b.tolist())) == 5 for b in batches)
        assert np.concatenate(batches).tolist() == order.permutation(epoch)[:20].tolist()


# ---------------------------------------------------------------------------------------------
# Processes.
# ---------------------------------------------------------------------------------------------


def test_processes_read_disjoint_complete_shares(finetune_index):
    idx = finetune_index
    for count in (2, 3):
        shares = []
        for p in range(count):
            ds = P.train_dataset(idx, "finetune", batch_size=4, clip_len=5, seed=0, num_epochs=1,
                                 process_index=p, process_count=count)
            shares.append(np.concatenate([ds[i]["tokens"][:, 0, 0, 2] for i in range(len(ds))]).tolist())
        assert len({len(s) for s in shares}) == 1  # same number of batches everywhere
        union = sorted(v for s in shares for v in s)
        kept = len(union)
        assert kept == 24 // (4 * count) * 4 * count  # only the incomplete global batch is dropped
        assert len(set(union)) == kept  # disjoint
        if count == 2:
            assert union == list(range(24))  # 24 = 3 global batches of 8: the whole split


def test_process_batches_are_contiguous_blocks_of_the_single_process_stream(pretrain_index):
    single = P.train_dataset(pretrain_index, "pretrain", batch_size=4, clip_len=5, seed=7, process_index=0,
                             process_count=1)
    parts = [P.train_dataset(pretrain_index, "pretrain", batch_size=2, clip_len=5, seed=7, process_index=p,
                             process_count=2)
             for p in range(2)]
    for b in range(5):  # crosses epoch boundaries (8 videos = 2 global batches)
        merged = np.empty_like(single[b]["tokens"])
        merged[:2], merged[2:] = parts[0][b]["tokens"], parts[1][b]["tokens"]  # process order
        np.testing.assert_array_equal(merged, single[b]["tokens"])


def test_eval_processes_count_every_video_once(finetune_index):
    seen = []
    lengths = set()
    for p in range(3):
        ds = P.eval_dataset(finetune_index, batch_size=5, clip_len=5, num_clips=2, process_index=p, process_count=3)
        lengths.add(len(ds))
        for i in range(len(ds)):
            b = ds[i]
            seen += b["video_index"][b["valid"]].tolist()
    assert lengths == {2}  # 24 videos padded to 30 = 2 batches x 5 x 3 processes
    assert sorted(seen) == list(range(24))


# ---------------------------------------------------------------------------------------------
# Checkpointed iterators.
# ---------------------------------------------------------------------------------------------


def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def test_iterator_restored_mid_epoch_continues_the_same_sequence(finetune_index):
    make = lambda: P.make_iterator(P.train_dataset(finetune_index, "finetune", batch_size=5, clip_len=5, seed=11,
                                                   process_index=0, process_count=1), read_threads=2)
    reference = make()
    _take(reference, 7)  # 35 examples: inside the second epoch of 24 videos
    state = reference.get_state()
    expected = _take(reference, 6)  # runs through the next epoch boundary
    resumed = make()
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 6)):
        np.testing.assert_array_equal(a, b)


def test_iterator_round_trip_through_orbax_checkpoint(pretrain_index, tmp_path):
    make = lambda: P.make_iterator(P.train_dataset(pretrain_index, "pretrain", batch_size=3, clip_len=5, seed=4,
                                                   process_index=0, process_count=1), read_threads=2)
    model_state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(5, np.int32)}
    it = make()
    _take(it, 5)
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(model_state),
                                             data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 4)
    fresh = make()
    _take(fresh, 1)  # a fresh iterator somewhere else; the restore must move it
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(model_state), data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(restored["state"]["w"], model_state["w"])
    for a, b in zip(expected, _take(fresh, 4)):
        np.testing.assert_array_equal(a, b)


def test_worker_processes_give_the_same_batches(pretrain_index):
    ds = P.train_dataset(pretrain_index, "pretrain", batch_size=2, clip_len=5, seed=9, process_index=0, process_count=1)
    it = P.make_iterator(ds, workers=2, read_threads=1)
    try:
        got = _take(it, 4)
        state = it.get_state()
        after = _take(it, 2)
    finally:
        it.close()
    for i, batch in enumerate(got + after):
        np.testing.assert_array_equal(batch, ds[i]["tokens"])
    assert state  # worker iterators are checkpointable too


# ---------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------


def test_errors_name_the_problem(tmp_path, finetune_index):
    empty = write_test_store(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="no records"):
        P.load_index(empty)
    few = P.load_index(write_test_store(tmp_path / "few", _videos(2, 6), shards=2))
    with pytest.raises(ValueError, match="fewer than the 3 processes"):
        P.eval_dataset(few, batch_size=1, clip_len=5, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        P.train_dataset(few, "pretrain", batch_size=3, clip_len=5, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index"):
        P.train_dataset(few, "pretrain", batch_size=1, clip_len=5, seed=0, process_index=2, process_count=2)
    unlabelled = P.load_index(write_test_store(tmp_path / "nolabel", _videos(4, 6, label=False)))
    with pytest.raises(ValueError, match="unlabelled"):
        P.train_dataset(unlabelled, "finetune", batch_size=2, clip_len=5, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="unknown variants"):
        P.train_dataset(finetune_index, "finetune", batch_size=2, clip_len=5, seed=0, variants=["r999_center_noflip"],
                        process_index=0, process_count=1)
    with pytest.raises(ValueError, match="task must be one of"):
        P.train_dataset(finetune_index, "test", batch_size=2, clip_len=5, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="relevance_range is a pre-training option"):
        P.train_dataset(finetune_index, "finetune", batch_size=2, clip_len=5, seed=0, relevance_range=2,
                        process_index=0, process_count=1)
    meta_path = tmp_path / "few" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ValueError, match="not complete"):
        P.load_index(tmp_path / "few")
    with pytest.raises(FileNotFoundError, match="not a token store"):
        P.load_index(tmp_path / "missing")


def test_videos_missing_a_variant_are_skipped(tmp_path, caplog):
    videos = _videos(3, 6, ["r128_start_noflip", "r128_center_noflip"])
    videos[1]["variants"] = ["r128_center_noflip"]
    with caplog.at_level("WARNING"):
        idx = P.load_index(write_test_store(tmp_path / "s", videos))
    assert idx.video_ids == ("vid000", "vid002") and idx.variants == ("r128_start_noflip", "r128_center_noflip")
    assert "vid001" in caplog.text


def test_global_batch_builds_sharded_arrays(pretrain_index):
    import jax

    from vimpac_jax.training import sharding as shd

    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    batch = P.train_dataset(pretrain_index, "pretrain", batch_size=4, clip_len=5, seed=0, process_index=0,
                            process_count=1)[0]
    arrays = shd.make_global_batch(batch, mesh)
    assert arrays["tokens"].shape == (4, 2, 5, 4, 4) and arrays["tokens"].sharding == shd.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(arrays["tokens"]), batch["tokens"])


# ---------------------------------------------------------------------------------------------
# Record layouts: the chunked layout reads only a clip's chunks and changes no clip.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout_indexes(tmp_path_factory):
    """The same 24 videos (3 to 47 frames, 6 variants, 16 fps) chunked by 4, by 7 and by 64 frames
    (each video one record, as the old "whole" layout read them): {chunk_frames: index}; and
    under "whole" the path of the same videos in that old layout (`vimpac convert-store`'s input)."""
    frames = [3 if i % 6 == 0 else 10 + 2 * i for i in range(24)]
    videos = _videos(24, frames, FINETUNE_VARIANTS[:6])
    root = tmp_path_factory.mktemp("layouts")

    def store(chunk):
        return write_test_store(root / f"c{chunk}", videos, shards=3, fps=16, pattern="frame_index", chunk_frames=chunk)

    return {"whole": str(store(None)), **{c: P.load_index(store(c)) for c in (4, 7, 64)}}


class _CountingReader:
    """Wraps a RecordReader; records the keys of every read call."""

    def __init__(self, reader):
        self.reader, self.calls = reader, []

    def read(self, keys):
        self.calls.append(np.asarray(keys))
        return self.reader.read(keys)


def test_chunks_of_any_length_give_the_same_clips_as_whole_videos(layout_indexes):
    whole = layout_indexes[64]  # every video in one record
    for chunk in (4, 7, 64):
        idx = layout_indexes[chunk]
        assert idx.chunk_frames == chunk
        for name in ("video_ids", "variants"):
            assert getattr(idx, name) == getattr(whole, name)
        np.testing.assert_array_equal(idx.num_frames, whole.num_frames)
    make = {
        # relevance range, several variants, clips at step 2 (16 -> 8 fps) and short videos (PAD)
        "pretrain": lambda idx: P.train_dataset(idx, "pretrain", batch_size=8, clip_len=5, clip_fps=8, seed=3,
                                                relevance_range=6, process_index=0, process_count=1),
        "finetune": lambda idx: P.train_dataset(idx, "finetune", batch_size=8, clip_len=5, seed=4,
                                                process_index=1, process_count=2),
        "test": lambda idx: P.eval_dataset(idx, batch_size=5, clip_len=5, num_clips=4, process_index=0,
                                           process_count=1),
    }
    for kind, build in make.items():
        reference = build(whole)
        for chunk in (4, 7):
            ds = build(layout_indexes[chunk])
            assert len(ds) == len(reference)
            for b in range(min(len(ds), 7)):
                got, want = ds[b], reference[b]
                assert got.keys() == want.keys()
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key], err_msg=f"{kind} chunk={chunk} batch {b} {key}")
    # The reference itself is right: test view v = c·K + k holds frames of the released formula.
    batch = make["test"](whole)[1]
    for row, v in enumerate(batch["video_index"]):
        n = int(whole.num_frames[v, 0])
        for k in range(4):
            start = _reference_start(n, 5, 1, k, 4)
            assert batch["tokens"][row, k, :, 0, 0].tolist() == [s if s < n else PAD_ID for s in range(start, start + 5)]


def test_a_clip_reads_at_most_two_chunks(layout_indexes):
    idx = layout_indexes[4]
    reader = P.ClipReader(idx, clip_len=5, clip_fps=None)
    reader.source = counting = _CountingReader(reader.source)
    videos = np.arange(24)
    columns = np.arange(24) % 6
    starts = np.full(24, 0)
    for s in range(0, 40, 3):  # a 5-frame clip spans one or two chunks of 4 frames, never more
        counting.calls.clear()
        clips = reader.clips(videos, columns, starts + s)
        keys = counting.calls[-1]
        n = idx.num_frames[videos, columns]
        expected = sum(len({f // 4 for f in range(s, min(s + 5, m))}) for m in n)
        assert len(keys) == expected <= 2 * 24
        np.testing.assert_array_equal(clips[n > s + 4, :, 0, 0], np.broadcast_to(s + np.arange(5), ((n > s + 4).sum(), 5)))


def test_convert_store_keeps_every_record_and_token(layout_indexes, tmp_path):
    from vimpac_jax.commands import convert_store as cmd

    old = layout_indexes["whole"]
    new = tmp_path / "converted"
    assert cmd.main(["--store", old, "--out", str(new), "--chunk-frames", "5"]) == 0
    # The same videos in one record each, written as chunks (the old layout is read by convert-store only).
    before = list(token_store.iter_videos(layout_indexes[64].store_dir))
    after = list(token_store.iter_videos(new))
    assert len(before) == len(after) == json.loads((Path(old) / "metadata.json").read_text())["num_records"]
    for a, b in zip(before, after):  # same order, same fields, same tokens
        assert {k: v for k, v in a.items() if k != "tokens"} == {k: v for k, v in b.items() if k != "tokens"}
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    meta = token_store.read_metadata(new)
    assert (meta["layout"], meta["chunk_frames"]) == ("chunked", 5)
    idx = P.load_index(new)
    np.testing.assert_array_equal(idx.num_frames, layout_indexes[64].num_frames)
    assert P.load_index(new).chunk_frames == 5  # through the cache too
    # Refusals: a chunked store, an existing --out.
    assert cmd.main(["--store", str(new), "--out", str(tmp_path / "again")]) == 2
    assert cmd.main(["--store", old, "--out", str(new)]) == 2
    assert not (tmp_path / "again").exists()


def test_a_store_of_the_old_layout_is_refused_naming_the_convert_command(layout_indexes, capsys):
    """The readers read the "chunked" layout only: a "whole" store is one error naming it and the
    command that converts it, before it is indexed (and `vimpac train` exits 2 on it)."""
    from vimpac_jax import cli

    old = layout_indexes["whole"]
    words = (f"token store {old} has the old 'whole' record layout (one record per video); this vimpac-jax reads "
             f"the 'chunked' layout only: convert it once with "
             f"`vimpac convert-store --store {old} --out {old}-chunked`")
    for read in (P.load_index, token_store.read_metadata, lambda store: next(token_store.iter_videos(store))):
        with pytest.raises(ValueError) as e:
            read(old)
        assert str(e.value) == words
    assert not (Path(old) / P.INDEX_CACHE_FILE).exists()  # refused before indexing
    assert cli.main(["train", "--config", str(REPO / "configs/pretrain.py:runlocal"),
                     f"--config.data.train_store={old}", "--workdir", str(Path(old).parent / "run")]) == 2
    assert f"vimpac train: error: {words}" in capsys.readouterr().err
