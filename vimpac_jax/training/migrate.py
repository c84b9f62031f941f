"""`vimpac migrate`: bring a run directory written by an older vimpac-jax to the current run
format (`checkpointing.FORMAT_VERSION`), in place.

The library reads the current format only (`workdir.check_format` refuses another one, naming
this command), so every conversion of an older layout lives here, once:

  format 0 -> 1 (runs written before config.json and checkpoint meta recorded a format):
    config.json            `model.remat` true/false -> "full"/"none" (backbone.REMAT_POLICIES)
    <step>/data/*.json     grain's own iterator state -> ours, {"next_batch": b} (pipelines.make_iterator)
    <step>/meta/metadata   the run's seed from config.json where the meta has none

Each step is rewritten with atomic writes, its meta last (its format_version marks it done), and
config.json after every step: an interrupted migration is finished by running it again.
Checkpoints written before checksums were recorded stay unverified (their arrays are not re-read).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from vimpac_jax import io_utils
from vimpac_jax.training import checkpointing
from vimpac_jax.training import workdir as workdir_lib

META_FILE = "metadata"  # orbax's JsonCheckpointHandler file of the meta item


def grain_state_next_batch(state: dict) -> int:
    """The next batch index of grain 0.2's own iterator state: {"next_index": b} at 0 workers;
    at N workers an interleave of the N workers' states, worker w reading batches w, w + N, ...
    of which it has passed next_index."""
    if isinstance(state.get("next_batch"), int):
        return int(state["next_batch"])
    if "next_index" in state:
        return int(state["next_index"])
    workers = state.get("iterators_in_use_states")
    if isinstance(workers, list) and workers and all(isinstance(w, dict) and "next_index" in w for w in workers):
        batch = sum(int(w["next_index"]) for w in workers)
        if int(state.get("next_index_in_cycle", batch % len(workers))) == batch % len(workers):
            return batch
    raise ValueError(f"unknown data iterator state {str(state)[:200]}")


def _remat_policy(value):
    return ("full" if value else "none") if isinstance(value, bool) or value is None else value


def _migrate_step(step_dir: Path, config: dict) -> bool:
    """Step `step_dir` to the current format; False when it already is."""
    meta_file = step_dir / checkpointing.META / META_FILE
    meta = json.loads(meta_file.read_text())
    if meta.get(checkpointing.FORMAT_FIELD) == checkpointing.FORMAT_VERSION:
        return False
    for state_file in sorted((step_dir / checkpointing.DATA).glob("*.json")):
        try:
            batch = grain_state_next_batch(json.loads(state_file.read_text()))
        except ValueError as e:
            raise ValueError(f"{state_file}: {e}") from None
        io_utils.write_text_atomic(state_file, json.dumps({"next_batch": batch}))
    meta.setdefault("seed", config["seed"])
    meta[checkpointing.FORMAT_FIELD] = checkpointing.FORMAT_VERSION
    io_utils.write_text_atomic(meta_file, json.dumps(meta))
    return True


def migrate_workdir(path, log: Callable[[str], None] = print) -> int:
    """Rewrites the run in workdir `path` in the current format; the number of checkpoint steps
    rewritten. ValueError (bad input) for a directory that is no run, or of a newer format."""
    path = Path(path)
    config_file = path / workdir_lib.CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"--workdir {path}: not a training workdir (no {workdir_lib.CONFIG_FILE})")
    config = json.loads(config_file.read_text())
    version = config.get(checkpointing.FORMAT_FIELD, 0)
    if not isinstance(version, int) or version > checkpointing.FORMAT_VERSION:
        raise ValueError(f"{config_file}: run format {version!r} is not one this vimpac-jax migrates "
                         f"(0 to {checkpointing.FORMAT_VERSION})")
    with io_utils.exclusive_lock(path / workdir_lib.LOCK_FILE, f"workdir {path}"):
        steps = sorted((d for d in (path / workdir_lib.CHECKPOINTS_DIR).glob("*") if d.name.isdigit() and d.is_dir()),
                       key=lambda d: int(d.name))
        rewritten = sum(_migrate_step(d, config) for d in steps)
        if version != checkpointing.FORMAT_VERSION:
            model = config.get("model")
            if isinstance(model, dict) and "remat" in model:
                model["remat"] = _remat_policy(model["remat"])
            config[checkpointing.FORMAT_FIELD] = checkpointing.FORMAT_VERSION
            io_utils.write_json_atomic(config_file, config, indent=2)
    log(f"{path}: run format {checkpointing.FORMAT_VERSION}"
        + (f" (was {version}; {rewritten} of {len(steps)} checkpoint steps rewritten)"
           if version != checkpointing.FORMAT_VERSION or rewritten else ", nothing to do"))
    return rewritten
