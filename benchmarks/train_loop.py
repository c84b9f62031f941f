"""Steps/s of the training loop (`vimpac_jax/training/train.py`) against its bare step, at the same shapes.

Run as every process of one multi-process run (the loop's per-step costs that matter at pod
scale are the ones between hosts), e.g. two CPU "hosts" of one device each:

    launch/local.sh -n 2 --cpu-devices 1 -- python benchmarks/train_loop.py --out /tmp/loop

(one process works too). Each process:
  bare  the task's jitted step (`task.step`) on one global batch already on the devices, keys
        made beforehand, N steps dispatched back to back, then one `block_until_ready`; and the
        same with the loop's preemption check after every step, as it was (`bare+allgather`:
        `process_allgather` of the flag) and as it is (`bare+sync_point`: JAX's preemption sync
        point), the three alternating (--repeats times) in one process, so that a shared host's
        changing load falls on all three alike;
  loop  `train.train` itself in a fresh workdir (data iterator, global batch, step, metrics and
        progress at `train.log_every`, the preemption check), timed from the end of step W to
        the end of step W + N with the loop's `on_step` hook; W and W + N are log steps, where
        the loop waits for the devices, so the window holds N whole steps. Checkpoints are out
        of the window (`train.checkpoint_every` past its end).
The best of each variant's repeats is reported, with every run.
The config is `configs/pretrain.py:runlocal` on a generated token store unless --config says
otherwise; --set BLOCK.FIELD=VALUE overrides it (global batch, log_every, ...).

Process 0 prints one JSON line: steps/s of the loop and of each bare variant, loop / bare, the
shapes, the versions.
"""

import os
import sys

# Run as a script, sys.path[0] is benchmarks/, whose tokenize.py would shadow the standard
# library's `tokenize`; put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = _ROOT

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from vimpac_jax.runtime import distributed  # noqa: E402


# What the loop asks about preemption after each step, on several processes: before (an
# all-gather of the stop flag: a device collective and a blocking fetch) and now (JAX's
# preemption sync point: a lock in this process).
def _allgather_flag(step: int) -> bool:
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(0))))


def _sync_point(step: int) -> bool:
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)


PER_STEP_CHECKS = {"bare": None, "bare+allgather": _allgather_flag, "bare+sync_point": _sync_point}


def check_microseconds(calls: int) -> dict[str, float]:
    """Each per-step preemption check alone (no step in flight): microseconds per call."""
    import jax

    out = {}
    for name, check in PER_STEP_CHECKS.items():
        if check is None or (jax.process_count() == 1 and check is _allgather_flag):
            continue
        check(0)  # compiles the all-gather
        start = time.perf_counter()
        for step in range(1, calls + 1):
            check(step)
        out[name.split("+")[1]] = round(1e6 * (time.perf_counter() - start) / calls, 1)
    return out


def bare_steps_per_second(config, warmup: int, steps: int, repeats: int) -> dict[str, list[float]]:
    """The task's step alone, N steps on one batch dispatched back to back, and the same with
    each preemption check of `PER_STEP_CHECKS` after every step; the variants alternate."""
    import flax.linen as nn
    import jax
    from jax.experimental import multihost_utils

    from vimpac_jax.training import sharding as shd
    from vimpac_jax.tasks.registry import make_task

    rates = {name: [] for name in PER_STEP_CHECKS}
    with nn.logical_axis_rules(shd.logical_axis_rules(config.mesh)):
        mesh = shd.make_mesh(config.mesh)
        task = make_task(config, mesh, log=lambda message: None)
        init_key, step_key = jax.random.split(jax.random.key(int(config.seed)))
        state = task.init_state(init_key)
        batch = task.global_batch(next(task.iterator()))
        keys = [jax.random.fold_in(step_key, i) for i in range(warmup + steps)]
        if jax.process_count() > 1:
            multihost_utils.reached_preemption_sync_point(0)
        for i in range(warmup):
            state, metrics = task.step(state, batch, keys[i])
        jax.block_until_ready((state, metrics))
        step = 0
        for _ in range(repeats):
            for name, check in PER_STEP_CHECKS.items():
                if check is not None and jax.process_count() == 1:
                    continue
                start = time.perf_counter()
                for i in range(warmup, warmup + steps):
                    state, metrics = task.step(state, batch, keys[i])
                    step += 1
                    if check is not None:
                        check(step)
                jax.block_until_ready((state, metrics))
                rates[name].append(steps / (time.perf_counter() - start))
    return {name: r for name, r in rates.items() if r}


def loop_steps_per_second(config, workdir: Path, warmup: int, steps: int) -> float:
    """`train.train` in a fresh workdir, timed between the ends of steps `warmup` and `warmup + steps`."""
    from jax.experimental import multihost_utils

    from vimpac_jax.tasks.registry import make_task
    from vimpac_jax.training import train as train_lib

    import jax

    if jax.process_index() == 0 and workdir.exists():
        shutil.rmtree(workdir)
    multihost_utils.sync_global_devices(f"fresh {workdir}")
    marks = {}

    def on_step(step: int) -> None:
        if step in (warmup, warmup + steps):
            marks[step] = time.perf_counter()

    train_lib.train(config, workdir, make_task, stop_after=warmup + steps, on_step=on_step)
    return steps / (marks[warmup + steps] - marks[warmup])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the generated store and the runs' workdirs")
    p.add_argument("--config", default="configs/pretrain.py:runlocal")
    p.add_argument("--set", action="append", default=[], metavar="BLOCK.FIELD=VALUE", help="config overrides")
    p.add_argument("--warmup", type=int, default=20, help="steps before the timed window (a multiple of log_every)")
    p.add_argument("--steps", type=int, default=60, help="timed steps (a multiple of log_every)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--checks-only", type=int, default=0, metavar="CALLS",
                   help="only time each per-step preemption check alone, CALLS calls each (no model, no store)")
    a = p.parse_args(argv)
    distributed.maybe_initialize()

    import jax
    from jax.experimental import multihost_utils

    from vimpac_jax.config_utils import load_config
    from vimpac_jax.data.testing import write_test_store

    if a.checks_only:
        if jax.process_count() > 1:
            multihost_utils.reached_preemption_sync_point(0)
        checks = check_microseconds(a.checks_only)
        if jax.process_index() == 0:
            print(json.dumps(dict(check_microseconds_per_call=checks, calls=a.checks_only,
                                  processes=jax.process_count(), devices=jax.device_count(), jax=jax.__version__,
                                  date=datetime.date.today().isoformat())), flush=True)
        return 0
    out = Path(a.out).absolute()
    store = out / "store"
    if jax.process_index() == 0 and not (store / "metadata.json").is_file():
        shutil.rmtree(store, ignore_errors=True)
        write_test_store(store, [dict(video_id=f"v{i:03d}", num_frames=4 + i % 5) for i in range(256)],
                         grid=(4, 4), seed=0, chunk_frames=16)
    multihost_utils.sync_global_devices("store written")
    overrides = [f"--config.data.train_store={store}", "--config.data.batch_size=8", "--config.train.log_every=20",
                 f"--config.train.num_steps={10 * (a.warmup + a.steps)}",
                 f"--config.optim.schedule_steps={10 * (a.warmup + a.steps)}",
                 f"--config.train.checkpoint_every={10 * (a.warmup + a.steps)}", "--config.train.progress_seconds=0"]
    config = load_config(["--config", a.config, *overrides, *[f"--config.{s}" for s in a.set]])
    log_every = int(config.train.log_every)
    if a.warmup % log_every or a.steps % log_every:
        raise SystemExit(f"--warmup {a.warmup} and --steps {a.steps} must be multiples of train.log_every={log_every}")

    bare = bare_steps_per_second(config, a.warmup, a.steps, a.repeats)
    loop = [loop_steps_per_second(config, out / f"run_{r}", a.warmup, a.steps) for r in range(a.repeats)]
    if jax.process_index() == 0:
        m = config.model
        print(json.dumps(dict(
            loop_steps_per_s=round(max(loop), 2), loop_runs=[round(x, 2) for x in loop],
            **{f"{name}_steps_per_s": round(max(r), 2) for name, r in bare.items()},
            **{f"{name}_runs": [round(x, 2) for x in r] for name, r in bare.items()},
            loop_over_bare=round(max(loop) / max(bare["bare"]), 3),
            processes=jax.process_count(), devices=jax.device_count(), backend=jax.default_backend(),
            global_batch=int(config.data.batch_size), log_every=log_every, warmup=a.warmup, steps=a.steps,
            model=dict(layers=int(m.num_layers), hidden_dim=int(m.hidden_dim), clip_len=int(m.clip_len),
                       grid=[int(m.height), int(m.width)]),
            config=a.config, overrides=a.set, jax=jax.__version__, python=platform.python_version(),
            machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
            date=datetime.date.today().isoformat())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
