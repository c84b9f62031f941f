"""The pre-training step on several meshes of 8 CPU devices (conftest gives the test process 8):
a tiny model, its configs and tokens, and what one run of two steps on a mesh gives, for
tests/test_pretrain_step.py (the assertions are there) and tests/test_step_traffic.py.

Each function returns plain numpy arrays and strings: per mesh, the metrics of two steps, the
final state, parameter shardings, and the masked batch; InfoNCE gradients with the projections
sharded over 8 devices and on one device; gradients of an update as 1 batch and as 2 micro-batches.
"""

import jax
import numpy as np

from vimpac_jax.constants import PAD_ID
from vimpac_jax.models.config import model_config
from vimpac_jax.models.losses import info_nce
from vimpac_jax.training import pretrain_step as ps
from vimpac_jax.training import sharding as shd
from vimpac_jax.training.optimizer import optim_config

MESHES = {
    "one_device": {"data": 1},
    "data8": {"data": 8},
    "data4_tensor2": {"data": 4, "tensor": 2},
    "data2_fsdp4": {"data": 2, "fsdp": 4},
}
NUM_VIDEOS = 8
SPEC_LEAVES = {  # parameters whose sharding the test checks
    "mlp_fc": ("backbone", "layer_0", "mlp", "fc", "kernel"),
    "embedding": ("backbone", "token_embed", "embedding"),
    "query": ("backbone", "layer_0", "attn_0", "axis_0", "query", "kernel"),
}


def tiny_model_config(**overrides) -> dict:
    """1 layer, d=64, layout T,H|W, T=2 frames of 4x4 tokens; dropout off unless overridden."""
    cfg = dict(task="pretrain", num_layers=1, hidden_dim=64, num_heads=2, clip_len=2, height=4, width=4,
               layout="T,H|W", pos_emb="hw_separation", dropout=0.0, attention_dropout=0.0,
               vocab_size=8197, dtype="float32", proj_layers=2, proj_hidden_dim=32, proj_dim=16)
    cfg.update(overrides)
    return model_config(**cfg).to_dict()  # complete, as build_model takes a model block


def tiny_configs():
    model_cfg = tiny_model_config()
    # warm-up 0 so that the first update moves the parameters (lr(0) = 0 with a warm-up).
    # eps: Adam's first update is lr * g / (|g| + eps). Some gradients are exactly zero in exact
    # arithmetic (attention key biases: softmax is shift-invariant; the bias before BatchNorm)
    # and float noise (1e-12) there becomes +-lr with eps=1e-8, different on every mesh. With
    # eps=1e-3 the update is a smooth function of the gradient and float32 tolerances apply.
    optim_cfg = optim_config(learning_rate=1e-3, schedule="constant", warmup=0, total_steps=10, eps=1e-3)
    pretrain_cfg = ps.pretrain_config(mask_blocks=2, max_masked=6)
    return model_cfg, optim_cfg, pretrain_cfg


def tiny_tokens(seed: int = 0) -> np.ndarray:
    """int32 [8, 2, 2, 4, 4] random codes; two clips end with a PAD frame."""
    tokens = np.random.RandomState(seed).randint(0, 8192, (NUM_VIDEOS, 2, 2, 4, 4)).astype(np.int32)
    tokens[1, 0, -1] = PAD_ID
    tokens[5, 1, -1] = PAD_ID
    return tokens


def perturbed(state, seed: int = 0):
    """Adds N(0, 0.2) to every weight matrix and N(0, 0.1) to every vector of the parameters.

    At initialisation every clip's [CLS] is nearly the same, so the projection head's BatchNorm
    divides by a tiny batch variance: float32 itself then gets InfoNCE wrong by ~1e-5 (checked
    against float64), and meshes differ by that much. Perturbed weights make clips distinct and
    the error ~3e-7, so the comparisons below can use tight float32 tolerances.
    """
    rng = np.random.RandomState(seed)
    params = jax.tree.map(lambda x: (x + rng.normal(0.0, 0.2 if x.ndim > 1 else 0.1, x.shape)).astype(x.dtype),
                          state.params)
    return state.replace(params=params)


def flat_arrays(tree) -> dict:
    """{'backbone/layer_0/...': leaf} (optax state paths look like '1/0/.mu/backbone/...')."""
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat(tree) -> dict:
    return {name: np.asarray(leaf) for name, leaf in flat_arrays(tree).items()}


def initial_state(model_cfg, optim_cfg, mesh):
    """(flat parameters of init_train_state on `mesh`, their per-device shard shapes, the state)."""
    state = ps.init_train_state(model_cfg, optim_cfg, jax.random.key(0), mesh)
    shard_shapes = {name: leaf.addressable_shards[0].data.shape for name, leaf in flat_arrays(state.params).items()}
    return flat(state.params), shard_shapes, state


def run_mesh(name, mesh, model_cfg, optim_cfg, pretrain_cfg, host_state, tokens):
    step = ps.make_pretrain_step(model_cfg, optim_cfg, pretrain_cfg, mesh)
    state = jax.device_put(host_state, ps.train_state_shardings(model_cfg, optim_cfg, mesh))
    batch = shd.make_global_batch({"tokens": tokens}, mesh)
    metrics = []
    for i in range(2):
        state, m = step(state, batch, jax.random.key(10 + i))
        metrics.append({k: float(v) for k, v in m.items()})
    max_masked = ps.resolve_max_masked(pretrain_cfg, model_cfg)
    masker = jax.jit(lambda t, k: ps.mask_batch(t, k, pretrain_cfg, max_masked),
                     in_shardings=(shd.batch_sharding(mesh), shd.replicated(mesh)),
                     out_shardings=shd.batch_sharding(mesh))
    masked = masker(batch["tokens"], jax.random.key(3))
    specs = {}
    for key, path in SPEC_LEAVES.items():
        leaf = state.params
        for p in path:
            leaf = leaf[p]
        specs[key] = tuple(leaf.sharding.spec)
    return dict(metrics=metrics, params=flat(state.params), batch_stats=flat(state.batch_stats),
                opt_state=flat(state.opt_state), masked={k: np.asarray(v) for k, v in masked.items()},
                specs=specs, batch_spec=tuple(batch["tokens"].sharding.spec),
                batch_devices=len(batch["tokens"].sharding.device_set))


def nce_gradients() -> dict:
    """d info_nce / d projections for 16 clips (2 per device), sharded and on one device."""
    proj = np.random.RandomState(1).normal(size=(2 * NUM_VIDEOS, 16)).astype(np.float32)
    moved = proj.copy()
    moved[9] += 0.5  # a clip held by device 4: a negative of clip 0, held by device 0
    one = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    grad = jax.grad(info_nce)
    reference = np.asarray(jax.jit(grad)(jax.device_put(proj, shd.replicated(one))))
    mesh = shd.make_mesh({"data": 8})
    sharded_grad = jax.jit(grad, in_shardings=shd.batch_sharding(mesh), out_shardings=shd.batch_sharding(mesh))
    out = sharded_grad(shd.make_global_batch(proj, mesh))
    out_moved = sharded_grad(shd.make_global_batch(moved, mesh))
    rows_on_device0 = [s.index[0] for s in out.addressable_shards if s.device == jax.devices()[0]][0]
    return dict(reference=reference, sharded=np.asarray(out), sharded_moved=np.asarray(out_moved),
                rows_on_device0=(rows_on_device0.start, rows_on_device0.stop),
                out_devices=len(out.sharding.device_set))


def accumulation(mesh, model_cfg, optim_cfg, pretrain_cfg, host_state, tokens) -> dict:
    """Gradients of one update of 8 videos as 1 batch and as k=2 micro-batches of 4 (strided:
    videos 0,2,4,6 and 1,3,5,7), with the loss weights passed in as traced values so that each
    k compiles once: (mlm, nce) = (1, 0) isolates the MLM part, (0, 1) the NCE part."""
    model = ps.build_model(model_cfg)
    state = jax.device_put(host_state, ps.train_state_shardings(model_cfg, optim_cfg, mesh))
    max_masked = ps.resolve_max_masked(pretrain_cfg, model_cfg)
    masked = jax.jit(lambda t, k: ps.mask_batch(t, k, pretrain_cfg, max_masked),
                     in_shardings=(shd.batch_sharding(mesh), shd.replicated(mesh)),
                     out_shardings=shd.batch_sharding(mesh))(shd.make_global_batch(tokens, mesh), jax.random.key(4))

    def grads_fn(k):
        def fn(params, batch_stats, masked, weights):
            cfg = dict(pretrain_cfg, micro_batches=k, mlm_weight=weights[0], nce_weight=weights[1])
            return ps.accumulate_gradients(params, batch_stats, masked, jax.random.key(5), model=model,
                                           pretrain_cfg=cfg, mesh=mesh)
        return jax.jit(fn)

    out = {"masked": {k: np.asarray(v) for k, v in masked.items()}}
    for k in (1, 2):
        fn = grads_fn(k)
        for label, weights in (("mlm", (1.0, 0.0)), ("nce", (0.0, 1.0))):
            grads, stats, sums = fn(state.params, state.batch_stats, masked, np.asarray(weights, np.float32))
            out[f"k{k}_{label}"] = dict(grads=flat(grads), batch_stats=flat(stats),
                                        sums={n: float(v) for n, v in sums.items()})

    # Reference: each micro-batch on its own (4 videos), BatchNorm statistics carried from one to
    # the next; per micro-batch its mean MLM loss, its scored count and its InfoNCE.
    def one_micro(params, batch_stats, micro):
        cfg = dict(pretrain_cfg, mlm_weight=1.0, nce_weight=1.0)
        count = (micro["labels"] != -100).sum()
        _, aux = ps.micro_batch_loss(params, batch_stats, micro, jax.random.key(5), model=model,
                                     pretrain_cfg=cfg, total_scored=count, num_micro=1)
        return aux, count

    one_micro = jax.jit(one_micro)
    stats, micro_out = state.batch_stats, []
    for i in range(2):
        micro = jax.tree.map(lambda x: x[i::2], masked)
        aux, count = one_micro(state.params, stats, micro)
        stats = aux["batch_stats"]
        micro_out.append(dict(mlm_mean=float(aux["mlm"]), nce=float(aux["nce"]), count=int(count)))
    out["micro_reference"] = micro_out
    out["micro_reference_batch_stats"] = flat(stats)
    return out
