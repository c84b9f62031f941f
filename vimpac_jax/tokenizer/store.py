"""On-disk tokenizer directories: `tokenizer.json` + orbax-saved `params/`.

Layout of DST:
  tokenizer.json  {"kind": "dalle", "config": {...}, "weights_sha256": <params hash>, ...}
  params/         the parameter pytree, saved with orbax's StandardCheckpointer

A directory is written under a temporary sibling name and renamed into place at the end, so
a crash never leaves a DST that looks complete. `weights_sha256` hashes the parameter values
(see `params_sha256`) and is checked on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from vimpac_jax import io_utils

META_FILE = "tokenizer.json"
PARAMS_DIR = "params"


def params_sha256(params) -> str:
    """A hash of a pytree's leaves: path, dtype, shape and little-endian bytes, in path order."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(leaf)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}\n".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def save_tokenizer(dst, meta: dict, params, *, overwrite: bool = False) -> Path:
    """Write `meta` (+ weights_sha256) and `params` to the directory `dst`, atomically.

    Raises FileExistsError when dst exists and overwrite is False.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --force to replace it)")
    meta = {**meta, "weights_sha256": params_sha256(params)}
    with io_utils.atomic_directory(dst, overwrite=True) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        # The metadata file is written last: its presence marks a finished directory.
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return dst


def read_meta(directory) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {META_FILE}; not a (finished) tokenizer directory")
    return json.loads(path.read_text())


def load_tokenizer(directory, abstract_fn: Callable[[dict], Any], *, verify: bool = True):
    """Read a tokenizer directory -> (meta, params as numpy arrays).

    abstract_fn(config) gives the expected pytree of jax.ShapeDtypeStruct; restoring against it
    checks the structure. With verify, the values must hash to meta['weights_sha256'].
    """
    directory = Path(directory).absolute()
    meta = read_meta(directory)
    target = abstract_fn(meta["config"])
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / PARAMS_DIR, target)
    if verify and meta.get("weights_sha256") and params_sha256(params) != meta["weights_sha256"]:
        raise ValueError(f"{directory}: parameters do not match weights_sha256 in {META_FILE}")
    return meta, params
