"""Tests of vimpac_jax.training.masking and `vimpac mask-ratio` (paper Table 2)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimpac_jax.commands import mask_ratio
from vimpac_jax.constants import IGNORE_LABEL, MASK_ID, NUM_CODES, PAD_ID
from vimpac_jax.training import masking

# Paper Table 2: (T, tokens per side) -> induced ratio (%) for 4..8 blocks.
TABLE2 = {
    (5, 16): [11.9, 14.5, 17.0, 19.4, 21.7],
    (5, 32): [10.6, 13.1, 15.2, 17.5, 19.5],
    (10, 16): [10.4, 12.8, 15.0, 17.1, 19.2],
    (10, 32): [9.3, 11.4, 13.4, 15.4, 17.2],
}
BLOCKS = [4, 5, 6, 7, 8]
SHAPE = (16, 5, 16, 16)  # most tests use one shape and one set of options: few compilations
OPTIONS = dict(kind="block", num_blocks=8, prob=0.5, noise="none", max_masked=None)


def _mask(seed, tokens, **options):
    """mask_tokens with every static option spelled out, so that equal options share a compile."""
    return masking.mask_tokens(jax.random.PRNGKey(seed), tokens, **{**OPTIONS, **options})


def _tokens(seed, shape=SHAPE, pad_frames=0):
    """Random codes of `shape` (B, T, H, W); the last `pad_frames` frames of odd clips are PAD."""
    tokens = np.random.default_rng(seed).integers(0, NUM_CODES, shape, dtype=np.int32)
    if pad_frames:
        tokens[1::2, -pad_frames:] = PAD_ID
    return jnp.asarray(tokens)


# ---- Table 2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t, side", list(TABLE2))
def test_expected_ratio_matches_table2(t, side):
    for blocks, paper in zip(BLOCKS, TABLE2[t, side]):
        assert abs(100 * masking.expected_mask_ratio((t, side, side), blocks) - paper) <= 0.3


@pytest.mark.parametrize("t, side", list(TABLE2))
@pytest.mark.usefixtures("xla_optimized")  # 12,000 sampled clips: run time, not compile time
def test_sampled_ratio_matches_table2(t, side):
    # 12000 clips, per-clip std 5-6 points: standard error about 0.05 points. One compilation
    # per shape (batch 1000 as in the CLI, whose test then reuses the (5, 16, 16) one).
    ratios = masking.sampled_mask_ratios(jax.random.PRNGKey(t * 100 + side), (t, side, side),
                                         BLOCKS, samples=12000, batch_size=1000)
    for blocks, paper in zip(BLOCKS, TABLE2[t, side]):
        sampled = 100 * ratios[blocks]
        assert abs(sampled - paper) <= 0.3, (blocks, sampled, paper)
        assert abs(sampled - 100 * masking.expected_mask_ratio((t, side, side), blocks)) <= 0.2


# ---- boxes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("clip_shape", [(5, 16, 16), (10, 32, 32), (1, 3, 2)])
def test_boxes_inside_clip_and_cover_the_allowed_ranges(clip_shape):
    boxes = masking.sample_boxes(jax.random.PRNGKey(1), (2000, *clip_shape), 8)
    start, length = np.asarray(boxes.start), np.asarray(boxes.length)
    assert start.shape == length.shape == (2000, 8, 3)
    for axis, (size, max_len) in enumerate(zip(clip_shape, masking.max_box_lengths(clip_shape))):
        s, n = start[..., axis].ravel(), length[..., axis].ravel()
        assert set(n) == set(range(1, max_len + 1))  # every allowed length and nothing else
        assert (s >= 0).all() and (s + n <= size).all()  # every box lies inside the clip
        # Starts run over [0, size - length], both ends inclusive (released: randint(0, L - len)).
        for n_value in range(1, max_len + 1):
            assert set(s[n == n_value]) == set(range(size - n_value + 1))
    assert masking.max_box_lengths((5, 16, 16)) == (3, 8, 8)
    assert masking.max_box_lengths((10, 32, 32)) == (6, 16, 16)


def test_lengths_and_starts_are_uniform():
    # T = 5: lengths uniform on {1, 2, 3}; given length 2, starts uniform on {0, 1, 2, 3}.
    boxes = masking.sample_boxes(jax.random.PRNGKey(1), (2000, 5, 16, 16), 8)
    length = np.asarray(boxes.length[..., 0]).ravel()
    start = np.asarray(boxes.start[..., 0]).ravel()
    np.testing.assert_allclose(np.bincount(length)[1:] / length.size, 1 / 3, atol=0.015)
    given = start[length == 2]
    np.testing.assert_allclose(np.bincount(given, minlength=4) / given.size, 1 / 4, atol=0.02)


def _paint(boxes, values, shape):
    """Reference: paints box j of clip b with values[b, j] (0: leave as is), boxes in order."""
    start, length, values = map(np.asarray, (boxes.start, boxes.length, values))
    out = np.zeros(shape, int)
    for b in range(shape[0]):
        for (t, h, w), (lt, lh, lw), value in zip(start[b], length[b], values[b]):
            if value:
                out[b, t:t + lt, h:h + lh, w:w + lw] = value
    return out


def test_block_mask_is_union_of_boxes():
    key = jax.random.PRNGKey(3)
    boxes = masking.sample_boxes(key, SHAPE, 8)
    expected = _paint(boxes, np.ones((SHAPE[0], 8), int), SHAPE).astype(bool)
    np.testing.assert_array_equal(masking.block_mask(key, SHAPE, 8), expected)


# ---- MLM corruption and labels ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["block", "iid"])
@pytest.mark.parametrize("noise", ["none", "bert"])
def test_pad_is_never_masked_and_labels_are_the_original_codes(kind, noise):
    tokens = _tokens(4, pad_frames=2)
    out = _mask(5, tokens, kind=kind, noise=noise)
    tokens, inputs, labels = map(np.asarray, (tokens, out.inputs, out.labels))
    pad = tokens == PAD_ID
    assert pad.any() and (inputs[pad] == PAD_ID).all() and (labels[pad] == IGNORE_LABEL).all()
    scored = labels != IGNORE_LABEL
    assert scored.any()
    np.testing.assert_array_equal(labels[scored], tokens[scored])
    np.testing.assert_array_equal(inputs[~scored], tokens[~scored])  # unscored: untouched
    if noise == "none":
        assert (inputs[scored] == MASK_ID).all()
    if noise == "bert" and kind == "iid":  # no boxes: 80/10/10 decided per token
        assert abs((inputs[scored] == MASK_ID).mean() - 0.8) < 0.02
        assert abs((inputs[scored] == tokens[scored]).mean() - 0.1) < 0.02
    assert ((inputs < NUM_CODES) | (inputs == MASK_ID) | (inputs == PAD_ID)).all()
    assert out.positions.shape == (16, 5 * 16 * 16) and (np.asarray(out.num_dropped) == 0).all()
    _check_positions(out, tokens)


def test_bert_noise_is_decided_per_box_80_10_10():
    # One box per clip: the whole box is MASK, unchanged, or replaced by random codes.
    n_clips = 4000
    tokens = _tokens(6, (n_clips, 5, 16, 16))
    out = _mask(7, tokens, num_blocks=1, noise="bert")
    tokens, inputs, labels = map(np.asarray, (tokens, out.inputs, out.labels))
    scored = labels != IGNORE_LABEL
    size = scored.sum(axis=(1, 2, 3))
    n_mask = ((inputs == MASK_ID) & scored).sum(axis=(1, 2, 3))
    n_same = ((inputs == tokens) & scored).sum(axis=(1, 2, 3))
    is_mask, is_keep = n_mask == size, n_same == size
    is_random = ~is_mask & ~is_keep
    assert (n_mask[~is_mask] == 0).all()  # no box is partly MASK
    assert (inputs[is_random][scored[is_random]] < NUM_CODES).all()
    # Fresh codes per token: each equals the original with probability 1/8192 only.
    assert n_same[is_random].sum() < 0.01 * size[is_random].sum()
    assert abs(is_mask.mean() - 0.8) < 0.025
    assert abs(is_random.mean() - 0.1) < 0.02
    assert abs(is_keep.mean() - 0.1) < 0.02


def test_overlapping_boxes_follow_the_released_order():
    """The last box whose action is not 'keep' decides, as with in-place sequential filling."""
    boxes = masking.sample_boxes(jax.random.PRNGKey(3), SHAPE, 8)
    box_action = np.random.default_rng(9).integers(0, 3, (SHAPE[0], 8))  # 0 keep, 1 mask, 2 random
    got = jax.jit(masking._token_actions, static_argnums=2)(box_action, boxes, SHAPE[1:])
    np.testing.assert_array_equal(got, _paint(boxes, box_action, SHAPE))


def test_iid_ratio_matches_prob():
    mask = masking.iid_mask(jax.random.PRNGKey(10), SHAPE, 0.15)
    assert mask.dtype == jnp.bool_ and abs(float(mask.mean()) - 0.15) < 0.01
    out = _mask(12, _tokens(11), kind="iid")
    assert abs(float((out.labels != IGNORE_LABEL).mean()) - 0.5) < 0.015


def test_same_key_same_mask():
    tokens = _tokens(13)
    a, b, c = (_mask(seed, tokens, noise="bert") for seed in (14, 14, 15))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.labels, c.labels)


# ---- jit, positions --------------------------------------------------------------------------

def _num_eqns(jaxpr):
    """Equations of a jaxpr, those of its sub-jaxprs (jit, vmap'd nonzero, ...) included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    total += _num_eqns(sub)
    return total


def test_jit_and_program_size_does_not_grow_with_batch_or_blocks():
    # mask_tokens is itself jitted (the other tests run it); it also works inside a caller's jit.
    tokens = _tokens(17, pad_frames=1)
    outer = jax.jit(lambda k, x: masking.mask_tokens(k, x, **OPTIONS).labels + 0)
    np.testing.assert_array_equal(outer(jax.random.PRNGKey(16), tokens), _mask(16, tokens).labels)
    fn = functools.partial(masking.mask_tokens, noise="bert", max_masked=24)
    key = jax.random.PRNGKey(16)
    sizes = {_num_eqns(jax.make_jaxpr(fn)(key, jnp.zeros((b, 5, 16, 16), jnp.int32)).jaxpr)
             for b in (1, 8, 64)}
    assert len(sizes) == 1  # no Python loop over the batch
    sizes = {_num_eqns(jax.make_jaxpr(functools.partial(
        masking.mask_tokens, noise="bert", num_blocks=n))(key, tokens[:2]).jaxpr) for n in (2, 8)}
    assert len(sizes) == 1  # nor over the blocks


def _check_positions(out, tokens):
    labels = np.asarray(out.labels).reshape(tokens.shape[0], -1)
    positions, valid = np.asarray(out.positions), np.asarray(out.position_valid)
    assert positions.dtype == np.int32 and valid.dtype == bool
    for row, pos, ok in zip(labels, positions, valid):
        np.testing.assert_array_equal(pos[ok], np.flatnonzero(row != IGNORE_LABEL))
        assert ok[:ok.sum()].all()  # valid entries come first
    gathered = np.asarray(masking.gather_positions(jnp.asarray(labels), out.positions))
    np.testing.assert_array_equal(np.where(valid, gathered, 0).sum(),
                                  np.where(labels != IGNORE_LABEL, labels, 0).sum())
    assert (gathered[valid] != IGNORE_LABEL).all()


def test_overflow_drops_the_last_positions_and_their_labels():
    tokens = _tokens(20)
    full, out = _mask(21, tokens), _mask(21, tokens, max_masked=256)
    assert out.positions.shape == (16, 256)
    counts = np.asarray((full.labels != IGNORE_LABEL).sum(axis=(1, 2, 3)))
    assert (counts > 256).any() and (counts < 256).any()
    np.testing.assert_array_equal(out.num_dropped, np.maximum(counts - 256, 0))
    np.testing.assert_array_equal(out.position_valid.sum(1), np.minimum(counts, 256))
    np.testing.assert_array_equal(out.inputs, full.inputs)  # dropped positions stay corrupted
    np.testing.assert_array_equal(out.positions, full.positions[:, :256])  # first in row-major
    _check_positions(out, tokens)


def test_gather_positions_keeps_trailing_axes():
    x = jnp.arange(2 * 5 * 3).reshape(2, 5, 3)
    got = masking.gather_positions(x, jnp.array([[4, 0], [1, 1]]))
    np.testing.assert_array_equal(got, np.asarray(x)[[[0, 0], [1, 1]], [[4, 0], [1, 1]]])


def test_masked_positions_bound():
    clip = (5, 16, 16)
    hard = masking.masked_positions_bound(clip, num_blocks=5)
    assert hard == 5 * 3 * 8 * 8  # 960, a multiple of 8: nothing can ever be dropped
    assert masking.masked_positions_bound(clip, kind="iid") == 5 * 16 * 16
    assert masking.masked_positions_bound((10, 32, 32), num_blocks=8) == 10 * 32 * 32
    soft = masking.masked_positions_bound(clip, num_blocks=5, quantile=0.999, samples=4096)
    assert soft % 8 == 0 and 0.15 * 1280 < soft < hard
    counts = masking.block_mask(jax.random.PRNGKey(23), (4096, *clip), 5).sum(axis=(1, 2, 3))
    assert (np.asarray(counts) > soft).mean() < 0.005  # clips that would drop positions
    iid = masking.masked_positions_bound(clip, kind="iid", prob=0.15, quantile=0.9999)
    assert 192 < iid < 300


def test_the_bounds_sampling_works_in_chunks_of_bounded_memory(monkeypatch):
    """The quantile's clips are counted a chunk at a time (mask_blocks=100000 once grew the process
    to 24 GB here): the same counts as one `block_mask` while the boxes fit, and the same
    distribution when they are drawn in chunks too."""
    clip, key = (3, 4, 4), jax.random.PRNGKey(3)
    whole = np.asarray(masking.block_mask(key, (512, *clip), 5).sum(axis=(1, 2, 3)))
    monkeypatch.setattr(masking, "_COVER_BYTES", 5 * 48 * 100)  # covers of 100 clips at a time
    np.testing.assert_array_equal(np.asarray(masking._block_mask_counts(key, 512, clip, 5)), whole)
    monkeypatch.setattr(masking, "_BOX_BYTES", 24 * 5 * 64)  # boxes of 64 clips at a time
    chunked = np.asarray(masking._block_mask_counts(key, 4096, clip, 5))
    assert chunked.shape == (4096,) and abs(chunked.mean() / 48 - masking.expected_mask_ratio(clip, 5)) < 0.01


# ---- CLI -------------------------------------------------------------------------------------

def test_cli_prints_one_line_per_block_count(capsys):
    assert mask_ratio.main(["--clip-len", "5", "--tokens", "16", "--samples", "3000",
                            "--seed", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6
    for line, blocks, paper in zip(lines, BLOCKS, TABLE2[5, 16]):
        match = re.fullmatch(r"blocks=(\d+) ratio=(\d+\.\d)", line)
        assert match and int(match[1]) == blocks and abs(float(match[2]) - paper) < 0.6
    assert re.fullmatch(r"nearest to 15%: blocks=5 ratio=\d+\.\d", lines[-1])


def test_cli_accepts_hxw_and_exact(capsys):
    argv = ["--clip-len", "10", "--tokens", "32x32", "--blocks", "6,7", "--exact"]
    assert mask_ratio.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "blocks=6 ratio=13.4", "blocks=7 ratio=15.4", "nearest to 15%: blocks=7 ratio=15.4"]
    with pytest.raises(SystemExit):
        mask_ratio.main(["--clip-len", "5", "--tokens", "16y16"])
