"""grain input pipelines over the token store (the released `vimpac/data.py`, `video_token_dataset_fps.py`): pre-training, fine-tuning, test.

Every pipeline is a `grain.MapDataset` of per-process batches, one element per batch:

    range(num_batches) -> map(make_batch)   # batch b of process p -> positions -> videos, draws,
                                            # the records holding the clips' frames -> clips

so the per-example work is vectorized over the batch and its records are read together (one
`ArrayRecordReader.read` per shard, see `token_store.RecordReader`).

Determinism. The training order is a permutation of the videos per epoch drawn from
`default_rng((seed, epoch))` (`EpochOrder`; not grain's `shuffle`, whose index shuffle costs
milliseconds per element on datasets under ~1000 videos, ~40 µs above); the same generator then
draws the epoch's uniforms, one row per video, from which an example's variant and clip starts
are computed. So what a video yields in an epoch depends on (seed, epoch, video) only, not on
the order, the batch, the worker count or the number of processes, and no generator is built per
example. Sharding cuts the shuffled global stream into per-process batches of B and gives
process p every P-th of them, starting at p: process p's batch b is rows [p·B, (p+1)·B) of
global batch b, the contiguous block that `jax.make_array_from_process_local_data` places for
process p. The global array is therefore exactly the batch b a single process with batch size
B·P would read, row for row (the masks and keys of a step go by row, so the order matters, not
only the set). Each process's iterator state is the index of its next batch (`make_iterator`;
the same at any worker count), saved with `grain.checkpoint.CheckpointSave` in the same orbax
checkpoint as the model.

Every process opens every shard and reads records by global index (ArrayRecord is random
access), so the number of shard files places no constraint on the number of hosts; what must
hold is at least one video per process (and, for training, one global batch of videos).

Frame rate (as the released code): clips are cut from the stored frames with a step
`max(int(store_fps / clip_fps), 1)`; a clip covers T·step stored frames and keeps every step-th.
Start indices follow the released `get_start_end_idx`, which treats a video of n frames as
n + step - 1 long so that the last stored frame can be reached: delta = max(n + step - 1 - T·step, 0),
a random start is uniform on [0, delta], test clip k of K starts at int(delta·k / max(K - 1, 1))
(K == 1 gives the first clip, not the middle one). A clip shorter than T frames is padded at the
end with PAD. The store's chunks of C frames (`token_store`) decide which records are read,
never a clip.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from vimpac_jax import io_utils
from vimpac_jax.constants import PAD_ID
from vimpac_jax.data import token_store
from vimpac_jax.data.video_decode import Variant
from vimpac_jax.progress import Progress

log = logging.getLogger(__name__)

INDEX_CACHE_FILE = "record_index.npz"
_INDEX_CACHE_VERSION = 2


# ----------------------------------------------------------------------------------------------
# The index: which record holds which (video, variant), read once from the record headers.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class StoreIndex:
    """Records of a token store grouped by video. V videos (sorted by id), C variants.

    records:    int64 [V, C]  global index (shards in metadata order) of the first record holding
                              tokens of (video, variant): its chunk 0 (see `token_store`)
    num_frames: int64 [V, C]  stored frames of that (video, variant)
    labels:     int64 [V]     class label, -1 for an unlabelled video
    fps:        float64 [V]   stored frame rate
    chunk_frames: frames per token record (the store's "chunk_frames")
    """

    store_dir: str
    video_ids: tuple[str, ...]
    variants: tuple[str, ...]
    records: np.ndarray
    num_frames: np.ndarray
    labels: np.ndarray
    fps: np.ndarray
    grid: tuple[int, int]
    chunk_frames: int

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    def select_variants(self, names: Optional[Sequence[str]]) -> "StoreIndex":
        """The same videos restricted to the variants ``names`` (in that order); None keeps all."""
        if names is None:
            return self
        names = tuple(names)
        unknown = [n for n in names if n not in self.variants]
        if unknown or not names:
            raise ValueError(f"token store {self.store_dir}: unknown variants {unknown or names}; "
                             f"the store holds {list(self.variants)}")
        cols = [self.variants.index(n) for n in names]
        return dataclasses.replace(self, variants=names, records=self.records[:, cols],
                                   num_frames=self.num_frames[:, cols])


def default_test_variants(variants: Sequence[str]) -> tuple[str, ...]:
    """The test crops (the released `vimpac/data.py`) among stored variant names: no flip, the smallest resize
    (the three crops of a fine-tuning store; the center crop of a pre-training store). Names that
    do not follow `video_decode.Variant.name` are all kept."""
    parsed = [(Variant.parse_name(v), v) for v in variants]
    if not variants or any(p is None for p, _ in parsed):
        return tuple(variants)
    noflip = [(resize, v) for (resize, _, flip), v in parsed if not flip]
    if not noflip:
        return tuple(variants)
    smallest = min(size for size, _ in noflip)
    return tuple(v for size, v in noflip if size == smallest)


def _cache_key(store_dir: Path, shard_paths: list[str]) -> str:
    digest = hashlib.sha256((store_dir / token_store.METADATA_FILE).read_bytes())
    for p in shard_paths:
        digest.update(f"{os.path.basename(p)}:{os.path.getsize(p)}\n".encode())
    return f"v{_INDEX_CACHE_VERSION}:{digest.hexdigest()}"


def _variant_order(meta: dict[str, Any], seen: list[str]) -> tuple[str, ...]:
    """The metadata's variant order when it lists them (names or {'name': ...}); else first seen."""
    listed = []
    for v in meta.get("variants") or []:
        name = v.get("name") if isinstance(v, dict) else v
        if isinstance(name, str):
            listed.append(name)
    if set(listed) >= set(seen):
        return tuple(v for v in listed if v in set(seen))
    return tuple(seen)


def _index_from_headers(store_dir: str, meta: dict, scanned: list[tuple[int, dict[str, Any]]]) -> StoreIndex:
    """scanned: `token_store.scan_headers` (first token record, header) per stored (video, variant)."""
    if not scanned:
        raise ValueError(f"token store {store_dir} holds no records (empty split)")
    firsts = np.array([first for first, _ in scanned], np.int64)
    headers = [h for _, h in scanned]
    grids = {tuple(h["shape"][1:]) for h in headers}
    if len(grids) != 1:
        raise ValueError(f"token store {store_dir}: records have different token grids {sorted(grids)}")
    seen_variants: list[str] = []
    by_video: dict[str, dict[str, int]] = {}
    for i, h in enumerate(headers):
        if h["variant"] not in seen_variants:
            seen_variants.append(h["variant"])
        slot = by_video.setdefault(h["video_id"], {})
        if h["variant"] in slot:
            raise ValueError(f"token store {store_dir}: video {h['video_id']!r} variant {h['variant']!r} "
                             f"is stored twice (records {slot[h['variant']]} and {i})")
        slot[h["variant"]] = i
    variants = _variant_order(meta, seen_variants)
    incomplete = sorted(v for v, slot in by_video.items() if len(slot) != len(variants))
    if incomplete:
        # A store marked complete should not have these; keep going without them, loudly.
        log.warning("token store %s: %d videos lack some variants and are skipped, e.g. %s",
                    store_dir, len(incomplete), incomplete[:5])
    video_ids = tuple(sorted(set(by_video) - set(incomplete)))
    rows = np.array([[by_video[v][c] for c in variants] for v in video_ids], np.int64).reshape(-1, len(variants))
    num_frames = np.array([h["shape"][0] for h in headers], np.int64)[rows]
    first = rows[:, 0] if len(video_ids) else np.zeros(0, np.int64)
    labels = np.array([-1 if headers[r]["label"] is None else int(headers[r]["label"]) for r in first], np.int64)
    for v, row, label in zip(video_ids, rows, labels):
        if any((headers[r]["label"] if headers[r]["label"] is not None else -1) != label for r in row):
            raise ValueError(f"token store {store_dir}: video {v!r} has different labels across variants")
    fps = np.array([float(headers[r]["fps"]) for r in first], np.float64)
    return StoreIndex(store_dir=str(store_dir), video_ids=video_ids, variants=variants, records=firsts[rows],
                      num_frames=num_frames, labels=labels, fps=fps, grid=tuple(next(iter(grids))),
                      chunk_frames=token_store.store_chunk_frames(meta, store_dir))


def _save_cache(path: Path, key: str, index: StoreIndex) -> None:
    """Atomic write: concurrent hosts may race; the last complete file wins."""
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), video_ids=np.array(index.video_ids, dtype=str),
             variants=np.array(index.variants, dtype=str), records=index.records,
             num_frames=index.num_frames, labels=index.labels, fps=index.fps,
             grid=np.array(index.grid, np.int64), chunk_frames=np.array(index.chunk_frames))
    try:
        io_utils.write_bytes_atomic(path, buf.getvalue())
    except OSError as e:  # a read-only store: index again next time
        log.warning("could not cache the record index at %s: %s", path, e)


def _load_cache(path: Path, key: str, store_dir: str) -> Optional[StoreIndex]:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return StoreIndex(store_dir=store_dir, video_ids=tuple(str(v) for v in z["video_ids"]),
                              variants=tuple(str(v) for v in z["variants"]), records=z["records"],
                              num_frames=z["num_frames"], labels=z["labels"], fps=z["fps"],
                              grid=tuple(int(g) for g in z["grid"]), chunk_frames=int(z["chunk_frames"]))
    except (OSError, KeyError, ValueError) as e:
        log.warning("ignoring unreadable record index cache %s: %s", path, e)
        return None


def load_index(store_dir, *, cache: bool = True) -> StoreIndex:
    """Index a complete token store: one pass over the record headers, cached in the store.

    The cache (`record_index.npz`, next to metadata.json) is keyed by metadata.json's bytes and
    the shard sizes, so a re-written store is indexed again. A store of the old "whole" layout is
    refused (`token_store.read_metadata`), naming the command that converts it.
    """
    store = Path(store_dir)
    meta = token_store.read_metadata(store)
    paths = token_store.shard_paths(store)
    key = _cache_key(store, paths)
    cache_path = store / INDEX_CACHE_FILE
    if cache:
        index = _load_cache(cache_path, key, str(store))
        if index is not None:
            return index
    line = []  # the progress line, made at the first report (which gives the total)

    def progress(done: int, total: int) -> None:
        if not line:
            line.append(Progress(total, label=f"indexing {store}: ", unit="records", every_seconds=10))
        line[0].update(done)

    index = _index_from_headers(str(store), meta, token_store.scan_headers(store, progress=progress))
    if cache:
        _save_cache(cache_path, key, index)
    return index


# ----------------------------------------------------------------------------------------------
# Temporal sampling: pure functions (released code: video_token_dataset_fps.get_start_end_idx).
# ----------------------------------------------------------------------------------------------


def frame_step(store_fps: float, clip_fps: Optional[float]) -> int:
    """Stored frames per clip frame: max(int(store_fps / clip_fps), 1); None means every frame."""
    if clip_fps is None:
        return 1
    if clip_fps <= 0:
        raise ValueError(f"clip_fps must be > 0, got {clip_fps}")
    if clip_fps > store_fps * (1 + 1e-6):
        raise ValueError(f"clip_fps {clip_fps} exceeds the store's {store_fps} fps: frames cannot be made up")
    return max(int(store_fps / clip_fps), 1)


def max_start(num_frames, clip_len: int, step):
    """delta: the largest start index of a clip (0 when the video is shorter than a clip);
    elementwise for arrays of num_frames / step."""
    return np.maximum(num_frames + step - 1 - clip_len * step, 0)


def random_start(rng: np.random.Generator, delta: int, bound: Optional[tuple[int, int]] = None) -> int:
    """Uniform on [l, r] = [0, delta], or that interval clipped to ``bound`` (l, r inclusive) the
    released code's way (a bound beyond the video collapses to its nearest end)."""
    if bound is None:
        lo, hi = 0, delta
    else:
        hi = max(min(bound[1], delta), 0)
        lo = min(max(0, bound[0]), hi)
    return int(_uniform_ints(rng.random(), lo, hi))


def pair_starts(rng: np.random.Generator, delta: int, relevance_range: Optional[int] = None) -> tuple[int, int]:
    """Two clip starts: independent and uniform on [0, delta]; with ``relevance_range`` R (stored
    frames) the second is uniform on [s1 - R, s1 + R] ∩ [0, delta] (released code)."""
    s1 = random_start(rng, delta)
    bound = None if relevance_range is None else (s1 - relevance_range, s1 + relevance_range)
    return s1, random_start(rng, delta, bound)


def eval_clip_starts(num_frames: int, clip_len: int, step: int, num_clips: int) -> np.ndarray:
    """int64 [K] starts of K uniformly spaced clips: int(delta·k / max(K - 1, 1)).

    Integer floor division equals the released code's int() of the float quotient for these
    non-negative sizes (an exact quotient is exact in floating point, an inexact one is far from
    an integer)."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    return _spaced_starts(max_start(num_frames, clip_len, step), np.arange(num_clips, dtype=np.int64), num_clips)


def _spaced_starts(delta, k, num_clips: int):
    """Start of test clip k of K over [0, delta] (elementwise): int(delta·k / max(K - 1, 1))."""
    return k * delta // max(num_clips - 1, 1)


def take_clip(tokens: np.ndarray, start: int, clip_len: int, step: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """tokens [n, h, w] -> int32 [clip_len, h, w]: frames start, start+step, ... of the span
    [start, start + clip_len·step), padded at the end with PAD when the video runs out."""
    frames = tokens[start:start + clip_len * step:step]
    if out is None:
        out = np.empty((clip_len,) + tokens.shape[1:], np.int32)
    out[:len(frames)] = frames
    out[len(frames):] = PAD_ID
    return out


def test_views(crops: Sequence[np.ndarray], clip_len: int, step: int, num_clips: int,
               out: Optional[np.ndarray] = None) -> np.ndarray:
    """The multi-view test input of one video (`video_token_dataset_fps.py`): tokens [n, h, w] of each of C crops
    -> int32 [C·K, clip_len, h, w], K uniformly spaced clips per crop, crop-major as the released
    code (view v = crop c·K + clip k). `vimpac predict` cuts the views of a video file with this too."""
    if out is None:
        out = np.empty((len(crops) * num_clips, clip_len) + tuple(crops[0].shape[1:]), np.int32)
    for c, tokens in enumerate(crops):
        for k, s in enumerate(eval_clip_starts(len(tokens), clip_len, step, num_clips)):
            take_clip(tokens, int(s), clip_len, step, out=out[c * num_clips + k])
    return out


# ----------------------------------------------------------------------------------------------
# Batch transforms (picklable, so that grain worker processes can run them): one call makes one
# per-process batch, with the draws of all its examples vectorized and its records read together.
# ----------------------------------------------------------------------------------------------


def _uniform_ints(u: np.ndarray, lo, hi) -> np.ndarray:
    """u float64 in [0, 1) -> int64 uniform on [lo, hi] (inclusive; elementwise bounds).
    floor(u·n) with 53-bit u: each value's probability is 1/n to within n·2^-53."""
    lo = np.asarray(lo, np.int64)
    return lo + np.minimum((u * (np.asarray(hi, np.int64) - lo + 1)).astype(np.int64), np.asarray(hi) - lo)


def pair_starts_batch(u1: np.ndarray, u2: np.ndarray, delta: np.ndarray,
                      relevance_range: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """`pair_starts` for N examples at once from uniforms u1, u2 float [N] and delta int [N]."""
    s1 = _uniform_ints(u1, 0, delta)
    if relevance_range is None:
        return s1, _uniform_ints(u2, 0, delta)
    hi = np.maximum(np.minimum(s1 + relevance_range, delta), 0)
    lo = np.minimum(np.maximum(0, s1 - relevance_range), hi)
    return s1, _uniform_ints(u2, lo, hi)


class EpochOrder:
    """Position g of the repeated stream -> (epoch, video) and the video's uniforms for that epoch.

    epoch = g // L, video = the (g mod L)-th entry of a permutation drawn from
    default_rng((seed, epoch)), where L (`epoch_length`, default V) is how many videos of each
    epoch are read (training streams: whole global batches only, the released drop_last); the
    same generator then draws uniforms [V, NUM_DRAWS] float64, row v for video v. So what a video
    draws in an epoch depends on (seed, epoch, video) only, not on the batch, the worker count or
    the number of processes, and no generator is built per example. Keeps the draws of the last
    two epochs ((1 + NUM_DRAWS)·V 8-byte values each)."""

    NUM_DRAWS = 3  # variant column, first start, second start

    def __init__(self, num_videos: int, seed: int, epoch_length: Optional[int] = None):
        self.num_videos, self.seed = int(num_videos), int(seed)
        self.epoch_length = self.num_videos if epoch_length is None else int(epoch_length)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        return {**self.__dict__, "_epochs": {}}  # workers rebuild theirs

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation int64 [V], uniforms float64 [V, NUM_DRAWS]) of one epoch."""
        drawn = self._epochs.get(epoch)
        if drawn is None:
            rng = np.random.default_rng((self.seed, epoch))
            drawn = (rng.permutation(self.num_videos), rng.random((self.num_videos, self.NUM_DRAWS)))
            # Replace the dict rather than mutate it: reader threads never see it change size.
            # Two threads may both draw an epoch; they draw the same values.
            kept = dict(list(self._epochs.items())[-1:])
            kept[epoch] = drawn
            self._epochs = kept
        return drawn

    def permutation(self, epoch: int) -> np.ndarray:
        return self.epoch(epoch)[0]

    def __call__(self, position: int) -> tuple[int, int]:
        epoch, i = divmod(int(position), self.epoch_length)
        return epoch, int(self.permutation(epoch)[i])

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """positions int [N] -> (videos int64 [N], uniforms float64 [N, NUM_DRAWS])."""
        epochs, rows = np.divmod(np.asarray(positions, np.int64), self.epoch_length)
        videos = np.empty(len(rows), np.int64)
        draws = np.empty((len(rows), self.NUM_DRAWS))
        for e in np.unique(epochs):  # at most two epochs in a batch (a batch is <= one epoch)
            sel = epochs == e
            perm, uniforms = self.epoch(int(e))
            videos[sel] = perm[rows[sel]]
            draws[sel] = uniforms[videos[sel]]
        return videos, draws


class ClipReader:
    """Cuts clips out of a store, reading only the records that hold their frames.

    Frame f of (video v, variant c) is in record records[v, c] + f // R with R the index's
    `chunk_frames`, at row f mod R.
    """

    def __init__(self, index: StoreIndex, *, clip_len: int, clip_fps: Optional[float]):
        if clip_len < 1:
            raise ValueError(f"clip_len must be >= 1, got {clip_len}")
        self.records = index.records
        self.num_frames = index.num_frames
        self.labels = index.labels
        self.video_ids = index.video_ids
        self.grid = index.grid
        self.num_videos = index.num_videos
        self.clip_len = clip_len
        self.frames_per_record = index.chunk_frames
        fps_values, which = np.unique(index.fps, return_inverse=True)
        self.steps = np.array([frame_step(f, clip_fps) for f in fps_values], np.int64)[which].reshape(-1)
        self.source = token_store.RecordReader(token_store.shard_paths(index.store_dir))

    def _decode(self, record: bytes) -> np.ndarray:
        return np.frombuffer(record, "<i2").reshape((-1,) + self.grid)

    def clips(self, videos: np.ndarray, columns: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """int [N] each -> int32 [N, clip_len, h, w]: frames start, start + step, ... of each
        (video, variant), PAD past the video's end (`take_clip` for N clips at once)."""
        steps = self.steps[videos]
        frames = starts[:, None] + steps[:, None] * np.arange(self.clip_len)  # [N, T]
        valid = frames < self.num_frames[videos, columns][:, None]
        record_of = frames // self.frames_per_record
        keys = self.records[videos, columns][:, None] + record_of
        unique, where = np.unique(keys[valid], return_inverse=True)
        try:
            chunks = [self._decode(r) for r in self.source.read(unique)]
        except token_store.StoreDamagedError as e:  # name the videos whose records it failed to read
            bad = np.isin(keys, e.keys) & valid
            names = sorted({self.video_ids[v] for v in videos[bad.any(axis=1)]})
            raise token_store.damaged_shard_error(e.shard, e.reason, e.keys, names) from None
        offsets = np.cumsum([0] + [len(c) for c in chunks[:-1]], dtype=np.int64)
        out = np.full((len(videos), self.clip_len) + self.grid, PAD_ID, np.int32)
        if chunks:
            rows = offsets[where] + (frames - record_of * self.frames_per_record)[valid]
            out[valid] = np.concatenate(chunks)[rows]
        return out


class _TrainBatch:
    """Per-process batch b of a training stream: global positions [(b·P + p)·B, +B)."""

    def __init__(self, reader: ClipReader, *, seed: int, batch_size: int, process_index: int, process_count: int):
        self.reader = reader
        self.batch_size, self.process_index, self.process_count = batch_size, process_index, process_count
        # Each epoch reads whole global batches only (the released drop_last, see `_train_stream`).
        global_batch = batch_size * process_count
        self.order = EpochOrder(reader.num_videos, seed, epoch_length=(reader.num_videos // global_batch) * global_batch)

    def examples(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(videos int64 [B], variant columns int64 [B], the remaining uniforms float64 [B, 2])."""
        first = (int(batch) * self.process_count + self.process_index) * self.batch_size
        videos, u = self.order.lookup(first + np.arange(self.batch_size))
        columns = _uniform_ints(u[:, 0], 0, self.reader.records.shape[1] - 1)
        return videos, columns, u[:, 1:]

    def deltas(self, videos: np.ndarray, columns: np.ndarray) -> np.ndarray:
        r = self.reader
        return max_start(r.num_frames[videos, columns], r.clip_len, r.steps[videos])


class _PretrainBatch(_TrainBatch):
    def __init__(self, reader, *, relevance_range: Optional[int], **kw):
        super().__init__(reader, **kw)
        self.relevance_range = relevance_range

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        videos, columns, u = self.examples(batch)
        s1, s2 = pair_starts_batch(u[:, 0], u[:, 1], self.deltas(videos, columns), self.relevance_range)
        clips = self.reader.clips(np.repeat(videos, 2), np.repeat(columns, 2), np.stack([s1, s2], 1).reshape(-1))
        return {"tokens": clips.reshape((len(videos), 2) + clips.shape[1:])}


class _FinetuneBatch(_TrainBatch):
    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        videos, columns, u = self.examples(batch)
        starts = _uniform_ints(u[:, 0], 0, self.deltas(videos, columns))
        return {"tokens": self.reader.clips(videos, columns, starts),
                "label": self.reader.labels[videos].astype(np.int32)}


class _EvalBatch:
    """Per-process batch b of the test stream: videos [(b·P + p)·B, +B) of the padded list."""

    def __init__(self, reader: ClipReader, *, num_clips: int, batch_size: int, process_index: int,
                 process_count: int, clip_seed: Optional[int] = None):
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        self.reader, self.num_clips, self.clip_seed = reader, num_clips, clip_seed
        self.batch_size, self.process_index, self.process_count = batch_size, process_index, process_count

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        r, K = self.reader, self.num_clips
        crops = r.records.shape[1]
        first = (int(batch) * self.process_count + self.process_index) * self.batch_size
        videos = first + np.arange(self.batch_size)
        valid = videos < r.num_videos
        # Padding examples: code 0 rather than PAD, so no attention line is all-PAD (NaN).
        out = np.zeros((self.batch_size, crops * K, r.clip_len) + r.grid, np.int32)
        real = videos[valid]
        if len(real):
            # Views crop-major, as the released code: v = c·K + k; starts as `eval_clip_starts`.
            v = np.repeat(real, crops * K)
            c = np.tile(np.repeat(np.arange(crops), K), len(real))
            k = np.tile(np.arange(K), crops * len(real))
            delta = max_start(r.num_frames[v, c], r.clip_len, r.steps[v])
            if self.clip_seed is None:
                starts = _spaced_starts(delta, k, K)
            else:  # K uniform random clips per crop, the same at every call (the kNN monitor)
                starts = _uniform_ints(np.random.default_rng((self.clip_seed, int(batch))).random(len(v)), 0, delta)
            out[valid] = r.clips(v, c, starts).reshape((len(real), crops * K, r.clip_len) + r.grid)
        return {"tokens": out, "label": np.where(valid, r.labels[np.minimum(videos, r.num_videos - 1)], -1).astype(np.int32),
                "video_index": np.where(valid, videos, -1).astype(np.int32), "valid": valid}


# ----------------------------------------------------------------------------------------------
# Pipelines.
# ----------------------------------------------------------------------------------------------


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    return int(process_index), int(process_count)


def _check_split(index: StoreIndex, process_count: int, batch_size: int, *, training: bool, labels: bool) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if index.num_videos == 0:
        raise ValueError(f"token store {index.store_dir} holds no complete video (empty split)")
    if index.num_videos < process_count:
        raise ValueError(f"token store {index.store_dir} holds {index.num_videos} videos, fewer than the "
                         f"{process_count} processes: every process needs its own share")
    if training and index.num_videos < batch_size * process_count:
        raise ValueError(f"token store {index.store_dir} holds {index.num_videos} videos, fewer than one global "
                         f"batch ({batch_size} per process x {process_count} processes): a batch would repeat videos")
    if labels and (index.labels < 0).any():
        missing = [index.video_ids[i] for i in np.flatnonzero(index.labels < 0)[:3]]
        raise ValueError(f"token store {index.store_dir} has unlabelled videos (e.g. {missing}); "
                         f"fine-tuning and test need labels")


def _train_stream(index: StoreIndex, make_batch: _TrainBatch, *, num_epochs: Optional[int]):
    import grain

    global_batch = make_batch.batch_size * make_batch.process_count
    # Each epoch's tail (fewer videos than a global batch) is not read, as the released loaders'
    # drop_last: no batch holds a video twice (a clip would be its own negative in the NCE loss),
    # no batch mixes two epochs, and every process runs the same number of batches (else
    # collectives hang). Process p's batch b is rows [p·B, (p+1)·B) of global batch b.
    num_batches = sys.maxsize if num_epochs is None else num_epochs * steps_per_epoch(index, global_batch)
    return grain.MapDataset.range(num_batches).map(make_batch)


_TRAIN_BATCHES = {"pretrain": _PretrainBatch, "finetune": _FinetuneBatch}


def train_dataset(
    index: StoreIndex,
    task: str,
    *,
    batch_size: int,
    clip_len: int,
    seed: int,
    clip_fps: Optional[float] = None,
    relevance_range: Optional[int] = None,
    variants: Optional[Sequence[str]] = None,
    num_epochs: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
):
    """The training stream of `task` (per process; batch_size is per process):

      'pretrain'  two clips per video for masked-token + contrastive pre-training:
                  {'tokens': int32 [batch_size, 2, clip_len, h, w]}; both clips come from one
                  stored variant; relevance_range: max |start1 - start2| in stored frames (None:
                  unbounded).
      'finetune'  one random clip of one randomly chosen stored augmentation variant:
                  {'tokens': int32 [batch_size, clip_len, h, w], 'label': int32 [batch_size]}.

    The variant is drawn at random per example when there are several (`variants` selects them).
    num_epochs None repeats forever; otherwise the stream ends after that many epochs. Every
    epoch drops its last incomplete global batch (drop_last).
    """
    if task not in _TRAIN_BATCHES:
        raise ValueError(f"task must be one of {sorted(_TRAIN_BATCHES)}, got {task!r}")
    pi, pc = _process(process_index, process_count)
    index = index.select_variants(variants)
    _check_split(index, pc, batch_size, training=True, labels=task == "finetune")
    options = {}
    if task == "pretrain":
        if relevance_range is not None and relevance_range < 0:
            raise ValueError(f"relevance_range must be >= 0, got {relevance_range}")
        options["relevance_range"] = relevance_range
    elif relevance_range is not None:
        raise ValueError("relevance_range is a pre-training option (two clips of one video)")
    make_batch = _TRAIN_BATCHES[task](ClipReader(index, clip_len=clip_len, clip_fps=clip_fps), seed=seed,
                                      batch_size=batch_size, process_index=pi, process_count=pc, **options)
    return _train_stream(index, make_batch, num_epochs=num_epochs)


def eval_dataset(
    index: StoreIndex,
    *,
    batch_size: int,
    clip_len: int,
    num_clips: int = 10,
    clip_fps: Optional[float] = None,
    variants: Optional[Sequence[str]] = None,
    clip_seed: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
):
    """Every video once, as K uniformly spaced clips of each of C crops (the released test).

    Yields per process {'tokens': int32 [batch_size, C·K, clip_len, h, w] (view v = crop c·K + clip k),
    'label': int32 [B], 'video_index': int32 [B] (position in index.video_ids), 'valid': bool [B]}.
    The video list is padded with invalid examples to a multiple of batch_size·process_count, so
    all processes run the same number of batches and every video is counted exactly once.
    variants: the crops; default `default_test_variants(index.variants)`.
    clip_seed: None for the test's spaced clips; an int for K uniform random clips per crop instead,
    drawn from default_rng((clip_seed, batch)) (the released kNN monitor's `is_train` sampling),
    so the same clips at every call with the same batch size.
    """
    pi, pc = _process(process_index, process_count)
    index = index.select_variants(variants if variants is not None else default_test_variants(index.variants))
    _check_split(index, pc, batch_size, training=False, labels=True)
    import grain

    make_batch = _EvalBatch(ClipReader(index, clip_len=clip_len, clip_fps=clip_fps), num_clips=num_clips,
                            batch_size=batch_size, process_index=pi, process_count=pc, clip_seed=clip_seed)
    global_batch = batch_size * pc
    # Contiguous per-process blocks of each padded global batch, as in `_train_stream`.
    return grain.MapDataset.range(-(-index.num_videos // global_batch)).map(make_batch)


def steps_per_epoch(index: StoreIndex, global_batch_size: int) -> int:
    """Training steps in one epoch (the last incomplete global batch is not a step)."""
    return index.num_videos // global_batch_size


def make_iterator(dataset, *, workers: int = 0, read_threads: int = 8, prefetch: Optional[int] = None,
                  worker_buffer_size: int = 2):
    """A checkpointable iterator over a pipeline (a grain.MapDataset of batches).

    An element of the pipelines is a whole batch, made by one thread: read_threads batches are
    made in parallel, and prefetch (default 2 x read_threads) bounds the batches held ahead.
    workers > 0 runs this in that many processes (mp_prefetch), each with its own threads; they
    end with this process even when it is killed (`_worker_init`).
    The state is the number of batches read (`_BatchIterator`), so a state restores under
    another worker count. Save/restore it with orbax:
        mngr.save(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it)))
        mngr.restore(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(it)))
    """
    import grain

    if workers > 0:
        _mark_flags_parsed()
    prefetch = 2 * read_threads if prefetch is None else prefetch

    def start_at(batch: int):
        ds = dataset[batch:] if batch else dataset
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
        if workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                             per_worker_buffer_size=worker_buffer_size),
                                worker_init_fn=functools.partial(_worker_init, os.getpid()))
        return iter(ds)

    return _batch_iterator_class()(start_at)


@functools.cache
def _batch_iterator_class():
    """`_BatchIterator`, defined on first use: grain is imported only by programs that read data."""
    import grain

    class _BatchIterator(grain.DatasetIterator):
        """Batches of a pipeline from `start_at(b)` (grain's iterator from batch b on); the state
        is {"next_batch": b}. Batch b is the same whatever the worker count (the pipelines are
        MapDatasets of batches, see the module docstring), while grain's own iterator states
        differ in kind with it (a prefetch index at 0 workers, an interleave of per-worker
        states at N), so a run can be resumed with another `data.workers`."""

        def __init__(self, start_at):
            super().__init__()
            self._start_at, self._next_batch = start_at, 0
            self._iterator = start_at(0)

        def __next__(self):
            try:
                batch = next(self._iterator)
            except RuntimeError as e:
                raise _worker_error(e, self._next_batch) from None
            self._next_batch += 1
            return batch

        def get_state(self) -> dict:
            return {"next_batch": self._next_batch}

        def set_state(self, state: dict) -> None:
            batch = _next_batch_of(state)
            self._iterator.close()
            self._iterator, self._next_batch = self._start_at(batch), batch

        def start_prefetch(self) -> None:
            self._iterator.start_prefetch()

        def close(self) -> None:
            self._iterator.close()
            super().close()

    return _BatchIterator


class DataWorkerError(RuntimeError):
    """A data worker process (`make_iterator`'s workers > 0) ended without an error of its own:
    killed (the OOM killer, a signal) or crashed. The run fails (exit_codes.FAILED); its
    checkpoints are intact, and the data iterator's state resumes it exactly."""


_WORKER_DIED = re.compile(r"Worker process was terminated unexpectedly with exit code (-?\d+)")


def _worker_error(error: RuntimeError, batch: int) -> BaseException:
    """grain's error for a dead worker as one line saying what happened; other errors unchanged."""
    found = _WORKER_DIED.search(str(error))
    if found is None:
        return error
    code = int(found.group(1))
    how = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
           else f"exit code {code}")
    hint = " (often the kernel's OOM killer: fewer config.data.workers need less memory)" if code == -9 else ""
    return DataWorkerError(f"a data worker process ended while reading batch {batch}: {how}{hint}; the checkpoints "
                           f"saved are intact: run the same command again to resume")


def _worker_init(parent_pid: int, worker_index: int, worker_count: int) -> None:
    """grain's worker_init_fn: a data worker exits when the trainer that started it is gone
    (SIGKILL leaves no chance to stop it; ~200 MB each would stay under PID 1)."""
    io_utils.exit_with_parent(parent_pid)


def _next_batch_of(state: dict) -> int:
    """The next batch index of an iterator state {"next_batch": b} (`get_state`); a checkpoint
    holding grain's own state is of an older run format (`vimpac migrate` converts it)."""
    if isinstance(state, dict) and isinstance(state.get("next_batch"), int):
        return int(state["next_batch"])
    raise ValueError(f"unknown data iterator state {str(state)[:200]}: not written by this version's pipelines")


def _mark_flags_parsed() -> None:
    """grain's worker processes read absl flags, which raises in a program that never parsed them
    (google/grain#1355); mark them parsed (at their defaults) unless the program parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
