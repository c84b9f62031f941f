"""Publishing a file or a directory only when it is complete (temporary name, then rename);
exclusive locks on a workdir or a store; worker processes that end with their parent."""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


def write_bytes_atomic(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    A unique temporary name beside `path` (hosts sharing a file system may write the same file at
    the same moment), fsync, then rename(2), which is atomic within a file system.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path, text: str) -> None:
    """`write_bytes_atomic` of `text` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, obj: Any, *, indent: int = 1, sort_keys: bool = True) -> None:
    """`write_text_atomic` of `obj` as JSON with a trailing newline."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_directory(final, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; rename it to `final` on success.

    On an exception the temporary directory is removed and `final` is left as it was, so a
    crash never leaves a directory that looks finished (a checkpoint, an export). With `overwrite`, an
    existing `final` is replaced (removed just before the rename).
    """
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another destination or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


PARENT_POLL_SECONDS = 0.5


def watch_parent(parent_pid: int, on_gone: Callable[[], None]) -> None:
    """Call `on_gone()` (in a daemon thread) once process `parent_pid`, which started this one,
    is gone, e.g. SIGKILLed; at once if it already is.

    A thread polls the parent pid (the process's parent changes when the parent dies: to the
    forkserver's, then to a reaper's). Not PR_SET_PDEATHSIG: on Linux it fires when the *thread*
    that forked the process exits (prctl(2)), and a pool may start workers from a thread of its own.
    """
    start_ppid = os.getppid()
    if parent_pid != start_ppid and not pid_alive(parent_pid):  # died before this process ran
        on_gone()
        return

    def watch() -> None:
        while os.getppid() == start_ppid and pid_alive(parent_pid):
            time.sleep(PARENT_POLL_SECONDS)
        on_gone()

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def exit_with_parent(parent_pid: int) -> None:
    """Initializer of a worker process (decode workers, grain's data workers): end it (os._exit)
    once the process that started it is gone (`watch_parent`). Otherwise an orphaned worker
    waits for jobs for ever: it holds the write end of its own call queue, so the queue never
    reports the parent's end."""
    watch_parent(parent_pid, lambda: os._exit(1))


WORKDIR_LOCK_FILE = ".lock"  # of a run's workdir: held by its `vimpac train` (training/workdir.py, sweeps/launchers.py)


class InUseError(ValueError):
    """Another live process holds the lock (a ValueError: the command's input is rejected)."""


@contextlib.contextmanager
def exclusive_lock(lock_file, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` while the block runs, or raise `InUseError` naming
    the holder ("in use by pid N on host H"), which the file records.

    flock(2): the kernel drops the lock when its process dies, so a lock file left by a killed
    job is stale and simply taken over; the file is never removed (removing it would let two
    processes lock two different files of one name).
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUseError(f"{what} is in use by {_holder(fd)} (lock {lock_file}); wait for that job "
                             f"to end or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """'pid N on host H', as the holder of a lock wrote it in the file."""
    pid, host = (os.pread(fd, 512, 0).decode(errors="replace").split() + ["?", "?"])[:2]
    return f"pid {pid} on host {host}"


def lock_holder(lock_file) -> Optional[str]:
    """'pid N on host H' of the live process holding `lock_file` (`exclusive_lock`), None when
    nobody does (a lock file left by a killed job is free); never takes the lock or writes."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        return None
    finally:
        os.close(fd)
