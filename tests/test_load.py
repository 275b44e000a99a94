"""Load: the daemon on this machine's real /proc under many concurrent and misbehaving scrapers.

Every request goes to 127.0.0.1 on a port this module picked; every loop is bounded in count and
in time, and the daemon is stopped (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import http.client
import math
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port

pytestmark = pytest.mark.e2e

INTERVAL = 0.2
# Collection must keep at least this share of its rounds while the scrapers hammer the daemon.
ROUND_SHARE = 0.7

SCRAPERS = 50
REQUESTS_PER_SCRAPER = 200
LOAD_BOUND_SECONDS = 180.0

STALLED = 20
SLOW_READERS = 5
NORMAL_SCRAPES = 200
NORMAL_SCRAPE_BOUND_SECONDS = 2.0
EXIT_BOUND_SECONDS = 5.0  # well under the server's 10 s client timeout


# Runs the rest of argv in the same process (same pid) after asking the kernel to SIGTERM it when
# the test process dies (PR_SET_PDEATHSIG survives exec), so no daemon outlives a killed run.
DIE_WITH_PARENT = [
    sys.executable, "-c",
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
]  # fmt: skip


class DaemonProcess:
    """``tally daemon`` as a subprocess on loopback; output goes to files (no pipe can fill)."""

    def __init__(self, data: Path, logs: Path, node: str = "load", interval: float = INTERVAL):
        self.port = free_port()
        self.interval = interval
        self.stdout_path = logs / f"daemon-{self.port}.out"
        self.stderr_path = logs / f"daemon-{self.port}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [*DIE_WITH_PARENT, "-m", "telemetry.cli", "daemon",
                 "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(data),
                 "--interval", f"{interval:g}", "--node", node],
                stdout=out, stderr=err,
            )  # fmt: skip
        self.pid = self.proc.pid
        self._wait_banner(timeout=30)

    def _wait_banner(self, timeout: float) -> None:
        want = f"serving http://127.0.0.1:{self.port}/metrics"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if want in self.stdout_path.read_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"daemon did not start: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def scrape(self, timeout: float = 5) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, resp.status
            return body
        finally:
            conn.close()

    def value(self, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(self.scrape().decode()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        raise KeyError(name)

    def rows(self) -> tuple[float, float]:
        """(rows written, monotonic time of the scrape that read them)."""
        before = time.monotonic()
        rows = self.value("tally_store_rows_written_total")
        return rows, (before + time.monotonic()) / 2

    def wait_rows(self, at_least: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.rows()[0] >= at_least:
                return
            time.sleep(0.1)
        raise TimeoutError(f"fewer than {at_least} rows written")

    def status_field(self, field: str) -> int:
        """A number from /proc/<pid>/status, e.g. VmRSS (KiB) or Threads."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if it outlived ``timeout``, seconds it took)."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path / "data", tmp_path)
    try:
        proc.wait_rows(3)
        yield proc
    finally:
        proc.kill()


class Scrapes:
    """Thread-safe tally of scrape results (list.append is atomic)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: list[str] = []


def scrape_loop(
    port: int,
    count: int,
    deadline: float,
    out: Scrapes,
    stop: threading.Event | None = None,
    start: threading.Barrier | None = None,
) -> None:
    """Up to ``count`` GETs of /metrics until ``deadline`` (monotonic) or ``stop``.

    One HTTPConnection per thread: it keeps the connection alive where the server allows (tally
    answers HTTP/1.0 and closes, so http.client reconnects for the next request).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        if start is not None:
            start.wait(timeout=30)
        for _ in range(count):
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                return
            began = time.perf_counter()
            try:
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                out.errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                continue
            out.latencies.append(time.perf_counter() - began)
            if resp.status != 200 or b"tally_build_info" not in body:
                out.errors.append(f"status {resp.status}, {len(body)} bytes")
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


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
