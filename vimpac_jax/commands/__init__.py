"""Command-line commands; each module has `main(argv) -> int` (see `vimpac_jax.cli`).

Importing a command sets up the package's log lines on stderr (`vimpac_jax.logs.setup`)."""

from vimpac_jax import logs

logs.setup()
