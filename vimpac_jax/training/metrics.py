"""Metrics and progress of long jobs: TensorBoard event files, a JSONL log, a progress line.

Only process 0 writes (the others get a writer that drops everything), so a multi-host run
has one set of files.
"""

import json
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

import jax
import numpy as np


class MetricWriter:
    """Scalars to TensorBoard (tensorboardX: no TensorFlow needed) and `metrics.jsonl`."""

    def __init__(self, workdir, *, enabled: Optional[bool] = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            Path(workdir).mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            value = float(np.asarray(value))
            record[f"{prefix}{name}"] = value
            self._tb.add_scalar(f"{prefix}{name}", value, int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


class Progress:
    """A throttled progress line: step/total, loss, steps/s, items/s, ETA (stderr, process 0)."""

    def __init__(self, total_steps: int, *, items_per_step: int, items_name: str = "clips", start_step: int = 0,
                 every_seconds: float = 5.0, stream=None):
        self.total, self.items_per_step, self.items_name = total_steps, items_per_step, items_name
        self.every = every_seconds
        self.stream = stream or sys.stderr
        self.enabled = jax.process_index() == 0
        self._t0 = self._last = time.monotonic()
        self._step0 = start_step
        self._last_step = start_step

    def rates(self, step: int) -> tuple[float, float]:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        steps_per_s = (step - self._step0) / elapsed
        return steps_per_s, steps_per_s * self.items_per_step

    def update(self, step: int, loss: Optional[float] = None, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.every):
            return
        self._last = now
        steps_per_s, items_per_s = self.rates(step)
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("inf")
        loss_text = "" if loss is None else f" loss={loss:.4f}"
        print(f"step {step}/{self.total}{loss_text} {steps_per_s:.2f} steps/s {items_per_s:.1f} {self.items_name}/s "
              f"ETA {format_seconds(eta)}", file=self.stream, flush=True)


def format_seconds(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
