"""Training the VQ tokenizer (`vimpac_jax.tokenizer.vq`): EMA codebook, commitment loss,
dead-code restarts, the optimizer and the jitted step (its task: `vimpac_jax/tasks/tokenizer.py`).

The recipe is described in `vq`'s docstring. All codebook updates are pure jnp functions
(`ema_update`, `restart_dead_codes`) called inside `train_step`; under `jax.jit` with a batch
sharded over devices the counts and sums are global-batch sums (XLA inserts the reductions), so
data-parallel training needs no extra code and no host round-trips.

Initialisation: cluster_size = 1 and embed_sum = codebook, i.e. each code starts as if it had
seen one vector equal to itself. Unused codes then decay below a threshold ≥ 1 at the first
step and are restarted from data (a data-dependent initialisation for free).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import struct

from vimpac_jax.tokenizer.vq import VQTokenizer, init_variables, make_model, to_model_range, to_pixels, tokenizer_params
from vimpac_jax.training import optimizer as optimizer_lib


# ---------------------------------------------------------------------------------------------
# Codebook statistics: pure functions on the 'vq_stats' entries of the quantiser
# ({'codebook' [K, D], 'cluster_size' [K], 'embed_sum' [K, D]}).


def code_counts(tokens, codebook_size: int):
    """Tokens [...] int -> how many times each code occurs [K] float32."""
    return jnp.bincount(tokens.reshape(-1), length=codebook_size).astype(jnp.float32)


def ema_update(stats: Mapping, z_flat, tokens_flat, decay: float, epsilon: float) -> dict:
    """One EMA step of the codebook from a batch: z_flat [M, D], tokens_flat [M] -> new stats.

    cluster_size ← decay·cluster_size + (1 − decay)·counts
    embed_sum    ← decay·embed_sum    + (1 − decay)·(sum of the z assigned to each code)
    codebook     = embed_sum / smoothed cluster_size, where the Laplace-smoothed size is
                   (cluster_size + ε) / (n + K·ε) · n, n = Σ cluster_size (same total mass, no
                   division by ~0 for an unused code).
    An unused code keeps its value while its count is ≫ ε; once its count decays to ~ε the
    smoothing shrinks it toward 0 (restarts, with threshold ≫ ε, replace it long before).
    z_flat is treated as a constant (no gradient flows through the statistics).
    """
    z_flat = jax.lax.stop_gradient(z_flat).astype(jnp.float32)
    k = stats["cluster_size"].shape[0]
    counts = code_counts(tokens_flat, k)
    # segment_sum, not one_hot(...).T @ z: a one-hot [M, K] is GiBs at K=8192, M=65k.
    sums = jax.ops.segment_sum(z_flat, tokens_flat.reshape(-1), num_segments=k)
    cluster_size = decay * stats["cluster_size"] + (1.0 - decay) * counts
    embed_sum = decay * stats["embed_sum"] + (1.0 - decay) * sums
    n = jnp.sum(cluster_size)
    smoothed = (cluster_size + epsilon) / (n + k * epsilon) * n
    return dict(stats, cluster_size=cluster_size, embed_sum=embed_sum,
                codebook=embed_sum / smoothed[:, None])


def restart_dead_codes(stats: Mapping, z_flat, key, threshold: float) -> tuple[dict, jax.Array]:
    """Re-initialise codes whose EMA count is below `threshold` from random rows of z_flat.

    z_flat [M, D] (this batch's encoder outputs); each dead code gets a different row when
    M ≥ K. A restarted code's state becomes count = threshold, sum = threshold·vector (see the
    module docstring). threshold ≤ 0 disables restarts. Returns (stats, number restarted).
    """
    z_flat = jax.lax.stop_gradient(z_flat).astype(jnp.float32)
    k = stats["cluster_size"].shape[0]
    m = z_flat.shape[0]
    dead = stats["cluster_size"] < threshold
    rows = jax.random.choice(key, m, (k,), replace=m < k)
    fresh = z_flat[rows]
    new = dict(stats)
    new["codebook"] = jnp.where(dead[:, None], fresh, stats["codebook"])
    new["embed_sum"] = jnp.where(dead[:, None], threshold * fresh, stats["embed_sum"])
    new["cluster_size"] = jnp.where(dead, jnp.asarray(threshold, jnp.float32), stats["cluster_size"])
    return new, jnp.sum(dead.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# Losses and metrics


def mean_frame_mse(images01) -> jax.Array:
    """MSE of predicting every image [N, H, W, C] by the batch's mean image (a trivial baseline
    a useful tokenizer must beat by far)."""
    x = jnp.asarray(images01, jnp.float32)
    return jnp.mean((x - jnp.mean(x, axis=0, keepdims=True)) ** 2)


def vq_loss_and_metrics(outputs: Mapping, images01, beta: float, codebook_size: int):
    """The training loss and metrics of one batch -> (loss scalar, metrics dict of scalars).

    outputs: `VQTokenizer.__call__`'s dict (z_e, z_q, tokens, recon on the [-1, 1] scale).
    loss = mean squared error on the [-1, 1] scale + beta · commitment loss, where
    commitment = mean((z_e − sg(z_q))²). Metrics (pixels on the [0, 1] scale):
      recon_mse, psnr (mean over images of 10·log10(1 / per-image MSE)), commitment, loss,
      perplexity (exp entropy of the batch's code histogram: the effective number of codes),
      codes_used (fraction of the K codes that occur in the batch).
    """
    target = to_model_range(images01)
    sq = (outputs["recon"] - target) ** 2
    commitment = jnp.mean((outputs["z_e"] - jax.lax.stop_gradient(outputs["z_q"])) ** 2)
    loss = jnp.mean(sq) + beta * commitment
    # On [0, 1] pixels the error is a quarter of that on [-1, 1]; clip like vq_decode does.
    pix_sq = (to_pixels(outputs["recon"]) - images01.astype(jnp.float32)) ** 2
    per_image = jnp.mean(pix_sq, axis=tuple(range(1, pix_sq.ndim)))
    counts = code_counts(outputs["tokens"], codebook_size)
    p = counts / jnp.sum(counts)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    metrics = dict(
        loss=loss,
        recon_mse=jnp.mean(per_image),
        psnr=jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(per_image, 1e-10))),
        commitment=commitment,
        perplexity=jnp.exp(entropy),
        codes_used=jnp.mean((counts > 0).astype(jnp.float32)),
    )
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Training state and step


@dataclasses.dataclass(frozen=True)
class VQHParams:
    """Hyper-parameters of `train_step` (static: part of the jit cache key)."""

    beta: float = 0.25
    ema_decay: float = 0.99
    epsilon: float = 1e-5
    restart_threshold: float = 1.0


@struct.dataclass
class VQTrainState:
    """What a training run checkpoints (step, params, vq_stats, opt_state) plus the static
    model, optimizer, learning-rate schedule and hyper-parameters (not pytree leaves)."""

    step: jax.Array
    params: Any
    vq_stats: Any
    opt_state: Any
    model: VQTokenizer = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    schedule: Any = struct.field(pytree_node=False)
    hparams: VQHParams = struct.field(pytree_node=False)

    def tokenizer_params(self) -> dict:
        return tokenizer_params(self.params, self.vq_stats)


def make_schedule(optim: Mapping, num_steps: int):
    """Linear warm-up to `optim.learning_rate` over `optim.warmup` updates (< 1: a fraction of
    the run, as the other tasks' optim block reads it), then cosine decay to 0 at `num_steps`."""
    lr, total = float(optim["learning_rate"]), int(num_steps)
    warmup = optimizer_lib.warmup_steps(dict(warmup=optim["warmup"], total_steps=total))
    if total <= 0 or lr <= 0 or not 0 <= warmup <= total:
        raise ValueError(f"need optim.learning_rate > 0, train.num_steps > 0 and 0 <= optim.warmup <= train.num_steps, "
                         f"got learning_rate={lr}, num_steps={total}, warmup={warmup} updates")
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(total, warmup + 1), 0.0)


def make_optimizer(optim: Mapping, schedule) -> optax.GradientTransformation:
    """Adam (`optim.b1`, `optim.b2`; 0.99 is common for VQ-VAEs) after global-norm clipping
    (`optim.clip_grad_norm` ≤ 0: none).

    With `flatten_optimizer` (default) the optimizer runs on all parameters raveled into one
    vector (`optax.flatten`): the ~100 small convolution tensors then cost a handful of ops
    instead of hundreds, which compiles several times faster (on CPU: seconds per compile).
    That suits data-parallel training with replicated parameters, the only sharding the
    tokenizer needs; turn it off to shard parameters.
    """
    clip = float(optim["clip_grad_norm"])
    tx = optax.adam(schedule, b1=float(optim["b1"]), b2=float(optim["b2"]))
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return optax.flatten(tx) if optim["flatten_optimizer"] else tx


def init_state(model_config: Mapping, optim: Mapping, objective: Mapping, num_steps: int, key) -> VQTrainState:
    """A fresh training state from the tokenizer task's blocks (configs/tokenizer.py): `model`
    (the tokenizer; may carry `dtype`, the convolutions' compute type, 'float32' default),
    `optim` (Adam and its schedule), `tokenizer` (the VQ objective) and `train.num_steps`.
    """
    dtype = model_config["dtype"]
    model = make_model(model_config, dtype)
    hp = VQHParams(beta=float(objective["commitment_beta"]), ema_decay=float(objective["ema_decay"]),
                   epsilon=float(objective["epsilon"]), restart_threshold=float(objective["restart_threshold"]))
    if not 0.0 <= hp.ema_decay < 1.0:
        raise ValueError(f"tokenizer.ema_decay must be in [0, 1), got {hp.ema_decay}")
    schedule = make_schedule(optim, num_steps)
    tx = make_optimizer(optim, schedule)
    variables = init_variables(model_config, key, dtype)
    params, vq_stats = variables["params"], variables["vq_stats"]
    return VQTrainState(step=jnp.zeros((), jnp.int32), params=params, vq_stats=vq_stats,
                        opt_state=jax.jit(tx.init)(params), model=model, tx=tx, schedule=schedule,
                        hparams=hp)


def train_step(state: VQTrainState, images01, key) -> tuple[VQTrainState, dict]:
    """One optimisation step on images [B, H, W, C] -> (new state, metrics).

    images01: float in [0, 1], or uint8 0..255 (`vq_data.frame_dataset`'s batches; scaled on
    the device, so a quarter of the bytes cross from the host).

    Gradient step (Adam) on the encoder/decoder; then the EMA codebook update and dead-code
    restarts (with `key`) from this batch's encoder outputs. Pure: jit it (donate the state).
    Metrics: those of `vq_loss_and_metrics` plus restarted (codes restarted this step),
    codes_alive (fraction with EMA count ≥ threshold before restarts), learning_rate.
    """
    hp = state.hparams
    k = state.model.codebook_size
    if jnp.issubdtype(images01.dtype, jnp.integer):
        images01 = images01.astype(jnp.float32) / 255.0

    def loss_fn(params):
        out = state.model.apply({"params": params, "vq_stats": state.vq_stats}, images01)
        loss, metrics = vq_loss_and_metrics(out, images01, hp.beta, k)
        return loss, (metrics, out["z_e"], out["tokens"])

    (_, (metrics, z_e, tokens)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    z_flat = z_e.reshape(-1, z_e.shape[-1])
    stats = ema_update(state.vq_stats["quantizer"], z_flat, tokens.reshape(-1), hp.ema_decay, hp.epsilon)
    alive = jnp.mean((stats["cluster_size"] >= hp.restart_threshold).astype(jnp.float32))
    stats, restarted = restart_dead_codes(stats, z_flat, key, hp.restart_threshold)
    metrics = dict(metrics, restarted=restarted, codes_alive=alive,
                   learning_rate=jnp.asarray(state.schedule(state.step), jnp.float32))
    new_state = state.replace(step=state.step + 1, params=params,
                              vq_stats={**state.vq_stats, "quantizer": stats}, opt_state=opt_state)
    return new_state, metrics
