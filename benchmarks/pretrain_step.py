"""Speed of the pre-training step (`vimpac_jax.training.pretrain_step`): clips/s, TFLOP/s, memory.

Times the jitted step (masking, backbone, MLM at masked positions, InfoNCE, AdamW) on a fixed
random batch already on the devices (data loading excluded), after a compiling warm-up, over
all devices on 'data' unless --mesh says otherwise. Reports:
  clips/s          2 x videos per step / step time;
  TFLOP/s          REQUIRED training FLOPs / step time: 3 x the forward matmul FLOPs of the
                   layers, the MLM head at the expected number of masked positions, and the
                   projection head (the formula is printed); recomputation (remat), the static
                   K > masked count, softmax/LayerNorm/element-wise work are not counted;
  % of peak        TFLOP/s / --peak-tflops (e.g. 989 for an H100 SXM's dense bf16 sheet value);
  peak memory      device.memory_stats()['peak_bytes_in_use'] where the backend has it (GPU).

    python benchmarks/pretrain_step.py --preset small --batch-size 64 --peak-tflops 989
    python benchmarks/pretrain_step.py --preset tiny --batch-size 8 --frame-size 32 --clip-len 2   # CPU

Appends a section to benchmarks/RESULTS.md (--append-results '' to skip). Reference (doc §13):
the released PyTorch step on one H100: 371-410 clips/s (Small, 64-128 clips, 26-51 GB) and 68
clips/s (Large-Half, 32 clips, 61 GB).
"""

import os
import sys

# Run as a script, sys.path[0] is benchmarks/, whose tokenize.py would shadow the standard
# library's `tokenize` (imported by inspect/linecache); put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = _ROOT
sys.path.insert(1, os.path.join(_ROOT, "configs"))

import argparse  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402  (configs/common.py)
from vimpac_jax.models.layout import parse_layout  # noqa: E402
from vimpac_jax.training import pretrain_step as ps  # noqa: E402
from vimpac_jax.training import sharding as shd  # noqa: E402
from vimpac_jax.training.masking import expected_mask_ratio  # noqa: E402
from vimpac_jax.training.optimizer import optim_config  # noqa: E402

PRESETS = ("tiny", "small", "base", "large_half")
FLOPS_FORMULA = """\
required FLOPs per clip = 3 x forward (backward = 2 x forward); forward, N = T*H*W tokens (+1 CLS),
d model width, a = attention width (d, or d/2 with halve_att), m = MLP width (4d, or 2d with
halve_mlp), V = 8197, K = expected masked positions = ratio(T,H,W,blocks) * N:
  per layer, per attention block with p parallel attentions over lines of length l_i = 1 + |axes_i|
  (N/|axes_i| lines each):  q,k,v: 3*2*(N+1)*d*a   out: 2*(N+1)*a*d   QK^T and PV: sum_i 4*(N/|axes_i|)*l_i^2*(a/p)
  per layer, MLP: 2*2*(N+1)*d*m
  MLM head at K positions: 2*K*d*d + 2*K*d*V
  projection head on CLS: 2*(d*h + (n-2)*h*h + h*256) for n >= 2 layers of width h"""


def forward_flops_per_clip(cfg, mask_ratio: float) -> dict:
    """Forward matmul FLOPs of one clip, by part (see FLOPS_FORMULA)."""
    t, h, w, d = cfg["clip_len"], cfg["height"], cfg["width"], cfg["hidden_dim"]
    n = t * h * w
    a = d // 2 if cfg.get("halve_att") else d
    m = 2 * d if cfg.get("halve_mlp") else 4 * d
    sizes = {"T": t, "H": h, "W": w}
    layer = 0.0
    for block in parse_layout(cfg.get("layout", "T,H|W")):
        layer += 3 * 2 * (n + 1) * d * a + 2 * (n + 1) * a * d
        for axes in block:
            line = math.prod(sizes[x] for x in axes)
            layer += 4 * (n // line) * (1 + line) ** 2 * (a / len(block))
    layer += 2 * 2 * (n + 1) * d * m
    k = mask_ratio * n
    mlm = 2 * k * d * d + 2 * k * d * cfg.get("vocab_size", 8197)
    hid, layers = cfg.get("proj_hidden_dim", 2048), cfg.get("proj_layers", 2)
    out = cfg.get("proj_dim", 256)
    proj = 2 * (d * hid + (layers - 2) * hid * hid + hid * out) if layers >= 2 else 2 * d * out
    return {"layers": cfg["num_layers"] * layer, "mlm_head": mlm, "proj_head": proj}


def device_name() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    name = f"{jax.device_count()} x {kind}"
    if d.platform == "cpu":
        name += f" ({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs)"
    return name


def peak_memory_bytes():
    """Largest peak over the local devices, or None where the backend keeps no statistics."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001  (backends without statistics raise or return None)
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) if peaks else None


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--batch-size", type=int, default=64, help="videos per step (2 clips each), all devices")
    p.add_argument("--clip-len", type=int, default=5)
    p.add_argument("--frame-size", type=int, default=128, help="pixels; tokens are frame_size/8 per side")
    p.add_argument("--mask-blocks", type=int, default=5)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    p.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass")
    p.add_argument("--attention-impl", default=None, choices=(None, "xla", "cudnn"),
                   help="jax.nn.dot_product_attention implementation (default: jax picks)")
    p.add_argument("--attention-dropout", type=float, default=None,
                   help="default: the preset's (0.1); > 0 needs the probabilities, so the einsum path runs")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation inside the step")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (one may be -1)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak TFLOP/s, for the fraction")
    p.add_argument("--append-results", default=os.path.join(_HERE, "RESULTS.md"),
                   help="markdown file to append a section to ('' = do not write)")
    p.add_argument("--note", default="", help="free text for the results section (e.g. the machine's load)")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
        p.error("--batch-size and --steps must be > 0, --warmup >= 0")
    try:
        args.mesh_sizes = dict(zip(shd.MESH_AXES, (int(x) for x in args.mesh.split(",")), strict=True))
    except ValueError:
        p.error(f"--mesh must be three integers data,fsdp,tensor, got {args.mesh!r}")
    return args


def run(args) -> dict:
    model_cfg = common.model_config(args.preset, task="pretrain", clip_len=args.clip_len,
                                    frame_size=args.frame_size).to_dict()
    model_cfg.update(dtype=args.dtype, remat="full" if args.remat else "none", attention_impl=args.attention_impl)
    if args.attention_dropout is not None:
        model_cfg["attention_dropout"] = args.attention_dropout
    optim_cfg = optim_config(total_steps=1000, warmup=0)  # lr > 0 from the first step
    pretrain_cfg = ps.pretrain_config(mask_blocks=args.mask_blocks, micro_batches=args.micro_batches).to_dict()
    mesh = shd.make_mesh(args.mesh_sizes)
    shape = (args.batch_size, 2, model_cfg["clip_len"], model_cfg["height"], model_cfg["width"])
    tokens = np.random.default_rng(0).integers(0, 8192, shape, dtype=np.int32)

    state = ps.init_train_state(model_cfg, optim_cfg, jax.random.key(0), mesh)
    step = ps.make_pretrain_step(model_cfg, optim_cfg, pretrain_cfg, mesh)
    batch = shd.make_global_batch({"tokens": tokens}, mesh)
    keys = jax.random.split(jax.random.key(1), args.warmup + args.steps)
    start = time.perf_counter()
    compiled = step.lower(state, batch, keys[0]).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    for i in range(args.warmup):
        state, metrics = compiled(state, batch, keys[i])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        state, metrics = compiled(state, batch, keys[i])
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - start) / args.steps

    clips = 2 * args.batch_size
    ratio = expected_mask_ratio((model_cfg["clip_len"], model_cfg["height"], model_cfg["width"]), args.mask_blocks)
    parts = forward_flops_per_clip(model_cfg, ratio)
    train_flops = 3 * sum(parts.values()) * clips
    tflops = train_flops / step_s / 1e12
    return dict(
        model_cfg=model_cfg, clips=clips, step_s=step_s, clips_per_s=clips / step_s, compile_s=compile_s,
        parts=parts, mask_ratio=ratio, max_masked=ps.resolve_max_masked(pretrain_cfg, model_cfg),
        train_flops=train_flops, tflops=tflops, xla_flops=xla_flops,
        peak_fraction=tflops / args.peak_tflops if args.peak_tflops > 0 else None,
        peak_bytes=peak_memory_bytes(), metrics={k: float(v) for k, v in metrics.items()},
        mesh=dict(mesh.shape),
    )


def report(args, r) -> str:
    cfg = r["model_cfg"]
    attention = ("einsum (attention dropout > 0)" if cfg["attention_dropout"] > 0
                 else f"jax.nn.dot_product_attention({cfg['attention_impl'] or 'auto'})")
    mem = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r["peak_bytes"] is not None else "n/a (backend keeps no statistics)"
    frac = f"{100 * r['peak_fraction']:.1f}%" if r["peak_fraction"] is not None else "n/a (no --peak-tflops)"
    per_clip = {k: v / 1e9 for k, v in r["parts"].items()}
    lines = [
        f"device: {device_name()}, mesh {r['mesh']}",
        f"model: {args.preset} ({cfg['num_layers']} x {cfg['hidden_dim']}, layout {cfg['layout']}), "
        f"T={cfg['clip_len']}, {cfg['height']}x{cfg['width']} tokens, dtype {cfg['dtype']}, remat {cfg['remat']}, "
        f"attention {attention}",
        f"batch: {args.batch_size} videos = {r['clips']} clips, micro-batches {args.micro_batches}; "
        f"masked ratio {100 * r['mask_ratio']:.1f}% (K = {r['max_masked']} gathered positions per clip)",
        FLOPS_FORMULA,
        "forward GFLOPs per clip: " + ", ".join(f"{k} {v:.4g}" for k, v in per_clip.items()),
        f"compile {r['compile_s']:.1f} s; step {1000 * r['step_s']:.1f} ms; {r['clips_per_s']:.1f} clips/s",
        f"required {r['train_flops'] / 1e12:.4g} TFLOP per step -> {r['tflops']:.4g} TFLOP/s, {frac} of peak "
        f"(XLA's own count of the compiled step, all work included: {r['xla_flops'] / 1e12:.4g} TFLOP)",
        f"peak device memory: {mem}",
        "last step: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(r["metrics"].items())),
    ]
    return "\n".join(lines)


def results_section(args, r) -> str:
    cfg = r["model_cfg"]
    today = datetime.date.today().isoformat()
    mem = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] is not None else "n/a"
    frac = f"{100 * r['peak_fraction']:.1f}" if r["peak_fraction"] is not None else "n/a"
    attention = "einsum+dropout" if cfg["attention_dropout"] > 0 else (cfg["attention_impl"] or "dpa auto")
    lines = [f"## Pre-training step (`benchmarks/pretrain_step.py`), {today}", "",
             f"Device: {device_name()}; jax {jax.__version__}; mesh {r['mesh']}; random tokens already on the "
             f"devices; {args.steps} timed steps after compiling and {args.warmup} warm-up steps. TFLOP/s counts "
             "required FLOPs only (3 x forward matmuls of the layers, the MLM head at the expected masked "
             "positions, the projection head; formula printed by the script).",
             "Reference (doc §13, one H100, released PyTorch code): Small 371-410 clips/s, Large-Half 68 clips/s.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| preset | T, tokens | clips/step | dtype | remat | attention | micro | clips/s | step ms | "
              "TFLOP/s | % of peak | peak GiB | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
              f"| {args.preset} | {cfg['clip_len']}, {cfg['height']}x{cfg['width']} | {r['clips']} | {cfg['dtype']} | "
              f"{cfg['remat']} | {attention} | {args.micro_batches} | {r['clips_per_s']:.1f} | "
              f"{1000 * r['step_s']:.1f} | {r['tflops']:.4f} | {frac} | {mem} | {r['compile_s']:.1f} |"]
    return "\n".join(lines) + "\n"


def append_results(path: str, section: str) -> None:
    """Appends (mode 'a': other benchmarks write their own sections to the same file)."""
    header = "" if os.path.exists(path) else "# Benchmark results\n\nEach benchmark appends a section; newest last.\n"
    with open(path, "a") as f:
        f.write(header + "\n" + section)


def main(argv=None) -> int:
    args = _parse(argv)
    r = run(args)
    print(report(args, r))
    if args.append_results:
        append_results(args.append_results, results_section(args, r))
        print(f"appended to {args.append_results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
