"""Fixtures for the end-to-end tests (helpers are plain functions in tests/e2e/procs.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.procs import MeshUp, start_mesh_up


@pytest.fixture
def mesh_up(tmp_path: Path) -> Iterator[MeshUp]:
    """A `mesh up` of this test's own (for tests that break it)."""
    up = start_mesh_up(tmp_path)
    try:
        yield up
    finally:
        up.stop()
