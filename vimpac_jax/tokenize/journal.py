"""The per-process journals of a token store: the only record of which videos are done.

One line (JSON, flushed and fsynced) per closed shard: {"shard": name or null, "videos": [[id,
frames, records], ...], "failed": [[id, path, reason], ...]}. See `vimpac_jax.tokenize.job`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

PROGRESS_DIR = "progress"


class StoreError(ValueError):
    """--out holds something this run must not touch or extend (another config, inconsistency)."""



@dataclasses.dataclass(frozen=True)
class StoreCounts:
    videos_ok: int
    videos_failed: int
    frames: int
    records: int

    def line(self) -> str:
        return f"videos_ok={self.videos_ok} videos_failed={self.videos_failed} frames={self.frames}"



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
