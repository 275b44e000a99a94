"""The ``tally`` command as a subprocess, as an operator runs it."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from typing import Any

TALLY = [sys.executable, "-m", "telemetry.cli"]


def tally(*args: str, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``tally ARGS`` to completion; stdout and stderr captured as text. ``kw`` goes to
    ``subprocess.run`` (``env``, ``input``, …)."""
    return subprocess.run([*TALLY, *args], capture_output=True, text=True, timeout=timeout, **kw)


def stderr_on_a_terminal(*args: str) -> bytes:
    """Run ``tally ARGS`` with stderr on a pseudo-terminal (stdout discarded); what it drew.

    Fails the test when the command does not exit 0.
    """
    main, replica = pty.openpty()
    try:
        proc = subprocess.run(
            [*TALLY, *args], stdout=subprocess.DEVNULL, stderr=replica, timeout=300
        )
        os.close(replica)
        seen = b""
        while True:
            try:
                data = os.read(main, 4096)
            except OSError:
                break
            if not data:
                break
            seen += data
    finally:
        os.close(main)
    assert proc.returncode == 0, seen
    return seen
