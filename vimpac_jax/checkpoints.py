"""Model checkpoints: a directory with `model_config.json` and the variables saved by orbax.

This is the format of converted released checkpoints and of exported models. A directory is
written under a temporary name and renamed when complete, so a crash never leaves a directory
that looks like a finished checkpoint.

`model_config.json` is {"model": <model block>, "format_version": FORMAT_VERSION, "metadata"?}.
Its one reader, `load_model_config`, reads this format only (a newer one is refused) and hands
out the model block completed (`models.config.complete`: fields written before they existed at
the block's defaults), so nothing after it fills a default. A file without "format_version" was
written by a vimpac-jax before the field (every writer of this file is ours: `vimpac convert
official` imports a released checkpoint by writing it, `vimpac export` writes it beside an
export): it is refused, naming `vimpac migrate --workdir DIR`, which adds the field.
"""

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vimpac_jax.io_utils import atomic_directory
from vimpac_jax.models import config as model_config_lib

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"
FORMAT_FIELD = "format_version"
FORMAT_VERSION = 1  # of model_config.json (and the variables beside it)


def is_model_checkpoint(directory) -> bool:
    d = Path(directory)
    return (d / CONFIG_FILE).is_file() and (d / VARIABLES_DIR).is_dir()


def save_model(directory, variables: dict, model_config: dict, *, metadata: dict | None = None,
               overwrite: bool = False) -> Path:
    """Write `variables` ({'params': ..., 'batch_stats': ...}, unboxed) and the model config."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / VARIABLES_DIR, jax.tree.map(np.asarray, variables))
        checkpointer.wait_until_finished()
        write_model_config(tmp, model_config, metadata=metadata)
    return Path(directory).absolute()


def migrate_command(directory) -> str:
    """The command that brings the model checkpoint at `directory` to this format."""
    return f"vimpac migrate --workdir {directory}"


def write_model_config(directory, model_config, *, metadata: dict | None = None) -> None:
    """`directory`/model_config.json of `model_config` (a model block), in this format."""
    record = {"model": model_config_lib.as_dict(model_config), FORMAT_FIELD: FORMAT_VERSION,
              **({"metadata": metadata} if metadata else {})}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_model_record(directory) -> dict[str, Any]:
    """`directory`/model_config.json as written, of any format; ValueError unless it is a JSON
    object with a model block."""
    path = Path(directory) / CONFIG_FILE
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
        raise ValueError(f"{path}: no 'model' block (the model config)")
    return record


def load_model_config(directory) -> dict[str, Any]:
    """The model block of the checkpoint at `directory`, completed; ValueError for a file of
    another format or a block without a model's size and token grid."""
    d = Path(directory)
    if not is_model_checkpoint(d):
        raise FileNotFoundError(f"{d} is not a vimpac-jax model checkpoint (expected {CONFIG_FILE} and "
                                f"{VARIABLES_DIR}/ inside it)")
    path = d / CONFIG_FILE
    record = read_model_record(d)
    version = record.get(FORMAT_FIELD)
    if version is None:
        raise ValueError(f"{path} records no format_version (written by an older vimpac-jax); this vimpac-jax "
                         f"reads model checkpoint format {FORMAT_VERSION} only: run `{migrate_command(d)}` first")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} is of model checkpoint format {version!r}; this vimpac-jax reads format "
                         f"{FORMAT_VERSION} only: use the vimpac-jax that wrote it")
    try:
        return model_config_lib.complete(record["model"])
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None


def load_model(directory) -> tuple[dict[str, Any], dict]:
    """-> (model config, variables as numpy arrays)."""
    config = load_model_config(directory)
    variables = ocp.StandardCheckpointer().restore(Path(directory).absolute() / VARIABLES_DIR)
    return config, jax.tree.map(np.asarray, variables)
