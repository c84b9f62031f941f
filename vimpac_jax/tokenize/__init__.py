"""`vimpac tokenize`: a video collection -> a resumable token store.

`job` runs it (see its docstring for the store layout and resumability) with `options`'
`TokenizeOptions`; `lists` reads the video list, `identity` says what a store is made of,
`journal` records what is done, `shards` writes the ArrayRecord shards, `batcher` packs frames
into device batches. Status lines are `logging` records (loggers under `vimpac_jax`, see
`vimpac_jax/logs.py`); the progress line is `vimpac_jax.progress`.
"""
