"""Export to safetensors: flat named tensors plus the model config as JSON.

Directory layout:
  model.safetensors   one tensor per variable, named by its path in our variable tree
                      ('params/backbone/layer_0/mlp/fc/kernel', 'batch_stats/proj_head/bn_0/mean'),
                      in our layout (Dense kernels [in, out]); the header's metadata holds
                      'model_config' (JSON) and 'format'
  model_config.json   {"model": <model config>, "format_version": ...}, as in our model checkpoints
                      (`checkpoints.write_model_config`)

`load_safetensors(dir)` reads it back as (model config, variables) for `build_model`.
Needs the `safetensors` package (the `export` extra).
"""

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import flax
import numpy as np

from vimpac_jax import checkpoints
from vimpac_jax.models.config import complete

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = checkpoints.CONFIG_FILE
FORMAT = "vimpac-jax variables v1"


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError("the safetensors format needs the `safetensors` package: "
                          "pip install 'vimpac-jax[export]'") from None
    return safetensors.numpy


def flat_tensors(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{'params': {'backbone': {...}}} -> {'params/backbone/...': contiguous array}."""
    flat = flax.traverse_util.flatten_dict(dict(variables), sep="/")
    return {name: np.ascontiguousarray(np.asarray(value)) for name, value in flat.items()}


def export_safetensors(cfg: Mapping[str, Any], variables: Mapping[str, Any], out_dir) -> dict[str, Any]:
    """Write model.safetensors and model_config.json into the (existing, empty) `out_dir`."""
    st = _safetensors_numpy()
    out_dir = Path(out_dir)
    tensors = flat_tensors(variables)
    config_json = json.dumps(dict(cfg), sort_keys=True)
    try:
        st.save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": FORMAT, "model_config": config_json})
    except Exception as e:  # noqa: BLE001 - safetensors' Rust writer raises SafetensorError for an I/O error
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        # As an OSError of the file, so a full disk is one `error:` line (cli.WRITE_ERRORS).
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(out_dir / WEIGHTS_FILE)) from None
    (out_dir / WEIGHTS_FILE).chmod(0o644)  # safetensors creates the file owner-only
    checkpoints.write_model_config(out_dir, cfg)
    return {"tensors": len(tensors), "warnings": []}


def load_safetensors(path) -> tuple[dict[str, Any], dict]:
    """-> (model config, completed; variables) from an export directory (or its model.safetensors file)."""
    st = _safetensors_numpy()
    from safetensors import safe_open

    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such file")
    with safe_open(str(weights), framework="numpy") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT or "model_config" not in metadata:
        raise ValueError(f"{weights}: not a vimpac-jax safetensors export (metadata format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    tensors = st.load_file(str(weights))
    variables = flax.traverse_util.unflatten_dict(tensors, sep="/")
    return complete(json.loads(metadata["model_config"])), variables  # the block completed, as its other loaders
