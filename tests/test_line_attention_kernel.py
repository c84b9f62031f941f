"""`model.attention_kernel: pallas`: the Pallas kernel of the axial line attention computes what
`attention._line_attention` computes (outputs and gradients, with key padding and the same
attention-dropout keep masks), in Pallas's interpreter on CPU; and a TPU compile of a model's
pre-training step with it holds the kernels as Mosaic custom-calls."""

import functools
import importlib.util

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimpac_jax.models import attention, line_attention_kernel as lak

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]'; .ci/run installs it)")

KEEP_PROB = 0.75


def _line_attention_masks(plan, a, group, keep):
    """The kernel's keep masks of attention `a` (its windows) as `_line_attention`'s for windows of
    `group` lines (`draw_dropout_masks`' shapes): the same bit for each (line, query, key)."""
    index = next(i for i, k in enumerate(plan.kernels) if k.first <= a < k.first + k.count)
    kernel = plan.kernels[index]
    pairs, bits = (np.asarray(m) for m in keep[index])
    b, n, h = pairs.shape[0], kernel.window_tokens, plan.heads
    heads = slice((a - kernel.first) * h, (a - kernel.first + 1) * h)
    pairs, bits = pairs[:, :, heads], bits.reshape(b, kernel.num_windows, -1, n)[:, :, heads]
    cls_key, cls_query, cls_cls = ((bits >> i) & 1 == 1 for i in range(3))
    # Where each grid token sits in the kernel's windows, and the grid tokens of each line.
    where = np.zeros((2, np.prod(plan.grid)), int)
    for w, tokens in enumerate(kernel.window_tokens_global()):
        where[0, tokens], where[1, tokens] = w, np.arange(n)
    lines = np.asarray(attention.to_lines(np.arange(np.prod(plan.grid)).reshape(1, *plan.grid), plan.attentions[a]))[0]
    win, pos = where[0][lines], where[1][lines]  # [N, L]
    num_lines, length = lines.shape
    key_index = np.arange(length)[None, None, :]  # the kernel's row of a key: its position in the line
    line_pairs = pairs[:, win[:, :, None], :, key_index, pos[:, :, None]]  # [N, L (query), L (key), B, h]
    line_pairs = einops.rearrange(line_pairs, "n l k b h -> b n h l k")
    line_cls = einops.rearrange(cls_key[:, win, :, pos], "n l b h -> b n h l")
    keep_c = einops.rearrange(cls_query[:, win, :, pos], "n l b h -> b n h l")
    keep_cc = einops.rearrange(cls_cls[:, win[:, 0], :, pos[:, 0]], "n b h -> b n h")  # at the line's first token
    windows = np.zeros((b, num_lines // group, h, group * length, group * length), bool)
    grouped = line_pairs.reshape(b, num_lines // group, group, h, length, length)
    for g in range(group):
        windows[:, :, :, g * length:(g + 1) * length, g * length:(g + 1) * length] = grouped[:, :, g]
    cls_windows = einops.rearrange(line_cls, "b (w g) h l -> b w h (g l)", g=group)
    return (windows, cls_windows, einops.rearrange(keep_c, "b (w g) h l -> b w h g l", g=group),
            einops.rearrange(keep_cc, "b (w g) h -> b w h g", g=group))


def _reference(plan, groups, qkv_cls, qkv, key_is_pad, keep):
    """`_line_attention` for each attention of the block (windows of groups[a] lines), on the
    projections split as `AxialAttention.attend_projected` splits them."""
    h, f = plan.heads, plan.heads * plan.head_dim
    outs_c, outs = [], []
    for a, axes in enumerate(plan.attentions):
        lines = attention.to_lines(qkv[..., 3 * f * a:3 * f * (a + 1)], axes)  # [B, N, L, 3F]
        b, n, length = lines.shape[:3]
        q, k, v = einops.rearrange(lines, "b (w g) l (s h d) -> s b w h (g l) d", g=groups[a], s=3, h=h)
        qc, kc, vc = einops.rearrange(qkv_cls[:, 3 * f * a:3 * f * (a + 1)], "b (s h d) -> s b h d", s=3, h=h)
        pad = attention.to_lines(key_is_pad, axes).reshape(b, n // groups[a], groups[a] * length)
        masks = None if keep is None else tuple(jnp.asarray(m) for m in keep[a])
        out, out_c = attention._line_attention(q, k, v, qc, kc, vc, pad, masks, KEEP_PROB, length)
        out = einops.rearrange(out, "b w h (g l) d -> b (w g) l (h d)", g=groups[a])
        outs.append(attention.from_lines(out, axes, plan.grid))
        outs_c.append(out_c.reshape(b, f))
    return jnp.concatenate(outs_c, -1), jnp.concatenate(outs, -1)


def _values_and_grads(fn, *args, masks=(), lowered_text=False):
    """fn(*args, *masks)'s outputs, and the gradients w.r.t. args of a fixed random projection of
    them; with lowered_text, also the StableHLO text of the program (lowered once, for both). The
    masks are arguments of the program, not constants in it (large ones slow its compile)."""
    def loss(*args):
        out_c, out = fn(*args)
        weights = jax.random.normal(jax.random.key(7), (out_c.size + out.size,))
        return jnp.dot(jnp.concatenate([out_c.ravel(), out.ravel()]), weights), (out_c, out)

    lowered = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)).lower(*args, *masks)
    (_, outs), grads = lowered.compile()(*args, *masks)
    return (outs, grads, lowered.as_text()) if lowered_text else (outs, grads)


def _draw_inputs(plan, batch, seed, dropout):
    """Random inputs of `block_attention` for `plan`: ([CLS]'s q, k, v [B, F] each, the grid's q,
    k, v [B, T, H, W, F] each, the grid's bias [3, F] (which the kernel adds), key_is_pad [B, T,
    H, W] with the first clip's first frame all padding, the kernel's keep masks
    (`draw_keep_masks`) or None). Drawn by numpy, the masks in one program: eagerly each of jax's
    random ops and slices compiled a program of its own."""
    f = len(plan.attentions) * plan.heads * plan.head_dim
    rng = np.random.default_rng(seed)
    qkv_cls = tuple(rng.standard_normal((batch, f), np.float32) for _ in range(3))
    qkv = tuple(rng.standard_normal((batch, *plan.grid, f), np.float32) for _ in range(3))
    bias = rng.standard_normal((3, f), np.float32)
    key_is_pad = rng.random((batch, *plan.grid)) < 0.3
    key_is_pad[0, 0] = True  # a frame of padding
    keep = _draw_keep_masks(jax.random.key(seed), KEEP_PROB, batch, plan) if dropout else None
    return qkv_cls, qkv, bias, jnp.asarray(key_is_pad), keep


_draw_keep_masks = jax.jit(lak.draw_keep_masks, static_argnums=(1, 2, 3))

# The mesh test's block and clips (4: over 2 x 2 devices). The case of the same block below
# draws as many clips from the same seed, so the mesh test's unsharded call is that case's kernel
# call: `_kernel_values_and_grads` computes it once for both.
MESH_BLOCK, MESH_CLIPS = ((("H",), ("W",)), (2, 4, 8), 2), 4


@functools.cache
def _kernel_values_and_grads(plan, batch, dropout):
    """block_attention's outputs and gradients (`_values_and_grads`) on `_draw_inputs(plan,
    batch, 0, dropout)`, for one device; cached (a plan is hashable)."""
    qkv_cls, qkv, bias, key_is_pad, keep = _draw_inputs(plan, batch, 0, dropout)
    return _values_and_grads(lambda c, x, bias, pad, keep: lak.block_attention(plan, c, x, bias, pad, keep, KEEP_PROB),
                             qkv_cls, qkv, bias, masks=(key_is_pad, keep))


@pytest.mark.parametrize("attentions, grid, heads, groups, dropout", [
    # Temporal lines of 3 (16 per kernel window), `_line_attention` in windows of 8 lines.
    ((("T",),), (3, 4, 8), 2, (8,), True),
    # Height and width lines of one block together (one window per frame), windows of 1 line.
    ((("H",), ("W",)), (2, 4, 8), 2, (1, 1), True),
    # Four heads of 32 per 128 lanes, no dropout.
    ((("W",),), (2, 4, 8), 4, (4,), False),
    # Height and width in kernels of their own (128 px: windows of 16 x 8 and 8 x 16 tokens).
    ((("H",), ("W",)), (2, 16, 16), 2, (2, 2), True),
    # 256 px: a frame (1,024 tokens) is over MAX_WINDOW; windows of 32 x 8 and 4 x 32 tokens.
    ((("H",), ("W",)), (1, 32, 32), 2, (4, 4), True),
    # Split, with two column blocks per attention (eight heads of 32, as Large-Half's).
    ((("H",), ("W",)), (1, 16, 16), 8, (2, 2), True),
])
def test_kernel_equals_line_attention(attentions, grid, heads, groups, dropout):
    plan = lak.Plan(attentions, grid, heads, 128 // 2 if heads == 2 else 32)
    b, f = MESH_CLIPS if (attentions, grid, heads) == MESH_BLOCK else 2, len(attentions) * heads * plan.head_dim
    # q, k, v of [CLS] and the grid, the attentions' heads side by side; the grid's bias, which
    # the kernel adds.
    qkv_cls, qkv, bias, key_is_pad, keep = _draw_inputs(plan, b, 0, dropout)
    keep_lines = None
    if dropout:
        keep_lines = [_line_attention_masks(plan, a, groups[a], keep) for a in range(len(attentions))]
    outs, grads = _kernel_values_and_grads(plan, b, dropout)
    def per_attention(x):  # q, k, v [..., F] each -> [..., C]: per attention [q | k | v] (AttentionBlock)
        return jnp.concatenate([y for a in range(len(attentions)) for y in (z[..., a * f // len(attentions):
                                                                             (a + 1) * f // len(attentions)]
                                                                           for z in x)], axis=-1)

    ref_outs, ref_grads = _values_and_grads(
        lambda c, x, bias, pad, keep: _reference(plan, groups, per_attention(c),
                                                 per_attention([z + bb for z, bb in zip(x, bias)]), pad, keep),
        qkv_cls, qkv, bias, masks=(key_is_pad, keep_lines))
    names = ("[CLS] out", "tokens out", "d qc, kc, vc", "d q, k, v", "d bias")
    # [CLS]'s output and gradients and the bias's gradient are sums over the B*T*H*W tokens, in
    # another order than XLA's: their float32 rounding grows as the root of the number of terms,
    # so beyond 256 tokens their tolerance does too (1e-5 at 256, 2e-5 at 1,024).
    summed = 1e-5 * max(1.0, (b * np.prod(grid) / 256) ** 0.5)
    for name, got, want in zip(names, outs + grads, ref_outs + ref_grads):
        atol = summed if name in ("[CLS] out", "d qc, kc, vc", "d bias") else 1e-5
        for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
            np.testing.assert_allclose(g, w, atol=atol, rtol=1e-5, err_msg=f"{name} [{i}]")
    assert min(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads)) > 0.01  # none trivially zero


def test_kernel_on_a_mesh_runs_per_device_and_equals_one_device():
    # Under a mesh the kernels run on each device's clips (shard_map over the batch axes: XLA
    # cannot partition a Mosaic call); outputs and gradients, the replicated bias's summed over
    # the devices, equal the unsharded call's.
    from vimpac_jax.training import sharding

    plan = lak.Plan(*MESH_BLOCK, 64)
    qkv_cls, qkv, bias, key_is_pad, keep = _draw_inputs(plan, MESH_CLIPS, 0, True)

    def call(c, x, bias, key_is_pad, keep):
        return lak.block_attention(plan, c, x, bias, key_is_pad, keep, KEEP_PROB)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
    clips, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    sharded = jax.device_put((qkv_cls, qkv, bias, key_is_pad, keep), (clips, clips, whole, clips, clips))
    outs, grads, lowered = _values_and_grads(call, *sharded[:3], masks=sharded[3:], lowered_text=True)
    assert "shard_map" in lowered or "sdy.manual_computation" in lowered
    ref_outs, ref_grads = _kernel_values_and_grads(plan, MESH_CLIPS, True)
    for got, want in zip(jax.tree.leaves((outs, grads)), jax.tree.leaves((ref_outs, ref_grads))):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_plan_splits_height_width_where_a_frame_is_too_big_or_wasteful():
    # A small frame: one kernel pair for both attentions (their own windows would be no smaller).
    (joint,) = lak.Plan((("H",), ("W",)), (2, 4, 8), 2, 64).kernels
    assert (joint.first, joint.count, joint.window) == (0, 2, (1, 4, 8))
    # 128 px: a frame of 256 tokens would mask 15/16 of each score matrix; each attention its own.
    height, width = lak.Plan((("H",), ("W",)), (5, 16, 16), 4, 64).kernels
    assert (height.window, height.column_offset, width.window, width.column_offset) == ((1, 16, 8), 0, (1, 8, 16), 2)
    # 256 px (fine-tuning's T = 10 and stage 2): a frame of 1,024 tokens, over MAX_WINDOW; accepted.
    plan = lak.Plan((("H",), ("W",)), (10, 32, 32), 8, 64)
    assert [k.window for k in plan.kernels] == [(1, 32, 8), (1, 4, 32)]
    assert all(k.window_tokens <= lak.MAX_WINDOW for k in plan.kernels)
    # The temporal lines of 10 at 256 px: windows cut along W too (10 x 1 x 8 = 80 tokens, not 320).
    (temporal,) = lak.Plan((("T",),), (10, 32, 32), 8, 64).kernels
    assert temporal.window == (10, 1, 8)


def test_unsupported_head_dim_is_one_error():
    with pytest.raises(ValueError, match="head_dim dividing 128"):
        lak.Plan((("T",),), (5, 16, 16), 8, 48)
    with pytest.raises(ValueError, match="more than 512"):
        lak.Plan((("T", "H"),), (5, 16, 16), 2, 64)


# A whole training step compiled for TPU: the slow layer, as test_compile.py's run compiles.
@pytest.mark.slow
@needs_libtpu
def test_pretrain_step_compiles_for_tpu_with_the_kernel():
    from vimpac_jax.aot import compile as aot
    from vimpac_jax.config_utils import load_config

    config = load_config(["--config", "configs/pretrain.py:runlocal", "--config.model.attention_kernel=pallas",
                          "--config.model.num_layers=1", "--config.model.hidden_dim=256", "--config.model.num_heads=4",
                          "--config.model.height=8", "--config.model.width=8", "--config.data.batch_size=4"])
    # Four chips (mesh data=4): XLA cannot partition a Mosaic call, so the kernels must run per
    # device (shard_map) for the program to compile at all.
    _, (train,) = aot.compile_run(config, aot.tpu_target("v5e-4"), programs=("train",))
    # Two blocks (T, H|W) of one layer: a forward and a backward kernel for each, each a Mosaic
    # custom-call charged at twice its roofline time (hlo_cycles).
    assert train.fits and train.pallas_kernels == 4, train.estimate_method
    charged = [key for key, _ in train.cycles.by_source if key.endswith("[Pallas, charged]")]
    assert all(any(f"attn_{i}" in k and k.startswith(s) for k in charged)
               for i in (0, 1) for s in ("jvp", "transpose")), charged
    assert 0 < train.pallas_cycles < train.estimated_cycles
    assert "4 Pallas kernels charged at twice their roofline time" in train.estimate_method


@needs_libtpu
@pytest.mark.slow
def test_attention_at_256_px_compiles_for_tpu_with_the_kernels():
    """The attention blocks of a layer at fine-tuning's 256-px grid (T = 10, 32 x 32 tokens; also
    stage 2's frames), Large-Half's 8 heads of 64, bf16, dropout on, forward and backward, compiled
    for one v5p chip: the T kernel, and the height and width attentions' a kernel each (a frame of
    1,024 tokens is over MAX_WINDOW for one window of both), each forward and backward, as Mosaic
    custom-calls. The blocks alone, not a whole step: a whole fine-tuning step at this grid took
    ~1.5 min of CPU to compile, nearly all of it libtpu compiling the step's other XLA ops on the
    10,240-token grid; the step's wiring of the kernels is what
    test_pretrain_step_compiles_for_tpu_with_the_kernel compiles."""
    import dataclasses

    from jax.sharding import NamedSharding, PartitionSpec

    from vimpac_jax.aot import compile as aot

    target = aot.tpu_target("v5p-8")
    target = dataclasses.replace(target, devices=target.devices[:1])
    mesh = jax.sharding.Mesh(list(target.devices), ("data",))
    grid, heads, head_dim, clips = (10, 32, 32), 8, 64, 2
    plans = [lak.Plan((("T",),), grid, heads, head_dim), lak.Plan((("H",), ("W",)), grid, heads, head_dim)]
    assert [len(plan.kernels) for plan in plans] == [1, 2]

    def loss(qkv_cls, qkv, key_is_pad, key):  # q, k, v [B, C] and [B, T, H, W, C]: both blocks' columns
        total, first = 0.0, 0
        for i, plan in enumerate(plans):
            f = len(plan.attentions) * heads * head_dim
            columns = lambda x: x[..., first:first + f]  # noqa: E731
            keep = lak.draw_keep_masks(jax.random.fold_in(key, i), KEEP_PROB, clips, plan)
            out_cls, out = lak.block_attention(plan, tuple(map(columns, qkv_cls)), tuple(map(columns, qkv)),
                                               jnp.zeros((3, f), jnp.bfloat16), key_is_pad, keep, KEEP_PROB)
            total, first = total + out_cls.astype(jnp.float32).sum() + out.astype(jnp.float32).sum(), first + f
        return total

    whole = NamedSharding(mesh, PartitionSpec())
    columns = 3 * heads * head_dim
    args = (tuple(jax.ShapeDtypeStruct((clips, columns), jnp.bfloat16, sharding=whole) for _ in range(3)),
            tuple(jax.ShapeDtypeStruct((clips, *grid, columns), jnp.bfloat16, sharding=whole) for _ in range(3)),
            jax.ShapeDtypeStruct((clips, *grid), jnp.bool_, sharding=whole),
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=whole))
    program = aot.Program(name="attention", jitted=jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), args=args,
                          clips=clips, batch=f"{clips} clips")
    report = aot.compile_program(program, target)
    assert report.fits and report.pallas_kernels == 6, report.estimate_method
    assert 0 < report.pallas_cycles < report.estimated_cycles
