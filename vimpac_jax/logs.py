"""Where the package's log lines go: the `vimpac_jax` logger (standard `logging`).

Status and progress lines are INFO records of loggers under `vimpac_jax` (one per module); what
a command prints as its result (tables, JSON, predictions) stays on stdout. The `vimpac` command
(and any `vimpac_jax.commands` module) calls `setup()`, which sends them to stderr as bare lines;
a program that imports the library decides itself, as with any library:

    logging.getLogger("vimpac_jax").setLevel(logging.WARNING)     # silence progress and status
    logging.getLogger("vimpac_jax").addHandler(logging.FileHandler("run.log"))  # or redirect it

From the shell: VIMPAC_LOG_LEVEL=WARNING vimpac ... (any `logging` level name).
"""

import contextlib
import logging
import os
import sys
from typing import Iterator

LOGGER = "vimpac_jax"


class _StderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment (as `logging.lastResort`), so a redirected or
    captured stderr (pytest's capsys, contextlib.redirect_stderr) gets the lines."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup() -> None:
    """Send the `vimpac_jax` logger's records (INFO and up, or VIMPAC_LOG_LEVEL) to stderr, once."""
    logger = logging.getLogger(LOGGER)
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    level = os.environ.get("VIMPAC_LOG_LEVEL", "INFO").upper()
    logger.setLevel(level if isinstance(logging.getLevelName(level), int) else logging.INFO)


@contextlib.contextmanager
def command_output() -> Iterator[None]:
    """While a `vimpac` command runs (`cli.main`): its lines go through `setup()`'s handler only.

    Importing orbax.checkpoint configures the root logger (a basicConfig-style StreamHandler),
    which would print every line a second time as "INFO:vimpac_jax...:..."; propagation to the
    root is restored afterwards, so a program (or pytest's caplog) that calls a command in
    process still sees the records at the root.
    """
    setup()
    logger = logging.getLogger(LOGGER)
    previous, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.propagate = previous


class _OrbaxReadOnlyNotice(logging.Filter):
    """Orbax warns 'Given directory is read only=...' (absl) each time a read-only
    CheckpointManager opens: every restore of export, evaluate, predict and init_from, which open
    a run's checkpoints read-only on purpose. Dropped from the absl logger and passed on as a
    DEBUG record of `vimpac_jax.checkpointing`, so VIMPAC_LOG_LEVEL=DEBUG still shows it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Given directory is read only"):
            return True
        logging.getLogger(f"{LOGGER}.checkpointing").debug("orbax: %s", record.getMessage())
        return False


def quiet_orbax_read_only_notice() -> None:
    """Install `_OrbaxReadOnlyNotice` on the absl logger (once; read-only managers call it)."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxReadOnlyNotice) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxReadOnlyNotice())
