"""The training tasks: what differs between runs of the one training loop (`training/train.py`).

`protocol.py` is the interface the loop calls, `registry.py` the one map from `config.task` to
a task class; each task has its module (`pretrain.py`, `finetune.py`, `tokenizer.py`), beside what
they share (`store_task.py`: a token store and a `TrainState`; `init_source.py`: `config.init_from`;
`multiview.py`: the classifier's test; `knn.py`: pre-training's kNN monitor). Tasks sit above
`training/` (the loop, steps, state, checkpoints, the run directory) and use it; `training/`
imports nothing from here: whoever runs the loop (`commands/train.py`, the demo, tests,
benchmarks) hands `training.train.train` the registry's `make_task`.
"""
