"""Training checkpoints with orbax: the train state, the data iterator, and the step's RNG.

One `CheckpointManager` per workdir (`workdir/checkpoints/<step>/`), with three items:
  state  the TrainState pytree (sharded arrays are saved and restored in place);
  data   the grain iterator state (grain's orbax handler), so a resumed run reads exactly the
         batches an uninterrupted run would have read;
  meta   JSON: the step, the seed, the run's identity (`training/workdir.py`) and a checksum of
         every array of the state, for checks on restore.
orbax writes each step under a temporary name and finalises it only when every item of every
process is written, and `latest_step()` only sees finalised steps: a checkpoint interrupted by
a crash is never restored.

A finalised step can still be damaged afterwards. A truncated or lost file makes orbax raise;
a flipped bit does not (the array data is zstd-compressed without a content checksum, and
orbax's zarr3 layout checksums only the chunk index, `crc32c` in `index_codecs`), so each
array's words are summed on its devices when saving (`array_checksums`) and again after a
restore. Either failure skips the step with a warning naming why, and the step before it is
tried, down to the oldest kept. The training run (the one writer of the directory) also moves a
step it skipped aside, to `<step>.damaged` (a name orbax does not read as a step): left in place,
the manager would skip every later save below its step and count it among the kept ones.

A save that fails (a full disk, a lost mount) raises `CheckpointSaveError`, one line naming the
directory and the cause, which `vimpac train` reports with exit code 1 (exit_codes.FAILED); the
steps saved before it are intact. A save that cannot fit is refused before anything is written
(`_check_free_space`); orbax's own error records and the stray callbacks of its interrupted
writes are not printed (`_quiet_failed_saves`): the exception raised to the caller says it all.
"""

import errno
import functools
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import grain.checkpoint as grain_ckpt
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from vimpac_jax import logs
from vimpac_jax.training.init_from import path_name

CHECKPOINTS_DIR = "checkpoints"  # of a workdir (training/workdir.py)
STATE, DATA, META = "state", "data", "meta"
CHECKSUMS = "checksums"  # meta field: {leaf path: "s1-s2"} (`array_checksums`)
# The run format: each step's meta and the workdir's config.json record it; the library reads this
# version only, an older run is brought to it by `vimpac migrate --workdir W` (commands/migrate.py).
FORMAT_VERSION = 2
FORMAT_FIELD = "format_version"


def log_to_stderr(message: str) -> None:
    """The readers' default log: a warning of the `vimpac_jax` logger (stderr; vimpac_jax/logs.py)."""
    logging.getLogger(__name__).warning(message)


class CheckpointRestoreError(ValueError):
    """No checkpoint of the workdir could be restored."""


class CheckpointCorruptError(ValueError):
    """A restored array does not match the checksum recorded when it was saved."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a failed run, not rejected input: exit_codes.FAILED)."""


DAMAGED_SUFFIX = ".damaged"  # `<step>.damaged`: a step moved aside; orbax reads only digit names as steps


def make_manager(workdir, *, save_every: int, keep: int) -> ocp.CheckpointManager:
    """The training run's (writing) manager of `workdir/checkpoints`. The temporary directory
    of a save interrupted by a crash or a full disk is removed when the manager starts (the run
    holds the workdir's lock: no other writer)."""
    _quiet_failed_saves()
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1), max_to_keep=max(int(keep), 1), create=True,
        enable_async_checkpointing=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINTS_DIR, options=options)


def read_only_manager(checkpoints_dir, **kwargs) -> ocp.CheckpointManager:
    """A manager that never writes nor deletes (readers of a run: export, evaluate, init_from)."""
    logs.quiet_orbax_read_only_notice()  # orbax's warning about the read-only open, at debug level
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0, max_to_keep=None,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(checkpoints_dir).absolute(), options=options, **kwargs)


# ----------------------------------------------------------------------------------------------
# Checksums of arrays, computed where the arrays live.

def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words: one per element (elements of 1 or 2 bytes are widened,
    8-byte ones split in two along a new last axis)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """uint32 [2]: the sum of the words and their sum weighted by 2i+1 (i the flat index), both
    mod 2^32. Flipping bit k of word i moves the second by 2^k (2i+1), never 0 mod 2^32, so any
    one flipped bit is caught; integer sums do not depend on the order of the reduction, so the
    value is the same whatever the sharding or device count. The index is built from iotas of
    each axis, so no sharded array is reshaped."""
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % (1 << 32))
        stride *= w.shape[axis]
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * index + 1), dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _checksum_fn(mesh):
    # One jitted function per leaf shape (jit's own cache): a model's many layers share a few
    # shapes, so this compiles a few small programs rather than one the size of the state.
    out = None if mesh is None else NamedSharding(mesh, PartitionSpec())  # replicated: readable on every host
    return jax.jit(_checksum, out_shardings=out)


def array_checksums(tree: Any) -> dict[str, str]:
    """{leaf path ('params/backbone/...', `init_from.path_name`): 'sum-weighted sum'} of every
    array of `tree` (global jax arrays, sharded or not, or numpy arrays)."""
    flat = [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if not flat:
        return {}
    mesh = next((x.sharding.mesh for _, x in flat if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
    fn = _checksum_fn(mesh)
    sums = jax.device_get([fn(x) for _, x in flat])
    return {name: f"{int(s[0]):08x}-{int(s[1]):08x}" for (name, _), s in zip(flat, sums)}


def verify_checksums(tree: Any, recorded: Optional[dict], prefix: str = "") -> None:
    """Raise CheckpointCorruptError naming the arrays of `tree` (paths under `prefix`) whose
    checksum differs from `recorded`, or that it has none for (every step of the current run
    format records them: `vimpac migrate` added them to older ones)."""
    if not recorded:
        raise CheckpointCorruptError("its meta records no checksums of the arrays")
    got = {prefix + name: value for name, value in array_checksums(tree).items()}
    bad = sorted(name for name, value in got.items() if name in recorded and recorded[name] != value)
    missing = sorted(name for name in got if name not in recorded)
    if bad or missing:
        raise CheckpointCorruptError(
            f"checksum mismatch in {len(bad)} array(s) ({', '.join(bad[:4])})" if bad else
            f"no recorded checksum for {', '.join(missing[:4])}")


# ----------------------------------------------------------------------------------------------
# Save and restore.

class _DemoteOrbaxErrors(logging.Filter):
    """orbax logs each failure of its save threads at ERROR with the traceback (several records
    per failed save), then raises it to `wait_until_finished`, where `save_failed` makes it one
    line; asyncio adds one "Task exception was never retrieved" per write of the save that was
    still running. These records (from orbax's files, or naming them) become DEBUG ones, shown
    only where their logger's level is DEBUG."""

    def filter(self, record):
        orbax = f"{os.sep}orbax{os.sep}"
        if record.levelno >= logging.ERROR and (orbax in record.pathname or orbax in record.getMessage()):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def _quiet_failed_saves() -> None:
    """Once per process: orbax's error records to DEBUG (`_DemoteOrbaxErrors`), and the 'Event
    loop is closed' errors of an interrupted save dropped. When one write of a save fails, orbax
    closes the event loop of its thread while tensorstore's other writes are still running; each
    of those then fails to post its result to the closed loop, an unraisable RuntimeError that
    Python prints as a traceback (hundreds on a full disk). The failure itself reaches the caller."""
    absl = logging.getLogger("absl")
    if any(isinstance(f, _DemoteOrbaxErrors) for f in absl.filters):
        return
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_DemoteOrbaxErrors())
    previous = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            logging.getLogger(__name__).debug("a write of an interrupted checkpoint save finished after its event loop")
            return
        previous(unraisable)

    sys.unraisablehook = hook


def save_failed(manager: ocp.CheckpointManager, error: BaseException, step: Optional[int] = None) -> CheckpointSaveError:
    """The one-line error of a failed save: the directory, the cause, what is left."""
    text = str(error).strip()
    first = text.splitlines()[0][:400] if text else type(error).__name__
    full = "No space left on device" in text or "os_error_code='28'" in text or getattr(error, "errno", None) == errno.ENOSPC
    what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    cause = "the disk is full (No space left on device)" if full else first
    return CheckpointSaveError(f"saving {what} in {manager.directory} failed: {cause}; the steps saved before it "
                               f"are intact: run the same command again to resume once the cause is fixed")


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
    """manager.wait_until_finished(), a failed save raised as CheckpointSaveError."""
    try:
        manager.wait_until_finished()
    except CheckpointSaveError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for a failed write
        raise save_failed(manager, e) from None


def _bytes_to_write(tree: Any) -> int:
    """Bytes of `tree`'s arrays that this process writes (one replica of each of its shards),
    uncompressed: weights and moments barely compress, so this is what a save needs free."""
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            total += sum(s.data.nbytes for s in x.addressable_shards if s.replica_id == 0)
        else:
            total += np.asarray(x).nbytes
    return total


def _check_free_space(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Refuse a save that cannot fit before anything is written (decided by every process
    together: the save is collective). The previous checkpoints are still there while the
    new one is written, so its whole size must be free."""
    need = _bytes_to_write(state)
    try:
        free = shutil.disk_usage(manager.directory).free
    except OSError:  # a file system that does not say (a remote mount): orbax's own error then
        free = need
    if _anywhere(free < need):
        raise CheckpointSaveError(
            f"saving the checkpoint of step {step} in {manager.directory} failed: the disk is full (No space left on "
            f"device: {free / 2**20:.1f} MiB free, the checkpoint needs about {need / 2**20:.1f} MiB); the steps saved "
            f"before it are intact: run the same command again to resume once there is space")


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any, meta: dict,
         *, force: bool = False) -> bool:
    """Asynchronous save (returns once the arrays are copied off the devices and summed);
    `wait_until_finished(manager)` before exiting. CheckpointSaveError when this save or the
    one before it (still being written) failed, or the disk has no room for it."""
    if not force and not manager.should_save(step):
        return False
    wait_until_finished(manager)  # the previous save's files count in the free space
    _check_free_space(manager, step, state)
    meta = dict(meta, **{CHECKSUMS: array_checksums(state), FORMAT_FIELD: FORMAT_VERSION})
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    if data_iterator is not None:
        items[DATA] = grain_ckpt.CheckpointSave(data_iterator)
    try:
        return manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # noqa: BLE001 - as in wait_until_finished
        raise save_failed(manager, e, step) from None


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _anywhere(flag: bool) -> bool:
    """Whether `flag` holds on any process: every process takes the same fallback, since the
    restore of the next step is collective (a file damaged in one host's shards fails there only)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _move_aside(manager: ocp.CheckpointManager, step: int) -> Path:
    """Renames step directory `step` to `<step>.damaged` (`.damaged.1`, ... if taken), which orbax
    does not list as a step: the manager then saves below its step again and does not count it
    among the kept checkpoints (`max_to_keep`). Process 0 renames, every process reloads the list."""
    src = Path(manager.directory) / str(step)
    dst, n = src.with_name(f"{step}{DAMAGED_SUFFIX}"), 0
    while dst.exists():
        n += 1
        dst = src.with_name(f"{step}{DAMAGED_SUFFIX}.{n}")
    if jax.process_index() == 0:
        src.rename(dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"vimpac_move_aside_{step}")
    manager.reload()
    return dst


def _newest_first(manager: ocp.CheckpointManager, restore_step: Callable[[int], Any],
                  log: Callable[[str], None], keep_going: tuple = (),
                  move_aside: bool = False) -> Optional[tuple[int, Any]]:
    """(step, restore_step(step)) for the newest step that restores on every process; a step
    whose restore raises is skipped with a warning naming why (exceptions of the `keep_going`
    types propagate: they are about the run, not the files), and moved aside when `move_aside`
    (the writer of the directory: `_move_aside`); CheckpointRestoreError when none restores;
    None when there are no steps."""
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        error = None
        try:
            result = restore_step(step)
        except keep_going:
            raise
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for a damaged file
            error = e
        if not _anywhere(error is not None):
            return step, result
        reason = _reason(error) if error is not None else "another process could not restore it"
        if i + 1 == len(steps):
            raise CheckpointRestoreError(f"no checkpoint in {manager.directory} can be restored; the oldest, "
                                         f"step {step}: {reason}") from error
        moved = f"; moved it to {_move_aside(manager, step)}" if move_aside else ""
        log(f"warning: checkpoint {manager.directory}/{step} cannot be restored ({reason}){moved}; "
            f"falling back to step {steps[i + 1]}")
    return None


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any,
                   log: Callable[[str], None] = log_to_stderr, check_meta: Optional[Callable[[dict], None]] = None,
                   keep_going: tuple = (), move_aside: bool = False) -> Optional[tuple[int, Any, dict]]:
    """-> (step, state, meta) of the newest complete checkpoint that restores and matches its
    checksums, restoring the iterator in place; None when there is none. `abstract_state`
    carries the target shardings.

    check_meta(meta) runs on the step's meta before its arrays are read (the run's identity);
    what it raises of the `keep_going` types propagates instead of falling back. move_aside:
    the steps skipped are renamed `<step>.damaged` (the training run, the directory's writer).
    """

    def restore_step(step):
        meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        if check_meta is not None:
            check_meta(meta)
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA] = grain_ckpt.CheckpointRestore(data_iterator)
        state = manager.restore(step, args=ocp.args.Composite(**items))[STATE]
        verify_checksums(state, meta.get(CHECKSUMS))
        return state, meta

    found = _newest_first(manager, restore_step, log, keep_going, move_aside)
    return None if found is None else (found[0], *found[1])


class _SkipOtherItemsWarning(logging.Filter):
    """orbax warns about every item of a step it is not asked for (the data iterator, meta)."""

    def filter(self, record):
        return "could not be restored" not in record.getMessage()


def _state_manager(checkpoints_dir) -> ocp.CheckpointManager:
    # Registering the handlers lets the manager read the state's tree metadata without a target.
    return read_only_manager(checkpoints_dir, item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                                                             META: ocp.JsonCheckpointHandler()})


def _restore_fields(manager: ocp.CheckpointManager, step: int, collections: Optional[Iterable[str]] = None,
                    shardings: Optional[dict] = None) -> dict:
    """{field: tree} of the saved train state of `step`, read by its tree metadata (no target):
    the named fields (all when None; named ones need a 'params' field) that it has and that hold
    arrays; numpy arrays, or global arrays laid out by `shardings` ({field: tree of shardings})."""
    shardings = shardings or {}
    metadata = manager.item_metadata(step)[STATE]
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, dict) or (collections is not None and "params" not in tree):
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointRestoreError(f"{manager.directory}/{step}/{STATE}: no 'params' in the saved train state "
                                     f"(found {keys})")
    names = tree if collections is None else [k for k in collections if k in tree]
    wanted = {k: tree[k] for k in names if jax.tree.leaves(tree[k])}

    def target(m, s=None):
        return np.zeros(m.shape, m.dtype) if s is None else jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s)

    def restore_arg(m, s=None):
        return ocp.RestoreArgs(restore_type=np.ndarray) if s is None else ocp.ArrayRestoreArgs(sharding=s)

    def over(fn):  # fn over every saved array of the wanted fields, with its sharding if given
        return {k: jax.tree.map(fn, sub, *([shardings[k]] if k in shardings else [])) for k, sub in wanted.items()}

    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=over(target), restore_args=over(restore_arg), partial_restore=True)}))[STATE]
    return {k: restored[k] if k in shardings else jax.tree.map(np.asarray, restored[k]) for k in restored}


def stored_checksums(step_dir) -> dict[str, str]:
    """`array_checksums` of the train state saved in checkpoint step directory `step_dir`, read
    back (`vimpac migrate`: a step written before checksums were recorded gets them)."""
    step_dir = Path(step_dir)
    quiet = _SkipOtherItemsWarning()
    logging.getLogger("absl").addFilter(quiet)
    manager = _state_manager(step_dir.parent)
    try:
        return array_checksums(_restore_fields(manager, int(step_dir.name)))
    finally:
        manager.close()
        logging.getLogger("absl").removeFilter(quiet)


def restore_collections(checkpoints_dir, collections: Iterable[str], *, shardings: Optional[dict] = None,
                        log: Callable[[str], None] = log_to_stderr,
                        check_meta: Optional[Callable[[dict], None]] = None, keep_going: tuple = ()
                        ) -> tuple[int, dict]:
    """-> (step, {collection: tree}) of the newest step that restores (its arrays checked
    against the checksums it recorded): only the named
    fields of the saved TrainState ('params', 'batch_stats', 'opt_state'), never the others
    (a partial restore: an export does not read the Adam moments). Trees are numpy arrays, or
    global arrays laid out by `shardings` ({collection: tree of shardings}). A field the state
    does not have (or an empty one) is left out. CheckpointRestoreError when no step restores.
    check_meta(meta), keep_going: as `restore_latest`'s.
    """
    collections = tuple(collections)
    quiet = _SkipOtherItemsWarning()
    logging.getLogger("absl").addFilter(quiet)
    manager = _state_manager(checkpoints_dir)

    def restore_step(step):
        meta = _read_meta(manager, step)
        if check_meta is not None:
            check_meta(meta)
        restored = _restore_fields(manager, step, collections, shardings)
        for k in restored:  # raises on a mismatch, so the step before is tried
            verify_checksums(restored[k], meta.get(CHECKSUMS), prefix=f"{k}/")
        return restored

    try:
        found = _newest_first(manager, restore_step, log, keep_going)
    finally:
        manager.close()
        logging.getLogger("absl").removeFilter(quiet)
    if found is None:
        raise CheckpointRestoreError(f"{Path(checkpoints_dir)}: no complete checkpoint step (an interrupted save is "
                                     f"never used)")
    step, restored = found
    return int(step), restored


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The step's meta item; {} when the step has none (a checkpoint written by other code)."""
    if not (Path(manager.directory) / str(step) / META).exists():
        return {}
    return manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `state`, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        state)
