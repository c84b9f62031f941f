"""Masking for masked-token prediction (the released `vimpac/masking.py`; its ratios: paper
Table 2), as loop-free, jit-able jnp code.

Block masking draws `num_blocks` axis-aligned boxes per clip. Box lengths are uniform integers
in [1, max(1, T*2//3)] (time), [1, max(1, H//2)], [1, max(1, W//2)] and starts are uniform in
[0, L - length] (both ends inclusive), as in the released `mask_3d`. All boxes of a batch are
drawn at once as [B, n] arrays; the mask is built by comparing iota grids against the box
starts/ends and reducing with `any` over the boxes, so the traced program does not depend on
the batch size. (The `max(1, .)` only matters for T = 1 or H, W = 1, where the released code
fails.)

Shapes: B batch, n boxes, T frames, H x W token grid, N = T*H*W, K a static bound on the number
of masked positions kept per clip. Flat positions are row-major over (T, H, W) and do not
count a [CLS] token. The public functions are jitted; shape arguments must be tuples.
"""

import functools
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vimpac_jax.constants import IGNORE_LABEL, MASK_ID, NUM_CODES, PAD_ID


class Boxes(NamedTuple):
    """Boxes of block masking: `start` and `length` int32 [B, n, 3], last axis (t, h, w)."""

    start: jax.Array
    length: jax.Array


class MaskedBatch(NamedTuple):
    """Output of `mask_tokens`.

    inputs:         int32 [B, T, H, W]  tokens with masked positions replaced (MASK_ID, ...).
    labels:         int32 [B, T, H, W]  original code at scored positions, IGNORE_LABEL elsewhere.
    positions:      int32 [B, K]        flat indices of the scored positions, ascending, then the
                                        first unscored positions as padding (distinct in a row).
    position_valid: bool  [B, K]        which entries of `positions` are real (they come first).
    num_dropped:    int32 [B]           masked positions beyond K: still corrupted in `inputs`
                                        but not scored (their labels are IGNORE_LABEL).
    """

    inputs: jax.Array
    labels: jax.Array
    positions: jax.Array
    position_valid: jax.Array
    num_dropped: jax.Array


# Random numbers are drawn as flat 1-D arrays and reshaped: same distribution, but XLA:CPU
# compiles the (default, partitionable) threefry over N-d shapes very slowly (seconds each).
def _randint(key, shape, low, high):
    """int32 `shape`, uniform in [low, high) (bounds broadcast to `shape`)."""
    low, high = (jnp.broadcast_to(bound, shape).reshape(-1) for bound in (low, high))
    return jax.random.randint(key, (math.prod(shape),), low, high, jnp.int32).reshape(shape)


def _uniform(key, shape):
    """float32 `shape`, uniform in [0, 1)."""
    return jax.random.uniform(key, (math.prod(shape),)).reshape(shape)


def max_box_lengths(clip_shape: Sequence[int]) -> tuple:
    """Largest box length along (t, h, w) for a clip of shape (T, H, W)."""
    t, h, w = clip_shape
    return max(1, t * 2 // 3), max(1, h // 2), max(1, w // 2)


@functools.partial(jax.jit, static_argnames=("shape", "num_blocks"))
def sample_boxes(key: jax.Array, shape: Sequence[int], num_blocks: int) -> Boxes:
    """Draws `num_blocks` boxes per clip for `shape` = (B, T, H, W); returns [B, n, 3] arrays."""
    batch, *clip_shape = shape
    dims = jnp.asarray(clip_shape, jnp.int32)
    max_len = jnp.asarray(max_box_lengths(clip_shape), jnp.int32)
    len_key, start_key = jax.random.split(key)
    size = (batch, num_blocks, 3)
    length = _randint(len_key, size, 1, max_len + 1)
    start = _randint(start_key, size, 0, dims - length + 1)
    return Boxes(start, length)


def box_covers(boxes: Boxes, clip_shape: Sequence[int]) -> jax.Array:
    """bool [B, n, T, H, W]: which tokens each box covers."""
    def inside(axis):  # [B, n, L] along one axis
        iota = jnp.arange(clip_shape[axis])
        start = boxes.start[..., axis, None]
        return (iota >= start) & (iota < start + boxes.length[..., axis, None])

    t, h, w = inside(0), inside(1), inside(2)
    return t[..., :, None, None] & h[..., None, :, None] & w[..., None, None, :]


@functools.partial(jax.jit, static_argnames=("shape", "num_blocks"))
def block_mask(key: jax.Array, shape: Sequence[int], num_blocks: int) -> jax.Array:
    """bool [B, T, H, W]: union of `num_blocks` random boxes per clip (`shape` = (B, T, H, W))."""
    return box_covers(sample_boxes(key, shape, num_blocks), shape[1:]).any(axis=1)


@functools.partial(jax.jit, static_argnames=("shape", "prob"))
def iid_mask(key: jax.Array, shape: Sequence[int], prob: float) -> jax.Array:
    """bool `shape`: each token masked independently with probability `prob`."""
    return _uniform(key, shape) < prob


# BERT-style noise: what happens to a masked unit (a box, or a token without boxes).
_KEEP, _MASK, _RANDOM = 0, 1, 2


def _draw_actions(key, shape):
    u = _uniform(key, shape)
    return jnp.where(u < 0.8, _MASK, jnp.where(u < 0.9, _RANDOM, _KEEP))


def _token_actions(box_action: jax.Array, boxes: Boxes, clip_shape) -> jax.Array:
    """int [B, T, H, W]: the action of the last box covering each token whose action is not
    _KEEP (boxes applied in order, a _KEEP box leaves tokens as they are); _KEEP if none."""
    covers = box_covers(boxes, clip_shape) & (box_action != _KEEP)[..., None, None, None]
    box_index = jnp.arange(box_action.shape[1])[None, :, None, None, None]
    last = jnp.max(jnp.where(covers, box_index, -1), axis=1)  # [B, T, H, W], -1: none
    picked = jnp.take_along_axis(box_action, last.reshape(last.shape[0], -1).clip(0), axis=1)
    return jnp.where(last >= 0, picked.reshape(last.shape), _KEEP)


@functools.partial(jax.jit, static_argnames=("noise",))
def apply_mlm_mask(key: jax.Array, tokens: jax.Array, mask: jax.Array, noise: str = "none",
                   boxes: Optional[Boxes] = None):
    """Corrupts `tokens` int [B, T, H, W] at `mask` bool [B, T, H, W]; returns (inputs, labels).

    PAD tokens are never masked nor labelled. labels = original code where masked (and not PAD),
    IGNORE_LABEL elsewhere. noise="none": masked tokens become MASK_ID (`key` unused).
    noise="bert": 80% MASK_ID, 10% a random code in [0, NUM_CODES) (drawn per token), 10%
    unchanged. With `boxes` (those whose union is `mask`) the choice is made per box and boxes
    are applied in order, so on overlaps the last box that is not "unchanged" wins, exactly as
    the released `mask_3d_rand_replace`; without `boxes` the choice is made per token.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    is_pad = tokens == PAD_ID
    mask = mask & ~is_pad
    labels = jnp.where(mask, tokens, IGNORE_LABEL)
    if noise == "none":
        return jnp.where(mask, MASK_ID, tokens), labels
    if noise != "bert":
        raise ValueError(f"unknown noise {noise!r}; expected 'none' or 'bert'")

    action_key, code_key = jax.random.split(key)
    random_codes = _randint(code_key, tokens.shape, 0, NUM_CODES)
    if boxes is None:
        action = jnp.where(mask, _draw_actions(action_key, tokens.shape), _KEEP)
    else:
        box_action = _draw_actions(action_key, boxes.start.shape[:2])  # [B, n]
        action = jnp.where(mask, _token_actions(box_action, boxes, tokens.shape[1:]), _KEEP)
    inputs = jnp.where(action == _MASK, MASK_ID, jnp.where(action == _RANDOM, random_codes, tokens))
    return inputs, labels


def pack_positions(valid: jax.Array, index: jax.Array, size: int):
    """Packs `index` [L] into `size` slots: the entries where `valid` [L] holds first (in order,
    at most `size` of them), then entries where it does not, so all slots hold distinct entries
    of `index` (`size` <= L). Padding with distinct, unscored positions instead of one repeated
    position keeps the gradient of a gather at these positions (a scatter-add) free of
    duplicate indices: same-address bfloat16 atomics serialise on GPUs (openxla/xla#26371).

    Returns (packed [size] of `index`, slot of each packed entry in [0, L) [size], is_valid
    [size] bool, num_dropped: valid entries beyond `size`)."""
    num_valid = valid.sum()
    count = jnp.minimum(num_valid, size)
    first_valid = jnp.nonzero(valid, size=size, fill_value=0)[0]
    first_other = jnp.nonzero(~valid, size=size, fill_value=0)[0]
    k = jnp.arange(size)
    is_valid = k < count
    slot = jnp.where(is_valid, first_valid, first_other[jnp.maximum(k - count, 0)])
    return index[slot], slot, is_valid, (num_valid - count).astype(jnp.int32)


def _first_k_positions(labels_flat: jax.Array, max_masked: int):
    """Keeps the first `max_masked` labelled positions of each row of [B, N] (row-major order);
    the remaining slots hold the row's first unlabelled positions (`pack_positions`)."""
    scored = labels_flat != IGNORE_LABEL
    positions, _, valid, num_dropped = jax.vmap(
        lambda row: pack_positions(row, jnp.arange(row.shape[0]), max_masked))(scored)
    kept = scored & (jnp.cumsum(scored, axis=1) <= max_masked)
    labels_flat = jnp.where(kept, labels_flat, IGNORE_LABEL)
    return labels_flat, positions.astype(jnp.int32), valid, num_dropped


@functools.partial(jax.jit,
                   static_argnames=("kind", "num_blocks", "prob", "noise", "max_masked"))
def mask_tokens(key: jax.Array, tokens: jax.Array, *, kind: str = "block", num_blocks: int = 5,
                prob: float = 0.15, noise: str = "none",
                max_masked: Optional[int] = None) -> MaskedBatch:
    """Masks a batch of token clips int [B, T, H, W]; one key for the whole batch.

    kind="block": `num_blocks` boxes per clip; kind="iid": each token with probability `prob`.
    `max_masked` (static K, default N = T*H*W, i.e. nothing is ever dropped): if a clip has more
    than K masked positions, the first K in row-major order are kept and the rest are dropped
    from scoring: they stay corrupted in `inputs`, get IGNORE_LABEL in `labels` and are counted
    in `num_dropped`. So the loss over `positions` always equals the loss over `labels`.
    All keyword arguments are static (jit arguments).
    """
    batch, *clip_shape = tokens.shape
    num_tokens = math.prod(clip_shape)
    max_masked = num_tokens if max_masked is None else min(int(max_masked), num_tokens)
    mask_key, noise_key = jax.random.split(key)
    boxes = None
    if kind == "block":
        boxes = sample_boxes(mask_key, tokens.shape, num_blocks)
        mask = box_covers(boxes, clip_shape).any(axis=1)
    elif kind == "iid":
        mask = iid_mask(mask_key, tokens.shape, prob)
    else:
        raise ValueError(f"unknown mask kind {kind!r}; expected 'block' or 'iid'")
    inputs, labels = apply_mlm_mask(noise_key, tokens, mask, noise, boxes)
    labels_flat, positions, valid, num_dropped = _first_k_positions(
        labels.reshape(batch, num_tokens), max_masked)
    return MaskedBatch(inputs, labels_flat.reshape(labels.shape), positions, valid, num_dropped)


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, N, ...], positions int [B, K] -> [B, K, ...] (x[b, positions[b, k]])."""
    return jax.vmap(lambda row, idx: row[idx])(x, positions)


# ----------------------------------------------------------------------------------------------
# Induced masking ratio (paper Table 2) and a static bound on the number of masked positions.

def _axis_cover_prob(size: int, max_len: int) -> np.ndarray:
    """[size]: probability that one box (length ~ U[1, max_len], start ~ U[0, size - length])
    covers each index along one axis."""
    length = np.arange(1, max_len + 1)[:, None, None]
    start = np.arange(size)[None, :, None]
    index = np.arange(size)[None, None, :]
    covered = (start <= index) & (index < start + length) & (start <= size - length)
    return (covered / (max_len * (size - length + 1))).sum(axis=(0, 1))


def expected_mask_ratio(clip_shape: Sequence[int], num_blocks: int) -> float:
    """Exact expected fraction of a (T, H, W) clip covered by `num_blocks` boxes (no PAD).

    A box's axes are independent, so it covers (t, h, w) with probability p_t * p_h * p_w and
    `n` independent boxes miss it with probability (1 - p_t p_h p_w) ** n.
    """
    p_t, p_h, p_w = (_axis_cover_prob(size, m) for size, m in
                     zip(clip_shape, max_box_lengths(clip_shape)))
    p_box = p_t[:, None, None] * p_h[None, :, None] * p_w[None, None, :]
    return float(np.mean(1.0 - (1.0 - p_box) ** num_blocks))


def _prefix_ratios(key, batch: int, clip_shape: tuple, max_blocks: int):
    """float [max_blocks, batch]: fraction masked by the first 1..max_blocks boxes of each clip.
    The first k of n i.i.d. boxes are distributed as k boxes, so one draw serves every k."""
    covers = box_covers(sample_boxes(key, (batch, *clip_shape), max_blocks), clip_shape)
    union = jax.lax.cummax(covers.astype(jnp.int8), axis=1)  # union of the first k+1 boxes
    return union.mean(axis=(2, 3, 4), dtype=jnp.float32).T


_prefix_ratios_jit = jax.jit(_prefix_ratios, static_argnums=(1, 2, 3))


def sampled_mask_ratios(key: jax.Array, clip_shape: Sequence[int], block_counts: Sequence[int],
                        samples: int = 20000, batch_size: int = 1000) -> dict:
    """Monte-Carlo mean masked fraction of (T, H, W) clips for each count in `block_counts`.

    Draws max(block_counts) boxes per clip and scores each count on the same clips; runs in
    jitted batches (one compilation per shape), `samples` rounded up to whole batches.
    Returns {count: ratio in [0, 1]}.
    """
    clip_shape = tuple(int(s) for s in clip_shape)
    max_blocks = max(block_counts)
    batch_size = min(batch_size, samples)
    num_batches = max(1, -(-samples // batch_size))
    total = np.zeros(max_blocks)
    for batch_key in jax.random.split(key, num_batches):
        ratios = _prefix_ratios_jit(batch_key, batch_size, clip_shape, max_blocks)
        total += np.asarray(ratios).sum(axis=1)
    mean = total / (num_batches * batch_size)
    return {int(k): float(mean[k - 1]) for k in block_counts}


# Bytes of the boxes (start, length: int32 [clips, n, 3]) and of the [clips, n, T, H, W] cover
# array that `_block_mask_counts` builds at once.
_BOX_BYTES, _COVER_BYTES = 2**25, 2**27


def _block_mask_counts(key: jax.Array, samples: int, clip_shape: tuple, num_blocks: int) -> jax.Array:
    """int [samples]: masked tokens per clip of block masks, in bounded memory however many boxes
    (16384 clips x 1280 boxes of a 5x16x16 clip: 27 GB of covers and 0.5 GB of boxes at once).

    The boxes are `block_mask(key, (samples, *clip_shape), num_blocks)`'s when they take at most
    _BOX_BYTES (every preset: the bounds are those of earlier versions), else drawn for chunks of
    clips from keys folded from `key`; the covers are built for chunks of clips."""
    count = jax.jit(lambda b: box_covers(b, clip_shape).any(axis=1).sum(axis=(1, 2, 3)))
    per_clip = 2 * 3 * 4 * num_blocks
    if samples * per_clip <= _BOX_BYTES:
        draws = [sample_boxes(key, (samples, *clip_shape), num_blocks)]
    else:
        size = max(1, _BOX_BYTES // per_clip)
        draws = [sample_boxes(jax.random.fold_in(key, i), (min(size, samples - start), *clip_shape), num_blocks)
                 for i, start in enumerate(range(0, samples, size))]
    chunk = max(1, _COVER_BYTES // (num_blocks * math.prod(clip_shape)))
    return jnp.concatenate([count(Boxes(b.start[i:i + chunk], b.length[i:i + chunk]))
                            for b in draws for i in range(0, b.start.shape[0], chunk)])


@functools.lru_cache(maxsize=32)
def _sampled_mask_counts(kind: str, clip_shape: tuple, num_blocks: int, prob: float, samples: int,
                         seed: int) -> np.ndarray:
    """int64 [samples] (read-only): masked tokens of each of `samples` clips drawn with `seed`.
    Cached: a run asks for the same distribution for each bound it derives (the per-clip K, the
    packed bound of each micro-batch size), and each draw compiles and runs the sampler."""
    # Concrete values even when called while a caller's jit is tracing (the step's bound).
    with jax.ensure_compile_time_eval():
        key = jax.random.PRNGKey(seed)
        if kind == "block":
            counts = _block_mask_counts(key, samples, clip_shape, num_blocks)
        else:
            counts = jax.random.binomial(key, math.prod(clip_shape), prob, (samples,))
        counts = np.asarray(counts).astype(np.int64)
    counts.flags.writeable = False
    return counts


def _sum_quantile(counts: np.ndarray, clips: int, quantile: float) -> int:
    """The `quantile` of the sum of `clips` independent draws from the empirical distribution of
    `counts` (int [S]): the clips-fold convolution of its histogram, computed with one FFT."""
    pmf = np.bincount(counts) / counts.size
    length = clips * (pmf.size - 1) + 1
    n_fft = 1 << (length - 1).bit_length()
    total = np.fft.irfft(np.fft.rfft(pmf, n_fft) ** clips, n_fft)[:length]
    cdf = np.cumsum(np.clip(total, 0.0, None))
    return int(np.searchsorted(cdf / cdf[-1], quantile))


def masked_positions_bound(clip_shape: Sequence[int], *, kind: str = "block",
                           num_blocks: int = 5, prob: float = 0.15, quantile: float = 1.0,
                           multiple_of: int = 8, samples: int = 4096, seed: int = 0,
                           clips: int = 1) -> int:
    """A static bound on the masked positions of `clips` (T, H, W) clips together: K for
    `mask_tokens(max_masked=K)` (clips=1), or the packed bound of a micro-batch.

    quantile=1.0: a hard bound, nothing is ever dropped (block: n * largest box per clip, iid: N).
    quantile<1: the quantile of the total masked count of `clips` independent clips, from the
    empirical distribution of one clip's count over `samples` clips drawn with a fixed seed
    (deterministic), so that about a (1 - quantile) fraction of clip sets exceed it (fewer with
    PAD, which is never masked). The total concentrates as `clips` grows (mean ~ clips, spread
    ~ sqrt(clips)), so a set of clips needs far fewer slots than `clips` per-clip quantiles.
    The result is rounded up to `multiple_of` and never exceeds clips * N (N = T*H*W).
    """
    clip_shape = tuple(int(s) for s in clip_shape)
    num_tokens = math.prod(clip_shape)
    if kind not in ("block", "iid"):
        raise ValueError(f"unknown mask kind {kind!r}; expected 'block' or 'iid'")
    if quantile >= 1.0:
        bound = num_blocks * math.prod(max_box_lengths(clip_shape)) if kind == "block" \
            else num_tokens
        bound = clips * min(bound, num_tokens)
    else:
        counts = _sampled_mask_counts(kind, clip_shape, int(num_blocks) if kind == "block" else 0,
                                      float(prob) if kind == "iid" else 0.0, int(samples), int(seed))
        if clips == 1:
            bound = int(np.ceil(np.quantile(counts, quantile)))
        else:
            bound = _sum_quantile(counts, clips, quantile)
    bound = -(-max(bound, 1) // multiple_of) * multiple_of
    return min(bound, clips * num_tokens)
