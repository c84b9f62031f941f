"""Faults around a training run: a full or hung disk under the metrics writer, stop signals,
exit codes, locks. In-process and without compiling where the fault allows it."""

import errno
import json
import os
import struct
import subprocess
import threading
import time
import uuid

import pytest

from vimpac_jax.training import metrics


def _in_thread(fn, timeout):
    """Runs fn() in a daemon thread; -> the exception it raised, or 'hung' after `timeout` s."""
    outcome = []

    def target():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else "hung"


def _write_many(writer, n=50):
    for step in range(n):
        writer.write(step, {"loss": 1.0, "accuracy": 0.5}, prefix="train/")


def test_enospc_from_the_event_writer_is_an_error_not_a_hang(tmp_path, monkeypatch):
    writer = metrics.MetricWriter(tmp_path, enabled=True)
    from tensorboardX import record_writer

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)
    outcome = _in_thread(lambda: _write_many(writer), timeout=20)
    assert isinstance(outcome, metrics.MetricWriteError), outcome
    assert "No space left on device" in str(outcome) and str(tmp_path) in str(outcome)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (root only); skipped where mounting is not allowed."""
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_really_full_disk_ends_the_writes_with_an_error(small_tmpfs):
    (small_tmpfs / "filler").write_bytes(b"\0" * 40_000)  # nearly full, as in the report
    writer = metrics.MetricWriter(small_tmpfs / "run", enabled=True)
    outcome = _in_thread(lambda: _write_many(writer, n=2000), timeout=30)
    assert isinstance(outcome, metrics.MetricWriteError), outcome
    assert "No space left on device" in str(outcome)


def test_a_write_that_never_returns_gives_up_after_a_stop_signal(tmp_path, monkeypatch):
    stop = threading.Event()
    writer = metrics.MetricWriter(tmp_path, enabled=True, stop_requested=stop.is_set)
    from tensorboardX import record_writer

    release = threading.Event()
    monkeypatch.setattr(record_writer.RecordWriter, "write", lambda self, data: release.wait())  # a hung mount
    monkeypatch.setattr(metrics, "BLOCKED_WRITE_GRACE_SECONDS", 0.5)
    threading.Timer(0.5, stop.set).start()
    start = time.monotonic()
    outcome = _in_thread(lambda: writer.write(1, {"loss": 1.0}), timeout=20)
    release.set()
    assert isinstance(outcome, metrics.MetricWriteError), outcome
    assert "did not return" in str(outcome) and time.monotonic() - start < 10


def test_healthy_writes_reach_both_files(tmp_path):
    writer = metrics.MetricWriter(tmp_path, enabled=True)
    _write_many(writer, n=3)
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["train/loss"] == 1.0
    from tensorboardX.proto import event_pb2

    (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    data, events = path.read_bytes(), []
    while data:  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
        (length,) = struct.unpack("Q", data[:8])
        events.append(event_pb2.Event.FromString(data[12:12 + length]))
        data = data[16 + length:]
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert [(s, v) for s, tag, v in scalars if tag == "train/accuracy"] == [(0, 0.5), (1, 0.5), (2, 0.5)]


def test_a_lock_left_by_a_killed_job_is_stale_and_taken_over(tmp_path):
    import signal
    import socket
    import sys

    from vimpac_jax.io_utils import InUseError, exclusive_lock

    lock = tmp_path / "w" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom vimpac_jax.io_utils import exclusive_lock\n"
                               f"with exclusive_lock({str(lock)!r}, 'w'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InUseError, match=f"in use by pid {holder.pid} on host {socket.gethostname()}"):
            with exclusive_lock(lock, "workdir w"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive_lock(lock, "workdir w"):  # the dead job's lock file is still there: stale
        assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]


def test_a_damaged_newest_checkpoint_falls_back_to_the_step_before(tmp_path):
    import jax.numpy as jnp
    import numpy as np

    from vimpac_jax.training import checkpointing

    manager = checkpointing.make_manager(tmp_path, save_every=1, keep=3)
    state = {"w": jnp.arange(4096, dtype=jnp.float32), "b": jnp.ones(3)}
    for step in (1, 2):
        checkpointing.save(manager, step, jax_tree_scale(state, step), None, {"step": step})
        manager.wait_until_finished()
    assert _truncate_array_files(tmp_path / "checkpoints" / "2")  # a full disk while copying, a lost tail
    warnings = []
    step, restored, meta = checkpointing.restore_latest(manager, checkpointing.abstract_like(state), None,
                                                        log=warnings.append)
    assert step == 1 and meta["step"] == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4096, dtype=np.float32))
    assert len(warnings) == 1 and "checkpoints/2 cannot be restored" in warnings[0] and "step 1" in warnings[0]

    assert _truncate_array_files(tmp_path / "checkpoints" / "1")  # now none restores: an error, no traceback
    with pytest.raises(checkpointing.CheckpointRestoreError, match="no checkpoint in .* can be restored"):
        checkpointing.restore_latest(manager, checkpointing.abstract_like(state), None, log=warnings.append)


def _truncate_array_files(step_dir):
    """Cuts the array data files (orbax's */d/<hash>) of a checkpoint step to 100 bytes."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    for p in files:
        p.write_bytes(p.read_bytes()[:100])
    return files


def jax_tree_scale(tree, factor):
    import jax

    return jax.tree.map(lambda x: x * factor, tree)


def _flip_a_bit_of_the_largest_data_file(step_dir):
    """One bit in the middle of the biggest array data file: zstd decodes it into other numbers
    (orbax itself restores it without an error)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    big = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0x10
    big.write_bytes(bytes(data))


def test_a_bit_flipped_checkpoint_fails_its_checksums_and_the_step_before_is_restored(tmp_path):
    import jax.numpy as jnp
    import numpy as np

    from vimpac_jax.training import checkpointing
    from vimpac_jax.training import workdir as workdir_lib

    manager = checkpointing.make_manager(tmp_path, save_every=1, keep=3)
    state = {"params": {"w": jnp.arange(4096, dtype=jnp.float32)}, "batch_stats": {"b": jnp.ones(3)}}
    for step in (1, 2):
        checkpointing.save(manager, step, jax_tree_scale(state, step), None, {"step": step})
        manager.wait_until_finished()
    (tmp_path / "config.json").write_text("{}")
    intact = checkpointing.restore_latest(manager, checkpointing.abstract_like(state), None, log=print)
    assert intact[0] == 2 and intact[2]["verified"] is True
    _flip_a_bit_of_the_largest_data_file(tmp_path / "checkpoints" / "2")

    warnings = []
    step, restored, meta = checkpointing.restore_latest(manager, checkpointing.abstract_like(state), None,
                                                        log=warnings.append)
    assert step == 1 and meta["verified"] is True
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(4096, dtype=np.float32))
    assert len(warnings) == 1 and "checkpoints/2 cannot be restored" in warnings[0]
    assert "checksum mismatch in 1 array(s) (params/w)" in warnings[0] and "falling back to step 1" in warnings[0]

    # The readers of a run (export, evaluate, init_from) skip it the same way.
    warnings.clear()
    step, variables = workdir_lib.restore_variables(tmp_path, ("params",), log=warnings.append)
    assert step == 1 and sorted(variables) == ["params"] and "checksum mismatch" in warnings[0]
    np.testing.assert_array_equal(variables["params"]["w"], np.arange(4096, dtype=np.float32))


def test_checksums_do_not_depend_on_the_sharding_and_catch_any_flipped_bit():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from vimpac_jax.training import checkpointing

    x = jax.random.normal(jax.random.key(0), (8, 6), jnp.float32)
    tree = {"x": x, "h": x.astype(jnp.bfloat16), "i": jnp.arange(5, dtype=jnp.int8), "n": jnp.int32(7)}
    whole = checkpointing.array_checksums(tree)
    assert whole == checkpointing.array_checksums(jax.tree.map(np.asarray, tree))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    if len(jax.devices()) > 1 and 8 % len(jax.devices()) == 0:
        sharded = dict(tree, x=jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))))
        assert checkpointing.array_checksums(sharded) == whole
    bits = np.asarray(x).view(np.uint32).copy()
    for i, k in [(0, 0), (17, 31), (47, 5)]:
        flipped = bits.copy().reshape(-1)
        flipped[i] ^= np.uint32(1 << k)
        got = checkpointing.array_checksums({"x": flipped.view(np.float32).reshape(8, 6)})
        assert got["x"] != whole["x"], (i, k)


def test_a_resume_with_another_seed_or_a_replaced_store_is_refused_naming_it(tmp_path):
    import jax.numpy as jnp

    from vimpac_jax.training import checkpointing
    from vimpac_jax.training import workdir as workdir_lib

    store = tmp_path / "store"
    store.mkdir()
    (store / "metadata.json").write_text('{"complete": true, "num_videos": 3}\n')
    config = {"seed": 3, "data": {"train_store": str(store), "eval_store": ""}}
    identity = workdir_lib.run_identity(config)
    assert identity == {"seed": 3, "stores": {"data.train_store": workdir_lib.store_digest(store)}}
    manager = checkpointing.make_manager(tmp_path / "w", save_every=1, keep=3)
    state = {"w": jnp.ones(4)}
    checkpointing.save(manager, 1, state, None, {"step": 1, **identity})
    manager.wait_until_finished()

    def resume(cfg):
        return workdir_lib.restore_state(manager, checkpointing.abstract_like(state), None,
                                         workdir_lib.run_identity(cfg), log=print)

    assert resume(config)[0] == 1
    with pytest.raises(workdir_lib.WorkdirError, match="config.seed is 4, the checkpoint's run used 3"):
        resume(dict(config, seed=4))
    (store / "metadata.json").write_text('{"complete": true, "num_videos": 4}\n')  # another store, same path
    with pytest.raises(workdir_lib.WorkdirError, match="config.data.train_store: the store's metadata.json has "
                                                       "changed since the checkpoint was written"):
        resume(config)
