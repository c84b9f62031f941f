"""grain input pipelines over the token store (reference §6, §8): pre-training, fine-tuning, test.

Every pipeline is a `grain.MapDataset` of per-process batches, built the same way:

    range(num_videos).repeat(num_epochs)   # training: range(L), L = whole global batches per epoch
      -> map_with_index(sample)    # position g -> (epoch, video) -> read record(s), cut clips
      -> [process_index::process_count] -> batch(batch_size)

Determinism. The training order is a permutation of the videos per epoch drawn from
`default_rng((seed, epoch))` (`EpochOrder`; not grain's `shuffle`, whose index shuffle costs
milliseconds per element on datasets under ~1000 videos, ~40 µs above). The clip sampling of an
example uses `default_rng((seed, epoch, video))`, so what a video yields in an epoch does not
depend on the order, the worker count or the number of processes. Sharding cuts the shuffled
global stream into per-process batches of B and gives process p every P-th of them, starting at
p: process p's batch b is rows [p·B, (p+1)·B) of global batch b, the contiguous block that
`jax.make_array_from_process_local_data` places for process p. The global array is therefore
exactly the batch b a single process with batch size B·P would read, row for row (the masks and
keys of a step go by row, so the order matters, not only the set). Each process's iterator
state is grain's (`get_state`/`set_state`), saved with `grain.checkpoint.CheckpointSave` in the
same orbax checkpoint as the model (see `make_iterator`).

Every process opens every shard and reads records by global index (ArrayRecord is random
access), so the number of shard files places no constraint on the number of hosts; what must
hold is at least one video per process (and, for training, one global batch of videos).

Frame rate (as the released code): clips are cut from the stored frames with a step
`max(int(store_fps / clip_fps), 1)`; a clip covers T·step stored frames and keeps every step-th.
Start indices follow the released `get_start_end_idx`, which treats a video of n frames as
n + step - 1 long so that the last stored frame can be reached: delta = max(n + step - 1 - T·step, 0),
a random start is uniform on [0, delta], test clip k of K starts at int(delta·k / max(K - 1, 1))
(K == 1 gives the first clip, not the middle one). A clip shorter than T frames is padded at the
end with PAD.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from vimpac_jax.constants import PAD_ID
from vimpac_jax.data import token_store

log = logging.getLogger(__name__)

INDEX_CACHE_FILE = "record_index.npz"
_INDEX_CACHE_VERSION = 1
_VARIANT_NAME = re.compile(r"^r(\d+)_(start|center|end)_(flip|noflip)$")


# ----------------------------------------------------------------------------------------------
# The index: which record holds which (video, variant), read once from the record headers.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class StoreIndex:
    """Records of a token store grouped by video. V videos (sorted by id), C variants.

    records:    int64 [V, C]  global record index of (video, variant) in `open_records` order
    num_frames: int64 [V, C]  stored frames of that record
    labels:     int64 [V]     class label, -1 for an unlabelled video
    fps:        float64 [V]   stored frame rate
    """

    store_dir: str
    video_ids: tuple[str, ...]
    variants: tuple[str, ...]
    records: np.ndarray
    num_frames: np.ndarray
    labels: np.ndarray
    fps: np.ndarray
    grid: tuple[int, int]

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
    """The test crops of reference §8 among stored variant names: no flip, the smallest resize
    (the three crops of a fine-tuning store; the center crop of a pre-training store). Names that
    do not follow `video_decode.Variant.name` are all kept."""
    parsed = [(_VARIANT_NAME.match(v), v) for v in variants]
    if not variants or any(m is None for m, _ in parsed):
        return tuple(variants)
    noflip = [(int(m.group(1)), v) for m, v in parsed if m.group(3) == "noflip"]
    if not noflip:
        return tuple(variants)
    smallest = min(size for size, _ in noflip)
    return tuple(v for size, v in noflip if size == smallest)


def _cache_key(store_dir: Path, shard_paths: list[str]) -> str:
    digest = hashlib.sha256((store_dir / token_store.METADATA_FILE).read_bytes())
    for p in shard_paths:
        digest.update(f"{os.path.basename(p)}:{os.path.getsize(p)}\n".encode())
    return f"v{_INDEX_CACHE_VERSION}:{digest.hexdigest()}"


def _read_headers(source, chunk: int = 256) -> list[dict[str, Any]]:
    """decode_header of every record, in record order, with progress for big stores."""
    n = len(source)
    headers: list[dict[str, Any]] = []
    t0 = last = time.monotonic()
    for lo in range(0, n, chunk):
        keys = list(range(lo, min(lo + chunk, n)))
        # __getitems__ reads a chunk with parallel readers, one per shard.
        records = source.__getitems__(keys) if hasattr(source, "__getitems__") else [source[k] for k in keys]
        headers.extend(token_store.decode_header(r) for r in records)
        now = time.monotonic()
        if now - last > 10:
            rate = len(headers) / (now - t0)
            log.info("indexing %s: %d/%d records, %.0f records/s, ETA %.0f s",
                     getattr(source, "paths", "store"), len(headers), n, rate, (n - len(headers)) / rate)
            last = now
    return headers


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


def _index_from_headers(store_dir: str, meta: dict, headers: list[dict[str, Any]]) -> StoreIndex:
    if not headers:
        raise ValueError(f"token store {store_dir} holds no records (empty split)")
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
    records = np.array([[by_video[v][c] for c in variants] for v in video_ids], np.int64).reshape(-1, len(variants))
    num_frames = np.array([h["shape"][0] for h in headers], np.int64)[records]
    first = records[:, 0] if len(video_ids) else np.zeros(0, np.int64)
    labels = np.array([-1 if headers[r]["label"] is None else int(headers[r]["label"]) for r in first], np.int64)
    for v, row, label in zip(video_ids, records, labels):
        if any((headers[r]["label"] if headers[r]["label"] is not None else -1) != label for r in row):
            raise ValueError(f"token store {store_dir}: video {v!r} has different labels across variants")
    fps = np.array([float(headers[r]["fps"]) for r in first], np.float64)
    return StoreIndex(store_dir=str(store_dir), video_ids=video_ids, variants=variants, records=records,
                      num_frames=num_frames, labels=labels, fps=fps, grid=tuple(next(iter(grids))))


def _save_cache(path: Path, key: str, index: StoreIndex) -> None:
    """Atomic write (tmp + rename): concurrent hosts may race; the last complete file wins."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), video_ids=np.array(index.video_ids, dtype=str),
                     variants=np.array(index.variants, dtype=str), records=index.records,
                     num_frames=index.num_frames, labels=index.labels, fps=index.fps,
                     grid=np.array(index.grid, np.int64))
        os.replace(tmp, path)
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
                              grid=tuple(int(g) for g in z["grid"]))
    except (OSError, KeyError, ValueError) as e:
        log.warning("ignoring unreadable record index cache %s: %s", path, e)
        return None


def load_index(store_dir, *, cache: bool = True) -> StoreIndex:
    """Index a complete token store: one pass over the record headers, cached in the store.

    The cache (`record_index.npz`, next to metadata.json) is keyed by metadata.json's bytes and
    the shard sizes, so a re-written store is indexed again. Reading headers reads whole records
    (ArrayRecord has no partial reads), hence the cache.
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
    headers = _read_headers(token_store.open_records(store))
    index = _index_from_headers(str(store), meta, headers)
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


def max_start(num_frames: int, clip_len: int, step: int) -> int:
    """delta: the largest start index of a clip (0 when the video is shorter than a clip)."""
    return max(num_frames + step - 1 - clip_len * step, 0)


def random_start(rng: np.random.Generator, delta: int, bound: Optional[tuple[int, int]] = None) -> int:
    """Uniform on [l, r] = [0, delta], or that interval clipped to ``bound`` (l, r inclusive) the
    released code's way (a bound beyond the video collapses to its nearest end)."""
    if bound is None:
        lo, hi = 0, delta
    else:
        hi = max(min(bound[1], delta), 0)
        lo = min(max(0, bound[0]), hi)
    return int(rng.integers(lo, hi + 1))


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
    delta = max_start(num_frames, clip_len, step)
    return np.arange(num_clips, dtype=np.int64) * delta // max(num_clips - 1, 1)


def take_clip(tokens: np.ndarray, start: int, clip_len: int, step: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """tokens [n, h, w] -> int32 [clip_len, h, w]: frames start, start+step, ... of the span
    [start, start + clip_len·step), padded at the end with PAD when the video runs out."""
    frames = tokens[start:start + clip_len * step:step]
    if out is None:
        out = np.empty((clip_len,) + tokens.shape[1:], np.int32)
    out[:len(frames)] = frames
    out[len(frames):] = PAD_ID
    return out


# ----------------------------------------------------------------------------------------------
# Per-example transforms (picklable, so that grain worker processes can run them).
# ----------------------------------------------------------------------------------------------


class EpochOrder:
    """Position g of the repeated stream -> (epoch, video): epoch = g // L, video = the
    (g mod L)-th entry of a permutation drawn from default_rng((seed, epoch)), where L
    (`epoch_length`, default V) is how many videos of each epoch are read. Keeps the
    permutations of the last two epochs (V int64 each)."""

    def __init__(self, num_videos: int, seed: int, epoch_length: Optional[int] = None):
        self.num_videos, self.seed = int(num_videos), int(seed)
        self.epoch_length = self.num_videos if epoch_length is None else int(epoch_length)
        self._perms: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_perms": {}}  # workers rebuild theirs

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_videos)
            # Replace the dict rather than mutate it: reader threads never see it change size.
            # Two threads may both draw an epoch's permutation; they draw the same one.
            kept = dict(list(self._perms.items())[-1:])
            kept[epoch] = perm
            self._perms = kept
        return perm

    def __call__(self, position: int) -> tuple[int, int]:
        epoch, i = divmod(int(position), self.epoch_length)
        return epoch, int(self.permutation(epoch)[i])


class _Sampler:
    """Shared state of the transforms: the index, the record source, the clip geometry and, for
    training, the epoch order."""

    def __init__(self, index: StoreIndex, *, clip_len: int, clip_fps: Optional[float], seed: int):
        if clip_len < 1:
            raise ValueError(f"clip_len must be >= 1, got {clip_len}")
        self.records = index.records
        self.labels = index.labels
        self.grid = index.grid
        self.num_videos = index.num_videos
        self.clip_len = clip_len
        fps_values, which = np.unique(index.fps, return_inverse=True)
        self.steps = np.array([frame_step(f, clip_fps) for f in fps_values], np.int64)[which].reshape(-1)
        self.seed = int(seed)
        self.order = EpochOrder(index.num_videos, seed)
        self.source = token_store.open_records(index.store_dir)

    def example(self, position: int) -> tuple[int, np.random.Generator]:
        """Training position -> (video, its RNG for this epoch)."""
        epoch, video = self.order(position)
        return video, np.random.default_rng((self.seed, epoch, video))

    def tokens(self, video: int, column: int) -> np.ndarray:
        """int16 [n, h, w] of one stored (video, variant)."""
        return token_store.decode_record(self.source[int(self.records[video, column])])["tokens"]


class _PretrainSample(_Sampler):
    def __init__(self, index, *, relevance_range: Optional[int], **kw):
        super().__init__(index, **kw)
        self.relevance_range = relevance_range

    def __call__(self, position: int, _) -> dict[str, np.ndarray]:
        video, rng = self.example(position)
        column = int(rng.integers(self.records.shape[1]))
        tokens = self.tokens(video, column)
        step = int(self.steps[video])
        starts = pair_starts(rng, max_start(len(tokens), self.clip_len, step), self.relevance_range)
        out = np.empty((2, self.clip_len) + self.grid, np.int32)
        for i, s in enumerate(starts):
            take_clip(tokens, s, self.clip_len, step, out=out[i])
        return {"tokens": out}


class _FinetuneSample(_Sampler):
    def __call__(self, position: int, _) -> dict[str, np.ndarray]:
        video, rng = self.example(position)
        column = int(rng.integers(self.records.shape[1]))
        tokens = self.tokens(video, column)
        step = int(self.steps[video])
        start = random_start(rng, max_start(len(tokens), self.clip_len, step))
        return {"tokens": take_clip(tokens, start, self.clip_len, step), "label": np.int32(self.labels[video])}


class _EvalSample(_Sampler):
    def __init__(self, index, *, num_clips: int, clip_seed: Optional[int] = None, **kw):
        super().__init__(index, **kw)
        self.num_clips = num_clips
        self.clip_seed = clip_seed

    def __call__(self, video: int) -> dict[str, np.ndarray]:
        num_views = self.records.shape[1] * self.num_clips
        out = np.zeros((num_views, self.clip_len) + self.grid, np.int32)
        if video >= self.num_videos:
            # Padding example: code 0 rather than PAD, so no attention line is all-PAD (NaN).
            return {"tokens": out, "label": np.int32(-1), "video_index": np.int32(-1), "valid": np.bool_(False)}
        step = int(self.steps[video])
        for c in range(self.records.shape[1]):  # crop-major, as the released code: v = c·K + k
            tokens = self.tokens(video, c)
            if self.clip_seed is None:
                starts = eval_clip_starts(len(tokens), self.clip_len, step, self.num_clips)
            else:
                rng = np.random.default_rng((self.clip_seed, video, c))
                starts = [random_start(rng, max_start(len(tokens), self.clip_len, step)) for _ in range(self.num_clips)]
            for k, s in enumerate(starts):
                take_clip(tokens, int(s), self.clip_len, step, out=out[c * self.num_clips + k])
        return {"tokens": out, "label": np.int32(self.labels[video]), "video_index": np.int32(video),
                "valid": np.bool_(True)}


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


def _train_stream(index: StoreIndex, sample, *, batch_size: int, num_epochs: Optional[int],
                  process_index: int, process_count: int):
    import grain

    global_batch = batch_size * process_count
    # Each epoch's tail (fewer videos than a global batch) is not read, as the released
    # loaders' drop_last: no batch holds a video twice (a clip would be its own negative in the
    # NCE loss), and every process runs the same number of batches (else collectives hang).
    sample.order = EpochOrder(index.num_videos, sample.seed, epoch_length=steps_per_epoch(index, global_batch)
                              * global_batch)
    ds = grain.MapDataset.range(sample.order.epoch_length).repeat(num_epochs).map_with_index(sample)
    # Process p takes per-process batches p, p + P, ...: rows [p·B, (p+1)·B) of each global batch.
    return ds.batch(batch_size, drop_remainder=True)[process_index::process_count]


def pretrain_dataset(
    index: StoreIndex,
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
    """Two clips per video for masked-token + contrastive pre-training (reference §6).

    Yields {'tokens': int32 [batch_size, 2, clip_len, h, w]} per process (batch_size is per
    process). Both clips come from one stored variant, chosen at random when there are several.
    relevance_range: max |start1 - start2| in stored frames (None: unbounded).
    num_epochs None repeats forever; otherwise the stream ends after that many epochs. Every
    epoch drops its last incomplete global batch (drop_last).
    """
    pi, pc = _process(process_index, process_count)
    index = index.select_variants(variants)
    _check_split(index, pc, batch_size, training=True, labels=False)
    if relevance_range is not None and relevance_range < 0:
        raise ValueError(f"relevance_range must be >= 0, got {relevance_range}")
    sample = _PretrainSample(index, relevance_range=relevance_range, clip_len=clip_len, clip_fps=clip_fps, seed=seed)
    return _train_stream(index, sample, batch_size=batch_size, num_epochs=num_epochs,
                         process_index=pi, process_count=pc)


def finetune_dataset(
    index: StoreIndex,
    *,
    batch_size: int,
    clip_len: int,
    seed: int,
    clip_fps: Optional[float] = None,
    variants: Optional[Sequence[str]] = None,
    num_epochs: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
):
    """One random clip of one randomly chosen stored augmentation variant (reference §8).

    Yields {'tokens': int32 [batch_size, clip_len, h, w], 'label': int32 [batch_size]} per process.
    """
    pi, pc = _process(process_index, process_count)
    index = index.select_variants(variants)
    _check_split(index, pc, batch_size, training=True, labels=True)
    sample = _FinetuneSample(index, clip_len=clip_len, clip_fps=clip_fps, seed=seed)
    return _train_stream(index, sample, batch_size=batch_size, num_epochs=num_epochs,
                         process_index=pi, process_count=pc)


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
    """Every video once, as K uniformly spaced clips of each of C crops (reference §8).

    Yields per process {'tokens': int32 [batch_size, C·K, clip_len, h, w] (view v = crop c·K + clip k),
    'label': int32 [B], 'video_index': int32 [B] (position in index.video_ids), 'valid': bool [B]}.
    The video list is padded with invalid examples to a multiple of batch_size·process_count, so
    all processes run the same number of batches and every video is counted exactly once.
    variants: the crops; default `default_test_variants(index.variants)`.
    clip_seed: None for the test's spaced clips; an int for K random clips per crop instead, drawn
    from default_rng((clip_seed, video, crop)) (the released kNN monitor's `is_train` sampling).
    """
    pi, pc = _process(process_index, process_count)
    index = index.select_variants(variants if variants is not None else default_test_variants(index.variants))
    _check_split(index, pc, batch_size, training=False, labels=True)
    import grain

    sample = _EvalSample(index, num_clips=num_clips, clip_seed=clip_seed, clip_len=clip_len, clip_fps=clip_fps, seed=0)
    global_batch = batch_size * pc
    padded = -(-index.num_videos // global_batch) * global_batch
    ds = grain.MapDataset.range(padded).map(sample)
    return ds.batch(batch_size)[pi::pc]  # contiguous per-process blocks, as in `_train_stream`


def steps_per_epoch(index: StoreIndex, global_batch_size: int) -> int:
    """Training steps in one epoch (the last incomplete global batch is not a step)."""
    return index.num_videos // global_batch_size


def make_iterator(dataset, *, workers: int = 0, read_threads: int = 8, prefetch: Optional[int] = None,
                  worker_buffer_size: int = 2):
    """A checkpointable iterator over a pipeline (grain.DatasetIterator).

    An element of the pipelines is a whole batch, made by one thread: read_threads batches are
    made in parallel, and prefetch (default 2 x read_threads) bounds the batches held ahead.
    workers > 0 runs this in that many processes (mp_prefetch), each with its own threads.
    A restored state needs the same worker count. Save/restore it with orbax:
        mngr.save(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it)))
        mngr.restore(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(it)))
    """
    import grain

    if workers > 0:
        _mark_flags_parsed()
    prefetch = 2 * read_threads if prefetch is None else prefetch
    ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=worker_buffer_size))
    return iter(ds)


def _mark_flags_parsed() -> None:
    """grain's worker processes read absl flags, which raises in a program that never parsed them
    (google/grain#1355); mark them parsed (at their defaults) unless the program parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """Per-process numpy batch -> global jax.Arrays laid out by ``sharding`` (batch axis first)."""
    import jax

    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
