"""Config sweeps: expand a sweep file into runs, launch them, and summarise their final metrics.

A sweep file is a Python file with `get_sweep()` returning a list of override dicts, one per
run, `{config field: value}`. It builds them with the combinators below, which follow the
`hyper` library that big_vision's `get_hyper(hyper)` uses (sweep / product / zipit / chain):

    from vimpac_jax.sweeps import chain, fixed, product, sweep, zipit

    def get_sweep():
        return product(sweep("pretrain.nce_weight", [0.0, 1.0]),
                       zipit(sweep("optim.learning_rate", [1e-3, 3e-4]), sweep("seed", [0, 1])))

Every run gets `WORKDIR/<index>_<name from its overrides>/` holding `overrides.json` (the
overrides and the exact command), `log.txt` (local runs), `status.json` (the return code), and
what `vimpac train` writes (config.json: the resolved config, metrics.jsonl, ...).
`collect(WORKDIR)` rebuilds `summary.md` / `summary.csv` from those files: one row per run,
failed and unfinished runs included.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import time
import traceback
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from vimpac_jax import exit_codes, io_utils
from vimpac_jax.progress import format_seconds

Overrides = dict[str, Any]
SCALARS = (bool, int, float, str)
FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # 'pretrain.nce_weight'

OVERRIDES_FILE = "overrides.json"
STATUS_FILE = "status.json"
LOG_FILE = "log.txt"
# The sweep's pid, given to each `vimpac train` it starts, which stops (saving, as on SIGTERM)
# when that process is gone: a sweep killed with SIGKILL leaves no run behind (commands/train.py).
PARENT_PID_ENV = "VIMPAC_SWEEP_PID"
# Metrics shown in summary.md (summary.csv has every logged metric); eval/* are always shown.
MARKDOWN_METRICS = ("train/total_loss", "train/mlm_loss", "train/nce_loss", "train/mask_accuracy", "train/mask_ratio",
                    "train/loss", "train/accuracy")


# ----------------------------------------------------------------------------------------------
# Combinators: each returns a list of override dicts.


def sweep(field: str, values: Iterable[Any]) -> list[Overrides]:
    """One field over values: `sweep('a', [1, 2])` -> `[{'a': 1}, {'a': 2}]`."""
    if not isinstance(field, str) or not field:
        raise ValueError(f"sweep field must be a non-empty string such as 'pretrain.nce_weight', got {field!r}")
    values = list(values)
    if not values:
        raise ValueError(f"sweep({field!r}, ...) has no values")
    return [{field: v} for v in values]


def fixed(field: str, value: Any) -> list[Overrides]:
    """A field held at one value: `fixed('a', 1)` -> `[{'a': 1}]` (combine with product)."""
    return sweep(field, [value])


def _merge(dicts: Sequence[Overrides], what: str) -> Overrides:
    merged: Overrides = {}
    for d in dicts:
        clash = sorted(set(merged) & set(d))
        if clash:
            raise ValueError(f"{what}: field(s) {clash} set by more than one of its arguments")
        merged.update(d)
    return merged


def product(*sweeps: Sequence[Overrides]) -> list[Overrides]:
    """Cartesian product; the first argument varies slowest.

    `product(sweep('a', [1, 2]), sweep('b', [3, 4]))` -> a=1,b=3; a=1,b=4; a=2,b=3; a=2,b=4.
    """
    return [_merge(combo, "product") for combo in itertools.product(*sweeps)]


def zipit(*sweeps: Sequence[Overrides]) -> list[Overrides]:
    """Element-wise: `zipit(sweep('a', [1, 2]), sweep('b', [3, 4]))` -> a=1,b=3; a=2,b=4.

    All arguments must have the same length (a silent truncation would drop runs).
    """
    lengths = [len(s) for s in sweeps]
    if len(set(lengths)) > 1:
        raise ValueError(f"zipit: arguments have different lengths {lengths}")
    return [_merge(combo, "zipit") for combo in zip(*sweeps)]


def chain(*sweeps: Sequence[Overrides]) -> list[Overrides]:
    """Concatenation: the runs of the first argument, then of the second, ..."""
    return [dict(d) for s in sweeps for d in s]


# ----------------------------------------------------------------------------------------------
# Sweep files and runs.


@dataclasses.dataclass(frozen=True)
class Run:
    index: int
    name: str               # '<index>_<short name>', the run's directory name
    overrides: Overrides    # {config field: value}
    workdir: Path | str     # str only for a URL root (gs://...), which nothing here writes to


def validate_overrides(overrides_list: Any, source: str = "sweep") -> list[Overrides]:
    """Checks the shape of get_sweep()'s result; raises ValueError naming `source` and the run."""
    if not isinstance(overrides_list, (list, tuple)) or not overrides_list:
        raise ValueError(f"{source}: get_sweep() must return a non-empty list of dicts, "
                         f"got {type(overrides_list).__name__}")
    for i, d in enumerate(overrides_list):
        if not isinstance(d, dict):
            raise ValueError(f"{source}: run {i} is a {type(d).__name__}, not a dict of {{field: value}}")
        for field, value in d.items():
            if not isinstance(field, str) or not FIELD_RE.fullmatch(field):
                raise ValueError(f"{source}: run {i}: {field!r} is not a config field name "
                                 "such as 'pretrain.nce_weight'")
            if not isinstance(value, SCALARS):
                raise ValueError(f"{source}: run {i}: {field}={value!r} must be a bool, int, float or str "
                                 f"(a command-line --config.{field}=VALUE)")
    return [dict(d) for d in overrides_list]


def load_sweep(path: str | os.PathLike) -> list[Overrides]:
    """Runs a sweep file and returns its validated `get_sweep()`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_vimpac_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        get_sweep: Callable[[], Any] | None = getattr(module, "get_sweep", None)
        if not callable(get_sweep):
            raise ValueError(f"sweep file {path} defines no get_sweep() function")
        overrides = get_sweep()
    except SyntaxError as e:
        raise ValueError(f"sweep file {path}, line {e.lineno}: {e.msg}: {(e.text or '').strip()}") from e
    except Exception as e:  # noqa: BLE001 - the user's code: its error, where it happened, as one line
        if isinstance(e, ValueError) and str(e).startswith(f"sweep file {path} "):
            raise
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                 if Path(f.filename).resolve() == path.resolve()]
        where = f", line {lines[-1]}" if lines else ""
        raise ValueError(f"sweep file {path}{where}: {type(e).__name__}: {e}") from e
    return validate_overrides(overrides, source=str(path))


def format_value(value: Any) -> str:
    """The VALUE of `--config.FIELD=VALUE` as ml_collections parses it back."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return str(value)  # str(True) == 'True', str(0.5) == '0.5', strings as they are


def short_name(overrides: Overrides, max_len: int = 60) -> str:
    """`{'pretrain.nce_weight': 0.5, 'model.layout': 'T,H|W'}` -> 'nce_weight=0.5_layout=T,H+W'.

    Only the last component of each field; characters unsafe in file names become '-'
    ('|' becomes '+', so that 'T,H|W' and 'T,H,W' stay distinct).
    """
    parts = [f"{field.rsplit('.', 1)[-1]}={format_value(v)}" for field, v in overrides.items()]
    name = "_".join(parts).replace("|", "+") or "base"
    name = re.sub(r"[^A-Za-z0-9._,+=-]", "-", name)
    return name[:max_len]


def expand(overrides_list: Sequence[Overrides], root: str | os.PathLike) -> list[Run]:
    """One Run per override dict, in order, with workdir ROOT/<index>_<short name> (index zero-padded)."""
    width = max(2, len(str(len(overrides_list) - 1)))
    runs = []
    for i, overrides in enumerate(overrides_list):
        name = f"{i:0{width}d}_{short_name(overrides)}"
        # A bucket URL (gs://..., for TPU runs) stays a string: Path would fold its '//'.
        workdir = f"{str(root).rstrip('/')}/{name}" if "://" in str(root) else Path(root) / name
        runs.append(Run(i, name, dict(overrides), workdir))
    return runs


def split_base_config(config_args: Sequence[str]) -> tuple[str, list[str]]:
    """`['--config', 'F.py:a', '--config.x=1']` -> ('F.py:a', ['--config.x=1'])."""
    spec, overrides = None, []
    it = iter(config_args)
    for a in it:
        if a == "--config":
            spec = next(it, None)
        elif a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a.startswith("--config.") and "=" not in a:
            overrides.append(f"{a}={next(it, '')}")
        else:
            overrides.append(a)
    if not spec:
        raise ValueError("--config FILE.py[:ARG] is required")
    return spec, overrides


def config_flags(config: str, base_overrides: Sequence[str], overrides: Overrides) -> list[str]:
    """The `--config ...` arguments of one run: base overrides first, then the run's own."""
    swept = set(overrides)
    clash = sorted(a.split("=", 1)[0][len("--config."):] for a in base_overrides
                   if a.split("=", 1)[0][len("--config."):] in swept)
    if clash:
        raise ValueError(f"field(s) {clash} are both swept and given as --config.FIELD=VALUE; drop one")
    return ["--config", config, *base_overrides, *(f"--config.{k}={format_value(v)}" for k, v in overrides.items())]


def check_configs(config: str, base_overrides: Sequence[str], runs: Sequence[Run]) -> None:
    """Loads every run's config (cheap, nothing compiles): a misspelt field, or a value of the wrong
    type or out of its range (`config_schema`), fails here, naming the run, before any run starts.
    What only `train` judges (the stores, e.g. a model grid the store does not hold) passes and
    fails in its run, which the summary then reports."""
    from vimpac_jax.config_utils import load_config

    for run in runs:
        try:
            load_config(config_flags(config, base_overrides, run.overrides))
        except ValueError as e:
            raise ValueError(f"run {run.name}: {e}") from e


def train_command(config: str, base_overrides: Sequence[str], run: Run, program: Sequence[str]) -> list[str]:
    """`[*program, 'train', --config ..., --workdir RUN]`; program e.g. [python, '-m', 'vimpac_jax']."""
    return [*program, "train", *config_flags(config, base_overrides, run.overrides), "--workdir", str(run.workdir)]


def write_run_files(run: Run, command: Sequence[str]) -> None:
    run.workdir.mkdir(parents=True, exist_ok=True)
    record = {"index": run.index, "name": run.name, "overrides": run.overrides, "command": shlex.join(command)}
    io_utils.write_json_atomic(run.workdir / OVERRIDES_FILE, record, indent=2, sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Launchers.


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
            status = _read_json(run.workdir / STATUS_FILE)
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


# ----------------------------------------------------------------------------------------------
# Summary.


def _last_rows(metrics_file: Path) -> tuple[int | None, dict, dict]:
    """(last step, last row's train/* metrics, last row's eval/* metrics) of metrics.jsonl."""
    step, train, evals = None, {}, {}
    if not metrics_file.is_file():
        return step, train, evals
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut off by a killed run
        if not isinstance(row, dict):
            continue
        if isinstance(row.get("step"), int):
            step = row["step"] if step is None else max(step, row["step"])
        t = {k: v for k, v in row.items() if k.startswith("train/") and isinstance(v, (int, float))}
        e = {k: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))}
        if t:
            train = t
        if e:
            evals = e
    return step, train, evals


def _last_log_line(run_dir: Path) -> str:
    """The last line of log.txt that says what went wrong (an 'error' line if there is one)."""
    log = run_dir / LOG_FILE
    if not log.is_file():
        return ""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [""])[-1][:200]


def collect(root: str | os.PathLike) -> list[dict]:
    """One row per run directory under ROOT (those holding overrides.json), in index order.

    Row keys: run, overrides (dict), status ('ok' | 'preempted' | 'failed (rc=N)' | 'not finished'),
    returncode, step, metrics (dict of train/* and eval/* numbers), note (failed runs: the
    error line of log.txt).
    """
    root = Path(root)
    rows = []
    for run_dir in sorted(p for p in root.iterdir() if (p / OVERRIDES_FILE).is_file()) if root.is_dir() else []:
        info = _read_json(run_dir / OVERRIDES_FILE) or {}
        status = _read_json(run_dir / STATUS_FILE)
        code = status.get("returncode") if status else None
        step, train, evals = _last_rows(run_dir / "metrics.jsonl")
        results = _read_json(run_dir / "eval_results.json") or {}
        for k, v in results.items():  # fine-tuning's final multi-view scores
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                evals.setdefault(f"eval/{k}", v)
        if code is None:
            state = "not finished"
        elif code == exit_codes.PREEMPTED:
            state = "preempted"  # saved; the next `vimpac sweep` resumes it
        else:
            state = "ok" if code == 0 else f"failed (rc={code})"
        rows.append(dict(run=run_dir.name, index=info.get("index", len(rows)), overrides=info.get("overrides", {}),
                         status=state, returncode=code, step=step, metrics={**train, **evals},
                         note="" if code == 0 else _last_log_line(run_dir)))
    rows.sort(key=lambda r: (r["index"], r["run"]))
    if not rows:
        raise FileNotFoundError(f"no runs under {root} (no */{OVERRIDES_FILE}); was it made by `vimpac sweep`?")
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _columns(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    fields = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    metrics = sorted({k for r in rows for k in r["metrics"]},
                     key=lambda k: (MARKDOWN_METRICS.index(k) if k in MARKDOWN_METRICS else len(MARKDOWN_METRICS), k))
    return fields, metrics


def summary_csv(rows: Sequence[dict]) -> str:
    fields, metrics = _columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", *fields, "status", "returncode", "step", *metrics, "note"])
    for r in rows:
        writer.writerow([r["run"], *(r["overrides"].get(f, "") for f in fields), r["status"],
                         "" if r["returncode"] is None else r["returncode"], "" if r["step"] is None else r["step"],
                         *(repr(r["metrics"][m]) if m in r["metrics"] else "" for m in metrics), r["note"]])
    return buf.getvalue()


def summary_markdown(rows: Sequence[dict], title: str = "") -> str:
    fields, metrics = _columns(rows)
    shown = [m for m in metrics if m in MARKDOWN_METRICS or m.startswith("eval/")]
    header = ["run", *fields, "status", "step", *shown]
    has_notes = any(r["note"] for r in rows)
    if has_notes:
        header.append("note")
    lines = [f"# {title}\n"] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        cells = [r["run"], *(format_value(r["overrides"][f]) if f in r["overrides"] else "" for f in fields),
                 r["status"], _fmt(r["step"]),
                 *(_fmt(r["metrics"].get(m)) for m in shown)]
        if has_notes:
            cells.append(r["note"])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    ok = sum(r["status"] == "ok" for r in rows)
    lines.append(f"\n{ok}/{len(rows)} runs ok. All logged metrics: summary.csv.\n")
    return "\n".join(lines)


def write_summary(root: str | os.PathLike) -> tuple[Path, Path, list[dict]]:
    """Collects ROOT's runs and writes ROOT/summary.md and ROOT/summary.csv (atomically, so a
    summary on disk is always a whole one)."""
    root = Path(root)
    rows = collect(root)
    outputs = []
    for name, text in (("summary.md", summary_markdown(rows, title=f"Sweep {root.name}")),
                       ("summary.csv", summary_csv(rows))):
        io_utils.write_text_atomic(root / name, text)
        outputs.append(root / name)
    return outputs[0], outputs[1], rows


SUMMARY_PLOT = "summary.png"
PLOT_PANELS = 9  # metrics drawn at most


def plot_points(rows: Sequence[dict]) -> tuple[str, list[tuple[Any, dict]], list[str]]:
    """-> (swept field(s), [(swept value, final metrics)] of the finished runs, metrics to draw).

    The swept value is the field whose value differs between runs (several: their values joined,
    "a=1, b=2"); the metrics are the final eval/* ones, else the train ones of the summary table."""
    fields, metrics = _columns(rows)
    done = [r for r in rows if r["status"] == "ok" and r["metrics"]]
    varied = [f for f in fields if len({format_value(r["overrides"].get(f)) for r in rows}) > 1] or fields
    if not done or not varied:
        return "", [], []
    if len(varied) == 1:
        field = varied[0]
        points = [(r["overrides"].get(field), r["metrics"]) for r in done]
    else:
        field = ", ".join(varied)
        points = [(", ".join(f"{f}={format_value(r['overrides'][f])}" for f in varied if f in r["overrides"]),
                   r["metrics"]) for r in done]
    evals = [m for m in metrics if m.startswith("eval/")]
    shown = evals or [m for m in metrics if m in MARKDOWN_METRICS]
    return field, points, shown[:PLOT_PANELS]


def plot_summary(root: str | os.PathLike, rows: Sequence[dict]) -> Path | None:
    """ROOT/summary.png: each final metric against the swept value (`plot_points`), also in
    ROOT/tensorboard (tag `sweep/summary`); None when no finished run has metrics. Needs the viz
    extra (`plots.VizExtraMissing` otherwise)."""
    from vimpac_jax import plots

    root = Path(root)
    field, points, metrics = plot_points(rows)
    if not points or not metrics:
        return None
    image = plots.sweep_plot_image(points, field, metrics, title=f"Sweep {root.name}: final metrics")
    path = plots.write_png(root / SUMMARY_PLOT, image)
    plots.write_tensorboard_images(root / "tensorboard", 0, {"sweep/summary": image})
    return path
