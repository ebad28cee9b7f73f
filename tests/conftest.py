"""Shared fixtures. `shared_data` finds ../shared/data (real public datasets; CI always has it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LMFORGE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test with the reason when it is absent."""
    if not (SHARED_DATA / "MANIFEST.md").is_file():
        pytest.skip(f"needs the real datasets in {SHARED_DATA} (../shared/data beside the checkout); "
                    "set LMFORGE_SHARED_DATA to point elsewhere")
    return SHARED_DATA
