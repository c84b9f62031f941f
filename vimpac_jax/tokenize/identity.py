"""A token store's identity (what it is made of) and the check of an existing --out against it."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from vimpac_jax import io_utils
from vimpac_jax.data import annotations, token_store
from vimpac_jax.data import video_decode as vd
from vimpac_jax.tokenize.journal import PROGRESS_DIR, StoreError
from vimpac_jax.tokenize.lists import items_sha256
from vimpac_jax.tokenize.options import TokenizeOptions

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # progress/config.json: the identity of an unfinished store


def store_identity(tokenizer_identity: dict, opts: TokenizeOptions, variants: Sequence[vd.Variant],
                   items: Sequence[annotations.VideoItem], class_names: Sequence[str] | None = None) -> dict:
    """What a store is made of; a store is extended or reused only by a run with the same identity.
    class_names: what its labels mean (None: not known; see `LATER_KEYS`)."""
    return {
        "tokenizer": tokenizer_identity,
        "fps": float(opts.fps),
        "size": int(opts.size),
        "resize": int(opts.resize if opts.resize is not None else opts.size),
        "variant_set": opts.variants,
        "variants": [v.name for v in variants],
        "sampling": opts.sampling,
        "max_seconds": opts.max_seconds,
        "max_frames": opts.max_frames,
        "videos": {"count": len(items), "sha256": items_sha256(items)},
        "chunk_frames": int(opts.chunk_frames),
        "class_names": None if class_names is None else list(class_names),
    }


IDENTITY_KEYS = ("tokenizer", "fps", "size", "resize", "variant_set", "variants", "sampling", "max_seconds",
                 "max_frames", "videos", "source_fps",  # source_fps: --tfds only (absent = None for files)
                 "chunk_frames",  # absent in stores of the "whole" layout (vimpac convert-store)
                 "class_names")
# Compared only when both sides know them: a store tokenized without class names is the same
# store with them (`check_out_dir` records them in its metadata).
LATER_KEYS = ("class_names",)


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in IDENTITY_KEYS
            if not (k in LATER_KEYS and (a.get(k) is None or b.get(k) is None))
            and json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def check_out_dir(out: Path, identity: dict) -> dict | None:
    """The complete store's metadata when --out already holds this very store, else None.

    Raises StoreError when --out holds a store (complete or not) of another identity, or is a
    file or a non-empty directory that is no store at all.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise StoreError(f"--out {out} exists and is not a directory")
    meta_path = out / token_store.METADATA_FILE
    config_path = out / PROGRESS_DIR / CONFIG_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        diff = _differences(meta, identity)
        if diff == ["chunk_frames"] and meta.get("complete") and token_store.is_whole_layout(meta):
            raise StoreError(f"--out {out} holds a complete token store of the old 'whole' record layout; "
                             f"convert it with `{token_store.convert_command(out)}`, or use another --out")
        if diff:
            raise StoreError(f"--out {out} holds a token store made with another configuration (differs in: "
                             f"{', '.join(diff)}); use another --out or delete it")
        if meta.get("complete"):
            if meta.get("class_names") is None and identity.get("class_names") is not None:
                meta = {**meta, "class_names": identity["class_names"]}
                io_utils.write_json_atomic(meta_path, meta, indent=1)
                log.warning(f"tokenize: recorded the {len(meta['class_names'])} class names in {meta_path} (a store "
                            f"tokenized without them); a training run started on this store before cannot resume "
                            f"(its checkpoints record the old metadata.json's hash)")
            return meta
    if config_path.is_file():
        diff = _differences(json.loads(config_path.read_text()), identity)
        if diff:
            raise StoreError(f"--out {out} holds an unfinished token store of another configuration (differs in: "
                             f"{', '.join(diff)}); finish it with its own options, use another --out, or delete it")
    elif any(p.name not in (token_store.SHARDS_DIR, PROGRESS_DIR) for p in out.iterdir()):
        # (empty shards/ and progress/ folders are what a run killed at its very start leaves)
        raise StoreError(f"--out {out} is a non-empty directory that is not a token store")
    return None
