"""The VIMPAC pre-training step: one jitted pure function of (state, batch, key).

One update, for a batch of B videos with two clips each:
  1. block masking of all 2B clips with one key (`mask_batch`); a clip's mask depends only on
     the key and its place (video, view) in the batch, not on the mesh or on accumulation;
  2. the batch is cut into k = `micro_batches` micro-batches of B/k videos (micro-batch i holds
     videos i, i+k, i+2k, ...: with the batch split over devices along videos, every device
     keeps an equal share of every micro-batch, so no data moves);
  3. per micro-batch: backbone + heads on the 2n clips, rows ordered as the released trainer
     (all first views, then all second views), MLM logits only at the gathered masked
     positions, InfoNCE over the projections of the micro-batch's 2n clips on all devices.
     The masked positions (mlm_positions='micro_batch', the default) are packed per device's
     share of the micro-batch into one static bound M (`packed_masked_bound`: a quantile of
     their total, which concentrates: 216 slots per Small clip instead of 448 per-clip
     quantile slots), padded with distinct unscored positions, so the gather's gradient has
     no duplicate indices; the vocabulary of the MLM logits is padded to a multiple of 64;
  4. gradients summed over micro-batches in a `lax.scan`, then global-norm clipping + AdamW.

Loss of an update (what the gradient is the gradient of):
  total = mlm_weight * MLM + nce_weight * NCE
  MLM = (sum of the cross entropies at all scored positions of the UPDATE) / (their number)
  NCE = mean over the k micro-batches of `info_nce(micro-batch projections)`
So the MLM part of k accumulated micro-batches equals the MLM part of one batch of B videos
exactly, whatever the mask counts of the micro-batches are (each micro-batch's summed loss is
divided by the update's total count, known before the forward passes because masking comes
first). The released code instead averages within each micro-batch, then over micro-batches,
which weights micro-batches equally; for k = 1 both are the same. The NCE part keeps the
paper's recipe: negatives come from the same micro-batch only (255 negatives per clip for a
1024-video update made of 128-video micro-batches). `info_nce` is the released NT-Xent, already
multiplied by the temperature (total = MLM + alpha * gamma * InfoNCE with alpha = nce_weight).

Sharding: the batch is split over ('data', 'fsdp'); under jit the InfoNCE similarity matrix of
the micro-batch is computed from all devices' projections (XLA all-gathers them) and its
gradient flows back to every device's clips; BatchNorm in the projection head reduces over the
global micro-batch (the released SyncBatchNorm). Running BatchNorm statistics are updated once
per micro-batch, as torch does on every forward.

Metrics (float32 scalars, over the whole update): total_loss, mlm_loss, nce_loss,
mask_accuracy (argmax = label at scored positions), mask_ratio (masked tokens / all tokens, as
the released trainer), pad_ratio, dropped_ratio (masked but not scored positions, beyond the
static K of a clip or the packed bound M of a device's micro-batch, / masked: the loss is then
the mean over the scored positions, the released normalisation over what is scored; the
bounds' defaults make this rare: 1e-3 of clips with 'clip', ~1e-6 of micro-batches with
'micro_batch'), grad_norm (before clipping), learning_rate (of this update).
Dropout bits come from `dropout_key` (config `dropout_rng`), a function of the step's key.
"""

import functools
import math
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vimpac_jax.constants import IGNORE_LABEL, PAD_ID
from vimpac_jax.models.losses import info_nce, mlm_loss
from vimpac_jax.models.model import build_model, init_variables
from vimpac_jax.training import sharding as shd
from vimpac_jax.training.masking import gather_positions, mask_tokens, masked_positions_bound, pack_positions
from vimpac_jax.training.optimizer import applied_learning_rate, make_optimizer


def pretrain_config(**overrides) -> ml_collections.ConfigDict:
    """Default `config.pretrain` block (objective, masking, accumulation)."""
    cfg = ml_collections.ConfigDict(dict(
        mlm_weight=1.0,
        nce_weight=1.0,              # alpha; the temperature factor is inside info_nce
        mask_kind="block",           # 'block' (paper Table 2) or 'iid'
        mask_blocks=5,               # 5 for T=5 at 128 px, 6 at 256 px (`vimpac mask-ratio`)
        mask_prob=0.15,              # for mask_kind='iid'
        mask_noise="none",           # 'none' or 'bert' (80/10/10 per box)
        max_masked=0,                # static K scored positions per clip; 0: from the quantile
                                     # ('clip') or the hard bound ('micro_batch')
        max_masked_quantile=0.999,   # 'clip': K = this quantile of the masked count (1.0: never drop)
        # 'micro_batch': the scored positions of each device's share of a micro-batch packed into
        # one static bound (`packed_quantile` of their total); 'clip': K slots per clip.
        mlm_positions="micro_batch",
        packed_quantile=0.999999,    # a device's micro-batch drops positions with about 1 - this
        mlm_vocab_multiple=64,       # MLM logits padded to a multiple of this, pads masked; 1: off
        dropout_rng="rbg",           # PRNG of the dropout bits: 'rbg' / 'unsafe_rbg' (XLA's
                                     # RngBitGenerator) or 'threefry' (mesh-independent bits)
        micro_batches=1,             # k: gradient accumulation inside the step
        # Videos per held-out validation batch (config.data.eval_store); 0: 1.5x the micro-batch, as
        # the released pre-training script (`bs_per_gpu * 1.5`): its NCE loss has that many negatives.
        eval_batch_size=0,
        # Frame rate of the validation clips: 2 fps, as the released pre-training validation (it
        # reads the 2-fps LMDB: vimpac/data.py with no frame_rate), whatever the held-out store's
        # fps (a whole multiple of it; the README's downstream stores are at 16 fps). None: every
        # stored frame.
        eval_clip_fps=ml_collections.FieldReference(2.0, field_type=float),
    ))
    cfg.update(overrides)
    return cfg


@flax.struct.dataclass
class TrainState:
    """step: int32 [] updates done; params, batch_stats: model variables (float32);
    opt_state: optax state of `make_optimizer`."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


MLM_POSITIONS = ("micro_batch", "clip")
DROPOUT_RNGS = ("threefry", "rbg", "unsafe_rbg")


def clip_shape(model_cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    return int(model_cfg["clip_len"]), int(model_cfg["height"]), int(model_cfg["width"])


def _packed(pretrain_cfg) -> bool:
    return pretrain_cfg["mlm_positions"] == "micro_batch"


def resolve_max_masked(pretrain_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> int:
    """The static K of `mask_tokens(max_masked=K)`: `max_masked` if > 0, else, with
    mlm_positions='clip', the `max_masked_quantile` of the masked count (deterministic; 448 of
    1280 for T=5, 16x16 and 5 blocks at 0.999, against 185 masked on average and 960 at most),
    and with 'micro_batch' the hard bound (960 there: no clip drops anything; the packed bound of
    `packed_masked_bound` does the bounding)."""
    k = int(pretrain_cfg["max_masked"])
    if k > 0:
        return min(k, math.prod(clip_shape(model_cfg)))
    return masked_positions_bound(
        clip_shape(model_cfg), kind=pretrain_cfg["mask_kind"],
        num_blocks=int(pretrain_cfg["mask_blocks"]), prob=float(pretrain_cfg["mask_prob"]),
        quantile=1.0 if _packed(pretrain_cfg) else float(pretrain_cfg["max_masked_quantile"]))


def packed_masked_bound(pretrain_cfg: Mapping[str, Any], clip: tuple, clips: int, per_clip: int) -> int:
    """Static number M of MLM slots for `clips` clips packed together (mlm_positions='micro_batch'):
    the `packed_quantile` of their total masked count, at most `clips` x `per_clip` (the K of
    their per-clip lists). Small, T=5 at 128 px: ~27.6k slots (~216 per clip) for 128 clips at
    1 - 1e-6 (rounded up to a multiple of 8), against 448 per clip as per-clip 0.999 quantiles; 185 are masked on average."""
    bound = masked_positions_bound(clip, kind=pretrain_cfg["mask_kind"],
                                   num_blocks=int(pretrain_cfg["mask_blocks"]), prob=float(pretrain_cfg["mask_prob"]),
                                   quantile=float(pretrain_cfg["packed_quantile"]), clips=int(clips), multiple_of=8,
                                   samples=16384)
    return min(bound, int(clips) * int(per_clip))


def _batch_shards(mesh) -> int:
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in shd.BATCH_AXES)


def pack_micro_batch(positions: jax.Array, labels: jax.Array, clip_tokens: int, groups: int, bound: int):
    """Packs the per-clip lists of a micro-batch into `groups` lists of `bound` slots.

    positions, labels: int [C, K] per clip (views-major rows, `mask_batch` layout); the C clips
    form `groups` consecutive groups (one per device of the batch axes, so no data moves).
    Returns positions [G, bound] (flat indices into a group's C/G x clip_tokens tokens, distinct:
    the scored ones first, then unscored padding) and labels [G, bound] (IGNORE_LABEL on padding
    and on scored positions beyond `bound`, which are dropped: the last ones in row-major order).
    """
    c, k = positions.shape
    per_group = c // groups
    index = (jnp.arange(c)[:, None] % per_group) * clip_tokens + positions
    valid = (labels != IGNORE_LABEL).reshape(groups, per_group * k)
    packed, slot, is_valid, _ = jax.vmap(lambda v, i: pack_positions(v, i, bound))(
        valid, index.reshape(groups, per_group * k))
    packed_labels = jnp.take_along_axis(labels.reshape(groups, -1), slot, axis=1)
    return packed.astype(jnp.int32), jnp.where(is_valid, packed_labels, IGNORE_LABEL)


def scored_count(masked: dict, pretrain_cfg: Mapping[str, Any], mesh=None) -> jax.Array:
    """Number of positions the update's MLM loss scores (its denominator), from `mask_batch`
    output [B, 2, ...]: the valid list entries, less what packing drops beyond the bound."""
    labels = masked["labels"]
    if not _packed(pretrain_cfg):
        return (labels != IGNORE_LABEL).sum()
    k, groups = int(pretrain_cfg["micro_batches"]), _batch_shards(mesh)
    per_micro = jax.vmap(views_major)(split_micro_batches(labels, k))  # [k, 2n, K]
    counts = (per_micro != IGNORE_LABEL).reshape(k, groups, -1).sum(-1)
    bound = packed_masked_bound(pretrain_cfg, masked["inputs"].shape[2:], per_micro.shape[1] // groups,
                                labels.shape[-1])
    return jnp.minimum(counts, bound).sum()


def dropout_key(key: jax.Array, rng: str) -> jax.Array:
    """The dropout key of an update, derived from its threefry `key`: itself for rng='threefry',
    else a key of the 'rbg' / 'unsafe_rbg' implementation made from 4 words drawn from it, so
    the bits still depend only on (seed, step) and resume exactly. With those, every dropout
    mask is one XLA RngBitGenerator call (Philox on GPU) instead of a threefry hash per 32-bit
    word; the bits then depend on the backend and on how the batch is split over devices."""
    if rng == "threefry":
        return key
    return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=rng)


# ----------------------------------------------------------------------------------------------
# State: abstract shapes, shardings, initialisation.

def _model_and_tx(model_cfg, optim_cfg):
    tx, schedule = make_optimizer(optim_cfg)
    return build_model(model_cfg), tx, schedule


def _boxed_variables(model, model_cfg):
    """Shapes of the initial variables, still boxed with their logical axis names."""
    return jax.eval_shape(lambda k: init_variables(model, model_cfg, k), jax.random.key(0))


def _init_state(key, model, model_cfg, tx) -> TrainState:
    variables = nn.unbox(init_variables(model, model_cfg, key))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def abstract_train_state(model_cfg, optim_cfg) -> TrainState:
    """Shapes and dtypes (jax.ShapeDtypeStruct leaves) of a fresh TrainState; allocates nothing.
    What a checkpoint restore needs as its target."""
    model, tx, _ = _model_and_tx(model_cfg, optim_cfg)
    return jax.eval_shape(functools.partial(_init_state, model=model, model_cfg=model_cfg, tx=tx),
                          jax.random.key(0))


def param_shardings(model_cfg, mesh, rules=None):
    """NamedShardings of the parameters alone, by the logical-axis rules (what a reader of a
    checkpoint's parameters lays them out with)."""
    return shd.state_shardings(_boxed_variables(build_model(model_cfg), model_cfg)["params"], mesh, rules)


def train_state_shardings(model_cfg, optim_cfg, mesh, rules=None) -> TrainState:
    """NamedShardings of every leaf of the TrainState: parameters by the logical-axis rules,
    Adam moments like their parameters, counters and BatchNorm statistics replicated.

    Traces the model's initialisation once: a task computes this once per run and hands it to
    `init_train_state` and the step builders (`state_shardings=`)."""
    model, tx, _ = _model_and_tx(model_cfg, optim_cfg)
    boxed = _boxed_variables(model, model_cfg)
    param_sh = shd.state_shardings(boxed["params"], mesh, rules)
    opt_state = jax.eval_shape(tx.init, nn.unbox(boxed["params"]))  # the optimizer only, not the model
    return TrainState(
        step=shd.replicated(mesh),
        params=param_sh,
        batch_stats=jax.tree.map(lambda _: shd.replicated(mesh), nn.unbox(boxed.get("batch_stats", {}))),
        opt_state=shd.shardings_like_params(opt_state, param_sh, mesh),
    )


def init_train_state(model_cfg, optim_cfg, key: jax.Array, mesh: Optional[jax.sharding.Mesh] = None,
                     rules=None, state_shardings: Optional[TrainState] = None) -> TrainState:
    """A fresh TrainState whose arrays are created directly in their shardings (never whole on
    one device). `mesh` defaults to all devices on 'data'; `state_shardings` to
    `train_state_shardings(model_cfg, optim_cfg, mesh, rules)`."""
    mesh = shd.make_mesh() if mesh is None else mesh
    model, tx, _ = _model_and_tx(model_cfg, optim_cfg)
    shardings = state_shardings or train_state_shardings(model_cfg, optim_cfg, mesh, rules)
    init = functools.partial(_init_state, model=model, model_cfg=model_cfg, tx=tx)
    return jax.jit(init, out_shardings=shardings)(key)


# ----------------------------------------------------------------------------------------------
# Masking and arranging the batch.

def mask_batch(tokens: jax.Array, key: jax.Array, pretrain_cfg: Mapping[str, Any], max_masked: int) -> dict:
    """Masks every clip of tokens int [B, 2, T, H, W] with one key.

    Returns a dict of per-clip arrays, all indexed [B, 2, ...] like the input:
      inputs int32 [B, 2, T, H, W]  masked clips (model input);
      positions int32 [B, 2, K]     flat indices of the scored positions (0 where unused);
      labels int32 [B, 2, K]        original code at each scored position, IGNORE_LABEL where unused;
      num_masked int32 [B, 2]       masked tokens of each clip, scored or not.
    """
    b, views, *clip = tokens.shape
    flat = tokens.reshape(b * views, *clip)  # video-major: row 2v + j is view j of video v
    m = mask_tokens(key, flat, kind=pretrain_cfg["mask_kind"],
                    num_blocks=int(pretrain_cfg["mask_blocks"]),
                    prob=float(pretrain_cfg["mask_prob"]),
                    noise=pretrain_cfg["mask_noise"], max_masked=max_masked)
    labels = gather_positions(m.labels.reshape(b * views, -1), m.positions)
    labels = jnp.where(m.position_valid, labels, IGNORE_LABEL)
    num_masked = m.position_valid.sum(axis=1) + m.num_dropped
    out = dict(inputs=m.inputs, positions=m.positions, labels=labels, num_masked=num_masked)
    return {name: x.reshape(b, views, *x.shape[1:]) for name, x in out.items()}


def split_micro_batches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]; micro-batch i holds rows i, i+k, i+2k, ... (strided, so that a
    batch split over devices along B stays split the same way within each micro-batch)."""
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def views_major(x: jax.Array) -> jax.Array:
    """[n, 2, ...] -> [2n, ...] with rows [all first views; all second views] (the released
    trainer's `codes.transpose(0, 1).flatten(0, 1)`, the order `info_nce` expects)."""
    return x.swapaxes(0, 1).reshape(2 * x.shape[0], *x.shape[2:])


# ----------------------------------------------------------------------------------------------
# The step.

def _constrain(x, mesh):
    """Keeps the leading (clip) axis of an activation split over the batch mesh axes."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(shd.BATCH_AXES)))


def micro_batch_loss(params, batch_stats, micro: dict, dropout_key, *, model, pretrain_cfg,
                     total_scored, num_micro: int, mesh=None):
    """Loss of one micro-batch (n videos) as its share of the update's loss.

    micro: the `mask_batch` arrays of n videos ([n, 2, ...]). Returns (loss, aux) with
    loss = mlm_weight * (summed MLM cross entropy / total_scored) + nce_weight * NCE / num_micro.
    With mlm_positions='micro_batch' the scored positions of each device's clips are packed into
    one list (`pack_micro_batch`) and the MLM head runs on those slots only.
    """
    inputs = _constrain(views_major(micro["inputs"]), mesh)
    positions = _constrain(views_major(micro["positions"]), mesh)
    labels = _constrain(views_major(micro["labels"]), mesh)
    options = dict(vocab_multiple=int(pretrain_cfg["mlm_vocab_multiple"]))
    if _packed(pretrain_cfg):
        groups = _batch_shards(mesh)
        clip = inputs.shape[1:]
        bound = packed_masked_bound(pretrain_cfg, clip, inputs.shape[0] // groups, positions.shape[-1])
        positions, labels = pack_micro_batch(positions, labels, math.prod(clip), groups, bound)
        positions, labels = _constrain(positions, mesh), _constrain(labels, mesh)
        options["position_groups"] = groups
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    out, mutated = model.apply(variables, inputs, positions, train=True, rngs={"dropout": dropout_key},
                               mutable=["batch_stats"], **options)
    mean_nll, count, correct = mlm_loss(out["mlm_logits"], labels)
    mlm_share = mean_nll * count / jnp.maximum(total_scored, 1)
    nce_share = info_nce(out["cls_proj"]) / num_micro
    loss = pretrain_cfg["mlm_weight"] * mlm_share + pretrain_cfg["nce_weight"] * nce_share
    aux = dict(batch_stats=mutated.get("batch_stats", batch_stats), mlm=mlm_share, nce=nce_share,
               correct=correct.astype(jnp.float32))
    return loss, aux


def _check_batch(tokens, model_cfg, num_micro, mesh):
    expected = clip_shape(model_cfg)
    if tokens.ndim != 5 or tokens.shape[1] != 2 or tuple(tokens.shape[2:]) != expected:
        raise ValueError(f"batch['tokens'] must be [B, 2, T, H, W] with (T, H, W) = {expected}, "
                         f"got shape {tokens.shape}")
    b = tokens.shape[0]
    shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in shd.BATCH_AXES)
    if b % num_micro or (b // num_micro) % shards:
        raise ValueError(f"batch of {b} videos: micro_batches={num_micro} must divide it and each "
                         f"micro-batch ({b / num_micro:g} videos) must split evenly over the "
                         f"{shards} data x fsdp devices")


def accumulate_gradients(params, batch_stats, masked: dict, dropout_key, *, model, pretrain_cfg, mesh=None):
    """Gradient of the update's loss, summed over `micro_batches` micro-batches.

    masked: `mask_batch` output for the whole update ([B, 2, ...] arrays). Returns
    (grads like params, new batch_stats, sums) with sums = {loss, mlm, nce, correct}: the
    update's total loss, its MLM and NCE parts and the number of correct scored positions.
    """
    k = int(pretrain_cfg["micro_batches"])
    total_scored = scored_count(masked, pretrain_cfg, mesh)
    loss_fn = functools.partial(micro_batch_loss, model=model, pretrain_cfg=pretrain_cfg,
                                total_scored=total_scored, num_micro=k, mesh=mesh)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:  # no accumulator: saves a params-sized buffer and an add
        (loss, aux), grads = grad_fn(params, batch_stats, masked, dropout_key)
        batch_stats = aux.pop("batch_stats")
        return grads, batch_stats, dict(aux, loss=loss)

    def body(carry, xs):
        grad_sum, stats, sums = carry
        i, mb = xs
        (loss, aux), grads = grad_fn(params, stats, mb, jax.random.fold_in(dropout_key, i))
        stats = aux.pop("batch_stats")
        sums = jax.tree.map(jnp.add, sums, dict(aux, loss=loss))
        return (jax.tree.map(jnp.add, grad_sum, grads), stats, sums), None

    sums = {name: jnp.zeros((), jnp.float32) for name in ("loss", "mlm", "nce", "correct")}
    micro = jax.tree.map(lambda x: split_micro_batches(x, k), masked)
    carry = (jax.tree.map(jnp.zeros_like, params), batch_stats, sums)
    (grads, batch_stats, sums), _ = jax.lax.scan(body, carry, (jnp.arange(k), micro))
    return grads, batch_stats, sums


def train_step(state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array, *, model, tx, schedule,
               pretrain_cfg, model_cfg, max_masked: int, mesh=None) -> tuple[TrainState, dict]:
    """The pure (un-jitted) step; see the module docstring. batch['tokens']: int [B, 2, T, H, W]."""
    tokens = batch["tokens"]
    _check_batch(tokens, model_cfg, int(pretrain_cfg["micro_batches"]), mesh)
    mask_key, drop_key = jax.random.split(key)
    masked = mask_batch(tokens, mask_key, pretrain_cfg, max_masked)
    drop_key = dropout_key(drop_key, pretrain_cfg["dropout_rng"])
    grads, batch_stats, sums = accumulate_gradients(state.params, state.batch_stats, masked, drop_key,
                                                    model=model, pretrain_cfg=pretrain_cfg, mesh=mesh)
    grad_norm = optax.tree.norm(grads)  # global L2 norm, before clipping
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    num_tokens = math.prod(tokens.shape)
    num_masked = masked["num_masked"].sum()
    num_scored = scored_count(masked, pretrain_cfg, mesh)
    metrics = dict(
        total_loss=sums["loss"],
        mlm_loss=sums["mlm"],
        nce_loss=sums["nce"],
        mask_accuracy=sums["correct"] / jnp.maximum(num_scored, 1),
        mask_ratio=num_masked / num_tokens,
        pad_ratio=(tokens == PAD_ID).sum() / num_tokens,
        dropped_ratio=1.0 - num_scored / jnp.maximum(num_masked, 1),
        grad_norm=grad_norm,
        learning_rate=applied_learning_rate(schedule, state.opt_state),  # from the optimizer's count
    )
    metrics = {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics


def make_pretrain_step(model_cfg, optim_cfg, pretrain_cfg, mesh: Optional[jax.sharding.Mesh] = None,
                       rules=None, state_shardings: Optional[TrainState] = None):
    """`pretrain_step(state, batch, key) -> (state, metrics)`, jitted with explicit shardings.

    state: a TrainState laid out as `train_state_shardings` (what `init_train_state` returns);
    it is donated. batch: {'tokens': int [B, 2, T, H, W], ...} split over ('data', 'fsdp')
    (`sharding.make_global_batch`); key: one PRNG key for the whole update (masking, dropout).
    Metrics come back replicated. `state_shardings`: the run's `train_state_shardings`, if known.
    """
    mesh = shd.make_mesh() if mesh is None else mesh
    model, tx, schedule = _model_and_tx(model_cfg, optim_cfg)
    state_sh = state_shardings or train_state_shardings(model_cfg, optim_cfg, mesh, rules)
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, pretrain_cfg=pretrain_cfg,
                             model_cfg=model_cfg, max_masked=resolve_max_masked(pretrain_cfg, model_cfg),
                             mesh=mesh)
    return jax.jit(step, in_shardings=(state_sh, shd.batch_sharding(mesh), shd.replicated(mesh)),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=0)


# ----------------------------------------------------------------------------------------------
# Held-out validation (the released `Trainer.evaluate` of vimpac/pretrain.py).

def pretrain_eval_step(state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array, *, model, pretrain_cfg,
                       model_cfg, max_masked: int, mesh=None) -> dict:
    """The objective on one held-out batch, in eval mode (no dropout, BatchNorm's running
    statistics), with no update. batch['tokens']: int [B, 2, T, H, W]; key: the masks.

    Returns float32 scalars named as the training metrics: total_loss (weighted), mlm_loss,
    nce_loss (InfoNCE over the batch's 2B clips), mask_accuracy, mask_ratio.
    """
    tokens = batch["tokens"]
    _check_batch(tokens, model_cfg, 1, mesh)
    masked = mask_batch(tokens, key, pretrain_cfg, max_masked)
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    out = model.apply(variables, _constrain(views_major(masked["inputs"]), mesh),
                      _constrain(views_major(masked["positions"]), mesh), train=False)
    mlm, count, correct = mlm_loss(out["mlm_logits"], views_major(masked["labels"]))
    nce = info_nce(out["cls_proj"])
    metrics = dict(
        total_loss=pretrain_cfg["mlm_weight"] * mlm + pretrain_cfg["nce_weight"] * nce,
        mlm_loss=mlm,
        nce_loss=nce,
        mask_accuracy=correct / jnp.maximum(count, 1),
        mask_ratio=masked["num_masked"].sum() / math.prod(tokens.shape),
    )
    return {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}


def make_pretrain_eval_step(model_cfg, optim_cfg, pretrain_cfg, mesh: Optional[jax.sharding.Mesh] = None,
                            rules=None, state_shardings: Optional[TrainState] = None):
    """`eval_step(state, batch, key) -> metrics`, jitted with the shardings of `make_pretrain_step`
    (the state is read, not donated); metrics come back replicated."""
    mesh = shd.make_mesh() if mesh is None else mesh
    step = functools.partial(pretrain_eval_step, model=build_model(model_cfg), pretrain_cfg=pretrain_cfg,
                             model_cfg=model_cfg, max_masked=resolve_max_masked(pretrain_cfg, model_cfg), mesh=mesh)
    state_sh = state_shardings or train_state_shardings(model_cfg, optim_cfg, mesh, rules)
    return jax.jit(step, in_shardings=(state_sh, shd.batch_sharding(mesh), shd.replicated(mesh)),
                   out_shardings=shd.replicated(mesh))
