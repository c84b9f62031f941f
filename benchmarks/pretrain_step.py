"""Speed of the pre-training step (`vimpac_jax.training.pretrain_step`): clips/s, TFLOP/s, memory.

(`--task finetune`: the fine-tuning step instead, `training/finetune_step.py`, by default at the
paper's final shape: T = 10 frames of 256 px, 32 x 32 tokens, a classifier of 101 classes.)

Times the jitted step (masking, backbone, MLM at masked positions, InfoNCE, AdamW) on a fixed
random batch already on the devices (data loading excluded), after a compiling warm-up, over
all devices on 'data' unless --mesh says otherwise. Reports:
  clips/s          2 x videos per step / step time;
  TFLOP/s          REQUIRED training FLOPs / step time: 3 x the forward matmul FLOPs of the
                   layers, the MLM head at the expected number of masked positions, and the
                   projection head (the formula is printed); recomputation (remat), the static
                   K > masked count, softmax/LayerNorm/element-wise work are not counted;
  % of peak        TFLOP/s / the device's bf16 dense peak, looked up from its device kind in
                   PEAK_TFLOPS (H100 / H200: 790, the tensor cores at sustained clocks;
                   NVIDIA's sheet says 989, printed too), TPUs from vimpac_jax/aot/chips.py,
                   or given with --peak-tflops;
  peak memory      device.memory_stats()['peak_bytes_in_use'] where the backend has it (GPU);
  compile time     lowering + XLA compilation of the step: wall and process CPU seconds, and
                   the compiled HLO's instructions (all computations; the entry computation).
--memory-report (any backend, nothing timed or compiled): the bytes the backward pass keeps
from the forward, per clip, from the residuals of the loss's VJP (jax.vjp traced with
jax.eval_shape), as the difference between the batch and twice the batch, so that residuals
that do not grow with the batch (parameter casts) are not counted:
  saved_residual_bytes_per_clip=N
--hlo-report: counts in the step's lowered StableHLO (scatters by dtype and whether their
indices are declared unique, dots by dtypes, the vocabulary dots' shapes and dtypes).

    python benchmarks/pretrain_step.py --preset small --batch-size 64
    python benchmarks/pretrain_step.py --preset small --batch-size 4 --memory-report     # CPU
    python benchmarks/pretrain_step.py --preset tiny --batch-size 8 --frame-size 32 --clip-len 2   # CPU
    python benchmarks/pretrain_step.py --task finetune --preset small --batch-size 32

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

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vimpac_jax import config_schema  # noqa: E402
from vimpac_jax.aot import chips  # noqa: E402
from vimpac_jax.aot.flops import FLOPS_FORMULA, forward_flops_per_clip, required_flops_per_clip  # noqa: E402,F401
from vimpac_jax.configs import common  # noqa: E402
from vimpac_jax.models.model import build_model  # noqa: E402
from vimpac_jax.training import finetune_step as fs  # noqa: E402
from vimpac_jax.training import pretrain_step as ps  # noqa: E402
from vimpac_jax.training import sharding as shd  # noqa: E402
from vimpac_jax.training.optimizer import optim_config  # noqa: E402

PRESETS = ("tiny", "small", "base", "large_half")
# bf16 dense TFLOP/s by device kind (first substring match): (used for % of peak, sheet value).
# H100 SXM / H200: 790, the tensor cores at sustained clocks;
# NVIDIA's data sheets say 989. Others: the sheet value.
PEAK_TFLOPS = (
    ("H200", 790.0, 989.0), ("H100 PCIe", 756.0, 756.0), ("H100", 790.0, 989.0),
    ("A100", 312.0, 312.0), ("L4", 121.0, 121.0),
)  # TPUs: vimpac_jax/aot/chips.py, by exact device kind (v5p's is "TPU v5", v5e's "TPU v5 lite")


def device_name() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    name = f"{jax.device_count()} x {kind}"
    if d.platform == "cpu":
        name += f" ({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs)"
    return name


def device_peak_tflops(override: float = 0.0):
    """(peak used, sheet value or None, where it came from) for the first device."""
    kind = getattr(jax.devices()[0], "device_kind", "")
    if override > 0:
        return override, None, "--peak-tflops"
    tpu = chips.generation_of_device_kind(kind)
    if tpu is not None:
        return tpu.bf16_tflops, tpu.bf16_tflops, f"vimpac_jax/aot/chips.py entry {tpu.name!r} for device kind {kind!r}"
    for name, used, sheet in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return used, sheet, f"table entry {name!r} for device kind {kind!r}"
    return None, None, f"no table entry for device kind {kind!r} (give --peak-tflops)"


def _program_bytes(compiled):
    """Device memory of one compiled program (arguments + outputs - donated + temporaries), from
    XLA's memory analysis: per program, unlike the process-wide peak of memory_stats()."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001  (backends without the analysis)
        return None


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
    p.add_argument("--task", choices=("pretrain", "finetune"), default="pretrain")
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--batch-size", type=int, default=64, help="videos per step (2 clips each), all devices")
    p.add_argument("--clip-len", type=int, default=None, help="default 5 (pretrain), 10 (finetune)")
    p.add_argument("--frame-size", type=int, default=None,
                   help="pixels; tokens are frame_size/8 per side; default 128 (pretrain), 256 (finetune)")
    p.add_argument("--num-classes", type=int, default=101, help="finetune: classifier width")
    p.add_argument("--mask-blocks", type=int, default=5)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    p.add_argument("--remat", default="none", help="model.remat policy: none, full, dots, dots_no_batch, save:<names>")
    p.add_argument("--attention-impl", default=None, choices=(None, "xla", "cudnn"),
                   help="without dropout, jax.nn.dot_product_attention with this implementation (lines with "
                        "[CLS] prepended); default: the einsum line attention of models/attention.py")
    p.add_argument("--attention-dropout", type=float, default=None,
                   help="default: the preset's (0.1); > 0 needs the probabilities, so the einsum path runs")
    p.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation inside the step")
    p.add_argument("--set", action="append", default=[], metavar="BLOCK.FIELD=VALUE",
                   help="override a config field, e.g. pretrain.mlm_positions=clip, model.embed_lookup="
                        "compute_dtype, pretrain.dropout_rng=threefry (repeatable)")
    p.add_argument("--memory-report", action="store_true",
                   help="print saved_residual_bytes_per_clip=N (no timing, no compilation) and exit")
    p.add_argument("--hlo-report", action="store_true",
                   help="count ops in the step's lowered StableHLO and exit (nothing compiled or timed)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.add_argument("--profile-dir", default="", help="after timing, trace 3 more steps with jax.profiler here")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (one may be -1)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's peak TFLOP/s for the fraction (default: PEAK_TFLOPS by device kind)")
    p.add_argument("--append-results", default=os.path.join(_HERE, "RESULTS.md"),
                   help="markdown file to append a section to ('' = do not write)")
    p.add_argument("--note", default="", help="free text for the results section (e.g. the machine's load)")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
        p.error("--batch-size and --steps must be > 0, --warmup >= 0")
    args.clip_len = args.clip_len or (10 if args.task == "finetune" else 5)
    args.frame_size = args.frame_size or (256 if args.task == "finetune" else 128)
    args.overrides = {}
    for item in args.set:
        block, _, rest = item.partition(".")
        field, eq, value = rest.partition("=")
        if block not in ("model", "pretrain") or not field or not eq:
            p.error(f"--set {item!r}: expected model.FIELD=VALUE or pretrain.FIELD=VALUE")
        args.overrides[(block, field)] = value
    try:
        args.mesh_sizes = dict(zip(shd.MESH_AXES, (int(x) for x in args.mesh.split(",")), strict=True))
    except ValueError:
        p.error(f"--mesh must be three integers data,fsdp,tensor, got {args.mesh!r}")
    return args


def _typed(old, value: str):
    """A --set value in the type of the field's default."""
    if isinstance(old, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(old, int):
        return int(value)
    if isinstance(old, float):
        return float(value)
    return None if value == "None" else value


def configs(args):
    """(model_cfg, optim_cfg, pretrain_cfg) dicts of the run, --set overrides applied."""
    model_cfg = common.model_config(args.preset, task=args.task, clip_len=args.clip_len, frame_size=args.frame_size,
                                    num_classes=args.num_classes if args.task == "finetune" else 0).to_dict()
    model_cfg.update(dtype=args.dtype, remat=args.remat, attention_impl=args.attention_impl)
    if args.attention_dropout is not None:
        model_cfg["attention_dropout"] = args.attention_dropout
    optim_cfg = optim_config(total_steps=1000, warmup=0)  # lr > 0 from the first step
    pretrain_cfg = ps.pretrain_config(mask_blocks=args.mask_blocks, micro_batches=args.micro_batches).to_dict()
    for (block, field), value in args.overrides.items():
        target = model_cfg if block == "model" else pretrain_cfg
        if field not in target:
            raise SystemExit(f"--set {block}.{field}: no such field (known: {', '.join(sorted(target))})")
        target[field] = _typed(target[field], value)
    # Blocks built here rather than loaded: checked as `config_utils.load_config` checks a loaded
    # config (a --set value out of its range is named before anything compiles).
    config_schema.check_block(args.task, "model", model_cfg)
    config_schema.check_block("pretrain", "pretrain", pretrain_cfg)
    return model_cfg, optim_cfg, pretrain_cfg


def _fake_batch(args, model_cfg):
    t, h, w = model_cfg["clip_len"], model_cfg["height"], model_cfg["width"]
    rng = np.random.default_rng(0)
    if args.task == "finetune":
        return {"tokens": rng.integers(0, 8192, (args.batch_size, t, h, w), dtype=np.int32),
                "label": rng.integers(0, args.num_classes, (args.batch_size,), dtype=np.int32)}
    return {"tokens": rng.integers(0, 8192, (args.batch_size, 2, t, h, w), dtype=np.int32)}


def clips_per_step(args) -> int:
    return args.batch_size * (1 if args.task == "finetune" else 2)


def _nbytes(x) -> int:
    """Bytes of an array shape; a PRNG key array (a remat'd layer keeps its dropout key) by its key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.eval_shape(jax.random.key_data, x)
    return x.size * jnp.dtype(x.dtype).itemsize


def saved_residual_bytes(args, videos: int) -> int:
    """Bytes of the residuals the loss's VJP keeps for `videos` videos (traced, not run)."""
    model_cfg, optim_cfg, pretrain_cfg = configs(args)
    model = build_model(model_cfg)
    state = ps.abstract_train_state(model_cfg, optim_cfg)
    batch = {k: jax.ShapeDtypeStruct((videos, *v.shape[1:]), v.dtype) for k, v in _fake_batch(args, model_cfg).items()}
    max_masked = ps.resolve_max_masked(pretrain_cfg, model_cfg)

    def residuals(params, batch_stats, batch, key):
        if args.task == "finetune":
            def loss(p):
                out = model.apply({"params": p}, batch["tokens"], train=True, rngs={"dropout": key})
                return fs.classification_loss(out["logits"], batch["label"])
        else:
            masked = ps.mask_batch(batch["tokens"], key, pretrain_cfg, max_masked)
            drop = ps.dropout_key(key, pretrain_cfg["dropout_rng"]) if hasattr(ps, "dropout_key") else key

            def loss(p):
                return ps.micro_batch_loss(p, batch_stats, masked, drop, model=model, pretrain_cfg=pretrain_cfg,
                                           total_scored=1, num_micro=1)[0]
        return jax.vjp(loss, params)[1]

    vjp = jax.eval_shape(residuals, state.params, state.batch_stats, batch, jax.random.key(0))
    return sum(_nbytes(x) for x in jax.tree.leaves(vjp))


def memory_report(args) -> dict:
    small, large = saved_residual_bytes(args, args.batch_size), saved_residual_bytes(args, 2 * args.batch_size)
    per_clip = (large - small) / clips_per_step(args)
    return dict(saved_residual_bytes_per_clip=int(round(per_clip)), saved_residual_bytes_fixed=int(small - per_clip
                * clips_per_step(args)), saved_residual_bytes_at_batch=int(small))


def hlo_report(module_text: str, vocab_sizes=(8197, 8256)) -> dict:
    """Counts in the lowered StableHLO of the step (before XLA's backend passes, which on CPU
    rewrite bfloat16 dots to float32): scatters by result dtype and whether their indices are
    declared unique (duplicates serialise atomics on GPUs), dot_generals by result dtype, and
    the operand -> result dtypes of the dots that have a vocabulary-sized dimension. Each
    function of the module is counted once (a private function called twice counts once)."""
    scatters, dots, vocab = collections.Counter(), collections.Counter(), collections.Counter()
    tensor = r"tensor<((?:\d+x)*)(\w+?)>"
    for m in re.finditer(r'"stablehlo.scatter"\(.*?unique_indices = (true|false).*?\}\) : \(.*?\) -> ' + tensor,
                         module_text, re.S):
        scatters[f"{m.group(3)}, unique_indices={m.group(1)}"] += 1
    for m in re.finditer(rf"stablehlo.dot_general .*? : \({tensor}, {tensor}\) -> {tensor}", module_text):
        dots[f"{m.group(2)} x {m.group(4)} -> {m.group(6)}"] += 1
        dims = {int(d) for g in (1, 3, 5) for d in m.group(g).split("x") if d}
        if dims & set(vocab_sizes):
            vocab[f"{m.group(1)}{m.group(2)} . {m.group(3)}{m.group(4)} -> {m.group(5)}{m.group(6)}"] += 1
    return dict(scatters=dict(scatters), dot_generals=dict(dots), vocab_dots=dict(vocab))


def compiled_instruction_counts(hlo_text: str) -> dict:
    """Instructions of an optimized HLO module: in all its computations (a scanned layer's body
    counts once) and in its entry computation."""
    total = entry = 0
    in_entry = False
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("ENTRY "):
            in_entry = True
        elif stripped == "}":
            in_entry = False
        elif " = " in stripped and not stripped.startswith(("HloModule", "//")) and line.startswith((" ", "\t")):
            total += 1
            entry += in_entry
    return dict(total=total, entry=entry)


def run(args) -> dict:
    model_cfg, optim_cfg, pretrain_cfg = configs(args)
    mesh = shd.make_mesh(args.mesh_sizes)
    state = ps.init_train_state(model_cfg, optim_cfg, jax.random.key(0), mesh)
    if args.task == "finetune":
        step = fs.make_finetune_step(model_cfg, optim_cfg, mesh=mesh)
    else:
        step = ps.make_pretrain_step(model_cfg, optim_cfg, pretrain_cfg, mesh)
    batch = shd.make_global_batch(_fake_batch(args, model_cfg), mesh)
    keys = jax.random.split(jax.random.key(1), args.warmup + args.steps)
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = step.lower(state, batch, keys[0])
    if args.hlo_report:
        return dict(compile_s=0.0, hlo=hlo_report(lowered.as_text()))
    compiled = lowered.compile()
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    hlo_instructions = compiled_instruction_counts(compiled.as_text())
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
    if args.profile_dir:
        with jax.profiler.trace(args.profile_dir, create_perfetto_trace=True):
            for i in range(3):
                state, metrics = compiled(state, batch, keys[i])
            jax.block_until_ready(state)
    program_bytes = _program_bytes(compiled)

    clips = clips_per_step(args)
    parts, ratio = required_flops_per_clip(args.task, model_cfg, pretrain_cfg)
    train_flops = 3 * sum(parts.values()) * clips
    tflops = train_flops / step_s / 1e12
    peak, sheet, peak_source = device_peak_tflops(args.peak_tflops)
    return dict(
        model_cfg=model_cfg, pretrain_cfg=pretrain_cfg, clips=clips, step_s=step_s, clips_per_s=clips / step_s,
        compile_s=compile_s, compile_cpu_s=compile_cpu_s, hlo_instructions=hlo_instructions,
        parts=parts, mask_ratio=ratio,
        max_masked=ps.resolve_max_masked(pretrain_cfg, model_cfg) if args.task == "pretrain" else None,
        train_flops=train_flops, tflops=tflops, xla_flops=xla_flops,
        peak_tflops=peak, sheet_tflops=sheet, peak_source=peak_source,
        peak_fraction=tflops / peak if peak else None, sheet_fraction=tflops / sheet if sheet else None,
        peak_bytes=peak_memory_bytes(), program_bytes=program_bytes,
        metrics={k: float(v) for k, v in metrics.items()},
        mesh=dict(mesh.shape), hlo=None,
    )


def report(args, r) -> str:
    cfg = r["model_cfg"]
    attention = ("einsum lines" if cfg["attention_dropout"] > 0 or not cfg["attention_impl"]
                 else f"jax.nn.dot_product_attention({cfg['attention_impl']})")
    mem = f"{r['peak_bytes'] / 2**30:.1f} GiB" if r["peak_bytes"] is not None else "n/a (backend keeps no statistics)"
    frac = f"{100 * r['peak_fraction']:.1f}%" if r["peak_fraction"] is not None else "n/a"
    sheet = f", {100 * r['sheet_fraction']:.1f}% of the sheet's {r['sheet_tflops']:g}" if r["sheet_fraction"] else ""
    program = "n/a" if r["program_bytes"] is None else f"{r['program_bytes'] / 2**30:.2f} GiB"
    per_clip = {k: v / 1e9 for k, v in r["parts"].items()}
    changed = ", ".join(f"{b}.{f}={v}" for (b, f), v in args.overrides.items()) or "none"
    pcfg = r["pretrain_cfg"]
    step_line = (f"step: mlm_positions {pcfg.get('mlm_positions', 'clip')}, vocab multiple "
                 f"{pcfg.get('mlm_vocab_multiple', 1)}, dropout rng {pcfg.get('dropout_rng', 'threefry')}, "
                 f"embed lookup {cfg.get('embed_lookup', 'compute_dtype')}; --set: {changed}")
    lines = [
        f"device: {device_name()}, mesh {r['mesh']}",
        f"model: {args.preset} ({cfg['num_layers']} x {cfg['hidden_dim']}, layout {cfg['layout']}), "
        f"T={cfg['clip_len']}, {cfg['height']}x{cfg['width']} tokens, dtype {cfg['dtype']}, remat {cfg['remat']}, "
        f"attention {attention}",
        f"task {args.task}; batch: {args.batch_size} videos = {r['clips']} clips, micro-batches {args.micro_batches}; "
        f"masked ratio {100 * r['mask_ratio']:.1f}% (K = {r['max_masked']} listed positions per clip)",
        step_line,
        f"peak: {r['peak_tflops'] or 'unknown'} TFLOP/s bf16 dense ({r['peak_source']})",
        FLOPS_FORMULA,
        "forward GFLOPs per clip: " + ", ".join(f"{k} {v:.4g}" for k, v in per_clip.items()),
        f"compile {r['compile_s']:.1f} s ({r['compile_cpu_s']:.1f} process CPU s); compiled HLO: "
        f"{r['hlo_instructions']['total']} instructions in all computations, {r['hlo_instructions']['entry']} "
        f"in the entry",
        f"step {1000 * r['step_s']:.1f} ms; {r['clips_per_s']:.1f} clips/s",
        f"required {r['train_flops'] / 1e12:.4g} TFLOP per step -> {r['tflops']:.4g} TFLOP/s, {frac} of peak{sheet} "
        f"(XLA's own count of the compiled step, all work included: {r['xla_flops'] / 1e12:.4g} TFLOP)",
        f"peak device memory: {mem} (process-wide); this program (XLA memory analysis): {program}",
        "last step: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(r["metrics"].items())),
    ]
    return "\n".join(lines)


def results_section(args, r) -> str:
    cfg = r["model_cfg"]
    today = datetime.date.today().isoformat()
    mem = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] is not None else "n/a"
    frac = f"{100 * r['peak_fraction']:.1f}" if r["peak_fraction"] is not None else "n/a"
    attention = ("einsum+dropout" if cfg["attention_dropout"] > 0
                 else f"dpa {cfg['attention_impl']}" if cfg["attention_impl"] else "einsum")
    title = "Fine-tuning step" if args.task == "finetune" else "Pre-training step"
    lines = [f"## {title} (`benchmarks/pretrain_step.py`), {today}", "",
             f"Device: {device_name()}; jax {jax.__version__}; mesh {r['mesh']}; random tokens already on the "
             f"devices; {args.steps} timed steps after compiling and {args.warmup} warm-up steps. TFLOP/s counts "
             "required FLOPs only (3 x forward matmuls of the layers, the MLM head at the expected masked "
             "positions, the projection head; formula printed by the script).",
             "Reference (doc §13, one H100, released PyTorch code): Small 371-410 clips/s, Large-Half 68 clips/s.",
             f"Peak {r['peak_tflops'] or 'unknown'} TFLOP/s ({r['peak_source']}); --set: "
             + (", ".join(f"{b}.{f}={v}" for (b, f), v in args.overrides.items()) or "none") + ".", ""]
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
    if args.memory_report:
        m = memory_report(args)
        print(f"{args.task} {args.preset}, dtype {args.dtype}, remat {args.remat}, batch {args.batch_size} videos "
              f"({clips_per_step(args)} clips), --set {args.set or 'none'}: residuals "
              f"{m['saved_residual_bytes_at_batch'] / 2**20:.1f} MiB, of which batch-independent "
              f"{m['saved_residual_bytes_fixed'] / 2**20:.1f} MiB")
        print(f"saved_residual_bytes_per_clip={m['saved_residual_bytes_per_clip']}")
        return 0
    r = run(args)
    if args.hlo_report:
        print(f"lowered StableHLO of the step: {r['hlo']}")
        return 0
    print(report(args, r))
    if args.json:
        import json
        keys = ("clips", "step_s", "clips_per_s", "compile_s", "compile_cpu_s", "hlo_instructions", "tflops", "peak_tflops", "peak_fraction",
                "peak_bytes", "program_bytes", "max_masked")
        print(json.dumps(dict({k: r[k] for k in keys}, preset=args.preset, task=args.task, set=args.set,
                              device=device_name(), jax=jax.__version__)))
    if args.append_results:
        append_results(args.append_results, results_section(args, r))
        print(f"appended to {args.append_results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
