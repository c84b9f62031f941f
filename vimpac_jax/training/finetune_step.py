"""Fine-tuning and multi-view evaluation steps of the classifier (paper Table 4; the released `vimpac/finetune.py`).

The state is the pre-training step's `TrainState` (step, params, batch_stats, opt_state) built
for a `task='finetune'` model config; initialisation and shardings come from there too.
"""

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from vimpac_jax.constants import PAD_ID
from vimpac_jax.models.model import build_model
from vimpac_jax.training import sharding as shd
from vimpac_jax.training.optimizer import applied_learning_rate, make_optimizer
from vimpac_jax.training.pretrain_step import TrainState, split_micro_batches, train_state_shardings


def classification_loss(logits, labels, label_smoothing: float = 0.0):
    """Mean cross entropy; with smoothing s: (1 - s)·NLL + s·mean_c(-log p_c), as the released
    LabelSmoothingCrossEntropy (equal to optax's smoothed-label cross entropy)."""
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) if label_smoothing else \
        jax.nn.one_hot(labels, num_classes)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def finetune_train_step(state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array, *, model, tx, schedule,
                        label_smoothing: float, micro_batches: int = 1) -> tuple[TrainState, dict]:
    """batch: tokens int [B, T, H, W], label int [B]. One AdamW update; metrics are scalars.

    micro_batches k > 1: gradient accumulation (the released `--gradient_accumulation`). The
    batch is cut into k strided micro-batches of B/k videos (`split_micro_batches`); the summed
    gradients of (micro-batch mean loss) / k are the gradient of the batch's mean loss, so with
    dropout off an update equals the k = 1 update up to float rounding. Micro-batch i draws its
    dropout from fold_in(key, i).
    """
    tokens, labels = batch["tokens"], batch["label"]

    def loss_fn(params, micro_tokens, micro_labels, dropout_key):
        out = model.apply({"params": params}, micro_tokens, train=True, rngs={"dropout": dropout_key})
        loss = classification_loss(out["logits"], micro_labels, label_smoothing) / micro_batches
        return loss, (jnp.argmax(out["logits"], -1) == micro_labels).sum()

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        (loss, correct), grads = grad_fn(state.params, tokens, labels, key)
    else:
        def body(carry, xs):
            grad_sum, loss_sum, correct_sum = carry
            i, micro_tokens, micro_labels = xs
            (loss, correct), grads = grad_fn(state.params, micro_tokens, micro_labels, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, correct_sum + correct), None

        carry = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        xs = (jnp.arange(micro_batches), split_micro_batches(tokens, micro_batches),
              split_micro_batches(labels, micro_batches))
        (grads, loss, correct), _ = jax.lax.scan(body, carry, xs)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = dict(
        loss=loss,
        accuracy=correct / labels.shape[0],
        grad_norm=optax.tree.norm(grads),
        learning_rate=applied_learning_rate(schedule, state.opt_state),  # from the optimizer's count
        pad_ratio=(tokens == PAD_ID).mean(),
    )
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def make_finetune_step(model_cfg, optim_cfg, *, label_smoothing: float = 0.0, micro_batches: int = 1,
                       mesh: Optional[jax.sharding.Mesh] = None, state_shardings=None):
    """Jitted `(state, batch, key) -> (state, metrics)` with explicit shardings (`state_shardings`:
    the run's `train_state_shardings`, if known); state donated."""
    mesh = shd.make_mesh() if mesh is None else mesh
    tx, schedule = make_optimizer(optim_cfg)
    step = functools.partial(finetune_train_step, model=build_model(model_cfg), tx=tx, schedule=schedule,
                             label_smoothing=float(label_smoothing), micro_batches=int(micro_batches))
    state_sh = state_shardings or train_state_shardings(model_cfg, optim_cfg, mesh)
    return jax.jit(step, in_shardings=(state_sh, shd.batch_sharding(mesh), shd.replicated(mesh)),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=0)


def multiview_scores(params, batch_stats, tokens, *, model) -> dict:
    """tokens int [B, V, T, H, W] (V = clips x crops) -> softmax scores averaged over views [B, C]
    and the per-video mean cross entropy needs labels, so logits are returned too [B, V, C]."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    return average_over_views(lambda clips: model.apply(variables, clips, train=False)["logits"], tokens)


def average_over_views(clip_logits, tokens) -> dict:
    """tokens int [B, V, T, H, W] -> {'probs': softmax scores averaged over the V views [B, C],
    'logits' [B, V, C]}, with clip_logits(int [B·V, T, H, W]) -> [B·V, C] any classifier (the
    model, or an exported StableHLO module in `vimpac predict`)."""
    b, v = tokens.shape[:2]
    logits = clip_logits(tokens.reshape(b * v, *tokens.shape[2:])).reshape(b, v, -1).astype(jnp.float32)
    return {"probs": jax.nn.softmax(logits, -1).mean(axis=1), "logits": logits}


def make_eval_step(model_cfg, mesh: Optional[jax.sharding.Mesh] = None):
    """Jitted `(params, batch_stats, tokens [B, V, T, H, W]) -> {'probs' [B, C], 'logits'}`; the
    batch is split over devices, the (small) outputs come back replicated on every process."""
    return _eval_step(build_model(model_cfg), shd.make_mesh() if mesh is None else mesh)


@functools.lru_cache(maxsize=16)
def _eval_step(model, mesh: jax.sharding.Mesh):
    # One jitted function per (model, mesh), so its compiled programs serve every caller: the
    # classifiers of one process that load checkpoints of the same architecture (`vimpac predict`,
    # `load_classifier`), the run's evaluation. Modules and meshes are hashable.
    return jax.jit(functools.partial(multiview_scores, model=model), out_shardings=shd.replicated(mesh))


def view_cross_entropy(logits, labels):
    """Per-video mean over its views of the cross entropy: logits [B, V, C], labels int [B] -> [B]."""
    import numpy as np
    from scipy.special import log_softmax

    log_probs = log_softmax(np.asarray(logits, np.float64), axis=-1)
    return -log_probs[np.arange(len(log_probs)), :, np.asarray(labels)].mean(axis=1)


def accuracy_report(probs, labels, class_names: Optional[list] = None) -> dict[str, Any]:
    """Top-1/top-5 and per-class accuracy (%) from averaged scores probs [N, C], labels [N]."""
    import numpy as np

    probs, labels = np.asarray(probs), np.asarray(labels)
    ranked = np.argsort(-probs, axis=1)
    top1 = ranked[:, 0] == labels
    top5 = (ranked[:, :5] == labels[:, None]).any(axis=1)
    num_classes = probs.shape[1]
    per_class = {}
    for c in range(num_classes):
        members = labels == c
        if members.any():
            name = class_names[c] if class_names and c < len(class_names) else str(c)
            per_class[name] = float(100.0 * top1[members].mean())
    return {"top1": float(100.0 * top1.mean()), "top5": float(100.0 * top5.mean()),
            "mean_class_accuracy": float(np.mean(list(per_class.values()))) if per_class else 0.0,
            "num_videos": int(len(labels)), "per_class": per_class}
