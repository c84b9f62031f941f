"""Command-line commands; each module has `main(argv) -> int` (see `vimpac_jax.cli`)."""
