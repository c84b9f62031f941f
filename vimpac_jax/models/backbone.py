"""The VIMPAC video transformer (the released `vimpac/modeling.py`: `TransformerLayout`).

Input: int token clips [B, T, H, W]; output: [CLS] [B, D] and hiddens [B, T, H, W, D].
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vimpac_jax.constants import PAD_ID, VOCAB_SIZE
from vimpac_jax.models.attention import AttentionBlock
from vimpac_jax.models.common import INIT_STD, Dropout, dense, gelu, layer_norm, normal_init
from vimpac_jax.models.layout import parse_layout

POS_EMB_KINDS = ("default", "temporal_separation", "hw_separation")
EMBED_LOOKUPS = ("float32", "compute_dtype")


class PositionalEmbedding(nn.Module):
    """Learned positions; returns cls_pos [D] and grid_pos [T, H, W, D].

    `default`: one row per position (1 + T·H·W rows); `temporal_separation`: pos_T(t) +
    pos_S(i·W + j); `hw_separation`: pos_T(t) + pos_H(i) + pos_W(j). The factor tables are
    initialised with std 0.02/√(number of factors), as in the released code.
    """

    kind: str
    clip_len: int
    height: int
    width: int
    hidden_dim: int

    @nn.compact
    def __call__(self):
        t, h, w, d = self.clip_len, self.height, self.width, self.hidden_dim
        axes = ("pos", "embed")
        if self.kind == "default":
            table = self.param("table", normal_init(INIT_STD, axes), (1 + t * h * w, d))
            return table[0], table[1:].reshape(t, h, w, d)
        cls = self.param("cls", normal_init(INIT_STD, axes), (1, d))[0]
        if self.kind == "temporal_separation":
            std = INIT_STD / math.sqrt(2)
            temporal = self.param("temporal", normal_init(std, axes), (t, d))
            spatial = self.param("spatial", normal_init(std, axes), (h * w, d))
            return cls, temporal[:, None, None] + spatial.reshape(1, h, w, d)
        if self.kind == "hw_separation":
            std = INIT_STD / math.sqrt(3)
            temporal = self.param("temporal", normal_init(std, axes), (t, d))
            height = self.param("height", normal_init(std, axes), (h, d))
            width = self.param("width", normal_init(std, axes), (w, d))
            return cls, temporal[:, None, None] + height[None, :, None] + width[None, None, :]
        raise ValueError(f"pos_emb must be one of {POS_EMB_KINDS}, got {self.kind!r}")


class Mlp(nn.Module):
    """Dense(d -> m) -> exact GELU -> Dense(m -> d) -> Dropout."""

    hidden_dim: int
    mlp_dim: int
    dropout: float = 0.0
    out_init_std: float = INIT_STD
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        y = checkpoint_name(dense(self.mlp_dim, ("embed", "mlp"), name="fc", dtype=self.dtype)(x), "mlp_hidden")
        proj = dense(self.hidden_dim, ("mlp", "embed"), name="proj", dtype=self.dtype, std=self.out_init_std)
        # GELU and proj recomputed together: the backward keeps the GELU input [.., m] only, not
        # also its output (proj's input); the recomputed proj matmul is dead code and dropped.
        y = nn.remat(lambda proj, y: proj(gelu(y)))(proj, y)
        return Dropout(self.dropout)(y, deterministic=deterministic)


class TransformerLayer(nn.Module):
    """The attention blocks of a layout, then the MLP block; [CLS] and tokens share weights."""

    blocks: tuple
    hidden_dim: int
    num_heads: int
    attention_dim: int
    mlp_dim: int
    pre_ln: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    out_init_std: float = INIT_STD
    dtype: jnp.dtype = jnp.float32
    implementation: Optional[str] = None
    attention_kernel: str = "xla"

    @nn.compact
    def __call__(self, seq, key_is_pad, deterministic: bool):
        """seq [B, 1 + T*H*W, D] ([CLS] first), key_is_pad [B, T, H, W] -> [B, 1 + T*H*W, D]."""
        for i, attentions in enumerate(self.blocks):
            seq = AttentionBlock(
                attentions, self.hidden_dim, self.num_heads, self.attention_dim, self.pre_ln,
                self.dropout, self.attention_dropout, self.out_init_std, self.dtype,
                self.implementation, self.attention_kernel, name=f"attn_{i}",
            )(seq, key_is_pad, deterministic=deterministic)
        mlp = Mlp(self.hidden_dim, self.mlp_dim, self.dropout, self.out_init_std, self.dtype, name="mlp")
        ln = layer_norm(name="ln", dtype=self.dtype)
        if self.pre_ln:
            return seq + mlp(ln(seq), deterministic=deterministic)
        return ln(seq + mlp(seq, deterministic=deterministic))


# Activations a `save:` remat policy can keep (checkpoint_name in attention.py and Mlp).
SAVEABLE_NAMES = ("qkv", "attention", "block_out", "mlp_hidden")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save:<names>")


def remat_policy(spec):
    """`model.remat` -> (recompute?, jax checkpoint policy). `none`: keep what autodiff keeps;
    `full`: keep each layer's input only; `dots`: keep every matmul output; `dots_no_batch`: keep
    the matmuls without batch dimensions (the projections and MLP, not the attention scores);
    `save:qkv,attention,...`: keep the named activations (SAVEABLE_NAMES) only."""
    if not isinstance(spec, str):
        raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {spec!r}")
    if spec == "none":
        return False, None
    if spec == "full":
        return True, None
    if spec == "dots":
        return True, jax.checkpoint_policies.checkpoint_dots
    if spec == "dots_no_batch":
        return True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if spec.startswith("save:"):
        names = tuple(n.strip() for n in spec[len("save:"):].split(",") if n.strip())
        bad = [n for n in names if n not in SAVEABLE_NAMES]
        if not names or bad:
            raise ValueError(f"model.remat {spec!r}: names must be a comma list of {SAVEABLE_NAMES}, got {bad or 'none'}")
        return True, jax.checkpoint_policies.save_only_these_names(*names)
    raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {spec!r}")


class VideoTransformer(nn.Module):
    """VIMPAC backbone. `__call__(tokens [B, T, H, W] int) -> (cls [B, D], hiddens [B, T, H, W, D])`.

    Fields follow the released `args`: `layout` is any string of the grammar in
    `vimpac_jax.models.layout` (`T,H|W`, `T,H,W`, `TxHxW`, `T,HxW`, ...); `num_heads` defaults to
    hidden_dim // 64 as in every released config; `halve_att` gives attention dim d/2 and
    `halve_mlp` an MLP of 2d instead of 4d. `remat` is a `remat_policy` spec: what each layer
    keeps for the backward pass.
    `scan_layers`: run the layers as one `jax.lax.scan` over their stacked parameters (one layer
    body in the compiled program instead of `num_layers` copies: compile time), with the same
    per-layer parameters `layer_0 ... layer_{L-1}` (checkpoints, import/export unchanged) and
    the same values; dropout keys are the step's key folded with the layer index, so the
    dropout bits differ from the unrolled loop's (same distribution).
    `attention_kernel`: "xla" (the attention as XLA ops, `attention._line_attention`) or
    "pallas" (the same as Pallas TPU kernels, `line_attention_kernel`; interpreted on CPU).
    `embed_lookup`: "float32" takes the rows from the float32 table and casts them to `dtype`,
    so the table's gradient is a float32 scatter-add; "compute_dtype" casts the table first
    (its gradient is then a scatter-add in `dtype`: bfloat16 atomics, which serialise on the
    ~15% of rows that are MASK_ID: openxla/xla#26371). The same values either way.
    """

    num_layers: int
    hidden_dim: int
    clip_len: int
    height: int
    width: int
    layout: str = "T,H|W"
    num_heads: Optional[int] = None
    pos_emb: str = "hw_separation"
    pre_ln: bool = False
    halve_att: bool = False
    halve_mlp: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    vocab_size: int = VOCAB_SIZE
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    attention_impl: Optional[str] = None
    attention_kernel: str = "xla"
    embed_lookup: str = "float32"
    scan_layers: bool = False

    def setup(self):
        d = self.hidden_dim
        blocks = parse_layout(self.layout)
        heads = self.num_heads or d // 64
        if self.embed_lookup not in EMBED_LOOKUPS:
            raise ValueError(f"model.embed_lookup must be one of {EMBED_LOOKUPS}, got {self.embed_lookup!r}")
        lookup_dtype = self.dtype if self.embed_lookup == "compute_dtype" else jnp.promote_types(self.dtype, jnp.float32)
        self.token_embed = nn.Embed(
            self.vocab_size, d, dtype=lookup_dtype, param_dtype=jnp.float32,
            embedding_init=normal_init(INIT_STD, ("vocab", "embed")), name="token_embed")
        self.cls_token = self.param("cls_token", normal_init(INIT_STD, ("embed",)), (d,))
        self.pos_embed = PositionalEmbedding(self.pos_emb, self.clip_len, self.height, self.width, d)
        # Pre-LN re-initialises every residual output with std 0.02/sqrt(number of branches).
        out_std = INIT_STD
        if self.pre_ln:
            out_std = INIT_STD / math.sqrt(self.num_layers * (len(blocks) + 1))
        recompute, policy = remat_policy(self.remat)
        layer_cls = TransformerLayer
        if recompute:
            layer_cls = nn.remat(TransformerLayer, static_argnums=(3,), policy=policy)
        layer_args = (blocks, d, heads, d // 2 if self.halve_att else d, 2 * d if self.halve_mlp else 4 * d,
                      self.pre_ln, self.dropout, self.attention_dropout, out_std, self.dtype,
                      self.attention_impl, self.attention_kernel)
        self.layers = [layer_cls(*layer_args, name=f"layer_{i}") for i in range(self.num_layers)]
        self._layer_args = layer_args
        # Post-LN normalises the input; pre-LN normalises the output (names as the released code).
        if self.pre_ln:
            self.ln_post = layer_norm(name="ln_post", dtype=self.dtype)
        else:
            self.ln_pre = layer_norm(name="ln_pre", dtype=self.dtype)
        self.drop = Dropout(self.dropout)

    def embedding_table(self) -> jax.Array:
        """The token embedding [V, D], shared with the MLM output layer."""
        return self.token_embed.embedding

    def __call__(self, tokens, *, deterministic: bool = True):
        expected = (self.clip_len, self.height, self.width)
        if tokens.ndim != 4 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"tokens must be [B, T, H, W] with (T, H, W) = {expected}, got shape {tokens.shape}")
        key_is_pad = tokens == PAD_ID
        b, d = tokens.shape[0], self.hidden_dim
        x = self.token_embed(tokens).astype(self.dtype)
        cls_pos, grid_pos = self.pos_embed()
        cls = self.cls_token.astype(self.dtype) + cls_pos.astype(self.dtype)
        x = x + grid_pos.astype(self.dtype)
        # [CLS] rides as row 0 of the token sequence: every dense, LayerNorm and dropout of the
        # layers runs once on both (attention.py says how it joins the lines).
        seq = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x.reshape(b, -1, d)], axis=1)
        if not self.pre_ln:
            seq = self.ln_pre(seq)
        seq = self.drop(seq, deterministic=deterministic)
        if self.scan_layers and not self.is_initializing():
            seq = self._scan_layers(seq, key_is_pad, deterministic)
        else:
            for layer in self.layers:
                seq = layer(seq, key_is_pad, deterministic)
        if self.pre_ln:
            seq = self.ln_post(seq)
        return seq[:, 0], seq[:, 1:].reshape(*tokens.shape, d)

    def _scan_layers(self, seq, key_is_pad, deterministic):
        """The layers as one `lax.scan` over [L, ...]-stacked copies of `layer_i`'s parameters.

        The parameters stay one tree per layer (as the unrolled loop creates them at init); the
        stack is built here, so its gradient flows back to each `layer_i`. seq [B, N, D] ->
        [B, N, D]."""
        params = [layer.variables["params"] for layer in self.layers]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
        base_key = None if deterministic else self.make_rng("dropout")
        # An unbound copy of the layer: its `apply` is the scanned body.
        body_module = TransformerLayer(*self._layer_args, parent=None)

        def body(seq, xs):
            p, index = xs
            rngs = {} if base_key is None else {"dropout": jax.random.fold_in(base_key, index)}
            return body_module.apply({"params": p}, seq, key_is_pad, deterministic, rngs=rngs), None

        recompute, policy = remat_policy(self.remat)
        if recompute:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        seq, _ = jax.lax.scan(body, seq, (stacked, jnp.arange(self.num_layers)))
        return seq
