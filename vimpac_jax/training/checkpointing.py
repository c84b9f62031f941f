"""Training checkpoints with orbax: the train state, the data iterator, and the step's RNG.

One `CheckpointManager` per workdir (`workdir/checkpoints/<step>/`), with three items:
  state  the TrainState pytree (sharded arrays are saved and restored in place);
  data   the grain iterator state (grain's orbax handler), so a resumed run reads exactly the
         batches an uninterrupted run would have read;
  meta   JSON: the step and the base RNG seed/key data, for checks on restore.
orbax writes each step under a temporary name and finalises it only when every item of every
process is written, and `latest_step()` only sees finalised steps: a checkpoint interrupted by
a crash is never restored.
"""

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp


def make_manager(workdir, *, save_every: int, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1), max_to_keep=max(int(keep), 1), create=True,
        enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any, meta: dict,
         *, force: bool = False) -> bool:
    """Asynchronous save (returns at once); `manager.wait_until_finished()` before exiting."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
        items["data"] = grain_ckpt.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


class CheckpointRestoreError(ValueError):
    """No checkpoint of the workdir could be restored."""


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any,
                   log: Callable[[str], None] = logging.getLogger(__name__).warning
                   ) -> Optional[tuple[int, Any, dict]]:
    """-> (step, state, meta) of the latest complete checkpoint that restores, restoring the
    iterator in place; None when there is none. `abstract_state` carries the target shardings.

    A finalised step can still be damaged afterwards (a truncated or lost file): it is skipped
    with a warning naming why, and the step before it is tried, down to the oldest kept.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain_ckpt.CheckpointRestore(data_iterator)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for a damaged file
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            if i + 1 == len(steps):
                raise CheckpointRestoreError(f"no checkpoint in {manager.directory} can be restored; the oldest, step "
                                             f"{step}: {reason}") from e
            log(f"warning: checkpoint {manager.directory}/{step} cannot be restored ({reason}); "
                f"falling back to step {steps[i + 1]}")
            continue
        return step, restored["state"], restored["meta"]
    return None


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `state`, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        state)
