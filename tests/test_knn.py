"""The kNN monitor (the released `vimpac/knn_monitor.py`): what it embeds and how it votes."""

import numpy as np

from vimpac_jax.data import pipelines
from vimpac_jax.data.testing import write_test_store
from vimpac_jax.tasks.knn import knn_accuracy, knn_dataset

VARIANTS = ["r32_start_noflip", "r32_center_noflip", "r32_end_noflip", "r32_center_flip", "r40_center_noflip"]


def test_monitor_reads_one_random_clip_of_the_center_crop(tmp_path):
    videos = [dict(video_id=f"v{i}", num_frames=12, label=i % 2, variants=VARIANTS) for i in range(6)]
    index = pipelines.load_index(write_test_store(tmp_path / "s", videos, pattern="frame_index"))

    def clips(seed):
        ds = knn_dataset(index, batch_size=4, clip_len=3, clip_fps=None, seed=seed)
        batches = [ds[i] for i in range(len(ds))]
        tokens = np.concatenate([b["tokens"] for b in batches])[np.concatenate([b["valid"] for b in batches])]
        assert tokens.shape == (6, 1, 3, 4, 4)  # every video once, one clip
        return tokens[:, 0]

    tokens = clips(seed=0)
    assert (tokens[:, :, 0, 1] == VARIANTS.index("r32_center_noflip")).all()  # the center crop, no flip, r32
    assert (tokens[:, :, 0, 2] == np.arange(6)[:, None]).all()
    starts = tokens[:, 0, 0, 0]
    np.testing.assert_array_equal(tokens[:, :, 0, 0], starts[:, None] + np.arange(3))  # consecutive frames
    assert ((0 <= starts) & (starts <= 9)).all() and len(set(starts.tolist())) > 1  # random, not the first clip
    np.testing.assert_array_equal(clips(seed=0), tokens)  # the same clips at every evaluation
    assert (clips(seed=1)[:, 0, 0, 0] != starts).any()


def test_weighted_vote_of_the_k_nearest_with_top5():
    """A query at 2 degrees: its nearest neighbour (0 degrees) is class 0, but the two class-1
    neighbours at 10 and -10 degrees outvote it once k = 3: exp(cos 8°/t) + exp(cos 12°/t) >
    exp(cos 2°/t) at t = 0.07."""
    angles = np.deg2rad([0.0, 10.0, -10.0, 90.0, 180.0, 270.0])
    train = 5.0 * np.stack([np.cos(angles), np.sin(angles)], 1)  # scale is irrelevant (cosine)
    train_labels = np.array([0, 1, 1, 2, 3, 4])
    query = np.array([[np.cos(np.deg2rad(2.0)), np.sin(np.deg2rad(2.0))]])
    vote = lambda k, label: knn_accuracy(train, train_labels, query, np.array([label]), k=k, temperature=0.07,
                                         num_classes=6)
    assert vote(1, 0) == (100.0, 100.0)
    assert vote(3, 0) == (0.0, 100.0) and vote(3, 1) == (100.0, 100.0)
    assert vote(200, 5) == (0.0, 0.0)  # k beyond the bank: all of it; class 5 has no member, never in the top 5
    assert vote(200, 4)[1] == 100.0  # every class with a member ranks in the top 5 of 5 such classes


def test_config_is_the_released_monitor():
    from pathlib import Path

    from vimpac_jax.config_utils import load_config

    knn = load_config(["--config", str(Path(__file__).resolve().parents[1] / "configs/pretrain.py:small")]).knn
    assert (knn.k, knn.temperature) == (200, 0.07)
