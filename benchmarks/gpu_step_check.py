"""The pre-training step before and after the memory-traffic changes, side by side in ONE
process, within a time budget (for one call on an H200; `benchmarks/gpu_checks.sh` runs it).

"Before" is the same code with the new switches off (`--before`, config overrides; no
monkeypatching): per-clip K slots, no vocabulary padding, threefry dropout bits, the token
lookup in the compute dtype. "After" is the released defaults of `configs/common.py` and
`pretrain_config()`; ", scan" runs are "after" with `model.scan_layers=true` (the layers as one
`lax.scan`: compile time). The layers' changes have no switch (a dropout that keeps only its mask,
the attention scores recomputed in the backward, [CLS] as row 0 of one stream and not copied
into the lines, one q/k/v matmul per block, the bf16 LayerNorm backward from its output: the
same function up to rounding and which dropout bits land where): both columns run them; the
step without them is 023e0eb's, measured in benchmarks/RESULTS.md (Small, 128 clips: 255
clips/s on an H200). Every run is `benchmarks/pretrain_step.py`'s `run()`; runs are ordered by
importance and a run is skipped (and listed) when the budget left is below its estimate, so a
slow compile cannot eat the rest. Also: micro-benchmarks of the scatters the changes remove
(bf16 scatter-add with the MASK row's duplicates against f32 and against unique indices), and
a 3-step profile of the first "after" run with its top kernels.

    python benchmarks/gpu_step_check.py --out /tmp/check             # on the GPU (~8 min)
    python benchmarks/gpu_step_check.py --dry-run --out /tmp/check   # CPU: tiny shapes, same code paths

Writes OUT/results.jsonl (one JSON object per run), OUT/summary.txt and OUT/trace/.
`program_gib` is the compiled step's own memory (XLA's memory analysis: arguments, outputs and
temporaries), `process_peak_gib` the allocator's peak so far in this process (it never goes down,
so it belongs to the largest run before it). When "small/256 after" fails or its program exceeds
the 40 GiB bound, the same run with `model.remat=dots_no_batch` follows at once.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = _ROOT  # benchmarks/tokenize.py would shadow the standard library's tokenize

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import pretrain_step as bps  # noqa: E402
from vimpac_jax.constants import MASK_ID, NUM_CODES, VOCAB_SIZE  # noqa: E402

# The new switches off: the step as it was before the memory-traffic changes (model switches of
# the layers can be appended with --before-extra).
BEFORE = ("pretrain.mlm_positions=clip", "pretrain.mlm_vocab_multiple=1", "pretrain.dropout_rng=threefry",
          "model.embed_lookup=compute_dtype")
# `model.scan_layers=true` on top of "after": one layer body in the compiled step (compile time).
SCAN = ("model.scan_layers=true",)
# (label, preset, videos per step, before?, estimated seconds incl. compile on an H200, extra --set),
# in the order of what the issue's "done when" needs first: the Small step at 128 clips (profiled),
# Small at 256 clips (its memory bound), Large-Half at 32 clips, then each one's "before", then
# the larger Large-Half batch, then the scan/unrolled comparisons. Large-Half runs scanned: the
# unrolled step compiled 153 s on an H200 at 023e0eb; "before" and "after" are both scanned, so
# the pair differs only in the switches.
RUNS = (
    ("small/128 after", "small", 64, False, 60, ()),
    ("small/256 after", "small", 128, False, 60, ()),
    ("large_half/32 after, scan", "large_half", 16, False, 90, SCAN),
    ("small/128 before", "small", 64, True, 60, ()),
    ("large_half/32 before, scan", "large_half", 16, True, 90, SCAN),
    ("small/256 before", "small", 128, True, 70, ()),
    ("plain-JAX step, 256 clips", "plain_jax", 128, False, 40, ()),
    ("large_half/64 after, scan", "large_half", 32, False, 100, SCAN),
    ("small/128 after, scan", "small", 64, False, 40, SCAN),
    ("large_half/64 before, scan", "large_half", 32, True, 100, SCAN),
    ("large_half/32 after", "large_half", 16, False, 200, ()),
)
# Run right after a run of this label when it failed or its program took more than 40 GiB (the
# issue's bound for Small at 256 clips): the same step with the matmul outputs recomputed.
MEMORY_FALLBACK = {"small/256 after": ("small/256 after, remat dots_no_batch", "small", 128, False, 70,
                                       ("model.remat=dots_no_batch",))}
MEMORY_BOUND_GIB = 40.0


def _bench(fn, *args, n=10):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - start) / n


def scatter_micro(clips: int, tokens_per_clip: int = 1280, d: int = 512) -> dict:
    """ms of the gradient scatters of one step at Small's sizes: the token embedding's (ids with
    14.5% MASK_ID, the measured share) in bf16 and f32, and the MLM gather's (448 slots per
    clip, 185 scored) with all padding at position 0 against distinct padding."""
    rng = np.random.default_rng(0)
    n = clips * tokens_per_clip
    ids = rng.integers(0, NUM_CODES, n).astype(np.int32)
    ids[rng.random(n) < 0.145] = MASK_ID
    ids = jnp.asarray(ids)
    out = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        rows = jnp.ones((n, d), dtype)
        fn = jax.jit(lambda u, i: jnp.zeros((VOCAB_SIZE, d), u.dtype).at[i].add(u))
        out[f"embedding_grad_scatter_{jnp.dtype(dtype).name}_ms"] = _bench(fn, rows, ids)
    slots, scored = min(448, tokens_per_clip), min(185, tokens_per_clip)
    pos = np.zeros((clips, slots), np.int32)
    for c in range(clips):
        pos[c, :scored] = np.sort(rng.choice(tokens_per_clip, scored, replace=False))
    distinct = np.array([np.concatenate([p[:scored], np.setdiff1d(np.arange(tokens_per_clip), p[:scored])
                                         [:slots - scored]]) for p in pos], np.int32)
    hiddens = jnp.ones((clips, tokens_per_clip, d), jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda h, p: jnp.take_along_axis(h, p[..., None], axis=1).astype(jnp.float32).sum()))
    out["mlm_gather_grad_bf16_padding_at_0_ms"] = _bench(grad, hiddens, jnp.asarray(pos))
    out["mlm_gather_grad_bf16_distinct_padding_ms"] = _bench(grad, hiddens, jnp.asarray(distinct))
    return {k: round(v, 3) for k, v in out.items()}


def plain_jax_step(path: str, clips: int, dry_run: bool) -> dict:
    """The plain-JAX measuring stick of ../shared/perf (no dropout; 921 clips/s for Small at 256
    clips on an H200 at 023e0eb's measurement), run in this process (a second process would find
    the GPU's memory preallocated by this one); its own JSON line, parsed."""
    import contextlib
    import io
    import runpy
    argv = ["plain_jax_step.py", "--preset", "tiny" if dry_run else "small", "--clips", str(clips),
            "--steps", "1" if dry_run else "10"] + (["--size", "32", "--T", "2"] if dry_run else [])
    saved, sys.argv = sys.argv, argv
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = saved
    return json.loads(out.getvalue().strip().splitlines()[-1])


def summarize_trace(log_dir: str, steps: int = 3, top: int = 25) -> dict:
    """Top device kernels (ms per step) of the perfetto trace jax.profiler wrote under log_dir."""
    files = sorted(glob.glob(os.path.join(log_dir, "**", "*perfetto_trace.json.gz"), recursive=True))
    if not files:
        return {"trace": f"no perfetto trace under {log_dir}"}
    trace = json.load(gzip.open(files[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items() if "GPU" in name or "/device" in name or "TPU" in name}
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
            total[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    if not total:
        return {"trace": files[-1], "note": "no device events (CPU run?)"}
    busy = sum(total.values())
    return {"trace": files[-1], "kernel_ms_per_step": round(busy / 1e3 / steps, 2),
            "top_kernels": [dict(name=name[:120], ms_per_step=round(us / 1e3 / steps, 3),
                                 pct=round(100 * us / busy, 1), calls_per_step=calls[name] // steps)
                            for name, us in total.most_common(top)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for results.jsonl, summary.txt, trace/")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all runs")
    p.add_argument("--dry-run", action="store_true", help="tiny preset, 32 px, 2 videos: checks the code paths")
    p.add_argument("--before-extra", action="append", default=[], metavar="BLOCK.FIELD=VALUE",
                   help="more overrides for the 'before' runs (e.g. the layers' switches)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--plain-jax", default=os.path.join(_ROOT, ".perf", "plain_jax_step.py"),
                   help="../shared/perf's plain_jax_step.py carried into the checkout (run when present)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    start = time.perf_counter()
    left = lambda: a.budget_s - (time.perf_counter() - start)  # noqa: E731
    results = open(os.path.join(a.out, "results.jsonl"), "w")

    def emit(row):
        print(json.dumps(row), flush=True)
        results.write(json.dumps(row) + "\n")
        results.flush()

    emit(dict(device=bps.device_name(), jax=jax.__version__, peak=bps.device_peak_tflops()))
    emit(dict(micro=scatter_micro(clips=4 if a.dry_run else 128, tokens_per_clip=16 if a.dry_run else 1280,
                                  d=64 if a.dry_run else 512)))
    profiled = False
    queue = list(RUNS)
    while queue:
        label, preset, videos, before, estimate, extra = queue.pop(0)
        if left() < (5 if a.dry_run else estimate):
            emit(dict(run=label, skipped=f"{left():.0f} s left, needs ~{estimate} s"))
            continue
        if preset == "plain_jax":
            if not os.path.exists(a.plain_jax):
                emit(dict(run=label, skipped=f"{a.plain_jax} not carried"))
                continue
            t0 = time.perf_counter()
            try:
                r = plain_jax_step(a.plain_jax, 4 if a.dry_run else 2 * videos, a.dry_run)
            except Exception as e:  # noqa: BLE001
                emit(dict(run=label, failed=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            emit(dict(run=label, clips=r["clips"], step_ms=round(1e3 * r["step_s"], 2), clips_per_s=r["clips_per_s"],
                      tflops=r["required_tflops_per_s"], pct_of_peak=round(100 * r["frac_of_peak"], 1),
                      program_gib=None, compile_s=r["compile_s"], loss=r["loss"],  # its peak_mem_gb is process-wide
                      wall_s=round(time.perf_counter() - t0, 1)))
            continue
        argv = ["--preset", "tiny" if a.dry_run else preset, "--batch-size", str(2 if a.dry_run else videos),
                "--steps", str(1 if a.dry_run else a.steps), "--warmup", "1", "--append-results", ""]
        if a.dry_run:
            argv += ["--frame-size", "32", "--clip-len", "2"]
        for item in ((BEFORE + tuple(a.before_extra)) if before else ()) + extra:
            argv += ["--set", item]
        if not profiled and not before:
            argv += ["--profile-dir", os.path.join(a.out, "trace")]
        t0 = time.perf_counter()
        try:
            r = bps.run(bps._parse(argv))
        except Exception as e:  # noqa: BLE001  (an OOM at one batch must not end the check)
            emit(dict(run=label, failed=f"{type(e).__name__}: {str(e)[:300]}", s=round(time.perf_counter() - t0, 1)))
            if label in MEMORY_FALLBACK:
                queue.insert(0, MEMORY_FALLBACK[label])
            continue
        if label in MEMORY_FALLBACK and (r["program_bytes"] or 0) > MEMORY_BOUND_GIB * 2**30:
            queue.insert(0, MEMORY_FALLBACK[label])
        emit(dict(run=label, clips=r["clips"], step_ms=round(1e3 * r["step_s"], 2), clips_per_s=round(r["clips_per_s"], 1),
                  tflops=round(r["tflops"], 1), pct_of_peak=None if r["peak_fraction"] is None
                  else round(100 * r["peak_fraction"], 1), program_gib=None if r["program_bytes"] is None
                  else round(r["program_bytes"] / 2**30, 2), process_peak_gib=None if r["peak_bytes"] is None
                  else round(r["peak_bytes"] / 2**30, 2), compile_s=round(r["compile_s"], 1),
                  compile_cpu_s=round(r["compile_cpu_s"], 1), hlo_instructions=r["hlo_instructions"],
                  max_masked=r["max_masked"], loss=round(r["metrics"]["total_loss"], 4),
                  wall_s=round(time.perf_counter() - t0, 1)))
        if not profiled and not before:
            profiled = True
            emit(dict(profile_of=label, **summarize_trace(os.path.join(a.out, "trace"))))
    results.close()
    rows = [json.loads(line) for line in open(os.path.join(a.out, "results.jsonl"))]
    lines = [f"{'run':36s} {'clips':>5s} {'ms/step':>8s} {'clips/s':>8s} {'TFLOP/s':>8s} {'%peak':>6s} "
             f"{'GiB':>6s} {'compile':>7s}"]
    for r in rows:
        if "clips_per_s" in r:
            lines.append(f"{r['run']:36s} {r['clips']:5d} {r['step_ms']:8.1f} {r['clips_per_s']:8.1f} {r['tflops']:8.1f} "
                         f"{str(r['pct_of_peak']):>6s} {str(r['program_gib']):>6s} {r['compile_s']:7.1f}")
        elif "top_kernels" in r:
            lines.append(f"profile of {r['profile_of']}: {r['kernel_ms_per_step']} ms of kernels per step")
            lines += [f"  {k['ms_per_step']:8.3f} ms {k['pct']:5.1f}% x{k['calls_per_step']:<4d} {k['name']}"
                      for k in r["top_kernels"]]
        else:
            lines.append(json.dumps(r))
    summary = "\n".join(lines) + f"\ntotal {time.perf_counter() - start:.0f} s\n"
    open(os.path.join(a.out, "summary.txt"), "w").write(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
