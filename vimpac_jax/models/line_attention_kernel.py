"""The axial line attention of `attention.py` as a Pallas TPU kernel (`model.attention_kernel: pallas`).

What it computes is `attention._line_attention`'s, for all parallel attentions of one block
(`attention.AttentionBlock`) at once: each token attends to the tokens of its line with [CLS] as
one more key (key padding excluded, attention-dropout keep masks drawn outside and applied as
`apply_dropout_mask` does, scores and softmax in float32 from dots that accumulate in float32),
and [CLS] attends to each line with itself as one more key, its output the mean over the lines.

The layout is the projection's own: the kernel reads q, k, v as column blocks of the block's
one q|k|v projection of the grid, [B, T, H, W, C] (C = the attentions' q, k, v side by side,
`AttentionBlock`), and writes the tokens' outputs as [B, T, H, W, F] (F = the attentions'
heads x head_dim side by side): no `to_lines` transposes, no split of the projection, no
concatenation of the attentions' outputs. A grid step takes one window of the grid, a box
(bt, bh, W) that holds whole lines of every attention of the block (all of T for a temporal
line, all of H for a height line; W, the array's second-minor dimension, is always whole, as
Mosaic's block rule asks: the last two block dimensions are the array's or multiples of
(8, 128)), and one column block of `lanes` = 128 channels (a multiple of head_dim: two heads of
64, four of 32). The window's tokens are masked to the pairs of the same line, as the windows of
`_line_attention` are; the heads of a column block are separated by lane masks (a head's score
is the dot over its lanes only; its output keeps its lanes only), so no lane slices or head
transposes: the MXU contracts over 128 lanes either way.

Forward and backward are Pallas kernels under one `jax.custom_vjp` (`_token_attention`); the
backward recomputes the probabilities from q, k, v as flash attention does (Dao et al. 2022,
arXiv 2205.14135, Alg. 4) and keeps nothing but the inputs. [CLS]'s own query (one small
softmax per line over the line's keys and [CLS]) stays in XLA (`_cls_query_attention`): it is
a matrix-vector product per line, and its gradient comes from autodiff.

On CPU the kernels run in Pallas's interpreter (tests); on a TPU they are compiled by Mosaic.
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
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vimpac_jax.models.attention import WINDOW_TOKENS, _softmax_with_extra_key, from_lines, to_lines
from vimpac_jax.models.common import apply_dropout_mask
from vimpac_jax.models.layout import AXES

LANES = 128  # a TPU vector register's lanes: the column block of the kernel (a multiple of head_dim)
MAX_WINDOW = 512  # a window's [n, n] float32 scores per head must sit in VMEM with q, k, v, masks


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static layout of one block's kernel: windows, column blocks, heads per block.

    `attentions`: the line axes of each parallel attention (e.g. (("H",), ("W",))); `grid`:
    (T, H, W); `heads`, `head_dim`: per attention."""

    attentions: tuple[tuple[str, ...], ...]
    grid: tuple[int, int, int]
    heads: int
    head_dim: int

    def __post_init__(self):
        d, f = self.head_dim, self.heads * self.head_dim
        if LANES % d and d % LANES:
            raise ValueError(f"model.attention_kernel 'pallas' needs head_dim dividing {LANES} or a multiple of it, got {d}")
        if f % self.lanes:
            raise ValueError(f"model.attention_kernel 'pallas' needs each attention's heads x head_dim ({f}) to be a "
                             f"multiple of {self.lanes}")
        if self.window_tokens > MAX_WINDOW:
            raise ValueError(f"model.attention_kernel 'pallas': the lines of {self.attentions} on the grid {self.grid} "
                             f"need windows of {self.window_tokens} tokens, more than {MAX_WINDOW}")

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

    @property
    def window(self) -> tuple[int, int, int]:
        """(bt, bh, W): whole along every attended axis and W; H cut to about WINDOW_TOKENS."""
        t, h, w = self.grid
        attended = {a for axes in self.attentions for a in axes}
        bt = t if "T" in attended else 1
        if "H" in attended:
            return bt, h, w
        bh = max(g for g in range(1, h + 1) if h % g == 0 and (g == 1 or bt * g * w <= WINDOW_TOKENS))
        return bt, bh, w

    @property
    def window_tokens(self) -> int:
        return math.prod(self.window)

    @property
    def num_windows(self) -> int:
        (t, h, _), (bt, bh, _) = self.grid, self.window
        return (t // bt) * (h // bh)

    def line_ids(self) -> np.ndarray:
        """[attentions, n] int32: the line of each of a window's tokens (row-major over the window
        box), per attention: its coordinates on the axes it does not attend along."""
        coords = np.stack(np.meshgrid(*[np.arange(s) for s in self.window], indexing="ij"), -1).reshape(-1, 3)
        ids = []
        for axes in self.attentions:
            other = [i for i, a in enumerate(AXES) if a not in axes]
            sizes = [self.window[i] for i in other]
            ids.append(np.ravel_multi_index(tuple(coords[:, i] for i in other), sizes) if other
                       else np.zeros(len(coords), np.int64))
        return np.asarray(ids, np.int32)

    def window_tokens_global(self) -> np.ndarray:
        """[windows, n]: the grid index (row-major over (T, H, W)) of each window's tokens."""
        t, h, w = self.grid
        bt, bh, _ = self.window
        index = np.arange(t * h * w).reshape(t // bt, bt, h // bh, bh, w)
        return einops.rearrange(index, "tb bt hb bh w -> (tb hb) (bt bh w)")


def draw_keep_masks(key, keep_prob: float, batch: int, plan: Plan):
    """The keep masks of the tokens' queries in the kernel's windows: (pairs [B, windows, A*heads,
    n, n] int8: query row, key column (entries of other lines unused); [CLS] as key [B, windows,
    A*heads/hp, hp, n] int8, hp = heads per column block)."""
    n, heads = plan.window_tokens, len(plan.attentions) * plan.heads
    hp = plan.heads_per_block
    k_pairs, k_cls = jax.random.split(key)
    pairs = jax.random.bernoulli(k_pairs, keep_prob, (batch, plan.num_windows, heads, n, n))
    cls_key = jax.random.bernoulli(k_cls, keep_prob, (batch, plan.num_windows, heads // hp, hp, n))
    return pairs.astype(jnp.int8), cls_key.astype(jnp.int8)


def _score_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _head_tile(plan: Plan, i: int):
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


def _probabilities(plan, keep_prob, q, kc, s_rows, allowed, i, keep, keep_cls, dtype):
    """The i-th head's softmax over its line and [CLS] -> (p [n, n], p_cls [n, 1], both before
    dropout; and their dropped versions). s_rows: the raw q.k^T dot [n, n] (float32 accumulated)."""
    sd = jnp.float32
    scale = plan.head_dim ** -0.5
    neg = jnp.finfo(sd).min
    in_head = _head_tile(plan, i)
    # As `_line_attention`: the dots' outputs in the compute dtype, then float32.
    s = s_rows.astype(dtype).astype(sd) * scale
    qkc = jnp.where(in_head, q.astype(sd) * kc.astype(sd), 0.0)
    s_c = jnp.sum(qkc, axis=1, keepdims=True).astype(dtype).astype(sd) * scale
    s = jnp.where(allowed, s, neg)
    m = jnp.maximum(jnp.max(s, axis=1, keepdims=True), s_c)
    e, e_c = jnp.exp(s - m), jnp.exp(s_c - m)
    z = jnp.sum(e, axis=1, keepdims=True) + e_c
    p, p_c = e / z, e_c / z
    if keep is None:
        return p, p_c, p, p_c
    kp = jnp.asarray(keep_prob, sd)
    return p, p_c, jnp.where(keep != 0, p / kp, 0.0), jnp.where(keep_cls != 0, p_c / kp, 0.0)


def _load(ref, n, lanes):
    return ref[...].reshape(n, lanes)


def _window_inputs(plan, refs, has_pad, has_keep):
    """The common inputs of both kernels from their refs -> (q, k, v, kc, vc, allowed,
    keep_of_head, keep_cls_of_head, rest of refs)."""
    n, lanes = plan.window_tokens, plan.lanes
    q_ref, k_ref, v_ref, kc_ref, vc_ref, row_ref, col_ref, *refs = refs
    q, k, v = (_load(r, n, lanes) for r in (q_ref, k_ref, v_ref))
    kc, vc = kc_ref[...].reshape(1, lanes), vc_ref[...].reshape(1, lanes)
    allowed = col_ref[...] == row_ref[...]  # (n, 1) == (1, n): same line
    if has_pad:
        pad_ref, *refs = refs
        allowed = allowed & (pad_ref[...].astype(jnp.int32) == 0)
    keep = keep_cls = None
    if has_keep:
        keep_ref, keep_cls_ref, *refs = refs
        keep = lambda i: keep_ref[i].astype(jnp.int32)  # noqa: E731  (n, n)
        keep_cls = lambda i: _column(keep_cls_ref[pl.ds(i, 1), :].astype(jnp.int32), n)  # noqa: E731  (n, 1)
    return q, k, v, kc, vc, allowed, keep, keep_cls, refs


def _forward_kernel(plan, keep_prob, has_pad, has_keep, *refs):
    q, k, v, kc, vc, allowed, keep, keep_cls, (out_ref,) = _window_inputs(plan, refs, has_pad, has_keep)
    n, lanes = plan.window_tokens, plan.lanes
    out = jnp.zeros((n, lanes), jnp.float32)
    for i in range(plan.heads_per_block):
        in_head = _head_tile(plan, i)
        s_rows = _nt(jnp.where(in_head, q, jnp.zeros_like(q)), k)
        _, _, p, p_c = _probabilities(plan, keep_prob, q, kc, s_rows, allowed, i,
                                      keep and keep(i), keep_cls and keep_cls(i), q.dtype)
        head = _nn(p.astype(v.dtype), v) + p_c.astype(v.dtype).astype(jnp.float32) * vc.astype(jnp.float32)
        out = out + jnp.where(in_head, head, 0.0)
    out_ref[...] = out.astype(out_ref.dtype).reshape(out_ref.shape)


def _backward_kernel(plan, keep_prob, has_pad, has_keep, *refs):
    q, k, v, kc, vc, allowed, keep, keep_cls, refs = _window_inputs(plan, refs, has_pad, has_keep)
    do_ref, dq_ref, dk_ref, dv_ref, dkc_ref, dvc_ref = refs
    n, lanes = plan.window_tokens, plan.lanes
    scale = plan.head_dim ** -0.5
    f32 = jnp.float32

    @pl.when(pl.program_id(2) == 0)
    def _():
        dkc_ref[...] = jnp.zeros_like(dkc_ref)
        dvc_ref[...] = jnp.zeros_like(dvc_ref)

    do = _load(do_ref, n, lanes)
    dq = dk = dv = jnp.zeros((n, lanes), f32)
    dkc = dvc = jnp.zeros((1, lanes), f32)
    kp = jnp.asarray(keep_prob, f32)
    for i in range(plan.heads_per_block):
        in_head = _head_tile(plan, i)
        q_i = jnp.where(in_head, q, jnp.zeros_like(q))
        do_i = jnp.where(in_head, do, jnp.zeros_like(do))
        keep_i, keep_cls_i = (keep and keep(i)), (keep_cls and keep_cls(i))
        p, p_c, p_drop, p_c_drop = _probabilities(plan, keep_prob, q, kc, _nt(q_i, k), allowed, i,
                                                  keep_i, keep_cls_i, q.dtype)
        # Gradients of the dropped probabilities (the PV dot's output rounded as the forward's).
        dp = _nt(do_i, v).astype(v.dtype).astype(f32)
        dp_c = jnp.sum(do_i.astype(f32) * vc.astype(f32), axis=1, keepdims=True)
        if keep is not None:
            dp = jnp.where(keep_i != 0, dp / kp, 0.0)
            dp_c = jnp.where(keep_cls_i != 0, dp_c / kp, 0.0)
        # Softmax backward over the line's keys and [CLS], then through the scale.
        delta = jnp.sum(p * dp, axis=1, keepdims=True) + p_c * dp_c
        ds = (p * (dp - delta) * scale).astype(q.dtype)
        ds_c = (p_c * (dp_c - delta) * scale).astype(q.dtype).astype(f32)
        dq = dq + jnp.where(in_head, _nn(ds, k) + ds_c * kc.astype(f32), 0.0)
        dk = dk + jnp.where(in_head, _tn(ds, q), 0.0)
        dv = dv + jnp.where(in_head, _tn(p_drop.astype(v.dtype), do), 0.0)
        dkc = dkc + jnp.where(in_head, jnp.sum(ds_c * q.astype(f32), axis=0, keepdims=True), 0.0)
        dvc = dvc + jnp.where(in_head, jnp.sum(p_c_drop.astype(v.dtype).astype(f32) * do.astype(f32), axis=0,
                                                keepdims=True), 0.0)
    for ref, x in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv)):
        ref[...] = x.astype(ref.dtype).reshape(ref.shape)
    dkc_ref[...] += dkc.reshape(dkc_ref.shape)
    dvc_ref[...] += dvc.reshape(dvc_ref.shape)


def _div(i, n: int):
    """i // n for a grid index i >= 0 (truncating division: Mosaic lowers no floor division's sign)."""
    return jax.lax.div(i, jnp.int32(n))


def _specs(plan: Plan, has_pad: bool, has_keep: bool):
    """BlockSpecs of the common inputs, grid (B, column blocks j, windows w)."""
    _, bh, w = plan.window
    h_blocks = plan.grid[1] // bh
    bpa, hp = plan.blocks_per_attention, plan.heads_per_block
    n, lanes = plan.window_tokens, plan.lanes
    box = (pl.Squeezed(), plan.window[0], bh, w, lanes)

    def q_col(j):  # column block of attention j // bpa's q, in its [q | k | v] (AttentionBlock)
        return j + 2 * bpa * _div(j, bpa)

    def grid_block(shift):
        return pl.BlockSpec(box, lambda b, j, wi: (b, _div(wi, h_blocks), jax.lax.rem(wi, h_blocks), 0, q_col(j) + shift))

    def cls_block(shift):
        return pl.BlockSpec((pl.Squeezed(), 1, lanes), lambda b, j, wi: (b, 0, q_col(j) + shift))

    specs = [grid_block(0), grid_block(bpa), grid_block(2 * bpa), cls_block(bpa), cls_block(2 * bpa),
             pl.BlockSpec((pl.Squeezed(), 1, n), lambda b, j, wi: (_div(j, bpa), 0, 0)),
             pl.BlockSpec((pl.Squeezed(), n, 1), lambda b, j, wi: (_div(j, bpa), 0, 0))]
    if has_pad:
        specs.append(pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), 1, n), lambda b, j, wi: (b, wi, 0, 0)))
    if has_keep:
        specs.append(pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), hp, n, n), lambda b, j, wi: (b, wi, j, 0, 0)))
        specs.append(pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), pl.Squeezed(), hp, n),
                                  lambda b, j, wi: (b, wi, j, 0, 0)))
    out_block = pl.BlockSpec(box, lambda b, j, wi: (b, _div(wi, h_blocks), jax.lax.rem(wi, h_blocks), 0, j))
    return specs, out_block


def _inputs(plan, qkv, qkv_cls, pad, keep):
    ids = jnp.asarray(plan.line_ids())
    args = [qkv, qkv, qkv, qkv_cls[:, None], qkv_cls[:, None], ids[:, None, :], ids[:, :, None]]
    if pad is not None:
        args.append(pad)
    if keep is not None:
        args.extend(keep)
    return args


def _cost(plan: Plan, batch: int, args, outs, backward: bool) -> pl.CostEstimate:
    """Honest counts of one call: the MXU work as issued (each head's dots over a column block's
    128 lanes, masked to its own: hp times a head's FLOPs), exp per score, bytes of the blocks
    read and written (q, k, v and the masks once per window and column block)."""
    n, lanes, hp = plan.window_tokens, plan.lanes, plan.heads_per_block
    steps = batch * plan.column_blocks * plan.num_windows
    dots = 5 if backward else 2  # forward: QK^T, PV; backward: QK^T, dO V^T, dS K, dS^T Q, P^T dO
    flops = steps * hp * dots * 2 * n * n * lanes
    transcendentals = steps * hp * n * (n + 1)
    nbytes = sum(a.size * a.dtype.itemsize for a in args) + sum(math.prod(o.shape) * jnp.dtype(o.dtype).itemsize
                                                                for o in outs)
    # q, k, v are the same array passed three times: each of its column blocks is read once.
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(nbytes))


def _on_platform(call, args):
    """`call(interpret, *args)`: compiled by Mosaic for a TPU, in Pallas's interpreter on CPU
    (tests), chosen when the program is lowered for its platform (a deviceless TPU compile
    traces on a CPU host)."""
    return jax.lax.platform_dependent(*args, cpu=functools.partial(call, True), tpu=functools.partial(call, False))


def _call_forward(plan, keep_prob, qkv, qkv_cls, pad, keep):
    return _on_platform(functools.partial(_forward, plan, keep_prob, pad is not None, keep is not None),
                        _inputs(plan, qkv, qkv_cls, pad, keep))


def _forward(plan, keep_prob, has_pad, has_keep, interpret, *args):
    b, qkv = args[0].shape[0], args[0]
    in_specs, out_block = _specs(plan, has_pad, has_keep)
    out_shape = jax.ShapeDtypeStruct((*qkv.shape[:4], plan.column_blocks * plan.lanes), qkv.dtype)
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan, keep_prob, has_pad, has_keep),
        out_shape=out_shape, grid=(b, plan.column_blocks, plan.num_windows),
        in_specs=in_specs, out_specs=out_block, interpret=interpret, name="line_attention_fwd",
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        cost_estimate=_cost(plan, b, _qkv_read(plan, args), [out_shape], backward=False),
    )(*args)


def _qkv_read(plan, args):
    """The arguments as the kernel reads them: the q|k|v array once, not three times."""
    return args[2:]


def _call_backward(plan, keep_prob, qkv, qkv_cls, pad, keep, d_out):
    return _on_platform(functools.partial(_backward, plan, keep_prob, pad is not None, keep is not None),
                        _inputs(plan, qkv, qkv_cls, pad, keep) + [d_out])


def _backward(plan, keep_prob, has_pad, has_keep, interpret, *args):
    b, qkv = args[0].shape[0], args[0]
    args = list(args)
    in_specs, out_block = _specs(plan, has_pad, has_keep)
    width = plan.column_blocks * plan.lanes
    grid_shape = jax.ShapeDtypeStruct((*qkv.shape[:4], width), qkv.dtype)
    cls_shape = jax.ShapeDtypeStruct((b, 1, width), jnp.float32)
    cls_block = pl.BlockSpec((pl.Squeezed(), 1, plan.lanes), lambda b_, j, wi: (b_, 0, j))
    out_shapes = [grid_shape] * 3 + [cls_shape] * 2
    return pl.pallas_call(
        functools.partial(_backward_kernel, plan, keep_prob, has_pad, has_keep),
        out_shape=out_shapes, grid=(b, plan.column_blocks, plan.num_windows),
        in_specs=in_specs + [out_block], out_specs=[out_block] * 3 + [cls_block] * 2,
        interpret=interpret, name="line_attention_bwd",
        # [CLS]'s key and value gradients are summed over the windows: the last axis in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(plan, b, _qkv_read(plan, args), out_shapes, backward=True),
    )(*args)


def _interleave(plan, dq, dk, dv, axis=-1):
    """Per attention [dq | dk | dv] side by side: the layout of the q|k|v projection."""
    parts = []
    for x in zip(*(jnp.split(d, len(plan.attentions), axis=axis) for d in (dq, dk, dv))):
        parts.extend(x)
    return jnp.concatenate(parts, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _token_attention(plan, keep_prob, qkv, qkv_cls, pad, keep):
    """The tokens' outputs [B, T, H, W, F] of all attentions of a block (see the module docstring)."""
    return _call_forward(plan, keep_prob, qkv, qkv_cls, pad, keep)


def _token_attention_fwd(plan, keep_prob, qkv, qkv_cls, pad, keep):
    out = _call_forward(plan, keep_prob, qkv, qkv_cls, pad, keep)
    return out, (qkv, qkv_cls, pad, keep)


def _token_attention_bwd(plan, keep_prob, residuals, d_out):
    qkv, qkv_cls, pad, keep = residuals
    dq, dk, dv, dkc, dvc = _call_backward(plan, keep_prob, qkv, qkv_cls, pad, keep, d_out)
    d_qkv = _interleave(plan, dq, dk, dv)
    dkc, dvc = dkc[:, 0].astype(qkv_cls.dtype), dvc[:, 0].astype(qkv_cls.dtype)
    d_qkv_cls = _interleave(plan, jnp.zeros_like(dkc), dkc, dvc)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (pad, keep))
    return (d_qkv, d_qkv_cls) + zeros


_token_attention.defvjp(_token_attention_fwd, _token_attention_bwd)


def _cls_query_attention(plan, qkv, qkv_cls, key_is_pad, keep_cls_query, keep_prob):
    """[CLS]'s query per attention, in XLA: one softmax per line over its keys and [CLS]'s own,
    dropout, the mean over the lines of its outputs -> [B, F] (the attentions side by side).
    keep_cls_query: per attention (keep of the line's keys [B, N, heads, L], of [CLS] [B, N,
    heads]) in `attention.to_lines` order, or None."""
    h, d, f = plan.heads, plan.head_dim, plan.heads * plan.head_dim
    sd = _score_dtype(qkv.dtype)
    neg, scale = jnp.finfo(sd).min, d ** -0.5
    outs = []
    for a, axes in enumerate(plan.attentions):
        base = 3 * f * a
        qc, kc, vc = (qkv_cls[:, base + i * f: base + (i + 1) * f].reshape(-1, h, d) for i in range(3))
        k, v = (qkv[..., base + i * f: base + (i + 1) * f].reshape(*qkv.shape[:4], h, d) for i in (1, 2))
        c = to_lines(jnp.einsum("bthwnd,bnd->bthwn", k, qc).astype(sd) * scale, axes)  # [B, N, L, h]
        if key_is_pad is not None:
            c = jnp.where(to_lines(key_is_pad, axes)[..., None], neg, c)
        c = einops.rearrange(c, "b n l h -> b n h l")
        c_cls = jnp.einsum("bnd,bnd->bn", qc, kc).astype(sd) * scale
        probs, probs_cc = _softmax_with_extra_key(c, jnp.broadcast_to(c_cls[:, None], c.shape[:-1]))
        if keep_cls_query is not None:
            probs, probs_cc = (apply_dropout_mask(x, m, keep_prob) for x, m in zip((probs, probs_cc),
                                                                                    keep_cls_query[a]))
        probs_grid = from_lines(einops.rearrange(probs.astype(v.dtype), "b n h l -> b n l h"), axes, plan.grid)
        out_c = (jnp.einsum("bthwn,bthwnd->bnd", probs_grid, v, preferred_element_type=sd)
                 + jnp.einsum("bgn,bnd->bnd", probs_cc.astype(v.dtype), vc, preferred_element_type=sd))
        outs.append((out_c / c.shape[1]).astype(v.dtype).reshape(-1, f))
    return jnp.concatenate(outs, axis=-1)


def draw_cls_query_masks(key, keep_prob: float, batch: int, plan: Plan):
    """Keep masks of [CLS]'s query per attention: ([B, N, heads, L], [B, N, heads]) bool."""
    t, h, w = plan.grid
    sizes = dict(zip(AXES, (t, h, w)))
    masks = []
    for axes, k in zip(plan.attentions, jax.random.split(key, len(plan.attentions))):
        length = math.prod(sizes[a] for a in axes)
        lines = t * h * w // length
        k1, k2 = jax.random.split(k)
        masks.append((jax.random.bernoulli(k1, keep_prob, (batch, lines, plan.heads, length)),
                      jax.random.bernoulli(k2, keep_prob, (batch, lines, plan.heads))))
    return tuple(masks)


def block_attention(plan: Plan, qkv_cls, qkv, key_is_pad, keep, keep_prob: float):
    """All parallel attentions of a block: qkv_cls [B, C], qkv [B, T, H, W, C] (C = per attention
    [q | k | v], each heads x head_dim), key_is_pad [B, T, H, W] bool or None, keep: None or
    (kernel masks `draw_keep_masks`, [CLS] query masks `draw_cls_query_masks`) -> ([CLS]'s
    outputs [B, F], the tokens' [B, T, H, W, F]), F = attentions x heads x head_dim."""
    if qkv.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"model.attention_kernel 'pallas' computes in float32 or bfloat16, got {qkv.dtype}")
    pad = None
    if key_is_pad is not None:
        flat = key_is_pad.reshape(key_is_pad.shape[0], -1)
        pad = flat[:, plan.window_tokens_global()][:, :, None, :].astype(jnp.int8)  # [B, windows, 1, n]
    token_keep, cls_keep = (None, None) if keep is None else keep
    out = _token_attention(plan, keep_prob, qkv, qkv_cls, pad, token_keep)
    return _cls_query_attention(plan, qkv, qkv_cls, key_is_pad, cls_keep, keep_prob), out
