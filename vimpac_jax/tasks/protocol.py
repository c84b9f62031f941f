"""The interface of a training task: what the loop (`training/train.py`) calls."""

from pathlib import Path
from typing import Any, Iterator, Optional, Protocol


class Task(Protocol):
    """A task is built from the config and the mesh (`Task(config, mesh, log=...)`) and exposes:

    total_steps                 updates of this run (the loop's length)
    items_per_step              clips (or `items_name`) per update, for the progress line's rate
    loss_name                   the metric the progress line shows and the loop checks is finite
    workdir                     the run directory, set by the loop before `init_state`
    init_state(key)             the state (sharded): fresh parameters, or `config.init_from`
    iterator()                  this process's share of the training data (a checkpointable grain
                                iterator of local batches)
    global_batch(local)         a local batch -> the batch of global arrays the step takes
    step(state, batch, key)     jitted -> (state, metrics); metrics are replicated scalars
    evaluation_due(step)        whether `evaluate(state, step=step)` has work at this step
    evaluate(state, step=, full=)  periodic (what is due at `step`) or final (`full`: all)
                                evaluation -> dict of scalars (may be empty)

    Optional: `items_name` (default "clips"), the unit of `items_per_step`.
    """

    total_steps: int
    items_per_step: int
    loss_name: str
    workdir: Optional[Path]

    def init_state(self, key) -> Any: ...

    def iterator(self) -> Iterator[dict]: ...

    def global_batch(self, local: dict) -> Any: ...

    def step(self, state, batch, key) -> tuple[Any, dict]: ...

    def evaluation_due(self, step: int) -> bool: ...

    def evaluate(self, state, *, step: Optional[int] = None, full: bool = False) -> dict: ...
