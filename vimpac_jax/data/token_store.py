"""The token store: tokenized videos in ArrayRecord shards, one record per (video, variant).

Layout of a store directory:
  metadata.json   written last, by `vimpac tokenize`; `"complete": true` only when every video
                  of the input was tokenized or listed in errors.txt. Holds the tokenizer's
                  identity (kind, config, weights hash), fps, sizes, variants, counts, and
                  `shards`: the shard file names relative to the store, in read order.
  shards/*.array_record
  errors.txt      one line per video that could not be decoded: `path<TAB>reason`

The record layout, metadata.json's "layout": "chunked"  per (video, variant) a header record
(`uint32 header length | JSON header`: video_id, label, fps, variant, shape [frames, h, w], dtype
int16, "chunk_frames" C and "chunks" = ceil(frames / C)) followed by that many chunk records of
raw int16 [<= C, h, w] bytes: frames [k·C, (k+1)·C) of the video, the last one shorter. A
(video, variant)'s records are consecutive in one shard, so frame f lives in record
first_chunk + f // C, and a clip spanning at most C + 1 frames costs at most two small reads
whatever the video's length. C is metadata's "chunk_frames".

Older stores have the "whole" layout (no "layout" field): one record per (video, variant), the
header followed by the token bytes, so a clip read (and decompressed) the whole video. The
readers refuse them (`read_metadata`), naming `vimpac convert-store` (`convert_store`), which
rewrites one as a "chunked" store and is the only reader of that layout.

A shard damaged on disk (cut short, a flipped bit: ArrayRecord's Riegeli blocks carry hashes)
is a `StoreDamagedError` naming the shard (and, where the reader knows them, the videos);
`vimpac tokenize --verify` finds such shards and redoes their videos.

Nothing in a record is pickled, so a store from elsewhere is safe to read.
"""

import json
import shutil
import struct
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

METADATA_FILE = "metadata.json"
# metadata.json's "format" and "format_version" (written by `vimpac tokenize`): the reader
# (`read_metadata`) reads this version only.
STORE_FORMAT = "vimpac-token-store"
STORE_VERSION = 1
ERRORS_FILE = "errors.txt"
SHARDS_DIR = "shards"
_HEADER_LEN = struct.Struct("<I")
WHOLE_LAYOUT = "whole"
CHUNKED_LAYOUT = "chunked"
# Frames per chunk record that `vimpac tokenize` writes: a pre-training clip (T=5 at step 1)
# spans 5 frames, so most clips read one chunk; see benchmarks/RESULTS.md for the measurement.
DEFAULT_CHUNK_FRAMES = 16
# Reader options as grain's ArrayRecordDataSource: no read-ahead (reads are random).
_READER_OPTIONS = "readahead_buffer_size:0"


class StoreDamagedError(ValueError):
    """A shard of a token store cannot be read. `shard`: its path; `keys`: the global record
    indices of the failed read (empty when the shard could not even be opened); `reason`: the
    reader's error."""

    def __init__(self, message: str, shard: str, keys: Sequence[int] = (), reason: str = ""):
        super().__init__(message)
        self.shard, self.keys, self.reason = shard, tuple(int(k) for k in keys), reason

    def __reduce__(self):  # raised in a grain worker process, re-raised in the trainer's
        return type(self), (self.args[0], self.shard, self.keys, self.reason)


def damaged_shard_error(shard: str, error, keys: Sequence[int] = (), videos: Sequence[str] = ()
                        ) -> StoreDamagedError:
    """The one message for a shard that cannot be read (`error`: the reader's exception or its
    text): which shard, which videos, the cause, and what to do."""
    store = Path(shard).parent.parent
    text = " ".join(str(error).split())[:300] or type(error).__name__
    which = f" (video {', '.join(repr(v) for v in videos[:5])}{', ...' if len(videos) > 5 else ''})" if videos else ""
    return StoreDamagedError(
        f"token store {store}: shard {shard} is damaged{which}: {text}; run the `vimpac tokenize` that made it again "
        f"with --verify to redo its videos", shard, keys, text)


def encode_record(tokens: np.ndarray, *, video_id: str, label: Optional[int], fps: float, variant: str) -> bytes:
    """tokens int [frames, h, w] (stored as int16) -> record bytes."""
    tokens = np.ascontiguousarray(tokens, dtype="<i2")
    header = json.dumps({"video_id": video_id, "label": None if label is None else int(label), "fps": float(fps),
                         "variant": variant, "shape": list(tokens.shape), "dtype": "<i2"}).encode()
    return _HEADER_LEN.pack(len(header)) + header + tokens.tobytes()


def encode_video_records(tokens: np.ndarray, *, video_id: str, label: Optional[int], fps: float, variant: str,
                         chunk_frames: int) -> list[bytes]:
    """tokens int [frames, h, w] -> the "chunked" layout's records of one (video, variant):
    [header, chunk 0, ..., chunk ceil(frames / chunk_frames) - 1]."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    tokens = np.ascontiguousarray(tokens, dtype="<i2")
    chunks = -(-len(tokens) // chunk_frames)
    header = json.dumps({"video_id": video_id, "label": None if label is None else int(label), "fps": float(fps),
                         "variant": variant, "shape": list(tokens.shape), "dtype": "<i2",
                         "chunk_frames": int(chunk_frames), "chunks": chunks}).encode()
    return [_HEADER_LEN.pack(len(header)) + header] + [
        tokens[k * chunk_frames:(k + 1) * chunk_frames].tobytes() for k in range(chunks)]


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
    """The store's metadata; a clear error for a store that is missing, not complete, or not of
    this version's format and layout (naming what to run)."""
    meta = _complete_metadata(store_dir)
    store_chunk_frames(meta, store_dir)
    return meta


def _complete_metadata(store_dir) -> dict[str, Any]:
    """`read_metadata` of a store of any layout (`convert_store` reads the old one)."""
    path = Path(store_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{store_dir} is not a token store (no {METADATA_FILE}); was `vimpac tokenize` "
                                f"run to completion?")
    meta = json.loads(path.read_text())
    if not meta.get("complete", False):
        raise ValueError(f"token store {store_dir} is not complete; run `vimpac tokenize` again to finish it")
    check_store_format(meta, store_dir)
    return meta


def check_store_format(meta: dict[str, Any], store_dir) -> None:
    """ValueError unless a store's metadata records this version's store format (`STORE_VERSION`)."""
    version = meta.get("format_version")
    if version == STORE_VERSION:
        return
    if isinstance(version, int) and version > STORE_VERSION:
        raise ValueError(f"token store {store_dir} is of store format {version}, newer than this vimpac-jax reads "
                         f"({STORE_VERSION}): use the vimpac-jax that wrote it")
    written = f"store format {version!r}" if version is not None else "no store format (format_version)"
    raise ValueError(f"token store {store_dir}: {METADATA_FILE} records {written}; this vimpac-jax reads store "
                     f"format {STORE_VERSION} only: tokenize the videos again with `vimpac tokenize --out DIR ...`")


def shard_paths(store_dir, meta: Optional[dict[str, Any]] = None) -> list[str]:
    """The shard files of the store (`meta`: its metadata, read when not given)."""
    meta = meta or read_metadata(store_dir)
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


def is_whole_layout(meta: dict[str, Any]) -> bool:
    """A store of the old "whole" record layout (`vimpac convert-store` rewrites it)."""
    return meta.get("layout", WHOLE_LAYOUT) == WHOLE_LAYOUT


def store_chunk_frames(meta: dict[str, Any], store_dir) -> int:
    """The frames per chunk record of a store's metadata; ValueError for a store of the old
    "whole" layout (naming the command that converts it) or a layout this version does not know."""
    if is_whole_layout(meta):
        raise ValueError(f"token store {store_dir} has the old 'whole' record layout (one record per video); this "
                         f"vimpac-jax reads the {CHUNKED_LAYOUT!r} layout only: convert it once with "
                         f"`{convert_command(store_dir)}`")
    layout = meta["layout"]
    if layout == CHUNKED_LAYOUT and isinstance(meta.get("chunk_frames"), int) and meta["chunk_frames"] >= 1:
        return int(meta["chunk_frames"])
    raise ValueError(f"token store {store_dir}: {METADATA_FILE} has an unknown layout {layout!r} / chunk_frames "
                     f"{meta.get('chunk_frames')!r} (expected {CHUNKED_LAYOUT!r} with an integer chunk_frames >= 1)")


def convert_command(store_dir) -> str:
    """The one command that rewrites a "whole" store in the chunked layout."""
    return f"vimpac convert-store --store {store_dir} --out {Path(store_dir)}-chunked"


class RecordReader:
    """Random access to a store's records by global index (shards in metadata order), reading
    many records per call with one `ArrayRecordReader.read(positions)` per shard (cheaper than
    grain's ArrayRecordDataSource.__getitems__, which starts a thread pool on every call).
    Picklable: readers are opened lazily in each process."""

    def __init__(self, paths: Sequence[str]):
        from array_record.python.array_record_module import ArrayRecordReader

        self.paths = list(paths)
        counts = []
        for p in self.paths:
            try:
                reader = ArrayRecordReader(p, _READER_OPTIONS)
                counts.append(reader.num_records())
                reader.close()
            except Exception as e:  # noqa: BLE001 - array_record raises RuntimeError / ValueError for a damaged file
                raise damaged_shard_error(p, e) from None
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._readers: list = [None] * len(self.paths)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        return {"paths": self.paths, "starts": self.starts}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._readers = [None] * len(self.paths)
        self._lock = threading.Lock()

    def _reader(self, shard: int):
        reader = self._readers[shard]
        if reader is None:
            from array_record.python.array_record_module import ArrayRecordReader

            with self._lock:
                if self._readers[shard] is None:
                    self._readers[shard] = ArrayRecordReader(self.paths[shard], _READER_OPTIONS,
                                                             file_reader_buffer_size=32768)
                reader = self._readers[shard]
        return reader

    def read(self, keys) -> list[bytes]:
        """Records of the global indices ``keys`` (int [N]), in that order."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        if len(keys) and (keys.min() < 0 or keys.max() >= len(self)):
            raise IndexError(f"record index out of range [0, {len(self)}): {keys.min()}..{keys.max()}")
        shards = np.searchsorted(self.starts, keys, side="right") - 1
        out: list[bytes] = [b""] * len(keys)
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            try:
                records = self._reader(int(shard)).read((keys[rows] - self.starts[shard]).tolist())
            except Exception as e:  # noqa: BLE001 - as in __init__: Riegeli's hash mismatches, a short file
                raise damaged_shard_error(self.paths[shard], e, keys[rows]) from None
            for row, record in zip(rows.tolist(), records):
                out[row] = record
        return out


def scan_headers(store_dir, reader: Optional[RecordReader] = None, progress=None) -> list[tuple[int, dict[str, Any]]]:
    """(global index of the first token record, header) of every (video, variant), in store order:
    a walk over the header records only (each says how many chunks follow), so indexing reads
    1 / (chunks + 1) of the records.
    """
    reader = reader or RecordReader(shard_paths(store_dir))
    out: list[tuple[int, dict[str, Any]]] = []
    n = len(reader)
    pos = 0
    while pos < n:
        header = decode_header(reader.read([pos])[0])
        if "chunks" not in header:
            raise ValueError(f"token store {store_dir}: record {pos} is not a chunked-layout header "
                             f"(video {header.get('video_id')!r})")
        out.append((pos + 1, header))
        pos += 1 + int(header["chunks"])
        if progress is not None:
            progress(pos, n)
    if pos != n:
        raise ValueError(f"token store {store_dir}: the last video's chunks run past the end of the shards")
    return out


def iter_videos(store_dir) -> Iterator[dict[str, Any]]:
    """Every stored (video, variant) in store order, as `decode_record` gives it (whole tokens
    int16 [frames, h, w])."""
    reader = RecordReader(shard_paths(store_dir))
    for first, header in scan_headers(store_dir, reader):
        chunks = reader.read(np.arange(first, first + int(header["chunks"])))
        shape = tuple(header.pop("shape"))
        tokens = np.frombuffer(b"".join(chunks), dtype=header.pop("dtype"))
        if tokens.size != int(np.prod(shape)):
            raise ValueError(f"corrupt chunks for {header.get('video_id')!r}: {tokens.size} values for shape {shape}")
        header.pop("chunks"), header.pop("chunk_frames")
        yield {**header, "tokens": tokens.reshape(shape)}


def convert_store(store_dir, out_dir, *, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                  options: Optional[str] = None) -> dict[str, Any]:
    """Rewrite a complete "whole" store as a "chunked" one at ``out_dir`` (published only when
    complete): the same shards (names, videos, order), errors.txt and metadata (plus layout,
    chunk_frames, shard_options). Returns the new metadata. options: ArrayRecord writer options
    (default: the source's "shard_options", else tokenize's default)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from vimpac_jax.io_utils import atomic_directory

    src = Path(store_dir)
    meta = _complete_metadata(src)
    if not is_whole_layout(meta):
        raise ValueError(f"token store {src} is already in the {meta['layout']!r} layout")
    if chunk_frames < 1:
        raise ValueError(f"--chunk-frames must be >= 1, got {chunk_frames}")
    options = options or meta.get("shard_options") or "group_size:1"
    paths = shard_paths(src, meta)
    videos = records = 0
    with atomic_directory(out_dir) as tmp:
        (tmp / SHARDS_DIR).mkdir()
        for name, path in zip(meta["shards"], paths):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            reader = RecordReader([path])
            writer = ArrayRecordWriter(str(tmp / name), options)
            try:
                for lo in range(0, len(reader), 64):
                    for record in reader.read(np.arange(lo, min(lo + 64, len(reader)))):
                        rec = decode_record(record)
                        for r in encode_video_records(rec["tokens"], video_id=rec["video_id"], label=rec["label"],
                                                      fps=rec["fps"], variant=rec["variant"],
                                                      chunk_frames=chunk_frames):
                            writer.write(r)
                        videos += 1
            finally:
                writer.close()
            records += len(reader)
        for extra in (ERRORS_FILE,):
            if (src / extra).is_file():
                shutil.copyfile(src / extra, tmp / extra)
        new_meta = {**meta, "layout": CHUNKED_LAYOUT, "chunk_frames": int(chunk_frames), "shard_options": options,
                    "converted_from": str(src.absolute())}
        if videos != records:
            raise RuntimeError(f"converted {videos} of {records} records of {src}")
        (tmp / METADATA_FILE).write_text(json.dumps(new_meta, indent=1, sort_keys=True) + "\n")
    return new_meta
