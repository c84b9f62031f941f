"""Ahead-of-time compilation of a run's programs for a TPU slice (or the local GPUs) without
running them: `chips.py` (the table of TPU generations and slice names), `compile.py` (the
programs built abstractly and compiled on the run's mesh; memory and the cost model's figures),
`hlo_cycles.py` (the cost model's per-instruction estimate grouped by JAX source op).
`vimpac compile` (`commands/compile.py`) is the command over them."""
