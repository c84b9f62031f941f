"""Axial attention with [CLS] as an extra key and query of every line (the released `vimpac/modeling.py`).

For an attention over axes A (e.g. `T`, or `HxW`), the video grid is cut into lines: the
tokens that share their position on every other axis. Each line attends within itself, with
[CLS] as one more key/value (line length 1 + |A|), and [CLS] attends to each line with itself
as a key; the new [CLS] is the mean of its outputs over all lines, as in TimeSformer and the
released code (which prepends a copy of [CLS] to every line). PAD tokens are excluded as keys.

Here [CLS] is never copied into the lines: its scores against a line are separate small
products that join the line's scores before the softmax (`_line_attention`), so q, k, v are
the projections of the grid as they are, and [CLS] rides in the hidden state as row 0 of
[B, 1 + T*H*W, D] (one stream of kernels for both; `AttentionBlock`). The q, k, v projections of
all parallel attentions of a block are one matmul with their kernels concatenated at compute
time (the parameters stay one Dense per q, k, v, as the released names). Short lines are
attended several at a time, in windows of about WINDOW_TOKENS tokens masked to each line,
with the heads as a batch dimension ahead of the tokens: layouts a TPU's tiles fill.
With `model.attention_kernel: pallas` a block's attentions are instead Pallas TPU kernels
(`line_attention_kernel.py`) on the projections' own layout, the same values.
"""

import functools
from typing import Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from vimpac_jax.models import line_attention_kernel
from vimpac_jax.models.common import INIT_STD, Dropout, apply_dropout_mask, dense, layer_norm
from vimpac_jax.models.layout import AXES, WINDOW_TOKENS

# `model.attention_kernel`: the attention of a block as XLA ops (`_line_attention`) or as Pallas
# TPU kernels (`line_attention_kernel`, the same values; interpreted on CPU).
ATTENTION_KERNELS = ("xla", "pallas")


def _line_axes(axes: tuple[str, ...]) -> tuple[str, str]:
    """einops groups (other axes, line axes) of the grid `t h w` for an attention over `axes`."""
    other = " ".join(a.lower() for a in AXES if a not in axes)
    return f"({other})", f"({' '.join(a.lower() for a in axes)})"


def to_lines(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """[B, T, H, W, ...] -> [B, N, L, ...]: N lines of the L = prod(|a| for a in axes) tokens
    that share their position on the other axes."""
    other, line = _line_axes(axes)
    extra = " ".join(f"c{i}" for i in range(x.ndim - 4))
    return einops.rearrange(x, f"b t h w {extra} -> b {other} {line} {extra}")


def from_lines(y: jax.Array, axes: tuple[str, ...], grid: tuple[int, int, int]) -> jax.Array:
    """Inverse of `to_lines`: [B, N, L, ...] -> [B, T, H, W, ...] for grid (T, H, W)."""
    other, line = _line_axes(axes)
    extra = " ".join(f"c{i}" for i in range(y.ndim - 3))
    t, h, w = grid
    return einops.rearrange(y, f"b {other} {line} {extra} -> b t h w {extra}", t=t, h=h, w=w)




def lines_per_window(num_lines: int, length: int, window: Optional[int] = None) -> int:
    """The largest divisor G of `num_lines` with G * `length` <= `window` (default WINDOW_TOKENS;
    at least 1)."""
    window = WINDOW_TOKENS if window is None else window
    return max(g for g in range(1, num_lines + 1) if num_lines % g == 0 and (g == 1 or g * length <= window))


def _softmax_with_extra_key(s, s_extra):
    """Softmax over the keys of s [..., K] and one more key s_extra [...] -> (p [..., K], p_extra
    [...]): jax.nn.softmax of their concatenation, without concatenating. The running maximum
    is a constant of the softmax, so no gradient flows through it (as in jax.nn.softmax)."""
    m = jax.lax.stop_gradient(jnp.maximum(s.max(-1), s_extra))
    e, e_extra = jnp.exp(s - m[..., None]), jnp.exp(s_extra - m)
    z = e.sum(-1) + e_extra
    return e / z[..., None], e_extra / z


def draw_dropout_masks(key, keep_prob: float, batch: int, lines: int, length: int, heads: int, group: int):
    """Keep masks of the attention probabilities of `_line_attention`, in its window shapes
    (G = `group` lines per window of G*L tokens, W = lines / G windows): for the tokens'
    queries [B, W, heads, GL, GL] (entries outside a query's line are unused) and [B, W, heads,
    GL] ([CLS] as key); for [CLS]'s query per line [B, W, heads, G, L] and [B, W, heads, G]."""
    windows = lines // group
    shapes = ((batch, windows, heads, group * length, group * length), (batch, windows, heads, group * length),
              (batch, windows, heads, group, length), (batch, windows, heads, group))
    return tuple(jax.random.bernoulli(k, keep_prob, shape) for k, shape in zip(jax.random.split(key, 4), shapes))


@functools.partial(jax.checkpoint, static_argnums=(8, 9))
def _line_attention(q, k, v, qc, kc, vc, key_is_pad, keep, keep_prob: float, length: int):
    """Attention within lines with [CLS] as an extra key and query, without copying it in.

    q, k, v [B, W, heads, G*L, hd]: the lines' tokens in windows of G lines of `length` L (a
    window's tokens line after line; WINDOW_TOKENS says why windows), qc, kc, vc [B, heads, hd]
    ([CLS]), key_is_pad [B, W, G*L] or None, keep: the attention-dropout masks
    (`draw_dropout_masks`) or None. Returns the tokens' outputs [B, W, heads, G*L, hd] and
    [CLS]'s output averaged over the lines [B, heads, hd].

    A window's scores are masked to the pairs of the same line: the other pairs get exactly zero
    probability, so the result is the per-line attention's. Each query's score against [CLS]
    joins its line's scores in the softmax (`_softmax_with_extra_key`): neither q, k, v nor the
    scores are concatenated. Heads are a batch dimension ahead of the tokens (one transpose of
    q, k, v by the caller, not one per dot). Recomputed in the backward pass from its inputs, as flash
    attention does: the scores are a small share of the FLOPs, and the backward keeps no float32
    scores, probabilities or masks.
    """
    b, windows, h, width, d = q.shape
    group = width // length
    scale = d ** -0.5
    # The dots' outputs in the compute dtype (f32 accumulation inside), then the softmax in f32
    # (float64 under a float64 run): so the backward's dq, dk dots take compute-dtype operands,
    # not f32 x f32. Unchanged in f32.
    sd = jnp.promote_types(q.dtype, jnp.float32)
    neg = jnp.finfo(sd).min
    # The tokens' queries: against the window's keys (own line only) and [CLS].
    s_lines = jnp.einsum("bwhqd,bwhkd->bwhqk", q, k).astype(sd) * scale  # [B, W, h, GL, GL]
    s_cls = jnp.einsum("bwhqd,bhd->bwhq", q, kc).astype(sd) * scale  # [B, W, h, GL]
    line_of = np.arange(width) // length
    allowed = jnp.asarray(line_of[:, None] == line_of[None, :])  # [GL, GL]
    # [CLS]'s query: against each line's keys, one softmax per line with [CLS] as its extra key.
    c_lines = jnp.einsum("bhd,bwhkd->bwhk", qc, k).astype(sd) * scale  # [B, W, h, GL]
    c_cls = jnp.einsum("bhd,bhd->bh", qc, kc).astype(sd) * scale  # [B, h]
    if key_is_pad is not None:
        pad = key_is_pad[:, :, None, :]
        allowed = allowed & ~pad[:, :, :, None, :]
        c_lines = jnp.where(pad, neg, c_lines)
    s_lines = jnp.where(allowed, s_lines, neg)
    probs, probs_cls = _softmax_with_extra_key(s_lines, s_cls)
    c_lines = c_lines.reshape(b, windows, h, group, length)
    probs_c, probs_cc = _softmax_with_extra_key(c_lines, jnp.broadcast_to(c_cls[:, None, :, None], c_lines.shape[:-1]))
    if keep is not None:
        probs, probs_cls, probs_c, probs_cc = (apply_dropout_mask(x, m, keep_prob) for x, m in
                                               zip((probs, probs_cls, probs_c, probs_cc), keep))
    probs, probs_cls = probs.astype(v.dtype), probs_cls.astype(v.dtype)
    out = (jnp.einsum("bwhqk,bwhkd->bwhqd", probs, v)
           + jnp.einsum("bwhq,bhd->bwhqd", probs_cls, vc))
    # [CLS]'s outputs summed over all lines in float32, then averaged (TimeSformer, the released code).
    probs_c, probs_cc = probs_c.astype(v.dtype).reshape(b, windows, h, width), probs_cc.astype(v.dtype)
    out_c = (jnp.einsum("bwhk,bwhkd->bhd", probs_c, v, preferred_element_type=sd)
             + jnp.einsum("bwhg,bhd->bhd", probs_cc, vc, preferred_element_type=sd))
    return out, (out_c / (windows * group)).astype(v.dtype)


def _fused_attention(q, k, v, qc, kc, vc, key_is_pad, implementation):
    """`jax.nn.dot_product_attention` (no dropout) over lines with [CLS] prepended, for an
    explicit `implementation` ('xla', 'cudnn'): the same result as `_line_attention`."""
    b, n, length, h, d = q.shape

    def prepend(c, t):
        return jnp.concatenate([jnp.broadcast_to(c[:, None, None], (b, n, 1, h, d)), t], axis=2).reshape(
            b * n, 1 + length, h, d)

    mask = None
    if key_is_pad is not None:
        pad = jnp.concatenate([jnp.zeros((b, n, 1), bool), key_is_pad], axis=2).reshape(b * n, 1, 1, 1 + length)
        mask = ~pad
    out = jax.nn.dot_product_attention(prepend(qc, q), prepend(kc, k), prepend(vc, v), mask=mask,
                                       implementation=implementation).reshape(b, n, 1 + length, h, d)
    return out[:, :, 1:], out[:, :, 0]


class _Projection(nn.Module):
    """The parameters of a Dense(D -> features) (kernel [D, features], bias [features]), with
    `dense`'s initialisers and names, for a matmul fused with others (`AxialAttention`)."""

    features: int
    axes: tuple
    std: float = INIT_STD

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(stddev=self.std), self.axes),
                            (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axes[1],)),
                          (self.features,), jnp.float32)
        return kernel, bias


def project(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array], dtype) -> jax.Array:
    """x [..., D] @ kernel [D, F] + bias [F], all in `dtype` (what flax's Dense computes); no bias
    added when it is None."""
    y = jnp.einsum("...d,df->...f", x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


class AxialAttention(nn.Module):
    """Self-attention within the lines of `axes`, with [CLS] as an extra key and query of every line.

    `__call__(cls [B, D], x [B, T, H, W, D], key_is_pad [B, T, H, W] bool or None)` ->
    cls [B, F], x [B, T, H, W, F] with F = num_heads * head_dim (before the output dense).
    `qkv_params(D)`: its q, k, v projections as one kernel [D, 3F] and bias [3F];
    `attend_projected(qkv_cls [B, 3F], qkv [B, T, H, W, 3F], key_is_pad)`: the attention on
    projections already made (`AttentionBlock` makes those of all its attentions in one matmul).
    """

    axes: tuple[str, ...]
    num_heads: int
    head_dim: int
    attention_dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    implementation: Optional[str] = None

    def setup(self):
        features = self.num_heads * self.head_dim
        self.query, self.key, self.value = (_Projection(features, ("embed", "heads"), name=n)
                                            for n in ("query", "key", "value"))

    def projection_params(self, in_features: int) -> list[tuple[jax.Array, jax.Array]]:
        """[(kernel [D, F], bias [F])] of the q, k, v projections."""
        return [p(in_features) for p in (self.query, self.key, self.value)]

    def qkv_params(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        parts = self.projection_params(in_features)
        return jnp.concatenate([k for k, _ in parts], axis=1), jnp.concatenate([b for _, b in parts])

    def __call__(self, cls, x, key_is_pad, *, deterministic: bool):
        kernel, bias = self.qkv_params(x.shape[-1])
        return self.attend_projected(project(cls, kernel, bias, self.dtype), project(x, kernel, bias, self.dtype),
                                     key_is_pad, deterministic=deterministic)

    def attend_projected(self, qkv_cls, qkv, key_is_pad, *, deterministic: bool):
        b, h, d = qkv.shape[0], self.num_heads, self.head_dim
        lines = to_lines(qkv, self.axes)  # [B, N, L, 3F]
        n, length = lines.shape[1], lines.shape[2]
        qc, kc, vc = einops.rearrange(qkv_cls, "b (s h d) -> s b h d", s=3, h=h)
        pad = None if key_is_pad is None else to_lines(key_is_pad, self.axes)  # [B, N, L]
        active = not deterministic and self.attention_dropout > 0.0
        if not active and self.implementation is not None and qkv.dtype != jnp.float64:
            q, k, v = einops.rearrange(lines, "b n l (s h d) -> s b n l h d", s=3, h=h)
            out, out_c = _fused_attention(q, k, v, qc, kc, vc, pad, self.implementation)
            out, out_c = out.reshape(b, n, length, h * d), out_c.mean(axis=1)
        else:
            group = lines_per_window(n, length)
            # One transpose of the projections to [B, W, heads, G*L, hd] (windows of G lines).
            q, k, v = einops.rearrange(lines, "b (w g) l (s h d) -> s b w h (g l) d", g=group, s=3, h=h)
            keep = None
            if active:
                keep = draw_dropout_masks(self.make_rng("dropout"), 1.0 - self.attention_dropout, b, n, length, h,
                                          group)
            pad = None if pad is None else pad.reshape(b, n // group, group * length)
            out, out_c = _line_attention(q, k, v, qc, kc, vc, pad, keep, 1.0 - self.attention_dropout, length)
            out = einops.rearrange(out, "b w h (g l) d -> b (w g) l (h d)", g=group)
        cls_out = out_c.reshape(b, h * d)  # the mean of [CLS]'s outputs over all lines
        x_out = from_lines(out, self.axes, qkv.shape[1:4])
        return cls_out, x_out


class AttentionBlock(nn.Module):
    """One block of a layer: parallel axial attentions, concatenated, then the output dense.

    `__call__(seq [B, 1 + T*H*W, D] ([CLS] first, then the grid row-major), key_is_pad
    [B, T, H, W]) -> seq [B, 1 + T*H*W, D]`.
    Post-LN (BERT): y = LN(x + Dropout(W_out · concat(attn(x)))).
    Pre-LN (ViT, ablation): u = LN(x); y = u + Dropout(W_out · concat(attn(u))) — the residual
    is added to the normalised u, as the released code does. [CLS] and tokens share weights.
    Unlike the released code, the output dense maps d_att -> d, so pre-LN with halve_att works.
    """

    attentions: Sequence[tuple[str, ...]]
    hidden_dim: int
    num_heads: int
    attention_dim: int
    pre_ln: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    out_init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    implementation: Optional[str] = None
    attention_kernel: str = "xla"

    @nn.compact
    def __call__(self, seq, key_is_pad, *, deterministic: bool):
        p = len(self.attentions)
        if self.attention_dim % p or self.num_heads % p:
            raise ValueError(f"{p} parallel attentions need attention dim {self.attention_dim} and "
                             f"{self.num_heads} heads divisible by {p}")
        heads = self.num_heads // p
        head_dim = self.attention_dim // self.num_heads
        b, grid = seq.shape[0], key_is_pad.shape[1:]
        ln = layer_norm(name="ln", dtype=self.dtype)
        if self.pre_ln:
            seq = ln(seq)
        attentions = [AxialAttention(axes, heads, head_dim, self.attention_dropout, self.dtype, self.implementation,
                                     name=f"axis_{i}") for i, axes in enumerate(self.attentions)]
        if self.attention_kernel == "pallas":
            # q, k, v each one matmul for all attentions of the block, [CLS]'s row apart from the
            # grid's: the kernel reads each as its matmul wrote it, not as a slice of a larger
            # array (a copy), and adds the bias itself (its backward sums the bias's gradient).
            roles = list(zip(*(a.projection_params(seq.shape[-1]) for a in attentions)))  # (q, k, v)
            kernels = [jnp.concatenate([k for k, _ in role], axis=1) for role in roles]
            bias = jnp.stack([jnp.concatenate([b for _, b in role]) for role in roles])  # [3, F]
            qkv_cls = [checkpoint_name(project(seq[:, 0], k, bb, self.dtype), "qkv") for k, bb in zip(kernels, bias)]
            qkv_grid = [checkpoint_name(project(seq[:, 1:], k, None, self.dtype), "qkv").reshape(b, *grid, -1)
                        for k in kernels]
            cls_out, x_out = self._attend_with_kernel(qkv_cls, qkv_grid, bias, key_is_pad, heads, head_dim,
                                                      deterministic)
        elif self.attention_kernel == "xla":
            # One matmul for the q, k, v of every attention of the block, [CLS] row included.
            params = [a.qkv_params(seq.shape[-1]) for a in attentions]
            qkv = checkpoint_name(project(seq, jnp.concatenate([k for k, _ in params], axis=1),
                                          jnp.concatenate([bias for _, bias in params]), self.dtype), "qkv")
            qkv_cls, qkv_grid = qkv[:, 0], qkv[:, 1:].reshape(b, *grid, qkv.shape[-1])
            outs = [a.attend_projected(c, g, key_is_pad, deterministic=deterministic)
                    for a, c, g in zip(attentions, jnp.split(qkv_cls, p, axis=-1), jnp.split(qkv_grid, p, axis=-1))]
            cls_out, x_out = (jnp.concatenate([o[i] for o in outs], axis=-1) for i in (0, 1))
        else:
            raise ValueError(f"model.attention_kernel must be one of {ATTENTION_KERNELS}, "
                             f"got {self.attention_kernel!r}")
        att = jnp.concatenate([cls_out[:, None], x_out.reshape(b, -1, self.attention_dim)], axis=1)
        out = dense(self.hidden_dim, ("heads", "embed"), name="out", dtype=self.dtype, std=self.out_init_std)
        new = Dropout(self.dropout)(out(checkpoint_name(att, "attention")), deterministic=deterministic) + seq
        if not self.pre_ln:
            new = ln(new)
        return checkpoint_name(new, "block_out")

    def _attend_with_kernel(self, qkv_cls, qkv_grid, bias, key_is_pad, heads, head_dim, deterministic):
        """The block's attentions as Pallas kernels on the projections as they are: qkv_cls, [CLS]'s
        q, k, v [B, F] each, qkv_grid the grid's [B, T, H, W, F] each before their bias [3, F]
        (`line_attention_kernel.block_attention`) -> ([CLS] [B, F], tokens [B, T, H, W, F])."""

        plan = line_attention_kernel.Plan(tuple(tuple(a) for a in self.attentions), tuple(key_is_pad.shape[1:]),
                                          heads, head_dim)
        keep_prob = 1.0 - self.attention_dropout
        keep = None
        if not deterministic and self.attention_dropout > 0.0:
            keep = line_attention_kernel.draw_keep_masks(self.make_rng("dropout"), keep_prob, key_is_pad.shape[0], plan)
        return line_attention_kernel.block_attention(plan, qkv_cls, qkv_grid, bias, key_is_pad, keep, keep_prob)
