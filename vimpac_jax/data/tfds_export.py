"""Write finished token stores as one TFDS dataset in the ArrayRecord file format (`vimpac export-tfds`).

    vimpac export-tfds --store train=stores/ucf_train --store test=stores/ucf_val \\
        --name ucf101_vimpac_tokens --data-dir ~/tensorflow_datasets

gives DATA_DIR/NAME/VERSION/ (default version 1.0.0), one split per store, one example per record
of the store (one per (video, variant)), in the store's order:

  tokens    int16 [frames, h, w]   (Tensor, stored as raw bytes)
  label     ClassLabel with the store's class names (-1: unlabelled); int64 (-1: none) when the
            store has no class names
  video_id  text
  fps       float32                the rate the frames were sampled at
  variant   text                   e.g. 'r128_center_noflip'

and the stores' tokenizer identity, fps, variants and counts in `info.metadata["vimpac"]`. Read it
with `tfds.data_source(NAME, data_dir=DATA_DIR, split="train")`: random access without TensorFlow
(text comes back as bytes), a source that grain takes as it is
(`grain.MapDataset.source(ds)`, `grain.DataLoader(data_source=ds, ...)`).

The dataset appears complete or not at all: TFDS writes it into a hidden temporary directory
beside DATA_DIR/NAME/VERSION that is renamed into place when everything is written
(`io_utils.atomic_directory`), so a killed export leaves no version directory TFDS would load.
Only complete stores (metadata.json "complete": true) are exported. Writing needs the `[tfds]`
extra (TensorFlow serialises the examples).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vimpac_jax import io_utils
from vimpac_jax.data import token_store
from vimpac_jax.data.tfds_source import import_tfds

log = logging.getLogger(__name__)

DEFAULT_VERSION = "1.0.0"
DEFAULT_SPLIT = "train"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # TFDS dataset names are snake_case
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")  # no '[', ':' or '+': those mean slicing in a split spec


def parse_store_args(values: Sequence[str]) -> dict[str, str]:
    """['train=DIR', 'test=DIR2'] -> {split: store dir}; a bare 'DIR' is the 'train' split."""
    stores: dict[str, str] = {}
    for value in values:
        split, sep, path = value.partition("=")
        if not sep:
            split, path = DEFAULT_SPLIT, value
        if not _SPLIT_RE.match(split) or not path:
            raise ValueError(f"--store {value!r}: expected [SPLIT=]STORE_DIR, SPLIT made of letters, digits and _")
        if split in stores:
            raise ValueError(f"--store: split {split!r} given twice")
        stores[split] = path
    if not stores:
        raise ValueError("--store: give at least one token store")
    return stores


def _read_stores(stores: Mapping[str, str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """{split: metadata} of complete stores with every shard present; the clear errors of `token_store`."""
    metas = {}
    for split, store in stores.items():
        meta = token_store.read_metadata(store)  # FileNotFoundError / ValueError for an unfinished store
        token_store.shard_paths(store)  # FileNotFoundError for a missing shard
        metas[split] = meta
    return metas


def _common(metas: Mapping[str, dict], key: str) -> Any:
    """The value of metadata `key` shared by every store (None where absent); ValueError when they differ."""
    values = {json.dumps(m.get(key), sort_keys=True) for m in metas.values()}
    if len(values) > 1:
        each = "; ".join(f"{split}: {m.get(key)!r}" for split, m in metas.items())
        raise ValueError(f"the stores differ in {key!r} ({each}); one dataset needs stores made alike")
    return next(iter(metas.values())).get(key)


def _first_token_hw(store) -> tuple[int, int]:
    first = next(token_store.iter_videos(store), None)
    if first is None:
        raise ValueError(f"token store {store} holds no records (every video failed?): nothing to export")
    return tuple(int(n) for n in first["tokens"].shape[1:])


def store_examples(store, token_hw: tuple[int, int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(key, example) for every record of a store, in its order (keys 0, 1, ...)."""
    for i, rec in enumerate(token_store.iter_videos(store)):
        if tuple(rec["tokens"].shape[1:]) != tuple(token_hw):
            raise ValueError(f"token store {store}: record {i} ({rec['video_id']!r}) has tokens "
                             f"{rec['tokens'].shape}, not [frames, {token_hw[0]}, {token_hw[1]}]")
        yield i, {"tokens": rec["tokens"], "label": -1 if rec["label"] is None else int(rec["label"]),
                  "video_id": rec["video_id"], "fps": np.float32(rec["fps"]), "variant": rec["variant"]}


def features_for(token_hw: tuple[int, int], class_names: Sequence[str] | None):
    """The TFDS FeaturesDict of one exported record (see the module docstring)."""
    tfds = import_tfds(with_tf=False)
    F = tfds.features
    h, w = token_hw
    label = F.ClassLabel(names=list(class_names)) if class_names else F.Scalar(dtype=np.int64)
    return F.FeaturesDict({
        "tokens": F.Tensor(shape=(None, h, w), dtype=np.int16, encoding=F.Encoding.BYTES),
        "label": label,
        "video_id": F.Text(),
        "fps": F.Scalar(dtype=np.float32),
        "variant": F.Text(),
    })


def _check_name(name: str, version: str) -> None:
    tfds = import_tfds(with_tf=False)
    if not _NAME_RE.match(name):
        raise ValueError(f"--name {name!r}: a TFDS dataset name is snake_case (lower-case letters, digits, _)")
    if name in tfds.list_builders(with_community_datasets=False):
        # tfds.data_source(name) would find TFDS's own dataset of that name, not this export.
        raise ValueError(f"--name {name!r} is the name of a TFDS dataset; choose another (e.g. {name}_vimpac_tokens)")
    try:
        tfds.core.Version(version)
    except ValueError:
        raise ValueError(f"--version {version!r}: expected MAJOR.MINOR.PATCH, e.g. 1.0.0") from None


def export_stores(stores: Mapping[str, str | os.PathLike], name: str, data_dir: str | os.PathLike, *,
                  version: str = DEFAULT_VERSION, overwrite: bool = False) -> Path:
    """Write the stores ({split: store dir}) as TFDS dataset `name` under `data_dir`; returns
    DATA_DIR/NAME/VERSION. Raises FileNotFoundError / ValueError for an incomplete or missing
    store, stores that do not match (tokenizer, fps, class names, token shape), a bad name or
    version; FileExistsError if that version exists (unless overwrite); ImportError without TFDS.
    """
    stores = {split: Path(store) for split, store in stores.items()}
    if not stores:
        raise ValueError("no token store given")
    _check_name(name, version)
    metas = _read_stores(stores)
    tokenizer = _common(metas, "tokenizer")
    _common(metas, "fps")
    class_names = _common(metas, "class_names")
    shapes = {split: _first_token_hw(store) for split, store in stores.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the stores' token grids differ: {shapes}")
    token_hw = next(iter(shapes.values()))
    final = Path(data_dir).absolute() / name / version
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass --overwrite to replace it, or another --version")

    tfds = import_tfds(with_tf=False)
    features = features_for(token_hw, class_names)
    metadata = {"vimpac": {
        "format": "vimpac-token-dataset", "tokenizer": tokenizer, "token_shape": list(token_hw),
        "class_names": class_names, "fps": metas[next(iter(metas))].get("fps"),
        "stores": {split: {"path": str(stores[split].absolute()), "counts": m.get("counts"),
                           "variants": m.get("variants"), "source": m.get("source")} for split, m in metas.items()},
    }}

    class StoreBuilder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
        """AdhocBuilder plus the stores' metadata (AdhocBuilder takes no metadata)."""

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=features, disable_shuffling=True,
                description=f"VIMPAC token store(s) exported by `vimpac export-tfds`: {sorted(stores)}",
                metadata=tfds.core.MetadataDict(metadata))

    with io_utils.atomic_directory(final, overwrite=overwrite) as tmp:
        build_root = tmp / "_tfds_build"  # TFDS's data_dir; it writes build_root/NAME/VERSION/*
        builder = StoreBuilder(
            name=name, version=version, features=features, data_dir=build_root,
            split_datasets={split: store_examples(store, token_hw) for split, store in stores.items()})
        builder.download_and_prepare(file_format="array_record")
        for path in (build_root / name / version).iterdir():
            os.replace(path, tmp / path.name)
        shutil.rmtree(build_root)
    counts = ", ".join(f"{split} {builder.info.splits[split].num_examples}" for split in stores)
    log.info(f"export-tfds: wrote {name} {version} to {final} (examples: {counts})")
    return final
