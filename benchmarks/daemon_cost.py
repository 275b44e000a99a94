"""The daemon's own cost: CPU seconds per hour, peak RSS and scrape latency, as a user sees them.

Starts ``tally daemon`` as a subprocess on this machine's /proc at a 1 s interval, scrapes it
over HTTP while it runs, and reads its CPU time and peak RSS from /proc/<pid>. The baseline in the
same run is prometheus-client's own ``generate_latest`` of an empty registry plus process metrics
served by its ``start_http_server``: the floor any Python exporter pays per scrape.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _scrape_latencies(url: str, count: int, pause: float) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=5) as resp:
            resp.read()
        out.append(time.perf_counter() - start)
        time.sleep(pause)
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _baseline_server(port: int) -> subprocess.Popen[bytes]:
    code = (
        f"import time, prometheus_client as p; p.start_http_server({port}, addr='127.0.0.1'); "
        "time.sleep(3600)"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def run(seconds: float, interval: float) -> list[tuple[str, float, float]]:
    """Return rows of (what, tally, baseline) and print them."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen(
            [sys.executable, "-m", "telemetry.cli", "daemon", "--listen", f"127.0.0.1:{port}",
             "--data-dir", data, "--interval", str(interval), "--node", "bench"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdout is not None
        proc.stdout.readline()  # banner: serving
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
        latencies = _scrape_latencies(f"http://127.0.0.1:{port}/metrics", 200, 0.005)
        rss = _peak_rss_bytes(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    base_port = _free_port()
    base = _baseline_server(base_port)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{base_port}/metrics", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        base_lat = _scrape_latencies(f"http://127.0.0.1:{base_port}/metrics", 200, 0.005)
        base_rss = _peak_rss_bytes(base.pid)
    finally:
        base.kill()
        base.wait()
    cpu_per_hour = (cpu1 - cpu0) / (t1 - t0) * 3600
    rows = [
        ("daemon CPU seconds per hour", cpu_per_hour, float("nan")),
        ("peak RSS MiB", rss / 2**20, base_rss / 2**20),
        ("scrape p50 ms", _percentile(latencies, 0.5) * 1e3, _percentile(base_lat, 0.5) * 1e3),
        ("scrape p99 ms", _percentile(latencies, 0.99) * 1e3, _percentile(base_lat, 0.99) * 1e3),
        ("scrape mean ms", statistics.fmean(latencies) * 1e3, statistics.fmean(base_lat) * 1e3),
    ]
    print(f"\ndaemon cost: {seconds:g} s at a {interval:g} s interval (baseline: prometheus-client "
          "start_http_server with its default process metrics)")  # fmt: skip
    print(f"{'measure':32} {'tally':>10} {'baseline':>10} {'ratio':>7}")
    for what, ours, theirs in rows:
        ratio = ours / theirs if math.isfinite(theirs) and theirs else float("nan")
        print(f"{what:32} {ours:10.2f} {theirs:10.2f} {ratio:7.2f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    run(args.seconds, args.interval)


if __name__ == "__main__":
    main()
