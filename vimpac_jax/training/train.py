"""The training program shared by every task: `vimpac train --config C --workdir W`.

    config -> checks -> mesh -> task (data, state, step) -> restore or initialise
      -> loop: next batch -> step -> metrics / progress -> checkpoint -> evaluation
      -> final checkpoint and evaluation

Exact resume: a checkpoint holds the train state, the data iterator's state and the step; the
step's key is fold_in(seed key, step). A run restarted in the same workdir therefore computes
what an uninterrupted run would have. SIGTERM (a preempted VM, a cancelled SLURM job) or SIGINT
makes the loop save at the next step (with several processes: the step they agree on,
`_Preemption`) and return {"preempted": True} (`vimpac train` exits exit_codes.PREEMPTED).
Between log, checkpoint and evaluation steps the loop does not wait for the devices
(docs/architecture.md: "Where the loop waits for the devices"). A log or metrics write that
fails ends the run with `MetricWriteError`, a checkpoint save that fails (a full disk) with
`checkpointing.CheckpointSaveError`.
A non-finite loss stops the run naming the step; checkpoints are only saved after a finite loss,
with a checksum of every array that a restore checks (`checkpointing.py`), so a checkpoint
damaged on disk is skipped rather than restored into a NaN.

The run directory's layout, its config check and the run identity checked on resume are
`training/workdir.py`'s; config.json is written only once every check of the run has passed.
"""

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vimpac_jax import config_schema, exit_codes, io_utils
from vimpac_jax.progress import Progress
from vimpac_jax.training import checkpointing
from vimpac_jax.training import workdir as workdir_lib
from vimpac_jax.training import sharding as shd
from vimpac_jax.training.metrics import TENSORBOARD_DIR, MetricWriter
from vimpac_jax.training.profiling import ProfileWindow

def exit_code(result: dict) -> int:
    """The exit code of a `train()` that returned (vimpac_jax/exit_codes.py)."""
    return exit_codes.PREEMPTED if result.get("preempted") else exit_codes.DONE


class NonFiniteLossError(RuntimeError):
    pass


class RunInterruptedError(RuntimeError):
    """A second stop signal: the run stops at once, without saving."""


class _Preemption:
    """Turns SIGTERM (a preempted VM, SLURM's time limit) and SIGINT (Ctrl-C) into a flag read at
    step boundaries, where the loop saves and returns (exit code exit_codes.PREEMPTED). A second signal raises
    `RunInterruptedError` wherever the program is.

    With several processes, each host sees the signal at its own moment (or alone); deciding
    alone, hosts would enter orbax's collective save at different steps and wait for each other
    for ever. They agree through JAX's preemption sync point instead
    (`multihost_utils.reached_preemption_sync_point`, the coordination service's protocol, as
    orbax's `CheckpointManager.reached_preemption` and MaxText use it): the host that got the
    signal announces it (`distributed.announce_preemption`), and every host stops at the step
    the protocol picks. Asking costs a lock in this process per step, no device collective and
    no wait for the devices, so the host keeps dispatching steps ahead of them.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, start_step: int):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        self._start_step = start_step
        self._announced = False

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no preemption handling
                break
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            # Every process's call counter starts at the run's first step, so a signal before
            # the first step agrees on a step that every process still reaches; raises if JAX's
            # preemption service is off (jax_enable_preemption_service).
            multihost_utils.reached_preemption_sync_point(self._start_step)
        return self

    def _handle(self, signum, frame):
        again = self.requested
        self.requested, self.signal_name = True, signal.Signals(signum).name
        if again:
            raise RunInterruptedError(f"{self.signal_name} a second time: stopped without saving a checkpoint")

    def agreed(self, step: int) -> bool:
        """Whether to stop after `step` (the number of steps done), the same answer on every
        process: a step of the protocol's choosing once any process got a signal."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        from vimpac_jax.runtime.distributed import announce_preemption

        if self.requested and not self._announced:
            self._announced = announce_preemption()
        return multihost_utils.reached_preemption_sync_point(step)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _log(message: str) -> None:
    if jax.process_index() == 0:
        logging.getLogger(__name__).info(message)


# What the loop is handed to build its task: `make_task(config, mesh, log=...) -> Task`, the
# interface of `vimpac_jax/tasks/protocol.py`. The caller picks it (`tasks.registry.make_task`,
# the map from `config.task` to a task class): tasks sit above `training/`, which imports none.
TaskFactory = Callable[..., Any]


def train(config: ml_collections.ConfigDict, workdir, make_task: TaskFactory, *, stop_after: Optional[int] = None,
          on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Run (or resume) training in `workdir`; returns the final metrics and evaluation.

    make_task: builds the run's task from (config, mesh, log=), after the workdir's checks
    (`vimpac_jax.tasks.registry.make_task` for `config.task`); stop_after: return after this
    many steps in this call (tests of interruption); on_step: a hook called after each step with
    the step number.
    """
    workdir = Path(workdir)
    # Completed and checked, before anything is locked, read or compiled (a config built in Python;
    # `config_utils.load_config` has resolved a loaded one already: then this changes nothing).
    config_schema.resolve(config)
    # Multi-host: every process must run the same config; checked before anything compiles.
    from vimpac_jax.runtime.distributed import check_same_config
    check_same_config(config)
    # One run per workdir: a second one would delete the first one's in-flight checkpoints.
    lock = (io_utils.exclusive_lock(workdir / workdir_lib.LOCK_FILE, f"workdir {workdir}") if jax.process_index() == 0
            else contextlib.nullcontext())
    # The run's logical-axis rules (config.mesh.logical_axis_rules; checked here, before anything
    # compiles) are the active ones for every sharding computed below (sharding.active_rules).
    rules = shd.logical_axis_rules(config.mesh)
    with lock, nn.logical_axis_rules(rules):
        return _train_locked(config, workdir, make_task, stop_after=stop_after, on_step=on_step)


def _train_locked(config: ml_collections.ConfigDict, workdir: Path, make_task: TaskFactory, *,
                  stop_after: Optional[int], on_step: Optional[Callable[[int], None]]) -> dict[str, Any]:
    # Every check before config.json is written: a rejected config must not claim the workdir.
    workdir_lib.check_config(workdir, config)
    mesh = shd.make_mesh(config.mesh)
    task = make_task(config, mesh, log=_log)  # reads the data indexes and checks shapes: fails before compiling
    task.workdir = workdir
    total = task.total_steps
    identity = workdir_lib.run_identity(config)
    manager = checkpointing.make_manager(workdir, save_every=int(config.train.checkpoint_every),
                                         keep=int(config.train.keep_checkpoints))
    base_key = jax.random.key(int(config.seed))
    init_key, step_key_base = jax.random.split(base_key)

    data_iter = task.iterator()
    state = task.init_state(init_key)  # the task's last checks (init_from shapes, the schedule's length)
    restored = workdir_lib.restore_state(manager, checkpointing.abstract_like(state), data_iter, identity, log=_log)
    start = 0
    if restored is not None:
        start, state, _ = restored
        _log(f"resumed from {workdir}/checkpoints/{start} (step {start} of {total})")
    workdir_lib.write_config(workdir, config)
    preemption = _Preemption(start)
    profile = ProfileWindow(int(config.train.profile_first_step), int(config.train.profile_steps),
                            workdir / TENSORBOARD_DIR)
    writer = MetricWriter(workdir, stop_requested=lambda: preemption.requested)
    progress = Progress(total, label="step ", unit="steps", count_unit=False,
                        per_unit={getattr(task, "items_name", "clips"): task.items_per_step}, start=start,
                        every_seconds=float(config.train.progress_seconds), enabled=jax.process_index() == 0)
    log_every = max(int(config.train.log_every), 1)
    last_metrics: dict[str, float] = {}
    window_start, window_step = time.monotonic(), start
    meta = {"total_steps": total, **identity}
    saved = []  # steps saved by this process, each after a finite loss

    def kept_checkpoints() -> str:
        """What a non-finite loss leaves behind, saying only what is known to be good."""
        where = f"{workdir}/checkpoints"
        if saved:
            return (f"the checkpoint of step {saved[-1]} in {where} was saved after a finite loss (its arrays are "
                    f"checksummed, checked when restored)")
        if restored is None:
            return f"no checkpoint was saved before it in {where}"
        return (f"the run resumed from step {start}, whose checkpoint matched its checksums; a restart recomputes "
                f"the same steps")

    def finite_or_raise(step: int, metrics: dict) -> dict:
        values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(values[task.loss_name]):
            raise NonFiniteLossError(f"non-finite {task.loss_name}={values[task.loss_name]} at step {step}; "
                                     f"{kept_checkpoints()}")
        return values

    def save(step: int, force: bool) -> None:
        if checkpointing.save(manager, step, state, data_iter, dict(meta, step=step), force=force):
            saved.append(step)

    step = start
    with preemption:
        try:
            while step < total:
                profile.before_step(step + 1)
                batch = task.global_batch(next(data_iter))
                state, metrics = task.step(state, batch, jax.random.fold_in(step_key_base, step))
                step += 1
                profile.after_step(step, (state, metrics))
                must_save = step % int(config.train.checkpoint_every) == 0 or step == total
                if step % log_every == 0 or must_save or step == total:
                    last_metrics = finite_or_raise(step, metrics)
                    now = time.monotonic()
                    rate = (step - window_step) / max(now - window_start, 1e-9)
                    window_start, window_step = now, step
                    writer.write(step, dict(last_metrics, steps_per_second=rate,
                                            items_per_second=rate * task.items_per_step), prefix="train/")
                loss = last_metrics.get(task.loss_name)
                progress.update(step, note=None if loss is None else f"loss={loss:.4f}", force=step == total)
                if must_save:
                    save(step, force=step == total)
                if step < total and task.evaluation_due(step):
                    writer.write(step, task.evaluate(state, step=step), prefix="eval/")
                if on_step is not None:
                    on_step(step)
                if preemption.agreed(step):  # the same step on every process: the save is collective
                    if not must_save:
                        last_metrics = finite_or_raise(step, metrics)
                        save(step, force=True)
                    checkpointing.wait_until_finished(manager)
                    _log(f"{preemption.signal_name or 'another process got a stop signal'}: saved the checkpoint of step {step} in {workdir}/checkpoints; exiting")
                    return {"preempted": True, "step": step, **last_metrics}
                if stop_after is not None and step - start >= stop_after:
                    checkpointing.wait_until_finished(manager)
                    return {"stopped": True, "step": step, **last_metrics}
        except BaseException:
            with contextlib.suppress(checkpointing.CheckpointSaveError):  # the error in flight is the one to report
                checkpointing.wait_until_finished(manager)
            raise
        finally:
            profile.close()
        checkpointing.wait_until_finished(manager)
    final = task.evaluate(state, full=True)
    scalars = {k: v for k, v in final.items() if isinstance(v, (int, float))}
    writer.write(step, scalars, prefix="eval/")
    writer.close()
    if final and jax.process_index() == 0:
        write_eval_results(workdir, final)
    return {"step": step, **last_metrics, **{f"eval_{k}": v for k, v in scalars.items()}}


def write_eval_results(workdir: Path, result: dict) -> None:
    """eval_results.json (scores, per-class accuracy) and predictions.csv (one row per video)."""
    predictions = result.get("predictions")
    summary = {k: v for k, v in result.items() if k != "predictions"}
    io_utils.write_json_atomic(workdir / "eval_results.json", summary, indent=2)
    if predictions:
        lines = ["video_id,label,prediction,score"] + [
            f"{p['video_id']},{p['label']},{p['prediction']},{p['score']:.6f}" for p in predictions]
        io_utils.write_text_atomic(workdir / "predictions.csv", "\n".join(lines) + "\n")
