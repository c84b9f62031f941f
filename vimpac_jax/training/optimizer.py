"""AdamW, learning-rate schedules and gradient clipping for pre-training (paper Table 4).

Built from optax pieces: `clip_by_global_norm` -> `adamw` (decoupled weight decay, masked).
The released trainer uses transformers' AdamW with `get_{linear,cosine,constant}_schedule_with_
warmup` and torch's `clip_grad_norm_`; the schedules here give the same values at every step
(step 0 = the first update has learning rate 0, as transformers' LambdaLR). Two numerically tiny
differences remain and are not worth copying: transformers adds eps to sqrt(v) before the bias
correction (optax after it), and applies the decay to the already-updated weights.

Weight decay: none on biases and LayerNorm scales (the paper's rule). The released code picks
the exempt parameters by name (".bias", "LayerNorm.weight", ".ln.weight", "ln_pre.weight",
"ln_post.weight"), which
  - decays BatchNorm scales of the projection head ('cls_head.mlp.bn_0.weight'): we do too;
  - also decays the MLM head's LayerNorm scale, whose torch name 'mlm_head.transform.2.weight'
    matches no pattern: an oversight; we exempt it unless `match_released_decay=True`.
Embeddings (token, positional, [CLS]) are decayed, as in the released code.

Schedule length and run length are separate (the released `--epochs` and `--interval`):
`total_steps` here is the length of the SCHEDULE; a run may cover only part of it. The released
large model runs one 100-epoch schedule in two stages (scripts/pretrain/large.sh: `--epochs 100
--interval 90` at 128 px, then large_frame256cont.sh: `--epochs 100 --interval 10 --resume`
at 256 px, which restores the LambdaLR scheduler with the optimizer), so stage 2 continues from
0.1 x peak down to 0 without a second warm-up. Here the position in the schedule is the
optimizer state's own update count (`schedule_count`): it travels with the Adam moments when a
stage starts from another run's optimizer state (`config.init_from_optimizer`), and the logged
learning rate is read from it (`applied_learning_rate`), so the logged and the applied rate are
the same number by construction.
"""

from typing import Any, Mapping

import jax
import ml_collections
import optax


SCHEDULES = ("linear", "cosine", "constant")

# Names of our LayerNorm modules (vimpac_jax.models: `layer_norm(name=...)`).
_LAYER_NORM_MODULES = ("ln", "ln_pre", "ln_post")


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """Default `config.optim` block: the paper's final pre-training recipe (Table 4)."""
    cfg = ml_collections.ConfigDict(dict(
        learning_rate=3e-4,
        schedule="linear",           # one of SCHEDULES
        warmup=0.05,                 # a fraction of total_steps, in [0, 1): the released --warm-up ratio
        total_steps=100_000,         # schedule length in optimizer updates (not micro-batches)
        # Schedule length apart from the run's (`train.epochs` / `train.num_steps`); the task
        # turns them into `total_steps`. 0 / None: the schedule is as long as the run.
        schedule_steps=0,
        schedule_epochs=ml_collections.FieldReference(None, field_type=float),
        b1=0.9, b2=0.98, eps=1e-8,
        weight_decay=0.05,
        clip_grad_norm=1.0,          # global-norm clipping; 0 disables it
        match_released_decay=False,  # True: also decay the MLM head's LayerNorm scale
    ))
    cfg.update(overrides)
    return cfg


def warmup_steps(cfg: Mapping[str, Any]) -> int:
    """Warm-up length in updates: `warmup` < 1 is a fraction of total_steps (as released; the
    only form `config.optim` of pre-training and fine-tuning takes, `config_schema`), >= 1 a
    number of updates (the tokenizer's `optim.warmup`)."""
    warmup, total = float(cfg["warmup"]), int(cfg["total_steps"])
    return int(total * warmup) if warmup < 1 else int(warmup)


def schedule_length(cfg: Mapping[str, Any], steps_per_epoch: int, run_steps: int) -> int:
    """The schedule's length in updates (`total_steps`) from an `optim` config block:
    `schedule_steps` if > 0, else `schedule_epochs` x steps_per_epoch if set, else the run's own
    length `run_steps` (the released `--epochs` when `--interval` is not given). The block is a
    resolved one (`config_schema`: every field, each in its range)."""
    steps = int(cfg["schedule_steps"])
    if steps:
        return steps
    epochs = cfg["schedule_epochs"]
    if epochs is not None:
        return int(round(float(epochs) * steps_per_epoch))
    return int(run_steps)


def make_schedule(cfg: Mapping[str, Any]) -> optax.Schedule:
    """Learning rate as a function of the number of updates done so far.

    linear:   0 -> lr over the warm-up, then linearly to 0 at total_steps (and 0 after).
    cosine:   0 -> lr, then lr * (1 + cos(pi * progress)) / 2 down to 0 at total_steps.
    constant: 0 -> lr, then lr.
    """
    lr, total, kind = float(cfg["learning_rate"]), int(cfg["total_steps"]), cfg["schedule"]
    warm = warmup_steps(cfg)
    if total <= 0 or not 0 <= warm <= total:
        raise ValueError(f"optim: need 0 <= warm-up steps ({warm}) <= total_steps ({total}), total_steps > 0")
    if kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, max(1, total - warm))
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(1, total - warm), alpha=0.0)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {kind!r}")
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def schedule_count(opt_state: Any) -> jax.Array:
    """int32 []: updates the schedule has counted so far (the next update's position in it).

    Read from the `ScaleByScheduleState` inside `make_optimizer`'s state, the counter optax's
    `scale_by_learning_rate` evaluates the schedule at.
    """
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "ScaleByScheduleState")
    if len(found) != 1:
        raise ValueError(f"expected one ScaleByScheduleState in the optimizer state, found {len(found)}")
    return found[0][1].count


def applied_learning_rate(schedule: optax.Schedule, opt_state: Any) -> jax.Array:
    """The learning rate the next `tx.update(grads, opt_state)` applies: schedule(its count)."""
    return schedule(schedule_count(opt_state))


def _is_decayed(path: tuple, match_released: bool) -> bool:
    """Path of a parameter in the 'params' tree, e.g. ('backbone', 'layer_0', 'ln', 'scale')."""
    leaf, module = path[-1], path[-2] if len(path) > 1 else ""
    if leaf == "bias":
        return False
    if leaf == "scale" and module in _LAYER_NORM_MODULES:
        return match_released and path[0] == "mlm_head"
    return True


def decay_mask(params: Any, match_released: bool = False) -> Any:
    """Tree of bools like `params` (the 'params' collection, unboxed): True = weight-decayed."""
    def keys(path):
        return tuple(str(getattr(k, "key", k)) for k in path)
    return jax.tree_util.tree_map_with_path(lambda p, _: _is_decayed(keys(p), match_released), params)


def make_optimizer(cfg: Mapping[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(global-norm clipping -> AdamW with masked decay, schedule) from an `optim` config.

    Gradient accumulation is not done here: the pre-training step accumulates micro-batches
    itself (see `vimpac_jax.training.pretrain_step`), so every call of `update` is one update.
    """
    schedule = make_schedule(cfg)
    match_released = bool(cfg["match_released_decay"])
    adamw = optax.adamw(
        schedule,
        b1=float(cfg["b1"]), b2=float(cfg["b2"]), eps=float(cfg["eps"]),
        weight_decay=float(cfg["weight_decay"]),
        mask=lambda params: decay_mask(params, match_released),
    )
    clip = float(cfg["clip_grad_norm"])
    # Both branches have an EmptyState first, so the state's structure (and checkpoints) do not
    # depend on whether clipping is on.
    clipper = optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()
    return optax.chain(clipper, adamw), schedule
