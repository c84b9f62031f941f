"""The per-process journals of a token store: the only record of which videos are done.

One line (JSON, flushed and fsynced) per closed shard: {"shard": name or null, "videos": [[id,
frames, records], ...], "failed": [[id, path, reason], ...]}. See `vimpac_jax.tokenize.job`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from vimpac_jax import io_utils
from vimpac_jax.data import token_store

PROGRESS_DIR = "progress"
_JOURNAL_RE = re.compile(r"process-(\d+)\.jsonl$")


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


def lock_path(out: Path, process_index: int) -> Path:
    """Held (`io_utils.exclusive_lock`) by the job that appends to that process's journal."""
    return out / PROGRESS_DIR / f"process-{process_index:03d}.lock"


def _journal_line(entry: dict) -> str:
    return json.dumps(entry, separators=(",", ":")) + "\n"


def rewrite_journal(path: Path, entries: Sequence[dict]) -> None:
    """Replace a journal by `entries` at once (atomic rename); its writer's lock must be held."""
    io_utils.write_text_atomic(path, "".join(map(_journal_line, entries)))


def append_journal(path: Path, entry: dict) -> None:
    """Append one line and make it durable before returning (the line commits a shard)."""
    line = _journal_line(entry)
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
    """Merge journal entries; a video recorded twice (`repair_duplicates` not run, or it could
    not take a journal's lock) is a StoreError."""
    ok: dict[str, tuple[int, int]] = {}
    failed: dict[str, tuple[str, str]] = {}
    shards = []
    for entry in entries:
        if entry.get("shard"):
            shards.append(entry["shard"])
        for vid, frames, records in entry.get("videos", []):
            if vid in ok or vid in failed:
                raise StoreError(f"video {vid!r} is recorded twice in the journals (shard {entry.get('shard')}); "
                                 f"{_RERUN}")
            ok[vid] = (int(frames), int(records))
        for vid, path, reason in entry.get("failed", []):
            if vid in ok or vid in failed:
                raise StoreError(f"video {vid!r} is recorded twice in the journals; {_RERUN}")
            failed[vid] = (path, reason)
    return JournalSummary(ok, failed, shards)


# ---------------------------------------------------------------------------------------------
# Videos recorded twice: two jobs wrote one store at once (two jobs of one share before the share
# locks existed, or jobs started with different --process-count). Their shards are whole and each
# journal line still commits its shard, so the store is repaired by dropping the later copies.

_RERUN = "run `vimpac tokenize` again with the same options to repair the journals"


@dataclasses.dataclass(frozen=True)
class _Line:
    journal: Path
    number: int  # 1-based line number in `journal`
    entry: dict

    def where(self, out: Path) -> str:
        return f"{self.journal.relative_to(out)} line {self.number}"


def _records(entry: dict) -> list[tuple[str, tuple]]:
    """[(video_id, what the line says of it)]: ("ok", frames, records) or ("failed",)."""
    return ([(vid, ("ok", int(frames), int(records))) for vid, frames, records in entry.get("videos", [])]
            + [(vid, ("failed",)) for vid, _, _ in entry.get("failed", [])])


def _describe(record: tuple) -> str:
    return "failed" if record[0] == "failed" else f"ok, {record[1]} frames, {record[2]} records"


@dataclasses.dataclass
class DuplicateRepair:
    """What `repair_duplicates` did: the videos that were recorded more than once, the journal
    lines it dropped ("progress/process-001.jsonl line 3") and the shard files it deleted."""

    videos: list[str]
    dropped: list[str]
    deleted_shards: list[str]
    skipped_journals: list[str]  # in use by a live job: left as they are


def plan_duplicates(out: Path) -> tuple[list[_Line], list[str]]:
    """The journal lines to drop so that every video is recorded once, and the videos concerned.

    Order of precedence: journals by name, lines in order; the first record of a video is kept.
    * Lines that name one shard with different contents: two writers wrote that file at once,
      so it holds neither line's records: every such line is dropped (their videos are done again).
      Lines repeated exactly (one shard, same videos): the first is kept.
    * A later line naming a video already recorded alike (same frames and records, or failed
      both times) is dropped whole, with its shard; its other videos are done again.
    * Records that disagree (ok and failed, or other frame counts: the runs did not make the same
      store) are a StoreError naming the video and both lines: no copy is preferred silently.
    """
    lines = [_Line(path, i + 1, entry)
             for path in sorted((out / PROGRESS_DIR).glob("process-*.jsonl"))
             for i, entry in enumerate(read_journal(path))]
    by_shard: dict[str, list[_Line]] = {}
    for line in lines:
        if line.entry.get("shard"):
            by_shard.setdefault(line.entry["shard"], []).append(line)
    drop: dict[int, _Line] = {}  # id(line) -> line
    for same in by_shard.values():
        if len(same) > 1:
            alike = len({json.dumps(line.entry, sort_keys=True) for line in same}) == 1
            drop.update((id(line), line) for line in (same[1:] if alike else same))
    seen: dict[str, tuple[_Line, tuple]] = {}
    for line in lines:
        if id(line) in drop:
            continue
        records = _records(line.entry)
        again = [(vid, rec) for vid, rec in records if vid in seen]
        for vid, rec in again:
            first, first_rec = seen[vid]
            if first_rec != rec:
                raise StoreError(
                    f"video {vid!r} is recorded twice in the journals of {out} with different results: "
                    f"{first.where(out)} ({_describe(first_rec)}, shard {first.entry.get('shard')}) and "
                    f"{line.where(out)} ({_describe(rec)}, shard {line.entry.get('shard')}); the runs did not "
                    "make the same store: delete the store (or the line you do not trust, and its shard)")
        if again:
            drop[id(line)] = line
        else:
            seen.update((vid, (line, rec)) for vid, rec in records)
    times = collections.Counter(vid for line in lines for vid, _ in _records(line.entry))
    return list(drop.values()), sorted(vid for vid, n in times.items() if n > 1)


def repair_duplicates(out: Path, own_index: int | None) -> DuplicateRepair | None:
    """Drop the journal lines `plan_duplicates` names (and the shards no kept line names); None
    when every video is recorded once.

    The caller holds the lock of its own journal (`own_index`); another journal is rewritten only
    under its lock, and one in use by a live job is left for that job to repair. Each journal is
    replaced atomically before any shard is deleted, so a kill in between leaves only unlisted
    shards, which a restart deletes.
    """
    drop, videos = plan_duplicates(out)
    if not drop:
        return None
    lines_by_journal: dict[Path, set[int]] = {}
    for line in drop:
        lines_by_journal.setdefault(line.journal, set()).add(line.number)
    repair = DuplicateRepair(videos, [], [], [])
    # A store marked complete meanwhile (by the other job) lists shards this repair may delete: it is
    # unfinished again until the journals are repaired and a finishing process writes it anew.
    (out / token_store.METADATA_FILE).unlink(missing_ok=True)
    with contextlib.ExitStack() as locks:
        for path, numbers in sorted(lines_by_journal.items()):
            index = int(_JOURNAL_RE.search(path.name).group(1))
            if index != own_index:
                try:
                    locks.enter_context(io_utils.exclusive_lock(lock_path(out, index), f"journal {path.name}"))
                except io_utils.InUseError as e:
                    repair.skipped_journals.append(str(e))
                    continue
            entries = read_journal(path)
            rewrite_journal(path, [e for i, e in enumerate(entries) if i + 1 not in numbers])
            repair.dropped += [f"{path.relative_to(out)} line {n}" for n in sorted(numbers)]
        listed = {e["shard"] for e in read_all_journals(out) if e.get("shard")}
        for line in drop:
            shard = line.entry.get("shard")
            if shard and shard not in listed and f"{line.journal.relative_to(out)} line {line.number}" in repair.dropped:
                (out / shard).unlink(missing_ok=True)
                if shard not in repair.deleted_shards:
                    repair.deleted_shards.append(shard)
    return repair
