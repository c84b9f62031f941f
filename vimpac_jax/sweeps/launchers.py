"""Launchers of a sweep's runs: one after another here (`run_local`), a SLURM array job
(`write_slurm`), or the commands for a TPU VM's workers (`tpu_commands`); `--launcher print` prints
`spec.train_command`s."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from vimpac_jax import exit_codes, io_utils
from vimpac_jax.progress import format_seconds
from vimpac_jax.sweeps.spec import LOG_FILE, PARENT_PID_ENV, STATUS_FILE, Run, read_json, write_run_files


def run_local(runs: Sequence[Run], commands: Sequence[Sequence[str]], *, rerun: bool = False,
              env: dict | None = None, log: Callable[[str], None] = print) -> list[int]:
    """Runs each command in turn, output to RUN/log.txt; a failure is recorded and the next runs.

    Runs whose status.json says they finished with code 0 are skipped unless `rerun`; every
    other run (failed, preempted: exit_codes.PREEMPTED, not started) runs again and resumes
    from its checkpoints. SIGTERM/SIGINT (Ctrl-C) reach the running `vimpac train` too (one
    process group), which saves and exits PREEMPTED; the sweep records that and stops. Killed
    outright (SIGKILL), the sweep takes its running `vimpac train` with it (`PARENT_PID_ENV`:
    that run saves and exits PREEMPTED). A run whose workdir is still held by a live `vimpac
    train` (one a killed sweep started, or another sweep's) is not started again beside it: it
    is reported as still running, code PREEMPTED (unfinished), its log and status left alone.
    Returns the return codes in order (of the runs started or skipped).
    """
    env = dict(os.environ if env is None else env, **{PARENT_PID_ENV: str(os.getpid())})
    codes, start, done = [], time.monotonic(), 0
    stop = []
    handler = lambda signum, frame: stop.append(signal.Signals(signum).name)  # noqa: E731
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread
        previous = {}
    try:
        for i, (run, command) in enumerate(zip(runs, commands)):
            if stop:
                log(f"vimpac sweep: {stop[0]}: stopped before {run.name}; run the sweep again to resume")
                break
            status = read_json(run.workdir / STATUS_FILE)
            if status and status.get("returncode") == exit_codes.DONE and not rerun:
                log(f"[{i + 1}/{len(runs)}] {run.name}: done before, skipped")
                codes.append(0)
                continue
            holder = io_utils.lock_holder(run.workdir / io_utils.WORKDIR_LOCK_FILE)
            if holder is not None:
                log(f"[{i + 1}/{len(runs)}] {run.name}: still running ({holder}); not started again: run the sweep "
                    f"again once it has ended")
                codes.append(exit_codes.PREEMPTED)
                continue
            write_run_files(run, command)
            (run.workdir / STATUS_FILE).unlink(missing_ok=True)
            t0 = time.monotonic()
            with open(run.workdir / LOG_FILE, "w") as f:
                f.write(f"$ {shlex.join(command)}\n")
                f.flush()
                code = subprocess.run(list(command), stdout=f, stderr=subprocess.STDOUT, env=env).returncode
            seconds = time.monotonic() - t0
            io_utils.write_json_atomic(run.workdir / STATUS_FILE, {"returncode": code, "seconds": round(seconds, 2)},
                                       indent=None, sort_keys=False)  # "done before" is read from it
            codes.append(code)
            done += 1
            left = len(runs) - i - 1
            eta = (time.monotonic() - start) / done * left
            if code == exit_codes.DONE:
                verdict = "ok"
            elif code == exit_codes.PREEMPTED:
                verdict = "preempted (saved; run the sweep again to resume it)"
            else:
                verdict = f"FAILED (return code {code}, see {run.workdir / LOG_FILE})"
            log(f"[{i + 1}/{len(runs)}] {run.name}: {verdict} in {seconds:.1f} s; {left} left, ETA {format_seconds(eta)}")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return codes


def launcher_script(name: str) -> Path:
    """The shell launcher NAME (`slurm_gpu.sbatch`, `local.sh`, `tpu_pod.sh`) as installed: package
    data of `vimpac_jax.launch`, the repository's top-level launch/ (setup.py)."""
    return Path(str(resources.files("vimpac_jax.launch").joinpath(name)))  # setuptools installs unzipped


# The project's multi-host SLURM launcher (coordinator from the allocation, one process per GPU).
SLURM_GPU_SCRIPT = "slurm_gpu.sbatch"  # in launch/

SLURM_TEMPLATE = """#!/bin/bash
# Written by `vimpac sweep --launcher slurm`: one array task per run of the sweep. Each task runs
# its `vimpac train` through {runner} and records the return code in RUN/status.json, which
# `vimpac sweep --collect` reads. Resources: the #SBATCH lines below (from --sbatch=OPTION).
# 120 s before the time limit SLURM sends SIGTERM to the run (--signal), which saves and exits
# {preempted}; the task then requeues itself, and the requeued task resumes from that checkpoint.
#SBATCH --job-name={job_name}
#SBATCH --array=0-{last}
#SBATCH --output={root}/slurm-%A_%a.out
#SBATCH --signal=TERM@120
#SBATCH --requeue
{extra}
set -u
# A SIGTERM to this shell (scancel, the time limit) must not kill it before it records the
# run's code: a trap with a command (unlike an ignored signal) is not inherited by the run.
trap 'echo "sweep task: SIGTERM, waiting for the run to save" >&2' TERM
RUNS=({run_dirs})
RUN_DIR="${{RUNS[$SLURM_ARRAY_TASK_ID]}}"
CMD="$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {commands_file})"
mkdir -p "$RUN_DIR"
eval {runner} $CMD > "$RUN_DIR/log.txt" 2>&1  # in the foreground: bash runs the trap after it
CODE=$?
echo "{{\\"returncode\\": $CODE}}" > "$RUN_DIR/status.json"
if [[ $CODE == {preempted} ]]; then
  scontrol requeue "${{SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}_$SLURM_ARRAY_TASK_ID" || \\
    echo "sweep task: preempted; resubmit to resume (scontrol requeue failed)" >&2
fi
exit $CODE
"""


def write_slurm(runs: Sequence[Run], commands: Sequence[Sequence[str]], root: Path, *,
                sbatch_options: Sequence[str] = ()) -> Path:
    """ROOT/sweep.sbatch (an array job over the runs) and ROOT/commands.txt (one command a line).

    Each task runs its command with `bash .../vimpac_jax/launch/slurm_gpu.sbatch COMMAND` (the
    installed launcher: multi-process over the task's allocation) where that script exists, else
    with a plain `srun COMMAND`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for run, command in zip(runs, commands):
        write_run_files(run, command)
    commands_file = root / "commands.txt"
    commands_file.write_text("".join(shlex.join(c) + "\n" for c in commands))
    launcher = launcher_script(SLURM_GPU_SCRIPT)
    runner = f"bash {shlex.quote(str(launcher))}" if launcher.is_file() else "srun"
    script = root / "sweep.sbatch"
    script.write_text(SLURM_TEMPLATE.format(
        job_name=f"vimpac-sweep-{root.name}", last=len(runs) - 1, preempted=exit_codes.PREEMPTED, root=shlex.quote(str(root)), runner=runner,
        extra="".join(f"#SBATCH {o}\n" for o in sbatch_options),
        run_dirs=" ".join(shlex.quote(str(r.workdir)) for r in runs), commands_file=shlex.quote(str(commands_file))))
    return script


def tpu_commands(commands: Sequence[Sequence[str]], *, tpu_name: str, zone: str, project: str | None,
                 repo_dir: str) -> list[str]:
    """One `gcloud compute tpus tpu-vm ssh --worker=all` per run: every host of the slice runs the
    same `vimpac train` (jax.distributed detects the TPU VM). Printed, never executed here."""
    out = []
    for command in commands:
        remote = f"cd {shlex.quote(repo_dir)} && {shlex.join(command)}"
        gcloud = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={zone}"]
        if project:
            gcloud.append(f"--project={project}")
        out.append(shlex.join([*gcloud, "--worker=all", f"--command={remote}"]))
    return out
