"""Heads on top of the backbone (the released `vimpac/modeling.py`): MLM, contrastive projection, classifier."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vimpac_jax.models.common import Dropout, dense, gelu, layer_norm

# Bias of the vocabulary's padding columns (`MLMHead(vocab_multiple > 1)`): exp() of it is 0 in
# float32, so a softmax over the padded row equals the softmax over the real columns.
PAD_LOGIT = -1e30


@jax.custom_vjp
def tied_logits(hiddens, table):
    """hiddens [..., D] @ table [V, D]^T -> [..., V] in at least float32 (the accumulation).

    Same as the einsum with preferred_element_type=float32, except the backward: autodiff would
    multiply the float32 output gradient with the bfloat16 operands, i.e. two float32 GEMMs;
    here the gradient is cast to the compute dtype first, so both backward GEMMs run in the
    compute dtype with float32 accumulation (what torch autocast does). In float32 the two are
    the same."""
    return jnp.einsum("...d,vd->...v", hiddens, table, preferred_element_type=_accumulation(hiddens))


def _accumulation(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _tied_logits_fwd(hiddens, table):
    return tied_logits(hiddens, table), (hiddens, table)


def _tied_logits_bwd(res, g):
    hiddens, table = res
    g = g.astype(hiddens.dtype)
    acc = _accumulation(hiddens)
    d_hiddens = jnp.einsum("...v,vd->...d", g, table, preferred_element_type=acc)
    d_table = jnp.einsum("...v,...d->vd", g, hiddens, preferred_element_type=acc)
    return d_hiddens.astype(hiddens.dtype), d_table.astype(table.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class MLMHead(nn.Module):
    """Dense(d -> d) -> GELU -> LayerNorm -> logits over the vocabulary, tied to the embedding.

    `__call__(hiddens [..., D], embedding [V, D]) -> logits [..., V]`. Call it on the hiddens of
    the positions to score only (e.g. the masked ones), so that logits for the rest of the clip
    are never materialised. Logits are float32 whatever the compute dtype, because the
    log-softmax over 8197 classes is unstable in bfloat16.

    `scored_codes` (default: all V) scores only the first ids, [..., scored_codes]: with a
    tokenizer of C << 8192 codes, the released head spends most of its FLOPs on ids that are
    never a target (the softmax then normalises over the C codes only). Parameters keep V rows.

    `vocab_multiple` (a call argument, default 1) pads the vocabulary at compute time to a
    multiple of it (8197 -> 8256 for 64): zero rows of the table and PAD_LOGIT biases, so the
    logits [..., padded] give the same softmax, loss and argmax as the unpadded ones while the
    GEMMs see an aligned operand. The parameters are not padded.
    """

    hidden_dim: int
    vocab_size: int
    dtype: jnp.dtype = jnp.float32
    scored_codes: Optional[int] = None

    @nn.compact
    def __call__(self, hiddens, embedding, vocab_multiple: int = 1):
        h = dense(self.hidden_dim, ("embed", "embed_out"), name="dense", dtype=self.dtype)(hiddens)
        h = layer_norm(name="ln", dtype=self.dtype)(gelu(h))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                          (self.vocab_size,))
        scored = self.vocab_size if self.scored_codes is None else self.scored_codes
        table, bias = embedding[:scored].astype(self.dtype), bias[:scored]
        pad = -scored % max(int(vocab_multiple), 1)
        if pad:
            table = jnp.pad(table, ((0, pad), (0, 0)))
            bias = jnp.concatenate([bias, jnp.full((pad,), PAD_LOGIT, bias.dtype)])
        return tied_logits(h.astype(self.dtype), table) + bias


class ProjectionHead(nn.Module):
    """SimCLR projection on [CLS]: (Linear -> BatchNorm -> ReLU) x (n - 1) -> Linear(no bias).

    `__call__(cls [B, D], train) -> [B, out_dim]`. BatchNorm uses batch statistics in training.
    Under `jax.jit` with the batch sharded over devices the batch mean is a global reduction, so
    the statistics are those of the global batch (the released code's SyncBatchNorm) with no
    axis_name. Running statistics use flax's update (biased variance; torch keeps the unbiased
    one), which only affects eval-mode projections.
    """

    num_layers: int = 2
    hidden_dim: int = 2048
    out_dim: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        for i in range(self.num_layers - 1):
            x = dense(self.hidden_dim, ("embed", "proj"), name=f"linear_{i}", dtype=self.dtype)(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.promote_types(self.dtype, jnp.float32),
                use_fast_variance=False,  # E[x²]-E[x]² loses precision the parity tests catch
                scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("proj",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("proj",)),
                name=f"bn_{i}")(x)
            x = nn.relu(x).astype(self.dtype)
        in_axis = "proj" if self.num_layers > 1 else "embed"
        return dense(self.out_dim, (in_axis, "proj_out"), name=f"linear_{self.num_layers - 1}",
                     dtype=self.dtype, use_bias=False)(x)


class ClassifierHead(nn.Module):
    """Dropout(last_dropout) -> Linear(d -> classes), zero-initialised as in the released code."""

    num_classes: int
    last_dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, cls: jax.Array, *, deterministic: bool):
        cls = Dropout(self.last_dropout)(cls, deterministic=deterministic)
        logits = dense(self.num_classes, ("embed", "classes"), name="dense", dtype=self.dtype,
                       zero_init=True)(cls)
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))
