"""`vimpac compile --config CONFIG --topology NAME`: compile a run's programs ahead of time for a
TPU slice on a CPU host (or, without --topology, for the local GPUs) and report, per program and
per chip, whether they fit in HBM and how fast XLA's cost model expects them to run.

  vimpac compile --config configs/pretrain.py:small --topology v5p-8
  vimpac compile --config configs/finetune.py:ucf101 --topology v5e-64 --config.data.batch_size=128
  vimpac compile --config configs/pretrain.py:small --topology v5p-8 --find-batch

Slices are named as Cloud TPU names them (v5p-8, v5e-64, v4-32, v6e-256) or by topology
(v5p:2x2x1, v5e:2x4); the mesh is the run's (config.mesh over all chips of the slice, every host
included). TPU compiles need the `tpu` extra (libtpu). A compile is not a run: see
vimpac_jax/aot/compile.py for what it verifies. Exit 0: every program fits; 1: one does not
(the "does not fit" line says by how much); 2: bad input.
"""

import argparse
import sys

from vimpac_jax import exit_codes
from vimpac_jax.aot import chips
from vimpac_jax.aot import compile as aot
from vimpac_jax.cli import positive_int


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vimpac compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="config file FILE.py[:ARG] (plus --config.FIELD=VALUE overrides)")
    parser.add_argument("--topology", help="TPU slice: v5p-8, v5e-64, v4-32, v6e-256, or v5p:2x2x1, v5e:2x4, ... "
                                           "(default: the local GPUs)")
    parser.add_argument("--programs", default="train,evaluate",
                        help="which programs: train, evaluate (comma-separated; default both)")
    parser.add_argument("--report", choices=["ops"], help="ops: the cost model's cycles by JAX source op (TPU)")
    parser.add_argument("--top", type=positive_int, default=20, help="rows of --report ops (default 20)")
    parser.add_argument("--find-batch", action="store_true",
                        help="the largest per-chip batch (videos) whose training step fits, by bisection over compiles")
    parser.add_argument("--max-batch", type=positive_int, default=1024,
                        help="upper bound of --find-batch, per chip (default 1024)")
    parser.add_argument("--remat", help="with --find-batch: model.remat policies to search too (comma-separated, "
                                        "e.g. none,dots_no_batch,full); the one that fits the largest batch is kept "
                                        "(the first listed on a tie: list the cheapest first)")
    parser.add_argument("--json", dest="json_out", help="also write the reports to this JSON file")
    return parser


def _searched_batch_size(config, target, b: int) -> int:
    """config.data.batch_size for a per-chip batch of b videos: b x the data x fsdp devices x the
    micro-batches; with config.finetune.videos_per_device set (the released --bs-per-gpu), b is that
    field (set here) and the update is one micro-batch of it: what a device holds at once is the
    same for an update of any size accumulated in micro-batches of b."""
    from vimpac_jax.training import sharding as shd

    sizes = shd.mesh_shape(config.mesh, len(target.devices))
    if config.task == "finetune" and int(config.finetune.videos_per_device):
        config.finetune.videos_per_device = b
        return b * sizes[0] * sizes[1]
    micro = int(config.pretrain.micro_batches if config.task == "pretrain" else config.finetune.micro_batches)
    return b * sizes[0] * sizes[1] * micro


def _find_batch(config, target, max_batch: int, log) -> tuple[int, list]:
    """Largest per-chip batch b (config.data.batch_size = b x the data x fsdp devices x
    micro-batches) whose training step fits, by `aot.largest_fitting`. (b, [(b, report) tried])."""
    trials = []

    def fits(b: int) -> bool:
        config.data.batch_size = _searched_batch_size(config, target, b)
        _, reports = aot.compile_run(config, target, programs=("train",))
        trials.append((b, reports[0]))
        log(f"model.remat={config.model.remat}, per-chip batch {b}: {'fits' if reports[0].fits else 'does not fit'} "
            f"({aot.format_bytes(reports[0].total_bytes) if reports[0].total_bytes else reports[0].message})")
        return reports[0].fits

    return aot.largest_fitting(fits, max_batch), trials


def _remat_policies(text: str) -> list[str]:
    """'none,dots_no_batch,save:qkv,attention' -> ['none', 'dots_no_batch', 'save:qkv,attention']: a
    saveable name after a `save:` policy belongs to it."""
    from vimpac_jax.models.backbone import SAVEABLE_NAMES

    policies: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if policies and policies[-1].startswith("save:") and token in SAVEABLE_NAMES:
            policies[-1] += f",{token}"
        elif token:
            policies.append(token)
    return policies


def _find_batch_and_remat(config, target, max_batch: int, policies: list[str], log) -> tuple[int, list, dict]:
    """`_find_batch` for each model.remat policy (as MaxText's estimator searches its remat
    policies); config.model.remat is left at the policy that fits the largest batch, the first
    listed on a tie. (b, its trials, {policy: largest batch})."""
    best, per_policy = None, {}
    for policy in policies:
        config.model.remat = policy
        found, trials = _find_batch(config, target, max_batch, log)
        per_policy[policy] = found
        if best is None or found > best[1]:
            best = (policy, found, trials)
    config.model.remat = best[0]
    return best[1], best[2], per_policy


def main(argv) -> int:
    from vimpac_jax.config_utils import split_config_args

    config_args, rest = split_config_args(argv)
    args = _parser().parse_args(rest + (["--config", "x"] if config_args else []))
    if not config_args:
        print("vimpac compile: error: --config is required", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if args.topology:
        chips.parse_slice(args.topology)  # a bad name: its error line before anything is built
        # Before jax is imported (loading a config imports it).
        aot.prepare_tpu_environment()
        aot.require_libtpu()
    from vimpac_jax.config_utils import load_config

    programs = tuple(p.strip() for p in args.programs.split(",") if p.strip())
    unknown = sorted(set(programs) - {"train", "evaluate"})
    if unknown or not programs:
        print(f"vimpac compile: error: --programs {args.programs}: expected train and/or evaluate", file=sys.stderr)
        return exit_codes.BAD_INPUT
    policies = _remat_policies(args.remat or "")
    if args.remat is not None and not (policies and args.find_batch):
        print("vimpac compile: error: --remat takes policies (e.g. none,full) and goes with --find-batch",
              file=sys.stderr)
        return exit_codes.BAD_INPUT
    config = load_config(config_args)
    from vimpac_jax.models.backbone import remat_policy

    for policy in policies:  # a bad name: its error line (naming model.remat) before anything compiles
        remat_policy(policy)
    target = aot.tpu_target(args.topology) if args.topology else aot.local_gpu_target()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    where = (f"{target.name}: {len(target.devices)} x {target.device_kind}, {target.processes} "
             f"host{'s' if target.processes > 1 else ''}")
    if target.generation is not None:
        g = target.generation
        where += (f"; per chip {g.hbm_gib:g} GiB HBM, {g.bf16_tflops:g} bf16 TFLOP/s, "
                  f"{g.hbm_gbytes_per_s:g} GB/s (vimpac_jax/aot/chips.py)")
    found, searched = None, {}
    if args.find_batch:
        if policies:
            found, trials, per_policy = _find_batch_and_remat(config, target, args.max_batch, policies, log)
            log("largest per-chip batch by model.remat: " + ", ".join(f"{p} {b}" for p, b in per_policy.items())
                + f"; kept {config.model.remat}")
        else:
            found, trials = _find_batch(config, target, args.max_batch, log)
        if not found:
            print(f"vimpac compile: train: a per-chip batch of 1 does not fit on {target.name}: "
                  f"{trials[0][1].message}", file=sys.stderr)
            return exit_codes.FAILED
        searched = {"train": dict(trials)[found]}  # compiled already, at the batch found
        config.data.batch_size = _searched_batch_size(config, target, found)
        log(f"largest per-chip batch that fits: {found} (config.data.batch_size={config.data.batch_size})")
    mesh, compiled = aot.compile_run(config, target, programs=[p for p in programs if p not in searched])
    compiled = {r.name: r for r in compiled}
    reports = [searched.get(name) or compiled[name] for name in programs]
    print(f"{where}\nmesh: {aot.mesh_description(mesh)} (config.mesh over all {len(target.devices)} chips)")
    if found is not None:
        print(f"largest per-chip batch whose training step fits: {found} videos "
              f"(--config.data.batch_size={config.data.batch_size}"
              + (f" --config.finetune.videos_per_device={found}"
                 if config.task == "finetune" and int(config.finetune.videos_per_device) else "")
              + (f" --config.model.remat={config.model.remat}" if policies else "")
              + f"; searched up to {args.max_batch})")
    for report in reports:
        print(aot.format_report(report, target, top=args.top if args.report == "ops" else 0))
    if args.json_out:
        from vimpac_jax import io_utils

        io_utils.write_json_atomic(args.json_out, dict(
            target=target.name, device_kind=target.device_kind, chips=len(target.devices), hosts=target.processes,
            mesh=dict(mesh.shape), batch_size=int(config.data.batch_size), largest_fitting_batch_per_chip=found,
            remat=str(config.model.remat),
            programs=[r.to_json() for r in reports]))
    misfits = [r for r in reports if not r.fits]
    for r in misfits:
        print(f"vimpac compile: {r.name}: {r.message}", file=sys.stderr)
    return exit_codes.FAILED if misfits else exit_codes.DONE
