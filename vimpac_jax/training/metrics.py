"""Metrics of a run: TensorBoard event files and a JSONL log (the progress line: `vimpac_jax/progress.py`).

Only process 0 writes (the others get a writer that drops everything), so a multi-host run
has one set of files.
"""

import json
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import jax
import numpy as np


class MetricWriteError(RuntimeError):
    """Logs or metrics could not be written (a full disk, a lost mount): the run must stop."""


TENSORBOARD_DIR = "tensorboard"  # under the workdir: the event files, and the profile of `config.train.profile_steps`

# How long a write may go on after a stop signal (SIGTERM/SIGINT) before the run gives up on it:
# a healthy write returns in milliseconds; SLURM kills 30 s (its KillWait) after its SIGTERM.
BLOCKED_WRITE_GRACE_SECONDS = 10.0


class MetricWriter:
    """Scalars to TensorBoard (tensorboardX's event file format: no TensorFlow needed) and
    `metrics.jsonl`.

    Each `write` is done, flushed and fsynced before it returns, so a failed write (ENOSPC,
    EIO) raises `MetricWriteError` at the step it happens. (tensorboardX's `SummaryWriter`
    writes from a thread behind a bounded queue: when that thread dies on a full disk the
    queue fills and `add_scalar` blocks for ever.) The file writes run in one daemon thread
    while the caller waits in short slices, so the caller's signal handlers keep running
    during a write that never returns, and `stop_requested()` (a SIGTERM flag) turns such a
    write into a `MetricWriteError` after `BLOCKED_WRITE_GRACE_SECONDS`.
    """

    def __init__(self, workdir, *, enabled: Optional[bool] = None,
                 stop_requested: Callable[[], bool] = lambda: False):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._workdir = Path(workdir)
        self._stop_requested = stop_requested
        self._events = self._jsonl = None
        if self.enabled:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._serve, name="MetricWriter", daemon=True).start()
            self._call(self._open, self._workdir)

    def _open(self):
        from tensorboardX.event_file_writer import EventsWriter

        (self._workdir / TENSORBOARD_DIR).mkdir(parents=True, exist_ok=True)
        self._events = EventsWriter(str(self._workdir / TENSORBOARD_DIR / "events"))
        self._jsonl = open(self._workdir / "metrics.jsonl", "a")

    def _serve(self):
        while True:
            job, done, outcome = self._jobs.get()
            try:
                job()
            except BaseException as e:  # handed to the caller
                outcome.append(e)
            done.set()

    def _call(self, job: Callable[[], None], path: Path) -> None:
        """Runs `job` in the writer thread and waits for it (see the class docstring)."""
        done, outcome = threading.Event(), []
        self._jobs.put((job, done, outcome))
        stop_seen = None
        while not done.wait(0.2):
            if stop_seen is None and self._stop_requested():
                stop_seen = time.monotonic()
            if stop_seen is not None and time.monotonic() - stop_seen > BLOCKED_WRITE_GRACE_SECONDS:
                raise MetricWriteError(f"writing metrics to {path} did not return within "
                                       f"{BLOCKED_WRITE_GRACE_SECONDS:.0f} s of the stop signal "
                                       f"(a full or hung filesystem?)")
        if outcome:
            e = outcome[0]
            if isinstance(e, OSError):
                raise MetricWriteError(f"could not write metrics to {path}: {e.strerror or e}") from e
            raise e

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        record = {"step": int(step)}
        wall_time = time.time()
        events = []
        for name, value in scalars.items():
            value = float(np.asarray(value))
            record[f"{prefix}{name}"] = value
            events.append(event_pb2.Event(wall_time=wall_time, step=int(step), summary=scalar(f"{prefix}{name}", value)))

        def job():
            for event in events:
                self._events.write_event(event)
            self._events.flush()  # flush + fsync
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()

        self._call(job, self._workdir)

    def close(self) -> None:
        if self.enabled:
            self._call(lambda: (self._events.close(), self._jsonl.close()), self._workdir)
