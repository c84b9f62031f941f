"""The two pre-training losses (released: `vimpac/pretrain.py`, `nce_support.py`), as pure functions of arrays."""

import jax
import jax.numpy as jnp

from vimpac_jax.constants import IGNORE_LABEL

NCE_TEMPERATURE = 0.2


def _at_least_f32(x):
    """bfloat16/float16 -> float32; float64 (numerics tests) stays float64."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def mlm_loss(logits, labels, weights=None):
    """Mean cross entropy over scored positions.

    logits [..., V] (float32), labels [...] int with IGNORE_LABEL (-100) where not scored;
    `weights` [...] optionally marks valid positions further (e.g. padding of a gathered set).
    Returns (loss, number of scored positions, number correct).
    """
    valid = labels != IGNORE_LABEL
    if weights is not None:
        valid = valid & weights.astype(bool)
    safe_labels = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    count = valid.sum()
    loss = jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1)
    correct = (valid & (jnp.argmax(logits, axis=-1) == labels)).sum()
    return loss, count, correct


def info_nce(projections, temperature: float = NCE_TEMPERATURE):
    """SimCLR's NT-Xent over 2n clips, as the released `DistributedNCELoss`.

    projections [2n, P]: rows [:n] are the first views, [n:] the second views of the same n
    videos. Projections are L2-normalised; for clip i the positive is its partner, the
    negatives are both views of every other video; self-similarity is excluded. The released
    code returns (loss_a + loss_b) * temperature, where loss_a/loss_b are the mean losses of the
    first/second views: a sum over the two views, not a mean. Logits and softmax are float32.
    Call it on the projections of the global batch (under jit the all-gather is implicit).
    """
    f = _at_least_f32(projections)
    f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    n = f.shape[0] // 2
    a, b = f[:n], f[n:]
    eye = jnp.eye(n, dtype=bool)
    neg_inf = jnp.finfo(f.dtype).min

    def view_loss(x, y):
        logits_xy = x @ y.T / temperature
        logits_xx = jnp.where(eye, neg_inf, x @ x.T / temperature)
        logits = jnp.concatenate([logits_xy, logits_xx], axis=1)  # positive at column i
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.diagonal(log_probs[:, :n]))

    return (view_loss(a, b) + view_loss(b, a)) * temperature
