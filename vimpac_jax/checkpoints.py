"""Model checkpoints: a directory with `model_config.json` and the variables saved by orbax.

This is the format of converted released checkpoints and of exported models. A directory is
written under a temporary name and renamed when complete, so a crash never leaves a directory
that looks like a finished checkpoint.
"""

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vimpac_jax.io_utils import atomic_directory

CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


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
        record = {"model": dict(model_config), **({"metadata": metadata} if metadata else {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Path(directory).absolute()


def load_model_config(directory) -> dict[str, Any]:
    d = Path(directory)
    if not is_model_checkpoint(d):
        raise FileNotFoundError(f"{d} is not a vimpac-jax model checkpoint (expected {CONFIG_FILE} and "
                                f"{VARIABLES_DIR}/ inside it)")
    return json.loads((d / CONFIG_FILE).read_text())["model"]


def load_model(directory) -> tuple[dict[str, Any], dict]:
    """-> (model config, variables as numpy arrays)."""
    config = load_model_config(directory)
    variables = ocp.StandardCheckpointer().restore(Path(directory).absolute() / VARIABLES_DIR)
    return config, jax.tree.map(np.asarray, variables)
