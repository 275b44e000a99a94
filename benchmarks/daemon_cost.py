"""The daemon's own cost on a loaded node, side by side with node_exporter: CPU, RSS, scrapes.

``python -m benchmarks.daemon_cost [--seconds 120] [--interval 1] [--scrape-interval S] [--jobs 50]
[--compare-with DIR] [--nvml driver|module] [--no-job-info] [--steady] [--breakdown ROUNDS]
[--instructions ROUNDS] [--python PATH]``

tally runs as ``tally daemon`` at ``--interval`` on a node tree with ``--jobs`` Slurm jobs and 8
stand-in H100s (:mod:`benchmarks.node_tree`): by default the real pynvml over a stand-in
``libnvidia-ml.so.1`` compiled from ``nvml_stub.c``, so the daemon pays pynvml's and ctypes' cost
as on a GPU node and not the tests' Python stand-in's (``--nvml module``, which costs about
0.25 ms more a round). Each job has the job-info file the Slurm prolog writes, trusted where the
benchmark runs as root (the deployment ``docs/operations.md`` describes; run as another user the
daemon ignores the files, with one log line). In the same run, on the same machine:

- ``prometheus-node-exporter`` (Debian's package, default collectors, this machine's /proc and
  /sys), the exporter node operators compare against;
- a bare prometheus-client ``start_http_server`` exporter (process metrics only): the floor any
  Python exporter pays;
- with ``--compare-with DIR``, the tally of another checkout (an older commit, unpacked with
  ``git archive``) on the same tree: before and after in one run.

The Python exporters run under ``--python`` (default: this interpreter; it must import tally's
dependencies, e.g. a virtual environment made from it; the header line names its version and
whether it runs from a shared ``libpython``): an interpreter built as pyenv builds one by
default (a shared ``libpython``, no ``--enable-optimizations``) costs tally about a sixth more
CPU than Debian's ``/usr/bin/python3``, which is what a node's packaged Python is.

Each is scraped over HTTP once per ``--scrape-interval`` (default: ``--interval``; Prometheus'
usual is 15 s) from one thread, with the Accept and Accept-Encoding headers Prometheus sends. CPU is
measured from /proc/<pid>/stat over ``--seconds`` after a warm-up; RSS is VmRSS at the end and
VmHWM (peak). Scrape latencies (200 more scrapes) come after the CPU window. Once an hour tally
also pays a child that compacts the hour's journals into Parquet, which a window shorter than an
hour would miss: after the window, an hour of the same node's rounds is journalled and compacted
as the daemon does it, three times, the tallies in turn, and the median of the child's CPU
seconds is added to tally's hour ("in all"; single runs of the same hour read 0.39 to 1.02 s).

Two daemons side by side differ by more than most changes do: run against a copy of itself, one
read 6 % more CPU than the other (10.08 against 9.48 s/h over 300 s). ``--instructions
ROUNDS`` counts instead the instructions of ROUNDS rounds and their scrapes (one every 15) under
valgrind's callgrind, for this checkout and ``--compare-with``'s: the same code counts the same
within 0.2 %, so a change of a few percent shows (the kernel's share, the syscalls themselves,
is not counted; the cold caches a real second between rounds brings neither).
"""

from __future__ import annotations

import argparse
import math
import os
import re
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
# What a Prometheus server sends with each scrape: each exporter answers in the format it prefers
# of these (tally and prometheus-client OpenMetrics, node_exporter the text format), gzipped.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}
WARMUP_SECONDS = 5.0
REPO = Path(__file__).resolve().parent.parent


_INTERPRETER = (
    "import platform; shared = any('libpython' in line for line in open('/proc/self/maps')); "
    "print(platform.python_version(), shared)"
)


def interpreter(python: str) -> str:
    """``python``'s version and whether its interpreter runs from a shared ``libpython``, as
    pyenv builds it (``--enable-shared``, no ``--enable-optimizations``): the daemon costs
    about a sixth more CPU under such a build than under Debian's ``/usr/bin/python3``, which
    links the interpreter into the executable."""
    version, shared = subprocess.run(
        [python, "-c", _INTERPRETER], capture_output=True, text=True, check=True
    ).stdout.split()
    linked = "a shared libpython" if shared == "True" else "libpython linked in"
    return f"Python {version}, {linked}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """User and system CPU of ``pid`` and of its children that ended (tally's compaction runs in
    a short-lived child: it counts)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _status_bytes(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def hourly(e: Exporter) -> float:
    """CPU seconds an hour: the window's rate, with tally's hourly compaction."""
    return e.cpu / e.wall * 3600 + e.compaction


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
    checkout: Path | None = None  # a tally's checkout
    compaction: float = 0.0  # CPU seconds an hour in tally's hourly compactor child

    def scrape(self) -> float:
        start = time.perf_counter()
        request = urllib.request.Request(self.url, headers=PROMETHEUS_HEADERS)
        with urllib.request.urlopen(request, timeout=5) as resp:
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


def _load_driver_from(env: dict[str, str], driver: Path) -> None:
    """Make ``env``'s processes load the stand-in driver of directory ``driver``."""
    paths = [str(driver), env.get("LD_LIBRARY_PATH")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, paths))


def _script_env(checkout: Path, driver: Path | None) -> dict[str, str]:
    """The environment of an in-process script (below) on ``checkout``: its telemetry and
    benchmarks first, this checkout's benchmarks after; the stand-in driver where given."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), str(REPO)]))
    if driver is not None:
        _load_driver_from(env, driver)
    return env


def _tally(
    name: str,
    checkout: Path,
    tree: Path,
    data: Path,
    interval: float,
    driver: Path | None,
    python: str,
) -> Exporter:
    port = _free_port()
    env = dict(os.environ)
    command = [python, "-m", "telemetry.cli", "daemon", "--listen", f"127.0.0.1:{port}",
               "--data-dir", str(data), "--interval", f"{interval:g}", "--node", "bench",
               "--path.procfs", str(tree / "proc"), "--path.sysfs", str(tree / "sys"),
               "--slurm.job-info-dir", str(node_tree.job_info_dir(tree))]  # fmt: skip
    if driver is not None:  # pynvml itself, over the stand-in driver
        _load_driver_from(env, driver)
        env["PYTHONPATH"] = str(checkout)
    else:  # the stand-in module from this checkout, whatever checkout the daemon comes from
        standin = tree / "standin"
        standin.mkdir(exist_ok=True)
        shutil.copy(Path(node_tree.__file__), standin / "tally_bench_node.py")
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(REPO), str(standin)])
        command += ["--nvml.module", "tally_bench_node:NVML"]
    proc = subprocess.Popen(
        command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return Exporter(name, proc, f"http://127.0.0.1:{port}/metrics", checkout=checkout)


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


def _client_baseline(python: str) -> Exporter:
    port = _free_port()
    code = (
        f"import time, prometheus_client as p; p.start_http_server({port}, addr='127.0.0.1'); "
        "time.sleep(86400)"
    )
    proc = subprocess.Popen([python, "-c", code])
    return Exporter("prometheus-client", proc, f"http://127.0.0.1:{port}/metrics")


def _scrape_every(exporters: list[Exporter], interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        for e in exporters:
            try:
                e.scrape()
            except OSError:
                e.scrape_errors += 1


def measure(
    seconds: float,
    interval: float,
    jobs: int = 50,
    compare_with: Path | None = None,
    scrape_interval: float | None = None,
    driver: Path | None = None,
    job_info: bool = True,
    python: str = sys.executable,
) -> list[Exporter]:
    """Run every exporter for ``seconds`` (tally collecting each ``interval``), scraped each
    ``scrape_interval`` (default ``interval``); return them, measured. ``driver``: the stand-in
    driver's directory (:func:`node_tree.build_driver_stub`), else the stand-in pynvml module.
    ``job_info``: the jobs have job-info files (:func:`node_tree.write_node`). ``python``: the
    interpreter of the Python exporters."""
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "node"
        node_tree.write_node(tree, jobs, job_info)
        data = Path(scratch) / "data"
        exporters = [_tally("tally", REPO, tree, data, interval, driver, python)]
        if compare_with is not None:
            exporters.append(
                _tally(
                    "tally (before)",
                    compare_with,
                    tree,
                    Path(scratch) / "data0",
                    interval,
                    driver,
                    python,
                )
            )
        node = _node_exporter()
        if node is not None:
            exporters.append(node)
        exporters.append(_client_baseline(python))
        try:
            for e in exporters:
                e.wait_ready()
            stop = threading.Event()
            every = interval if scrape_interval is None else scrape_interval
            scraper = threading.Thread(target=_scrape_every, args=(exporters, every, stop))
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
        # The median of a few runs, the tallies taken in turn: single runs of the same hour
        # read 0.39 to 1.02 s on one machine.
        tallies = [(e, e.checkout) for e in exporters if e.checkout is not None]
        runs: dict[str, list[float]] = {e.name: [] for e, _ in tallies}
        for _ in range(COMPACTION_RUNS):
            for e, checkout in tallies:
                if e.name not in runs:
                    continue
                try:
                    runs[e.name].append(hourly_compaction_seconds(checkout, tree, driver, python))
                except subprocess.CalledProcessError:  # a checkout whose store differs
                    del runs[e.name]
        for e, _ in tallies:
            e.compaction = statistics.median(runs[e.name]) if e.name in runs else math.nan
    return exporters


# One hour (plus the max gap) of 1 s rounds of a node with 8 GPUs, one CPU row and ``jobs`` jobs
# ingested into the live state, then the CPU time per round of the next rounds' ingest and
# snapshot: the daemon's aggregation at steady state, which a run of a minute or two does not
# reach (the trailing windows keep an hour, and each compaction rewrites the hour of rows
# retained); and the most RSS the hour of rows added meanwhile. As the daemon at 15 s scrapes:
# fifteen rounds ingested at once, a snapshot, the heap trimmed. Runs in a subprocess on the
# given checkout's telemetry.
_STEADY = """
import sys, time
NS = 10**9
T0 = 1_788_220_800 * NS
JOBS, PREFILL, MEASURE = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import os, telemetry
# The daemon's own rows: NumPy Frames, no Arrow; a checkout from before Frames gets Arrow tables
# (as its daemon made them). Asked of the checkout itself: an installed tally may have Frames.
if os.path.exists(os.path.join(os.path.dirname(telemetry.__file__), "frame.py")):
    from telemetry.frame import Frame
    from telemetry.tables import CPU_MODES
else:
    Frame = None
    from telemetry.schema import CPU_MODES
from telemetry.state import State
def rows(k):
    t = T0 + k * NS
    gpu = [{"time": t, "node": "bench", "gpu_uuid": f"GPU-{i:08x}-0000-0000-0000-000000000000",
            "gpu_index": i, "gpu_model": "NVIDIA H100 80GB HBM3",
            "utilization_ratio": (k + i) % 5 / 4, "memory_used_bytes": 40 << 30,
            "memory_total_bytes": 80 << 30, "power_watts": 300.0,
            "energy_joules": 1e6 + 300.0 * k, "job_id": str(5000 + i)} for i in range(8)]
    cpu = [{"time": t, "node": "bench", "cpus": 64,
            **{f"{m}_seconds": 1e6 + 10.0 * k for m in CPU_MODES},
            "memory_total_bytes": 512 << 30, "memory_available_bytes": 256 << 30}]
    job = [{"time": t, "node": "bench", "job_id": str(5000 + i), "user": "u", "account": "a",
            "cpus_allocated": 1.0, "gpus_allocated": 1.0 if i < 8 else 0.0,
            "cpu_seconds": 100.0 + k, "memory_bytes": 1 << 30} for i in range(JOBS)]
    return {"gpu": gpu, "cpu": cpu, "job": job}
def tables(k):
    if Frame is not None:
        return {name: Frame.from_rows(name, r) for name, r in rows(k).items()}
    import pyarrow as pa
    from telemetry.schema import SCHEMAS
    out = {}
    for name, r in rows(k).items():
        plain = pa.schema([pa.field("time", pa.int64()) if f.name == "time" else f
                           for f in SCHEMAS[name]])
        out[name] = pa.Table.from_pylist(r, schema=plain).cast(SCHEMAS[name])
    return out
try:  # the daemon trims glibc's heap every 15 s: so does this (no-op where the daemon does not)
    from telemetry.heap import trim
except ImportError:
    trim = lambda: None
def batched(first):  # rounds first .. first + 14, one table each: a 15 s scrape's ingest
    per_table = {}
    for k in range(first, first + 15):
        for name, table in tables(k).items():
            per_table.setdefault(name, []).append(table)
    if Frame is not None:
        return {name: Frame.concat(parts) for name, parts in per_table.items()}
    import pyarrow as pa
    return {name: pa.concat_tables(parts) for name, parts in per_table.items()}
state = State()
before = rss_mib()
for k in range(0, PREFILL, 15):
    for name, table in batched(k).items():
        state.ingest(name, table)
    trim()
ready = [batched(PREFILL + k) for k in range(0, MEASURE, 15)]
grown = 0.0
start = time.process_time()
for round_tables in ready:
    for name, table in round_tables.items():
        state.ingest(name, table)
    state.snapshot()
    trim()
    grown = max(grown, rss_mib() - before)
print((time.process_time() - start) / (15 * len(ready)) * 1e3, grown)
"""


def steady_round_ms(
    checkout: Path, jobs: int = 50, prefill: int = 3660, rounds: int = 1020
) -> tuple[float, float]:
    """CPU ms a round of ingest and snapshot over ``rounds`` rounds (68 scrapes: every table
    compacts a few times) after ``prefill`` 1 s rounds (see _STEADY), and the most MiB the live
    state's hour of rows added to the process' RSS."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    result = subprocess.run(
        [sys.executable, "-c", _STEADY, str(jobs), str(prefill), str(rounds)],
        cwd=checkout, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    ms, mib = result.stdout.split()[-2:]
    return float(ms), float(mib)


# What the scripts below open with: a daemon on the node tree of argv[1] (the stand-in driver of
# argv[2], else the Python stand-in), its store open in a scratch directory. They run on a
# checkout, its telemetry and benchmarks first on the path.
_NODE_DAEMON = """
import os, resource, subprocess, sys, tempfile
from pathlib import Path
from benchmarks import node_tree
from telemetry.config import DaemonConfig
from telemetry.daemon import Daemon
tree, driver = Path(sys.argv[1]), sys.argv[2]
if driver:
    node_tree.load_driver_stub(Path(driver))
scratch = tempfile.TemporaryDirectory()
daemon = Daemon(DaemonConfig(
    listen="127.0.0.1:0", data_dir=Path(scratch.name), procfs=tree / "proc",
    sysfs=tree / "sys", node="bench", slurm_job_info_dir=node_tree.job_info_dir(tree),
    nvml_module=None if driver else "benchmarks.node_tree:NVML",
))
daemon.store.open()
"""

_HOUR = (
    _NODE_DAEMON
    + """
clock = [1_788_220_800 * 10**9]  # an hour boundary: the journals hold this hour alone
daemon.runner.clock_ns = lambda: clock[0]
for _ in range(3599):  # an hour of 1 s rounds, written as the daemon writes them
    clock[0] += 10**9
    for table, batch in daemon.runner.run().batches.items():
        daemon.store.append(table, batch)
before = resource.getrusage(resource.RUSAGE_CHILDREN)
daemon.store.close()  # the compactor child of the hour, run and waited for
after = resource.getrusage(resource.RUSAGE_CHILDREN)
daemon.runner.close()
scratch.cleanup()
print(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
"""
)


COMPACTION_RUNS = 3  # of the hourly compaction, for each tally


def hourly_compaction_seconds(
    checkout: Path, tree: Path, driver: Path | None, python: str
) -> float:
    """CPU seconds of the compactor child that turns an hour of the daemon's journals (3,600
    rounds of ``tree``'s node, collected as the daemon collects them) into Parquet: the daemon
    pays this once an hour, outside any measuring window shorter than an hour."""
    result = subprocess.run(
        [python, "-c", _HOUR, str(tree), str(driver or "")],
        cwd=checkout, env=_script_env(checkout, driver), capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return float(result.stdout.split()[-1])


# ROUNDS daemon rounds of a node tree and their scrapes, counted by callgrind: the daemon is set
# up and warmed (its job plan settles on its own clock) uninstrumented, then instrumentation is
# switched on for the rounds alone (``callgrind_control``). Runs under valgrind on a checkout.
_INSTRUCTIONS = (
    _NODE_DAEMON
    + """
rounds = int(sys.argv[3])
def instrument(state):
    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True,
                   capture_output=True)
seconds, clock = [0.0], [1_788_220_800 * 10**9]
for collector in daemon.runner.collectors:
    if collector.name == "job":
        collector._clock = lambda: seconds[0]
daemon.runner.clock_ns = lambda: clock[0]
scrape = getattr(daemon, "render_openmetrics", None) or daemon.render_text
def run(n):
    for k in range(n):
        seconds[0] += 1.0
        clock[0] += 10**9
        daemon.round()
        if k % 15 == 14:
            scrape()
run(120)
instrument("on")
run(rounds)
instrument("off")
daemon.runner.close()
daemon.store.close()
scratch.cleanup()
"""
)


def round_instructions(
    checkout: Path, tree: Path, rounds: int, driver: Path | None, python: str
) -> int:
    """Instructions (callgrind) of ``rounds`` rounds of ``tree``'s node and a scrape every 15
    rounds by ``checkout``'s daemon (valgrind must be installed)."""
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               "--callgrind-out-file=/dev/null", python, "-c", _INSTRUCTIONS, str(tree),
               str(driver or ""), str(rounds)]  # fmt: skip
    result = subprocess.run(command, cwd=checkout, env=_script_env(checkout, driver),
                            capture_output=True, text=True, check=True)  # fmt: skip
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count: {result.stderr[-300:]}")
    return int(found[1])


def run(
    seconds: float,
    interval: float,
    jobs: int = 50,
    compare_with: Path | None = None,
    scrape_interval: float | None = None,
    driver: Path | None = None,
    job_info: bool = True,
    python: str = sys.executable,
) -> list[Exporter]:
    """Measure and print one table (one column per exporter)."""
    exporters = measure(
        seconds, interval, jobs, compare_with, scrape_interval, driver, job_info, python
    )
    every = interval if scrape_interval is None else scrape_interval
    print(f"\ndaemon cost: {seconds:g} s at a {interval:g} s interval, {jobs} Slurm jobs, "
          f"8 fake GPUs; every exporter scraped every {every:g} s")  # fmt: skip
    rows: list[tuple[str, list[float]]] = [
        ("CPU seconds per hour", [e.cpu / e.wall * 3600 for e in exporters]),
        ("  + hourly compaction", [e.compaction for e in exporters]),
        ("  = CPU s/h in all", [hourly(e) for e in exporters]),
        ("CPU % of a core, in all", [hourly(e) / 36 for e in exporters]),
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


def round_breakdown(
    rounds: int, jobs: int = 50, driver: Path | None = None, job_info: bool = True
) -> dict[str, float]:
    """CPU ms per round of each stage of a daemon round, in this process, at the daemon's real
    cadence (a 1 s sleep between rounds, so caches are as cold as a daemon's; a tight loop
    reads about a quarter less, most of it on whichever stage runs first): each collector with
    the check of its rows, the Runner's GPU attribution and assembly of a batch a table, the
    journal, and a scrape's snapshot and OpenMetrics every 15 rounds. ``driver`` as for
    :func:`measure`."""
    from telemetry.config import DaemonConfig
    from telemetry.daemon import Daemon

    if driver is not None:
        node_tree.load_driver_stub(driver)
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "node"
        node_tree.write_node(tree, jobs, job_info)
        config = DaemonConfig(
            listen="127.0.0.1:0", data_dir=Path(scratch) / "data", procfs=tree / "proc",
            sysfs=tree / "sys", node="bench", slurm_job_info_dir=node_tree.job_info_dir(tree),
            nvml_module=None if driver is not None else "benchmarks.node_tree:NVML",
        )  # fmt: skip
        daemon = Daemon(config)
        daemon.store.open()
        spent: dict[str, float] = {c.name: 0.0 for c in daemon.runner.collectors}
        spent.update({"attribution, assembly": 0.0, "journal": 0.0, "snapshot + render": 0.0})
        for k in range(rounds + 5):
            time.sleep(1.0)
            t0 = time.process_time()
            result = daemon.runner.run()
            t1 = time.process_time()
            for table, batch in result.batches.items():
                daemon.store.append(table, batch)
            t2 = time.process_time()
            with daemon._lock:
                daemon._unaggregated.extend(result.batches.items())
                daemon._rounds_unaggregated += 1
                daemon._published = None
            if k % 15 == 14:
                daemon.render_openmetrics()
            t3 = time.process_time()
            if k < 5:
                continue  # the first rounds set things up
            # a collector's own time (the Runner's clock) includes checking its rows
            collected = sum(s.duration_seconds for s in result.status.values())
            for name, status in result.status.items():
                spent[name] += status.duration_seconds
            spent["attribution, assembly"] += max(0.0, (t1 - t0) - collected)
            spent["journal"] += t2 - t1
            spent["snapshot + render"] += t3 - t2
        daemon.runner.close()
        daemon.store.close()
    return {stage: seconds / rounds * 1e3 for stage, seconds in spent.items()}


def instructions(
    rounds: int,
    jobs: int,
    compare_with: Path | None,
    driver: Path | None,
    job_info: bool,
    python: str,
) -> None:
    """Print the instructions a round (scrapes included) of this checkout and of
    ``compare_with``, and their ratio."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed: nothing counted")
        return
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "node"
        node_tree.write_node(tree, jobs, job_info)
        counts = [("tally", round_instructions(REPO, tree, rounds, driver, python))]
        if compare_with is not None:
            counts.append(
                ("tally (before)", round_instructions(compare_with, tree, rounds, driver, python))
            )
    for name, count in counts:
        print(f"{name:24}{count / rounds:14,.0f} instructions a round")
    if len(counts) == 2:
        print(f"{'ratio':24}{counts[0][1] / counts[1][1]:14.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--scrape-interval", type=float, help="seconds (default: --interval)")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--compare-with", type=Path, help="another checkout's tally, same run")
    parser.add_argument(
        "--nvml",
        choices=["driver", "module"],
        default="driver",
        help="the GPUs' stand-in: a C libnvidia-ml under the real pynvml (default, where a C "
        "compiler is at hand) or the tests' Python stand-in for the pynvml module",
    )
    parser.add_argument(
        "--steady", action="store_true", help="also time a round after an hour of rows (slow)"
    )
    parser.add_argument(
        "--breakdown", type=int, metavar="ROUNDS", help="only time each stage of ROUNDS rounds"
    )
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="ROUNDS",
        help="only count the instructions of ROUNDS rounds and their scrapes (valgrind), of "
        "this checkout and --compare-with's",
    )
    parser.add_argument(
        "--no-job-info",
        dest="job_info",
        action="store_false",
        help="no job-info files: a node without the Slurm prolog (the shape earlier releases "
        "were measured on)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter of the Python exporters (default: this one); it must import tally's "
        "dependencies",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        driver = node_tree.build_driver_stub(Path(scratch)) if args.nvml == "driver" else None
        standin = "a stand-in libnvidia-ml under pynvml" if driver else "the Python stand-in"
        if args.nvml == "driver" and driver is None:
            standin += " (the driver stand-in could not be built)"
        if not args.job_info:
            standin += "; no job-info files"
        elif os.getuid() == 0:
            standin += "; the jobs' job-info files trusted"
        else:
            standin += "; the jobs' job-info files ignored (not root's): run as root to count them"
        if args.breakdown:
            print(f"CPU ms per round at a 1 s cadence, {args.jobs} jobs, 8 GPUs ({standin})")
            stages = round_breakdown(args.breakdown, args.jobs, driver, args.job_info)
            for stage, ms in stages.items():
                print(f"{stage:24}{ms:8.3f}")
            return
        if args.instructions:
            print(f"instructions of {args.instructions} rounds at 1 s and a scrape every 15, "
                  f"{args.jobs} jobs, 8 GPUs ({standin}), under {args.python}")  # fmt: skip
            instructions(args.instructions, args.jobs, args.compare_with, driver, args.job_info,
                         args.python)  # fmt: skip
            return
        print(f"GPUs: {standin}; Python exporters under {args.python} "
              f"({interpreter(args.python)})")  # fmt: skip
        run(args.seconds, args.interval, args.jobs, args.compare_with, args.scrape_interval, driver,
            args.job_info, args.python)  # fmt: skip
    if args.steady:
        print(f"\naggregation at steady state (an hour of 1 s rounds, {args.jobs} jobs, 8 GPUs): "
              "CPU ms per round (ingest + snapshot), MiB the hour of rows holds")  # fmt: skip
        for name, checkout in [("tally", REPO), ("tally (before)", args.compare_with)]:
            if checkout is not None:
                ms, mib = steady_round_ms(checkout, args.jobs)
                print(f"{name:24}{ms:10.2f}{mib:10.1f}")


if __name__ == "__main__":
    main()
