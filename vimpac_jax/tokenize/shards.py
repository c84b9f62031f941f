"""Token store shards: ArrayRecord files of whole videos, written by `ShardWriter` and committed by a journal line."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Sequence
from pathlib import Path

from vimpac_jax.data import annotations, token_store
from vimpac_jax.tokenize import journal

# group_size:1 makes every record its own chunk, so a random read decodes one record, as grain
# reads them (ArrayRecord's default groups 65536 records per chunk, made for sequential reads).
SHARD_OPTIONS = "group_size:1"
SHARD_SUFFIX = ".array_record"
# Test hook only: "write:N" SIGKILLs this process right after the N-th video's records were written
# (its shard still open, not journaled); "commit:N" right after the N-th journal line.
CRASH_ENV = "VIMPAC_TOKENIZE_CRASH_AT"


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
        self.journal = journal.journal_path(out, process_index)
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
        journal.append_journal(self.journal, {"shard": shard, "videos": self._videos, "failed": self._failed})
        self._videos, self._failed = [], []
        self._commits += 1
        if self._crash == ("commit", self._commits):
            os.kill(os.getpid(), signal.SIGKILL)


def next_shard_seq(entries: Sequence[dict], process_index: int) -> int:
    seqs = [int(m.group(2)) for e in entries if e.get("shard")
            and (m := _SHARD_RE.search(e["shard"])) and int(m.group(1)) == process_index]
    return max(seqs, default=-1) + 1


def check_shard_options(options: str) -> None:
    """ArrayRecord parses its options only when a writer opens: try one on a scratch file now."""
    import tempfile

    from array_record.python.array_record_module import ArrayRecordWriter

    with tempfile.TemporaryDirectory() as tmp:
        try:
            ArrayRecordWriter(os.path.join(tmp, "check" + SHARD_SUFFIX), options).close()
        except ValueError as e:
            raise ValueError(f"--shard-options {options!r}: {e}") from None
