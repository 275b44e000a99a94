"""End to end: the daemon as a subprocess on this machine's real /proc, scraped over HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from telemetry.store.dataset import ReadStats, discover, read_table
from tests.support.cli import tally
from tests.support.daemon import DaemonProcess
from tests.support.net import free_port
from tests.support.promtool import promtool_check

pytestmark = pytest.mark.e2e


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data"


def _read(data: Path) -> pa.Table:
    stats = ReadStats()
    table = read_table(data, "cpu", discover(data)["cpu"], stats)
    assert stats.files_quarantined == 0 and stats.files_skipped == 0, stats.problems
    return table


def _meminfo_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def _online_cpus() -> int:
    count = 0
    for part in Path("/sys/devices/system/cpu/online").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def test_daemon_collects_serves_persists_and_replays(data: Path, promtool: str) -> None:
    daemon = DaemonProcess(data, data.parent / "logs", node="e2e")
    try:
        daemon.wait_rows(5)
        text = daemon.scrape()
        check = promtool_check(promtool, text)
        assert check.returncode == 0, check.stdout + check.stderr
        assert daemon.value("tally_collector_success", collector="cpu") == 1
        # The banner names the collectors that failed their first round, not just those enabled.
        banner = daemon.banner()
        working, _, failed = banner.partition("collectors: ")[2].rstrip(")").partition("; failed: ")
        for name in ("cpu", "rapl", "gpu", "job"):
            ok = daemon.value("tally_collector_success", collector=name) == 1
            assert (name in working.split(", ")) == ok and (name in failed.split(", ")) != ok
        assert daemon.value("tally_memory_total_bytes", node="e2e") == _meminfo_total_bytes()
        if Path("/sys/devices/system/cpu/online").exists():
            assert daemon.value("tally_cpus", node="e2e") == _online_cpus()
        ratio = daemon.value("tally_cpu_utilization_ratio", node="e2e", window="1m")
        assert 0.0 <= ratio <= 1.0
        gz = urllib.request.Request(
            f"http://127.0.0.1:{daemon.port}/metrics", headers={"Accept-Encoding": "gzip"}
        )
        with urllib.request.urlopen(gz, timeout=5) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
        written = daemon.value("tally_store_rows_written_total")
    finally:
        code, _ = daemon.terminate()
    assert code == 0, daemon.stderr()
    assert not list(data.rglob("*.arrows")), "SIGTERM compacts every journal"
    table = _read(data)
    assert table.num_rows >= written
    times = table.column("time").cast(pa.int64()).to_numpy()
    assert (times[1:] > times[:-1]).all(), "one row per round, in order, no duplicates"
    user = table.column("user_seconds").to_numpy()
    assert (user[1:] >= user[:-1]).all()

    replay = tally("replay", str(data), "--once", timeout=60)
    assert replay.returncode == 0, replay.stderr
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(replay.stdout)
        for s in f.samples
    }
    last_user = table.column("user_seconds")[-1].as_py()
    assert samples[("tally_cpu_seconds_total", (("mode", "user"), ("node", "e2e")))] == last_user
    assert samples[("tally_samples_ingested_total", (("table", "cpu"),))] == table.num_rows
    assert promtool_check(promtool, replay.stdout.encode()).returncode == 0


def test_json_logs_carry_the_banner_and_every_log_line(data: Path) -> None:
    daemon = DaemonProcess(
        data, data.parent / "logs", node="e2e", global_flags=("--log-format", "json")
    )
    try:
        daemon.wait_rows(2)
    finally:
        code, _ = daemon.terminate()
    assert code == 0, daemon.stderr()
    banner = json.loads(daemon.banner())
    assert banner["level"] == "info" and f"127.0.0.1:{daemon.port}/metrics" in banner["message"]
    logged = [json.loads(line) for line in daemon.stderr().splitlines()]
    assert logged and all({"time", "level", "logger", "message"} <= set(r) for r in logged)


def test_sigterm_ends_a_long_interval_at_once(data: Path) -> None:
    """SIGTERM reaches a daemon asleep between rounds: it stops cleanly without waiting out
    its 10-minute interval (systemd would kill it after 90 s, losing the open journal)."""
    daemon = DaemonProcess(
        data, data.parent / "logs", node="e2e", interval=600, flags=("--max-gap", "1800")
    )
    daemon.wait_banner()
    code, took = daemon.terminate(timeout=60)
    assert code == 0, daemon.stderr()
    assert took < 15, f"{took:.1f} s"
    assert not list(data.rglob("*.arrows")), "the first round's journal compacted at the stop"


def test_kill_9_loses_nothing_but_the_interval_in_flight(data: Path) -> None:
    first = DaemonProcess(data, data.parent / "logs", node="e2e")
    try:
        first.wait_rows(5)
        written = first.value("tally_store_rows_written_total")
    finally:
        first.kill()
    journals = list(data.rglob("*.arrows"))
    assert journals, "the open hour lives in a journal"
    # Readable by any reader right after the crash, without the daemon's help.
    assert _read(data).num_rows >= written

    second = DaemonProcess(data, data.parent / "logs", node="e2e")
    try:
        assert not any(j.exists() for j in journals), "recovery compacts the crashed journal"
        second.wait_rows(3)
    finally:
        assert second.terminate()[0] == 0
    table = _read(data)
    times = table.column("time").cast(pa.int64()).to_numpy()
    assert len(set(times.tolist())) == len(times), "no sample stored twice"
    assert table.num_rows >= written + 3
    assert not (data / "quarantine").exists()


def test_replay_listen_serves_the_final_state_until_sigterm(tmp_path: Path) -> None:
    from tests.support.tables import cpu_table, write_dataset

    write_dataset(tmp_path, "cpu", cpu_table("n9", [0.0, 5.0, 10.0]))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "telemetry.cli", "replay", str(tmp_path),
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        body = b""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read()
                if b'tally_cpus{node="n9"}' in body:
                    break
            except OSError:
                time.sleep(0.1)
        assert b'tally_cpus{node="n9"} 8.0' in body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_sighup_compacts_and_goes_on_sigusr1_logs_a_status(data: Path) -> None:
    """SIGHUP and SIGUSR1 used to kill the daemon without compacting (exit 129 and 138)."""
    daemon = DaemonProcess(data, data.parent / "logs", node="e2e")
    try:
        daemon.wait_rows(3)
        assert list(data.rglob("*.arrows")) and not list(data.rglob("*.parquet"))
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not list(data.rglob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(data.rglob("*.parquet")), "SIGHUP compacts the journals"
        before = daemon.wait_rows(1)
        daemon.wait_rows(int(before) + 2)  # and collection goes on
        daemon.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "SIGUSR1: status" not in daemon.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "rows written" in daemon.stderr() and daemon.proc.poll() is None
        # What Prometheus asks for: OpenMetrics, rendered by the daemon itself.
        openmetrics = daemon.scrape(accept=PROMETHEUS_ACCEPT)
        assert openmetrics.endswith(b"# EOF\n")
        assert b"# TYPE tally_cpu_seconds counter" in openmetrics
        assert b"process_resident_memory_bytes " in openmetrics
        # Collecting, journaling, compacting (in a child) and serving both formats: the
        # daemon itself never loaded Arrow's libraries.
        maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
        assert "libarrow" not in maps and "libparquet" not in maps
    finally:
        code, _ = daemon.terminate()
    assert code == 0, daemon.stderr()
