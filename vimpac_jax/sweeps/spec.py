"""Sweep specs: the combinators, sweep files, and their expansion into runs.

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

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from vimpac_jax import io_utils

Overrides = dict[str, Any]
SCALARS = (bool, int, float, str)
FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # 'pretrain.nce_weight'

OVERRIDES_FILE = "overrides.json"
STATUS_FILE = "status.json"
LOG_FILE = "log.txt"
# The sweep's pid, given to each `vimpac train` it starts, which stops (saving, as on SIGTERM)
# when that process is gone: a sweep killed with SIGKILL leaves no run behind (commands/train.py).
PARENT_PID_ENV = "VIMPAC_SWEEP_PID"


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


def read_json(path: Path) -> dict | None:
    """A run's JSON file (overrides.json, status.json, ...); None when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

