"""Turn a video collection into a token store (`vimpac tokenize`): decode, tokenize, write shards.

Pipeline (one process per host; each host takes the videos [i::n] of the list):
  decode_many (worker processes: PyAV decode at --fps, resize, crop/flip into the variants)
    -> FrameBatcher (frames of many videos packed into full batches, sharded over the local
       devices, two batches in flight so the host prepares one while the devices run the other)
    -> ShardWriter (per (video, variant) a header record and its chunk records of --chunk-frames
       frames, see token_store.encode_video_records, into ArrayRecord shards of --shard-size videos).

Store layout (see `vimpac_jax.data.token_store`):
  shards/p{process:03d}-{seq:06d}.array_record   "chunked" records of whole videos (every variant of
                                                 a video lands in the same shard)
  progress/config.json                           what the store is made of (its identity)
  progress/process-{process:03d}.jsonl           the journal of one process
  progress/process-{process:03d}.lock            held by the job writing that share (pid, host)
  errors.txt, metadata.json                      written last, once every video is accounted for

--tfds NAME[/CONFIG]:SPLIT replaces the list with a prepared TFDS dataset: `tfds_source` lists its
examples and stands in for decode_many; everything after that is the same.

Resumability. A process appends one journal line (flushed and fsynced) after it closes a shard:
the shard's name, the videos in it (id, frames, records) and the videos that failed to decode
since the last line. The journal is the only truth: a shard file that no journal line names was
cut short by a kill and is deleted on restart, and its videos are done again; a video named in
any journal is never done again. So a run killed at any point and started again ends with every
video exactly once. When the journals cover every video of the list, the process that notices
(each one checks after its last commit, so the last to finish always does) writes errors.txt
and then metadata.json with "complete": true, both by atomic rename: a store without that file
is unfinished, whatever else it holds.

Counts: `frames` is the number of tokenized frames, all variants included (a video of F sampled
frames with 12 variants adds 12·F); `records` the number of (video, variant) pairs (each is a
header record and its chunk records).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from vimpac_jax import io_utils
from vimpac_jax.data import annotations, token_store
from vimpac_jax.data import video_decode as vd

STORE_FORMAT = "vimpac-token-store"
STORE_VERSION = 1
PROGRESS_DIR = "progress"
CONFIG_FILE = "config.json"
# group_size:1 makes every record its own chunk, so a random read decodes one record, as grain
# reads them (ArrayRecord's default groups 65536 records per chunk, made for sequential reads).
SHARD_OPTIONS = "group_size:1"
SHARD_SUFFIX = ".array_record"
# Test hook only: "write:N" SIGKILLs this process right after the N-th video's records were written
# (its shard still open, not journaled); "commit:N" right after the N-th journal line.
CRASH_ENV = "VIMPAC_TOKENIZE_CRASH_AT"


class StoreError(ValueError):
    """--out holds something this run must not touch or extend (another config, inconsistency)."""


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


@dataclasses.dataclass(frozen=True)
class StoreCounts:
    videos_ok: int
    videos_failed: int
    frames: int
    records: int

    def line(self) -> str:
        return f"videos_ok={self.videos_ok} videos_failed={self.videos_failed} frames={self.frames}"


@dataclasses.dataclass(frozen=True)
class TokenizeResult:
    counts: StoreCounts  # over the whole store (every process, every run) as journaled now
    complete: bool  # metadata.json says complete (this run or an earlier one wrote it)
    processed: int  # videos this run decoded (ok or failed)


# ---------------------------------------------------------------------------------------------
# Input


def read_items(videos: str, video_root: str | None = None) -> tuple[list[annotations.VideoItem], list[str] | None]:
    """The list (mmaction2 `path [label]` lines, or a .csv of ids) or directory -> unique items.

    Repeats of a video id are dropped (a repeat with another label is an error).
    """
    if os.path.isdir(videos):
        ann = annotations.read_video_list(videos, video_root=video_root)
    elif not os.path.isfile(videos):
        raise FileNotFoundError(f"--videos {videos}: no such file or directory")
    elif videos.lower().endswith(".csv"):
        ann = annotations.read_video_list(videos, video_root=video_root)
    else:
        ann = annotations.read_mmaction_list(videos, video_root=video_root)
    items = annotations.unique_by_video_id(ann.items)
    if len(items) < len(ann.items):
        print(f"tokenize: {videos}: dropped {len(ann.items) - len(items)} repeated video id(s)", file=sys.stderr)
    return items, ann.class_names


def items_sha256(items: Sequence[annotations.VideoItem]) -> str:
    """A hash of the (video id, label) set: the same videos, in any order and at any root, hash alike."""
    lines = sorted(f"{it.video_id}\t{it.label}\n" for it in items)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def check_video_root(items: Sequence[annotations.VideoItem], video_root: str | None, probe: int = 20) -> None:
    """Fail before any work when none of the first videos exists: a wrong --video-root, most likely.

    (Single missing files are listed in errors.txt instead.)
    """
    head = items[:probe]
    if head and not any(os.path.exists(it.path) for it in head):
        raise FileNotFoundError(
            f"none of the first {len(head)} videos exists (e.g. {head[0].path!r}); "
            f"check --video-root (now {video_root!r}; relative paths are read from the current directory)")


# ---------------------------------------------------------------------------------------------
# Identity


def store_identity(tokenizer_identity: dict, opts: TokenizeOptions, variants: Sequence[vd.Variant],
                   items: Sequence[annotations.VideoItem]) -> dict:
    """What a store is made of; a store is extended or reused only by a run with the same identity."""
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
    }


IDENTITY_KEYS = ("tokenizer", "fps", "size", "resize", "variant_set", "variants", "sampling", "max_seconds",
                 "max_frames", "videos", "source_fps",  # source_fps: --tfds only (absent = None for files)
                 "chunk_frames")  # absent in stores of the "whole" layout (vimpac convert-store)


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in IDENTITY_KEYS if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def _write_json_atomic(path: Path, obj: Any) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    # A unique temporary name: hosts sharing the file system may finalize at the same moment.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        if diff == ["chunk_frames"] and meta.get("complete") and token_store.store_layout(meta)[1] is None:
            raise StoreError(f"--out {out} holds a complete token store of the old 'whole' record layout; "
                             f"convert it with `{token_store.convert_command(out)}`, or use another --out")
        if diff:
            raise StoreError(f"--out {out} holds a token store made with another configuration (differs in: "
                             f"{', '.join(diff)}); use another --out or delete it")
        if meta.get("complete"):
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


# ---------------------------------------------------------------------------------------------
# Journals


def journal_path(out: Path, process_index: int) -> Path:
    return out / PROGRESS_DIR / f"process-{process_index:03d}.jsonl"


def append_journal(path: Path, entry: dict) -> None:
    """Append one line and make it durable before returning (the line commits a shard)."""
    line = json.dumps(entry, separators=(",", ":")) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_journal(path: Path, repair: bool = False) -> list[dict]:
    """Entries of a journal; a torn last line (the writer was killed mid-append) is ignored.

    repair=True (only for this process's own journal) also cuts the torn line off the file, so
    that the next append starts on a fresh line.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    entries, good_end, pos = [], 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # no newline: torn
        try:
            entries.append(json.loads(data[pos:nl]))
        except json.JSONDecodeError:
            break  # only the last line can be torn; stop there
        good_end = pos = nl + 1
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
    return entries


def read_all_journals(out: Path) -> list[dict]:
    entries = []
    for path in sorted((out / PROGRESS_DIR).glob("process-*.jsonl")):
        entries.extend(read_journal(path))
    return entries


@dataclasses.dataclass
class JournalSummary:
    ok: dict[str, tuple[int, int]]  # video_id -> (frames, records)
    failed: dict[str, tuple[str, str]]  # video_id -> (path, reason)
    shards: list[str]  # relative to the store

    def counts(self) -> StoreCounts:
        return StoreCounts(videos_ok=len(self.ok), videos_failed=len(self.failed),
                           frames=sum(f for f, _ in self.ok.values()), records=sum(r for _, r in self.ok.values()))

    def done_ids(self) -> set[str]:
        return set(self.ok) | set(self.failed)


def summarize(entries: Sequence[dict]) -> JournalSummary:
    """Merge journal entries; a video recorded twice means the store is broken (StoreError)."""
    ok: dict[str, tuple[int, int]] = {}
    failed: dict[str, tuple[str, str]] = {}
    shards = []
    for entry in entries:
        if entry.get("shard"):
            shards.append(entry["shard"])
        for vid, frames, records in entry.get("videos", []):
            if vid in ok or vid in failed:
                raise StoreError(f"video {vid!r} is recorded twice in the journals (shard {entry.get('shard')})")
            ok[vid] = (int(frames), int(records))
        for vid, path, reason in entry.get("failed", []):
            if vid in ok or vid in failed:
                raise StoreError(f"video {vid!r} is recorded twice in the journals")
            failed[vid] = (path, reason)
    return JournalSummary(ok, failed, shards)


def _shard_name(process_index: int, seq: int) -> str:
    return f"{token_store.SHARDS_DIR}/p{process_index:03d}-{seq:06d}{SHARD_SUFFIX}"


_SHARD_RE = re.compile(r"p(\d{3})-(\d{6})" + re.escape(SHARD_SUFFIX) + "$")


def remove_unlisted_shards(out: Path, listed: set[str], process_index: int | None) -> list[str]:
    """Delete shard files no journal lists (cut short by a kill): this process's own, or all (None)."""
    removed = []
    for path in sorted((out / token_store.SHARDS_DIR).glob("*" + SHARD_SUFFIX)):
        rel = f"{token_store.SHARDS_DIR}/{path.name}"
        m = _SHARD_RE.match(path.name)
        mine = process_index is None or (m is not None and int(m.group(1)) == process_index)
        if mine and rel not in listed:
            path.unlink(missing_ok=True)  # another finishing host may have removed it already
            removed.append(rel)
    return removed


# ---------------------------------------------------------------------------------------------
# Batching frames of many videos


class FrameBatcher:
    """Packs the frames of many videos into full device batches and hands back each video's tokens
    once all its frames have come back.

    encode_async(frames uint8 [B, S, S, 3]) must return an object whose .result() gives int [B, h, w]
    (`Tokenizer.encode_tokens_async`). Up to `depth` batches are in flight: the host cuts the next
    batch while the devices run the previous one. A video may span batches.
    """

    def __init__(self, encode_async: Callable[[np.ndarray], Any], batch_size: int, token_hw: tuple[int, int],
                 depth: int = 2):
        self.encode_async = encode_async
        self.batch_size = batch_size
        self.token_hw = token_hw
        self.depth = depth
        self._queue: deque[list] = deque()  # [key, frames, next row to send]
        self._queued = 0
        self._inflight: deque[tuple[Any, list[tuple[Any, int, int]]]] = deque()
        self._outputs: dict[Any, list] = {}  # key -> [int16 tokens [F, h, w], rows still missing]

    def add(self, key, frames: np.ndarray) -> list[tuple[Any, np.ndarray]]:
        """Queue one video's frames [F, S, S, 3]; returns the videos finished meanwhile: [(key, tokens int16 [F, h, w])]."""
        n = len(frames)
        self._outputs[key] = [np.empty((n, *self.token_hw), np.int16), n]
        if n == 0:
            return [(key, self._outputs.pop(key)[0])]
        self._queue.append([key, frames, 0])
        self._queued += n
        done = []
        while self._queued >= self.batch_size:
            done += self._dispatch(self.batch_size)
        return done

    def flush(self) -> list[tuple[Any, np.ndarray]]:
        """Send the last, short batch and wait for everything."""
        done = self._dispatch(self._queued) if self._queued else []
        while self._inflight:
            done += self._retire()
        return done

    def _dispatch(self, n: int) -> list[tuple[Any, np.ndarray]]:
        parts, segments = [], []
        while n > 0:
            entry = self._queue[0]
            key, frames, start = entry
            take = min(n, len(frames) - start)
            parts.append(frames[start:start + take])
            segments.append((key, start, take))
            entry[2] += take
            n -= take
            self._queued -= take
            if entry[2] == len(frames):
                self._queue.popleft()
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._inflight.append((self.encode_async(batch), segments))
        done = []
        while len(self._inflight) > self.depth:
            done += self._retire()
        return done

    def _retire(self) -> list[tuple[Any, np.ndarray]]:
        pending, segments = self._inflight.popleft()
        tokens = pending.result()
        done, offset = [], 0
        for key, start, count in segments:
            out = self._outputs[key]
            out[0][start:start + count] = tokens[offset:offset + count]
            offset += count
            out[1] -= count
            if out[1] == 0:
                done.append((key, self._outputs.pop(key)[0]))
        return done


# ---------------------------------------------------------------------------------------------
# Writing shards


def _crash_hook() -> tuple[str, int] | None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    what, _, n = spec.partition(":")
    return what, int(n)


class ShardWriter:
    """Writes whole videos into ArrayRecord shards of `shard_size` videos and journals each closed shard."""

    def __init__(self, out: Path, process_index: int, shard_size: int, next_seq: int,
                 options: str = SHARD_OPTIONS):
        from array_record.python.array_record_module import ArrayRecordWriter

        self._writer_cls = ArrayRecordWriter
        self.out = out
        self.process_index = process_index
        self.shard_size = shard_size
        self.options = options
        self.seq = next_seq
        self.journal = journal_path(out, process_index)
        self._writer = None
        self._name: str | None = None
        self._videos: list[list] = []
        self._failed: list[list] = []
        self._writes = self._commits = 0
        self._crash = _crash_hook()

    def add_video(self, item: annotations.VideoItem, records: Sequence[Sequence[bytes]], frames: int) -> None:
        """records: per (video, variant) its records (header and chunks), written consecutively."""
        if self._writer is None:
            self._name = _shard_name(self.process_index, self.seq)
            self._writer = self._writer_cls(str(self.out / self._name), self.options)
        for group in records:
            for record in group:
                self._writer.write(record)
        self._videos.append([item.video_id, int(frames), len(records)])
        self._writes += 1
        if self._crash == ("write", self._writes):
            os.kill(os.getpid(), signal.SIGKILL)
        if len(self._videos) >= self.shard_size:
            self.commit()

    def add_failure(self, item: annotations.VideoItem, reason: str) -> None:
        # Journaled with the next commit: a kill before that only means decoding it again.
        self._failed.append([item.video_id, item.path, reason])

    def commit(self) -> None:
        """Close the open shard (if any) and journal it with the failures since the last commit."""
        if self._writer is None and not self._failed:
            return
        shard = None
        if self._writer is not None:
            self._writer.close()
            with open(self.out / self._name, "rb") as f:
                os.fsync(f.fileno())  # the shard's bytes are durable before the journal names it
            shard, self._writer = self._name, None
            self.seq += 1
        append_journal(self.journal, {"shard": shard, "videos": self._videos, "failed": self._failed})
        self._videos, self._failed = [], []
        self._commits += 1
        if self._crash == ("commit", self._commits):
            os.kill(os.getpid(), signal.SIGKILL)


def next_shard_seq(entries: Sequence[dict], process_index: int) -> int:
    seqs = [int(m.group(2)) for e in entries if e.get("shard")
            and (m := _SHARD_RE.search(e["shard"])) and int(m.group(1)) == process_index]
    return max(seqs, default=-1) + 1


# ---------------------------------------------------------------------------------------------
# Progress


def _fmt_seconds(s: float) -> str:
    if not np.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A throttled progress line on `stream`: videos done, failed, videos/s, frames/s, ETA."""

    def __init__(self, total: int, label: str, stream: TextIO, interval: float):
        self.total, self.label, self.stream, self.interval = total, label, stream, interval
        self.videos = self.failed = self.frames = 0
        self.start = self._last = time.monotonic()
        self._tty = getattr(stream, "isatty", lambda: False)()

    def update(self, videos: int = 0, failed: int = 0, frames: int = 0) -> None:
        self.videos += videos + failed
        self.failed += failed
        self.frames += frames
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def _print(self, now: float, end: str | None = None) -> None:
        dt = max(now - self.start, 1e-9)
        vps = self.videos / dt
        eta = (self.total - self.videos) / vps if vps > 0 else float("inf")
        line = (f"{self.label}: {self.videos}/{self.total} videos ({self.failed} failed), {vps:.2f} videos/s, "
                f"{self.frames / dt:.1f} frames/s, ETA {_fmt_seconds(eta)}")
        if end is None:
            end = "" if self._tty else "\n"
        self.stream.write(("\r" if self._tty else "") + line + end)
        self.stream.flush()

    def close(self) -> None:
        self._print(time.monotonic(), end="\n")


# ---------------------------------------------------------------------------------------------
# Finishing the store


def finalize_if_complete(out: Path, identity: dict, items: Sequence[annotations.VideoItem],
                         extra_meta: dict) -> StoreCounts | None:
    """If the journals account for every video, write errors.txt and then metadata.json
    (complete) and return the counts; else None. Safe to run from several processes at once:
    each writes the same shard list and counts, by atomic rename."""
    summary = summarize(read_all_journals(out))
    wanted = {it.video_id for it in items}
    done = summary.done_ids()
    if wanted - done:
        return None
    if done - wanted:  # cannot happen with the identity check; refuse to label such a store complete
        raise StoreError(f"{out}: the journals name videos that are not in the list, e.g. {sorted(done - wanted)[0]!r}")
    listed = sorted(summary.shards)
    remove_unlisted_shards(out, set(listed), None)
    errors = sorted(summary.failed.values())
    _write_text_atomic(out / token_store.ERRORS_FILE,
                       "".join(f"{path}\t{' '.join(reason.split())}\n" for path, reason in errors))
    counts = summary.counts()
    meta = {
        **identity,
        **extra_meta,
        "format": STORE_FORMAT,
        "format_version": STORE_VERSION,
        "complete": True,
        "counts": dataclasses.asdict(counts),
        "shards": listed,
        "errors_file": token_store.ERRORS_FILE,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json_atomic(out / token_store.METADATA_FILE, meta)  # last: it marks the store complete
    return counts


# ---------------------------------------------------------------------------------------------
# The job


def check_options(opts: TokenizeOptions) -> None:
    """Clear errors naming the flag, before anything is loaded."""
    if (opts.videos is None) == (opts.tfds is None):
        raise ValueError("give exactly one of --videos (video files) and --tfds (a prepared TFDS dataset)")
    if opts.tfds is None and (opts.tfds_data_dir is not None or opts.source_fps is not None):
        raise ValueError("--data-dir and --source-fps go with --tfds")
    if opts.tfds is not None and opts.video_root is not None:
        raise ValueError("--video-root goes with --videos, not --tfds")
    if opts.source_fps is not None and not opts.source_fps > 0:
        raise ValueError(f"--source-fps must be positive, got {opts.source_fps}")
    if not opts.fps > 0:
        raise ValueError(f"--fps must be positive, got {opts.fps}")
    if opts.size < 1:
        raise ValueError(f"--size must be positive, got {opts.size}")
    if opts.resize is not None and opts.resize < opts.size:
        raise ValueError(f"--resize ({opts.resize}) must be at least --size ({opts.size})")
    if opts.variants not in vd.VARIANT_SETS:
        raise ValueError(f"--variants must be one of {sorted(vd.VARIANT_SETS)}, got {opts.variants!r}")
    if opts.sampling not in vd.SAMPLING_RULES:
        raise ValueError(f"--sampling must be one of {vd.SAMPLING_RULES}, got {opts.sampling!r}")
    if opts.max_seconds is not None and not opts.max_seconds > 0:
        raise ValueError(f"--max-seconds must be positive, got {opts.max_seconds}")
    if opts.max_frames is not None and opts.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {opts.max_frames}")
    if opts.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {opts.shard_size}")
    if opts.chunk_frames < 1:
        raise ValueError(f"--chunk-frames must be >= 1, got {opts.chunk_frames}")
    if opts.workers is not None and opts.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {opts.workers}")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opts.batch_size}")
    _check_shard_options(opts.shard_options)
    if (opts.process_index is None) != (opts.process_count is None):
        raise ValueError("--process-index and --process-count go together")
    if opts.process_count is not None and not 0 <= opts.process_index < opts.process_count:
        raise ValueError(f"--process-index must be in [0, --process-count), got {opts.process_index} "
                         f"of {opts.process_count}")


def _check_shard_options(options: str) -> None:
    """ArrayRecord parses its options only when a writer opens: try one on a scratch file now."""
    import tempfile

    from array_record.python.array_record_module import ArrayRecordWriter

    with tempfile.TemporaryDirectory() as tmp:
        try:
            ArrayRecordWriter(os.path.join(tmp, "check" + SHARD_SUFFIX), options).close()
        except ValueError as e:
            raise ValueError(f"--shard-options {options!r}: {e}") from None


def _process_share(opts: TokenizeOptions) -> tuple[int, int]:
    if opts.process_count is not None:
        return opts.process_index, opts.process_count
    import jax

    return jax.process_index(), jax.process_count()


def tokenize_videos(opts: TokenizeOptions, *, log: TextIO = sys.stderr) -> TokenizeResult:
    """Run (or resume, or find finished) the job; see the module docstring. Raises ValueError /
    FileNotFoundError (StoreError, TokenizerLoadError) for bad input before any video is decoded."""
    import jax.numpy as jnp

    from vimpac_jax.tokenizer.interface import TokenizerLoadError, load_tokenizer

    check_options(opts)
    source = None
    if opts.tfds is not None:  # opened (dataset, features, frame rate checked) now, listed once the tokenizer loads
        from vimpac_jax.data.tfds_source import TfdsVideoSource

        source = TfdsVideoSource(opts.tfds, data_dir=opts.tfds_data_dir, source_fps=opts.source_fps, log=log)
    else:
        items, class_names = read_items(opts.videos, opts.video_root)
        if not items:
            raise ValueError(f"--videos {opts.videos}: no videos listed")
    variants = vd.variants_for(opts.variants, opts.size, opts.resize)
    try:
        tok = load_tokenizer(opts.tokenizer, dtype=jnp.dtype(opts.dtype), batch_size=opts.batch_size)
    except TokenizerLoadError as e:
        raise TokenizerLoadError(f"--tokenizer: {e}") from e
    if opts.size % tok.downsample:
        raise ValueError(f"--size {opts.size} is not a multiple of the tokenizer's downsampling ({tok.downsample})")
    if tok.vocab_size > 2 ** 15:
        raise ValueError(f"tokenizer vocabulary {tok.vocab_size} does not fit the store's int16 tokens")
    if source is not None:
        items, class_names = source.items(), source.class_names
        if not items:
            raise ValueError(f"--tfds {opts.tfds}: the split has no examples")
    identity = store_identity(tok.identity(), opts, variants, items)
    if source is not None:  # the frames sampled depend on it
        identity["source_fps"] = source.source_fps
    out = Path(opts.out)
    existing = check_out_dir(out, identity)
    if existing is not None:
        c = existing["counts"]
        print(f"tokenize: {out} is already a complete store of this configuration; nothing to do", file=log)
        return TokenizeResult(StoreCounts(c["videos_ok"], c["videos_failed"], c["frames"], c["records"]), True, 0)
    if source is None:
        check_video_root(items, opts.video_root)
    pi, pc = _process_share(opts)
    hw = tok.token_hw(opts.size, opts.size)
    # tokenizer_dir: where `vimpac predict` finds the tokenizer again (its identity is checked on load).
    extra_meta = {"token_shape": list(hw), "token_dtype": "int16", "class_names": class_names,
                  "tokenizer_dir": os.path.abspath(opts.tokenizer),
                  "source": os.path.abspath(opts.videos) if source is None else f"tfds:{opts.tfds}",
                  "process_count": pc, "shard_options": opts.shard_options,
                  "layout": token_store.CHUNKED_LAYOUT,
                  **({} if source is None else {"tfds": source.metadata()})}

    # One job per process share: a second `vimpac tokenize` on this --out and share would record
    # its videos twice in the journal (a lock that a killed job left is stale: io_utils).
    with io_utils.exclusive_lock(out / PROGRESS_DIR / f"process-{pi:03d}.lock",
                                 f"--out {out} (process share {pi} of {pc})"):
        return _tokenize_share(opts, tok, variants, hw, items, identity, extra_meta, out, pi, pc, source, log)


def _tokenize_share(opts: TokenizeOptions, tok, variants, hw, items, identity, extra_meta, out: Path, pi: int,
                    pc: int, source, log: TextIO) -> TokenizeResult:
    """The rest of `tokenize_videos`, holding this share's lock."""
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    config_path = out / PROGRESS_DIR / CONFIG_FILE
    if not config_path.is_file():
        _write_json_atomic(config_path, identity)  # several processes may race here: same content
    (out / token_store.SHARDS_DIR).mkdir(exist_ok=True)

    # Restart: trust the journals, drop this process's shards they do not name (cut by a kill).
    own = read_journal(journal_path(out, pi), repair=True)
    summary = summarize(read_all_journals(out))
    removed = remove_unlisted_shards(out, set(summary.shards), pi)
    if removed:
        print(f"tokenize: removed {len(removed)} unfinished shard(s) of an earlier run: {removed[:3]}", file=log)
    done = summary.done_ids()
    share = items[pi::pc]
    todo = [it for it in share if it.video_id not in done]
    if len(todo) < len(share):
        print(f"tokenize: resuming: {len(share) - len(todo)} of this process's {len(share)} videos are done",
              file=log)

    if todo:
        _run(opts, tok, variants, hw, todo, out, pi, next_shard_seq(own, pi),
             Progress(len(todo), f"tokenize[{pi}/{pc}]", log, opts.progress_interval),
             decode_many=vd.decode_many if source is None else source.decode_many)

    counts = finalize_if_complete(out, identity, items, extra_meta)
    if counts is not None:
        return TokenizeResult(counts, True, len(todo))
    left = len(items) - len(summarize(read_all_journals(out)).done_ids())
    print(f"tokenize: this process's share is done; {left} video(s) of other processes are not yet; "
          "the last process to finish marks the store complete", file=log)
    return TokenizeResult(summarize(read_all_journals(out)).counts(), False, len(todo))


def _run(opts: TokenizeOptions, tok, variants: Sequence[vd.Variant], hw: tuple[int, int],
         todo: Sequence[annotations.VideoItem], out: Path, process_index: int, next_seq: int,
         progress: Progress, decode_many: Callable = vd.decode_many) -> None:
    """decode_many: `video_decode.decode_many` or a source's equivalent (`TfdsVideoSource.decode_many`)."""
    workers = max(1, (os.cpu_count() or 2) - 1) if opts.workers is None else opts.workers
    writer = ShardWriter(out, process_index, opts.shard_size, next_seq, opts.shard_options)
    batcher = FrameBatcher(lambda b: tok.encode_tokens_async(b, checked=True), tok.batch_size, hw)
    n_var = len(variants)

    def write(index: int, tokens: np.ndarray) -> None:
        item = todo[index]
        per = len(tokens) // n_var  # every variant has the same frames (one decode, several crops)
        records = [token_store.encode_video_records(tokens[k * per:(k + 1) * per], video_id=item.video_id,
                                                    label=item.label, fps=opts.fps, variant=v.name,
                                                    chunk_frames=opts.chunk_frames)
                   for k, v in enumerate(variants)]
        writer.add_video(item, records, len(tokens))
        progress.update(videos=1, frames=len(tokens))

    try:
        results = decode_many([it.path for it in todo], opts.fps, variants, workers,
                                 max_seconds=opts.max_seconds, max_frames=opts.max_frames, sampling=opts.sampling)
        for index, _, result in results:
            if isinstance(result, vd.VideoDecodeError):
                writer.add_failure(todo[index], result.reason)
                progress.update(failed=1)
                continue
            frames = np.concatenate([result[v.name] for v in variants])  # [n_var·F, S, S, 3] uint8
            for key, tokens in batcher.add(index, frames):
                write(key, tokens)
        for key, tokens in batcher.flush():
            write(key, tokens)
        writer.commit()
    finally:
        progress.close()
