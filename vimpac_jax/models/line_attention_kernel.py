"""The axial line attention of `attention.py` as Pallas TPU kernels (`model.attention_kernel: pallas`).

What they compute is `attention._line_attention`'s, for all parallel attentions of one block
(`attention.AttentionBlock`): each token attends to the tokens of its line with [CLS] as one
more key (key padding excluded, attention-dropout keep masks drawn outside and applied as
`apply_dropout_mask` does, scores and softmax in float32 from dots that accumulate in float32),
and [CLS] attends to each line with itself as one more key, its output the mean over the lines.

The layout is the projections' own: the kernels read the grid's q, k and v [B, T, H, W, F] each
(F = the attentions' heads x head_dim side by side) as their matmuls wrote them, in column
blocks, and write the tokens' outputs as [B, T, H, W, F], their backward dq, dk, dv the same:
no `to_lines` transposes, no split of a projection per attention or head, no concatenation of
the attentions' outputs or of the gradients. (`AttentionBlock` projects q, k, v apart, and the
grid's rows apart from [CLS]'s, which rides as row 0 of the hidden state: so that none is a
slice of a larger array, which XLA would copy.) A grid step takes one window of the grid, a box
(bt, bh, bw) that holds whole lines of its attentions (all of T for a temporal line, all of H
for a height line, all of W for a width line), cut along the other axes to about WINDOW_TOKENS
tokens (`_window_box`; bw, the array's second-minor dimension, whole or a multiple of 8, as
Mosaic's block rule asks: the last two block dimensions are the array's or multiples of
(8, 128)), and one column block of `lanes` = 128 channels (a multiple of head_dim: two heads of
64, four of 32). The window's tokens are masked to the pairs of the same line, as the windows of
`_line_attention` are; the heads of a column block are separated by lane masks (a head's score
is the dot over its lanes only; its output keeps its lanes only), so no lane slices or head
transposes: the MXU contracts over 128 lanes either way.

A block's attentions share one kernel pair when one window serves them all as well as their
own windows would (`Plan.kernels`); otherwise each attention has a kernel pair of its own over
its own columns: height|width, whose joint window is a whole frame (256 tokens at 128 px, of
which a query's line is 1/16; 1,024 at 256 px, over MAX_WINDOW), runs as an H kernel in windows
of whole columns (H x 8) and a W kernel in windows of whole rows (about 128 tokens). The later
kernel writes its columns into the earlier one's outputs (`input_output_aliases`; the column
blocks its grid does not visit keep the earlier kernel's values), so the block's outputs and
gradients are still single arrays, not concatenations.

The attention-dropout keep masks (`draw_keep_masks`) are int8 arrays in each kernel's windows'
order: the tokens' queries against each position of their line ([R, n] per head and window, R
the longest line rounded up to 8; spread over the window's [n, n] pairs in the kernel by a
one-hot matmul) and, bit-packed per token, the [CLS] key, [CLS]'s query and [CLS]-against-itself
bits. They are the bits of `_line_attention`'s masks in another order
(tests/test_line_attention_kernel.py maps one onto the other), so a run draws different bits
under "xla" and "pallas".

[CLS]'s own query (one small softmax per line over the line's keys and [CLS]'s) is computed in
the same kernels from the same blocks: per window, its scores against the window's keys are one
row, each line's maximum and sum masked reductions over the window's [n, n] line mask; its
outputs are summed over the windows in float32 and averaged over the lines after.

Forward and backward are Pallas kernels under one `jax.custom_vjp` (`_attention`); the backward
recomputes the probabilities from q, k, v as flash attention does (Dao et al. 2022, arXiv
2205.14135, Alg. 4) and keeps nothing but the inputs.

On CPU the kernels run in Pallas's interpreter (tests); on a TPU they are compiled by Mosaic.
Under a mesh of several devices they run on each device's clips (`jax.shard_map` over the
logical 'batch' axis's mesh axes, `_per_shard`): XLA cannot partition a Mosaic custom call.
The cost model of XLA does not see inside them: `aot/hlo_cycles.py` charges each at twice its
roofline time from the `pl.CostEstimate` given here.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from vimpac_jax.models.layout import AXES, WINDOW_TOKENS

LANES = 128  # a TPU vector register's lanes: the column block of the kernel (a multiple of head_dim)
MAX_WINDOW = 512  # a window's [n, n] float32 scores per head must sit in VMEM with q, k, v, masks
SUBLANES = 8  # a tile's rows: a block's second-minor dimension is a multiple of it or the array's


def _window_box(grid: tuple[int, int, int], attentions) -> tuple[int, int, int]:
    """(bt, bh, bw): a window of the grid that holds whole lines of every attention in
    `attentions`: whole along each attended axis; along the others cut to the largest box of at
    most WINDOW_TOKENS tokens (the smallest box if none is that small), W only to multiples of
    SUBLANES (Mosaic's block rule for an array's second-minor dimension), and at equal size the
    widest along W (longer contiguous rows per DMA)."""
    t, h, w = grid
    attended = {a for axes in attentions for a in axes}
    bt = t if "T" in attended else 1
    hs = [h] if "H" in attended else [g for g in range(1, h + 1) if h % g == 0]
    ws = [w] if "W" in attended else [g for g in range(1, w + 1) if w % g == 0 and (g == w or g % SUBLANES == 0)]
    boxes = [(bt, bh, bw) for bh in hs for bw in ws]
    fitting = [box for box in boxes if math.prod(box) <= WINDOW_TOKENS]
    if fitting:
        return max(fitting, key=lambda box: (math.prod(box), box[2]))
    return min(boxes, key=lambda box: (math.prod(box), -box[2]))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static layout of one block's kernels: which attentions share a kernel, their windows,
    column blocks, heads per block.

    `attentions`: the line axes of each parallel attention (e.g. (("H",), ("W",))); `grid`:
    (T, H, W); `heads`, `head_dim`: per attention. The block's attentions share one kernel pair
    when one window serves them all as well as their own would (a temporal block; height|width
    up to 8 x 8); otherwise each gets a kernel pair of its own (`kernels`): height|width at 16 x 16
    (a frame of 256 tokens for both, or 128 each) and 32 x 32 (a frame of 1,024, over MAX_WINDOW)."""

    attentions: tuple[tuple[str, ...], ...]
    grid: tuple[int, int, int]
    heads: int
    head_dim: int

    def __post_init__(self):
        d, f = self.head_dim, self.heads * self.head_dim
        if LANES % d and d % LANES:
            raise ValueError(f"model.attention_kernel 'pallas' needs head_dim dividing {LANES} or a multiple of it, "
                             f"got {d}")
        if f % self.lanes:
            raise ValueError(f"model.attention_kernel 'pallas' needs each attention's heads x head_dim ({f}) to be a "
                             f"multiple of {self.lanes}")
        for kernel in self.kernels:
            if kernel.window_tokens > MAX_WINDOW:
                raise ValueError(f"model.attention_kernel 'pallas': the lines of {kernel.attentions} on the grid "
                                 f"{self.grid} need windows of {kernel.window_tokens} tokens, more than {MAX_WINDOW}")

    @property
    def lanes(self) -> int:
        return max(LANES, self.head_dim)

    @property
    def heads_per_block(self) -> int:
        return self.lanes // self.head_dim

    @property
    def blocks_per_attention(self) -> int:
        return self.heads * self.head_dim // self.lanes

    @property
    def column_blocks(self) -> int:
        return len(self.attentions) * self.blocks_per_attention

    @functools.cached_property  # read by every call's trace: computed once per plan
    def kernels(self) -> tuple["KernelPlan", ...]:
        """One kernel pair for all attentions if their joint window is no larger than any one's
        own; else one per attention (its own window: fewer masked pairs, and within MAX_WINDOW)."""
        joint = _window_box(self.grid, self.attentions)
        own = [_window_box(self.grid, (axes,)) for axes in self.attentions]
        if all(math.prod(box) == math.prod(joint) for box in own):
            return (KernelPlan(self, 0, len(self.attentions), joint),)
        return tuple(KernelPlan(self, a, 1, box) for a, box in enumerate(own))

    def lines_of_columns(self) -> np.ndarray:
        """[F] float32: the number of lines of the attention each output column belongs to."""
        sizes = dict(zip(AXES, self.grid))
        lines = [math.prod(self.grid) // math.prod(sizes[a] for a in axes) for axes in self.attentions]
        return np.repeat(np.asarray(lines, np.float32), self.heads * self.head_dim)


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """One kernel pair of a block (`Plan.kernels`): the block's attentions first .. first +
    count - 1 (their columns of q, k, v, contiguous: the attentions' heads side by side), in
    windows `window` (bt, bh, bw) of the grid (`_window_box`)."""

    block: Plan
    first: int
    count: int
    window: tuple[int, int, int]

    @property
    def attentions(self) -> tuple[tuple[str, ...], ...]:
        return self.block.attentions[self.first:self.first + self.count]

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.block.grid

    @property
    def head_dim(self) -> int:
        return self.block.head_dim

    @property
    def lanes(self) -> int:
        return self.block.lanes

    @property
    def heads_per_block(self) -> int:
        return self.block.heads_per_block

    @property
    def column_blocks(self) -> int:
        """Its column blocks of `lanes` channels, from `column_offset` on."""
        return self.count * self.block.blocks_per_attention

    @property
    def column_offset(self) -> int:
        return self.first * self.block.blocks_per_attention

    @property
    def window_tokens(self) -> int:
        return math.prod(self.window)

    @property
    def windows_per_axis(self) -> tuple[int, int, int]:
        return tuple(g // b for g, b in zip(self.grid, self.window))

    @property
    def num_windows(self) -> int:
        return math.prod(self.windows_per_axis)

    def _coordinates(self) -> np.ndarray:
        """[n, 3]: (t, h, w) in the window of each of a window's tokens (row-major over the box)."""
        return np.stack(np.meshgrid(*[np.arange(s) for s in self.window], indexing="ij"), -1).reshape(-1, 3)

    def line_ids(self) -> np.ndarray:
        """[attentions, n] int32: the line of each of a window's tokens (row-major over the window
        box), per attention: its coordinates on the axes it does not attend along."""
        coords = self._coordinates()
        ids = []
        for axes in self.attentions:
            other = [i for i, a in enumerate(AXES) if a not in axes]
            sizes = [self.window[i] for i in other]
            ids.append(np.ravel_multi_index(tuple(coords[:, i] for i in other), sizes) if other
                       else np.zeros(len(coords), np.int64))
        return np.asarray(ids, np.int32)

    def line_positions(self) -> np.ndarray:
        """[attentions, n] int32: the position of each of a window's tokens in its line (row-major
        over the attended axes, as `attention.to_lines` orders a line)."""
        coords = self._coordinates()
        positions = []
        for axes in self.attentions:
            attended = [i for i, a in enumerate(AXES) if a in axes]
            positions.append(np.ravel_multi_index(tuple(coords[:, i] for i in attended),
                                                  [self.window[i] for i in attended]))
        return np.asarray(positions, np.int32)

    @property
    def line_rows(self) -> int:
        """Rows of the pair masks per head: the longest line, rounded up to 8 (a tile's sublanes)."""
        return -(-int(self.line_positions().max() + 1) // SUBLANES) * SUBLANES

    def window_tokens_global(self) -> np.ndarray:
        """[windows, n]: the grid index (row-major over (T, H, W)) of each window's tokens."""
        index = np.arange(math.prod(self.grid)).reshape(self.grid)
        return self.to_windows(index)

    def to_windows(self, x):
        """[..., T, H, W] -> [..., windows, n]: the grid's values in the windows' order."""
        bt, bh, bw = self.window
        return einops.rearrange(x, "... (tb bt) (hb bh) (wb bw) -> ... (tb hb wb) (bt bh bw)", bt=bt, bh=bh, bw=bw)


def draw_keep_masks(key, keep_prob: float, batch: int, plan: Plan):
    """The attention-dropout keep masks in the windows of each of the block's kernels
    (`Plan.kernels`), a tuple of one (pairs, [CLS] bits) per kernel: pairs [B, windows, A*heads,
    R, n] int8 (A its attentions, R = `KernelPlan.line_rows`): the l-th key of a query's line (row
    l) against the query (column); [CLS] bits [B, windows, A*heads/hp, hp, n] int8 (hp heads per
    column block), per token: bit 0 its query against [CLS]'s key, bit 1 [CLS]'s query against
    its key, bit 2 [CLS]'s query against [CLS]'s key in its line (read at the line's first token
    only)."""
    kernels = plan.kernels
    keys = [key] if len(kernels) == 1 else jax.random.split(key, len(kernels))
    masks = []
    for kernel, kernel_key in zip(kernels, keys):
        n, heads, hp = kernel.window_tokens, kernel.count * plan.heads, plan.heads_per_block
        k_pairs, k_cls = jax.random.split(kernel_key)
        pairs = jax.random.bernoulli(k_pairs, keep_prob, (batch, kernel.num_windows, heads, kernel.line_rows, n))
        bits = jax.random.bernoulli(k_cls, keep_prob, (3, batch, kernel.num_windows, heads // hp, hp, n))
        bits = bits.astype(jnp.int8)
        masks.append((pairs.astype(jnp.int8), bits[0] | (bits[1] << 1) | (bits[2] << 2)))
    return tuple(masks)


def _head_tile(plan: KernelPlan, i: int):
    """(1, lanes) bool: the lanes of the i-th head of a column block."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, plan.lanes), 1)
    return (lane >= i * plan.head_dim) & (lane < (i + 1) * plan.head_dim)


def _nt(a, b):
    """a [m, c] . b [n, c]^T -> [m, n], float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tn(a, b):
    """a [n, m]^T . b [n, c] -> [m, c], float32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _nn(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _column(row, n):
    """(1, n) -> (n, 1) without a transpose: the diagonal of its broadcast."""
    eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, row, 0), axis=1, keepdims=True)


def _row(col, n):
    """(n, 1) -> (1, n), as `_column`."""
    eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, col, 0), axis=0, keepdims=True)


def _bit(bits, i):
    return jax.lax.shift_right_logical(bits, jnp.int32(i)) & 1


def _dropped(x, keep_bit, keep_prob):
    """`apply_dropout_mask` of float32 x with an int keep bit."""
    return x if keep_bit is None else jnp.where(keep_bit != 0, x / jnp.asarray(keep_prob, jnp.float32), 0.0)


@dataclasses.dataclass
class _Window:
    """What both kernels read of one window and column block: q, k, v [n, lanes], [CLS]'s qc, kc,
    vc [1, lanes], `same` [n, n] (key rows and key columns of one line), `allowed` [n, n] (query
    row, key column of its line, not padding), `pad_row` [1, n] or None, the keep masks of a head
    (`pairs(i)` [n, n], `cls_bits(i)` [1, n]: bit 0 the query's [CLS] key, bit 1 [CLS]'s query
    against the key, bit 2 [CLS]'s query against itself for the key's line) or None, `first`
    [n, 1] (the first key of each line)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    qc: jax.Array
    kc: jax.Array
    vc: jax.Array
    same: jax.Array
    allowed: jax.Array
    pad_row: object
    pairs: object
    cls_bits: object
    first: jax.Array


def _window_inputs(plan, refs, has_pad, has_keep):
    """The common inputs of both kernels from their refs -> (_Window, the remaining refs)."""
    n, lanes = plan.window_tokens, plan.lanes
    q_ref, k_ref, v_ref, qc_ref, kc_ref, vc_ref, bq_ref, bk_ref, bv_ref, row_ref, col_ref, pos_ref, *refs = refs
    # The projection's bias added here, rounded as XLA rounds `attention.project`'s sum.
    q, k, v = ((_load(r, n, lanes).astype(jnp.float32) + b[...].astype(jnp.float32)).astype(r.dtype)
               for r, b in ((q_ref, bq_ref), (k_ref, bk_ref), (v_ref, bv_ref)))
    qc, kc, vc = (r[...].reshape(1, lanes) for r in (qc_ref, kc_ref, vc_ref))
    same = col_ref[...] == row_ref[...]  # (n, 1) == (1, n)
    earlier = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1) < jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
    first = jnp.sum(jnp.where(same & earlier, 1, 0), axis=1, keepdims=True) == 0
    allowed, pad_row = same, None
    if has_pad:
        pad_ref, *refs = refs
        pad_row = pad_ref[...].astype(jnp.int32) != 0
        allowed = same & ~pad_row
    pairs = cls_bits = None
    if has_keep:
        pairs_ref, bits_ref, *refs = refs
        # A query's keep bits per position in its line, spread over the window's keys by a
        # one-hot [R, n] of each key's position: [R, n]^T . [R, n] -> (query, key) [n, n].
        rows = pairs_ref.shape[-2]
        position = jax.lax.broadcasted_iota(jnp.int32, (rows, n), 0) == pos_ref[...]
        one_hot = jnp.where(position, 1.0, 0.0).astype(jnp.bfloat16)
        pairs = lambda i: _tn(pairs_ref[i].astype(jnp.bfloat16), one_hot)  # noqa: E731  (n, n), 0 or 1
        cls_bits = lambda i: bits_ref[pl.ds(i, 1), :].astype(jnp.int32)  # noqa: E731  (1, n)
    return _Window(q, k, v, qc, kc, vc, same, allowed, pad_row, pairs, cls_bits, first.astype(jnp.float32)), refs


def _head_of(x, in_head):
    return jnp.where(in_head, x, jnp.zeros_like(x))


def _token_probabilities(plan, keep_prob, win: _Window, i):
    """The tokens' queries of head i: softmax over their line's keys and [CLS] -> (p [n, n],
    p_cls [n, 1]) before dropout, and after."""
    f32, dtype = jnp.float32, win.q.dtype
    scale, neg = plan.head_dim ** -0.5, jnp.finfo(f32).min
    in_head = _head_tile(plan, i)
    # As `_line_attention`: the dots' outputs in the compute dtype, then float32.
    s = _nt(_head_of(win.q, in_head), win.k).astype(dtype).astype(f32) * scale
    q_kc = jnp.where(in_head, win.q.astype(f32) * win.kc.astype(f32), 0.0)
    s_c = jnp.sum(q_kc, axis=1, keepdims=True).astype(dtype).astype(f32) * scale
    s = jnp.where(win.allowed, s, neg)
    m = jnp.maximum(jnp.max(s, axis=1, keepdims=True), s_c)
    e, e_c = jnp.exp(s - m), jnp.exp(s_c - m)
    z = jnp.sum(e, axis=1, keepdims=True) + e_c
    p, p_c = e / z, e_c / z
    if win.pairs is None:
        return p, p_c, p, p_c
    n = plan.window_tokens
    return p, p_c, _dropped(p, win.pairs(i), keep_prob), _dropped(p_c, _column(_bit(win.cls_bits(i), 0), n), keep_prob)


def _cls_probabilities(plan, keep_prob, win: _Window, i):
    """[CLS]'s query of head i: one softmax per line over its keys and [CLS] -> per key, as a row
    [1, n] and a column [n, 1], its probability, and (column) its line's [CLS] probability;
    before dropout and after, and the keep bits of the lines' [CLS] probabilities per key (None
    without dropout): (pc_row, pc_col, pcc_col, dropped pc_row, pc_col, pcc_col, keep_cc_col)."""
    f32, dtype, n = jnp.float32, win.q.dtype, plan.window_tokens
    scale, neg = plan.head_dim ** -0.5, jnp.finfo(f32).min
    in_head = _head_tile(plan, i)
    c_row = _nt(_head_of(win.qc, in_head), win.k).astype(dtype).astype(f32) * scale
    qc_kc = jnp.where(in_head, win.qc.astype(f32) * win.kc.astype(f32), 0.0)
    c_cls = jnp.sum(qc_kc, axis=1, keepdims=True).astype(dtype).astype(f32) * scale  # (1, 1)
    if win.pad_row is not None:
        c_row = jnp.where(win.pad_row, neg, c_row)
    c_col = _column(c_row, n)
    # Each line's maximum and sum, as a column (a key's line over the key columns) and a row.
    m_col = jnp.maximum(jnp.max(jnp.where(win.same, c_row, neg), axis=1, keepdims=True), c_cls)
    m_row = jnp.maximum(jnp.max(jnp.where(win.same, c_col, neg), axis=0, keepdims=True), c_cls)
    e_row, e_col = jnp.exp(c_row - m_row), jnp.exp(c_col - m_col)
    ecc_col, ecc_row = jnp.exp(c_cls - m_col), jnp.exp(c_cls - m_row)
    z_col = jnp.sum(jnp.where(win.same, e_row, 0.0), axis=1, keepdims=True) + ecc_col
    z_row = jnp.sum(jnp.where(win.same, e_col, 0.0), axis=0, keepdims=True) + ecc_row
    pc_row, pc_col, pcc_col = e_row / z_row, e_col / z_col, ecc_col / z_col
    if win.cls_bits is None:
        return pc_row, pc_col, pcc_col, pc_row, pc_col, pcc_col, None
    bits = win.cls_bits(i)
    # A line's [CLS]-against-[CLS] bit is its first token's bit 2, for every key of the line.
    first_bit_row = _row(win.first, n) * _bit(bits, 2).astype(f32)
    keep_cc_col = jnp.sum(jnp.where(win.same, first_bit_row, 0.0), axis=1, keepdims=True)
    return (pc_row, pc_col, pcc_col, _dropped(pc_row, _bit(bits, 1), keep_prob),
            _dropped(pc_col, _column(_bit(bits, 1), n), keep_prob), _dropped(pcc_col, keep_cc_col, keep_prob),
            keep_cc_col)


def _load(ref, n, lanes):
    return ref[...].reshape(n, lanes)


def _forward_kernel(plan, keep_prob, has_pad, has_keep, aliased, *refs):
    win, refs = _window_inputs(plan, refs, has_pad, has_keep)
    out_ref, out_c_ref = refs[aliased:]  # after the earlier kernel's outputs (not read: `_forward`)
    n, lanes, f32 = plan.window_tokens, plan.lanes, jnp.float32

    @pl.when(pl.program_id(2) == 0)
    def _():
        out_c_ref[...] = jnp.zeros_like(out_c_ref)

    v, vc = win.v, win.vc.astype(f32)
    out = jnp.zeros((n, lanes), f32)
    out_c = jnp.zeros((1, lanes), f32)
    for i in range(plan.heads_per_block):
        in_head = _head_tile(plan, i)
        _, _, p, p_c = _token_probabilities(plan, keep_prob, win, i)
        head = _nn(p.astype(v.dtype), v) + p_c.astype(v.dtype).astype(f32) * vc
        out = out + jnp.where(in_head, head, 0.0)
        *_, pc_row, _, pcc_col, _ = _cls_probabilities(plan, keep_prob, win, i)
        lines_cls = jnp.sum(win.first * pcc_col.astype(v.dtype).astype(f32), axis=0, keepdims=True)  # (1, 1)
        out_c = out_c + jnp.where(in_head, _nn(pc_row.astype(v.dtype), v) + lines_cls * vc, 0.0)
    out_ref[...] = out.astype(out_ref.dtype).reshape(out_ref.shape)
    out_c_ref[...] += out_c.reshape(out_c_ref.shape)


def _backward_kernel(plan, keep_prob, has_pad, has_keep, aliased, *refs):
    win, (do_ref, do_c_ref, *refs) = _window_inputs(plan, refs, has_pad, has_keep)
    dq_ref, dk_ref, dv_ref, dqc_ref, dkc_ref, dvc_ref, dbq_ref, dbk_ref, dbv_ref = refs[aliased:]
    n, lanes = plan.window_tokens, plan.lanes
    scale = plan.head_dim ** -0.5
    f32 = jnp.float32

    @pl.when(pl.program_id(2) == 0)
    def _():
        for ref in (dqc_ref, dkc_ref, dvc_ref, dbq_ref, dbk_ref, dbv_ref):
            ref[...] = jnp.zeros_like(ref)

    q, k, v = win.q, win.k, win.v
    qc, kc, vc = (x.astype(f32) for x in (win.qc, win.kc, win.vc))
    do = _load(do_ref, n, lanes)
    do_c = do_c_ref[...].reshape(1, lanes)  # float32: the gradient of [CLS]'s summed outputs
    dq = dk = dv = jnp.zeros((n, lanes), f32)
    dqc = dkc = dvc = jnp.zeros((1, lanes), f32)
    for i in range(plan.heads_per_block):
        in_head = _head_tile(plan, i)
        do_i = _head_of(do, in_head)
        pairs_i = None if win.pairs is None else win.pairs(i)
        keep_cls_i = None if win.cls_bits is None else _column(_bit(win.cls_bits(i), 0), n)
        p, p_c, p_drop, p_c_drop = _token_probabilities(plan, keep_prob, win, i)
        # Gradients of the dropped probabilities (the PV dot's output rounded as the forward's).
        dp = _dropped(_nt(do_i, v).astype(v.dtype).astype(f32), pairs_i, keep_prob)
        dp_c = _dropped(jnp.sum(do_i.astype(f32) * vc, axis=1, keepdims=True), keep_cls_i, keep_prob)
        # Softmax backward over the line's keys and [CLS], then through the scale.
        delta = jnp.sum(p * dp, axis=1, keepdims=True) + p_c * dp_c
        ds = (p * (dp - delta) * scale).astype(q.dtype)
        ds_c = (p_c * (dp_c - delta) * scale).astype(q.dtype).astype(f32)
        dq = dq + jnp.where(in_head, _nn(ds, k) + ds_c * kc, 0.0)
        dk = dk + jnp.where(in_head, _tn(ds, q), 0.0)
        dv = dv + jnp.where(in_head, _tn(p_drop.astype(v.dtype), do), 0.0)
        dkc = dkc + jnp.where(in_head, jnp.sum(ds_c * q.astype(f32), axis=0, keepdims=True), 0.0)
        dvc = dvc + jnp.where(in_head, jnp.sum(p_c_drop.astype(v.dtype).astype(f32) * do.astype(f32), axis=0,
                                                keepdims=True), 0.0)
        # [CLS]'s query: the same per line, its keys as rows and columns.
        do_c_i = jnp.where(in_head, do_c, 0.0)
        pc_row, pc_col, pcc_col, _, pcd_col, pccd_col, keep_cc_col = _cls_probabilities(plan, keep_prob, win, i)
        dpc_row = _nt(do_c_i, v.astype(f32))  # (1, n)
        dpcc = jnp.sum(do_c_i * vc, axis=1, keepdims=True)  # (1, 1)
        bits = None if win.cls_bits is None else win.cls_bits(i)
        dpc_row = _dropped(dpc_row, None if bits is None else _bit(bits, 1), keep_prob)
        dpc_col = _column(dpc_row, n)
        dpcc_col = _dropped(jnp.broadcast_to(dpcc, (n, 1)), keep_cc_col, keep_prob)
        delta_col = jnp.sum(jnp.where(win.same, pc_row * dpc_row, 0.0), axis=1, keepdims=True) + pcc_col * dpcc_col
        dc_col = pc_col * (dpc_col - delta_col) * scale
        dc_row = _row(dc_col, n)
        dcc = jnp.sum(win.first * pcc_col * (dpcc_col - delta_col), axis=0, keepdims=True) * scale  # (1, 1)
        dqc = dqc + jnp.where(in_head, _nn(dc_row, k.astype(f32)) + dcc * kc, 0.0)
        dk = dk + jnp.where(in_head, dc_col * qc, 0.0)
        dkc = dkc + jnp.where(in_head, dcc * qc, 0.0)
        dv = dv + jnp.where(in_head, pcd_col.astype(v.dtype).astype(f32) * do_c, 0.0)
        lines_cls = jnp.sum(win.first * pccd_col.astype(v.dtype).astype(f32), axis=0, keepdims=True)
        dvc = dvc + jnp.where(in_head, lines_cls * do_c, 0.0)
    for ref, x in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv)):
        ref[...] = x.astype(ref.dtype).reshape(ref.shape)
    # The bias's gradient: the column sums of the tokens' dq, dk, dv, over the windows.
    for ref, x in ((dqc_ref, dqc), (dkc_ref, dkc), (dvc_ref, dvc), (dbq_ref, jnp.sum(dq, axis=0, keepdims=True)),
                   (dbk_ref, jnp.sum(dk, axis=0, keepdims=True)), (dbv_ref, jnp.sum(dv, axis=0, keepdims=True))):
        ref[...] += x.reshape(ref.shape)


def _div(i, n: int):
    """i // n for a grid index i >= 0 (truncating division: Mosaic lowers no floor division's sign)."""
    return jax.lax.div(i, jnp.int32(n))


def _specs(plan: KernelPlan, has_pad: bool, has_keep: bool):
    """BlockSpecs of the common inputs, grid (B, the kernel's column blocks j, windows w)."""
    _, nh, nw = plan.windows_per_axis
    bpa, hp = plan.block.blocks_per_attention, plan.heads_per_block
    n, lanes, offset = plan.window_tokens, plan.lanes, plan.column_offset

    def box(b, j, wi):  # window wi of (T/bt, H/bh, W/bw) windows, row-major; the block's column block
        return b, _div(wi, nh * nw), jax.lax.rem(_div(wi, nw), nh), jax.lax.rem(wi, nw), offset + j

    # q, k and v are arrays of their own, the attentions' heads side by side: column block j of
    # the kernel's attentions, `column_offset` + j of the array.
    grid_block = pl.BlockSpec((pl.Squeezed(), *plan.window, lanes), box)
    cls_block = _cls_block(plan)
    bias_block = pl.BlockSpec((pl.Squeezed(), 1, lanes), lambda b, j, wi: (0, 0, offset + j))
    specs = [grid_block] * 3 + [cls_block] * 3 + [bias_block] * 3 + [
        pl.BlockSpec((pl.Squeezed(), 1, n), lambda b, j, wi: (_div(j, bpa), 0, 0)),
        pl.BlockSpec((pl.Squeezed(), n, 1), lambda b, j, wi: (_div(j, bpa), 0, 0)),
        pl.BlockSpec((pl.Squeezed(), 1, n), lambda b, j, wi: (_div(j, bpa), 0, 0))]
    if has_pad:
        specs.append(pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), 1, n), lambda b, j, wi: (b, wi, 0, 0)))
    if has_keep:
        specs.append(pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), hp, plan.line_rows, n),
                                  lambda b, j, wi: (b, wi, j, 0, 0)))
        specs.append(pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), pl.Squeezed(), hp, n),
                                  lambda b, j, wi: (b, wi, j, 0, 0)))
    return specs, grid_block


def _cls_block(plan: KernelPlan):
    return pl.BlockSpec((pl.Squeezed(), 1, plan.lanes), lambda b, j, wi: (b, 0, plan.column_offset + j))


def _inputs(plan, qkv, qkv_cls, bias, pad, keep):
    ids = jnp.asarray(plan.line_ids())
    positions = jnp.asarray(plan.line_positions())
    args = (list(qkv) + [x[:, None] for x in qkv_cls] + [b[None, None] for b in bias]
            + [ids[:, None, :], ids[:, :, None], positions[:, None, :]])
    if pad is not None:
        args.append(pad)
    if keep is not None:
        args.extend(keep)
    return args


def _nbytes(x) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _cost(plan: KernelPlan, batch: int, columns, others, backward: bool, has_keep: bool) -> pl.CostEstimate:
    """Honest counts of one call: the MXU work as issued (each head's dots over a column block's
    lanes, masked to its own: heads_per_block times a head's FLOPs), one exp per probability,
    and the bytes read and written: of the arrays of all the block's columns (`columns`: q, k, v,
    [CLS]'s, the bias, the outputs) the kernel's share, each block read once; `others` (masks,
    line ids) whole."""
    n, lanes, hp = plan.window_tokens, plan.lanes, plan.heads_per_block
    steps = batch * plan.column_blocks * plan.num_windows
    # Forward: QK^T, PV [n, n, lanes]; [CLS]'s q.K^T, P.V [1, n, lanes]. Backward: QK^T, dO.V^T,
    # dS.K, dS^T.Q, P^T.dO and [CLS]'s q.K^T, dO.V^T, dS.K.
    token_dots, cls_dots = (5, 3) if backward else (2, 2)
    flops = steps * hp * 2 * n * lanes * (token_dots * n + cls_dots)
    if has_keep:  # the pair masks spread over the window: [R, n]^T . [R, n] per head
        flops += steps * hp * 2 * plan.line_rows * n * n
    transcendentals = steps * hp * (n * (n + 1) + 4 * n)
    share = plan.column_blocks / plan.block.column_blocks
    nbytes = share * sum(map(_nbytes, columns)) + sum(map(_nbytes, others))
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(nbytes))


def _on_platform(call, args):
    """`call(interpret, *args)`: compiled by Mosaic for a TPU, in Pallas's interpreter on CPU
    (tests), chosen when the program is lowered for its platform (a deviceless TPU compile
    traces on a CPU host)."""
    return jax.lax.platform_dependent(*args, cpu=functools.partial(call, True), tpu=functools.partial(call, False))


def _earlier_outputs(earlier, first_output: int):
    """The in_specs and input_output_aliases of an earlier kernel's outputs passed on to a later
    kernel of the block (after its `first_output` inputs): it writes its own columns into them
    and leaves the earlier kernel's as they are (the blocks a grid does not visit keep the
    aliased input's values, in Mosaic and in the interpreter), so no concatenation of the
    kernels' outputs. Left in HBM, never read (memory space ANY)."""
    return ([pl.BlockSpec(memory_space=pl.ANY)] * len(earlier),
            {first_output + i: i for i in range(len(earlier))})


def _call_forward(plan, keep_prob, qkv, qkv_cls, bias, pad, keep, earlier):
    """One kernel's forward: (tokens' outputs [B, T, H, W, F], [CLS]'s summed outputs [B, 1, F]
    float32) with its columns written into `earlier` (the block's earlier kernel's outputs; ()
    for the first)."""
    return _on_platform(functools.partial(_forward, plan, keep_prob, pad is not None, keep is not None, len(earlier)),
                        _inputs(plan, qkv, qkv_cls, bias, pad, keep) + list(earlier))


def _forward(plan, keep_prob, has_pad, has_keep, aliased, interpret, *args):
    args, earlier = list(args[:len(args) - aliased]), args[len(args) - aliased:]
    b, q = args[0].shape[0], args[0]
    in_specs, out_block = _specs(plan, has_pad, has_keep)
    width = plan.block.column_blocks * plan.lanes
    out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, 1, width), jnp.float32)]
    earlier_specs, aliases = _earlier_outputs(earlier, len(args))
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan, keep_prob, has_pad, has_keep, aliased),
        out_shape=out_shapes, grid=(b, plan.column_blocks, plan.num_windows),
        in_specs=in_specs + earlier_specs, out_specs=[out_block, _cls_block(plan)], interpret=interpret,
        input_output_aliases=aliases, name="line_attention_fwd",
        # [CLS]'s outputs are summed over the windows: the last axis in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(plan, b, args[:9] + out_shapes, args[9:], backward=False, has_keep=has_keep),
    )(*args, *earlier)


def _call_backward(plan, keep_prob, qkv, qkv_cls, bias, pad, keep, d_out, d_out_c, earlier):
    """One kernel's backward: (dq, dk, dv [B, T, H, W, F], d qc, kc, vc, d bias of q, k, v [B, 1,
    F] float32 each) with its columns written into `earlier` (as `_call_forward`)."""
    return _on_platform(functools.partial(_backward, plan, keep_prob, pad is not None, keep is not None, len(earlier)),
                        _inputs(plan, qkv, qkv_cls, bias, pad, keep) + [d_out, d_out_c] + list(earlier))


def _backward(plan, keep_prob, has_pad, has_keep, aliased, interpret, *args):
    args, earlier = list(args[:len(args) - aliased]), args[len(args) - aliased:]
    b, q = args[0].shape[0], args[0]
    in_specs, out_block = _specs(plan, has_pad, has_keep)
    width = plan.block.column_blocks * plan.lanes
    out_shapes = ([jax.ShapeDtypeStruct(q.shape, q.dtype)] * 3
                  + [jax.ShapeDtypeStruct((b, 1, width), jnp.float32)] * 6)
    cls_block = _cls_block(plan)
    earlier_specs, aliases = _earlier_outputs(earlier, len(args))
    return pl.pallas_call(
        functools.partial(_backward_kernel, plan, keep_prob, has_pad, has_keep, aliased),
        out_shape=out_shapes, grid=(b, plan.column_blocks, plan.num_windows),
        in_specs=in_specs + [out_block, cls_block] + earlier_specs, out_specs=[out_block] * 3 + [cls_block] * 6,
        interpret=interpret, input_output_aliases=aliases, name="line_attention_bwd",
        # [CLS]'s gradients are summed over the windows: the last axis in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(plan, b, args[:9] + args[-2:] + out_shapes, args[9:-2], backward=True,
                            has_keep=has_keep),
    )(*args, *earlier)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(plan, keep_prob, qkv_cls, qkv, bias, pad, keep):
    """([CLS]'s outputs averaged over the lines [B, F], the tokens' [B, T, H, W, F]) of all
    attentions of a block (the module docstring); pad, keep: per kernel of the block, or None."""
    return _attention_fwd(plan, keep_prob, qkv_cls, qkv, bias, pad, keep)[0]


def _per_kernel(plan, masks):
    return (None,) * len(plan.kernels) if masks is None else masks


def _attention_fwd(plan, keep_prob, qkv_cls, qkv, bias, pad, keep):
    outs = ()
    for kernel, kernel_pad, kernel_keep in zip(plan.kernels, _per_kernel(plan, pad), _per_kernel(plan, keep)):
        outs = _call_forward(kernel, keep_prob, qkv, qkv_cls, bias, kernel_pad, kernel_keep, outs)
    out, out_c = outs
    # [CLS]'s outputs summed over all lines in float32, then averaged (`_line_attention`).
    return ((out_c[:, 0] / plan.lines_of_columns()).astype(out.dtype), out), (qkv_cls, qkv, bias, pad, keep)


def _attention_bwd(plan, keep_prob, residuals, cotangents):
    qkv_cls, qkv, bias, pad, keep = residuals
    d_out_c, d_out = cotangents
    d_sum_c = (d_out_c.astype(jnp.float32) / plan.lines_of_columns())[:, None]
    grads = ()
    for kernel, kernel_pad, kernel_keep in zip(plan.kernels, _per_kernel(plan, pad), _per_kernel(plan, keep)):
        grads = _call_backward(kernel, keep_prob, qkv, qkv_cls, bias, kernel_pad, kernel_keep, d_out, d_sum_c, grads)
    dq, dk, dv, dqc, dkc, dvc, dbq, dbk, dbv = grads
    d_qkv_cls = tuple(x[:, 0].astype(c.dtype) for x, c in zip((dqc, dkc, dvc), qkv_cls))
    d_bias = jnp.stack([x.sum(axis=(0, 1)) for x in (dbq, dbk, dbv)]).astype(bias.dtype)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (pad, keep))
    return (d_qkv_cls, (dq, dk, dv), d_bias) + zeros


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_attention(plan: Plan, qkv_cls, qkv, bias, key_is_pad, keep, keep_prob: float):
    """All parallel attentions of a block on their projections: qkv_cls ([CLS]'s q, k, v [B, F]
    each), qkv (the grid's q, k, v [B, T, H, W, F] each, before the bias; F = the attentions'
    heads x head_dim side by side), bias [3, F] (of q, k, v: added in the kernel, whose backward
    sums its gradient: no reduction of the projections' gradients in XLA), key_is_pad [B, T, H,
    W] bool or None, keep: the masks of `draw_keep_masks` or None -> ([CLS]'s outputs [B, F], the
    tokens' [B, T, H, W, F])."""
    dtype = qkv[0].dtype
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"model.attention_kernel 'pallas' computes in float32 or bfloat16, got {dtype}")
    if jax.default_backend() not in ("cpu", "tpu"):
        raise ValueError(f"model.attention_kernel 'pallas' is a TPU kernel (interpreted on CPU), not for "
                         f"{jax.default_backend()}: use 'xla'")
    pad = None
    if key_is_pad is not None:  # per kernel [B, windows, 1, n] in its windows' order (`KernelPlan.to_windows`)
        pad = tuple(kernel.to_windows(key_is_pad.astype(jnp.int8))[:, :, None] for kernel in plan.kernels)
    attend = functools.partial(_attention, plan, keep_prob)
    mesh = jax.typeof(qkv[0]).sharding.mesh
    if mesh.size > 1:
        attend = _per_shard(attend, mesh, batch=qkv[0].shape[0])
    return attend(tuple(qkv_cls), tuple(qkv), bias.astype(dtype), pad, keep)


def _batch_mesh_axes(mesh) -> tuple[str, ...]:
    """The mesh axes the clips are split over: the logical 'batch' axis's under the active rules
    (`nn.logical_axis_rules`, which `vimpac train` and `vimpac compile` enter:
    training/sharding.py LOGICAL_AXIS_RULES), else every axis of the mesh."""
    rule = dict(nn.get_logical_axis_rules()).get("batch", tuple(mesh.axis_names))
    axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
    return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def _per_shard(attend, mesh, batch: int):
    """`attend` run on each device's clips (`jax.shard_map` over the batch mesh axes): XLA cannot
    partition a Mosaic custom call by itself, and the lines of a clip never meet another clip's.
    The bias (the one input without a batch dimension) is replicated; its gradient, summed per
    device by the backward kernel, is summed over the devices by shard_map's transpose. On a
    'tensor' axis not in the batch rule the columns are gathered: every device of a tensor group
    computes all heads of its clips."""
    axes = _batch_mesh_axes(mesh)
    shards = math.prod(mesh.shape[a] for a in axes)
    if batch % shards:
        raise ValueError(f"model.attention_kernel 'pallas' runs each device's clips apart: the {batch} clips of a "
                         f"pass do not split evenly over the mesh axes {axes} ({shards} devices)")
    clips = P(axes or None)
    # Specs are pytree prefixes: one spec for all of [CLS]'s q, k, v; the grid's; the per-kernel
    # pad and keep masks (all [B, ...]).
    return jax.shard_map(attend, mesh=mesh, in_specs=(clips, clips, P(), clips, clips), out_specs=(clips, clips),
                         check_vma=False)
