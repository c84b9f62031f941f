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
time (the parameters stay one Dense per q, k, v, as the released names).
"""

import functools
from typing import Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vimpac_jax.models.common import INIT_STD, Dropout, apply_dropout_mask, dense, layer_norm
from vimpac_jax.models.layout import AXES


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


@functools.partial(jax.checkpoint, static_argnums=(9,))
def _line_attention(q, k, v, qc, kc, vc, key_is_pad, keep, keep_cls, keep_prob: float):
    """Attention within lines with [CLS] as an extra key and query, without copying it in.

    q, k, v [B, N, L, heads, hd] (the lines' tokens), qc, kc, vc [B, heads, hd] ([CLS]),
    key_is_pad [B, N, L] or None, keep [B, N, heads, L, 1 + L] and keep_cls [B, N, heads, 1 + L]
    (attention-dropout masks; key 0 is [CLS]) or None. Returns the tokens' outputs
    [B, N, L, heads, hd] and [CLS]'s output per line [B, N, heads, hd].

    Each query's scores against [CLS] (one column) are concatenated to its scores against the
    line before the softmax: the small scores tensor is concatenated, not q, k, v. Recomputed in
    the backward pass from its inputs, as flash attention does: at lines of 6-17 tokens the
    scores are 0.6% of the FLOPs, and the backward keeps no [.., L, 1 + L] float32 scores,
    probabilities or masks (saved-residual bytes in benchmarks/RESULTS.md).
    """
    scale = q.shape[-1] ** -0.5
    # The dots' outputs in the compute dtype (f32 accumulation inside), then the softmax in f32
    # (float64 under a float64 run): so the backward's dq, dk dots take compute-dtype operands,
    # not f32 x f32. Unchanged in f32.
    sd = jnp.promote_types(q.dtype, jnp.float32)
    s_lines = jnp.einsum("bnqhd,bnkhd->bnhqk", q, k).astype(sd) * scale  # [B, N, h, L, L]
    s_cls = jnp.einsum("bnqhd,bhd->bnhq", q, kc).astype(sd) * scale  # [B, N, h, L]
    c_lines = jnp.einsum("bhd,bnkhd->bnhk", qc, k).astype(sd) * scale  # [B, N, h, L]
    c_cls = jnp.einsum("bhd,bhd->bh", qc, kc).astype(sd) * scale  # [B, h]
    if key_is_pad is not None:
        neg = jnp.finfo(sd).min
        s_lines = jnp.where(key_is_pad[:, :, None, None, :], neg, s_lines)
        c_lines = jnp.where(key_is_pad[:, :, None, :], neg, c_lines)
    probs = jax.nn.softmax(jnp.concatenate([s_cls[..., None], s_lines], axis=-1), axis=-1)
    c_cls = jnp.broadcast_to(c_cls[:, None, :, None], (*c_lines.shape[:-1], 1))
    probs_c = jax.nn.softmax(jnp.concatenate([c_cls, c_lines], axis=-1), axis=-1)
    if keep is not None:
        probs, probs_c = apply_dropout_mask(probs, keep, keep_prob), apply_dropout_mask(probs_c, keep_cls, keep_prob)
    probs, probs_c = probs.astype(v.dtype), probs_c.astype(v.dtype)
    out = (jnp.einsum("bnhqk,bnkhd->bnqhd", probs[..., 1:], v)
           + jnp.einsum("bnhq,bhd->bnqhd", probs[..., 0], vc))
    out_c = (jnp.einsum("bnhk,bnkhd->bnhd", probs_c[..., 1:], v)
             + jnp.einsum("bnh,bhd->bnhd", probs_c[..., 0], vc))
    return out, out_c


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


def project(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
    """x [..., D] @ kernel [D, F] + bias [F], all in `dtype` (what flax's Dense computes)."""
    return jnp.einsum("...d,df->...f", x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


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

    def qkv_params(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        parts = [p(in_features) for p in (self.query, self.key, self.value)]
        return jnp.concatenate([k for k, _ in parts], axis=1), jnp.concatenate([b for _, b in parts])

    def __call__(self, cls, x, key_is_pad, *, deterministic: bool):
        kernel, bias = self.qkv_params(x.shape[-1])
        return self.attend_projected(project(cls, kernel, bias, self.dtype), project(x, kernel, bias, self.dtype),
                                     key_is_pad, deterministic=deterministic)

    def attend_projected(self, qkv_cls, qkv, key_is_pad, *, deterministic: bool):
        b, h, d = qkv.shape[0], self.num_heads, self.head_dim
        q, k, v = einops.rearrange(to_lines(qkv, self.axes), "b n l (s h d) -> s b n l h d", s=3, h=h)
        qc, kc, vc = einops.rearrange(qkv_cls, "b (s h d) -> s b h d", s=3, h=h)
        pad = None if key_is_pad is None else to_lines(key_is_pad, self.axes)  # [B, N, L]
        active = not deterministic and self.attention_dropout > 0.0
        if not active and self.implementation is not None and q.dtype != jnp.float64:
            out, out_c = _fused_attention(q, k, v, qc, kc, vc, pad, self.implementation)
        else:
            keep = keep_cls = None
            if active:
                n, length = q.shape[1], q.shape[2]
                key_tok, key_cls = jax.random.split(self.make_rng("dropout"))
                keep_prob = 1.0 - self.attention_dropout
                keep = jax.random.bernoulli(key_tok, keep_prob, (b, n, h, length, 1 + length))
                keep_cls = jax.random.bernoulli(key_cls, keep_prob, (b, n, h, 1 + length))
            out, out_c = _line_attention(q, k, v, qc, kc, vc, pad, keep, keep_cls, 1.0 - self.attention_dropout)
        cls_out = out_c.mean(axis=1).reshape(b, h * d)  # the mean of [CLS]'s outputs over all lines
        x_out = from_lines(out.reshape(*out.shape[:3], h * d), self.axes, qkv.shape[1:4])
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
        params = [a.qkv_params(seq.shape[-1]) for a in attentions]
        # One matmul for the q, k, v of every attention of the block, [CLS] row included.
        qkv = checkpoint_name(project(seq, jnp.concatenate([k for k, _ in params], axis=1),
                                      jnp.concatenate([bias for _, bias in params]), self.dtype), "qkv")
        qkv_cls, qkv_grid = qkv[:, 0], qkv[:, 1:].reshape(b, *grid, qkv.shape[-1])
        outs = [a.attend_projected(c, g, key_is_pad, deterministic=deterministic)
                for a, c, g in zip(attentions, jnp.split(qkv_cls, p, axis=-1), jnp.split(qkv_grid, p, axis=-1))]
        att = jnp.concatenate([jnp.concatenate([o[0] for o in outs], axis=-1)[:, None],
                               jnp.concatenate([o[1] for o in outs], axis=-1).reshape(b, -1, self.attention_dim)],
                              axis=1)
        out = dense(self.hidden_dim, ("heads", "embed"), name="out", dtype=self.dtype, std=self.out_init_std)
        new = Dropout(self.dropout)(out(checkpoint_name(att, "attention")), deterministic=deterministic) + seq
        if not self.pre_ln:
            new = ln(new)
        return checkpoint_name(new, "block_out")
