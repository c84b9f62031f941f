"""The pre-training step's memory-traffic changes keep its values: distinct padding positions,
masked positions packed per micro-batch (and what happens when a micro-batch exceeds the
bound), the padded vocabulary and the compute-dtype backward of the MLM logits, the float32
token lookup, the dropout key; and the benchmark's memory report and peak table."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pretrain_meshes as pm
from vimpac_jax import config_schema
from vimpac_jax.constants import IGNORE_LABEL
from vimpac_jax.models.heads import PAD_LOGIT, MLMHead, tied_logits
from vimpac_jax.models.losses import mlm_loss
from vimpac_jax.models.model import build_model
from vimpac_jax.training import masking
from vimpac_jax.training import pretrain_step as ps


def test_padding_positions_are_distinct_and_unscored():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 8192, (6, 2, 4, 4), dtype=np.int32))
    out = masking.mask_tokens(jax.random.PRNGKey(1), tokens, num_blocks=2, max_masked=12)
    labels = np.asarray(out.labels).reshape(6, -1)
    for pos, ok, row in zip(np.asarray(out.positions), np.asarray(out.position_valid), labels):
        assert len(set(pos.tolist())) == len(pos)  # no duplicate index for the gather's gradient
        assert (row[pos[~ok]] == IGNORE_LABEL).all() and (row[pos[ok]] != IGNORE_LABEL).all()
        np.testing.assert_array_equal(pos[~ok], np.flatnonzero(row == IGNORE_LABEL)[:(~ok).sum()])


def test_packed_bound_is_the_quantile_of_the_clips_total():
    clip = (2, 4, 4)
    assert masking.masked_positions_bound(clip, num_blocks=2, clips=8) == 8 * 2 * 4  # hard: 8 x n x box
    bound = masking.masked_positions_bound(clip, num_blocks=2, quantile=0.99, clips=8, multiple_of=1)
    totals = np.asarray(masking.block_mask(jax.random.PRNGKey(7), (8 * 4000, *clip), 2)).reshape(4000, -1).sum(1)
    assert 0.985 <= (totals <= bound).mean() <= 0.997  # the sum's quantile, not 8 per-clip ones
    assert bound < 8 * masking.masked_positions_bound(clip, num_blocks=2, quantile=0.99, multiple_of=1)


def test_pack_micro_batch_keeps_the_first_scored_and_drops_the_rest():
    positions = jnp.asarray([[1, 4, 0, 2], [0, 3, 5, 1], [2, 0, 1, 3], [7, 6, 0, 1]], jnp.int32)
    labels = jnp.asarray([[10, 11, -100, -100], [12, 13, 14, -100], [15, -100, -100, -100],
                          [16, 17, 18, 19]], jnp.int32)
    pack = jax.jit(ps.pack_micro_batch, static_argnames=("clip_tokens", "groups", "bound"))  # not op by op
    packed, packed_labels = pack(positions, labels, clip_tokens=8, groups=2, bound=4)
    # group 0 = clips 0, 1 (5 scored, bound 4: the 5th, clip 1's position 5, is dropped)
    np.testing.assert_array_equal(packed[0], [1, 4, 8, 11])
    np.testing.assert_array_equal(packed_labels[0], [10, 11, 12, 13])
    # group 1 = clips 2, 3 (5 scored too): first four in order
    np.testing.assert_array_equal(packed[1], [2, 15, 14, 8])
    np.testing.assert_array_equal(packed_labels[1], [15, 16, 17, 18])
    packed, packed_labels = pack(positions, labels, clip_tokens=8, groups=2, bound=6)
    np.testing.assert_array_equal(packed_labels[0], [10, 11, 12, 13, 14, -100])
    assert len(set(np.asarray(packed[0]).tolist())) == 6  # padding from unscored entries: distinct


@pytest.fixture(scope="module")
def tiny_step_inputs():
    model_cfg, _, pretrain_cfg = pm.tiny_configs()
    model = build_model(model_cfg)
    # jit throughout this module: one compilation each instead of op-by-op dispatch (which
    # compiles every distinct primitive on its own: most of these tests' time on CPU).
    variables = flax.linen.unbox(jax.jit(model.init)({"params": jax.random.key(0)}, jnp.zeros((2, 2, 4, 4), jnp.int32)))
    params = jax.jit(lambda p: jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), p))(
        variables["params"])
    tokens = jnp.asarray(pm.tiny_tokens())
    return model_cfg, pretrain_cfg, model, params, variables.get("batch_stats", {}), tokens


def _mlm_sum_and_grad(inputs, pretrain_cfg, masked, mesh=None):
    model, params, batch_stats = inputs

    def loss(p):
        _, aux = ps.micro_batch_loss(p, batch_stats, masked, jax.random.key(2), model=model,
                                     pretrain_cfg=dict(pretrain_cfg, mlm_weight=1.0, nce_weight=0.0),
                                     total_scored=1, num_micro=1)
        return aux["mlm"], aux["correct"]
    (mlm, correct), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(mlm), float(correct), grads


def test_packed_positions_and_padded_vocabulary_give_the_released_loss(tiny_step_inputs):
    """float32: packed per micro-batch + vocabulary padded to 64 = K slots per clip, unpadded
    (the same scored set); the summed MLM loss and its gradient agree."""
    model_cfg, pretrain_cfg, model, params, stats, tokens = tiny_step_inputs
    clip_cfg = dict(pretrain_cfg, mlm_positions="clip", mlm_vocab_multiple=1, max_masked=0)
    packed_cfg = dict(pretrain_cfg, mlm_positions="micro_batch", mlm_vocab_multiple=64, max_masked=0)
    max_masked = ps.resolve_max_masked(packed_cfg, model_cfg)
    masked = jax.jit(lambda t, k: ps.mask_batch(t, k, clip_cfg, max_masked))(tokens, jax.random.key(4))
    assert int((np.asarray(masked["labels"]) != IGNORE_LABEL).sum()) == int(masked["num_masked"].sum())  # nothing dropped
    ref = _mlm_sum_and_grad((model, params, stats), clip_cfg, masked)
    got = _mlm_sum_and_grad((model, params, stats), packed_cfg, masked)
    assert got[0] == pytest.approx(ref[0], rel=1e-6) and got[1] == ref[1]
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(ref[2])):  # per leaf, as test_pretrain_step
        a, b = np.asarray(a), np.asarray(b)  # in numpy: not one compiled subtraction per leaf shape
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-6


def test_micro_batch_beyond_the_bound_drops_its_last_positions(tiny_step_inputs):
    """A bound below the micro-batch's masked count: the first M scored positions (clips in
    views-major order, positions in row-major order) are scored, the rest are not, and the
    update's denominator (scored_count) counts only the scored ones: the loss is the mean
    cross entropy over exactly those, computed here from the full-clip logits."""
    model_cfg, pretrain_cfg, model, params, stats, tokens = tiny_step_inputs
    cfg = dict(pretrain_cfg, mlm_positions="micro_batch", packed_quantile=0.01, max_masked=0)
    per_clip = ps.resolve_max_masked(cfg, model_cfg)
    masked = jax.jit(lambda t, k: ps.mask_batch(t, k, cfg, per_clip))(tokens, jax.random.key(4))
    bound = ps.packed_masked_bound(cfg, (2, 4, 4), 16, per_clip)
    scored = int((np.asarray(masked["labels"]) != IGNORE_LABEL).sum())
    assert bound < scored  # the micro-batch overflows
    assert int(jax.jit(lambda m: ps.scored_count(m, cfg))(masked)) == bound
    mlm, _, _ = _mlm_sum_and_grad((model, params, stats), cfg, masked)
    # Reference: logits at every position, labels kept for the first `bound` scored positions.
    inputs = ps.views_major(np.asarray(masked["inputs"]))
    logits = jax.jit(lambda p, x: model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                              rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]))(
        params, inputs)[0]["mlm_logits"]
    full_labels = np.full(inputs.shape, IGNORE_LABEL, np.int32).reshape(16, -1)
    pos, lab = np.asarray(ps.views_major(masked["positions"])), np.asarray(ps.views_major(masked["labels"]))
    for c in range(16):
        ok = lab[c] != IGNORE_LABEL
        full_labels[c, pos[c][ok]] = lab[c][ok]
    flat = full_labels.reshape(-1)
    flat[np.flatnonzero(flat != IGNORE_LABEL)[bound:]] = IGNORE_LABEL
    mean, count, _ = jax.jit(lambda x, y: mlm_loss(x.reshape(-1, x.shape[-1]), y))(logits, jnp.asarray(flat))
    assert int(count) == bound
    assert mlm == pytest.approx(float(mean) * bound, rel=1e-5)


def test_padded_vocabulary_columns_vanish_from_the_softmax():
    h, table = jax.jit(lambda: (jax.random.normal(jax.random.key(0), (3, 16)),
                                jax.random.normal(jax.random.key(1), (8197, 16))))()
    head = MLMHead(hidden_dim=16, vocab_size=8197)
    variables = jax.jit(head.init)(jax.random.key(2), h, table)
    plain = np.asarray(jax.jit(head.apply)(variables, h, table))
    padded = np.asarray(jax.jit(lambda v, h, t: head.apply(v, h, t, vocab_multiple=64))(variables, h, table))
    assert plain.shape == (3, 8197) and padded.shape == (3, 8256)
    np.testing.assert_allclose(padded[:, :8197], plain, rtol=1e-5, atol=1e-5)  # GEMM shapes differ
    assert (padded[:, 8197:] == PAD_LOGIT).all()
    loss = jax.jit(lambda logits: mlm_loss(logits, jnp.asarray([0, 8196, IGNORE_LABEL]))[0])
    np.testing.assert_allclose(loss(padded), loss(plain), rtol=1e-6)


def test_vocabulary_logits_backward_runs_in_the_compute_dtype():
    h, table = jax.jit(lambda: (jax.random.normal(jax.random.key(0), (8, 32), jnp.bfloat16),
                                jax.random.normal(jax.random.key(1), (128, 32), jnp.bfloat16)))()
    from benchmarks.pretrain_step import hlo_report
    loss = lambda h, t: (tied_logits(h, t) ** 2).sum()  # noqa: E731
    module = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, table).as_text()
    # forward and both backward GEMMs: bf16 operands, f32 accumulation and result
    assert hlo_report(module, vocab_sizes=(128,))["dot_generals"] == {"bf16 x bf16 -> f32": 3}
    plain = lambda h, t: (jnp.einsum("kd,vd->kv", h, t, preferred_element_type=jnp.float32) ** 2).sum()  # noqa: E731
    module = jax.jit(jax.grad(plain, argnums=(0, 1))).lower(h, table).as_text()
    assert "f32 x bf16 -> f32" in str(hlo_report(module)["dot_generals"]) or \
        "f32 x f32 -> f32" in str(hlo_report(module)["dot_generals"])  # what autodiff gives instead
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))  # compiled (not op by op), as a training step runs it
    got, ref = grads(h, table), grads(h.astype(jnp.float32), table.astype(jnp.float32))
    for a, b in zip(got, ref):
        assert a.dtype == jnp.bfloat16
        assert np.linalg.norm(np.asarray(a, np.float32) - b) <= 2e-2 * np.linalg.norm(b)


def test_float32_token_lookup_same_values_float32_gradient_scatter(tiny_step_inputs):
    cfg = pm.tiny_model_config(dtype="bfloat16")
    tokens = jnp.asarray(pm.tiny_tokens()[:, 0])
    outs, jaxprs = {}, {}
    # The two lookups take the float32 parameters of the module's tiny model (bfloat16 compute
    # keeps float32 parameters: the same tree), with no initialisation of their own to compile.
    _, _, _, params, batch_stats, _ = tiny_step_inputs
    variables = {"params": params, "batch_stats": batch_stats}
    for lookup in ("float32", "compute_dtype"):
        model = build_model(dict(cfg, embed_lookup=lookup))
        outs[lookup] = jax.jit(model.apply)(variables, tokens)["hiddens"]
        grad = jax.grad(lambda p: model.apply({**variables, "params": p}, tokens)["hiddens"].astype(jnp.float32).sum())
        jaxprs[lookup] = str(jax.make_jaxpr(grad)(variables["params"]))
    np.testing.assert_array_equal(outs["float32"], outs["compute_dtype"])
    scatter = lambda text: [ln.split("=")[0] for ln in text.splitlines() if "scatter-add" in ln]  # noqa: E731
    assert any("f32[8197,64]" in s for s in scatter(jaxprs["float32"]))
    assert any("bf16[8197,64]" in s for s in scatter(jaxprs["compute_dtype"]))
    with pytest.raises(ValueError, match="embed_lookup"):
        build_model(dict(cfg, embed_lookup="int8")).init({"params": jax.random.key(0)}, tokens)


def test_dropout_key_is_a_function_of_the_step_key():
    step_key = jax.random.fold_in(jax.random.key(0), 7)
    a, b = ps.dropout_key(step_key, "rbg"), ps.dropout_key(step_key, "rbg")
    assert str(jax.random.key_impl(a)) == str(jax.random.key_impl(jax.random.key(0, impl="rbg")))
    bits = lambda k: np.asarray(jax.random.bernoulli(k, 0.9, (1000,)))  # noqa: E731
    np.testing.assert_array_equal(bits(a), bits(b))  # same (seed, step): same masks (exact resume)
    other = ps.dropout_key(jax.random.fold_in(jax.random.key(0), 8), "rbg")
    assert not np.array_equal(bits(a), bits(other))
    assert ps.dropout_key(step_key, "threefry") is step_key
    with pytest.raises(ValueError, match="dropout_rng='philox'"):
        config_schema.check_block("pretrain", "pretrain", dict(ps.pretrain_config(), dropout_rng="philox"))


def test_benchmark_memory_report_and_peak_table(capsys, monkeypatch):
    from benchmarks import pretrain_step as bps
    assert bps.main(["--preset", "tiny", "--frame-size", "32", "--clip-len", "2", "--batch-size", "2",
                     "--memory-report"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("saved_residual_bytes_per_clip=")]
    assert len(line) == 1 and int(line[0].split("=")[1]) > 0
    assert bps.device_peak_tflops(123.0)[0] == 123.0

    class Device:
        device_kind = "NVIDIA H200"
    monkeypatch.setattr(jax, "devices", lambda: [Device()])
    assert bps.device_peak_tflops()[:2] == (790.0, 989.0)
    # TPUs by exact device kind: v5p's chips are "TPU v5", v5e's "TPU v5 lite" (a substring match
    # gave v5p the v5e's 197).
    Device.device_kind = "TPU v5"
    assert bps.device_peak_tflops()[:2] == (459.0, 459.0)
    Device.device_kind = "TPU v5 lite"
    assert bps.device_peak_tflops()[:2] == (197.0, 197.0)
