"""The run directory of `vimpac train`: the one module that knows its layout.

    W/config.json          the resolved run config; a resumed run must match it (`check_config`)
    W/checkpoints/<step>/  orbax steps (`training/checkpointing.py`): state, data iterator, meta
    W/.lock                held by process 0 of the run in progress (pid and host inside)
    W/metrics.jsonl, tensorboard/, eval_results.json, predictions.csv   outputs (train.py, metrics.py)
    W/tensorboard/plugins/profile/   the jax.profiler trace of `config.train.profile_steps` (profiling.py)

Everything that reads a run comes here: the loop's resume (`restore_state`), `config.init_from`,
`vimpac evaluate`, `vimpac export`, `vimpac visualize` and `vimpac predict` (`restore_variables`:
the parameters and BatchNorm statistics only, optionally the optimizer state).

A run's identity is recorded with every checkpoint (`run_identity`): its seed and the hash of
each token store's metadata.json. A resume checks it against the checkpoint, so a store replaced
at the same path, or another seed after config.json was deleted, is an error naming what changed
rather than a run that silently continues on other data.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import jax
import ml_collections

from vimpac_jax import io_utils
from vimpac_jax.training import checkpointing

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = checkpointing.CHECKPOINTS_DIR
LOCK_FILE = io_utils.WORKDIR_LOCK_FILE
INIT_FROM_FILE = "init_from.json"  # what the run was initialised from (`record_init_source`)

# Fields that may change when a run is resumed (they do not change what it computes).
RESUME_FREE_FIELDS = ("train.log_every", "train.progress_seconds", "train.checkpoint_every", "train.keep_checkpoints",
                      "train.eval_every", "train.profile", "data.workers", "knn.every", "pretrain.eval_batch_size")

# Token stores a run reads; their metadata.json (written last by `vimpac tokenize`) names what they hold.
STORE_FIELDS = ("data.train_store", "data.eval_store", "knn.train_store", "knn.eval_store")


class WorkdirError(ValueError):
    """A directory that is not a usable run directory, or a resume that does not match its run."""


class RunFormatError(WorkdirError):
    """A run written in another format than this version's (`checkpointing.FORMAT_VERSION`)."""


def migrate_command(path) -> str:
    """The one command that brings the run in workdir `path` to the current format."""
    return f"vimpac migrate --workdir {path}"


def check_format(record: dict, path, what: str) -> None:
    """RunFormatError naming `vimpac migrate` unless `record` (config.json, a checkpoint's meta)
    is of the current run format."""
    version = record.get(checkpointing.FORMAT_FIELD)
    if version == checkpointing.FORMAT_VERSION:
        return
    if isinstance(version, int) and version > checkpointing.FORMAT_VERSION:
        raise RunFormatError(f"{what} is of run format {version}, newer than this vimpac-jax reads "
                             f"({checkpointing.FORMAT_VERSION}): use the version that wrote it")
    written = f"run format {version}" if version is not None else "no run format (an older vimpac-jax)"
    raise RunFormatError(f"{what} records {written}; this vimpac-jax reads format {checkpointing.FORMAT_VERSION} "
                         f"only: run `{migrate_command(path)}` first")


def is_workdir(path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / CHECKPOINTS_DIR).is_dir()


def checkpoints_dir(path) -> Path:
    return Path(path).absolute() / CHECKPOINTS_DIR


def require_workdir(path, what: str = "--workdir") -> Path:
    path = Path(path)
    if not is_workdir(path):
        raise WorkdirError(f"{what} {path}: not a training workdir (expected {CONFIG_FILE} and {CHECKPOINTS_DIR}/)")
    return path


def read_config_dict(path) -> dict[str, Any]:
    """The run config of workdir `path` as written (a plain dict)."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise WorkdirError(f"{path}: not a training workdir (no {CONFIG_FILE})")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise WorkdirError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise WorkdirError(f"{config_file}: not a run config (a JSON object)")
    check_format(config, path, str(config_file))
    return {k: v for k, v in config.items() if k != checkpointing.FORMAT_FIELD}


def read_config(path) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(read_config_dict(path))


def read_model_config(path) -> dict[str, Any]:
    """The `model` block of the run config (the model config), without reading any weights."""
    model = read_config_dict(path).get("model")
    if not isinstance(model, dict):
        raise WorkdirError(f"{Path(path) / CONFIG_FILE}: no 'model' block (the model config) in the run config")
    return model


def _as_dict(config) -> dict:
    return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def _flat(config: dict) -> dict[str, Any]:
    from flax import traverse_util

    return {".".join(k): v for k, v in traverse_util.flatten_dict(config).items()}


def config_differences(previous: dict, now: dict) -> list[str]:
    """Dotted fields that differ between two run configs, except `RESUME_FREE_FIELDS`."""
    a, b = _flat(previous), _flat(now)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(RESUME_FREE_FIELDS))


def _listed(fields: list[str], most: int = 8) -> str:
    return ", ".join(fields[:most]) + (f" and {len(fields) - most} more" if len(fields) > most else "")


def check_config(path, config) -> None:
    """A workdir that already holds a run must hold this one (up to `RESUME_FREE_FIELDS`); writes nothing.

    Fields the stored config lacks (a run written before they existed) are named apart: their
    defaults may compute something else than that run did (e.g. `pretrain.dropout_rng`)."""
    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        return
    previous = read_config_dict(path)
    changed = config_differences(previous, _as_dict(config))
    if changed:
        stored = _flat(previous)
        absent = [k for k in changed if k not in stored]
        differ = [k for k in changed if k in stored]
        parts = [f"{_listed(differ)} differ"] if differ else []
        if absent:
            parts.append(f"{_listed(absent)} absent from its {CONFIG_FILE} (written before these fields existed)")
        raise WorkdirError(f"{path} holds a run with another config ({'; '.join(parts)}); "
                           f"use a new --workdir or the same config")


def write_config(path, config) -> None:
    """Write the resolved config to W/config.json (process 0), after every check of the run."""
    if jax.process_index() == 0:
        io_utils.write_json_atomic(Path(path) / CONFIG_FILE,
                                   {**_as_dict(config), checkpointing.FORMAT_FIELD: checkpointing.FORMAT_VERSION},
                                   indent=2)


def record_init_source(path, record: dict) -> None:
    """W/init_from.json: the `config.init_from` the run started from and the step of its
    checkpoint used (a damaged newest one is skipped: `tasks/init_source.py`). Written once
    (process 0), when the run starts: a resume keeps the record of the start, even if the source
    run has gone on since."""
    target = Path(path) / INIT_FROM_FILE
    if jax.process_index() == 0 and not target.exists():
        io_utils.write_json_atomic(target, record, indent=2)


# ----------------------------------------------------------------------------------------------
# The run's identity, recorded in each checkpoint's meta.

def _get(config, dotted: str):
    value = config
    for key in dotted.split("."):
        if not hasattr(value, "get"):
            return None
        value = value.get(key)
    return value


def store_digest(store) -> Optional[str]:
    """sha256 of a token store's metadata.json; None when it has none."""
    meta = Path(store) / "metadata.json"
    return hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else None


def run_identity(config) -> dict[str, Any]:
    """{'seed': int, 'stores': {field: sha256 of the store's metadata.json}} of a run config."""
    stores = {field: store_digest(_get(config, field)) for field in STORE_FIELDS if _get(config, field)}
    return {"seed": int(_get(config, "seed")), "stores": stores}


def check_identity(meta: dict, identity: dict, where: str) -> None:
    """Raise WorkdirError naming what differs between a checkpoint's recorded identity and this run's."""
    problems = []
    if int(meta["seed"]) != identity["seed"]:
        problems.append(f"config.seed is {identity['seed']}, the checkpoint's run used {meta['seed']}")
    for field, recorded in (meta.get("stores") or {}).items():
        now = identity["stores"].get(field)
        if recorded is not None and now != recorded:
            problems.append(f"config.{field}: the store's metadata.json has changed since the checkpoint was "
                            f"written (sha256 {recorded[:12]}..., now {(now or 'missing')[:12]}...): it was replaced "
                            f"or rewritten")
    if problems:
        raise WorkdirError(f"{where} belongs to another run: " + "; ".join(problems) +
                           ". Resume with the same seed and stores, or start a new --workdir")


# ----------------------------------------------------------------------------------------------
# Checkpoints.

def restore_state(manager, abstract_state: Any, data_iterator: Any, identity: dict,
                  log: Callable[[str], None]) -> Optional[tuple[int, Any, dict]]:
    """The loop's resume: (step, state, meta) of the newest intact checkpoint of this run, the
    data iterator restored in place; None for a fresh workdir. A damaged step skipped is moved
    aside (`<step>.damaged`): the run saves below its step again. See checkpointing.restore_latest."""
    return checkpointing.restore_latest(
        manager, abstract_state, data_iterator, log=log, keep_going=(WorkdirError,), move_aside=True,
        check_meta=lambda meta: _check_meta(meta, identity, manager))


def _check_meta(meta: dict, identity: dict, manager) -> None:
    """A step's meta: of the current run format (else RunFormatError naming `vimpac migrate`),
    of this run (`check_identity`)."""
    check_format(meta, Path(manager.directory).parent, f"checkpoint {manager.directory}")
    check_identity(meta, identity, f"{manager.directory}")


def restore_variables(path, collections: Iterable[str] = ("params", "batch_stats"), *,
                      shardings: Optional[dict] = None, log: Callable[[str], None] = checkpointing.log_to_stderr
                      ) -> tuple[int, dict]:
    """(step, {collection: tree}) of the newest intact checkpoint of workdir `path`: only the
    named fields of the train state (numpy arrays, or laid out by `shardings`). WorkdirError
    when there is no workdir or no step restores; RunFormatError (naming `vimpac migrate`) for a
    step of another run format."""
    path = require_workdir(path)
    try:
        step, restored = checkpointing.restore_collections(
            checkpoints_dir(path), collections, shardings=shardings, log=log, keep_going=(RunFormatError,),
            check_meta=lambda meta: check_format(meta, path, f"checkpoint {checkpoints_dir(path)}"))
    except checkpointing.CheckpointRestoreError as e:
        raise WorkdirError(str(e)) from None
    return step, restored
