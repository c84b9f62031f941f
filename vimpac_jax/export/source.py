"""What `vimpac export` reads: a model checkpoint directory or a training workdir.

(a) A model checkpoint (`vimpac_jax.checkpoints`: `model_config.json` + `variables/`), as
    `vimpac convert official` writes.
(b) A training workdir (`training/workdir.py`: `config.json`, whose `model` block is the model
    config, and orbax checkpoints). Only `params` and `batch_stats` of the newest intact step are
    read (`workdir.restore_variables`: a partial restore, so the optimizer moments are never
    loaded), as host numpy arrays whatever the training sharding was.

Either way the variables are checked against the architecture the config describes before any
format is written, so a config/weights mismatch is reported with names, not as a crash later.
"""

from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np

from vimpac_jax import checkpoints, io_utils
from vimpac_jax.data import annotations
from vimpac_jax.models.model import abstract_variables, build_model
from vimpac_jax.training import workdir as workdir_lib

VARIABLE_COLLECTIONS = ("params", "batch_stats")
# A classifier's class names beside an export (or a checkpoint): one per line, label 0 first, the
# format `vimpac tokenize --class-names` and `vimpac predict --class-names` read.
CLASS_NAMES_FILE = "class_names.txt"


class ExportSourceError(ValueError):
    pass


def source_kind(path) -> str:
    """'checkpoint' (a) or 'workdir' (b); ExportSourceError naming what is missing otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ExportSourceError(f"--workdir {path}: no such directory")
    if checkpoints.is_model_checkpoint(path):
        return "checkpoint"
    if workdir_lib.is_workdir(path):
        return "workdir"
    raise ExportSourceError(
        f"--workdir {path}: neither a model checkpoint ({checkpoints.CONFIG_FILE} + {checkpoints.VARIABLES_DIR}/) "
        f"nor a training workdir ({workdir_lib.CONFIG_FILE} + {workdir_lib.CHECKPOINTS_DIR}/<step>/)")


def _train_model_config(path: Path) -> dict[str, Any]:
    try:
        return workdir_lib.read_model_config(path)
    except workdir_lib.WorkdirError as e:
        raise ExportSourceError(str(e)) from None


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
    config, variables, _ = read_exportable(path)
    return config, variables


def read_exportable(path) -> tuple[dict[str, Any], dict, Any]:
    """`load_exportable` and the step the variables are from (None for a model checkpoint)."""
    path = Path(path)
    step = None
    if source_kind(path) == "checkpoint":
        config, variables = checkpoints.load_model(path)
    else:
        config = _train_model_config(path)
        try:
            step, variables = workdir_lib.restore_variables(path, VARIABLE_COLLECTIONS)
        except workdir_lib.WorkdirError as e:
            raise ExportSourceError(str(e)) from None
    variables = {k: v for k, v in variables.items() if k in VARIABLE_COLLECTIONS and jax.tree.leaves(v)}
    check_variables(config, variables, path)
    return config, variables, step


def class_names(path) -> list[str] | None:
    """What the classifier at `path` calls its classes: the class_names.txt of an export or a
    checkpoint directory, else a workdir's (`tasks/multiview.py`: `class_names_of`: its config, else its stores');
    None when nothing says."""
    path = Path(path)
    if (path / CLASS_NAMES_FILE).is_file():
        return annotations.read_label_map(str(path / CLASS_NAMES_FILE))
    if workdir_lib.is_workdir(path):
        from vimpac_jax.tasks.multiview import class_names_of

        return class_names_of(workdir_lib.read_config(path))
    return None


def write_class_names(out_dir, names) -> None:
    """`out_dir`/class_names.txt, one name per line (`class_names` reads it back)."""
    io_utils.write_text_atomic(Path(out_dir) / CLASS_NAMES_FILE, "".join(f"{name}\n" for name in names))
