"""The one progress line (`vimpac_jax/progress.py`) and where log lines go (`vimpac_jax/logs.py`)."""

import io
import logging
import re

import pytest

from vimpac_jax import logs, progress


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_format_seconds():
    assert progress.format_seconds(0) == "0:00:00"
    assert progress.format_seconds(3725.9) == "1:02:05"
    assert progress.format_seconds(100_000) == "27:46:40"
    assert progress.format_seconds(float("inf")) == progress.format_seconds(float("nan")) == "?"


def test_training_line_counts_rates_and_eta_from_the_resumed_step(clock):
    out = io.StringIO()
    p = progress.Progress(100, label="step ", unit="steps", count_unit=False, per_unit={"clips": 8}, start=20,
                          every_seconds=5, stream=out)
    clock.now += 10
    p.update(40, note="loss=1.2346")  # 20 steps in 10 s since step 20
    assert out.getvalue() == "step 40/100 loss=1.2346, 2.00 steps/s, 16.0 clips/s, ETA 0:00:30\n"
    clock.now += 1
    p.update(41)  # within every_seconds of the last line: nothing
    assert out.getvalue().count("\n") == 1
    p.update(42, force=True)
    assert out.getvalue().splitlines()[-1].startswith("step 42/100 loss=1.2346, ")


def test_tokenize_line_with_failed_videos_and_frames_in_place_on_a_terminal(clock):
    out = _Tty()
    p = progress.Progress(10, label="tokenize[0/1]: ", unit="videos", counted=("frames",), failed=True,
                          every_seconds=0, stream=out)
    clock.now += 2
    p.update(add=3, failed=1, frames=40)
    p.close()
    first, final = out.getvalue().split("\r")[1:]
    assert first == "tokenize[0/1]: 4/10 videos (1 failed), 2.00 videos/s, 20.0 frames/s, ETA 0:00:03"
    assert final == first + "\n"  # redrawn in place, ended by the final line
    with pytest.raises(KeyError, match="frames"):
        p.update(bytes=1)


def test_lines_go_to_the_progress_logger_and_disabled_processes_stay_quiet(clock, caplog):
    with caplog.at_level(logging.INFO, logger="vimpac_jax.progress"):
        progress.Progress(4, label="evaluate: ", unit="videos", every_seconds=0).update(add=1)
        progress.Progress(4, label="other: ", unit="videos", every_seconds=0, enabled=False).update(add=1)
    assert [r.name for r in caplog.records] == ["vimpac_jax.progress"]
    assert re.fullmatch(r"evaluate: 1/4 videos, [\d.]+ videos/s, ETA 0:00:00", caplog.records[0].getMessage())


def test_setup_sends_info_lines_to_the_current_stderr_once(capsys, monkeypatch):
    logger = logging.getLogger(logs.LOGGER)
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setenv("VIMPAC_LOG_LEVEL", "warning")
    logs.setup()
    logs.setup()
    assert len(logger.handlers) == 1 and logger.level == logging.WARNING
    logging.getLogger("vimpac_jax.some.module").info("quiet")
    logging.getLogger("vimpac_jax.some.module").warning("shown %d", 1)
    captured = capsys.readouterr()
    assert captured.err == "shown 1\n" and captured.out == ""


def test_a_command_prints_each_line_once_though_a_library_configured_the_root_logger(capsys, monkeypatch):
    """Importing orbax.checkpoint installs a root StreamHandler (basicConfig style); while a command
    runs its lines go through our handler only, and propagation comes back afterwards."""
    import sys
    import types

    import orbax.checkpoint  # noqa: F401  (the library that configures the root logger)

    from vimpac_jax import cli

    root_handler = logging.StreamHandler(sys.stderr)  # as the library's, on the stderr of this test
    root_handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    monkeypatch.setattr(logging.root, "handlers", [root_handler])
    command = types.ModuleType("fake_command")
    command.main = lambda argv: logging.getLogger("vimpac_jax.fake").info("one line") or 0
    monkeypatch.setitem(sys.modules, "fake_command", command)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_command", "a stand-in command"))
    logs.setup()  # as importing any vimpac_jax.commands module does
    assert cli.main(["fake"]) == 0
    assert capsys.readouterr().err.splitlines() == ["one line"]
    assert logging.getLogger(logs.LOGGER).propagate
