"""Small token stores for tests and benchmarks, in the exact format of `token_store`.

`write_test_store` writes shards with ArrayRecord and a `metadata.json` marked complete, so the
pipelines read it exactly as they read a store made by `vimpac tokenize`.

Token patterns:
  "random"       codes uniform in [0, NUM_CODES): what a benchmark wants.
  "frame_index"  tokens[f] == f everywhere except two marker cells, so a test can read off which
                 stored frames a clip holds: [f, 0, 1] = the variant's position in the video's
                 variant list, [f, 0, 2] = the video's position in `videos`. Needs h*w >= 3 and
                 fewer than NUM_CODES frames / videos.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vimpac_jax.constants import NUM_CODES
from vimpac_jax.data.token_store import (CHUNKED_LAYOUT, DEFAULT_CHUNK_FRAMES, METADATA_FILE, SHARDS_DIR,
                                         STORE_FORMAT, STORE_VERSION, encode_record, encode_video_records)

DEFAULT_VARIANTS = ("r128_center_noflip",)
PATTERNS = ("random", "frame_index")


def _video_tokens(rng: np.random.Generator, pattern: str, num_frames: int, grid: tuple[int, int],
                  variant_pos: int, video_pos: int) -> np.ndarray:
    """int16 [num_frames, h, w] for one (video, variant)."""
    h, w = grid
    if pattern == "random":
        return rng.integers(0, NUM_CODES, size=(num_frames, h, w), dtype=np.int16)
    tokens = np.broadcast_to(np.arange(num_frames, dtype=np.int16)[:, None, None], (num_frames, h, w)).copy()
    tokens[:, 0, 1] = variant_pos
    tokens[:, 0, 2] = video_pos
    return tokens


def write_test_store(
    store_dir,
    videos: Sequence[dict[str, Any]],
    *,
    grid: tuple[int, int] = (4, 4),
    fps: float = 2.0,
    shards: int = 1,
    seed: int = 0,
    pattern: str = "random",
    options: str = "group_size:1",
    chunk_frames: int | None = DEFAULT_CHUNK_FRAMES,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write a complete token store to ``store_dir`` (created; must not hold a store yet).

    videos: one dict per video with ``video_id`` (str), ``num_frames`` (int >= 1), and optionally
      ``label`` (int or None, default None) and ``variants`` (names, default DEFAULT_VARIANTS).
      Every variant of a video is one record of ``num_frames`` frames; all records of a video go
      to the same shard, videos are dealt to shards round-robin (so ``shards`` > len(videos)
      leaves some shards empty, as a real job can).
    options: ArrayRecord writer options; the default is what `vimpac tokenize` writes (one record
      per ArrayRecord chunk, default compression).
    chunk_frames: the frames of a record of the "chunked" layout `vimpac tokenize` writes (its
      default); None writes the old "whole" layout (one record per (video, variant)), which the
      readers refuse: for the tests of `vimpac convert-store` and of that refusal.
    class_names: recorded in the metadata as `vimpac tokenize` records a dataset's names.
    Returns the store path.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    h, w = grid
    if pattern == "frame_index" and (h * w < 3 or len(videos) >= NUM_CODES):
        raise ValueError("pattern 'frame_index' needs h*w >= 3 and fewer than NUM_CODES videos")
    from array_record.python.array_record_module import ArrayRecordWriter

    store = Path(store_dir)
    if (store / METADATA_FILE).exists():
        raise FileExistsError(f"{store} already holds a token store")
    (store / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    names = [f"{SHARDS_DIR}/tokens-{i:05d}-of-{shards:05d}.array_record" for i in range(shards)]
    writers = [ArrayRecordWriter(str(store / n), options) for n in names]
    rng = np.random.default_rng(seed)
    all_variants: list[str] = []
    num_records = 0
    try:
        for pos, video in enumerate(videos):
            n = int(video["num_frames"])
            if n < 1:
                raise ValueError(f"video {video['video_id']!r}: num_frames must be >= 1, got {n}")
            if pattern == "frame_index" and n >= NUM_CODES:
                raise ValueError(f"video {video['video_id']!r}: too many frames for pattern 'frame_index'")
            variants = tuple(video.get("variants", DEFAULT_VARIANTS))
            for vpos, variant in enumerate(variants):
                if variant not in all_variants:
                    all_variants.append(variant)
                tokens = _video_tokens(rng, pattern, n, grid, vpos, pos)
                fields = dict(video_id=str(video["video_id"]), label=video.get("label"), fps=fps, variant=variant)
                if chunk_frames is None:
                    writers[pos % shards].write(encode_record(tokens, **fields))
                else:
                    for record in encode_video_records(tokens, chunk_frames=chunk_frames, **fields):
                        writers[pos % shards].write(record)
                num_records += 1
    finally:
        for writer in writers:
            writer.close()
    meta = {"format": STORE_FORMAT, "format_version": STORE_VERSION, "complete": True, "shards": names,
            "fps": float(fps), "variants": all_variants,
            "grid": [h, w], "num_videos": len(videos), "num_records": num_records,
            "tokenizer": {"kind": "test", "pattern": pattern, "seed": seed}, "shard_options": options}
    if chunk_frames is not None:
        meta.update(layout=CHUNKED_LAYOUT, chunk_frames=int(chunk_frames))
    if class_names is not None:
        meta["class_names"] = list(class_names)
    (store / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    return store
