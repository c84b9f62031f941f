"""A profiler window in a training run: `config.train.profile_first_step` and `profile_steps`
(0: none, the default; defined in `configs/common.py`'s `train_config`).

Process 0 traces steps [first_step, first_step + steps) of the loop (step n being the n-th
update, as `metrics.jsonl` counts them: its data, dispatch and device work) with
`jax.profiler`, into the run's TensorBoard folder:

    W/tensorboard/plugins/profile/<time>/<host>.xplane.pb           TensorBoard's profile plugin
    W/tensorboard/plugins/profile/<time>/perfetto_trace.json.gz     https://ui.perfetto.dev

so `tensorboard --logdir W/tensorboard` shows the run's scalars and its profile together. As
big_vision's `startstop_prof` and MaxText's `profiler_steps`: a few steps after compilation and
warm-up, not the whole run. A run resumed inside the window traces what is left of it.

The loop does not wait for the devices between steps, so the window's end does: the trace
then holds the device work of its steps, not only their dispatch.
"""

from pathlib import Path

import jax


class ProfileWindow:
    """Starts the trace before step `first_step` and stops it after the window's last step (or
    where the loop ends first: `close`)."""

    def __init__(self, first_step: int, steps: int, log_dir):
        self.first_step, self.steps = first_step, steps
        self.log_dir = Path(log_dir)
        self.pending = steps > 0 and jax.process_index() == 0
        self.active = False

    def before_step(self, step: int) -> None:
        """Called before step `step` (counted from 1) reads its batch."""
        if self.pending and self.first_step <= step < self.first_step + self.steps:
            self.pending = False
            self.log_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.log_dir), create_perfetto_trace=True)
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        """Called once step `step` is dispatched, with what it returned."""
        if self.active and step >= self.first_step + self.steps - 1:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
