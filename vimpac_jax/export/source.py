"""What `vimpac export` reads: a model checkpoint directory or a training workdir.

(a) A model checkpoint (`vimpac_jax.checkpoints`: `model_config.json` + `variables/`), as
    `vimpac convert official` writes.
(b) A training workdir: `config.json` (the resolved run config; its `model` block is the model
    config) and orbax checkpoints `checkpoints/<step>/state` holding the train state. Only
    `params` and `batch_stats` of the latest complete step are read (a partial restore, so the
    optimizer moments are never loaded), as host numpy arrays whatever the training sharding was.

Either way the variables are checked against the architecture the config describes before any
format is written, so a config/weights mismatch is reported with names, not as a crash later.
"""

import json
import logging
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np

from vimpac_jax import checkpoints
from vimpac_jax.models.model import abstract_variables, build_model

TRAIN_CONFIG = "config.json"
TRAIN_CHECKPOINTS = "checkpoints"
STATE_ITEM = "state"
VARIABLE_COLLECTIONS = ("params", "batch_stats")


class ExportSourceError(ValueError):
    pass


def source_kind(path) -> str:
    """'checkpoint' (a) or 'workdir' (b); ExportSourceError naming what is missing otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ExportSourceError(f"--workdir {path}: no such directory")
    if checkpoints.is_model_checkpoint(path):
        return "checkpoint"
    if (path / TRAIN_CONFIG).is_file() and (path / TRAIN_CHECKPOINTS).is_dir():
        return "workdir"
    raise ExportSourceError(
        f"--workdir {path}: neither a model checkpoint ({checkpoints.CONFIG_FILE} + {checkpoints.VARIABLES_DIR}/) "
        f"nor a training workdir ({TRAIN_CONFIG} + {TRAIN_CHECKPOINTS}/<step>/)")


def _train_model_config(workdir: Path) -> dict[str, Any]:
    config_file = workdir / TRAIN_CONFIG
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ExportSourceError(f"{config_file}: not valid JSON ({e})") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise ExportSourceError(f"{config_file}: no 'model' block (the model config) in the run config")
    return model


class _SkipOtherItemsWarning(logging.Filter):
    """orbax warns about every item of a step it is not asked for (the data iterator, meta)."""

    def filter(self, record):
        return "could not be restored" not in record.getMessage()


def _restore_latest_variables(workdir: Path) -> tuple[int, dict]:
    """-> (step, {'params', 'batch_stats'?}) of the latest complete orbax step, as numpy."""
    quiet = _SkipOtherItemsWarning()
    logging.getLogger("absl").addFilter(quiet)
    try:
        return _restore_latest_variables_noisy(workdir)
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def _restore_latest_variables_noisy(workdir: Path) -> tuple[int, dict]:
    import orbax.checkpoint as ocp  # only training workdirs need it at this point

    directory = (workdir / TRAIN_CHECKPOINTS).absolute()
    # Registering the handler lets the manager read the item's tree metadata without a target.
    manager = ocp.CheckpointManager(directory, item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler()})
    step = manager.latest_step()
    if step is None:
        raise ExportSourceError(f"{directory}: no complete checkpoint step (an interrupted save is never used)")
    metadata = manager.item_metadata(step)[STATE_ITEM]
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, dict) or "params" not in tree:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ExportSourceError(f"{directory}/{step}/{STATE_ITEM}: no 'params' in the saved train state (found {keys})")
    wanted = {k: tree[k] for k in VARIABLE_COLLECTIONS if k in tree and jax.tree.leaves(tree[k])}
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)}))[STATE_ITEM]
    finally:
        manager.close()
    return int(step), jax.tree.map(np.asarray, dict(restored))


def check_variables(model_config: dict, variables: dict, source) -> None:
    """Raise ExportSourceError listing every missing, unexpected or misshapen variable."""
    try:
        model = build_model(model_config)
        expected = flax.traverse_util.flatten_dict(abstract_variables(model, model_config))
    except (KeyError, ValueError, TypeError) as e:
        raise ExportSourceError(f"{source}: the model config does not describe a model: {e!r}") from None
    got = flax.traverse_util.flatten_dict(variables)
    errors = [f"missing {'/'.join(p)} {tuple(s.shape)}" for p, s in expected.items() if p not in got]
    errors += [f"unexpected {'/'.join(p)} {tuple(np.shape(v))}" for p, v in got.items() if p not in expected]
    errors += [f"{'/'.join(p)} has shape {tuple(np.shape(got[p]))}, the config needs {tuple(s.shape)}"
               for p, s in expected.items() if p in got and tuple(np.shape(got[p])) != tuple(s.shape)]
    if errors:
        raise ExportSourceError(f"{source}: the variables do not fit the model config:\n  " + "\n  ".join(errors))


def load_model_config(path) -> dict[str, Any]:
    """The model config of a checkpoint or workdir, without reading any weights (for early checks)."""
    path = Path(path)
    if source_kind(path) == "checkpoint":
        return checkpoints.load_model_config(path)
    return _train_model_config(path)


def load_exportable(path) -> tuple[dict[str, Any], dict]:
    """-> (model config, variables {'params', 'batch_stats'?} as numpy) from a checkpoint or workdir."""
    path = Path(path)
    if source_kind(path) == "checkpoint":
        config, variables = checkpoints.load_model(path)
    else:
        config = _train_model_config(path)
        _, variables = _restore_latest_variables(path)
    variables = {k: v for k, v in variables.items() if k in VARIABLE_COLLECTIONS and jax.tree.leaves(v)}
    check_variables(config, variables, path)
    return config, variables
