"""Shared test fixtures: where the golden outputs of the released code live."""

import os
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
