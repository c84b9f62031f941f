"""Progress of long jobs: one throttled line with the count, its rates and an ETA.

    step 120/1000 loss=3.2104, 1.52 steps/s, 194.6 clips/s, ETA 0:09:38
    tokenize[0/1]: 300/9537 videos (2 failed), 4.10 videos/s, 61.5 frames/s, ETA 0:37:32
    evaluate 10 clips x 3 crops: 640/3783 videos, 5.21 videos/s, ETA 0:10:03

Used by training, `vimpac evaluate`, `vimpac predict`, `vimpac tokenize` and the sweeps. Lines go
through `logging` (logger `vimpac_jax.progress`, INFO; see `vimpac_jax/logs.py`) unless a stream
is given; on a terminal stream the line is redrawn in place (`\\r`). No JAX import here, so the
data layer can use it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Mapping, Optional, TextIO

log = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """Seconds -> 'H:MM:SS' ('27:46:40' past a day); '?' when unknown (inf, nan)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A throttled progress line of `done` out of `total` `unit`s.

    label:        text before the count ("step ", "tokenize[0/1]: ").
    unit:         what is counted ("steps", "videos"); shown after the count when `count_unit`.
    per_unit:     further rates as multiples of the count's ({"clips": 128}: 128 clips a step).
    counted:      further rates of amounts passed to `update` ("frames").
    failed:       show "(N failed)" after the count (failed items count as done).
    start:        the count this job starts at (a resumed run); rates and the ETA count from it.
    every_seconds: least time between two lines (`close` and `force` always print).
    stream:       None: the `vimpac_jax.progress` logger; else written there, in place on a tty.
    enabled:      False on the processes that should stay quiet (all but process 0).
    """

    def __init__(self, total: int, *, label: str = "", unit: str = "items", count_unit: bool = True,
                 per_unit: Optional[Mapping[str, float]] = None, counted: tuple[str, ...] = (), failed: bool = False,
                 start: int = 0, every_seconds: float = 5.0, stream: Optional[TextIO] = None, enabled: bool = True):
        self.total, self.label, self.unit, self.count_unit = int(total), label, unit, count_unit
        self.per_unit = dict(per_unit or {})
        self.counts = {name: 0 for name in counted}
        self.show_failed, self.failed = failed, 0
        self.start = self.done = int(start)
        self.every, self.stream, self.enabled = float(every_seconds), stream, enabled
        self.note = ""
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._t0 = self._last = time.monotonic()

    def update(self, done: Optional[int] = None, *, add: int = 0, failed: int = 0, note: Optional[str] = None,
               force: bool = False, **counts: float) -> None:
        """Set the count (`done`) or add to it (`add`; `failed` ones are added too), add to the
        `counted` amounts, set the note ("loss=3.2104"); print when due or `force`d."""
        self.done = (self.done if done is None else int(done)) + int(add) + int(failed)
        self.failed += int(failed)
        for name, value in counts.items():
            if name not in self.counts:
                raise KeyError(f"{name!r} is not one of this progress line's counted amounts {sorted(self.counts)}")
            self.counts[name] += value
        if note is not None:
            self.note = note
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            self._emit(self.line(now), final=False)

    def rate(self, now: Optional[float] = None) -> float:
        """Units per second since the start."""
        elapsed = max((time.monotonic() if now is None else now) - self._t0, 1e-9)
        return (self.done - self.start) / elapsed

    def eta_seconds(self, now: Optional[float] = None) -> float:
        rate = self.rate(now)
        return (self.total - self.done) / rate if rate > 0 else math.inf

    def line(self, now: Optional[float] = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._t0, 1e-9)
        rate = self.rate(now)
        head = f"{self.label}{self.done}/{self.total}" + (f" {self.unit}" if self.count_unit else "")
        if self.show_failed:
            head += f" ({self.failed} failed)"
        if self.note:
            head += f" {self.note}"
        parts = [head, f"{rate:.2f} {self.unit}/s"]
        parts += [f"{rate * k:.1f} {name}/s" for name, k in self.per_unit.items()]
        parts += [f"{value / elapsed:.1f} {name}/s" for name, value in self.counts.items()]
        parts.append(f"ETA {format_seconds(self.eta_seconds(now))}")
        return ", ".join(parts)

    def close(self) -> None:
        """The final line (ends the in-place line on a terminal)."""
        self._emit(self.line(), final=True)

    def _emit(self, line: str, *, final: bool) -> None:
        if not self.enabled:
            return
        if self.stream is None:
            log.info(line)
            return
        if self._tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
