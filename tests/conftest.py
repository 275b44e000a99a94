from __future__ import annotations

import os
import pty
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def promtool() -> str:
    """Path of the real promtool; CI must have it, a developer machine may skip."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not found: CI must install Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def promtool_check(promtool: str, exposition: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )


@pytest.fixture
def artifacts() -> Path:
    path = Path(__file__).resolve().parent.parent / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


def scrape_daemon(data_dir: Path, node: str, *flags: str, settle: float = 1.0) -> bytes:
    """Run ``tally daemon`` (0.2 s interval, a free loopback port) with ``flags``, scrape
    /metrics once after ``settle`` seconds, stop it with SIGTERM and require exit 0."""
    import signal
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "telemetry.cli", "daemon", "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(data_dir), "--interval", "0.2", "--node", node, *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and "serving" in proc.stdout.readline()
        time.sleep(settle)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text: bytes = resp.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    assert code == 0, proc.stderr.read() if proc.stderr else code
    return text


def stderr_on_a_terminal(*args: str) -> bytes:
    """Run ``tally ARGS`` with stderr on a pseudo-terminal (stdout discarded); what it drew.

    Fails the test when the command does not exit 0.
    """
    main, replica = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "telemetry.cli", *args],
            stdout=subprocess.DEVNULL, stderr=replica, timeout=300,
        )  # fmt: skip
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
