"""The pre-training step, its sharding and its optimizer.

The multi-device checks run the step in this process on meshes of the 8 CPU devices that
conftest gives every test process (`pretrain_meshes.py`); each mesh's run is made once per module
(fixture `mesh_runs`) and shared by the tests that compare it.

Comparisons of updated parameters use the update Δ = new - initial, per leaf:
‖Δ_mesh - Δ_ref‖ <= 1e-4 ‖Δ_ref‖ + 1e-7. The absolute floor is for leaves whose exact gradient
is zero (attention key biases, the bias before BatchNorm), where only float noise moves them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import pretrain_meshes as pm
from vimpac_jax import config_schema
from vimpac_jax.constants import IGNORE_LABEL, MASK_ID, PAD_ID
from vimpac_jax.conversion.official_names import torch_name
from vimpac_jax.models.model import abstract_variables, build_model
from vimpac_jax.training import optimizer as opt
from vimpac_jax.training import pretrain_step as ps
from vimpac_jax.training import sharding as shd


# ----------------------------------------------------------------------------------------------
# The tiny run on 8 devices: one start for every mesh, each mesh's two steps made once.

@pytest.fixture(scope="module")
def start():
    """The configs, the one-device initial state (flat), the perturbed host state every mesh
    starts from (see `pm.perturbed`) and the tokens."""
    model_cfg, optim_cfg, pretrain_cfg = pm.tiny_configs()
    one = shd.make_mesh(pm.MESHES["one_device"], devices=jax.devices()[:1])
    init, _, state = pm.initial_state(model_cfg, optim_cfg, one)
    host_state = pm.perturbed(jax.device_get(state))
    return dict(configs=(model_cfg, optim_cfg, pretrain_cfg), init=init, host_state=host_state,
                initial_params=pm.flat(host_state.params), tokens=pm.tiny_tokens())


def _mesh(name):
    devices = jax.devices()[:1] if name == "one_device" else jax.devices()[:8]
    return shd.make_mesh(pm.MESHES[name], devices=devices)


@pytest.fixture(scope="module")
def mesh_runs(start):
    """mesh_runs(name) -> `pm.run_mesh` on mesh `name` of pm.MESHES, run once per module."""
    done = {}

    def run(name):
        if name not in done:
            done[name] = pm.run_mesh(name, _mesh(name), *start["configs"], start["host_state"], start["tokens"])
        return done[name]

    return run


@pytest.fixture(scope="module")
def accum(start):
    return pm.accumulation(_mesh("data4_tensor2"), *start["configs"], start["host_state"], start["tokens"])


# ----------------------------------------------------------------------------------------------
# Optimizer: schedules, weight-decay mask, clipping.

def _transformers_lr(kind, step, lr, warm, total):
    """The released trainer's schedules (transformers' get_*_schedule_with_warmup), rewritten."""
    if step < warm:
        return lr * step / max(1, warm)
    if kind == "constant":
        return lr
    progress = (step - warm) / max(1, total - warm)
    if kind == "linear":
        return lr * max(0.0, (total - step) / max(1, total - warm))
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("kind", opt.SCHEDULES)
def test_schedules_match_the_released_trainer(kind):
    cfg = opt.optim_config(schedule=kind, learning_rate=3e-4, warmup=0.1, total_steps=200)
    schedule = opt.make_schedule(cfg)
    assert opt.warmup_steps(cfg) == 20
    for step in (0, 1, 10, 19, 20, 21, 77, 110, 199, 200):
        expected = _transformers_lr(kind, step, 3e-4, 20, 200)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-6 * 3e-4), step


def test_schedule_options():
    assert opt.warmup_steps(dict(warmup=7, total_steps=100)) == 7  # >= 1: a number of steps
    assert opt.warmup_steps(dict(warmup=0.05, total_steps=1000)) == 50
    no_warmup = opt.make_schedule(dict(learning_rate=1e-3, schedule="linear", warmup=0, total_steps=10))
    assert float(no_warmup(0)) == pytest.approx(1e-3) and float(no_warmup(5)) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="optim.schedule"):
        opt.make_schedule(dict(learning_rate=1e-3, schedule="step", warmup=0, total_steps=10))
    with pytest.raises(ValueError, match="warm-up"):
        opt.make_schedule(dict(learning_rate=1e-3, schedule="linear", warmup=20, total_steps=10))


_RELEASED_NO_DECAY = (".bias", "LayerNorm.weight", ".ln.weight", "ln_1.weight", "ln_2.weight", "ln_3.weight",
                      "ln_pre.weight", "ln_post.weight")  # vimpac/pretrain.py, Trainer.train


@pytest.mark.parametrize("pre_ln", [False, True])
def test_decay_mask_follows_the_released_names(pre_ln):
    """Same parameters exempt as the released name list, except the MLM head's LayerNorm scale
    ('mlm_head.transform.2.weight', missed by the list), unless match_released_decay=True."""
    cfg = pm.tiny_model_config(pre_ln=pre_ln)
    params = abstract_variables(build_model(cfg), cfg)["params"]
    ours = opt.decay_mask(params)
    released = opt.decay_mask(params, match_released=True)
    differ = []
    for path, decayed in jax.tree_util.tree_flatten_with_path(ours)[0]:
        keys = tuple(k.key for k in path)
        name = torch_name(("params", *keys), pre_ln)
        by_name = not any(pattern in name for pattern in _RELEASED_NO_DECAY)
        leaf = released
        for k in keys:
            leaf = leaf[k]
        assert leaf == by_name, name
        if decayed != by_name:
            differ.append(keys)
    assert differ == [("mlm_head", "ln", "scale")]
    # What the paper says, spelled out on a few leaves.
    assert not ours["backbone"]["ln_post" if pre_ln else "ln_pre"]["scale"]
    assert not ours["backbone"]["layer_0"]["mlp"]["fc"]["bias"]
    assert ours["backbone"]["layer_0"]["mlp"]["fc"]["kernel"]
    assert ours["backbone"]["token_embed"]["embedding"] and ours["backbone"]["pos_embed"]["temporal"]
    assert ours["proj_head"]["bn_0"]["scale"] and not ours["proj_head"]["bn_0"]["bias"]  # as released


def test_adamw_decays_only_masked_leaves_and_clips():
    params = {"backbone": {"layer_0": {"ln": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)},
                                       "mlp": {"fc": {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.full((3,), 2.0)}}}},
              "proj_head": {"bn_0": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)}}}
    tx, _ = opt.make_optimizer(opt.optim_config(learning_rate=0.1, schedule="constant", warmup=0, total_steps=10,
                                                weight_decay=0.5, clip_grad_norm=1.0))
    # Zero gradient: Adam's step is 0, the update is the decoupled decay -lr * wd * p alone.
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    decayed = {("backbone", "layer_0", "mlp", "fc", "kernel"), ("proj_head", "bn_0", "scale")}
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        keys = tuple(k.key for k in path)
        np.testing.assert_allclose(u, -0.1 * 0.5 * 2.0 if keys in decayed else 0.0, rtol=1e-6, err_msg=str(keys))
    # Clipping: the first moment after one update is (1 - b1) * clipped gradient.
    tx, _ = opt.make_optimizer(opt.optim_config(b1=0.9, clip_grad_norm=1.0, warmup=0, total_steps=10))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    norm = float(optax.tree.norm(grads))
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    mu = state[1][0].mu["backbone"]["layer_0"]["mlp"]["fc"]["kernel"]
    np.testing.assert_allclose(mu, 0.1 * 3.0 / norm, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Sharding helpers (no devices needed).

def test_mesh_shape_from_config():
    assert shd.mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert shd.mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2)
    assert shd.mesh_shape({"data": 2, "fsdp": 4, "tensor": 1}, 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        shd.mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        shd.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_fit_spec_replicates_what_does_not_divide():
    mesh = jax.sharding.AbstractMesh((1, 4, 2), shd.MESH_AXES)
    assert shd.fit_spec(P("tensor", "fsdp"), (8197, 64), mesh) == P(None, "fsdp")  # 8197 = 7 x 1171
    assert shd.fit_spec(P("fsdp", "tensor"), (64, 256), mesh) == P("fsdp", "tensor")
    assert shd.fit_spec(P(("data", "fsdp")), (6, 3), mesh) == P()
    assert shd.fit_spec(P(("data", "fsdp")), (8, 3), mesh) == P(("data", "fsdp"))


def test_state_shardings_follow_the_rules():
    """Moments get their parameter's sharding; counters and BatchNorm statistics replicated."""
    cfg = pm.tiny_model_config()
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    sh = ps.train_state_shardings(cfg, opt.optim_config(), mesh)
    assert sh.params["backbone"]["layer_0"]["mlp"]["fc"]["kernel"].spec == P("fsdp", "tensor")
    assert sh.params["backbone"]["token_embed"]["embedding"].spec == P("tensor", "fsdp")
    assert sh.params["backbone"]["ln_pre"]["scale"].spec == P()
    adam = sh.opt_state[1][0]
    fc_kernel = sh.params["backbone"]["layer_0"]["mlp"]["fc"]["kernel"]
    assert adam.mu["backbone"]["layer_0"]["mlp"]["fc"]["kernel"] is fc_kernel
    assert adam.nu["mlm_head"]["dense"]["kernel"] is sh.params["mlm_head"]["dense"]["kernel"]
    assert adam.count.spec == P() and sh.step.spec == P()
    assert all(s.spec == P() for s in jax.tree.leaves(sh.batch_stats))


def test_rules_must_cover_every_logical_axis():
    cfg = pm.tiny_model_config()
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rules = tuple(r for r in shd.LOGICAL_AXIS_RULES if r[0] != "mlp")
    with pytest.raises(ValueError, match="'mlp'"):
        ps.train_state_shardings(cfg, opt.optim_config(), mesh, rules)


# ----------------------------------------------------------------------------------------------
# Batch arrangement and masking (one device).

def test_views_major_and_strided_micro_batches():
    x = 10 * np.arange(6)[:, None] + np.arange(2)[None, :]  # [videos, views]: 10 * video + view
    np.testing.assert_array_equal(ps.views_major(jnp.asarray(x)), [0, 10, 20, 30, 40, 50, 1, 11, 21, 31, 41, 51])
    micro = ps.split_micro_batches(jnp.asarray(x), 3)
    assert micro.shape == (3, 2, 2)
    np.testing.assert_array_equal(micro[1], [[10, 11], [40, 41]])  # videos 1 and 4


def test_mask_batch_scores_what_it_masks():
    _, _, pretrain_cfg = pm.tiny_configs()
    tokens = jnp.asarray(pm.tiny_tokens())
    m = jax.jit(lambda t, k: ps.mask_batch(t, k, pretrain_cfg, 6))(tokens, jax.random.key(0))
    b, v = tokens.shape[:2]
    assert m["inputs"].shape == tokens.shape and m["positions"].shape == m["labels"].shape == (b, v, 6)
    flat_in, flat_tok = m["inputs"].reshape(b, v, -1), tokens.reshape(b, v, -1)
    valid = m["labels"] != IGNORE_LABEL
    at = lambda x: np.take_along_axis(np.asarray(x), np.asarray(m["positions"]), axis=-1)  # noqa: E731
    np.testing.assert_array_equal(at(flat_tok)[valid], np.asarray(m["labels"])[valid])
    assert (at(flat_in)[valid] == MASK_ID).all()
    masked_here = np.asarray(flat_in != flat_tok)
    np.testing.assert_array_equal(masked_here.sum(-1), m["num_masked"])
    assert (np.asarray(m["num_masked"]) >= valid.sum(-1)).all() and valid.sum() > 0
    assert not (masked_here & (np.asarray(flat_tok) == PAD_ID)).any()


def _abstract_step_inputs(model_cfg, optim_cfg, batch_shape):
    state = ps.abstract_train_state(model_cfg, optim_cfg)
    return state, {"tokens": jax.ShapeDtypeStruct(batch_shape, jnp.int32)}, jax.random.key(0)


def test_step_rejects_bad_batches_before_compiling():
    model_cfg, optim_cfg, pretrain_cfg = pm.tiny_configs()
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    step = ps.make_pretrain_step(model_cfg, optim_cfg, pretrain_cfg, mesh)
    with pytest.raises(ValueError, match=r"batch\['tokens'\] must be \[B, 2, T, H, W\]"):
        jax.eval_shape(step, *_abstract_step_inputs(model_cfg, optim_cfg, (4, 2, 3, 4, 4)))
    step3 = ps.make_pretrain_step(model_cfg, optim_cfg, dict(pretrain_cfg, micro_batches=3), mesh)
    with pytest.raises(ValueError, match="micro_batches=3 must divide"):
        jax.eval_shape(step3, *_abstract_step_inputs(model_cfg, optim_cfg, (4, 2, 2, 4, 4)))


def test_bad_pretrain_config_is_named():
    model_cfg, optim_cfg, pretrain_cfg = pm.tiny_configs()
    with pytest.raises(ValueError) as e:  # the block's check where a config is built (config_schema)
        config_schema.check_block("pretrain", "pretrain", dict(pretrain_cfg, micro_batches=0, mask_kind="box"))
    assert "config.pretrain.micro_batches=0 must be >= 1" in str(e.value)
    assert "config.pretrain.mask_kind='box' must be one of 'block', 'iid'" in str(e.value)


def test_bfloat16_compute_keeps_float32_state():
    model_cfg, optim_cfg, pretrain_cfg = pm.tiny_configs()
    model_cfg = dict(model_cfg, dtype="bfloat16")
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    step = ps.make_pretrain_step(model_cfg, optim_cfg, dict(pretrain_cfg, micro_batches=2), mesh)
    state, metrics = jax.eval_shape(step, *_abstract_step_inputs(model_cfg, optim_cfg, (4, 2, 2, 4, 4)))
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state, state.batch_stats))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert set(metrics) == {"total_loss", "mlm_loss", "nce_loss", "mask_accuracy", "mask_ratio", "pad_ratio",
                            "dropped_ratio", "grad_norm", "learning_rate"}
    assert all(m.shape == () and m.dtype == jnp.float32 for m in metrics.values())


def test_make_global_batch_one_process():
    mesh = shd.make_mesh({"data": -1})
    n = jax.device_count()
    local = {"tokens": np.arange(2 * n * 3, dtype=np.int32).reshape(2 * n, 3)}
    batch = shd.make_global_batch(local, mesh)
    assert batch["tokens"].shape == (2 * n, 3) and batch["tokens"].sharding == shd.batch_sharding(mesh)
    np.testing.assert_array_equal(batch["tokens"], local["tokens"])


# ----------------------------------------------------------------------------------------------
# 8 CPU devices: two steps on each mesh against one device.

MULTI_DEVICE_MESHES = [m for m in pm.MESHES if m != "one_device"]


def _assert_updates_close(new, ref, initial, rtol=1e-4, atol=1e-7):
    for name, r in ref.items():
        d_new, d_ref = np.float64(new[name]) - initial[name], np.float64(r) - initial[name]
        err = np.linalg.norm(d_new - d_ref)
        bound = rtol * np.linalg.norm(d_ref) + atol
        assert err <= bound, f"{name}: |Δ-Δref|={err:.3g}, |Δref|={np.linalg.norm(d_ref):.3g}"


def _assert_leaves_close(new, ref, rtol, atol):
    for name, r in ref.items():
        err = np.linalg.norm(np.float64(new[name]) - np.float64(r))
        assert err <= rtol * np.linalg.norm(np.float64(r)) + atol, f"{name}: error {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", MULTI_DEVICE_MESHES)
def test_mesh_matches_one_device(start, mesh_runs, mesh_name):
    """Two steps on (data=8), (data=4, tensor=2), (data=2, fsdp=4): same metrics, parameters,
    optimizer state and BatchNorm statistics (global batch statistics) as on one device."""
    ref, got = mesh_runs("one_device"), mesh_runs(mesh_name)
    for step in range(2):
        for name, value in ref["metrics"][step].items():
            assert got["metrics"][step][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, name)
    assert ref["metrics"][0]["learning_rate"] > 0 and ref["metrics"][0]["nce_loss"] > 0
    assert ref["metrics"][0]["pad_ratio"] == pytest.approx(2 * 16 / (8 * 2 * 32))  # two PAD frames
    _assert_updates_close(got["params"], ref["params"], start["initial_params"])
    _assert_leaves_close(got["batch_stats"], ref["batch_stats"], rtol=1e-5, atol=0)
    _assert_leaves_close(got["opt_state"], ref["opt_state"], rtol=1e-4, atol=1e-8)
    assert got["opt_state"]["1/0/.count"] == 2


@pytest.mark.slow
def test_masking_identical_across_meshes(mesh_runs):
    ref = mesh_runs("one_device")["masked"]
    assert (ref["labels"] != IGNORE_LABEL).sum() > 0
    for mesh_name in MULTI_DEVICE_MESHES:
        for name, value in ref.items():
            np.testing.assert_array_equal(mesh_runs(mesh_name)["masked"][name], value, err_msg=f"{mesh_name}/{name}")


@pytest.mark.slow
def test_parameters_and_batch_are_sharded(mesh_runs):
    for mesh_name in MULTI_DEVICE_MESHES:
        got = mesh_runs(mesh_name)
        assert got["batch_spec"] == (("data", "fsdp"),) and got["batch_devices"] == 8
    # tensor=2: MLP and attention split, the 8197-row vocabulary does not divide: replicated.
    specs = mesh_runs("data4_tensor2")["specs"]
    assert specs["mlp_fc"] == ("fsdp", "tensor") and specs["query"] == ("fsdp", "tensor")
    assert specs["embedding"] == (None, "fsdp")
    # fsdp=4: the model width of every weight split.
    specs = mesh_runs("data2_fsdp4")["specs"]
    assert specs["mlp_fc"][0] == "fsdp" and specs["embedding"][1] == "fsdp"


@pytest.mark.slow
def test_init_is_born_sharded_and_mesh_independent(start):
    """init_train_state on (data=2, fsdp=4) gives the one-device values, already split."""
    fsdp, shards, _ = pm.initial_state(*start["configs"][:2], _mesh("data2_fsdp4"))
    one = start["init"]
    for name, value in one.items():
        np.testing.assert_array_equal(fsdp[name], value, err_msg=name)
    assert shards["backbone/token_embed/embedding"] == (8197, 64 // 4)  # each device holds a quarter
    assert shards["backbone/layer_0/mlp/fc/kernel"] == (64 // 4, 256)
    assert shards["backbone/ln_pre/scale"] == (64,)
    np.testing.assert_array_equal(one["backbone/ln_pre/scale"], 1.0)
    assert np.std(one["backbone/token_embed/embedding"]) == pytest.approx(0.02, rel=0.05)


@pytest.mark.slow
def test_infonce_gradient_sharded_matches_one_device():
    """16 clips over 8 devices (2 each): the gradient equals the one-device one, and the
    gradient of device 0's clip moves when a clip on device 4 (one of its negatives) moves:
    every device's clips get gradient from the negatives held by other devices."""
    nce = pm.nce_gradients()
    assert nce["out_devices"] == 8 and nce["rows_on_device0"] == (0, 2)
    ref = nce["reference"]
    assert np.linalg.norm(nce["sharded"] - ref) <= 1e-6 * np.linalg.norm(ref)
    assert np.abs(nce["sharded_moved"][0] - nce["sharded"][0]).max() > 1e-4


# ----------------------------------------------------------------------------------------------
# Gradient accumulation (on the (data=4, tensor=2) mesh).

@pytest.mark.slow
def test_accumulation_mlm_part_equals_one_large_batch(accum):
    """k=2 micro-batches of 4 videos give the MLM loss, accuracy and gradient of one batch of 8:
    the MLM loss of an update is the mean over ALL its scored positions (each micro-batch's
    summed loss divided by the update's total count). The projection head gets none of it."""
    one, two = accum["k1_mlm"], accum["k2_mlm"]
    assert two["sums"]["mlm"] == pytest.approx(one["sums"]["mlm"], rel=1e-6)
    assert two["sums"]["correct"] == one["sums"]["correct"]
    _assert_leaves_close(two["grads"], one["grads"], rtol=1e-5, atol=1e-6)
    assert all(np.abs(g).max() == 0 for name, g in one["grads"].items() if name.startswith("proj_head"))
    assert np.linalg.norm(one["grads"]["backbone/token_embed/embedding"]) > 1e-3


@pytest.mark.slow
def test_accumulation_weights_positions_not_micro_batches(accum):
    """With unequal mask counts, the count-weighted mean (ours, = one large batch) differs from
    the mean of per-micro-batch means (the released trainer's accumulation)."""
    micro = accum["micro_reference"]
    counts = [m["count"] for m in micro]
    assert counts[0] != counts[1]
    weighted = sum(m["mlm_mean"] * m["count"] for m in micro) / sum(counts)
    per_micro = sum(m["mlm_mean"] for m in micro) / len(micro)
    ours = accum["k2_mlm"]["sums"]["mlm"]
    assert ours == pytest.approx(weighted, rel=1e-6)
    assert abs(ours - per_micro) > 100 * 1e-6 * abs(ours)


@pytest.mark.slow
def test_accumulation_nce_uses_micro_batch_negatives(accum):
    """NCE of k=2 = mean of each micro-batch's own InfoNCE (4 videos: 6 negatives per clip),
    not the InfoNCE of all 8 videos; BatchNorm statistics updated once per micro-batch."""
    micro = accum["micro_reference"]
    two, one = accum["k2_nce"]["sums"]["nce"], accum["k1_nce"]["sums"]["nce"]
    assert two == pytest.approx(np.mean([m["nce"] for m in micro]), rel=1e-5)
    assert abs(two - one) > 1e-2 * abs(one)
    _assert_leaves_close(accum["k2_nce"]["batch_stats"], accum["micro_reference_batch_stats"], rtol=1e-5, atol=0)
    assert all(np.abs(g).max() > 0 for name, g in accum["k2_nce"]["grads"].items()
               if name.startswith("proj_head/linear"))
    assert all(np.abs(g).max() == 0 for name, g in accum["k2_nce"]["grads"].items() if name.startswith("mlm_head"))
