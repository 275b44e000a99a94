"""The real ``promtool`` (Debian package ``prometheus``), which lints every exposition."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def find_promtool() -> str:
    """Its path; fails the test on CI without it, skips it on a developer machine."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not found: CI must install Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def promtool_check(promtool: str, exposition: bytes) -> subprocess.CompletedProcess[bytes]:
    """``promtool check metrics`` of ``exposition`` (returncode 0 when it is clean)."""
    return subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
