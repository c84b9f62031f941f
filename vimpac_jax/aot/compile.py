"""Ahead-of-time compilation of a run's programs, without running them: on a CPU host for a
named TPU slice (libtpu's compile-only devices), or for the local GPUs.

The programs are the ones `vimpac train` jits, built by the same builders (`pretrain_step`,
`finetune_step`, `train_state_shardings`) on the run's mesh (`config.mesh` and its logical-axis
rules, `training/sharding.py`) laid over the target's devices; their arguments are
`jax.ShapeDtypeStruct`s carrying the shardings, so nothing is allocated and no token store is
read (the batch shapes come from the config). As MaxText's `train_compile.py` does, a multi-host
slice is compiled from one process: the mesh spans every device of the description.

What a compile verifies: the program is accepted by XLA for that chip and mesh, and its memory
per chip (arguments, outputs, temporaries) fits the chip's HBM (XLA refuses a program that does
not: RESOURCE_EXHAUSTED, reported as "does not fit"). What it does not: that the program runs,
how fast it runs (the cost model's estimate is an estimate), the input pipeline, collectives
across hosts at run time, or anything about the data.

The estimate. XLA's TPU cost model puts `estimated_cycles` on every instruction of the compiled
program; their sum over one run of the ENTRY computation, loops counted per trip (`hlo_cycles`:
gradient accumulation and `model.scan_layers` are loops), at the chip's clock (`chips.py`:
bf16 peak / the MXUs' FLOPs per cycle) is the step time reported, a sequential sum: custom-calls
and custom fusions carry no estimate and count 0 (their number is reported), except Pallas TPU
kernels (`model.attention_kernel: pallas`), each charged at twice its roofline time from its
`pl.CostEstimate` and reported on a line of its own (`hlo_cycles`: a guess, not a timing), and overlap of
transfers with compute is only what the model put inside each instruction. XLA's own total,
`cost_analysis()['optimal_seconds']`, is reported as it came but not used: for programs with
custom-calls it is wrong. Each custom-call without an estimate (the `rbg` dropout RNG's
`X64Combine`, `PrepareAsyncCall*`) adds -1 s to it (-21.9995 with 22 of them, -2.9994 with 3 for
the tiny runlocal step on one v5e chip, libtpu 0.0.42.1; but -29.0 with 85 of them on a v5p slice
with two micro-batches, so not even that rule is exact), and what is left after adding them back
(0.46 ms, 0.57 ms) is still 3-4x below the instructions' own sum (2.48e6 and 2.34e6 cycles, 1.6
ms at 1.5 GHz), where for programs without custom-calls (a matmul's gradient, 2048 and 4096 wide,
on each of the four generations) optimal_seconds is within 20% of that sum (3-7% on v4, v5e and
v5p): so it is not a figure to correct by adding 1 s each.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from typing import Any, Optional, Sequence

from vimpac_jax.aot import chips as chips_lib
from vimpac_jax.aot import flops as flops_lib
from vimpac_jax.aot import hlo_cycles

GIB = 2 ** 30

# What libtpu reads when its plugin starts (the first topology description): not to query the GCE
# metadata server for the host's TPU (it waits for it off Google's network), and not to take the
# one-process-per-host lock (/tmp/libtpu_lockfile) that a TPU's runtime needs but compile-only
# devices do not: without it a second process compiling at the same time fails ("Internal error
# when accessing libtpu multi-process lockfile"), e.g. two test workers or two `vimpac compile`.
LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def prepare_tpu_environment() -> None:
    """Before jax is imported: jax on its CPU backend (libtpu would otherwise look for a TPU to
    run on) and LIBTPU_ENV, each where the user has not set the variable."""
    for name, value in dict(LIBTPU_ENV, JAX_PLATFORMS="cpu").items():
        os.environ.setdefault(name, value)


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def require_libtpu() -> None:
    """ValueError with the install command when libtpu (the TPU compiler) is missing."""
    if not libtpu_installed():
        import jax

        raise ValueError(f"compiling for a TPU needs libtpu, which is not installed: pip install "
                         f"'vimpac-jax[tpu]' (or \"jax[tpu]=={jax.__version__}\", the installed jax's version)")


@dataclasses.dataclass(frozen=True)
class Target:
    """What the programs are compiled for: the devices of the mesh and the per-device figures."""

    name: str  # "v5p-8 (v5:2x2x1)" or "4 x NVIDIA H100 80GB HBM3"
    devices: tuple
    device_kind: str
    processes: int
    hbm_bytes: Optional[int]  # per device: the chip's HBM (TPU table) or the GPU's memory limit
    bf16_tflops: Optional[float]  # per device; None where unknown
    generation: Optional[chips_lib.Generation] = None


def tpu_target(slice_name: str) -> Target:
    """The compile-only devices of a TPU slice (`chips.parse_slice` names), from libtpu."""
    from jax.experimental import topologies

    require_libtpu()
    for name, value in LIBTPU_ENV.items():  # read when libtpu's plugin starts, below
        os.environ.setdefault(name, value)
    tpu = chips_lib.parse_slice(slice_name)
    gen = tpu.generation
    desc = topologies.get_topology_desc(topology_name=tpu.topology, platform="tpu", chip_config_name=gen.chip_config,
                                        chips_per_host_bounds=tpu.host_bounds)
    devices = tuple(desc.devices)
    if len(devices) != tpu.chips:
        raise ValueError(f"--topology {slice_name}: libtpu described {len(devices)} devices for {tpu.topology}, "
                         f"expected {tpu.chips} chips")
    label = slice_name if slice_name == tpu.topology else f"{slice_name} ({tpu.topology})"
    return Target(name=label, devices=devices, device_kind=devices[0].device_kind,
                  processes=len({d.process_index for d in devices}), hbm_bytes=int(gen.hbm_gib * GIB),
                  bf16_tflops=gen.bf16_tflops, generation=gen)


def local_gpu_target() -> Target:
    """The local GPUs (all processes' devices), their memory limit from the runtime."""
    import jax

    devices = tuple(jax.devices())
    if devices[0].platform != "gpu":
        raise ValueError(f"no GPUs here (jax's devices are {devices[0].platform}): give --topology to compile for a TPU slice")
    stats = devices[0].memory_stats() or {}
    return Target(name=f"{len(devices)} x {devices[0].device_kind}", devices=devices,
                  device_kind=devices[0].device_kind, processes=jax.process_count(),
                  hbm_bytes=stats.get("bytes_limit"), bf16_tflops=None)


@dataclasses.dataclass
class Program:
    """One jitted function of the run with abstract arguments."""

    name: str  # "train", "evaluate"
    jitted: Any
    args: tuple
    clips: int  # clips of one call (global)
    batch: str  # what one call takes, in words
    required_flops: Optional[float] = None  # global, per call (training steps only)


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_shards(mesh) -> int:
    """Devices a batch is split over (data x fsdp)."""
    import math

    from vimpac_jax.training import sharding as shd

    return math.prod(mesh.shape[a] for a in shd.BATCH_AXES)


def build_programs(config, mesh, processes: int = 1) -> list[Program]:
    """The programs a run of `config` compiles (call inside `nn.logical_axis_rules(...)` of the
    run's rules): the training step and the evaluation step of its task (fine-tuning: the
    multi-view test, the function `vimpac predict` runs too). ValueError for the tokenizer task."""
    import jax
    import jax.numpy as jnp

    from vimpac_jax import config_schema
    from vimpac_jax.data import video_decode
    from vimpac_jax.tasks import multiview
    from vimpac_jax.tasks.finetune import finetune_micro_batches
    from vimpac_jax.tasks.pretrain import validation_batch_size
    from vimpac_jax.training import finetune_step, pretrain_step
    from vimpac_jax.training import sharding as shd

    if config.task not in ("pretrain", "finetune"):  # the tokenizer task's program is not compiled here
        raise ValueError(f"config.task={config.task!r}: `vimpac compile` compiles the pre-training and fine-tuning "
                         f"tasks ('finetune', 'pretrain')")
    config_schema.resolve(config)  # a config built in Python: completed and checked (a loaded one already is)
    model_cfg = config.model.to_dict()
    # The schedule's length is a constant of the program, not a shape: any positive value.
    optim_cfg = dict(config.optim.to_dict(), total_steps=int(config.optim.get("total_steps") or 0) or 1000)
    state_sh = pretrain_step.train_state_shardings(model_cfg, optim_cfg, mesh)
    state = _abstract(pretrain_step.abstract_train_state(model_cfg, optim_cfg), state_sh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shd.replicated(mesh))
    clip = pretrain_step.clip_shape(model_cfg)
    videos = int(config.data.batch_size)
    shards = batch_shards(mesh)

    def tokens(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=shd.batch_sharding(mesh))

    if config.task == "pretrain":
        pretrain_cfg = config.pretrain.to_dict()
        parts, _ = flops_lib.required_flops_per_clip("pretrain", model_cfg, pretrain_cfg)
        train = Program("train", pretrain_step.make_pretrain_step(model_cfg, optim_cfg, pretrain_cfg, mesh,
                                                                  state_shardings=state_sh),
                        (state, {"tokens": tokens(videos, 2, *clip)}, key), clips=2 * videos,
                        batch=f"{videos} videos x 2 clips", required_flops=3 * sum(parts.values()) * 2 * videos)
        eval_videos = validation_batch_size(config, shards * processes)
        evaluate = Program("evaluate", pretrain_step.make_pretrain_eval_step(model_cfg, optim_cfg, pretrain_cfg, mesh,
                                                                             state_shardings=state_sh),
                           (state, {"tokens": tokens(eval_videos, 2, *clip)}, key), clips=2 * eval_videos,
                           batch=f"{eval_videos} videos x 2 clips (validation)")
        return [train, evaluate]
    parts, _ = flops_lib.required_flops_per_clip("finetune", model_cfg)
    labels = jax.ShapeDtypeStruct((videos,), jnp.int32, sharding=shd.batch_sharding(mesh))
    train = Program("train", finetune_step.make_finetune_step(
        model_cfg, optim_cfg, label_smoothing=float(config.finetune.label_smoothing),
        micro_batches=finetune_micro_batches(config, shards), mesh=mesh, state_shardings=state_sh),
        (state, {"tokens": tokens(videos, *clip), "label": labels}, key), clips=videos,
        batch=f"{videos} clips", required_flops=3 * sum(parts.values()) * videos)
    # The multi-view test's views: K clips x the crops the run's test reads (tasks.eval_crop_names
    # over the variants its store holds).
    frame = int(model_cfg["height"]) * 8
    # variant_set None (a store of any set): the finetune set's, whose no-flip crops are the test's.
    stored = [v.name for v in video_decode.variants_for(config.variant_set or "finetune", frame)]
    crops = multiview.eval_crop_names(stored, multiview.eval_crops_of(config), config.data.eval_variants)
    views = int(config.data.eval_clips) * len(crops)
    eval_videos = multiview.multiview_batch_size(config, shards * processes)
    evaluate = Program("evaluate", finetune_step.make_eval_step(model_cfg, mesh),
                       (state.params, {}, tokens(eval_videos, views, *clip)), clips=eval_videos * views,
                       batch=f"{eval_videos} videos x {views} views (multi-view test; also `vimpac predict`)")
    return [train, evaluate]


@dataclasses.dataclass
class ProgramReport:
    """One compiled program's figures, per device (chip) unless named global."""

    name: str
    batch: str
    clips: int  # global, per call
    compile_s: float = 0.0
    fits: bool = True
    message: str = ""  # the compiler's refusal, when it does not fit
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    total_bytes: int = 0  # arguments + outputs - aliased (donated) + temporaries
    capacity_bytes: Optional[int] = None
    xla_flops: Optional[float] = None  # XLA's cost_analysis: a loop's body counted once, not per trip
    xla_bytes: Optional[float] = None
    optimal_seconds: Optional[float] = None  # XLA's, as it came (not the estimate: module docstring)
    unestimated_custom_calls: int = 0  # custom-calls of the ENTRY computation without estimated_cycles
    estimated_cycles: Optional[int] = None  # one step, loops per trip (hlo_cycles.cycle_report), Pallas charge included
    pallas_kernels: int = 0  # Pallas kernels of the program, charged at 2x their roofline time
    pallas_cycles: int = 0  # their charge, part of estimated_cycles
    clock_hz: Optional[float] = None
    estimate_s: Optional[float] = None  # estimated_cycles / clock_hz: the step time reported
    estimate_method: str = ""
    clips_per_s_per_device: Optional[float] = None
    required_flops_per_device: Optional[float] = None
    peak_fraction: Optional[float] = None
    cycles: Optional[hlo_cycles.CycleReport] = None

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("cycles")
        if self.cycles is not None:
            out["top_ops"] = self.cycles.by_source[:20]
        return out


def optimal_seconds_note(optimal_seconds: Optional[float], custom_calls: int) -> str:
    """XLA's optimal_seconds, as it came, with why it is not the estimate (module docstring)."""
    if optimal_seconds is None:
        return "XLA gave no optimal_seconds"
    note = f"XLA's optimal_seconds {optimal_seconds:.6g} s"
    if custom_calls:
        note += (f" (not used: with custom-calls that have no estimate, {custom_calls} in the ENTRY computation "
                 f"here, XLA's total comes out negative or too low)")
    return note


_EXHAUSTED = re.compile(r"required for (?P<what>.*?) \((?P<need>[\d.]+)(?P<u1>[KMGT])\) exceeds available HBM "
                        r"\((?P<have>[\d.]+)(?P<u2>[KMGT])\)")


def _not_fit_message(error: str, capacity: Optional[int]) -> str:
    found = _EXHAUSTED.search(error)
    if found:
        return (f"does not fit: needs {found['need']} GiB of {found['have']} GiB per chip for "
                f"{found['what']} (XLA: {error.strip().splitlines()[0][:300]})")
    cap = f" of {capacity / GIB:.2f} GiB" if capacity else ""
    return f"does not fit{cap} per chip: {error.strip().splitlines()[0][:400]}"


def compile_program(program: Program, target: Target, *, keep_hlo: bool = False) -> ProgramReport:
    """Lowers and compiles one program; memory, XLA's cost analysis and the estimate per device.
    A program XLA refuses for lack of memory gives fits=False and the refusal in `message`."""
    report = ProgramReport(name=program.name, batch=program.batch, clips=program.clips,
                           capacity_bytes=target.hbm_bytes)
    start = time.perf_counter()
    try:
        compiled = program.jitted.lower(*program.args).compile()
    except Exception as e:  # noqa: BLE001  (XLA's runtime error type moves between versions)
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        report.compile_s = time.perf_counter() - start
        report.fits, report.message = False, _not_fit_message(text, target.hbm_bytes)
        return report
    report.compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    if memory is not None:
        report.argument_bytes = int(memory.argument_size_in_bytes)
        report.output_bytes = int(memory.output_size_in_bytes)
        report.alias_bytes = int(memory.alias_size_in_bytes)
        report.temp_bytes = int(memory.temp_size_in_bytes)
        report.total_bytes = report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes
        if target.hbm_bytes and report.total_bytes > target.hbm_bytes:
            report.fits = False
            report.message = (f"does not fit: needs {report.total_bytes / GIB:.2f} GiB of "
                              f"{target.hbm_bytes / GIB:.2f} GiB per chip")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        report.xla_flops = cost.get("flops")
        report.xla_bytes = cost.get("bytes accessed")
        report.optimal_seconds = cost.get("optimal_seconds")
    devices = len(target.devices)
    if program.required_flops:
        report.required_flops_per_device = program.required_flops / devices
    if target.generation is not None:  # a TPU: the cost model's estimates are in the HLO
        text = compiled.as_text()
        report.cycles = hlo_cycles.cycle_report(text, chip=target.generation)
        report.estimated_cycles = report.cycles.total_cycles
        report.pallas_kernels, report.pallas_cycles = report.cycles.pallas_kernels, report.cycles.pallas_cycles
        report.unestimated_custom_calls = sum(1 for i in hlo_cycles.entry_instructions(text)
                                              if i.opcode == "custom-call" and i.estimated_cycles is None)
        report.clock_hz = target.generation.clock_hz
        report.estimate_s = report.estimated_cycles / report.clock_hz
        uncounted = sum(n for op, n in report.cycles.without_estimate.items()
                        if op in ("custom-call", "fusion:kCustom"))
        loops = report.cycles.loops
        report.estimate_method = (
            "the compiled instructions' estimated cycles summed over one step"
            + (f" (loops per trip: {', '.join(str(n) for _, n in loops)} trips)" if loops else "")
            + f" at {report.clock_hz / 1e9:.3f} GHz ({target.generation.name}'s clock from its bf16 peak, "
            f"vimpac_jax/aot/chips.py); {uncounted} custom-calls and custom fusions without an estimate count 0; "
            + (f"{report.pallas_kernels} Pallas kernels charged at twice their roofline time (their FLOPs at the "
               f"bf16 peak or bytes at the HBM bandwidth, whichever is longer; from "
               f"{' and '.join(report.cycles.pallas_sources)}), not timed on a chip: {report.pallas_cycles:,d} "
               f"cycles of the total; " if report.pallas_kernels else "")
            + (f"{report.cycles.unknown_loops} loops of unknown trip count left out, so a lower bound; "
               if report.cycles.unknown_loops else "")
            + optimal_seconds_note(report.optimal_seconds, report.unestimated_custom_calls))
    else:
        report.estimate_method = "none: XLA's GPU compile has no step-time model"
    if report.estimate_s:
        report.clips_per_s_per_device = program.clips / devices / report.estimate_s
        if report.required_flops_per_device and target.bf16_tflops:
            report.peak_fraction = report.required_flops_per_device / report.estimate_s / (target.bf16_tflops * 1e12)
    return report


def largest_fitting(fits, maximum: int) -> int:
    """The largest b in [1, maximum] with fits(b), for a `fits` that is monotone (true up to some b,
    false after), by doubling from 1 then bisection: about 2 log2(b) calls. 0 if fits(1) is false."""
    if not fits(1):
        return 0
    low, high = 1, None  # low fits; high, once found, does not
    while high is None and low < maximum:
        b = min(2 * low, maximum)
        if fits(b):
            low = b
        else:
            high = b
    while high is not None and high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def mesh_description(mesh) -> str:
    return " ".join(f"{name}={size}" for name, size in mesh.shape.items())


def compile_run(config, target: Target, *, programs: Optional[Sequence[str]] = None) -> tuple[Any, list[ProgramReport]]:
    """(mesh, reports) of the config's programs compiled for `target` on the run's mesh."""
    import flax.linen as nn

    from vimpac_jax.training import sharding as shd

    rules = shd.logical_axis_rules(config.mesh)
    with nn.logical_axis_rules(rules):
        mesh = shd.make_mesh(config.mesh, devices=list(target.devices))
        reports = []
        for program in build_programs(config, mesh, target.processes):
            if programs is None or program.name in programs:
                reports.append(compile_program(program, target))
    return mesh, reports


def format_bytes(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def format_report(report: ProgramReport, target: Target, *, top: int = 0) -> str:
    """The text of one program's report (what `vimpac compile` prints)."""
    lines = [f"{report.name}: {report.batch}, {report.clips / len(target.devices):g} clips per chip; "
             f"compiled in {report.compile_s:.1f} s"]
    if not report.fits and not report.argument_bytes:
        lines.append(f"  {report.message}")
        return "\n".join(lines)
    verdict = "fits" if report.fits else report.message
    lines.append(f"  HBM per chip: arguments {format_bytes(report.argument_bytes)}, outputs "
                 f"{format_bytes(report.output_bytes)} ({format_bytes(report.alias_bytes)} of them donated), "
                 f"temporaries {format_bytes(report.temp_bytes)}; total {format_bytes(report.total_bytes)} of "
                 f"{format_bytes(report.capacity_bytes)}: {verdict}")
    if report.xla_flops is not None:
        once = (" (cost_analysis: each loop body counted once, so 1/trips of the loop's share)"
                if report.cycles is not None and report.cycles.loops else "")
        lines.append(f"  XLA per chip: {report.xla_flops:.4g} FLOPs, {report.xla_bytes or 0:.4g} bytes accessed{once}")
    if report.estimate_s:
        speed = f"{report.estimate_s * 1e3:.4g} ms per call = {report.clips_per_s_per_device:,.1f} clips/s per chip"
        if report.peak_fraction is not None:
            speed += (f", {100 * report.peak_fraction:.3g}% of the chip's bf16 peak from the required "
                      f"{report.required_flops_per_device:.4g} FLOPs per chip")
        lines.append(f"  cost model: {speed}")
    lines.append(f"  estimate: {report.estimate_method}")
    if report.cycles is not None:
        lines.append(f"  estimated cycles of one step: {report.cycles.total_cycles:,d}")
        if report.cycles.pallas_kernels:
            lines.append(f"  {hlo_cycles.pallas_charge_line(report.cycles)}")
        if top:
            body = hlo_cycles.format_report(report.cycles, top=top)
            lines.extend("    " + line for line in body.splitlines())
    return "\n".join(lines)
