"""Frames for training the VQ tokenizer (`vimpac_jax.tokenizer.vq`): decode once, sample forever.

A tokenizer needs independent frames, not clips, and far fewer of them than the transformer
needs token clips, so the videos are decoded once (`video_decode.decode_many`, in worker
processes) into an in-memory *frame pool* uint8 [F, S, S, 3]; training batches are then drawn
from the pool by a grain pipeline that is a pure function of (seed, step):

    pool = load_frame_pool(resolve_videos(cfg.videos), fps=cfg.fps, size=cfg.size, ...)
    ds = frame_dataset(pool.frames, batch_size=per_process_batch, seed=seed, flip=cfg.flip)
    batch = ds[step]                       # {'images': uint8 [B, S, S, 3]}; or iterate:
    it = pipelines.make_iterator(ds)       # a checkpointable grain iterator

Frames: each video is sampled at `fps`, its shorter side resized to `size` and the center
square cropped (the pre-training variant); at most `max_frames_per_video`
frames are kept per file, taken from its start (decoding stops there, so long videos are cheap
and do not dominate the pool). The pool is kept in video order whatever order the workers
finish in, so it — and every batch — is deterministic. Videos that fail to decode are skipped,
logged and listed in `FramePool.skipped`. The pool must fit in `max_pool_gib` of memory; a
larger set is refused before it is exhausted (lower fps / max_frames_per_video, or sample a
subset of videos) — streaming from disk is not implemented.

This module imports neither JAX nor PyAV at import time (`decode_many` spawns workers).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from typing import Sequence

import numpy as np

from vimpac_jax.progress import Progress

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


def resolve_videos(spec: str) -> list[str]:
    """`data.videos` -> video paths. spec: a glob pattern (sorted matches), a directory
    (searched recursively for video files) or a list file (one path per line, or a .csv; see
    `annotations.read_video_list`). Raises ValueError / FileNotFoundError naming the spec when
    nothing is found."""
    from vimpac_jax.data import annotations

    spec = os.fspath(spec or "")
    if not spec.strip():
        raise ValueError("data.videos is empty: give a video list file, a directory or a glob "
                         "(--config.data.videos=...)")
    if _GLOB_CHARS & set(spec):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.exists(spec):
        paths = [item.path for item in annotations.read_video_list(spec)]
    else:
        raise FileNotFoundError(f"data.videos: {spec} does not exist")
    if not paths:
        raise ValueError(f"data.videos: no video files found for {spec!r}")
    return paths


@dataclasses.dataclass
class FramePool:
    """Decoded frames of a set of videos.

    frames:  uint8 [F, S, S, 3], grouped by video in the order of `paths`
    sources: int32 [F], the index in `paths` of each frame's video
    paths:   the videos asked for
    skipped: (path, reason) of the videos that could not be decoded
    """

    frames: np.ndarray
    sources: np.ndarray
    paths: list[str]
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.frames)


def _check_decode_args(fps: float, size: int, max_frames_per_video: int | None, max_pool_gib: float) -> None:
    if not fps or fps <= 0:
        raise ValueError(f"data.fps must be positive, got {fps}")
    if size <= 0 or size % 8:
        raise ValueError(f"data.size must be a positive multiple of 8 (the tokenizer downsamples 8x), "
                         f"got {size}")
    if max_frames_per_video is not None and max_frames_per_video < 1:
        raise ValueError(f"data.max_frames_per_video must be >= 1 (or None), got {max_frames_per_video}")
    if max_pool_gib <= 0:
        raise ValueError(f"data.max_pool_gib must be positive, got {max_pool_gib}")


def load_frame_pool(
    paths: Sequence[str | os.PathLike],
    *,
    fps: float,
    size: int,
    max_frames_per_video: int | None = 64,
    num_workers: int = 0,
    max_pool_gib: float = 8.0,
    progress_every_s: float = 10.0,
) -> FramePool:
    """Decode every video once -> a `FramePool` (see the module docstring).

    Raises ValueError before decoding for bad arguments; MemoryError when the decoded frames
    would exceed `max_pool_gib`; ValueError when no video could be decoded. Logs progress
    (videos/s, ETA) every `progress_every_s` seconds.
    """
    from vimpac_jax.data import video_decode

    _check_decode_args(fps, size, max_frames_per_video, max_pool_gib)
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no videos given")
    (variant,) = video_decode.variants_for("pretrain", size)
    budget = int(max_pool_gib * 2 ** 30)
    by_index: dict[int, np.ndarray] = {}
    skipped: list[tuple[int, str, str]] = []
    used = 0
    progress = Progress(len(paths), label="decoding: ", unit="videos", failed=True, every_seconds=progress_every_s)
    results = video_decode.decode_many(paths, fps, [variant], num_workers, max_frames=max_frames_per_video)
    for done, (index, path, result) in enumerate(results, start=1):
        if isinstance(result, Exception):
            log.warning("skipping %s", result)
            skipped.append((index, path, getattr(result, "reason", str(result))))
            progress.update(failed=1)
        else:
            frames = result[variant.name]
            used += frames.nbytes
            if used > budget:
                results.close()  # stops the worker pool
                raise MemoryError(
                    f"decoded frames exceed data.max_pool_gib={max_pool_gib} after {done} of "
                    f"{len(paths)} videos; lower data.fps or max_frames_per_video, or use fewer videos")
            by_index[index] = frames
            progress.update(add=1, note=f"{used / 2 ** 30:.2f} GiB of frames")
    progress.close()
    if not by_index:
        reasons = "; ".join(f"{p}: {r}" for _, p, r in skipped[:3])
        raise ValueError(f"none of the {len(paths)} videos could be decoded (e.g. {reasons})")
    order = sorted(by_index)
    frames = np.concatenate([by_index[i] for i in order])
    sources = np.concatenate([np.full(len(by_index[i]), i, np.int32) for i in order])
    return FramePool(frames=frames, sources=sources, paths=paths,
                     skipped=[(p, r) for _, p, r in sorted(skipped)])


def frame_pool_from_config(data_config) -> FramePool:
    """`load_frame_pool` from a tokenizer's `config.data` block (configs/tokenizer.py)."""
    return load_frame_pool(
        resolve_videos(data_config.videos), fps=float(data_config.fps), size=int(data_config.size),
        max_frames_per_video=data_config.max_frames_per_video, num_workers=int(data_config.workers),
        max_pool_gib=float(data_config.max_pool_gib))


def _random_flip(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return frame[:, ::-1] if rng.random() < 0.5 else frame


def frame_dataset(
    frames: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
):
    """An endless grain.MapDataset of batches {'images': uint8 [batch_size, S, S, 3]}.

    Each epoch visits every pool frame once in a fresh order (seeded); `ds[step]` is the batch
    of that step, so a resumed run continues exactly. batch_size is per process; process p of
    P takes every P-th example of the global order (all processes share the pool).
    flip: mirror each frame with probability 1/2 (also seeded).
    """
    import grain

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[1] != frames.shape[2]:
        raise ValueError(f"frames must be uint8 [F, S, S, C], got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError("the frame pool is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    ds = grain.MapDataset.source(frames).seed(seed).shuffle().repeat()
    if flip:
        ds = ds.random_map(_random_flip)
    ds = ds[process_index::process_count].batch(batch_size, drop_remainder=True)
    return ds.map(lambda images: {"images": np.ascontiguousarray(images)})


def sample_frames(frames: np.ndarray, n: int, seed: int) -> np.ndarray:
    """min(n, F) distinct random frames of a pool, in pool order: uint8 [n, S, S, 3].
    For fixed evaluation / visualisation sets; deterministic in seed."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(frames))[:n]
    return frames[np.sort(idx)]
