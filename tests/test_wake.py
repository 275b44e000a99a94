"""WakePipe: what the daemon's loop and the HTTP server's thread sleep on."""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path

from telemetry.wake import WakePipe


def test_a_wake_from_another_thread_ends_a_poll() -> None:
    waker = WakePipe()
    poller = select.poll()
    poller.register(waker.fd, select.POLLIN)
    assert poller.poll(0) == []
    threading.Timer(0.05, waker.wake).start()
    assert poller.poll(5000), "woken"
    waker.close()


def test_a_wake_after_close_never_writes_into_a_descriptor_reused_meanwhile(
    tmp_path: Path,
) -> None:
    """A stop from another thread may come after the loop closed its pipe, when a journal may
    already hold the pipe's old descriptor number."""
    waker = WakePipe()
    numbers = {waker.fd, waker._write}
    waker.close()
    journal = tmp_path / "journal"
    reused = [os.open(journal, os.O_RDWR | os.O_CREAT) for _ in range(2)]
    try:
        assert numbers <= set(reused), "the pipe's numbers are taken again"
        waker.wake()
        waker.close()  # twice is fine
        assert journal.read_bytes() == b""
    finally:
        for fd in reused:
            os.close(fd)
