"""Faults around a training run: a full or hung disk under the metrics writer, stop signals,
exit codes, locks, the data iterator resumed under another worker count; bad input refused
before any work, as one error line. In-process and without compiling where the fault allows it."""

import errno
import json
import os
import re
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vimpac_jax import exit_codes
from vimpac_jax.training import metrics

REPO = Path(__file__).resolve().parents[1]


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
def small_tmpfs(tmpfs):
    """A 64 KiB tmpfs (root only); skipped where mounting is not allowed."""
    return tmpfs("64k")


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


def test_a_damaged_checkpoint_is_moved_aside_so_saves_below_it_happen_and_it_is_not_kept(tmp_path):
    """The run falls back from a damaged step 3 to 2: 3 is renamed `3.damaged`, so orbax saves
    steps 3 and 4 again (a damaged 3 left in place made it skip every save up to 3) and keeps 2
    good ones (left in place, it counted among the kept)."""
    import jax.numpy as jnp

    from vimpac_jax.training import checkpointing

    manager = checkpointing.make_manager(tmp_path, save_every=1, keep=2)
    state = {"w": jnp.arange(4096, dtype=jnp.float32)}
    for step in (1, 2, 3):
        checkpointing.save(manager, step, jax_tree_scale(state, step), None, {"step": step})
        checkpointing.wait_until_finished(manager)
    assert _truncate_array_files(tmp_path / "checkpoints" / "3")
    warnings = []
    step, _, _ = checkpointing.restore_latest(manager, checkpointing.abstract_like(state), None, log=warnings.append,
                                              move_aside=True)
    damaged = tmp_path / "checkpoints" / "3.damaged"
    assert step == 2 and manager.all_steps() == [2] and damaged.is_dir()
    assert len(warnings) == 1 and f"moved it to {damaged}; falling back to step 2" in warnings[0]
    for step in (3, 4):
        assert checkpointing.save(manager, step, jax_tree_scale(state, step), None, {"step": step})
        checkpointing.wait_until_finished(manager)
    assert manager.all_steps() == [3, 4] and damaged.is_dir()
    # A new run's manager (which clears interrupted saves) lists the same steps and leaves it alone.
    assert checkpointing.make_manager(tmp_path, save_every=1, keep=2).all_steps() == [3, 4] and damaged.is_dir()


def test_a_full_disk_during_a_save_is_one_error_not_orbax_tracebacks(tmpfs, monkeypatch, caplog):
    """A save that cannot fit is refused before writing; one that fills the disk while orbax
    writes (the free-space check passed, or another writer filled it) raises CheckpointSaveError
    naming the directory and the full disk, and orbax's error records are not shown."""
    import logging

    import jax.numpy as jnp

    from vimpac_jax.training import checkpointing

    disk = tmpfs("2m")
    manager = checkpointing.make_manager(disk, save_every=1, keep=3)
    state = {"w": jnp.arange(1 << 20, dtype=jnp.float32) * 1.0001}  # 4 MiB
    with pytest.raises(checkpointing.CheckpointSaveError, match="the disk is full .*4.0 MiB"):
        checkpointing.save(manager, 1, state, None, {"step": 1})
    assert not list((disk / "checkpoints").iterdir())  # nothing written

    monkeypatch.setattr(checkpointing, "_check_free_space", lambda *args: None)
    caplog.set_level(logging.INFO)
    with pytest.raises(checkpointing.CheckpointSaveError) as failed:
        checkpointing.save(manager, 1, state, None, {"step": 1})
        checkpointing.wait_until_finished(manager)
    assert f"in {disk / 'checkpoints'} failed: the disk is full (No space left on device)" in str(failed.value)
    assert "\n" not in str(failed.value) and manager.all_steps() == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage()[:200] for r in caplog.records]


def _truncate_array_files(step_dir):
    """Cuts the array data files (orbax's */d/<hash>) of a checkpoint step to 100 bytes."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    for p in files:
        p.write_bytes(p.read_bytes()[:100])
    return files


def jax_tree_scale(tree, factor):
    import jax

    return jax.tree.map(lambda x: x * factor, tree)


# ---------------------------------------------------------------------------------------------
# data.workers changed on resume (a RESUME_FREE_FIELDS field).
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_store(tmp_path_factory):
    from vimpac_jax.data.testing import write_test_store

    videos = [dict(video_id=f"v{i}", label=i % 3, num_frames=9, variants=["r128_center_noflip"]) for i in range(6)]
    return write_test_store(tmp_path_factory.mktemp("workers") / "store", videos, shards=2, pattern="frame_index")


def test_the_data_iterator_resumes_under_another_worker_count(pretrain_store, tmp_path):
    """A state saved at 0 workers restores at 2 and back, through the orbax checkpoint that
    training writes, and continues with the batches an uninterrupted run reads."""
    import numpy as np

    from vimpac_jax.data import pipelines as P
    from vimpac_jax.training import checkpointing

    ds = P.train_dataset(P.load_index(pretrain_store), "pretrain", batch_size=2, clip_len=5, seed=3, process_index=0,
                            process_count=1)
    expected = [ds[b]["tokens"] for b in range(9)]  # 3 batches per epoch: crosses two epoch boundaries
    manager = checkpointing.make_manager(tmp_path, save_every=1, keep=3)
    state = {"w": np.zeros(2, np.float32)}

    def save(step, iterator):
        checkpointing.save(manager, step, state, iterator, {"step": step}, force=True)
        manager.wait_until_finished()

    def restore(iterator):
        step, _, _ = checkpointing.restore_latest(manager, state, iterator, log=pytest.fail)
        return step

    serial = P.make_iterator(ds, workers=0, read_threads=1)
    got = [next(serial)["tokens"] for _ in range(4)]
    save(4, serial)
    parallel = P.make_iterator(ds, workers=2, read_threads=1)
    try:
        assert restore(parallel) == 4
        got += [next(parallel)["tokens"] for _ in range(3)]
        save(7, parallel)
    finally:
        parallel.close()
    serial = P.make_iterator(ds, workers=0, read_threads=1)
    assert restore(serial) == 7
    got += [next(serial)["tokens"] for _ in range(2)]
    assert len(got) == len(expected)
    for b, (a, e) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(a, e, err_msg=f"batch {b}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_data_workers_exit_when_the_trainer_is_killed(pretrain_store, tmp_path):
    """`data.workers=2` and SIGKILL of the process reading: its two grain workers end too (they
    stayed under PID 1 before, ~200 MB each)."""
    import signal
    import sys

    import video_fixtures

    script = tmp_path / "reader.py"
    script.write_text(
        "import multiprocessing, sys, time\n"
        "from vimpac_jax.data import pipelines as P\n"
        "if __name__ == '__main__':\n"
        "    ds = P.train_dataset(P.load_index(sys.argv[1]), 'pretrain', batch_size=2, clip_len=5, seed=3,\n"
        "                         process_index=0, process_count=1)\n"
        "    it = P.make_iterator(ds, workers=2, read_threads=1)\n"
        "    next(it)\n"
        "    print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "    time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(pretrain_store)], stdout=subprocess.PIPE, text=True,
                            env=env)
    workers = []
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) >= 2 and all(video_fixtures.process_alive(pid) for pid in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(video_fixtures.process_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if video_fixtures.process_alive(pid)]
    finally:
        proc.kill()
        for pid in workers:
            if video_fixtures.process_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_data_worker_is_one_error_saying_what_happened(pretrain_store):
    """grain's "Worker process was terminated unexpectedly with exit code -9" traceback becomes a
    DataWorkerError (vimpac train: one `error:` line, exit 1) naming the signal and the batch."""
    import multiprocessing
    import signal

    from vimpac_jax.data import pipelines as P

    ds = P.train_dataset(P.load_index(pretrain_store), "pretrain", batch_size=2, clip_len=5, seed=3, process_index=0,
                         process_count=1)
    it = P.make_iterator(ds, workers=2, read_threads=1, worker_buffer_size=1)
    try:
        next(it)
        workers = [p for p in multiprocessing.active_children() if p.name != "resource_tracker"]
        assert workers
        os.kill(workers[-1].pid, signal.SIGKILL)
        with pytest.raises(P.DataWorkerError) as died:
            for _ in range(100):  # the batches already made still come out first
                next(it)
    finally:
        it.close()
    assert "a data worker process ended while reading batch" in str(died.value)
    assert "killed by SIGKILL" in str(died.value) and "\n" not in str(died.value)


def test_grain_iterator_states_of_older_runs_are_refused_and_migrate_converts_them(pretrain_store):
    """grain's own states (runs before the state was the batch count: 0 workers' prefetch index,
    2 workers' interleave in grain 0.2.18's layout, after 5 batches) are not read by the
    pipelines; `vimpac migrate`'s conversion turns them into the batch the run resumes at."""
    import numpy as np

    from vimpac_jax.data import pipelines as P
    from vimpac_jax.training.migrate import grain_state_next_batch

    ds = P.train_dataset(P.load_index(pretrain_store), "pretrain", batch_size=2, clip_len=5, seed=3, process_index=0,
                            process_count=1)
    two_workers = {"next_index_in_cycle": 1, "next_index_in_datasets": 2, "iterators_in_use_indices": [0, 1],
                   "iterators_in_use_states": [{"next_index": 3}, {"next_index": 2}], "exhausted": [0, 0],
                   "future_states": {}}
    for state in ({"next_index": 5}, two_workers):
        with pytest.raises(ValueError, match="unknown data iterator state"):
            P.make_iterator(ds, workers=0).set_state(state)
        it = P.make_iterator(ds, workers=0, read_threads=1)
        it.set_state({"next_batch": grain_state_next_batch(state)})
        np.testing.assert_array_equal(next(it)["tokens"], ds[5]["tokens"])
        assert it.get_state() == {"next_batch": 6}
    with pytest.raises(ValueError, match="unknown data iterator state"):
        grain_state_next_batch({"something": 1})


@pytest.mark.parametrize("damage", ["cut in half", "one flipped bit"])
def test_a_damaged_token_shard_is_an_error_naming_the_shard_and_videos(tmp_path, damage):
    """A shard cut in half fails when the store is indexed; a flipped bit in a chunk fails when a
    clip reads it (Riegeli's hash): both a StoreDamagedError (a ValueError: one `error:` line)
    naming the shard, the videos of the failed read where known, and `--verify`."""
    import shutil

    from vimpac_jax.data import pipelines as P
    from vimpac_jax.data import token_store
    from vimpac_jax.data.testing import write_test_store

    videos = [dict(video_id=f"v{i}", label=i % 3, num_frames=60, variants=["r32_center_noflip"]) for i in range(6)]
    store = write_test_store(tmp_path / "store", videos, shards=2, grid=(16, 16), chunk_frames=4)
    shard = store / token_store.read_metadata(store)["shards"][1]
    in_shard = {h["video_id"] for _, h in token_store.scan_headers(store, token_store.RecordReader([str(shard)]))}
    data = bytearray(shard.read_bytes())
    if damage == "cut in half":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x04
    shard.write_bytes(bytes(data))
    with pytest.raises(token_store.StoreDamagedError) as failed:
        index = P.load_index(store, cache=False)
        ds = P.train_dataset(index, "pretrain", batch_size=6, clip_len=5, seed=3, process_index=0, process_count=1)
        for batch in range(10):  # every video, several clip positions
            ds[batch]
    message = str(failed.value)
    assert f"shard {shard} is damaged" in message and "Riegeli" in message and "--verify" in message
    if damage == "one flipped bit":  # found by a read of known videos: named, and only the shard's own
        named = set(re.findall(r"'(v\d)'", message))
        assert named and named <= in_shard, (named, in_shard)
    # Raised in a grain worker (data.workers > 0), it reaches the trainer pickled: the same error.
    import pickle

    again = pickle.loads(pickle.dumps(failed.value))
    assert type(again) is token_store.StoreDamagedError and str(again) == message and again.shard == str(shard)
    shutil.rmtree(store)


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming the field before anything compiles (in process; compiling the step
# is made to fail the test).
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_store(tmp_path_factory):
    """8 labelled videos of 2-3 frames (4x4 tokens), shorter than the runlocal clips (T=3 at
    most); and 8 of 6 frames."""
    from vimpac_jax.data.testing import write_test_store

    root = tmp_path_factory.mktemp("bad_input")
    short = [dict(video_id=f"s{i}", label=i % 2, num_frames=2 + i % 2) for i in range(8)]
    longer = [dict(video_id=f"l{i}", label=i % 2, num_frames=6) for i in range(8)]
    return write_test_store(root / "short", short), write_test_store(root / "long", longer)


@pytest.fixture
def no_compiling(monkeypatch):
    from vimpac_jax.tasks import finetune, pretrain

    def refuse(*args, **kwargs):
        raise AssertionError("the step was built: the check came too late")

    monkeypatch.setattr(pretrain, "make_pretrain_step", refuse)
    monkeypatch.setattr(finetune, "make_finetune_step", refuse)


def _train(store, workdir, *overrides, task="pretrain"):
    from conftest import first_device_only
    from vimpac_jax.commands import train as train_command

    config = "pretrain.py:runlocal" if task == "pretrain" else "finetune.py:dataset=ucf101,runlocal"
    with first_device_only():  # runlocal's batch of 4 on one device, as `vimpac train` runs it
        return train_command.main(["--config", str(REPO / "configs" / config), f"--config.data.train_store={store}",
                                   "--config.train.num_steps=2", *overrides, "--workdir", str(workdir)])


@pytest.mark.parametrize("override, words", [
    ("--config.train.checkpoint_every=0", "config.train.checkpoint_every=0 must be >= 1"),
    ("--config.train.keep_checkpoints=-1", "config.train.keep_checkpoints=-1 must be >= 1"),
    ("--config.train.log_every=0", "config.train.log_every=0 must be >= 1"),
    ("--config.train.num_steps=-3", "config.train.num_steps=-3 must be >= 0"),
    ("--config.model.dropout=2.0", "config.model.dropout=2.0 must be in [0, 1)"),
    ("--config.model.attention_dropout=1.0", "config.model.attention_dropout=1.0 must be in [0, 1)"),
    ("--config.model.vocab_size=512", "config.model.vocab_size=512 must be >= 8197"),
    ("--config.data.eval_clips=0", "config.data.eval_clips=0 must be >= 1"),
])
def test_out_of_range_fields_are_named_before_the_workdir_is_written(short_store, tmp_path, capsys, no_compiling,
                                                                      override, words):
    _, store = short_store
    assert _train(store, tmp_path / "w", override) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "w" / "config.json").exists()


def test_clip_len_longer_than_every_video_is_refused(short_store, tmp_path, capsys, no_compiling):
    short, longer = short_store
    with pytest.raises(AssertionError, match="the step was built"):  # past the checks, to the step:
        _train(short, tmp_path / "a")  # runlocal clips are 3 frames, some videos 3: allowed
    assert "clip_len" not in capsys.readouterr().err
    assert _train(longer, tmp_path / "b", "--config.model.clip_len=8") == 2
    err = capsys.readouterr().err
    assert "config.model.clip_len=8 is longer than every video of config.data.train_store" in err
    assert "the longest has 6 frames" in err
    # At half the stored rate the 6-frame videos give 3 clip frames: a 4-frame clip is refused.
    assert _train(longer, tmp_path / "c", "--config.model.clip_len=4", "--config.data.clip_fps=1.0",
                  task="finetune") == 2
    assert "the longest has 3 frames at config.data.clip_fps=1.0" in capsys.readouterr().err


def test_a_store_with_more_codes_than_the_model_holds_is_refused(short_store, tmp_path, capsys, no_compiling):
    import shutil

    _, longer = short_store
    store = tmp_path / "store"
    shutil.copytree(longer, store)
    meta = json.loads((store / "metadata.json").read_text())
    meta["tokenizer"] = {"kind": "vq", "config": {"vocab_size": 16384}}
    (store / "metadata.json").write_text(json.dumps(meta))
    assert _train(store, tmp_path / "w") == 2
    assert "its tokenizer has 16384 codes, more than the model's 8192" in capsys.readouterr().err


def test_evaluate_refuses_zero_clips(short_store, tmp_path, capsys):
    from vimpac_jax.commands import evaluate

    _, store = short_store
    (tmp_path / "config.json").write_text(json.dumps({"task": "finetune", "data": {"eval_store": str(store)}, "format_version": 2}))
    for clips in ("0", "2,0", "x"):
        assert evaluate.main(["--workdir", str(tmp_path), "--clips", clips]) == 2
        assert "--clips must be positive integers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# `error:` lines, not tracebacks (`vimpac_jax.cli` maps rejected input to exit code 2).
# ---------------------------------------------------------------------------------------------


def _cli(capsys, *argv):
    from vimpac_jax import cli

    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_a_workdir_that_is_a_file_or_read_only_is_one_error_line(short_store, tmp_path, tmpfs, capsys, no_compiling):
    _, store = short_store
    (tmp_path / "afile").write_text("not a run")
    assert _train(store, tmp_path / "afile") == exit_codes.BAD_INPUT
    assert f"--workdir {tmp_path / 'afile'} is a file; expected a run directory" in capsys.readouterr().err
    read_only = tmpfs("64k")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    rc, err = _cli(capsys, "train", "--config", REPO / "configs/pretrain.py:runlocal",
                   f"--config.data.train_store={store}", "--workdir", read_only / "run")
    assert rc == exit_codes.BAD_INPUT and err.strip() == (f"vimpac train: error: cannot write {read_only / 'run'}: "
                                                          f"Read-only file system")


@pytest.mark.parametrize("fmt", ["safetensors", "stablehlo"])
def test_export_to_a_full_disk_is_one_error_line_and_leaves_nothing(golden_dir, tmp_path, tmpfs, capsys, fmt):
    from vimpac_jax.conversion.official import convert_official

    convert_official(golden_dir / "vimpac_a", tmp_path / "ckpt")
    disk = tmpfs("64k")
    (disk / "filler").write_bytes(b"\0" * 60_000)
    rc, err = _cli(capsys, "export", "--workdir", tmp_path / "ckpt", "--format", fmt, "--out", disk / "e")
    assert rc == exit_codes.FAILED, err
    assert err.startswith(f"vimpac export: error: cannot write --out {disk / 'e'}") and err.count("\n") == 1, err
    assert "No space left on device" in err and sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_convert_official_on_files_that_are_not_torch_zips(tmp_path, capsys):
    import pickle
    import zipfile

    src = tmp_path / "released"
    src.mkdir()
    (src / "args.pickle").write_bytes(pickle.dumps({"model": "vimpac"}, protocol=2))
    (src / "classifier.pt").write_bytes(b"these are not the weights")
    rc, err = _cli(capsys, "convert", "official", src, tmp_path / "out")
    assert rc == exit_codes.BAD_INPUT and f"error: {src / 'classifier.pt'}: not a torch zip-format file" in err
    with zipfile.ZipFile(src / "classifier.pt", "w") as z:  # a zip whose pickle is cut short
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2)[:-3])
    rc, err = _cli(capsys, "convert", "official", src, tmp_path / "out")
    assert rc == exit_codes.BAD_INPUT and "classifier.pt: damaged file" in err
    (src / "args.pickle").write_bytes(b"\x80\x02}q")  # a truncated plain pickle
    rc, err = _cli(capsys, "convert", "official", src, tmp_path / "out")
    assert rc == exit_codes.BAD_INPUT and "args.pickle: damaged file" in err
    assert not (tmp_path / "out").exists()


def test_a_sweep_file_with_an_error_is_named_with_its_line(tmp_path, capsys):
    cases = {"syntax.py": ("def get_sweep(:\n    return []\n", "line 1: invalid syntax"),
             "name.py": ("X = 1\n\ndef get_sweep():\n    return [{'seed': Y}]\n", "line 4: NameError: name 'Y'"),
             "combinator.py": ("from vimpac_jax.sweeps import sweep\n\ndef get_sweep():\n"
                               "    return sweep('seed', [])\n",
                               "line 4: ValueError: sweep('seed', ...) has no values")}
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        rc, err = _cli(capsys, "sweep", "--sweep", tmp_path / name, "--config", REPO / "configs/pretrain.py:runlocal",
                       "--workdir", tmp_path / "runs")
        assert rc == 2 and f"vimpac sweep: error: sweep file {tmp_path / name}, {words}" in err, err
    assert not (tmp_path / "runs").exists()


def test_outputs_in_missing_directories_and_bad_counts_are_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """Each checked before its inputs are even read (they do not exist here)."""
    missing = tmp_path / "no" / "such"
    cases = [("features", "--checkpoint", tmp_path / "ck", "--tokens", tmp_path / "t.npy", "--out", missing / "f.npz"),
             ("codes", "encode", "--tokenizer", tmp_path / "tok", "--images", tmp_path / "i.npy",
              "--out", missing / "t.npz"),
             ("visualize", "--workdir", tmp_path / "run", "--videos", tmp_path / "list.txt",
              "--out", missing / "f.png")]
    for argv in cases:
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and f"error: --out {missing}" in err and "does not exist" in err, (argv[0], err)
    rc, err = _cli(capsys, "features", "--checkpoint", tmp_path, "--tokens", tmp_path / "t.npy", "--out", tmp_path)
    assert rc == 2 and "is a directory" in err
    with pytest.raises(SystemExit) as exited:  # argparse's own error line
        _cli(capsys, "features", "--checkpoint", tmp_path, "--tokens", "t.npy", "--out", "f.npz", "--batch-size", "0")
    assert exited.value.code == 2
    assert "argument --batch-size: expected a positive integer, got '0'" in capsys.readouterr().err
    monkeypatch.setenv("VIMPAC_TRACEBACK", "1")  # for debugging: the traceback instead of the line
    with pytest.raises(ValueError, match="does not exist"):
        _cli(capsys, *cases[2])


def test_evaluate_with_no_checkpoint_that_restores_is_an_error_line(short_store, tmp_path, capsys):
    import numpy as np

    from vimpac_jax.config_utils import load_config
    from vimpac_jax.training import checkpointing

    _, store = short_store
    config = load_config(["--config", str(REPO / "configs/finetune.py:dataset=ucf101,runlocal"),
                          f"--config.data.eval_store={store}"])
    (tmp_path / "config.json").write_text(json.dumps({**json.loads(config.to_json_best_effort()), "format_version": 2}))
    manager = checkpointing.make_manager(tmp_path, save_every=1, keep=2)
    checkpointing.save(manager, 1, {"w": np.arange(4096, dtype=np.float32)}, None, {"step": 1})
    manager.wait_until_finished()
    assert _truncate_array_files(tmp_path / "checkpoints" / "1")
    rc, err = _cli(capsys, "evaluate", "--workdir", tmp_path)
    assert rc == 2 and f"vimpac evaluate: error: no checkpoint in {tmp_path / 'checkpoints'} can be restored" in err


def test_a_step_without_checksums_is_skipped_and_one_of_an_older_format_refused_naming_migrate(tmp_path):
    """Every step of the current run format records its checksums (`vimpac migrate` adds them to
    older ones): one without is damaged, and the step before is restored; a step of an older
    format is refused by the readers of a run with the command that migrates it."""
    import jax.numpy as jnp
    import numpy as np

    from vimpac_jax.training import checkpointing
    from vimpac_jax.training import workdir as workdir_lib

    manager = checkpointing.make_manager(tmp_path, save_every=1, keep=3)
    state = {"params": {"w": jnp.arange(8, dtype=jnp.float32)}}
    for step in (1, 2):
        checkpointing.save(manager, step, jax_tree_scale(state, step), None, {"step": step})
        manager.wait_until_finished()
    (tmp_path / "config.json").write_text(json.dumps({"format_version": checkpointing.FORMAT_VERSION}))
    meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "checksums"}))

    for restore in (lambda log: checkpointing.restore_latest(manager, checkpointing.abstract_like(state), None,
                                                             log=log)[:2],
                    lambda log: workdir_lib.restore_variables(tmp_path, ("params",), log=log)):
        warnings = []
        step, restored = restore(warnings.append)
        assert step == 1 and len(warnings) == 1
        assert ("checkpoints/2 cannot be restored (CheckpointCorruptError: its meta records no checksums of the "
                "arrays)") in warnings[0]
        np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(8, dtype=np.float32))

    meta_file.write_text(json.dumps(dict(meta, format_version=1)))
    with pytest.raises(workdir_lib.RunFormatError, match=f"records run format 1; .* run `vimpac migrate --workdir "
                                                         f"{tmp_path}` first"):
        workdir_lib.restore_variables(tmp_path, ("params",))


def test_migrate_sums_the_arrays_of_steps_without_checksums_and_leaves_an_unreadable_one_to_be_skipped(tmp_path):
    """`vimpac migrate` gives a step written before checksums the sums of its arrays as read back
    (the ones the run would have recorded); a step whose arrays cannot be read does not stop the
    migration: it is left without checksums, and the readers skip it as damaged."""
    import jax.numpy as jnp
    import numpy as np

    from vimpac_jax.training import checkpointing, migrate
    from vimpac_jax.training import workdir as workdir_lib

    manager = checkpointing.make_manager(tmp_path, save_every=1, keep=3)
    state = {"params": {"w": jnp.arange(4096, dtype=jnp.float32)}, "batch_stats": {"b": jnp.ones(3)}}
    recorded = {}
    for step in (1, 2):
        checkpointing.save(manager, step, jax_tree_scale(state, step), None, {"step": step})
        manager.wait_until_finished()
        meta_file = tmp_path / "checkpoints" / str(step) / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        recorded[step] = meta.pop("checksums")
        meta_file.write_text(json.dumps(dict(meta, format_version=1)))  # as a run before checksums
    (tmp_path / "config.json").write_text(json.dumps({"task": "tokenizer", "seed": 0, "format_version": 1}))
    _truncate_array_files(tmp_path / "checkpoints" / "2")

    lines = []
    assert migrate.migrate_workdir(tmp_path, log=lines.append) == 2
    assert len(lines) == 2 and lines[0].startswith(f"warning: {tmp_path / 'checkpoints' / '2'}: its arrays cannot "
                                                    f"be read") and "left without checksums" in lines[0]
    metas = {step: json.loads((tmp_path / "checkpoints" / str(step) / "meta" / "metadata").read_text())
             for step in (1, 2)}
    assert metas[1]["checksums"] == recorded[1] and "checksums" not in metas[2]
    assert metas[1]["format_version"] == metas[2]["format_version"] == checkpointing.FORMAT_VERSION

    warnings = []
    step, variables = workdir_lib.restore_variables(tmp_path, ("params",), log=warnings.append)
    assert step == 1 and len(warnings) == 1 and "checkpoints/2 cannot be restored" in warnings[0]
    np.testing.assert_array_equal(variables["params"]["w"], np.arange(4096, dtype=np.float32))


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
    (tmp_path / "config.json").write_text('{"format_version": 2}')
    intact = checkpointing.restore_latest(manager, checkpointing.abstract_like(state), None, log=print)
    assert intact[0] == 2 and intact[2]["step"] == 2
    _flip_a_bit_of_the_largest_data_file(tmp_path / "checkpoints" / "2")

    warnings = []
    step, restored, meta = checkpointing.restore_latest(manager, checkpointing.abstract_like(state), None,
                                                        log=warnings.append)
    assert step == 1 and meta["step"] == 1
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(4096, dtype=np.float32))
    assert len(warnings) == 1 and "checkpoints/2 cannot be restored" in warnings[0]
    assert "checksum mismatch in 1 array(s) (params/w)" in warnings[0] and "falling back to step 1" in warnings[0]

    # The readers of a run (export, evaluate, init_from) skip it the same way.
    warnings.clear()
    step, variables = workdir_lib.restore_variables(tmp_path, ("params",), log=warnings.append)
    assert step == 1 and sorted(variables) == ["params"] and "checksum mismatch" in warnings[0]
    np.testing.assert_array_equal(variables["params"]["w"], np.arange(4096, dtype=np.float32))


def test_init_from_a_run_whose_newest_checkpoint_is_damaged_records_the_step_used(tmp_path):
    """Fine-tuning from a run whose step 2 is damaged starts from step 1: the log line says so and
    the new run's init_from.json records it (written once: a resume keeps the record of the start)."""
    import jax.numpy as jnp
    import numpy as np

    from vimpac_jax.tasks import init_source
    from vimpac_jax.training import checkpointing
    from vimpac_jax.training import workdir as workdir_lib

    source = tmp_path / "pre"
    manager = checkpointing.make_manager(source, save_every=1, keep=3)
    state = {"params": {"w": jnp.arange(4096, dtype=jnp.float32)}, "batch_stats": {"b": jnp.ones(3)}}
    for step in (1, 2):
        checkpointing.save(manager, step, jax_tree_scale(state, step), None, {"step": step})
        checkpointing.wait_until_finished(manager)
    (source / "config.json").write_text(json.dumps({"model": {"hidden_dim": 8}, "format_version": 2}))
    _flip_a_bit_of_the_largest_data_file(source / "checkpoints" / "2")

    warnings = []
    model, variables, record = init_source.load_init_source(str(source), log=warnings.append)
    assert model == {"hidden_dim": 8} and record["step"] == 1 and record["init_from"] == str(source)
    np.testing.assert_array_equal(variables["params"]["w"], np.arange(4096, dtype=np.float32))
    assert record["skipped"] == warnings and "checkpoints/2 cannot be restored" in warnings[0]
    line = init_source.init_source_line(record)
    assert line.startswith(f"init_from: {source} at step 1; 1 newer checkpoint(s) could not be restored")

    run = tmp_path / "ft"
    run.mkdir()
    workdir_lib.record_init_source(run, record)
    workdir_lib.record_init_source(run, dict(record, step=7))  # a resume later: the start's record stays
    assert json.loads((run / workdir_lib.INIT_FROM_FILE).read_text()) == record


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
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))  # conftest: 8 CPU devices
    sharded = dict(tree, x=jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))))
    assert len(sharded["x"].sharding.device_set) == 8 and checkpointing.array_checksums(sharded) == whole
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


def test_a_resume_with_another_config_names_changed_and_absent_fields(tmp_path):
    """A workdir's config.json must match the resumed run's (up to the fields that change no
    result); fields its config.json lacks (a run written before they existed) are named apart."""
    from vimpac_jax.training import workdir as workdir_lib

    stored = {"seed": 0, "train": {"log_every": 10}, "optim": {"lr": 1e-3}, "model": {"dropout": 0.1}}
    (tmp_path / "config.json").write_text(json.dumps({**stored, "format_version": 2}))
    workdir_lib.check_config(tmp_path, dict(stored, train={"log_every": 50}))  # a free field: resumes
    with pytest.raises(workdir_lib.WorkdirError, match=r"\(optim\.lr differ\); use a new --workdir"):
        workdir_lib.check_config(tmp_path, dict(stored, optim={"lr": 2e-3}))
    newer = dict(stored, optim={"lr": 2e-3}, pretrain={"dropout_rng": "rbg"})
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"\(optim\.lr differ; pretrain\.dropout_rng absent from its config\.json "
                             r"\(written before these fields existed\)\)"):
        workdir_lib.check_config(tmp_path, newer)
    many = dict(stored, model={**stored["model"], **{f"f{i}": i for i in range(10)}})
    with pytest.raises(workdir_lib.WorkdirError, match=r"\(model\.f0, model\.f1, .*, model\.f7 and 2 more absent"):
        workdir_lib.check_config(tmp_path, many)
