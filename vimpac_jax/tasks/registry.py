"""The one map from `config.task` to its task class (`tasks/protocol.py`'s `Task`); the training
loop builds its task here."""

from vimpac_jax.tasks.finetune import FinetuneTask
from vimpac_jax.tasks.pretrain import PretrainTask
from vimpac_jax.tasks.protocol import Task
from vimpac_jax.tasks.tokenizer import VQTokenizerTask

TASKS = {"pretrain": PretrainTask, "finetune": FinetuneTask, "tokenizer": VQTokenizerTask}


def make_task(config, mesh, *, log) -> Task:
    """The task of `config.task`, built for `mesh` (it reads the data indexes and checks shapes:
    fails before anything compiles)."""
    if config.task not in TASKS:
        raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {config.task!r}")
    return TASKS[config.task](config, mesh, log=log)
