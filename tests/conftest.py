"""Shared test set-up: the golden outputs of the released code, the `vimpac` runner, scheduling.

Layers: `pytest -m "not slow"` runs the unit and parity tests in process; tests marked `slow`
(markers in pyproject.toml) run real programs end to end. The README's command runs both.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# One persistent compilation cache for the session, inherited by every subprocess: the many
# `vimpac train` runs of the same tiny configs (train, sweep, multi-host tests) compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vimpac-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("VIMPAC_GOLDEN", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"golden outputs not found at {GOLDEN} (set VIMPAC_GOLDEN)")
        pytest.skip(f"golden outputs not found at {GOLDEN} (set VIMPAC_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_tokenizer(golden_dir, tmp_path_factory) -> Path:
    """The tiny DALL-E golden pickles converted once per session (a tokenizer directory)."""
    from vimpac_jax.conversion import dalle as dalle_conversion

    src = golden_dir / "dalle_tiny"
    dst = tmp_path_factory.mktemp("tokenizer") / "dalle_tiny"
    rc = dalle_conversion.main(["--encoder", str(src / "encoder.pkl"), "--decoder", str(src / "decoder.pkl"), str(dst)])
    assert rc == 0
    return dst


def run_vimpac(*args, env=None, cwd=REPO, check=False, timeout=None, background=False):
    """`python -m vimpac_jax ARGS` in a fresh process that imports this checkout's package.

    env: the child's environment (default: ours); PYTHONPATH gets this checkout first either way,
    so a run from another `cwd` tests this code, not an installed copy. Returns the
    CompletedProcess (text stdout/stderr); check=True fails the test with the end of stderr
    on a nonzero exit; background=True returns the started Popen instead (pipes open).
    """
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    argv = [sys.executable, "-m", "vimpac_jax", *map(str, args)]
    if background:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


# ------------------------------------------------------------------------------------------------
# Scheduling under pytest-xdist (`-n 2`).

@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent under `-p no:xdist`
def pytest_xdist_make_scheduler(config, log):
    """Send each test module to one worker (xdist's `loadscope`) unless `--dist` is given.

    xdist's default (`load`) deals a module's tests out to all workers in pairs, so every worker
    built the module's fixtures again: the demo chain, the trained tokenizer, the 8-device step
    workers, the training stores. Whole modules build each of them once.
    """
    if any(arg == "-d" or arg.startswith("--dist") for arg in config.invocation_params.args):
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep the order of pytest_collection_modifyitems below
    return LoadScopeScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Under xdist, modules with the most `slow` tests first, each module's tests in file order.

    Longest first keeps the two workers busy to the end instead of one finishing a long module
    alone; modules stay contiguous so no module fixture is built twice.
    """
    if not hasattr(config, "workerinput"):  # a plain `pytest` run keeps the file order
        return
    modules = {}
    for item in items:
        modules.setdefault(item.module.__name__ if item.module else "", []).append(item)
    slow_count = {name: sum(1 for item in group if item.get_closest_marker("slow")) for name, group in modules.items()}
    order = sorted(modules, key=lambda name: -slow_count[name])  # stable: file order among equals
    items[:] = [item for name in order for item in modules[name]]
