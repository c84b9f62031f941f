"""`vimpac sweep --config CONFIG --sweep SWEEP.py --workdir DIR [--launcher local|print|slurm|tpu]`.

Expands SWEEP.py's `get_sweep()` (a list of {config field: value} overrides, built with
`vimpac_jax.sweeps`'s sweep/product/zipit/chain) into runs DIR/<index>_<name>/, each a
`vimpac train --config CONFIG [--config.FIELD=VALUE ...] --workdir DIR/<run>`. Every run's
config is loaded first, so a misspelt field fails before anything runs.

  local  runs them one after another here (output in DIR/<run>/log.txt; a failed run is
         recorded and the next one runs; finished runs are skipped unless --rerun, preempted
         ones (exit 75) resume), then writes DIR/summary.md, DIR/summary.csv and DIR/summary.png
         (each final metric against the swept value, also in DIR/tensorboard; the plot needs
         the viz extra); SIGTERM or Ctrl-C: the running run saves, the sweep stops and exits 75
  print  prints the commands
  slurm  writes DIR/sweep.sbatch (an array job, one task per run) and submits it with sbatch
         when sbatch is on PATH; `vimpac sweep --collect DIR` once it is done
  tpu    prints one `gcloud compute tpus tpu-vm ssh --worker=all` command per run

`vimpac sweep --collect DIR` rebuilds the summary from the run directories.
Example:
  vimpac sweep --config configs/pretrain.py:runlocal --config.data.train_store=STORE \\
      --sweep configs/sweeps/nce_weight.py --workdir sweeps/nce
"""

import argparse
import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from vimpac_jax import exit_codes
from vimpac_jax.config_utils import resolve_config_path, split_config_args
from vimpac_jax import sweeps as sw

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vimpac sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="FILE.py[:ARG] of every run, plus --config.FIELD=VALUE shared overrides")
    p.add_argument("--sweep", help="sweep file defining get_sweep(), e.g. configs/sweeps/nce_weight.py")
    p.add_argument("--workdir", help="sweep directory; run i goes to WORKDIR/<i>_<name>")
    p.add_argument("--launcher", default="local", choices=["local", "print", "slurm", "tpu"])
    p.add_argument("--collect", metavar="DIR", help="only rebuild DIR/summary.{md,csv,png} from existing runs")
    p.add_argument("--rerun", action="store_true", help="local: also run those that finished before")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="slurm: an #SBATCH option, e.g. --sbatch=--partition=gpu --sbatch=--gres=gpu:8 (repeatable)")
    p.add_argument("--tpu-name", default="$TPU_NAME", help="tpu: the TPU VM slice")
    p.add_argument("--zone", default="$ZONE", help="tpu: its zone")
    p.add_argument("--project", default=None, help="tpu: the gcloud project (default: gcloud's)")
    p.add_argument("--repo-dir", default="vimpac_jax", help="tpu: the project checkout on the workers")
    return p


def _print_summary(root: Path) -> None:
    from vimpac_jax import plots

    md, csv_path, rows = sw.write_summary(root)
    print(md.read_text())
    written = [md, csv_path]
    try:
        plot = sw.plot_summary(root, rows)
    except plots.VizExtraMissing as e:
        log.warning(f"vimpac sweep: {sw.SUMMARY_PLOT} not drawn: {e}")
    else:
        written += [plot] if plot is not None else []
    print(f"wrote {', '.join(map(str, written))}")


def main(argv) -> int:
    config_args, rest = split_config_args(argv)
    args = _parser().parse_args(rest)
    if args.collect:
        try:
            _print_summary(Path(args.collect))
        except FileNotFoundError as e:
            print(f"vimpac sweep: error: {e}", file=sys.stderr)
            return 2
        return 0
    missing = [f for f, v in (("--sweep", args.sweep), ("--workdir", args.workdir)) if not v]
    if missing or not config_args:
        print(f"vimpac sweep: error: {', '.join(missing + ([] if config_args else ['--config']))} required "
              "(or --collect DIR)", file=sys.stderr)
        return 2
    root = Path(args.workdir)
    try:
        config, base = sw.split_base_config(config_args)
        # Local and SLURM runs write here: absolute paths. print/tpu keep DIR as given (a gs:// URL).
        run_root = root.absolute() if args.launcher in ("local", "slurm") else args.workdir
        runs = sw.expand(sw.load_sweep(resolve_config_path(args.sweep)), run_root)  # configs/sweeps/: installed too
        sw.check_configs(config, base, runs)
    except (ValueError, FileNotFoundError) as e:
        print(f"vimpac sweep: error: {e}", file=sys.stderr)
        return 2

    if args.launcher == "local":
        commands = [sw.train_command(config, base, r, [sys.executable, "-m", "vimpac_jax"]) for r in runs]
        log.info(f"vimpac sweep: {len(runs)} runs of {args.sweep} under {root}")
        codes = sw.run_local(runs, commands, rerun=args.rerun, log=log.info)
        _print_summary(root)
        failed = sum(c not in (exit_codes.DONE, exit_codes.PREEMPTED) for c in codes)
        unfinished = len(runs) - sum(c == exit_codes.DONE for c in codes) - failed
        if failed:
            log.warning(f"vimpac sweep: {failed} of {len(runs)} runs failed (rows marked failed in the summary)")
        if unfinished:
            log.warning(f"vimpac sweep: {unfinished} of {len(runs)} runs preempted or not started; run the sweep "
                        f"again to resume them")
        return exit_codes.FAILED if failed else exit_codes.PREEMPTED if unfinished else exit_codes.DONE

    commands = [sw.train_command(config, base, r, ["vimpac"]) for r in runs]
    if args.launcher == "print":
        for c in commands:
            print(shlex.join(c))
        return 0
    if args.launcher == "tpu":
        for line in sw.tpu_commands(commands, tpu_name=args.tpu_name, zone=args.zone, project=args.project,
                                    repo_dir=args.repo_dir):
            print(line)
        return 0
    script = sw.write_slurm(runs, commands, root.absolute(), sbatch_options=args.sbatch)
    if shutil.which("sbatch") is None:
        print(f"wrote {script}; sbatch is not on PATH: submit it with `sbatch {script}`, "
              f"then `vimpac sweep --collect {root}`")
        return 0
    result = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    print(result.stdout.strip() or result.stderr.strip())
    if result.returncode != 0:
        print(f"vimpac sweep: error: sbatch {script} failed with code {result.returncode}", file=sys.stderr)
        return result.returncode
    print(f"submitted {script} ({len(runs)} array tasks); then `vimpac sweep --collect {root}`")
    return 0
