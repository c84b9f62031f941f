"""Shared test fixtures: where the golden outputs of the released code live."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("VIMPAC_GOLDEN", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"golden outputs not found at {GOLDEN} (set VIMPAC_GOLDEN)")
        pytest.skip(f"golden outputs not found at {GOLDEN} (set VIMPAC_GOLDEN)")
    return GOLDEN
