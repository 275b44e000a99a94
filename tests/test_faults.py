"""Environment faults: data dir full or read-only, the clock stepping back, NVML or a GPU lost
mid-run."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from telemetry.daemon import Daemon
from telemetry.store.dataset import ReadStats, discover, read_table
from telemetry.store.writer import Store
from tests.support.daemon import daemon_in_process
from tests.support.nvml.library import FakeNVML
from tests.support.nvml.profiles import H100_LOADED, H100_MIG
from tests.support.promtool import find_promtool, promtool_check

FAKE = FakeNVML([H100_LOADED])


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with daemon_in_process(tmp_path / "data", "faulty", "tests.test_faults:FAKE") as d:
        yield d


def _clock(d: Daemon, seconds: list[float]) -> None:
    ticks = iter(int((1_800_000_000 + s) * 1e9) for s in seconds)
    d.runner.clock_ns = lambda: next(ticks)


def _stored(root: Path, table: str = "cpu") -> list[int]:
    data = read_table(root, table, discover(root)[table], ReadStats())
    return sorted(data.column("time").cast(pa.int64()).to_pylist())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_unwritable_data_dir_keeps_serving_counts_and_catches_up(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    _clock(daemon, [0, 5, 10, 15, 20, 25])
    daemon.round()
    real_append = Store.append

    def failing(self: Store, table: str, batch: pa.Table) -> None:
        raise OSError(code, "injected")

    monkeypatch.setattr(Store, "append", failing)
    for _ in range(3):
        daemon.round()
    text = generate_latest(daemon.registry).decode()
    assert "tally_store_errors_total 3.0" in text  # one failed attempt per round
    assert 'tally_cpus{node="faulty"} 64.0' in text, "metrics keep flowing"
    monkeypatch.setattr(Store, "append", real_append)
    daemon.round()
    daemon.round()
    daemon.store.close()
    times = _stored(daemon.config.data_dir)
    assert len(times) == 6 and len(set(times)) == 6, "held rounds were written once space returned"


def test_held_rows_are_bounded(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("telemetry.daemon.MAX_PENDING_ROWS", 3)
    _clock(daemon, [float(i) for i in range(10)])
    monkeypatch.setattr(
        Store, "append", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "x"))
    )
    for _ in range(10):
        daemon.round()
    assert sum(b.num_rows for _, b in daemon._pending) <= 3 * 2  # cpu and gpu rows per round
    assert daemon.pending_dropped > 0


def test_clock_stepping_back_drops_and_counts_never_crashes(daemon: Daemon) -> None:
    _clock(daemon, [0, 5, 10, 3, 7, 12, 15])
    for _ in range(7):
        daemon.round()
    text = generate_latest(daemon.registry).decode()
    assert 'tally_samples_dropped_total{reason="late",table="cpu"} 2.0' in text
    daemon.store.close()
    stored = _stored(daemon.config.data_dir)
    assert [round(t / 1e9 - 1_800_000_000) for t in stored] == [0, 5, 10, 12, 15]


def test_nvml_lost_mid_run_then_back(daemon: Daemon) -> None:
    _clock(daemon, [float(i) for i in range(6)])
    daemon.round()
    assert daemon.snapshot().collectors["gpu"].success
    FAKE.driver_loaded = False
    while FAKE._init_count:  # the driver goes away under the daemon
        FAKE.nvmlShutdown()
    try:
        daemon.round()
        daemon.round()
        status = daemon.snapshot().collectors
        assert not status["gpu"].success and status["cpu"].success
    finally:
        FAKE.driver_loaded = True
    daemon.round()
    assert daemon.snapshot().collectors["gpu"].success, "re-initialised when NVML came back"
    assert daemon.snapshot().tables["gpu"].latest.num_rows == 1


def test_shutdown_on_a_full_disk_says_what_it_loses_and_exits_cleanly(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM on a full disk dropped buffered rows without a word, and a compaction refused by
    a read-only disk ended in a traceback (exit 1)."""
    from telemetry.store import writer

    _clock(daemon, [0, 5, 10, 15])
    daemon.round()
    monkeypatch.setattr(
        Store, "append", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    daemon.round()
    daemon.round()
    held = sum(b.num_rows for _, b in daemon._pending)
    assert held > 0
    monkeypatch.setattr(writer, "COMPACTOR", "tests.support.refusing_compactor")
    with caplog.at_level("WARNING", logger="tally"):
        daemon._shutdown()  # must not raise
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"{held} collected rows that could not be written" in said
    assert "cannot compact the journals at shutdown" in said
    assert list(daemon.config.data_dir.rglob("*.arrows")), "the journal stays, readable"


def test_a_round_that_cannot_write_leaves_no_empty_journal(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from telemetry.store import writer

    _clock(daemon, [0, 5, 10])
    real_open = Store._open_journal

    class FullDisk:
        def write_table(self, *_: object) -> None:
            raise OSError(errno.ENOSPC, "full")

    def opening(self: Store, table: str, time_ns: int, hour: int) -> writer._Journal:
        journal = real_open(self, table, time_ns, hour)
        journal.writer = FullDisk()  # type: ignore[assignment]
        return journal

    monkeypatch.setattr(Store, "_open_journal", opening)
    for _ in range(3):
        daemon.round()
    assert daemon.store_errors >= 3
    assert not list(daemon.config.data_dir.rglob("*.arrows")), "no empty journal per round"


def test_a_data_dir_deleted_while_running_is_noticed_counted_and_recreated(
    daemon: Daemon,
) -> None:
    import shutil

    _clock(daemon, [0, 5, 10, 15])
    daemon.round()
    daemon.round()
    shutil.rmtree(daemon.config.data_dir)
    daemon.round()  # rows would have gone into an unlinked journal, silently
    daemon.round()
    assert daemon.snapshot().store["errors"] >= 1
    daemon.store.close()  # no traceback at the end either
    times = _stored(daemon.config.data_dir)
    assert len(times) == 2, "the rounds after the deletion are stored in the new data dir"


def test_a_journal_that_cannot_be_looked_at_is_not_taken_for_deleted(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a journal whose name is gone counts as deleted (lost, abandoned, its rows written
    anew); a stat that fails otherwise (EIO, EACCES) is a store error for that round, and the
    rows are held and written to the same journal when it answers again (review finding)."""
    import os

    _clock(daemon, [0, 5, 10, 15])
    daemon.round()
    journal = next(daemon.config.data_dir.rglob("*.arrows"))
    real_stat = os.stat

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path) == str(journal):
            raise OSError(5, "Input/output error", str(path))
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    daemon.round()
    assert daemon.store_errors >= 1 and daemon.store.lost_journals == 0
    monkeypatch.setattr(os, "stat", real_stat)
    daemon.round()
    daemon.round()
    assert daemon.store.lost_journals == 0
    daemon.store.close()
    assert len(_stored(daemon.config.data_dir)) == 4, "every round stored once"


def test_stop_ends_a_long_wait_between_rounds_at_once(daemon: Daemon) -> None:
    """The loop sleeps between rounds until the next one is due; a stop (SIGTERM's handler, or
    another thread) must end that sleep, not wait out a 10-minute interval."""
    import threading

    daemon.config.listen = "127.0.0.1:0"
    daemon.config.interval_seconds = 600.0
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 10
    while daemon._waker is None and time.monotonic() < deadline:  # in the loop's sleep
        time.sleep(0.01)
    assert daemon._waker is not None, "the loop never started"
    rounds = daemon._rounds
    began = time.monotonic()
    daemon.stop()
    runner.join(timeout=10)
    assert not runner.is_alive(), "stop() did not end the wait"
    assert time.monotonic() - began < 5
    assert daemon._rounds == rounds, "no round after the stop"
    assert daemon._waker is None


def test_a_first_round_that_raises_ends_the_daemon_instead_of_hanging(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to wait for ever on a server that never started, deaf to SIGTERM, so systemd's
    Restart=on-failure never fired."""
    import threading

    def broken() -> None:
        raise RuntimeError("the first round failed")

    monkeypatch.setattr(daemon, "round", broken)
    daemon.config.listen = "127.0.0.1:0"
    failure: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:
            failure.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=10)
    assert not runner.is_alive(), "the daemon hangs"
    assert failure and "first round failed" in str(failure[0])


TWO = FakeNVML([H100_LOADED, H100_MIG])


def _series(exposition: bytes, name: str) -> dict[str, float]:
    """``gpu`` label (and ``uuid``) → value of each sample of family ``name``."""
    found = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name == name:
                found[f"{sample.labels['gpu']}/{sample.labels['uuid']}"] = sample.value
    return found


def test_a_lost_gpu_is_marked_and_its_stale_readings_are_not_shown(tmp_path: Path) -> None:
    """SPEC §7: a lost GPU is marked (tally_gpu_lost) and skipped: none of its readings from
    before it was lost pass for current ones, MIG instances on it included; the other GPU goes
    on, and the lost one's counters go on from where they were when it answers again."""
    promtool = find_promtool()
    parent = TWO.devices[1].uuid
    with daemon_in_process(tmp_path / "data", "lossy", "tests.test_faults:TWO") as d:
        _clock(d, [float(i) for i in range(8)])
        d.round()
        d.round()
        before = d.render_text()
        shown = _series(before, "tally_gpu_memory_total_bytes")
        assert {key.split("/")[0] for key in shown} == {"0", "1"}
        assert sum(key.startswith("1/") for key in _series(before, "tally_gpu_info")) > 1  # MIG
        assert not _series(before, "tally_gpu_lost")
        energy_before = _series(before, "tally_gpu_energy_joules_total")[f"1/{parent}"]
        TWO.lose_gpu(1)
        try:
            d.round()
            lost = d.render_text()
            assert _series(lost, "tally_gpu_lost") == {f"1/{parent}": 1.0}
            for name in ("tally_gpu_info", "tally_gpu_memory_total_bytes",
                         "tally_gpu_energy_joules_total", "tally_gpu_power_watts"):  # fmt: skip
                assert {key.split("/")[0] for key in _series(lost, name)} == {"0"}, name
            assert d.snapshot().collectors["gpu"].success  # the other GPU was read
            checked = promtool_check(promtool, lost)
            assert checked.returncode == 0, checked.stdout + checked.stderr
        finally:
            TWO.restore_gpu(1)
        d.round()
        back = d.render_text()
        assert not _series(back, "tally_gpu_lost")
        energy_after = _series(back, "tally_gpu_energy_joules_total")[f"1/{parent}"]
        assert energy_after >= energy_before  # the counter was kept, not started again
