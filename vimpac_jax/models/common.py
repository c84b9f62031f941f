"""Initialisers and layer factories that carry logical axis names.

Every parameter is created through these helpers so that its logical axes ('embed', 'mlp',
'heads', 'vocab', ...) are declared next to it; `vimpac_jax.training.sharding` maps the names to
mesh axes in one place, and the model code never mentions the mesh.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

INIT_STD = 0.02  # BERT's initializer_range, used by the released code for every weight
LN_EPS = 1e-12


def normal_init(std: float, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def dense(features: int, axes: tuple, *, name: str, dtype=jnp.float32, use_bias: bool = True,
          std: float = INIT_STD, zero_init: bool = False) -> nn.Dense:
    """A Linear layer with N(0, std) (or zero) kernel and zero bias; `axes` = (in, out) names."""
    kernel_init = nn.initializers.zeros_init() if zero_init else nn.initializers.normal(stddev=std)
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


# LayerNorm and GELU are recomputed in the backward pass from their (bf16) inputs instead of
# keeping their float32 intermediates (centred input, statistics, erf terms): per LayerNorm that
# is one bf16 tensor saved instead of several float32 ones (benchmarks/RESULTS.md, layer memory).
# The forward computation is unchanged, so float32 results are too.
_RecomputedLayerNorm = nn.remat(nn.LayerNorm)


def _layer_norm_forward(x, scale, bias, dtype):
    """flax's LayerNorm arithmetic (float32 statistics, its fast variance) -> (y [..., D] in
    `dtype`, 1/std [..., 1] float32)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.maximum(0.0, (xf * xf).mean(-1, keepdims=True) - mean * mean)
    rstd = jax.lax.rsqrt(var + LN_EPS)
    return ((xf - mean) * (rstd * scale) + bias).astype(dtype), rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _output_saving_layer_norm(x, scale, bias, dtype):
    return _layer_norm_forward(x, scale, bias, dtype)[0]


def _output_saving_layer_norm_fwd(x, scale, bias, dtype):
    y, rstd = _layer_norm_forward(x, scale, bias, dtype)
    return y, (y, scale, bias, rstd, jnp.zeros((), x.dtype))


def _output_saving_layer_norm_bwd(dtype, res, g):
    y, scale, bias, rstd, x_like = res
    g = g.astype(jnp.float32)
    centred_scaled = y.astype(jnp.float32) - bias  # = x_hat * scale
    x_hat = centred_scaled / scale
    g_hat = g * scale
    dx = rstd * (g_hat - g_hat.mean(-1, keepdims=True) - x_hat * (g * centred_scaled).mean(-1, keepdims=True))
    rows = tuple(range(g.ndim - 1))
    return dx.astype(x_like.dtype), (g * x_hat).sum(rows), g.sum(rows)


_output_saving_layer_norm.defvjp(_output_saving_layer_norm_fwd, _output_saving_layer_norm_bwd)


class OutputSavingLayerNorm(nn.Module):
    """flax's LayerNorm (same parameters, names and forward) whose backward is computed from its
    OUTPUT y and the float32 row statistics: x_hat = (y - bias) / scale (as apex's
    memory-efficient LayerNorm). The output is kept anyway as the next matmul's input, so the
    LayerNorm adds only [..., 1] float32 to the saved activations instead of its input. Used for
    narrow compute dtypes (bf16, f16), where y carries the precision the backward had from the
    recomputed input too; a scale entry of exactly 0 would make its feature's gradient undefined.
    Its epsilon is LN_EPS, the released LayerNorm's, as in the forward it shares."""

    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (d,),
                           jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (d,),
                          jnp.float32)
        return _output_saving_layer_norm(x, scale, bias, self.dtype)


def layer_norm(*, name: str, dtype=jnp.float32) -> nn.Module:
    """LayerNorm, eps 1e-12 as BERT and the released code; statistics in float32 (flax). In a
    compute dtype narrower than float32 the backward works from the output
    (`OutputSavingLayerNorm`); otherwise it recomputes from the input (see above)."""
    if jnp.dtype(dtype).itemsize < 4:
        return OutputSavingLayerNorm(dtype=dtype, name=name)
    return _RecomputedLayerNorm(
        epsilon=LN_EPS,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


@jax.checkpoint
def gelu(x):
    """The exact (erf) GELU of torch.nn.GELU, not the tanh approximation; keeps only x for the
    backward pass (see above)."""
    return nn.gelu(x, approximate=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def apply_dropout_mask(x, keep, keep_prob: float):
    """x [...] -> x / keep_prob where `keep` (bool, broadcastable to x), else 0.

    The backward keeps the boolean mask only (1 byte per element, as torch's dropout). Autodiff of
    the same `select` would also keep the broadcast zeros operand: a full tensor in the compute
    dtype per dropout site (saved-residual bytes in benchmarks/RESULTS.md)."""
    return jax.lax.select(jnp.broadcast_to(keep, x.shape), x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


def _apply_dropout_mask_fwd(x, keep, keep_prob):
    return apply_dropout_mask(x, keep, keep_prob), keep


def _apply_dropout_mask_bwd(keep_prob, keep, g):
    return apply_dropout_mask(g, keep, keep_prob), None


apply_dropout_mask.defvjp(_apply_dropout_mask_fwd, _apply_dropout_mask_bwd)


class Dropout(nn.Module):
    """`flax.linen.Dropout` with the same bits (same name, rng stream and `bernoulli` draw) and
    values, but a backward that keeps only the mask (`apply_dropout_mask`).

    `__call__(x [...], deterministic) -> [...]`."""

    rate: float

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        keep = jax.random.bernoulli(self.make_rng("dropout"), p=keep_prob, shape=x.shape)
        return apply_dropout_mask(x, keep, keep_prob)
