"""`vimpac migrate`: bring a run directory written by an older vimpac-jax to the current run
format (`checkpointing.FORMAT_VERSION`), in place; and a model checkpoint's model_config.json
written before it recorded a format (`checkpoints.FORMAT_VERSION`).

The library reads the current format only (`workdir.check_format` refuses another one, naming
this command), so every conversion of an older layout lives here, once:

  format 0 -> 1 (runs written before config.json and checkpoint meta recorded a format):
    config.json            `model.remat` true/false -> "full"/"none" (backbone.REMAT_POLICIES)
    <step>/data/*.json     grain's own iterator state -> ours, {"next_batch": b} (pipelines.make_iterator)
    <step>/meta/metadata   the run's seed from config.json where the meta has none
  format 1 -> 2 (the fine-tuning fields got their defaults in configs/common.py `base_config`):
    config.json            `variant_set`, `eval_crops`, `class_names` where absent, at the values
                           that the readers took for an absent field (None, "three", none)
  any format -> 2 (steps written before checksums were recorded):
    <step>/meta/metadata   the arrays' checksums (checkpointing.CHECKSUMS) where it has none: the
                           arrays are read once and summed, so every later restore checks them (a
                           step whose arrays cannot be read is left without: the readers skip it
                           as damaged, as they skip any step without checksums)

Each step is rewritten with atomic writes, its meta last (its format_version marks it done), and
config.json after every step: an interrupted migration is finished by running it again.

A model checkpoint (`checkpoints.py`) whose model_config.json records no format_version was
written by a vimpac-jax before the field, of format 1: the field is added (its model block is
completed by its loader, as any).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from vimpac_jax import checkpoints, io_utils
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


# Format 1 -> 2: the fields a store task's config.json lacked, at what their readers took for
# an absent field (tasks/multiview.py, tasks/store_task.check_variant_set).
FORMAT_2_FIELDS = {"variant_set": None, "eval_crops": "three", "class_names": []}


def _migrate_config(config: dict, version: int) -> None:
    """config.json (a dict, in place) from run format `version` to the current one."""
    if version < 1:
        model = config.get("model")
        if isinstance(model, dict) and "remat" in model:
            model["remat"] = _remat_policy(model["remat"])
    if version < 2 and config.get("task") in ("pretrain", "finetune"):
        for name, value in FORMAT_2_FIELDS.items():
            config.setdefault(name, value)
    config[checkpointing.FORMAT_FIELD] = checkpointing.FORMAT_VERSION


def _migrate_step(step_dir: Path, config: dict, log: Callable[[str], None]) -> bool:
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
    if not meta.get(checkpointing.CHECKSUMS):
        try:
            meta[checkpointing.CHECKSUMS] = checkpointing.stored_checksums(step_dir)
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for a damaged file
            log(f"warning: {step_dir}: its arrays cannot be read ({type(e).__name__}: {str(e)[:200]}); left without "
                f"checksums, so the readers skip it as a damaged step")
    meta[checkpointing.FORMAT_FIELD] = checkpointing.FORMAT_VERSION
    io_utils.write_text_atomic(meta_file, json.dumps(meta))
    return True


def migrate_model_checkpoint(path, log: Callable[[str], None] = print) -> bool:
    """Adds format_version to the model_config.json of the model checkpoint at `path` that has
    none; False when it has one already. ValueError for another format or a file that is no
    model checkpoint's."""
    config_file = Path(path) / checkpoints.CONFIG_FILE
    record = checkpoints.read_model_record(path)
    version = record.get(checkpoints.FORMAT_FIELD)
    if version is None:
        record[checkpoints.FORMAT_FIELD] = checkpoints.FORMAT_VERSION
        io_utils.write_json_atomic(config_file, record, indent=2)
    elif version != checkpoints.FORMAT_VERSION:
        raise ValueError(f"{config_file}: model checkpoint format {version!r} is not one this vimpac-jax migrates "
                         f"(none, or {checkpoints.FORMAT_VERSION})")
    log(f"{path}: model checkpoint format {checkpoints.FORMAT_VERSION}"
        + (" (was none)" if version is None else ", nothing to do"))
    return version is None


def migrate_workdir(path, log: Callable[[str], None] = print) -> int:
    """Rewrites the run in workdir `path` in the current format; the number of checkpoint steps
    rewritten. A model checkpoint directory (model_config.json) is `migrate_model_checkpoint`'s.
    ValueError (bad input) for a directory that is neither, or of a newer format."""
    path = Path(path)
    config_file = path / workdir_lib.CONFIG_FILE
    if not config_file.is_file() and (path / checkpoints.CONFIG_FILE).is_file():
        return int(migrate_model_checkpoint(path, log))
    if not config_file.is_file():
        raise ValueError(f"--workdir {path}: not a training workdir (no {workdir_lib.CONFIG_FILE}) nor a model "
                         f"checkpoint (no {checkpoints.CONFIG_FILE})")
    config = json.loads(config_file.read_text())
    version = config.get(checkpointing.FORMAT_FIELD, 0)
    if not isinstance(version, int) or version > checkpointing.FORMAT_VERSION:
        raise ValueError(f"{config_file}: run format {version!r} is not one this vimpac-jax migrates "
                         f"(0 to {checkpointing.FORMAT_VERSION})")
    with io_utils.exclusive_lock(path / workdir_lib.LOCK_FILE, f"workdir {path}"):
        steps = sorted((d for d in (path / workdir_lib.CHECKPOINTS_DIR).glob("*") if d.name.isdigit() and d.is_dir()),
                       key=lambda d: int(d.name))
        rewritten = sum(_migrate_step(d, config, log) for d in steps)
        if version != checkpointing.FORMAT_VERSION:
            _migrate_config(config, version)
            io_utils.write_json_atomic(config_file, config, indent=2)
    log(f"{path}: run format {checkpointing.FORMAT_VERSION}"
        + (f" (was {version}; {rewritten} of {len(steps)} checkpoint steps rewritten)"
           if version != checkpointing.FORMAT_VERSION or rewritten else ", nothing to do"))
    return rewritten
