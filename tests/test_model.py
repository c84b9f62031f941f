"""Architecture checks of the backbone and heads that the golden files do not cover."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli, run_vimpac
from vimpac_jax.constants import PAD_ID
from vimpac_jax.models.config import model_config
from vimpac_jax.models.layout import parse_layout
from vimpac_jax.models.losses import info_nce
from vimpac_jax.models.model import abstract_variables, build_model

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
# Complete model blocks (models.config.model_config), as build_model takes them.
TINY = model_config(num_layers=2, hidden_dim=96, num_heads=6, clip_len=3, height=4, width=4, proj_layers=2,
                    proj_hidden_dim=32, dropout=0.0, attention_dropout=0.0).to_dict()


def tokens_for(cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 8192, (batch, cfg["clip_len"], cfg["height"], cfg["width"])), jnp.int32)


def init_op_by_op(model, cfg, key):
    """models.model.init_variables's variables, from flax's init run op by op. That compiles one
    program per model; here the ~25 small models of this file share the compilations of their
    ops (the shapes recur), which costs less CPU in all (measured with the suite's XLA flags, jax
    0.10.2: a layout's init and apply compiled, 2-4 s of CPU each, against 0.4-6.6 s op by op,
    the first one dearest). A loss and its gradient, whose eager backward compiles hundreds of
    programs, run compiled (`loss_and_gradients`)."""
    tokens = jnp.zeros((2, cfg["clip_len"], cfg["height"], cfg["width"]), jnp.int32)
    return model.init({"params": key, "dropout": key}, tokens, train=False)


def test_parse_layout_grammar():
    assert parse_layout("T,H|W") == ((("T",),), (("H",), ("W",)))
    assert parse_layout("TxHxW") == ((("T", "H", "W"),),)
    assert parse_layout("T,WxH") == ((("T",),), (("H", "W"),))
    for bad in ["", "T,,H", "T|Q", "TxT", "T,"]:
        with pytest.raises(ValueError):
            parse_layout(bad)


@pytest.mark.parametrize("config,expected", [
    (dict(num_layers=6, hidden_dim=512), 29_442_048),
    (dict(num_layers=12, hidden_dim=768), 119_748_096),
    (dict(num_layers=24, hidden_dim=1024, halve_att=True, halve_mlp=True), 210_106_368),
    (dict(num_layers=6, hidden_dim=768), 63_037_440),
    (dict(num_layers=12, hidden_dim=512), 54_666_240),
    (dict(num_layers=6, hidden_dim=512, layout="T,H,W"), 35_751_936),
    (dict(num_layers=6, hidden_dim=512, layout="TxHxW"), 23_132_160),
])
def test_backbone_parameter_counts_match_paper_table(config, expected):
    cfg = model_config(**config, clip_len=5, height=16, width=16).to_dict()
    params = abstract_variables(build_model(cfg), cfg)["params"]["backbone"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == expected


@pytest.mark.slow
def test_vimpac_params_command_prints_table3_counts(capsys):
    out = run_vimpac("params", "--config", REPO / "configs/pretrain.py:large_half", check=True)
    assert out.stdout.splitlines()[0] == "backbone_params=210106368"
    code, _, err = run_cli(capsys, "params", "--config", REPO / "configs/pretrain.py:small", "--config.model.layot=T")
    assert code != 0 and "layot" in err and "layout" in err


@pytest.mark.parametrize("layout", ["T,H|W", "T,H,W", "T,H", "T", "T|H|W", "H|W,T", "TxHxW", "T,HxW", "HxW|T"])
@pytest.mark.parametrize("pre_ln,halve", [(False, False), (True, True)])
def test_every_layout_runs_and_is_finite(layout, pre_ln, halve):
    """Pre-LN with halve_att crashes the released code; here the output dense maps d_att -> d.
    (One layer: the layers of a stack are alike, so a layout that runs in one runs in all.)"""
    cfg = dict(TINY, num_layers=1, layout=layout, pre_ln=pre_ln, halve_att=halve, halve_mlp=halve)
    model = build_model(cfg)
    variables = init_op_by_op(model, cfg, jax.random.key(0))
    out = model.apply(flax.linen.unbox(variables), tokens_for(cfg))
    assert out["cls"].shape == (2, 96) and out["hiddens"].shape == (2, 3, 4, 4, 96)
    assert np.isfinite(np.asarray(out["hiddens"])).all()


def full_attention_reference(x, cls, q_w, k_w, v_w, heads, pad):
    """Naive joint attention over [CLS] + all T*H*W tokens, for the TxHxW layout."""
    b, d = cls.shape
    seq = jnp.concatenate([cls[:, None], x.reshape(b, -1, x.shape[-1])], axis=1)
    q, k, v = (seq @ w["kernel"] + w["bias"] for w in (q_w, k_w, v_w))
    split = lambda t: t.reshape(b, t.shape[1], heads, -1)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(q.shape[-1] // heads)
    mask = jnp.concatenate([jnp.zeros((b, 1), bool), pad.reshape(b, -1)], axis=1)
    scores = jnp.where(mask[:, None, None, :], -jnp.inf, scores)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), split(v)).reshape(b, seq.shape[1], -1)


def test_joint_attention_and_pad_keys_against_naive_reference():
    from vimpac_jax.models.attention import AxialAttention
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 2, 2, 16)), jnp.float32)
    cls = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
    pad = jnp.zeros((2, 3, 2, 2), bool).at[1, 2].set(True)  # the last frame of row 1 is PAD
    module = AxialAttention(("T", "H", "W"), num_heads=2, head_dim=8)

    @jax.jit
    def module_and_reference(cls, x, pad):
        params = flax.linen.unbox(module.init(jax.random.key(0), cls, x, pad, deterministic=True))
        p = params["params"]
        return (*module.apply(params, cls, x, pad, deterministic=True),
                full_attention_reference(x, cls, p["query"], p["key"], p["value"], 2, pad))

    cls_out, x_out, ref = module_and_reference(cls, x, pad)
    np.testing.assert_allclose(cls_out, ref[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_out.reshape(2, -1, 16), ref[:, 1:], rtol=1e-5, atol=1e-6)


def test_pad_frames_are_invisible_as_keys():
    """A clip padded with a PAD frame gives, on its real frames, the outputs of the same model
    run on the shorter clip: PAD is never a key. (Temporal layout, whose lines span all frames.)"""
    cfg = dict(TINY, layout="T")
    model = build_model(cfg)
    variables = flax.linen.unbox(init_op_by_op(model, cfg, jax.random.key(4)))
    tokens = np.array(tokens_for(cfg))
    tokens[:, -1] = PAD_ID
    padded = model.apply(variables, jnp.asarray(tokens))
    short_cfg = dict(cfg, clip_len=cfg["clip_len"] - 1)
    short_vars = jax.tree.map(lambda a: a, variables)
    pos = short_vars["params"]["backbone"]["pos_embed"]
    pos["temporal"] = pos["temporal"][:-1]
    short = build_model(short_cfg).apply(short_vars, jnp.asarray(tokens[:, :-1]))
    np.testing.assert_allclose(padded["hiddens"][:, :-1], short["hiddens"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(padded["cls"], short["cls"], rtol=1e-5, atol=1e-5)
    # Without the PAD exclusion the same comparison fails (so the test can fail).
    tokens[:, -1] = 5
    unpadded = model.apply(variables, jnp.asarray(tokens))
    assert not np.allclose(unpadded["cls"], short["cls"], atol=1e-3)


def test_mlm_head_is_tied_and_scores_chosen_positions():
    cfg = TINY
    model = build_model(cfg)
    variables = flax.linen.unbox(init_op_by_op(model, cfg, jax.random.key(0)))
    tokens = tokens_for(cfg)
    positions = jnp.asarray([[0, 5, 47], [3, 3, 10]])
    full = model.apply(variables, tokens)["mlm_logits"].reshape(2, -1, 8197)
    picked = model.apply(variables, tokens, positions)["mlm_logits"]
    np.testing.assert_allclose(picked, jnp.take_along_axis(full, positions[..., None], 1), rtol=1e-5, atol=1e-5)
    assert "mlm_head" in variables["params"] and "decoder" not in str(jax.tree_util.tree_structure(variables))
    emb = variables["params"]["backbone"]["token_embed"]["embedding"]
    bumped = jax.tree.map(lambda a: a, variables)
    bumped["params"]["backbone"]["token_embed"]["embedding"] = emb.at[7].add(1.0)
    # The output for code 7 changes through the tied weight even at positions whose input is not 7.
    delta = model.apply(bumped, tokens, positions)["mlm_logits"] - picked
    assert np.abs(np.asarray(delta[..., 7])).max() > np.abs(np.asarray(delta[..., 8])).max()


def test_mlm_codes_scores_the_first_codes_with_the_same_parameters():
    cfg = dict(TINY, mlm_codes=100)
    model, full_model = build_model(cfg), build_model(TINY)
    variables = flax.linen.unbox(init_op_by_op(model, cfg, jax.random.key(0)))
    # Same parameter tree as the full head (checkpoints move between the two).
    assert jax.tree.map(np.shape, variables) == jax.tree.map(
        np.shape, flax.linen.unbox(init_op_by_op(full_model, TINY, jax.random.key(0))))
    variables["params"]["mlm_head"]["bias"] = jnp.arange(8197, dtype=jnp.float32) / 8197  # not all-zero
    tokens, positions = tokens_for(cfg), jnp.asarray([[0, 5, 47], [3, 3, 10]])
    short = model.apply(variables, tokens, positions)["mlm_logits"]
    full = full_model.apply(variables, tokens, positions)["mlm_logits"]
    assert short.shape == (2, 3, 100)
    np.testing.assert_allclose(short, full[..., :100], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mlm_codes"):
        build_model(dict(TINY, mlm_codes=9000))


def test_classifier_is_zero_initialised():
    cfg = dict(TINY, task="finetune", num_classes=5)
    model = build_model(cfg)
    variables = flax.linen.unbox(init_op_by_op(model, cfg, jax.random.key(0)))
    assert not np.asarray(variables["params"]["classifier"]["dense"]["kernel"]).any()
    assert np.asarray(model.apply(variables, tokens_for(cfg))["logits"]).shape == (2, 5)


def test_info_nce_matches_a_direct_formula():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 8))
    loss = float(jax.jit(info_nce)(jnp.asarray(f, jnp.float32)))
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    n, t, total = 3, 0.2, 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        logits = np.array([f[i] @ f[k] / t for k in range(2 * n) if k != i])
        pos = f[i] @ f[partner] / t
        total += -(pos - np.log(np.exp(logits).sum()))
    np.testing.assert_allclose(loss, total / n * t, rtol=1e-5)  # mean per view, summed over views, × t


def test_parameters_carry_logical_axis_names():
    cfg = TINY
    boxed = init_op_by_op(build_model(cfg), cfg, jax.random.key(0))["params"]
    specs = flax.linen.get_partition_spec(boxed)
    assert tuple(specs["backbone"]["token_embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["backbone"]["layer_0"]["mlp"]["fc"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["backbone"]["layer_0"]["attn_0"]["axis_0"]["query"]["kernel"]) == ("embed", "heads")


@functools.partial(jax.jit, static_argnums=0)
def loss_and_gradients(model, variables, tokens):
    """The variance of `model`'s hiddens and its gradient in the parameters, as one program
    (value_and_grad run eagerly compiles every primitive of the forward and backward)."""
    def loss(params):
        return model.apply({**variables, "params": params}, tokens)["hiddens"].astype(jnp.float32).var()

    return jax.value_and_grad(loss)(variables["params"])


@pytest.mark.parametrize("remat", ["full", "dots", "save:qkv,mlp_hidden"])
def test_remat_policies_give_the_same_loss_and_gradients(remat):
    """Recomputation changes what the backward keeps, never the values (tiny model, float32; one
    layer: each layer is recomputed on its own, so depth adds nothing to the claim)."""
    cfg = dict(TINY, num_layers=1, dropout=0.0, attention_dropout=0.0)
    variables = flax.linen.unbox(init_op_by_op(build_model(cfg), cfg, jax.random.key(0)))
    tokens = jnp.asarray(tokens_for(cfg))

    ref, ref_grads = loss_and_gradients(build_model(cfg), variables, tokens)
    got, grads = loss_and_gradients(build_model(dict(cfg, remat=remat)), variables, tokens)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_layers_gives_the_same_parameters_loss_and_gradients(remat):
    """model.scan_layers runs the stack as one lax.scan over the stacked per-layer parameters:
    the same parameter tree (layer_0 ... layer_{L-1}), values and gradients (tiny, float32; two
    layers: a stack whose order and per-layer slices the comparison checks)."""
    cfg = dict(TINY, num_layers=2, remat=remat)
    tokens = jnp.asarray(tokens_for(cfg))
    variables = flax.linen.unbox(init_op_by_op(build_model(cfg), cfg, jax.random.key(0)))
    scanned_model = build_model(dict(cfg, scan_layers=True))
    scanned_init = flax.linen.unbox(init_op_by_op(scanned_model, cfg, jax.random.key(0)))
    assert jax.tree.structure(scanned_init) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(scanned_init), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)

    # Against the plain unrolled stack (recomputation changes no value: the test above), whose
    # compiled loss_and_gradients both parametrisations share.
    ref, ref_grads = loss_and_gradients(build_model(dict(cfg, remat="none")), variables, tokens)
    got, grads = loss_and_gradients(scanned_model, variables, tokens)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["backbone"]["layer_1"]))


def test_scanned_layers_draw_their_dropout_from_the_step_key():
    """Dropout on in a scanned stack: one key per (step key, layer index), so a step is
    reproducible. (The forward only: recomputation changes the backward alone.)"""
    cfg = dict(TINY, num_layers=2, dropout=0.5, attention_dropout=0.5, scan_layers=True)
    model = build_model(cfg)
    variables = flax.linen.unbox(init_op_by_op(model, cfg, jax.random.key(0)))

    @jax.jit
    def hiddens(variables, tokens, key):  # the variables as arguments, not constants of the program
        out, _ = model.apply(variables, tokens, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
        return out["hiddens"]

    tokens = jnp.asarray(tokens_for(cfg))
    one, again, other = (hiddens(variables, tokens, jax.random.key(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(one, again)
    assert np.isfinite(np.asarray(one)).all() and not np.allclose(one, other)


def test_remat_policy_rejects_unknown_names():
    with pytest.raises(ValueError, match="model.remat"):
        build_model(dict(TINY, remat="save:nonsense")).init(jax.random.key(0), jnp.asarray(tokens_for(TINY)))
    with pytest.raises(ValueError, match="model.remat"):
        build_model(dict(TINY, remat="sometimes")).init(jax.random.key(0), jnp.asarray(tokens_for(TINY)))


def test_dropout_has_flax_bits_and_keeps_only_its_mask():
    """models.common.Dropout: the values and gradient of flax's nn.Dropout with the same rng,
    and its backward keeps one boolean mask (no zeros tensor, no copy of the input)."""
    from jax._src.ad_checkpoint import saved_residuals

    from vimpac_jax.models.common import Dropout
    x = jax.jit(lambda: jax.random.normal(jax.random.key(0), (4, 64), jnp.bfloat16))()

    key = jax.random.key(1)

    def loss(module, key):
        return lambda x: module.apply({}, x, deterministic=False, rngs={"dropout": key}).astype(jnp.float32).sum()

    @jax.jit
    def output_and_grad(x, key):  # per module: its output and the gradient of its sum
        return [(m.apply({}, x, deterministic=False, rngs={"dropout": key}), jax.grad(loss(m, key))(x))
                for m in (ours, ref)]

    ours, ref = Dropout(0.25), flax.linen.Dropout(0.25)
    (out, grad), (ref_out, ref_grad) = output_and_grad(x, key)
    np.testing.assert_array_equal(out, ref_out)
    assert 0 < int((out == 0).sum()) < out.size
    np.testing.assert_array_equal(grad, ref_grad)
    saved = [aval for aval, why in saved_residuals(loss(ours, key), x) if "argument" not in why]
    assert [(a.dtype, a.shape) for a in saved] == [(jnp.bool_, x.shape)]


def test_bf16_layer_norm_backward_from_its_output():
    """models.common.layer_norm in bf16: flax's LayerNorm values; gradients within bf16 rounding
    of the float32 LayerNorm's; the backward keeps the output and float32 row statistics, not
    the input."""
    from jax._src.ad_checkpoint import saved_residuals

    from vimpac_jax.models.common import LN_EPS, layer_norm

    @jax.jit
    def inputs():  # x [8, 16, 64] bf16, the output's cotangent g, the LayerNorm's parameters
        x = (3 * jax.random.normal(jax.random.key(0), (8, 16, 64)) + 1).astype(jnp.bfloat16)
        params = {"params": {"scale": 1 + 0.3 * jax.random.normal(jax.random.key(2), (64,)),
                             "bias": 0.1 * jax.random.normal(jax.random.key(3), (64,))}}
        return x, jax.random.normal(jax.random.key(1), x.shape), params

    x, g, params = inputs()
    ours, ref = layer_norm(name="ln", dtype=jnp.bfloat16), flax.linen.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32)

    def loss(module):
        return lambda p, x: (module.apply(p, x).astype(jnp.float32) * g).sum()

    @jax.jit
    def outputs_and_grads(params, x):  # ours and flax's (the latter in float32) outputs and gradients
        return (ours.apply(params, x), ref.apply(params, x).astype(jnp.bfloat16),
                jax.grad(loss(ours), argnums=(0, 1))(params, x),
                jax.grad(loss(ref), argnums=(0, 1))(params, x.astype(jnp.float32)))

    y, ref_y, got, want = outputs_and_grads(params, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(y), np.float32(ref_y), atol=0.04)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.linalg.norm(np.float32(a) - b) / np.linalg.norm(b) < 1e-2
    saved = [aval for aval, why in saved_residuals(lambda x: loss(ours)(params, x), x)
             if "argument" not in why and "common.py" in why]  # the LayerNorm's own, not the loss's
    assert sorted((str(a.dtype), a.shape) for a in saved if a.size > 1) == [("bfloat16", x.shape), ("float32", (8, 16, 1))]


def test_lines_attended_in_windows_equal_lines_attended_one_by_one(monkeypatch):
    """Several lines in one masked window (layout.WINDOW_TOKENS) give each line's own
    attention: the same outputs and gradients as windows of one line, with PAD keys and with
    the attention-dropout masks laid over the windows."""
    import einops

    from vimpac_jax.models import attention

    b, n, length, h, d = 2, 12, 3, 2, 4
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, length, h, d)), jnp.float32) for _ in range(3))
    qc, kc, vc = (jnp.asarray(rng.normal(size=(b, h, d)), jnp.float32) for _ in range(3))
    pad = jnp.asarray(rng.random((b, n, length)) < 0.3)
    keep_lines = jax.jit(attention.draw_dropout_masks, static_argnums=range(1, 7))(jax.random.key(3), 0.8, b, n, length, h, 1)
    group = attention.lines_per_window(n, length, window=4 * length)
    assert group == 4

    def windows_of(keep):  # the per-line masks laid over windows of `group` lines
        tok, tok_cls, c, cc = (x.reshape(b, n // group, group, h, *x.shape[3:]).swapaxes(2, 3) for x in keep)
        tok = jnp.broadcast_to(tok[..., None, :], (*tok.shape[:-1], group, length))
        tok = tok.reshape(b, n // group, h, group * length, group * length)
        return tok, tok_cls.reshape(b, n // group, h, -1), c.reshape(b, n // group, h, group, length), cc[..., 0]

    def attend(g, keep, q, k, v, qc, kc, vc):
        to_w = lambda x: einops.rearrange(x, "b (w g) l h d -> b w h (g l) d", g=g)  # noqa: E731
        out, out_c = attention._line_attention(to_w(q), to_w(k), to_w(v), qc, kc, vc,
                                               pad.reshape(b, n // g, g * length), keep, 0.8, length)
        return einops.rearrange(out, "b w h (g l) d -> b (w g) l h d", g=g), out_c

    @functools.partial(jax.jit, static_argnums=0)
    def outputs_and_grads(g, keep, args):  # attend's outputs, and the gradient of their sum of squares
        loss = lambda *x: sum(jnp.sum(o * o) for o in attend(g, keep, *x))  # noqa: E731
        return attend(g, keep, *args), jax.grad(loss, argnums=range(6))(*args)

    for one, many in ((None, None), (keep_lines, jax.jit(windows_of)(keep_lines))):
        args = (q, k, v, qc, kc, vc)
        (ref, ref_grads), (got, grads) = outputs_and_grads(1, one, args), outputs_and_grads(group, many, args)
        for a, c in zip(ref, got):
            np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)
        for a, c in zip(ref_grads, grads):
            np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-5)
