"""The ``cpu`` and ``rapl`` collectors run through the Runner on the fixture trees.

Every expected value is computed here from the fixture text with small independent splitters.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from telemetry.collectors import REGISTRY, CollectorContext, Round, Runner, files, rapl
from telemetry.collectors.base import CheckedRows, check_rows
from telemetry.collectors.cpu import CpuCollector
from telemetry.collectors.rapl import RaplCollector, package_zones
from telemetry.schema import CPU_MODES, CPU_SCHEMA

FIXTURES = Path(__file__).resolve().parent / "fixtures"
T0 = 1_788_220_800_000_000_000  # 2026-09-01T00:00:00Z in ns
POWERCAP = Path("sys/class/powercap")


# ---------------------------------------------------------------- independent helpers


def aggregate_ticks(text: str) -> list[int]:
    line = next(ln for ln in text.splitlines() if ln.split()[0] == "cpu")
    ticks = [int(v) for v in line.split()[1:9]]
    return ticks + [0] * (8 - len(ticks))


def online_cpus(text: str) -> int:
    return sum(1 for ln in text.splitlines() if ln.split()[0][3:].isdigit() and ln[:3] == "cpu")


def meminfo_kb(text: str) -> dict[str, int]:
    return {ln.split(":")[0]: int(ln.split(":")[1].split()[0]) for ln in text.splitlines()}


def with_ticks(text: str, ticks: list[int]) -> str:
    """``text`` with its aggregate line replaced by ``ticks`` (eight modes, guest fields 0)."""
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.split()[0] == "cpu")
    lines[i] = "cpu  " + " ".join(str(t) for t in [*ticks, 0, 0])
    return "\n".join(lines) + "\n"


def uj(root: Path, zone: str, name: str = "energy_uj") -> int:
    return int((root / POWERCAP / zone / name).read_text())


def set_uj(root: Path, zone: str, value: int) -> None:
    (root / POWERCAP / zone / "energy_uj").write_text(f"{value}\n")


def copy_tree(name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    return root


def clock() -> Iterator[int]:
    t = T0
    while True:
        yield t
        t += 15_000_000_000


def make_runner(root: Path, *, user_hz: int = 100, sysfs: Path | None = None) -> Runner:
    ctx = CollectorContext(
        procfs=root / "proc", sysfs=sysfs or root / "sys", node="n1", user_hz=user_hz
    )
    ticks = clock()
    return Runner([CpuCollector(ctx), RaplCollector(ctx)], clock_ns=lambda: next(ticks))


def cpu_row(rnd: Round) -> dict[str, object]:
    table = rnd.tables["cpu"].to_arrow()
    assert table.num_rows == 1
    # time as int ns: datetime cannot hold a real clock's nanoseconds
    table = table.set_column(0, "time", table.column("time").cast(pa.int64()))
    return table.to_pylist()[0]


@pytest.fixture
def tally_logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """caplog for the ``tally`` logger, even if something turned its propagation off."""
    monkeypatch.setattr(logging.getLogger("tally"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="tally")
    return caplog


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("tally") and r.levelno >= logging.WARNING
    ]


# ---------------------------------------------------------------- tests


def test_registered_by_name() -> None:
    assert REGISTRY["cpu"] is CpuCollector
    assert REGISTRY["rapl"] is RaplCollector


def test_normal_host_first_round() -> None:
    root = FIXTURES / "normal_host"
    stat = (root / "proc/stat").read_text()
    mem = meminfo_kb((root / "proc/meminfo").read_text())
    rnd = make_runner(root).run()

    assert rnd.status["cpu"].success and rnd.status["rapl"].success
    assert rnd.rows_dropped == 0
    assert rnd.time_ns == T0
    assert set(rnd.tables) == {"cpu"}
    assert rnd.tables["cpu"].to_arrow().schema == CPU_SCHEMA
    row = cpu_row(rnd)
    assert row["node"] == "n1"
    assert row["time"] == T0
    assert row["cpus"] == online_cpus(stat) == 64
    for mode, ticks in zip(CPU_MODES, aggregate_ticks(stat), strict=True):
        assert row[f"{mode}_seconds"] == ticks / 100, mode
    assert row["memory_total_bytes"] == mem["MemTotal"] * 1024
    assert row["memory_available_bytes"] == mem["MemAvailable"] * 1024
    # The accumulator starts at 0 when the collector starts.
    assert row["energy_joules"] == 0.0


def test_user_hz_is_taken_from_the_context() -> None:
    root = FIXTURES / "normal_host"
    ticks = aggregate_ticks((root / "proc/stat").read_text())
    row = cpu_row(make_runner(root, user_hz=250).run())
    assert row["user_seconds"] == pytest.approx(ticks[0] / 250, rel=1e-15)
    assert row["idle_seconds"] == pytest.approx(ticks[3] / 250, rel=1e-15)


def test_second_round_counters_and_package_energy_only(tmp_path: Path) -> None:
    root = copy_tree("normal_host", tmp_path)
    runner = make_runner(root)
    first = cpu_row(runner.run())

    stat_path = root / "proc/stat"
    ticks = aggregate_ticks(stat_path.read_text())
    step = [6400, 3, 900, 5000, 7, 11, 13, 0]  # ticks added per mode
    stat_path.write_text(
        with_ticks(stat_path.read_text(), [t + s for t, s in zip(ticks, step, strict=True)])
    )
    set_uj(root, "intel-rapl:0", uj(root, "intel-rapl:0") + 1_500_000)
    set_uj(root, "intel-rapl:1", uj(root, "intel-rapl:1") + 2_250_000)
    # Sub-zones and psys count the same joules again: they must not be summed.
    set_uj(root, "intel-rapl:0:0", uj(root, "intel-rapl:0:0") + 999_000_000)
    set_uj(root, "intel-rapl:1:0", uj(root, "intel-rapl:1:0") + 888_000_000)
    set_uj(root, "intel-rapl:2", uj(root, "intel-rapl:2") + 777_000_000)

    rnd = runner.run()
    second = cpu_row(rnd)
    assert rnd.time_ns == T0 + 15_000_000_000
    for mode, s in zip(CPU_MODES, step, strict=True):
        assert second[f"{mode}_seconds"] - first[f"{mode}_seconds"] == pytest.approx(s / 100)
    assert second["energy_joules"] == pytest.approx(3.75, rel=1e-12)


def test_rapl_zones_are_numbered_in_hex(tmp_path: Path) -> None:
    # 16 sockets: the kernel names zones "intel-rapl:%x", so packages 10-15 are :a to :f.
    root = copy_tree("rapl_16_sockets", tmp_path)
    zones = package_zones(root / "sys")
    assert [zone.name for zone in zones] == [f"intel-rapl:{n:x}" for n in range(16)]
    collector = RaplCollector(CollectorContext(procfs=root / "proc", sysfs=root / "sys", node="n"))
    assert collector.collect() == {"cpu": [{"energy_joules": 0.0}]}
    for n in range(16):
        set_uj(root, f"intel-rapl:{n:x}", uj(root, f"intel-rapl:{n:x}") + (n + 1) * 1_000_000)
        # dram sub-zones, "intel-rapl:a:0" included, measure other joules: never summed
        set_uj(root, f"intel-rapl:{n:x}:0", uj(root, f"intel-rapl:{n:x}:0") + 999_000_000)
    assert collector.collect()["cpu"][0]["energy_joules"] == pytest.approx(136.0)  # 1 + … + 16


def test_rapl_zones_are_listed_once_a_minute_and_again_when_one_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing the zones cost more than reading them, every second: the list is kept for
    ZONES_KEPT_S; a zone whose counter vanishes (driver unloaded) fails that round and the
    zones are listed afresh the next, and a zone that appears is read within the minute."""
    root = copy_tree("normal_host", tmp_path)
    listings: list[int] = []
    real = rapl.package_zones

    def package_zones(sysfs: Path) -> list[Path]:
        zones = real(sysfs)
        listings.append(len(zones))
        return zones

    monkeypatch.setattr(rapl, "package_zones", package_zones)
    now = [1000.0]
    collector = RaplCollector(CollectorContext(procfs=root / "proc", sysfs=root / "sys", node="n"))
    collector._clock = lambda: now[0]
    for _ in range(5):
        now[0] += 1.0
        collector.collect()
    assert listings == [2]  # packages 0 and 1 (intel-rapl:2 is psys)
    gone = root / POWERCAP / "intel-rapl:1"
    shutil.move(gone, tmp_path / "unloaded")
    with pytest.raises(FileNotFoundError):
        collector.collect()
    now[0] += 1.0
    assert collector.collect() == {"cpu": [{"energy_joules": 0.0}]}  # the one left
    assert listings == [2, 1]
    shutil.move(tmp_path / "unloaded", gone)
    now[0] += rapl.ZONES_KEPT_S - 1.0
    collector.collect()
    assert listings == [2, 1]
    set_uj(root, "intel-rapl:0", uj(root, "intel-rapl:0") + 1_000_000)
    now[0] += 1.0
    assert collector.collect()["cpu"][0]["energy_joules"] == pytest.approx(1.0)
    assert listings == [2, 1, 2]


def test_rapl_zone_names_that_are_not_zones(tmp_path: Path) -> None:
    root = copy_tree("rapl_16_sockets", tmp_path)
    for name in (
        "intel-rapl:A",
        "intel-rapl:0x1",
        "intel-rapl:",
        "intel-rapl-mmio:0",
        "intel-rapl:g",
    ):
        shutil.copytree(root / POWERCAP / "intel-rapl:1", root / POWERCAP / name)
    assert len(package_zones(root / "sys")) == 16


def test_rapl_wrap(tmp_path: Path) -> None:
    root = copy_tree("normal_host", tmp_path)
    runner = make_runner(root)
    assert cpu_row(runner.run())["energy_joules"] == 0.0

    old = uj(root, "intel-rapl:0")
    max_range = uj(root, "intel-rapl:0", "max_energy_range_uj")
    new = 12_345_678
    assert new < old < max_range
    set_uj(root, "intel-rapl:0", new)  # wrapped past max_energy_range_uj
    wrapped = cpu_row(runner.run())["energy_joules"]
    assert wrapped == pytest.approx((max_range - old + new) / 1e6, rel=1e-12)
    assert wrapped > 0  # a wrap never looks like a drop

    set_uj(root, "intel-rapl:0", new + 4_000_000)
    after = cpu_row(runner.run())["energy_joules"]
    assert after - wrapped == pytest.approx(4.0, rel=1e-9)


def test_rapl_counter_going_back_without_a_range_counts_from_zero(tmp_path: Path) -> None:
    root = copy_tree("normal_host", tmp_path)
    (root / POWERCAP / "intel-rapl:1" / "max_energy_range_uj").unlink()
    runner = make_runner(root)
    runner.run()
    set_uj(root, "intel-rapl:1", 2_000_000)
    assert cpu_row(runner.run())["energy_joules"] == pytest.approx(2.0)


def test_malformed_stat_fails_cpu_only(tally_logs: pytest.LogCaptureFixture) -> None:
    root = FIXTURES / "malformed_stat"
    runner = make_runner(root)
    rounds = [runner.run() for _ in range(3)]  # must not raise
    for rnd in rounds:
        assert rnd.status["cpu"].success is False
        assert "malformed_stat/proc/stat" in (rnd.status["cpu"].error or "")
        assert rnd.status["rapl"].success is True
        # rapl's partial row (energy only) lacks the cpu columns: dropped, not emitted.
        assert "cpu" not in rnd.tables
        assert rnd.rows_dropped == 1
    failures = [m for m in warnings_of(tally_logs) if "collector cpu failed" in m]
    assert len(failures) == 1


def test_cpu_recovers_after_a_malformed_round(tmp_path: Path) -> None:
    root = copy_tree("normal_host", tmp_path)
    runner = make_runner(root)
    good = (root / "proc/stat").read_text()
    ticks = aggregate_ticks(good)
    first = cpu_row(runner.run())

    shutil.copy(FIXTURES / "malformed_stat/proc/stat", root / "proc/stat")
    bad_round = runner.run()
    assert not bad_round.status["cpu"].success and "cpu" not in bad_round.tables

    (root / "proc/stat").write_text(with_ticks(good, [t + 100 for t in ticks]))
    third = cpu_row(runner.run())
    for mode in CPU_MODES:
        assert third[f"{mode}_seconds"] == pytest.approx(first[f"{mode}_seconds"] + 1.0)


@pytest.mark.parametrize(
    "meminfo",
    [
        f"MemTotal: {2**62} kB\nMemAvailable: 1 kB\n",  # does not fit the int64 column
        "MemTotal: 100 kB\nMemFree: many kB\n",
    ],
)
def test_bad_meminfo_fails_cpu_without_raising(tmp_path: Path, meminfo: str) -> None:
    root = copy_tree("normal_host", tmp_path)
    (root / "proc/meminfo").write_text(meminfo)
    rnd = make_runner(root).run()
    assert rnd.status["cpu"].success is False
    assert "meminfo" in (rnd.status["cpu"].error or "")
    assert rnd.status["rapl"].success is True
    assert "cpu" not in rnd.tables


def test_missing_proc_files_fail_cpu_without_raising(tmp_path: Path) -> None:
    root = copy_tree("normal_host", tmp_path)
    (root / "proc/meminfo").unlink()
    rnd = make_runner(root).run()
    assert rnd.status["cpu"].success is False
    assert rnd.status["rapl"].success is True


def test_rapl_permission_denied_logs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tally_logs: pytest.LogCaptureFixture
) -> None:
    root = copy_tree("normal_host", tmp_path)
    denied = root / POWERCAP / "intel-rapl:1" / "energy_uj"
    deny = {"on": True}
    real_read_text = files.read_text

    def read_text(path: Path) -> str:
        # Tests run as root, where chmod 000 denies nothing: fake the EACCES of Linux >= 5.10.
        if deny["on"] and path == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_text(path)

    monkeypatch.setattr(files, "read_text", read_text)  # where a counter is first opened
    start0, start1 = uj(root, "intel-rapl:0"), uj(root, "intel-rapl:1")
    runner = make_runner(root)
    for k in range(0, 6):
        set_uj(root, "intel-rapl:0", start0 + k * 1_000_000)
        set_uj(root, "intel-rapl:1", start1 + k * 3_000_000)
        rnd = runner.run()
        assert rnd.status["rapl"].success is True
        assert rnd.status["cpu"].success is True
        row = cpu_row(rnd)  # the cpu row is still emitted, with energy null
        assert row["energy_joules"] is None
        assert row["cpus"] == 64

    messages = warnings_of(tally_logs)
    assert len(messages) == 1, messages
    assert "intel-rapl:1/energy_uj" in messages[0]

    # Readable (a udev rule, say): the energy counts from the first round both zones are read.
    deny["on"] = False
    assert cpu_row(runner.run())["energy_joules"] == 0.0
    set_uj(root, "intel-rapl:0", start0 + 7_000_000)
    set_uj(root, "intel-rapl:1", start1 + 18_000_000)
    assert cpu_row(runner.run())["energy_joules"] == pytest.approx(2.0 + 3.0, rel=1e-12)
    assert len(warnings_of(tally_logs)) == 1


def test_rapl_counter_failing_mid_run_loses_no_energy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tally_logs: pytest.LogCaptureFixture
) -> None:
    """A counter read before that fails for a while (its kept read and a fresh open both
    denied) makes those rounds' energy null; readable again, the energy of both zones over the
    null rounds is all there."""
    root = copy_tree("normal_host", tmp_path)
    denied = root / POWERCAP / "intel-rapl:1" / "energy_uj"
    deny = {"on": False}
    real_read_text, real_pread = files.read_text, os.pread

    def read_text(path: Path) -> str:
        if deny["on"] and path == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_text(path)

    def pread(fd: int, size: int, offset: int) -> bytes:
        if deny["on"] and os.readlink(f"/proc/self/fd/{fd}") == str(denied):
            raise PermissionError(13, "Permission denied")
        return real_pread(fd, size, offset)

    monkeypatch.setattr(files, "read_text", read_text)
    monkeypatch.setattr(files.os, "pread", pread)
    runner = make_runner(root)
    assert cpu_row(runner.run())["energy_joules"] == 0.0
    start0, start1 = uj(root, "intel-rapl:0"), uj(root, "intel-rapl:1")
    deny["on"] = True
    for k in range(1, 6):
        set_uj(root, "intel-rapl:0", start0 + k * 1_000_000)
        set_uj(root, "intel-rapl:1", start1 + k * 3_000_000)
        rnd = runner.run()
        assert rnd.status["rapl"].success is True
        assert cpu_row(rnd)["energy_joules"] is None
    assert len(warnings_of(tally_logs)) == 1
    deny["on"] = False
    assert cpu_row(runner.run())["energy_joules"] == pytest.approx(5.0 + 15.0, rel=1e-12)
    runner.close()


def test_rapl_counters_are_kept_open_and_read_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each zone's counter is opened once and read with a pread every round; a zone whose
    driver went away (the file gone) fails that round and the zones are listed again."""
    root = copy_tree("normal_host", tmp_path)
    opened: list[str] = []
    real_read_text = files.read_text

    def read_text(path: Path) -> str:
        opened.append(path.name)
        return real_read_text(path)

    monkeypatch.setattr(files, "read_text", read_text)
    runner = make_runner(root)
    runner.run()
    collector = next(c for c in runner.collectors if c.name == "rapl")
    assert len(collector._files) == 2  # type: ignore[attr-defined]
    assert opened.count("energy_uj") == 2
    start0 = uj(root, "intel-rapl:0")
    before = _open_counters()
    for k in range(1, 4):
        set_uj(root, "intel-rapl:0", start0 + k * 1_000_000)  # the same file, written over
        assert cpu_row(runner.run())["energy_joules"] == pytest.approx(k * 1.0, rel=1e-12)
    assert _open_counters() == before == 2
    assert opened.count("energy_uj") == 2  # no file opened again
    counter = root / POWERCAP / "intel-rapl:0" / "energy_uj"
    counter.unlink()
    assert runner.run().status["rapl"].success is False
    set_uj(root, "intel-rapl:0", start0 + 5_000_000)
    assert cpu_row(runner.run())["energy_joules"] == pytest.approx(5.0, rel=1e-12)
    runner.close()
    assert len(collector._files) == 0  # type: ignore[attr-defined]


def _open_counters() -> int:
    return sum(
        os.readlink(f"/proc/self/fd/{fd}").endswith("energy_uj")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


def test_rapl_bad_counter_fails_rapl_and_loses_no_energy(tmp_path: Path) -> None:
    root = copy_tree("normal_host", tmp_path)
    runner = make_runner(root)
    runner.run()
    start0, start1 = uj(root, "intel-rapl:0"), uj(root, "intel-rapl:1")

    set_uj(root, "intel-rapl:0", start0 + 1_000_000)
    (root / POWERCAP / "intel-rapl:1" / "energy_uj").write_text("garbage\n")
    rnd = runner.run()
    assert rnd.status["rapl"].success is False
    assert "intel-rapl:1/energy_uj" in (rnd.status["rapl"].error or "")
    assert rnd.status["cpu"].success is True
    assert cpu_row(rnd)["energy_joules"] is None

    set_uj(root, "intel-rapl:0", start0 + 2_000_000)
    set_uj(root, "intel-rapl:1", start1 + 500_000)
    assert cpu_row(runner.run())["energy_joules"] == pytest.approx(2.5, rel=1e-12)


def test_hotplug_counters_never_decrease(tmp_path: Path) -> None:
    root = copy_tree("normal_host", tmp_path)
    runner = make_runner(root)
    before_ticks = aggregate_ticks((root / "proc/stat").read_text())
    first = cpu_row(runner.run())
    assert first["cpus"] == 64

    hot_text = (FIXTURES / "hotplug/proc/stat").read_text()
    hot_ticks = aggregate_ticks(hot_text)
    went_back = [m for m, b, h in zip(CPU_MODES, before_ticks, hot_ticks, strict=True) if h < b]
    went_on = [m for m, b, h in zip(CPU_MODES, before_ticks, hot_ticks, strict=True) if h > b]
    assert "iowait" in went_back and "idle" in went_back  # the fixture does what it says
    assert "user" in went_on

    (root / "proc/stat").write_text(hot_text)
    second = cpu_row(runner.run())
    assert second["cpus"] == online_cpus(hot_text) == 32
    for mode, b, h in zip(CPU_MODES, before_ticks, hot_ticks, strict=True):
        col = f"{mode}_seconds"
        assert second[col] >= first[col], mode
        if h < b:
            assert second[col] == first[col], mode  # held, not reported as a restart
        else:
            assert second[col] == pytest.approx(first[col] + (h - b) / 100), mode

    # After the backward step the counter advances again from the new reading.
    later = list(hot_ticks)
    later[CPU_MODES.index("iowait")] += 250
    later[CPU_MODES.index("user")] += 1000
    (root / "proc/stat").write_text(with_ticks(hot_text, later))
    third = cpu_row(runner.run())
    assert third["iowait_seconds"] == pytest.approx(second["iowait_seconds"] + 2.5)
    assert third["user_seconds"] == pytest.approx(second["user_seconds"] + 10.0)


def test_vm_host_no_rapl(tally_logs: pytest.LogCaptureFixture) -> None:
    root = FIXTURES / "vm_host"
    assert not (root / "sys").exists()
    stat = (root / "proc/stat").read_text()
    mem = meminfo_kb((root / "proc/meminfo").read_text())
    runner = make_runner(root)
    rounds = [runner.run() for _ in range(3)]
    for rnd in rounds:
        # No zones is not success: tally_collector_success{collector="rapl"} 0 says why energy
        # is missing, while the cpu rows go on.
        assert rnd.status["cpu"].success and not rnd.status["rapl"].success
        assert "no package zones" in (rnd.status["rapl"].error or "")
        row = cpu_row(rnd)
        assert row["energy_joules"] is None
        assert row["cpus"] == online_cpus(stat)
        for mode, ticks in zip(CPU_MODES, aggregate_ticks(stat), strict=True):
            assert row[f"{mode}_seconds"] == ticks / 100
        assert row["memory_total_bytes"] == mem["MemTotal"] * 1024
        assert row["memory_available_bytes"] == mem["MemAvailable"] * 1024
    # "no package zones" is said once, not every round.
    assert len([m for m in warnings_of(tally_logs) if "rapl" in m]) == 1


def test_old_kernel() -> None:
    root = FIXTURES / "old_kernel"
    mem = meminfo_kb((root / "proc/meminfo").read_text())
    row = cpu_row(make_runner(root).run())
    assert row["cpus"] == 2
    assert row["user_seconds"] == 21357406 / 100
    assert row["idle_seconds"] == 306432870 / 100
    for mode in ("iowait", "irq", "softirq", "steal"):
        assert row[f"{mode}_seconds"] == 0.0
    expected_available = (mem["MemFree"] + mem["Buffers"] + mem["Cached"]) * 1024
    assert row["memory_available_bytes"] == expected_available
    assert row["memory_total_bytes"] == mem["MemTotal"] * 1024
    assert row["energy_joules"] is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc/stat on this machine")
def test_real_proc() -> None:
    ctx = CollectorContext(
        procfs=Path("/proc"),
        sysfs=Path("/sys"),
        node="n1",
        user_hz=os.sysconf("SC_CLK_TCK"),
    )
    runner = Runner([CpuCollector(ctx)])
    first = runner.run()
    second = runner.run()
    assert first.status["cpu"].success and second.status["cpu"].success
    a, b = cpu_row(first), cpu_row(second)
    assert a["cpus"] >= 1 and b["cpus"] >= 1
    for mode in CPU_MODES:
        assert a[f"{mode}_seconds"] >= 0
        assert b[f"{mode}_seconds"] >= a[f"{mode}_seconds"]
    assert a["user_seconds"] + a["system_seconds"] > 0
    assert 0 < a["memory_available_bytes"] <= a["memory_total_bytes"]


def test_a_value_that_does_not_fit_fails_only_its_collector() -> None:
    from telemetry.collectors.base import Collector

    class Broken(Collector):
        name = "broken-test"

        def collect(self) -> dict[str, list[dict[str, object]]]:
            return {"cpu": [{"memory_total_bytes": 2**70}]}

    class Foreign(Collector):
        name = "foreign-test"

        def collect(self) -> dict[str, list[dict[str, object]]]:
            return {"cpu": [{"no_such_column": 1}]}

    ctx = CollectorContext(
        procfs=FIXTURES / "normal_host" / "proc", sysfs=FIXTURES / "normal_host" / "sys",
        node="n1", user_hz=100,
    )  # fmt: skip
    result = Runner([CpuCollector(ctx), Broken(ctx), Foreign(ctx)]).run()
    assert result.status["cpu"].success
    assert not result.status["broken-test"].success
    assert "memory_total_bytes" in (result.status["broken-test"].error or "")
    assert not result.status["foreign-test"].success
    assert result.tables["cpu"].to_arrow().column("memory_total_bytes")[0].as_py() < 2**63


def test_checked_rows_columns_are_taken_only_for_a_known_table_and_its_columns() -> None:
    """check_rows takes a CheckedRows' columns as they are (no value looked at again), but only
    of a sample table and columns it has; else the rows are checked as any are."""
    rows = [{"job_id": "1", "cpu_seconds": 2.5}]
    columns = {"job_id": ("1",), "cpu_seconds": (2.5,)}
    assert check_rows({"job": CheckedRows(rows, columns)})["job"] is columns
    with pytest.raises(ValueError, match="unknown table 'jobs'"):
        check_rows({"jobs": CheckedRows(rows, columns)})
    odd = [{"job_id": "1", "cpu_second": 2.5}]
    with pytest.raises(ValueError, match="unknown column 'cpu_second'"):
        check_rows({"job": CheckedRows(odd, {"job_id": ("1",), "cpu_second": (2.5,)})})
