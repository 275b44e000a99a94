"""Fixtures only; helpers that tests share live in ``tests/support``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.promtool import find_promtool


@pytest.fixture
def promtool() -> str:
    """Path of the real promtool; CI must have it, a developer machine may skip."""
    return find_promtool()


@pytest.fixture
def artifacts() -> Path:
    path = Path(__file__).resolve().parent.parent / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path
