"""The daemon's own cost on a loaded node, side by side with node_exporter: CPU, RSS, scrapes.

``python -m benchmarks.daemon_cost [--seconds 120] [--interval 1] [--jobs 50] [--compare-with DIR]``

tally runs as ``tally daemon`` at ``--interval`` on a node tree with ``--jobs`` Slurm jobs and 8
fake H100s (:mod:`benchmarks.node_tree`). In the same run, on the same machine:

- ``prometheus-node-exporter`` (Debian's package, default collectors, this machine's /proc and
  /sys), the exporter node operators compare against;
- a bare prometheus-client ``start_http_server`` exporter (process metrics only): the floor any
  Python exporter pays;
- with ``--compare-with DIR``, the tally of another checkout (an older commit, unpacked with
  ``git archive``) on the same tree: before and after in one run.

Each is scraped over HTTP once per ``--interval`` (as Prometheus would) from one thread. CPU is
measured from /proc/<pid>/stat over ``--seconds`` after a warm-up; RSS is VmRSS at the end and
VmHWM (peak). Scrape latencies (200 more scrapes) come after the CPU window.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import node_tree

MIB = 2**20
WARMUP_SECONDS = 5.0
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_bytes(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Exporter:
    """One exporter under test: its process and what was measured of it."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    cpu: float = math.nan  # CPU seconds over the window
    wall: float = math.nan
    rss: float = math.nan  # bytes
    peak_rss: float = math.nan
    latencies: list[float] = field(default_factory=list)
    scrape_errors: int = 0

    def scrape(self) -> float:
        start = time.perf_counter()
        with urllib.request.urlopen(self.url, timeout=5) as resp:
            resp.read()
        return time.perf_counter() - start

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                self.scrape()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer within {timeout:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _tally(name: str, checkout: Path, tree: Path, data: Path, interval: float) -> Exporter:
    port = _free_port()
    env = dict(os.environ)
    # The stand-in module from this checkout, whatever checkout the daemon itself comes from.
    standin = tree / "standin"
    standin.mkdir(exist_ok=True)
    shutil.copy(Path(node_tree.__file__), standin / "tally_bench_node.py")
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(REPO), str(standin)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "telemetry.cli", "daemon", "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(data), "--interval", f"{interval:g}", "--node", "bench",
         "--path.procfs", str(tree / "proc"), "--path.sysfs", str(tree / "sys"),
         "--nvml.module", "tally_bench_node:NVML"],
        cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return Exporter(name, proc, f"http://127.0.0.1:{port}/metrics")


def _node_exporter() -> Exporter | None:
    binary = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if binary is None:
        return None
    port = _free_port()
    proc = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return Exporter("node_exporter", proc, f"http://127.0.0.1:{port}/metrics")


def _client_baseline() -> Exporter:
    port = _free_port()
    code = (
        f"import time, prometheus_client as p; p.start_http_server({port}, addr='127.0.0.1'); "
        "time.sleep(86400)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    return Exporter("prometheus-client", proc, f"http://127.0.0.1:{port}/metrics")


def _scrape_every(exporters: list[Exporter], interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        for e in exporters:
            try:
                e.scrape()
            except OSError:
                e.scrape_errors += 1


def measure(
    seconds: float, interval: float, jobs: int = 50, compare_with: Path | None = None
) -> list[Exporter]:
    """Run every exporter for ``seconds`` scraped each ``interval``; return them, measured."""
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "node"
        node_tree.write_node(tree, jobs)
        exporters = [_tally("tally", REPO, tree, Path(scratch) / "data", interval)]
        if compare_with is not None:
            exporters.append(
                _tally("tally (before)", compare_with, tree, Path(scratch) / "data0", interval)
            )
        node = _node_exporter()
        if node is not None:
            exporters.append(node)
        exporters.append(_client_baseline())
        try:
            for e in exporters:
                e.wait_ready()
            stop = threading.Event()
            scraper = threading.Thread(target=_scrape_every, args=(exporters, interval, stop))
            scraper.start()
            time.sleep(WARMUP_SECONDS)
            start = {e.name: (_cpu_seconds(e.proc.pid), time.monotonic()) for e in exporters}
            time.sleep(seconds)
            for e in exporters:
                cpu0, t0 = start[e.name]
                e.cpu, e.wall = _cpu_seconds(e.proc.pid) - cpu0, time.monotonic() - t0
                e.rss = _status_bytes(e.proc.pid, "VmRSS")
                e.peak_rss = _status_bytes(e.proc.pid, "VmHWM")
            stop.set()
            scraper.join()
            for e in exporters:
                for _ in range(200):
                    e.latencies.append(e.scrape())
                    time.sleep(0.005)
        finally:
            for e in exporters:
                e.stop()
    return exporters


def run(
    seconds: float, interval: float, jobs: int = 50, compare_with: Path | None = None
) -> list[Exporter]:
    """Measure and print one table (one column per exporter)."""
    exporters = measure(seconds, interval, jobs, compare_with)
    print(f"\ndaemon cost: {seconds:g} s at a {interval:g} s interval, {jobs} Slurm jobs, "
          "8 fake GPUs; every exporter scraped once per interval")  # fmt: skip
    rows: list[tuple[str, list[float]]] = [
        ("CPU seconds per hour", [e.cpu / e.wall * 3600 for e in exporters]),
        ("CPU % of a core", [e.cpu / e.wall * 100 for e in exporters]),
        ("RSS MiB", [e.rss / MIB for e in exporters]),
        ("peak RSS MiB", [e.peak_rss / MIB for e in exporters]),
        ("scrape p50 ms", [_percentile(e.latencies, 0.5) * 1e3 for e in exporters]),
        ("scrape p99 ms", [_percentile(e.latencies, 0.99) * 1e3 for e in exporters]),
        ("scrape mean ms", [statistics.fmean(e.latencies) * 1e3 for e in exporters]),
        ("scrape errors", [float(e.scrape_errors) for e in exporters]),
    ]
    names = [e.name for e in exporters]
    print(f"{'measure':24}" + "".join(f"{n:>20}" for n in names))
    for what, values in rows:
        print(f"{what:24}" + "".join(f"{v:20.3f}" for v in values))
    return exporters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--compare-with", type=Path, help="another checkout's tally, same run")
    args = parser.parse_args(argv)
    run(args.seconds, args.interval, args.jobs, args.compare_with)


if __name__ == "__main__":
    main()
