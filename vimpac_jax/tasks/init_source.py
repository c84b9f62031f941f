"""`config.init_from`: the parameters (and, for a second pre-training stage, the optimizer state)
a run starts from, read from a model checkpoint or a training workdir and adapted to the run's
state (`training/init_from.py`: positional tables interpolated, task heads expected to differ)."""

import logging
from pathlib import Path

import jax
import numpy as np

from vimpac_jax import checkpoints
from vimpac_jax.training import checkpointing
from vimpac_jax.training import init_from as init_from_lib
from vimpac_jax.training import workdir as workdir_lib
from vimpac_jax.training.pretrain_step import TrainState


def load_init_source(path: str, log=checkpointing.log_to_stderr) -> tuple[dict, dict, dict]:
    """(model config, {'params', 'batch_stats'[, 'opt_state']}, record) of a model checkpoint or
    of the newest intact checkpoint of a training workdir (which also has the optimizer state).
    record: {'init_from': path, 'step': the workdir checkpoint's step (None for a model
    checkpoint), 'skipped': the warnings about newer steps that could not be restored}."""
    p = Path(path)
    record = {"init_from": str(path), "step": None, "skipped": []}
    if checkpoints.is_model_checkpoint(p):
        return (*checkpoints.load_model(p), record)
    if workdir_lib.is_workdir(p):
        def warn(message: str) -> None:
            record["skipped"].append(message)
            log(message)

        try:
            step, restored = workdir_lib.restore_variables(p, ("params", "batch_stats", "opt_state"), log=warn)
        except workdir_lib.WorkdirError as e:
            raise ValueError(f"config.init_from={path}: {e}") from None
        record["step"] = int(step)
        return workdir_lib.read_model_config(p), {"params": restored["params"],
                                                   "batch_stats": restored.get("batch_stats", {}),
                                                   "opt_state": restored.get("opt_state")}, record
    raise FileNotFoundError(f"config.init_from={path}: not a model checkpoint (model_config.json) nor a training "
                            f"workdir ({workdir_lib.CONFIG_FILE} + {workdir_lib.CHECKPOINTS_DIR}/)")


def init_source_line(record: dict) -> str:
    """The log line naming what a run was initialised from (the step, and whether newer ones
    were skipped as damaged)."""
    if record["step"] is None:
        return f"init_from: {record['init_from']} (a model checkpoint)"
    skipped = (f"; {len(record['skipped'])} newer checkpoint(s) could not be restored (warned above), so not its "
               f"newest" if record["skipped"] else " (its newest intact checkpoint)")
    return f"init_from: {record['init_from']} at step {record['step']}{skipped}"


def initialise_from(state: TrainState, path: str, *, allow_mismatch: bool, with_optimizer: bool,
                    log) -> tuple[TrainState, dict]:
    """Overwrite the state's parameters and BatchNorm statistics (and, `with_optimizer`, the Adam
    moments: the second pre-training stage) from `path`, interpolating positional tables.
    Returns the state and `load_init_source`'s record of what was read."""
    _, source, record = load_init_source(path)
    log(init_source_line(record))
    target = {"params": state.params, "batch_stats": state.batch_stats}
    src = {"params": source["params"], "batch_stats": source.get("batch_stats") or {}}
    if with_optimizer:
        if source.get("opt_state") is None:
            raise ValueError(f"config.init_from_optimizer: {path} holds no optimizer state (use a training workdir)")
        target["opt_state"], src["opt_state"] = state.opt_state, source["opt_state"]
    expected = tuple(f"/{head}/" for head in init_from_lib.TASK_HEADS)  # heads that differ by task
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    values, report = init_from_lib.adapt_tree(abstract, src, expected_missing=expected, expected_unused=expected,
                                              allow_mismatch=allow_mismatch)
    log(init_from_lib.format_report(report))
    logging.getLogger(__name__).debug("init_from: every leaf not restored as is:\n%s", init_from_lib.report_details(report))
    filled = jax.tree.map(lambda v, old: v if isinstance(v, np.ndarray) else old, values, target)
    placed = jax.tree.map(lambda v, old: jax.device_put(np.asarray(v, old.dtype), old.sharding), filled, target)
    return state.replace(**placed), record
