"""The config files, installed as `vimpac_jax.configs` (setup.py): `--config configs/pretrain.py:small`
finds them in a checkout or, outside one, in the installed package."""
