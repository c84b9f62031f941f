"""Multi-process training for real: 2 processes x 4 CPU devices against 1 process x 8 devices.

Both runs are `vimpac train` (runlocal pre-training config, global batch 8) on the same token
store: the 1-process run in this process on conftest's 8 CPU devices, the 2-process run in two
processes formed by jax.distributed with a coordinator on 127.0.0.1 and JAX's CPU collectives
(gloo). The 2-process run is stopped by a SIGTERM to one of its processes: both must stop at the
same step, and up to it they must log the same losses and save the same parameters as the
1-process run. The data split is checked on the real pipeline: each process's share is disjoint
from the other's, and together they are the 1-process global batch. Misconfigured launches must
fail, not hang."""

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, run_vimpac, xla_flags_with_cpu_devices
from vimpac_jax.data.testing import write_test_store

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
RUN_TIMEOUT = 240  # a hung collective must fail the test, not stall CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIMPAC_", "SLURM_", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags_with_cpu_devices(devices),
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO), **extra)
    return env


def start(args, env) -> subprocess.Popen:
    return run_vimpac(*args, env=env, background=True)


def finish(procs) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=RUN_TIMEOUT)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def run_processes(args, num_processes: int, devices: int, **extra) -> list[tuple[int, str, str]]:
    coordinator = f"127.0.0.1:{free_port()}"
    return finish([start(args, cpu_env(devices, VIMPAC_COORDINATOR=coordinator, VIMPAC_NUM_PROCESSES=str(num_processes),
                                       VIMPAC_PROCESS_ID=str(i), **extra))
                   for i in range(num_processes)])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    videos = [dict(video_id=f"v{i:02d}", num_frames=4 + i % 5) for i in range(16)]
    write_test_store(root / "random", videos, grid=(4, 4), seed=0)
    write_test_store(root / "marked", videos, grid=(4, 4), seed=0, pattern="frame_index")
    return root


def train_args(store, workdir, *extra):
    """The runs of this file. The constant schedule lets the preempted run go past runlocal's
    100-update schedule; its first 5 updates are the same warm-up as runlocal's linear schedule
    (optimizer.make_schedule), so the runs train as with runlocal's own schedule, and the learning
    rate of a step does not depend on num_steps (the 1-process run of as many steps as the
    preempted run made compares with it step by step)."""
    return ["train", "--config", "configs/pretrain.py:runlocal", f"--config.data.train_store={store}",
            f"--config.train.num_steps={STEPS}", "--config.data.batch_size=8", "--config.train.log_every=1",
            "--config.train.checkpoint_every=2", "--config.optim.schedule=constant", "--workdir", workdir, *extra]


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/total_loss"] for r in rows if "train/total_loss" in r}


def final_params(workdir):
    """(step, params) of the latest checkpoint, restored onto this process's first device (the
    checkpoint was written by another topology, so orbax needs an explicit target)."""
    import jax
    import orbax.checkpoint as ocp

    directory = Path(workdir).absolute() / "checkpoints"
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    metadata = ocp.StandardCheckpointer().metadata(directory / str(step) / "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          getattr(metadata, "item_metadata", metadata))
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    return step, state["params"]


def check_ok(results):
    for i, (rc, _, stderr) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{stderr[-3000:]}"


@pytest.fixture(scope="module")
def preempted_pair(stores, tmp_path_factory):
    """ONE 2-process run (2 x 4 devices) for both tests below: it trains until 3 steps are logged,
    then only the second process gets SIGTERM (SLURM or a TPU maintenance event may signal one host
    first). -> (workdir, [(returncode, stdout, stderr)] of the processes). Its steps are compared
    with a 1-process run of as many steps (`test_two_processes_match_one`), so a second 2-process
    run (the slowest program of the suite: each process compiles it) is not needed."""
    import signal
    import time

    coordinator, workdir = f"127.0.0.1:{free_port()}", tmp_path_factory.mktemp("pair") / "two"
    args = train_args(stores / "random", workdir, "--config.train.num_steps=100000")
    procs = [start(args, cpu_env(4, VIMPAC_COORDINATOR=coordinator, VIMPAC_NUM_PROCESSES="2",
                                 VIMPAC_PROCESS_ID=str(i))) for i in range(2)]
    deadline = time.monotonic() + 2 * RUN_TIMEOUT  # compiling, then 3 steps
    try:
        while not ((workdir / "metrics.jsonl").is_file()
                   and len((workdir / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "no steps logged"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # only the second host hears it
    finally:
        results = finish(procs)  # (kills them after RUN_TIMEOUT)
    return workdir, results


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(preempted_pair):
    """Every process must still save (orbax's save is collective) and stop at one agreed step,
    exiting PREEMPTED."""
    from vimpac_jax import exit_codes

    workdir, results = preempted_pair
    for i, (rc, stdout, stderr) in enumerate(results):
        assert rc == exit_codes.PREEMPTED, f"process {i} exited {rc}:\n{stderr[-3000:]}"
    steps = [json.loads(stdout.splitlines()[-1])["step"] for _, stdout, _ in results]
    assert steps[0] == steps[1] >= 3 and final_params(workdir)[0] == steps[0]


@pytest.mark.slow
def test_two_processes_match_one(stores, preempted_pair, tmp_path, capsys):
    """The 2-process run's steps (up to the agreed step) against this process's 8 devices."""
    import jax

    two, results = preempted_pair
    for i, (_, stdout, stderr) in enumerate(results):
        assert stdout.strip(), f"process {i} reported no result:\n{stderr[-3000:]}"
    # Only process 0 logs; both report the same final result on stdout.
    assert results[0][1].splitlines()[-1] == results[1][1].splitlines()[-1]
    steps = json.loads(results[0][1].splitlines()[-1])["step"]
    assert steps >= 3

    one = tmp_path / "one"
    assert jax.device_count() == 8  # conftest's devices: the 1-process run needs no process of its own
    code, _, err = run_cli(capsys, *train_args(stores / "random", one, f"--config.train.num_steps={steps}"))
    assert code == 0, err[-3000:]

    loss_one, loss_two = losses(one), losses(two)
    assert sorted(loss_one) == list(range(1, steps + 1)) and sorted(loss_two) == sorted(loss_one)
    assert len(set(loss_one.values())) > 1  # the losses move: the comparison below means something
    np.testing.assert_allclose([loss_two[s] for s in sorted(loss_two)], [loss_one[s] for s in sorted(loss_one)],
                               rtol=2e-5)

    assert_same_params(one, two, steps)


# Biases of Linear layers that feed a BatchNorm (the contrastive projection head): BatchNorm
# subtracts the batch mean, so their true gradient is zero; Adam divides the float noise left
# by sqrt(v) and moves them by about +-lr per step in a direction set by reduction order.
# They are not determined by the data, so no two topologies agree on them (see the report).
ZERO_GRADIENT = ("['proj_head']['linear_0']['bias']",)


def assert_same_params(one, two, steps):
    import jax

    step_one, params_one = final_params(one)
    step_two, params_two = final_params(two)
    assert step_one == step_two == steps
    leaves_one = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params_one)[0]}
    leaves_two = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params_two)[0]}
    assert sorted(leaves_one) == sorted(leaves_two)
    assert set(ZERO_GRADIENT) <= set(leaves_one)  # the exclusion names real parameters
    for name, a in leaves_one.items():
        if name in ZERO_GRADIENT:
            continue
        # Reduction order differs between 8 local devices and 2 x 4 over gloo: ~1e-6 differences.
        np.testing.assert_allclose(np.asarray(leaves_two[name]), np.asarray(a), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_each_process_reads_a_disjoint_share(stores):
    """The real pretrain pipeline at 2 processes x batch 4 vs 1 process x batch 8 ('frame_index'
    tokens carry each video's position at [f, 0, 2])."""
    from vimpac_jax.data import pipelines

    index = pipelines.load_index(stores / "marked", cache=False)

    def video_ids(batch):  # tokens [B, 2, T, h, w] -> the video position of each row
        return [int(v) for v in batch["tokens"][:, 0, 0, 0, 2]]

    def batches(pi, pc, batch_size, n=4):
        it = iter(pipelines.train_dataset(index, "pretrain", batch_size=batch_size, clip_len=3, seed=0,
                                          process_index=pi, process_count=pc))
        return [video_ids(next(it)) for _ in range(n)]

    whole = batches(0, 1, 8)
    shares = [batches(p, 2, 4) for p in range(2)]
    for b, global_ids in enumerate(whole):
        first, second = shares[0][b], shares[1][b]
        assert not set(first) & set(second), f"batch {b}: processes share videos {set(first) & set(second)}"
        assert sorted(first + second) == sorted(global_ids)
        # make_global_batch stacks the processes' rows in process order; the per-example masks
        # and keys follow the row, so the shares must be contiguous slices of the global batch.
        assert first + second == global_ids, (f"batch {b}: process shares {first} + {second} are not the "
                                              f"contiguous halves of the 1-process batch {global_ids}")
    # A 16-video epoch is two global batches: together they cover every video once.
    assert sorted(whole[0] + whole[1]) == list(range(16))


@pytest.mark.slow
def test_differing_config_fails_naming_the_process(stores, tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [start(train_args(stores / "random", tmp_path / "w", f"--config.seed={i}"),
                   cpu_env(2, VIMPAC_COORDINATOR=coordinator, VIMPAC_NUM_PROCESSES="2", VIMPAC_PROCESS_ID=str(i),
                           VIMPAC_INIT_TIMEOUT="60"))
             for i in range(2)]
    results = finish(procs)
    for rc, _, stderr in results:
        assert rc == 2, stderr[-2000:]
        assert "config differs between hosts: process 1 on" in stderr, stderr[-2000:]
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_unreachable_coordinator_fails_clearly(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"  # nobody listens there
    env = cpu_env(1, VIMPAC_COORDINATOR=coordinator, VIMPAC_NUM_PROCESSES="2", VIMPAC_PROCESS_ID="1",
                  VIMPAC_INIT_TIMEOUT="2")
    result = run_vimpac("train", "--config", "configs/pretrain.py:runlocal", "--workdir", tmp_path / "w", env=env,
                        timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot reach the coordinator {coordinator} within 2 s" in result.stderr


@pytest.mark.slow
def test_missing_processes_fail_with_a_named_timeout(tmp_path):
    """Process 0 of 2 alone: the run cannot form; JAX aborts after the timeout, after our message."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = cpu_env(1, VIMPAC_COORDINATOR=coordinator, VIMPAC_NUM_PROCESSES="2", VIMPAC_PROCESS_ID="0",
                  VIMPAC_INIT_TIMEOUT="3")
    result = run_vimpac("train", "--config", "configs/pretrain.py:runlocal", "--workdir", tmp_path / "w", env=env,
                        timeout=60)
    assert result.returncode != 0
    assert "did not form within 3 s" in result.stderr and f"coordinator {coordinator}" in result.stderr


@pytest.mark.parametrize("env, message", [
    ({"VIMPAC_COORDINATOR": "nohostport"}, "must be HOST:PORT"),
    ({"VIMPAC_COORDINATOR": "h:1"}, "VIMPAC_NUM_PROCESSES must be set"),
    ({"VIMPAC_COORDINATOR": "h:1", "VIMPAC_NUM_PROCESSES": "2", "VIMPAC_PROCESS_ID": "2"}, "VIMPAC_PROCESS_ID <"),
    ({"VIMPAC_INIT_TIMEOUT": "soon"}, "VIMPAC_INIT_TIMEOUT"),
])
def test_bad_settings_are_named(env, message):
    from vimpac_jax.runtime.distributed import DistributedSetupError, settings_from_env

    with pytest.raises(DistributedSetupError, match=message):
        settings_from_env(env)


def test_settings_sources():
    from vimpac_jax.runtime.distributed import settings_from_env

    assert settings_from_env({}) is None
    explicit = settings_from_env({"VIMPAC_COORDINATOR": "10.0.0.2:8476", "VIMPAC_NUM_PROCESSES": "4",
                                  "VIMPAC_PROCESS_ID": "3", "SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"})
    assert (explicit.source, explicit.coordinator, explicit.num_processes, explicit.process_id, explicit.timeout) == \
        ("env", "10.0.0.2:8476", 4, 3, 300)
    assert settings_from_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}).source == "slurm"
    assert settings_from_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert settings_from_env({"TPU_WORKER_HOSTNAMES": "a,b"}).source == "tpu"
