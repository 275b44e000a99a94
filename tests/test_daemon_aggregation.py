"""The daemon aggregates when scraped: rounds collected between scrapes are ingested together,
and what a scrape shows is what ingesting every round on its own would show."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from telemetry.daemon import AGGREGATE_EVERY_SECONDS, Daemon
from telemetry.frame import Frame, RoundBatch
from telemetry.schema import SchemaError
from telemetry.state import State
from tests.support.daemon import daemon_in_process
from tests.support.nvml.library import FakeNVML
from tests.support.nvml.profiles import H100_LOADED

FAKE = FakeNVML([H100_LOADED, H100_LOADED])
T0_NS = 1_800_000_000 * 10**9
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    fake = "tests.test_daemon_aggregation:FAKE"
    with daemon_in_process(tmp_path / "data", "n1", fake, interval_seconds=1) as d:
        ticks = iter(range(10**6))
        d.runner.clock_ns = lambda: T0_NS + next(ticks) * 10**9
        yield d


def _stored_rounds(d: Daemon) -> list[list[tuple[str, Frame]]]:
    """Spy on the journal: each round's rows as the daemon wrote them."""
    rounds: list[list[tuple[str, Frame]]] = []
    append = d.store.append

    def record(table: str, batch: RoundBatch) -> None:
        rounds[-1].append((table, batch.frame()))
        append(table, batch)

    d.store.append = record  # type: ignore[method-assign]
    real_round = d.round

    def one_round() -> None:
        rounds.append([])
        real_round()

    d.round = one_round  # type: ignore[method-assign]
    return rounds


def test_a_scrape_shows_every_round_as_if_each_was_ingested_alone(daemon: Daemon) -> None:
    rounds = _stored_rounds(daemon)
    for _ in range(7):  # fewer than one aggregation's worth: nothing ingested before the scrape
        daemon.round()
    assert daemon.state.tables["gpu"].stats.rows == 0
    shown = daemon.snapshot()

    alone = State()
    for batches in rounds:
        for table, batch in batches:
            alone.ingest(table, batch)
    expected = alone.snapshot()
    assert set(shown.tables) == set(expected.tables) >= {"cpu", "gpu"}
    for name, table in expected.tables.items():
        got = shown.tables[name]
        assert got.latest.equals(table.latest)
        assert got.totals.keys() == table.totals.keys()
        for part, values in table.totals.items():
            assert np.array_equal(got.totals[part], values), (name, part)
        for window, ratios in table.windows.items():
            assert np.array_equal(got.windows[window], ratios, equal_nan=True), (name, window)
        assert vars(shown.ingest[name]) == vars(expected.ingest[name])
    assert shown.ingest["gpu"].rows == 7 * 2
    assert float(shown.tables["gpu"].totals["capacity_us"].sum()) == 2 * 6 * 1e6  # 6 intervals


def test_rounds_nobody_scrapes_are_aggregated_in_bounded_batches(daemon: Daemon) -> None:
    every = int(AGGREGATE_EVERY_SECONDS)  # rounds at a 1 s interval
    for _ in range(every - 1):
        daemon.round()
    assert daemon.state.tables["gpu"].stats.rows == 0
    daemon.round()
    assert daemon.state.tables["gpu"].stats.rows == every * 2
    for _ in range(3 * every):
        daemon.round()
    assert daemon.state.tables["gpu"].stats.rows == 4 * every * 2  # never more held than that


def test_one_snapshot_per_round_whatever_the_scrapes(daemon: Daemon) -> None:
    daemon.round()
    first = daemon.snapshot()
    assert daemon.snapshot() is first
    daemon.round()
    second = daemon.snapshot()
    assert second is not first
    assert second.ingest["gpu"].rows == first.ingest["gpu"].rows + 2
    assert second.collectors["gpu"].success


def test_a_table_that_fails_to_ingest_costs_only_its_own_live_rows(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = State.ingest

    def refuse_cpu(self: State, name: str, batch: pa.Table) -> None:
        if name == "cpu":
            raise SchemaError("cpu: injected")
        real(self, name, batch)

    monkeypatch.setattr(State, "ingest", refuse_cpu)
    for _ in range(3):
        daemon.round()
    # a CLI test before this one may have set tally's level and stopped its propagation
    logger = logging.getLogger("tally.daemon")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="tally.daemon"):
            shown = daemon.snapshot()  # the scrape is answered
    finally:
        logger.removeHandler(caplog.handler)
    assert shown.ingest["gpu"].rows == 3 * 2
    assert "cpu" not in shown.tables
    assert "live cpu rows left out: cpu: injected" in caplog.text


def test_the_last_jobs_of_a_node_leave_the_scrape_a_max_gap_after_they_end(
    tmp_path: Path,
) -> None:
    """Once a node's last jobs end no job row comes at all: the scrape drops them when the
    node's other series run a max gap past them, not whenever the next job starts."""
    root = tmp_path / "node"
    shutil.copytree(FIXTURES / "slurm_v2", root, symlinks=True)
    for name in ("stat", "meminfo"):
        shutil.copy(FIXTURES / "normal_host" / "proc" / name, root / "proc" / name)
    with daemon_in_process(
        tmp_path / "data",
        "n1",
        "tests.test_daemon_aggregation:FAKE",
        procfs=root / "proc",
        sysfs=root / "sys",
        collectors={"cpu": True, "rapl": False, "gpu": False, "job": True},
        interval_seconds=1,
        max_gap_seconds=5,
    ) as d:
        ticks = iter(range(10**6))
        d.runner.clock_ns = lambda: T0_NS + next(ticks) * 10**9

        def jobs_shown() -> set[str]:
            text = d.render_text().decode()
            return set(re.findall(r'^tally_job_info\{.*[{,]job="([0-9]+)"', text, re.M))

        for _ in range(3):
            d.round()
        running = jobs_shown()
        assert running >= {"1001", "1002"}
        for job in (root / "sys/fs/cgroup/system.slice").glob("*slurmstepd.scope/job_*"):
            shutil.rmtree(job)
        for _ in range(5):  # the node's newest cpu row is 5 s past the jobs' last row
            d.round()
        assert jobs_shown() == running
        d.round()  # 6 s: past the max gap
        assert jobs_shown() == set()
        assert d.snapshot().tables["cpu"].latest.num_rows == 1
