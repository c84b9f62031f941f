"""The tokenize job's progress line."""

from __future__ import annotations

import time
from typing import TextIO

import numpy as np


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
