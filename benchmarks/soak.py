"""Soak: ``tally daemon`` at a 0.2 s interval under continuous scrapes for many minutes.

``python -m benchmarks.soak --minutes 30`` starts the daemon as a subprocess on this machine's
/proc and, in the same run, the baseline: a bare prometheus-client ``start_http_server`` exporter
(default registry: process, platform and GC metrics). Both are scraped the same way (the same
number of threads, each scraping without pause), from 127.0.0.1 only. Every minute it prints each
one's RSS, CPU seconds used so far, scrapes and scrape p50/p99 of that minute, and tally's rows
written; at the end the RSS slope (MiB per hour, least squares over the samples after the first
2 minutes) and the CPU seconds per hour of both. SIGTERM or Ctrl-C ends the run early, with the
summary. Both servers are stopped at the end, and die with this process if it is killed.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

MIB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Runs the rest of argv in the same process (same pid) after asking the kernel to SIGTERM it when
# this process dies (PR_SET_PDEATHSIG survives exec): no server outlives a killed soak.
_DIE_WITH_PARENT = [
    sys.executable, "-c",
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
]  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _slope_mib_per_hour(samples: list[tuple[float, int]], skip_seconds: float) -> float:
    points = [(t, rss) for t, rss in samples if t >= skip_seconds]
    if len(points) < 3:
        return float("nan")
    fit = statistics.linear_regression([t for t, _ in points], [r / MIB for _, r in points])
    return fit.slope * 3600


class Target:
    """One server under test: its process, its scrapers' results, its resource samples."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, marker: bytes):
        self.name = name
        self.proc = proc
        self.port = port
        self.marker = marker
        self.lock = threading.Lock()
        self.minute: list[float] = []
        self.all: list[float] = []
        self.errors = 0
        self.last_error = ""
        self.samples: list[tuple[float, int]] = []  # (seconds since start, RSS bytes)
        self.cpu0 = 0.0

    def record(self, latency: float | None, error: str = "") -> None:
        with self.lock:
            if latency is None:
                self.errors += 1
                self.last_error = error
            else:
                self.minute.append(latency)
                self.all.append(latency)

    def take_minute(self) -> list[float]:
        with self.lock:
            out, self.minute = self.minute, []
        return out


def _scrape_loop(target: Target, deadline: float, stop: threading.Event, pause: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=5)
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                target.record(None, f"{type(exc).__name__}: {exc}")
                conn.close()
                stop.wait(0.1)
                continue
            if resp.status == 200 and target.marker in body:
                target.record(time.perf_counter() - began)
            else:
                target.record(None, f"status {resp.status}, {len(body)} bytes")
            if pause:
                stop.wait(pause)
    finally:
        conn.close()


def _get(port: int) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read()
    finally:
        conn.close()


def _rows_written(port: int) -> float:
    for line in _get(port).decode().splitlines():
        if line.startswith("tally_store_rows_written_total "):
            return float(line.split()[1])
    return float("nan")


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            _get(port)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} not ready in {timeout:g} s")


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def run(minutes: float, interval: float, scrapers: int, pause: float, sample: float) -> None:
    seconds = minutes * 60
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    with tempfile.TemporaryDirectory(prefix="tally-soak-") as data:
        port, base_port = _free_port(), _free_port()
        daemon = subprocess.Popen(
            [*_DIE_WITH_PARENT, "-m", "telemetry.cli", "daemon", "--listen", f"127.0.0.1:{port}",
             "--data-dir", data, "--interval", f"{interval:g}", "--node", "soak"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        lifetime = seconds + 600  # the baseline ends by itself even if nobody stops it
        baseline = subprocess.Popen(
            [*_DIE_WITH_PARENT, "-c",
             f"import time, prometheus_client as p; "
             f"p.start_http_server({base_port}, addr='127.0.0.1'); time.sleep({lifetime:.0f})"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        targets = [
            Target("tally", daemon, port, b"tally_build_info"),
            Target("baseline", baseline, base_port, b"process_resident_memory_bytes"),
        ]
        threads: list[threading.Thread] = []
        try:
            for t in targets:
                _wait_ready(t.port, t.proc)
            rows0 = _rows_written(port)
            start = time.monotonic()
            deadline = start + seconds + 10
            for t in targets:
                t.cpu0 = _cpu_seconds(t.proc.pid)
                for i in range(scrapers):
                    th = threading.Thread(
                        target=_scrape_loop,
                        args=(t, deadline, stop, pause),
                        name=f"{t.name}-scraper-{i}",
                        daemon=True,
                    )
                    th.start()
                    threads.append(th)
            print(
                f"soak: {minutes:g} min, tally interval {interval:g} s, {scrapers} scraper "
                f"thread(s) per server, pause {pause:g} s; baseline: prometheus-client "
                f"start_http_server (default registry)",
                flush=True,
            )
            print(
                f"{'min':>4} | {'tally RSS MiB':>13} {'CPU s':>8} {'rows':>8} {'scrapes':>8} "
                f"{'p50 ms':>7} {'p99 ms':>7} | {'base RSS MiB':>12} {'CPU s':>7} "
                f"{'scrapes':>8} {'p50 ms':>7} {'p99 ms':>7}",
                flush=True,
            )
            next_minute = 60.0
            k = 0
            while not stop.is_set():
                k += 1
                at = min(k * sample, seconds)
                if stop.wait(max(0.0, start + at - time.monotonic())):
                    break
                for t in targets:
                    if t.proc.poll() is not None:
                        raise RuntimeError(f"{t.name} exited with {t.proc.returncode}")
                    t.samples.append((at, _rss_bytes(t.proc.pid)))
                if at >= next_minute or at >= seconds:
                    cols = []
                    for t in targets:
                        lat = t.take_minute()
                        cols.append(
                            (
                                t.samples[-1][1] / MIB,
                                _cpu_seconds(t.proc.pid) - t.cpu0,
                                len(lat),
                                _percentile(lat, 0.5) * 1e3,
                                _percentile(lat, 0.99) * 1e3,
                            )
                        )
                    (r, c, n, p50, p99), (br, bc, bn, bp50, bp99) = cols
                    print(
                        f"{at / 60:4.1f} | {r:13.2f} {c:8.1f} {_rows_written(port) - rows0:8.0f} "
                        f"{n:8d} {p50:7.2f} {p99:7.2f} | {br:12.2f} {bc:7.1f} {bn:8d} "
                        f"{bp50:7.2f} {bp99:7.2f}",
                        flush=True,
                    )
                    next_minute += 60
                if at >= seconds:
                    break
            stop.set()
            elapsed = time.monotonic() - start
            rows = _rows_written(port) - rows0
            for th in threads:
                th.join(timeout=15)
            _summary(targets, elapsed, rows, interval, min(120.0, elapsed / 3))
        finally:
            stop.set()
            codes = [_stop(t.proc) for t in targets]
        print(f"tally exit code {codes[0]} (SIGTERM)", flush=True)


def _summary(
    targets: list[Target], elapsed: float, rows: float, interval: float, skip: float
) -> None:
    print(f"\nsummary over {elapsed / 60:.1f} min (RSS slope after the first {skip:.0f} s)")
    print(f"{'measure':34} {'tally':>10} {'baseline':>10}")

    def row(what: str, values: list[float], fmt: str = "10.2f") -> None:
        print(f"{what:34} " + " ".join(format(v, fmt) for v in values), flush=True)

    slopes = [_slope_mib_per_hour(t.samples, skip) for t in targets]
    cpu = [(_cpu_seconds(t.proc.pid) - t.cpu0) / elapsed * 3600 for t in targets]
    row("RSS first sample MiB", [t.samples[0][1] / MIB for t in targets])
    row("RSS last sample MiB", [t.samples[-1][1] / MIB for t in targets])
    row("RSS peak MiB", [max(r for _, r in t.samples) / MIB for t in targets])
    row("RSS slope MiB per hour", slopes)
    row("CPU seconds per hour", cpu, "10.1f")
    row("scrapes", [float(len(t.all)) for t in targets], "10.0f")
    row("scrapes per second", [len(t.all) / elapsed for t in targets], "10.1f")
    row("scrape p50 ms", [_percentile(t.all, 0.5) * 1e3 for t in targets])
    row("scrape p99 ms", [_percentile(t.all, 0.99) * 1e3 for t in targets])
    row("scrape errors", [float(t.errors) for t in targets], "10.0f")
    for t in targets:
        if t.errors:
            print(f"  {t.name} last error: {t.last_error}")
    due = elapsed / interval
    print(f"tally rows written {rows:.0f} of {due:.0f} rounds due ({rows / due:.1%})")
    print(
        f"RSS slope tally - baseline: {slopes[0] - slopes[1]:+.2f} MiB per hour; "
        f"CPU ratio tally / baseline: {cpu[0] / cpu[1]:.2f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.2, help="tally's collection interval")
    parser.add_argument("--scrapers", type=int, default=2, help="scraper threads per server")
    parser.add_argument(
        "--pause", type=float, default=0.0, help="seconds between a thread's scrapes"
    )
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    args = parser.parse_args(argv)
    try:
        run(args.minutes, args.interval, args.scrapers, args.pause, args.sample)
    except KeyboardInterrupt:
        print("interrupted", flush=True)


if __name__ == "__main__":
    main()
