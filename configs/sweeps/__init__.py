"""The shipped ablation sweeps (`vimpac sweep --sweep configs/sweeps/FILE.py`), installed as
`vimpac_jax.configs.sweeps`."""
