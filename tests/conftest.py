"""Fixtures only; helpers that tests share live in ``tests/support``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
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


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """Warnings of the ``tally`` logger, caught by a handler on it (whatever else is set up)."""
    logger = logging.getLogger("tally")
    handler = _Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
