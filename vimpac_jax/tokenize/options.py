"""What a `vimpac tokenize` job is given: `TokenizeOptions` (read by `job` and by `identity`,
which records the options that make a store what it is)."""

from __future__ import annotations

import dataclasses

from vimpac_jax.data import token_store
from vimpac_jax.tokenize.shards import SHARD_OPTIONS


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
    """Everything `vimpac tokenize` takes; see `vimpac_jax.commands.tokenize` for the flags."""

    tokenizer: str
    videos: str | None  # a list file or directory; None with `tfds`
    out: str
    fps: float = 2.0
    size: int = 128
    resize: int | None = None
    variants: str = "pretrain"
    video_root: str | None = None
    max_seconds: float | None = None
    max_frames: int | None = None
    sampling: str = "floor"
    workers: int | None = None  # decode processes; None = cores - 1
    batch_size: int | None = None  # frames per device step over all local devices
    shard_size: int = 256  # videos per shard
    shard_options: str = SHARD_OPTIONS  # ArrayRecordWriter options (e.g. add ",uncompressed")
    chunk_frames: int = token_store.DEFAULT_CHUNK_FRAMES  # frames per token record (part of the identity)
    dtype: str = "float32"  # tokenizer compute dtype (part of the store's identity)
    process_index: int | None = None  # default jax.process_index()
    process_count: int | None = None  # default jax.process_count()
    progress_interval: float = 2.0  # seconds between progress lines
    tfds: str | None = None  # NAME[/CONFIG]:SPLIT of a prepared TFDS dataset, instead of `videos`
    tfds_data_dir: str | None = None  # its TFDS data_dir (default: TFDS's own)
    source_fps: float | None = None  # frame rate of the TFDS dataset's videos, where it does not say
    class_names_file: str | None = None  # one class name per line, in label order (--class-names)
    verify: bool = False  # read every record of this process's shards; redo the videos of damaged ones
