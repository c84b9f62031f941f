"""The token store: tokenized videos in ArrayRecord shards, one record per (video, variant).

Layout of a store directory:
  metadata.json   written last, by `vimpac tokenize`; `"complete": true` only when every video
                  of the input was tokenized or listed in errors.txt. Holds the tokenizer's
                  identity (kind, config, weights hash), fps, sizes, variants, counts, and
                  `shards`: the shard file names relative to the store, in read order.
  shards/*.array_record
  errors.txt      one line per video that could not be decoded: `path<TAB>reason`

A record is `uint32 header length | JSON header | token bytes`: the header holds video_id,
label, fps, variant, shape and dtype; the tokens are int16 [frames, h, w], row-major. Nothing in
a record is pickled, so a store from elsewhere is safe to read.
"""

import json
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np

METADATA_FILE = "metadata.json"
ERRORS_FILE = "errors.txt"
SHARDS_DIR = "shards"
_HEADER_LEN = struct.Struct("<I")


def encode_record(tokens: np.ndarray, *, video_id: str, label: Optional[int], fps: float, variant: str) -> bytes:
    """tokens int [frames, h, w] (stored as int16) -> record bytes."""
    tokens = np.ascontiguousarray(tokens, dtype="<i2")
    header = json.dumps({"video_id": video_id, "label": None if label is None else int(label), "fps": float(fps),
                         "variant": variant, "shape": list(tokens.shape), "dtype": "<i2"}).encode()
    return _HEADER_LEN.pack(len(header)) + header + tokens.tobytes()


def decode_header(record: bytes) -> dict[str, Any]:
    (n,) = _HEADER_LEN.unpack_from(record, 0)
    return json.loads(record[_HEADER_LEN.size:_HEADER_LEN.size + n])


def decode_record(record: bytes) -> dict[str, Any]:
    """record bytes -> {'tokens': int16 [frames, h, w], 'video_id', 'label', 'fps', 'variant'}."""
    (n,) = _HEADER_LEN.unpack_from(record, 0)
    header = json.loads(record[_HEADER_LEN.size:_HEADER_LEN.size + n])
    shape = tuple(header.pop("shape"))
    tokens = np.frombuffer(record, dtype=header.pop("dtype"), offset=_HEADER_LEN.size + n)
    if tokens.size != int(np.prod(shape)):
        raise ValueError(f"corrupt token record for {header.get('video_id')!r}: {tokens.size} values for shape {shape}")
    header["tokens"] = tokens.reshape(shape)
    return header


def read_metadata(store_dir) -> dict[str, Any]:
    """The store's metadata; a clear error for a store that is missing or not complete."""
    path = Path(store_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{store_dir} is not a token store (no {METADATA_FILE}); was `vimpac tokenize` "
                                f"run to completion?")
    meta = json.loads(path.read_text())
    if not meta.get("complete", False):
        raise ValueError(f"token store {store_dir} is not complete; run `vimpac tokenize` again to finish it")
    return meta


def shard_paths(store_dir) -> list[str]:
    meta = read_metadata(store_dir)
    paths = [str(Path(store_dir) / s) for s in meta["shards"]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"token store {store_dir}: shard files listed in {METADATA_FILE} are missing: {missing[:3]}")
    return paths


def open_records(store_dir):
    """A random-access source of record bytes over every shard (grain's ArrayRecordDataSource)."""
    import grain.python as grain

    paths = shard_paths(store_dir)
    if not paths:
        raise ValueError(f"token store {store_dir} has no shards (no video was tokenized)")
    return grain.ArrayRecordDataSource(paths)
