"""Axial attention with a [CLS] token copied into every line (the released `vimpac/modeling.py`).

For an attention over axes A (e.g. `T`, or `HxW`), the video grid is cut into lines: the
tokens that share their position on every other axis. Each line attends within itself, with a
copy of [CLS] prepended (line length 1 + |A|). The new [CLS] is the mean of its copies' outputs
over all lines, as in TimeSformer and the released code. PAD tokens are excluded as keys.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vimpac_jax.models.common import dense, layer_norm
from vimpac_jax.models.layout import AXES


def _to_lines(x: jax.Array, axes: tuple[str, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    """[B, T, H, W, ...] -> [B, N, L, ...] with the line axes last; also the permutation used."""
    line_dims = [1 + AXES.index(a) for a in axes]
    other_dims = [d for d in (1, 2, 3) if d not in line_dims]
    perm = (0, *other_dims, *line_dims, *range(4, x.ndim))
    xt = jnp.transpose(x, perm)
    b = xt.shape[0]
    n = 1
    for d in other_dims:
        n *= x.shape[d]
    return xt.reshape(b, n, -1, *x.shape[4:]), perm


def _from_lines(y: jax.Array, perm: tuple[int, ...], grid_shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `_to_lines`: [B, N, L, ...] -> [B, T, H, W, ...]."""
    permuted_shape = tuple(grid_shape[p] for p in perm[:4])
    y = y.reshape(*permuted_shape, *y.shape[3:])
    inverse = [0] * 4
    for i, p in enumerate(perm[:4]):
        inverse[p] = i
    return jnp.transpose(y, (*inverse, *range(4, y.ndim)))


def attend(q, k, v, key_is_pad, *, dropout_rate: float, deterministic: bool,
           dropout_rng: Optional[jax.Array], implementation: Optional[str]):
    """Multi-head attention over [B', S, heads, head_dim]; `key_is_pad` [B', S] excludes keys.

    With attention dropout active we need the probabilities, so the einsum path runs; otherwise
    `jax.nn.dot_product_attention` picks a fused kernel where the backend has one.
    """
    # float64 (numerics checks) takes the einsum path: jax.nn.dot_product_attention computes its
    # scores in float32 whatever the input dtype.
    if (deterministic or dropout_rate == 0.0) and q.dtype != jnp.float64:
        mask = None if key_is_pad is None else ~key_is_pad[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    scale = q.shape[-1] ** -0.5
    # The dot's output in the compute dtype (f32 accumulation inside), then the softmax in f32
    # (float64 under a float64 run): so the backward's dq, dk dots take compute-dtype operands,
    # not f32 x f32. Unchanged in f32.
    score_dtype = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(score_dtype) * scale
    if key_is_pad is not None:
        scores = jnp.where(key_is_pad[:, None, None, :], jnp.finfo(score_dtype).min, scores)
    probs = jax.nn.softmax(scores, axis=-1)
    if not (deterministic or dropout_rate == 0.0):
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    probs = probs.astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class AxialAttention(nn.Module):
    """Self-attention within the lines of `axes`, with [CLS] in every line.

    Inputs: cls [B, D], x [B, T, H, W, D], key_is_pad [B, T, H, W] bool or None.
    Outputs: cls [B, F], x [B, T, H, W, F] with F = num_heads * head_dim (before the output dense).
    """

    axes: tuple[str, ...]
    num_heads: int
    head_dim: int
    attention_dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, cls, x, key_is_pad, *, deterministic: bool):
        features = self.num_heads * self.head_dim
        projections = [dense(features, ("embed", "heads"), name=n, dtype=self.dtype)
                       for n in ("query", "key", "value")]
        b = x.shape[0]
        lines, perm = _to_lines(x, self.axes)  # [B, N, L, D]
        n, length = lines.shape[1], lines.shape[2]

        def heads(y):
            return y.reshape(*y.shape[:-1], self.num_heads, self.head_dim)

        # Prepend the [CLS] projection to every line: [B, N, 1 + L, heads, head_dim].
        qkv = []
        for proj in projections:
            tok = heads(checkpoint_name(proj(lines), "qkv"))
            c = heads(proj(cls))[:, None, None]
            qkv.append(jnp.concatenate([jnp.broadcast_to(c, (b, n, 1, *c.shape[3:])), tok], axis=2))
        q, k, v = (t.reshape(b * n, 1 + length, self.num_heads, self.head_dim) for t in qkv)

        pad = None
        if key_is_pad is not None:
            pad_lines, _ = _to_lines(key_is_pad, self.axes)  # [B, N, L]
            pad = jnp.concatenate([jnp.zeros((b, n, 1), bool), pad_lines], axis=2).reshape(b * n, 1 + length)

        rng = None if deterministic or self.attention_dropout == 0.0 else self.make_rng("dropout")
        out = attend(q, k, v, pad, dropout_rate=self.attention_dropout, deterministic=deterministic,
                     dropout_rng=rng, implementation=self.implementation)
        out = out.reshape(b, n, 1 + length, features)
        cls_out = out[:, :, 0].mean(axis=1)  # the mean of the [CLS] copies over all lines
        x_out = _from_lines(out[:, :, 1:], perm, x.shape[:4])
        return cls_out, x_out


class AttentionBlock(nn.Module):
    """One block of a layer: parallel axial attentions, concatenated, then the output dense.

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
    def __call__(self, cls, x, key_is_pad, *, deterministic: bool):
        p = len(self.attentions)
        if self.attention_dim % p or self.num_heads % p:
            raise ValueError(f"{p} parallel attentions need attention dim {self.attention_dim} and "
                             f"{self.num_heads} heads divisible by {p}")
        heads = self.num_heads // p
        head_dim = self.attention_dim // self.num_heads
        ln = layer_norm(name="ln", dtype=self.dtype)
        if self.pre_ln:
            cls, x = ln(cls), ln(x)
        outs = [
            AxialAttention(axes, heads, head_dim, self.attention_dropout, self.dtype,
                           self.implementation, name=f"axis_{i}")(cls, x, key_is_pad, deterministic=deterministic)
            for i, axes in enumerate(self.attentions)
        ]
        att_cls = jnp.concatenate([o[0] for o in outs], axis=-1)
        att_x = checkpoint_name(jnp.concatenate([o[1] for o in outs], axis=-1), "attention")
        out = dense(self.hidden_dim, ("heads", "embed"), name="out", dtype=self.dtype, std=self.out_init_std)
        drop = nn.Dropout(self.dropout)
        new_cls = drop(out(att_cls), deterministic=deterministic) + cls
        new_x = drop(out(att_x), deterministic=deterministic) + x
        if not self.pre_ln:
            new_cls, new_x = ln(new_cls), ln(new_x)
        return new_cls, checkpoint_name(new_x, "block_out")
