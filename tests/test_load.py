"""Load: the daemon on this machine's real /proc under many concurrent and misbehaving scrapers.

Every request goes to 127.0.0.1 on a port this module picked; every loop is bounded in count and
in time, and the daemon is stopped (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.load import INTERVAL, ROUND_SHARE, Scrapes, percentile, scrape_loop

pytestmark = pytest.mark.e2e

SCRAPERS = 50
REQUESTS_PER_SCRAPER = 200
LOAD_BOUND_SECONDS = 180.0

STALLED = 20
SLOW_READERS = 5
NORMAL_SCRAPES = 200
NORMAL_SCRAPE_BOUND_SECONDS = 2.0
EXIT_BOUND_SECONDS = 5.0  # well under the server's 10 s client timeout


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path / "data", tmp_path, node="load", interval=INTERVAL)
    try:
        proc.wait_rows(3)
        yield proc
    finally:
        proc.kill()


def test_50_concurrent_scrapers_all_succeed_and_collection_keeps_its_interval(
    daemon: DaemonProcess, artifacts: Path
) -> None:
    total = SCRAPERS * REQUESTS_PER_SCRAPER
    out = Scrapes()
    barrier = threading.Barrier(SCRAPERS + 1)
    rows0, t0 = daemon.rows()
    deadline = time.monotonic() + LOAD_BOUND_SECONDS
    threads = [
        threading.Thread(
            target=scrape_loop,
            args=(daemon.port, REQUESTS_PER_SCRAPER, deadline, out, None, barrier),
            name=f"scraper-{i}",
            daemon=True,
        )
        for i in range(SCRAPERS)
    ]
    for t in threads:
        t.start()
    barrier.wait(timeout=30)
    began = time.monotonic()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 10)
    wall = time.monotonic() - began
    rows1, t1 = daemon.rows()
    threads_peak = daemon.status_field("Threads")

    done = len(out.latencies)
    assert done, f"no request completed: {out.errors[:5]}"
    expected_rounds = (t1 - t0) / INTERVAL
    p50, p99 = percentile(out.latencies, 0.5), percentile(out.latencies, 0.99)
    report = (
        f"load: {SCRAPERS} scrapers x {REQUESTS_PER_SCRAPER} requests, interval {INTERVAL:g} s\n"
        f"requests completed   {done} of {total}, errors {len(out.errors)}\n"
        f"wall seconds         {wall:.2f}\n"
        f"throughput req/s     {done / wall:.1f}\n"
        f"latency p50 ms       {p50 * 1e3:.2f}\n"
        f"latency p99 ms       {p99 * 1e3:.2f}\n"
        f"latency max ms       {max(out.latencies) * 1e3:.2f}\n"
        f"latency mean ms      {statistics.fmean(out.latencies) * 1e3:.2f}\n"
        f"rows written         {rows1 - rows0:.0f} in {t1 - t0:.2f} s "
        f"({expected_rounds:.1f} rounds due, {(rows1 - rows0) / expected_rounds:.0%})\n"
        f"daemon threads after {threads_peak}\n"
    )
    print("\n" + report)
    (artifacts / "load.txt").write_text(report)

    assert not any(t.is_alive() for t in threads), "a scraper outlived the time bound"
    assert not out.errors, f"{len(out.errors)} errors, first: {out.errors[:5]}"
    assert done == total, f"only {done} of {total} requests within {LOAD_BOUND_SECONDS:g} s"
    # A full listen backlog drops SYNs; the client's retransmission then costs a whole second.
    assert p99 < 1.0, report
    assert rows1 - rows0 >= ROUND_SHARE * expected_rounds, report
    assert daemon.proc.poll() is None, daemon.stderr()


def _slow_reader(port: int, stop: threading.Event, got: list[bytes], errors: list[str]) -> None:
    """A full request with gzip off, then 1 byte per 100 ms until ``stop`` or end of stream."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: small window
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Encoding: identity\r\n\r\n"
        )
        for _ in range(3000):  # at most 300 s, ended long before by ``stop``
            if stop.wait(0.1):
                return
            byte = sock.recv(1)
            if not byte:
                return
            got.append(byte)
    except OSError as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()


def _stall(port: int, count: int) -> list[socket.socket]:
    stalled = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /metr")  # half a request line, never finished
        stalled.append(sock)
    return stalled


def test_stalled_and_slow_clients_do_not_hold_up_scrapes_collection_or_shutdown(
    daemon: DaemonProcess,
) -> None:
    # The daemon's own threads (a scrape's handler thread may still be finishing: take the least).
    readings = []
    for _ in range(5):
        readings.append(daemon.status_field("Threads"))
        time.sleep(0.05)
    threads_before = min(readings)
    stop = threading.Event()
    readers: list[threading.Thread] = []
    slow_bytes: list[list[bytes]] = [[] for _ in range(SLOW_READERS)]
    slow_errors: list[str] = []
    stalled = _stall(daemon.port, STALLED)
    try:
        for i in range(SLOW_READERS):
            t = threading.Thread(
                target=_slow_reader,
                args=(daemon.port, stop, slow_bytes[i], slow_errors),
                daemon=True,
            )
            t.start()
            readers.append(t)
        held, until = 0, time.monotonic() + 5  # let the daemon accept them all
        while held < STALLED and time.monotonic() < until:
            time.sleep(0.1)
            held = daemon.status_field("Threads") - threads_before
        assert held >= STALLED, f"only {held} handler threads held by {STALLED} stalled clients"

        rows0, t0 = daemon.rows()
        latencies = []
        for _ in range(NORMAL_SCRAPES):
            began = time.perf_counter()
            body = daemon.scrape(timeout=NORMAL_SCRAPE_BOUND_SECONDS + 1)
            latencies.append(time.perf_counter() - began)
            assert b"tally_build_info" in body
            time.sleep(0.02)  # spread the scrapes over a few collection rounds
        rows1, t1 = daemon.rows()
        expected_rounds = (t1 - t0) / INTERVAL
        print(
            f"\nwith {STALLED} stalled and {SLOW_READERS} slow clients: {NORMAL_SCRAPES} scrapes "
            f"p50 {percentile(latencies, 0.5) * 1e3:.2f} ms, max {max(latencies) * 1e3:.2f} ms; "
            f"rows {rows1 - rows0:.0f} of {expected_rounds:.1f} rounds due"
        )
        assert max(latencies) < NORMAL_SCRAPE_BOUND_SECONDS
        assert rows1 - rows0 >= ROUND_SHARE * expected_rounds
        assert not slow_errors, slow_errors
        for got in slow_bytes:
            assert b"".join(got).startswith(b"HTTP/1.0 200"), b"".join(got)

        # Fresh stalled sockets right before SIGTERM, so their handler threads are surely still
        # blocked reading when the daemon is asked to stop.
        stalled += _stall(daemon.port, STALLED)
        time.sleep(0.2)
        code, took = daemon.terminate(timeout=EXIT_BOUND_SECONDS)
        print(f"SIGTERM with {len(stalled)} stalled sockets open: exit {code} in {took:.2f} s")
        assert code == 0, daemon.stderr()
        assert took < EXIT_BOUND_SECONDS
        assert "Traceback" not in daemon.stderr(), daemon.stderr()
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=5)
        for sock in stalled:
            sock.close()
