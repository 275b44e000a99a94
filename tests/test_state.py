"""telemetry.state against the plain-Python reference of SPEC §3 and §6."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import telemetry.state as state_module
from telemetry.frame import Frame
from telemetry.merge import Table
from telemetry.schema import CPU_MODES, CPU_SCHEMA, GPU_SCHEMA, JOB_SCHEMA, SERIES_KEYS
from telemetry.state import State, TableSnapshot, TableState
from tests.support import reference as ref
from tests.support.units import NS

T0 = 1_788_220_800 * NS  # 2026-09-01T00:00:00Z
RETAIN_S = 3600 + 60  # longest window + max gap
SCHEMAS = {"gpu": GPU_SCHEMA, "cpu": CPU_SCHEMA, "job": JOB_SCHEMA}
Row = dict[str, Any]


# --- rows and tables ----------------------------------------------------------------------------


def gpu_row(
    node: str,
    uuid: str,
    t_ns: int,
    util: float | None = 0.5,
    energy: float | None = None,
    power: float | None = 300.0,
    job_id: str | None = None,
) -> Row:
    return {
        "time": t_ns,
        "node": node,
        "gpu_uuid": uuid,
        "gpu_index": 0,
        "gpu_model": "NVIDIA H100 80GB HBM3",
        "utilization_ratio": util,
        "sm_active_ratio": None,
        "memory_used_bytes": 1 << 30,
        "memory_total_bytes": 80 << 30,
        "power_watts": power,
        "energy_joules": energy,
        "temperature_celsius": 40.0,
        "job_id": job_id,
    }


def cpu_row(
    node: str,
    t_ns: int,
    cpus: int = 8,
    busy: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0),
    energy: float | None = None,
    idle: float = 0.0,
) -> Row:
    row: Row = {"time": t_ns, "node": node, "cpus": cpus}
    for mode in CPU_MODES:
        row[f"{mode}_seconds"] = 0.0
    for mode, value in zip(ref.BUSY_MODES, busy, strict=True):
        row[f"{mode}_seconds"] = value
    row["idle_seconds"] = idle
    row["memory_total_bytes"] = 64 << 30
    row["memory_available_bytes"] = 32 << 30
    row["energy_joules"] = energy
    return row


def job_row(
    node: str,
    job_id: str,
    t_ns: int,
    cpus: float = 4.0,
    gpus: float = 1.0,
    cpu_seconds: float = 0.0,
) -> Row:
    return {
        "time": t_ns,
        "node": node,
        "job_id": job_id,
        "user": "alice",
        "account": "acme",
        "cpus_allocated": cpus,
        "gpus_allocated": gpus,
        "cpu_seconds": cpu_seconds,
        "memory_bytes": 1 << 30,
    }


# Rows reach the state as Arrow tables (replay) or as Frames (the node daemon): every test here
# runs with both, and must give the same state.
KIND = {"rows": "arrow"}


@pytest.fixture(autouse=True, scope="module", params=["arrow", "frame"])
def row_kind(request: pytest.FixtureRequest) -> Any:
    KIND["rows"] = request.param
    yield
    KIND["rows"] = "arrow"


# Retained rows live in a base and a small per-series tail that compactions merge into it: every
# test here also runs with a tail of eight rows that narrows to two (as a node's narrows where
# series are many: by a compaction of its own when five or more series come before the first)
# and then compacts every other row of a series, and with a two-row tail and the base searched
# series by series (its one packed key made to overflow).
LAYOUTS = {
    "wide": {},
    "tiny": {"TAIL_ROWS": 8, "MIN_TAIL_ROWS": 2, "TAIL_CELLS": 16},
    "unpacked": {"TAIL_ROWS": 2, "_PACKED_KEY_LIMIT": 0},
}


@pytest.fixture(autouse=True, scope="module", params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> Any:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in LAYOUTS[request.param].items():
            patch.setattr(state_module, name, value)
        yield request.param


def table(name: str, rows: list[Row]) -> Table:
    if KIND["rows"] == "frame":
        return Frame.from_rows(name, rows)
    return pa.Table.from_pylist(rows, schema=SCHEMAS[name])


def arrow(latest: Table) -> pa.Table:
    return latest.to_arrow() if isinstance(latest, Frame) else latest


def ts(seconds: float) -> int:
    return T0 + round(seconds * NS)


def snapshot_dict(name: str, snap: TableSnapshot | None) -> dict[tuple[str, ...], dict[str, Any]]:
    """A TableSnapshot in the shape of ``reference.table_snapshot`` (NaN ratios as None)."""
    if snap is None:
        return {}
    latest = arrow(snap.latest)
    keys = list(zip(*[latest.column(k).to_pylist() for k in SERIES_KEYS[name]], strict=True))
    times = latest.column("time").cast(pa.int64()).to_pylist()
    for values in [*snap.totals.values(), *snap.windows.values()]:
        assert len(values) == len(keys)
    out = {}
    for i, key in enumerate(keys):
        windows = {}
        for label, ratios in snap.windows.items():
            r = float(ratios[i])
            windows[label] = None if math.isnan(r) else r
        out[key] = {
            "time": times[i],
            "totals": {p: int(v[i]) for p, v in snap.totals.items()},
            "windows": windows,
        }
    return out


def check_against_reference(state: State, data: dict[str, list[Row]]) -> None:
    snap = state.snapshot()
    newest = ref.newest_by_node(data)
    for name, rows in data.items():
        st_ = state.tables[name]
        assert st_.totals == ref.table_totals(name, rows), name
        expected = ref.table_snapshot(name, rows, elsewhere=newest)
        assert snapshot_dict(name, snap.tables.get(name)) == expected, name


# --- generated data -----------------------------------------------------------------------------

STEP_NS = st.one_of(
    st.just(0),  # duplicate time
    st.integers(1, 60).map(lambda s: s * NS),
    st.just(61 * NS),  # gap
    st.integers(61, 600).map(lambda s: s * NS),
    st.integers(1, 60 * NS),
)
MAYBE_RATIO = st.one_of(st.none(), st.floats(0, 1, width=32))


@st.composite
def counter(
    draw: st.DrawFn, n: int, nullable: bool, max_inc: float = 2000, start: float = 1e5
) -> list[float | None]:
    out: list[float | None] = []
    x = draw(st.floats(0, start))
    kinds = ["inc", "inc", "inc", "restart", *(["null"] if nullable else [])]
    for _ in range(n):
        kind = draw(st.sampled_from(kinds))
        if kind == "null":
            out.append(None)
            continue
        x = draw(st.floats(0, 50)) if kind == "restart" else x + draw(st.floats(0, max_inc))
        out.append(x)
    return out


@st.composite
def series_times(draw: st.DrawFn) -> list[int]:
    t = T0 + draw(st.integers(0, 4000)) * NS
    times = [t]
    for _ in range(draw(st.integers(0, 11))):
        t += draw(STEP_NS)
        times.append(t)
    return times


@st.composite
def datasets(draw: st.DrawFn) -> dict[str, list[Row]]:
    """Rows of the three tables on one or two nodes, in generation order (series by series)."""
    data: dict[str, list[Row]] = {"gpu": [], "cpu": [], "job": []}
    nodes = draw(st.lists(st.sampled_from(["n1", "n2", "n3"]), min_size=1, max_size=2, unique=True))
    for node in nodes:
        times = draw(series_times())
        n = len(times)
        modes = [draw(counter(n, nullable=False, max_inc=50, start=100)) for _ in ref.BUSY_MODES]
        energy = draw(counter(n, nullable=True))
        cpus = draw(st.integers(1, 32))
        for i, t in enumerate(times):
            busy = tuple(m[i] for m in modes)
            data["cpu"].append(cpu_row(node, t, cpus, busy, energy[i]))  # type: ignore[arg-type]
        for uuid in draw(st.lists(st.sampled_from(["GPU-a", "GPU-b", "MIG-c"]), unique=True)):
            times = draw(series_times())
            n = len(times)
            energy = draw(counter(n, nullable=True))
            for i, t in enumerate(times):
                util = draw(MAYBE_RATIO)
                power = draw(st.one_of(st.none(), st.floats(0, 700, width=32)))
                data["gpu"].append(gpu_row(node, uuid, t, util, energy[i], power))
        for job in draw(st.lists(st.sampled_from(["101", "102", "103"]), max_size=2, unique=True)):
            times = draw(series_times())
            used = draw(counter(len(times), nullable=False))
            for i, t in enumerate(times):
                c = draw(st.floats(0, 64, width=32))
                g = draw(st.floats(0, 8, width=32))
                data["job"].append(job_row(node, job, t, c, g, used[i]))  # type: ignore[arg-type]
    return data


def ingest_all(state: State, data: dict[str, list[Row]]) -> None:
    for name, rows in data.items():
        if rows:
            state.ingest(name, table(name, rows))


def n_duplicates(name: str, rows: list[Row]) -> int:
    return len(rows) - sum(len(s) for s in ref.table_series(name, rows).values())


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(datasets(), st.randoms(use_true_random=False))
def test_one_batch_in_any_order_matches_reference(data: dict[str, list[Row]], rnd: Any) -> None:
    for rows in data.values():
        rnd.shuffle(rows)  # the reference's "first occurrence" follows this order too
    state = State()
    ingest_all(state, data)
    check_against_reference(state, data)
    for name, rows in data.items():
        stats = state.tables[name].stats
        assert (stats.rows, stats.duplicates, stats.late) == (
            len(rows),
            n_duplicates(name, rows),
            0,
        )


@settings(max_examples=80, deadline=None)
@given(datasets(), st.lists(st.integers(0, 200), max_size=6))
def test_time_ordered_batches_equal_one_batch(data: dict[str, list[Row]], cuts: list[int]) -> None:
    ordered = {name: sorted(rows, key=lambda r: r["time"]) for name, rows in data.items()}
    whole = State()
    ingest_all(whole, ordered)
    split = State()
    for name, rows in ordered.items():
        bounds = sorted({0, len(rows), *(c for c in cuts if c < len(rows))})
        for lo, hi in itertools.pairwise(bounds):
            split.ingest(name, table(name, rows[lo:hi]))

    check_against_reference(whole, ordered)
    check_against_reference(split, ordered)
    a, b = whole.snapshot(), split.snapshot()
    assert sorted(a.tables) == sorted(b.tables)
    for name in a.tables:
        assert snapshot_dict(name, a.tables[name]) == snapshot_dict(name, b.tables[name])
        assert a.tables[name].latest.equals(b.tables[name].latest)
    for name in ordered:
        assert vars(whole.tables[name].stats) == vars(split.tables[name].stats)
        assert split.tables[name].stats.late == 0


@settings(max_examples=80, deadline=None)
@given(datasets(), st.randoms(use_true_random=False))
def test_resent_rows_are_duplicates_and_change_nothing(
    data: dict[str, list[Row]], rnd: Any
) -> None:
    state = State()
    ingest_all(state, data)
    before = state.snapshot()
    totals = {name: {k: dict(v) for k, v in s.totals.items()} for name, s in state.tables.items()}
    stats = {name: dict(vars(s.stats)) for name, s in state.tables.items()}

    for name, rows in data.items():
        # Re-send rows the state still holds: of live series, within 1h + max_gap of their newest.
        alive = ref.alive_series(ref.table_series(name, rows), 60)
        newest = {k: s[-1]["time"] for k, s in alive.items()}
        keys = SERIES_KEYS[name]
        held = [
            r
            for r in rows
            if tuple(r[k] for k in keys) in newest
            and r["time"] > newest[tuple(r[k] for k in keys)] - RETAIN_S * NS
        ]
        resend = rnd.sample(held, rnd.randint(0, len(held)))
        if resend:
            state.ingest(name, table(name, resend))
        s = state.tables[name].stats
        assert s.duplicates == stats[name]["duplicates"] + len(resend)
        assert s.late == stats[name]["late"]
        assert s.rows == stats[name]["rows"] + len(resend)
        assert state.tables[name].totals == totals[name]

    after = state.snapshot()
    for name in data:
        assert snapshot_dict(name, after.tables.get(name)) == snapshot_dict(
            name, before.tables.get(name)
        )


def _by_key(name: str, latest: Table) -> list[dict[str, Any]]:
    latest = arrow(latest)
    at = latest.schema.get_field_index("time")
    rows: list[dict[str, Any]] = latest.set_column(
        at, "time", latest.column("time").cast(pa.int64())
    ).to_pylist()
    return sorted(rows, key=lambda r: tuple(r[k] for k in SERIES_KEYS[name]))


@settings(max_examples=80, deadline=None)
@given(datasets(), st.randoms(use_true_random=False), st.lists(st.integers(0, 200), max_size=5))
def test_a_latest_only_table_shows_the_rows_the_full_state_shows(
    data: dict[str, list[Row]], rnd: Any, cuts: list[int]
) -> None:
    """Batches in any order, with duplicates and late rows: the job table kept as its newest
    rows only shows what the full state shows, and drops as many rows."""
    for rows in data.values():
        rnd.shuffle(rows)
    full, latest = State(), State(latest_only=frozenset({"job"}))
    for name, rows in data.items():
        bounds = sorted({0, len(rows), *(c for c in cuts if c < len(rows))})
        for lo, hi in itertools.pairwise(bounds):
            full.ingest(name, table(name, rows[lo:hi]))
            latest.ingest(name, table(name, rows[lo:hi]))
    a, b = full.snapshot(), latest.snapshot()
    assert sorted(a.tables) == sorted(b.tables)
    for name in a.tables:
        assert _by_key(name, a.tables[name].latest) == _by_key(name, b.tables[name].latest)
    shown = b.tables.get("job")
    expected = ref.table_snapshot("job", data["job"], elsewhere=ref.newest_by_node(data))
    assert {k: v["time"] for k, v in snapshot_dict("job", shown).items()} == {
        k: v["time"] for k, v in expected.items()
    }
    assert shown is None or (not shown.totals and not shown.windows)
    kept, dropped = full.tables["job"].stats, latest.tables["job"].stats
    assert kept.rows == dropped.rows == len(data["job"])
    assert kept.duplicates + kept.late == dropped.duplicates + dropped.late
    if not cuts:  # one batch: nothing is late, every repeat a duplicate
        assert (dropped.duplicates, dropped.late) == (n_duplicates("job", data["job"]), 0)


# --- hand-computed cases ----------------------------------------------------------------------


def test_cpu_totals_hand_computed() -> None:
    state = TableState("cpu")
    rows = [
        cpu_row("n1", ts(0), 4, (100.0, 0.0, 0.0, 0.0, 0.0), energy=1000.0),
        cpu_row("n1", ts(10), 4, (110.0, 1.0, 4.0, 0.5, 0.5), energy=1500.0),  # 16 s busy
        cpu_row("n1", ts(20), 4, (3.0, 0.0, 1.0, 0.0, 0.0), energy=None),  # restart: 4 s
        cpu_row("n1", ts(100), 4, (10.0, 0.0, 1.0, 0.0, 0.0), energy=10.0),  # 80 s gap
        cpu_row(
            "n1", ts(130), 2, (20.0, 0.0, 1.0, 0.0, 0.0), energy=40.0
        ),  # 2 cpus x 30 s, 10 s busy, 30 J
    ]
    state.ingest(table("cpu", rows))
    assert state.totals == {
        ("n1",): {
            "capacity_us": 40_000_000 + 40_000_000 + 60_000_000,
            "busy_us": 16_000_000 + 4_000_000 + 10_000_000,
            "energy_mj": 500_000 + 30_000,
            "gap_us": 80_000_000,
        }
    }
    snap = state.snapshot()
    # 1m window: intervals ending in (70, 130] → only the one ending at 130 (the gap adds nothing)
    assert snap.windows["1m"].tolist() == [10 / 60]
    assert snap.windows["5m"].tolist() == [30 / 140]
    assert snap.totals["busy_us"].tolist() == [30_000_000]


def test_many_new_series_narrow_the_tail_and_sums_stay_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tail wide for a few series is narrowed by a compaction when many more come (before any
    series' tail is full); every row is kept through it."""
    monkeypatch.setattr(state_module, "TAIL_ROWS", 8)
    monkeypatch.setattr(state_module, "MIN_TAIL_ROWS", 2)
    monkeypatch.setattr(state_module, "TAIL_CELLS", 16)
    state = State()
    rows: list[Row] = []

    def add(batch: list[Row]) -> None:
        rows.extend(batch)
        state.ingest("cpu", table("cpu", batch))

    for s in range(3):  # three rows of one series: its tail of eight is not full
        add([cpu_row("n0", ts(10 * s), busy=(float(s), 0.0, 0.0, 0.0, 0.0), idle=20.0 * s)])
    assert state.tables["cpu"]._tail_times.shape[1] == 8
    nodes = [f"n{i}" for i in range(12)]
    for s in range(3, 9):
        busy = (2.0 * s, 0.0, 0.0, 0.0, 0.0)
        add([cpu_row(n, ts(10 * s), busy=busy, idle=9.0 * s) for n in nodes])
        if s == 3:
            assert state.tables["cpu"]._tail_times.shape[1] == 2  # narrowed by the new series
        check_against_reference(state, {"cpu": rows})


@pytest.mark.parametrize("before", [0, 10])
def test_a_batch_of_many_series_gets_a_narrow_tail(
    monkeypatch: pytest.MonkeyPatch, before: int
) -> None:
    """Thousands of series in one batch, first or after a few: their tails are the narrow ones
    at once (not a wide tail for each until one fills), so memory stays as it was."""
    for name, value in {"TAIL_ROWS": 256, "MIN_TAIL_ROWS": 64, "TAIL_CELLS": 1 << 16}.items():
        monkeypatch.setattr(state_module, name, value)
    state = TableState("cpu")
    if before:
        state.ingest(table("cpu", [cpu_row(f"n{i}", ts(0)) for i in range(before)]))
        assert state._tail_times.shape[1] == 256  # few series: a wide tail
    state.ingest(table("cpu", [cpu_row(f"n{i}", ts(1)) for i in range(2000)]))
    assert state._tail_times.shape == (state._tail_n.size, 64)
    assert state._tail_n.size < 2 * 2000


def test_totals_past_int64_saturate_instead_of_failing_every_scrape() -> None:
    """Garbage counter readings, each within int64, can sum past it; the snapshot (every
    scrape) must still be made, the total shown at int64's maximum."""
    state = TableState("cpu")
    busy = (1.0, 0.0, 0.0, 0.0, 0.0)
    state.ingest(table("cpu", [cpu_row(n, ts(0), 4, busy, energy=0.0) for n in ["n1", "n2", "n3"]]))
    state.totals[("n1",)]["energy_mj"] = 2**64  # what two near-2^63 intervals add up to
    state.totals[("n2",)]["energy_mj"] = -(2**64)
    snap = state.snapshot()
    nodes = arrow(snap.latest).column("node").to_pylist()
    shown = dict(zip(nodes, snap.totals["energy_mj"].tolist(), strict=True))
    assert shown == {"n1": 2**63 - 1, "n2": -(2**63), "n3": 0}


def test_gpu_totals_equal_reference_after_batches() -> None:
    rows = [
        gpu_row("n1", "GPU-a", ts(s), util, energy, power)
        for s, util, energy, power in [
            (0, 0.5, 100.0, 300.0),
            (5, 0.5, 1600.0, 300.0),
            (10, None, None, 250.0),
            (15, 1.0, 3000.0, None),
            (20, 1.0, 10.0, None),
        ]
    ]
    state = TableState("gpu")
    for row in rows:
        state.ingest(table("gpu", [row]))
    expected = {
        "capacity_us": 20_000_000,
        "busy_us": 2_500_000 + 0 + 5_000_000 + 5_000_000,
        "energy_mj": 1_500_000 + 1_250_000 + 0 + 10_000,
        "gap_us": 0,
    }
    assert state.totals == {("n1", "GPU-a"): expected}
    assert ref.table_totals("gpu", rows) == {("n1", "GPU-a"): expected}


def test_duplicates_counted_and_ignored_even_with_other_values() -> None:
    state = TableState("job")
    state.ingest(table("job", [job_row("n1", "7", ts(s), cpu_seconds=s) for s in (0, 10, 20)]))
    before = {k: dict(v) for k, v in state.totals.items()}
    assert before == {
        ("n1", "7"): {
            "cpus_allocated_us": 80_000_000,
            "gpus_allocated_us": 20_000_000,
            "cpu_used_us": 20_000_000,
        }
    }
    # the same series and time twice more, with other values
    state.ingest(table("job", [job_row("n1", "7", ts(20), cpus=64.0, cpu_seconds=999.0)] * 2))
    assert state.stats.duplicates == 2
    assert state.stats.late == 0
    assert state.totals == before


def test_late_rows_are_counted_and_dropped() -> None:
    state = TableState("cpu")
    busy = [(float(s), 0.0, 0.0, 0.0, 0.0) for s in range(5)]
    state.ingest(table("cpu", [cpu_row("n1", ts(10 * i), 1, busy[i]) for i in range(4)]))
    before = {k: dict(v) for k, v in state.totals.items()}
    late = [
        cpu_row("n1", ts(15), 1, (100.0, 0.0, 0.0, 0.0, 0.0)),
        cpu_row("n1", ts(25), 1, (200.0, 0.0, 0.0, 0.0, 0.0)),
        cpu_row("n1", ts(30), 1, (300.0, 0.0, 0.0, 0.0, 0.0)),  # duplicate, not late
        cpu_row("n2", ts(5), 2, (0.0, 0.0, 0.0, 0.0, 0.0)),  # a new series is never late
        cpu_row("n2", ts(15), 2, (5.0, 0.0, 0.0, 0.0, 0.0)),
    ]
    state.ingest(table("cpu", late))
    assert (state.stats.rows, state.stats.late, state.stats.duplicates) == (9, 2, 1)
    assert state.totals[("n1",)] == before[("n1",)]
    assert state.totals[("n2",)]["capacity_us"] == 20_000_000
    assert state.totals[("n2",)]["busy_us"] == 5_000_000
    # the late rows left no trace: the next row's interval starts at 30 s
    state.ingest(table("cpu", [cpu_row("n1", ts(40), 1, busy[4])]))
    assert state.totals[("n1",)]["capacity_us"] == 40_000_000
    assert state.totals[("n1",)]["busy_us"] == 4_000_000
    assert state.stats.late == 2


def test_series_far_behind_its_node_is_not_current() -> None:
    rows = []
    for uuid, last in [("GPU-a", 300), ("GPU-b", 200), ("GPU-c", 240), ("GPU-d", 239)]:
        rows += [gpu_row("n1", uuid, ts(s)) for s in range(0, last + 1, 20 if last != 239 else 1)]
    rows += [gpu_row("n2", "GPU-e", ts(s)) for s in (980, 1000)]
    state = State()
    state.ingest("gpu", table("gpu", rows))
    snap = state.snapshot().tables["gpu"]
    columns = [arrow(snap.latest).column(k).to_pylist() for k in ("node", "gpu_uuid")]
    current = set(zip(*columns, strict=True))
    # b is 100 s behind n1's newest, d 61 s; c exactly max_gap (60 s) behind is still current;
    # n2 being far ahead of n1 does not matter.
    assert current == {("n1", "GPU-a"), ("n1", "GPU-c"), ("n2", "GPU-e")}
    assert set(snapshot_dict("gpu", snap)) == set(ref.table_snapshot("gpu", rows))
    assert snap.windows["1m"].tolist() == [0.5, 0.5, 0.5]
    # their totals stay in the state, they are only left out of the snapshot
    assert state.tables["gpu"].totals[("n1", "GPU-b")]["capacity_us"] == 200_000_000


@pytest.mark.parametrize("latest_only", [frozenset(), frozenset({"job"})])
def test_the_jobs_of_a_node_left_without_jobs_leave_once_its_other_tables_run_on(
    latest_only: frozenset[str],
) -> None:
    """No job row comes once a node's last jobs end: they are current while the node's newest
    sample in any table is within max gap of theirs, not for as long as no job row comes."""
    state = State(latest_only=latest_only)
    state.ingest("job", table("job", [job_row("n1", j, ts(s)) for j in ("7", "8")
                                      for s in range(0, 101, 10)]))  # fmt: skip
    state.ingest("job", table("job", [job_row("n2", "9", ts(s)) for s in range(0, 101, 10)]))
    state.ingest("cpu", table("cpu", [cpu_row("n1", ts(s), 2) for s in range(0, 161, 10)]))

    def shown() -> list[tuple[str, str]]:
        latest = arrow(state.snapshot().tables["job"].latest)
        return sorted(zip(*(latest.column(k).to_pylist() for k in ("node", "job_id")),
                          strict=True))  # fmt: skip

    assert shown() == [("n1", "7"), ("n1", "8"), ("n2", "9")]  # n1's newest is 60 s on: current
    state.ingest("cpu", table("cpu", [cpu_row("n1", ts(170), 2)]))
    assert shown() == [("n2", "9")]  # 70 s behind its node; n2 has no other table: still shown
    state.ingest("job", table("job", [job_row("n1", "10", ts(175))]))
    assert shown() == [("n1", "10"), ("n2", "9")]


def test_silent_series_is_evicted_with_its_totals() -> None:
    rows_n1 = [cpu_row("n1", ts(s), 2) for s in range(0, 101, 10)]
    rows_n3 = [cpu_row("n3", ts(s), 2) for s in range(0, 401, 10)]
    tail = [cpu_row("n2", ts(s), 2) for s in range(0, 100 + RETAIN_S + 61, 30)]
    state = TableState("cpu")
    state.ingest(table("cpu", rows_n1 + rows_n3 + tail[:10]))
    assert set(state.totals) == {("n1",), ("n2",), ("n3",)}
    assert state.totals[("n1",)]["capacity_us"] == 200_000_000
    state.ingest(table("cpu", tail[10:]))
    newest = tail[-1]["time"]
    assert newest - rows_n1[-1]["time"] > RETAIN_S * NS  # n1 silent for more than 1h + max gap
    assert newest - rows_n3[-1]["time"] < RETAIN_S * NS  # n3 not yet
    assert set(state.totals) == {("n2",), ("n3",)}
    snap = state.snapshot()
    assert sorted(arrow(snap.latest).column("node").to_pylist()) == ["n2", "n3"]
    assert not any(n == "n1" for n in arrow(state.retained).column("node").to_pylist())
    # the same rows at once give the same result, and the reference agrees
    rows = rows_n1 + rows_n3 + tail
    at_once = TableState("cpu")
    at_once.ingest(table("cpu", rows))
    assert at_once.totals == state.totals == ref.table_totals("cpu", rows)
    # a series that comes back after eviction starts from zero
    state.ingest(table("cpu", [cpu_row("n1", newest, 2), cpu_row("n1", newest + 10 * NS, 2)]))
    assert state.totals[("n1",)]["capacity_us"] == 20_000_000


def test_key_values_with_separator_characters_do_not_collide() -> None:
    from telemetry.rows import series_codes
    from tests.support.tables import gpu_table

    a = gpu_table("n\x1fGPU", "x", 0, [0.0, 5.0])
    b = gpu_table("n", "GPU\x1fx", 1, [0.0, 5.0])
    codes, labels = series_codes(pa.concat_tables([a, b]), "gpu")
    assert sorted(labels) == [("n", "GPU\x1fx"), ("n\x1fGPU", "x")]
    assert len(set(codes.tolist())) == 2


def test_rows_outside_the_valid_ranges_never_reach_the_counters() -> None:
    """A broken reading (utilisation 3e38, a negative CPU count) would turn the live counters
    backwards: the row is dropped and counted as out_of_range, the counters go on."""
    from exporters.prometheus import TallyCollector
    from tests.support.tables import cpu_table, gpu_table

    state = State()
    good = gpu_table("n1", "GPU-1", 0, [0.0, 5.0, 10.0], util=0.5)
    state.ingest("gpu", good)
    bad = gpu_table("n1", "GPU-1", 0, [15.0], util=0.5)
    bad = bad.set_column(
        bad.schema.get_field_index("utilization_ratio"),
        bad.schema.field("utilization_ratio"),
        pa.array([3e38], pa.float32()),
    )
    state.ingest("gpu", bad)
    cpus = cpu_table("n1", [0.0])
    cpus = cpus.set_column(2, cpus.schema.field("cpus"), pa.array([-8], pa.int32()))
    state.ingest("cpu", cpus)
    snapshot = state.snapshot()
    assert snapshot.ingest["gpu"].out_of_range == 1 and snapshot.ingest["cpu"].out_of_range == 1
    text = TallyCollector(lambda: snapshot).render_text().decode()
    assert 'tally_samples_dropped_total{reason="out_of_range",table="gpu"} 1.0' in text
    busy = [line for line in text.splitlines() if line.startswith("tally_gpu_busy_seconds_total")]
    assert busy and all(float(line.split()[-1]) == 5.0 for line in busy), busy


def test_job_churn_leaves_the_live_totals_and_keeps_the_engine_small() -> None:
    """100k short jobs made each live round walk every job ever seen (14 → 410 ms, RSS 84 →
    268 MiB). Silent jobs are folded into their tenant's sums: totals equal, state small."""
    from telemetry.billing.engine import LIVE_WINDOW_SECONDS, Biller
    from telemetry.billing.inventory import parse_inventory
    from tests.support.tables import job_table

    inventory = parse_inventory(
        '[[pool]]\nname = "g"\nkind = "gpu"\nownership = "own"\nnodes = ["*"]\n'
        "cost_per_unit_hour = 1\nprice_per_unit_hour = 2\n"
        '[[pool]]\nname = "c"\nkind = "cpu"\nownership = "own"\nnodes = ["*"]\n'
        "cost_per_unit_hour = 1\nprice_per_unit_hour = 2\n"
    )
    kept, retiring = (Biller(inventory, LIVE_WINDOW_SECONDS) for _ in range(2))
    for j in range(300):  # a 10-minute job starting every 2 minutes: 10 hours of churn
        start = 120.0 * j
        job = job_table("n1", f"job-{j}", [start + t for t in range(0, 600, 30)],
                        account=f"tenant-{j % 7}")  # fmt: skip
        for biller in (kept, retiring):
            biller.add({"job": job})
        if j % 20 == 19:
            retiring.retire()
    assert retiring.live_totals() == kept.live_totals()
    assert len(retiring.owner) < 150 < len(kept.owner) == 300
    assert retiring.job_parts.rows < kept.job_parts.compact()[0][0].size
    assert retiring.carry["job"].num_rows < 150


def test_a_node_with_a_wrong_clock_retires_nobody_else() -> None:
    """Silence is measured against each node's own newest job row: one row dated 2030 from
    another node used to retire every job on every poll, halving the live allocation."""
    from telemetry.billing.engine import LIVE_WINDOW_SECONDS, Biller
    from telemetry.billing.inventory import parse_inventory
    from tests.support.tables import job_table

    inventory = parse_inventory(
        '[[pool]]\nname = "c"\nkind = "cpu"\nownership = "own"\nnodes = ["*"]\n'
        "cost_per_unit_hour = 1\nprice_per_unit_hour = 2\n"
    )
    kept, retiring = (Biller(inventory, LIVE_WINDOW_SECONDS) for _ in range(2))
    future = job_table("n9", "clock", [0.0])
    far = pa.array([1_900_000_000 * NS], pa.timestamp("ns", tz="UTC"))  # 2030
    future = future.set_column(0, future.schema.field("time"), far)
    for biller in (kept, retiring):
        biller.add({"job": future})
    for minute in range(30):  # one long job on n1, fed minute by minute, retire after each
        rows = job_table("n1", "long", [minute * 60.0 + t for t in range(0, 60, 30)])
        for biller in (kept, retiring):
            biller.add({"job": rows})
        retiring.retire()
    assert retiring.live_totals() == kept.live_totals()
    assert ("long" in retiring.jobs.values) and len(retiring.owner) == 2


def test_two_hours_of_one_row_rounds_match_the_reference_with_gaps_and_resent_rows() -> None:
    """A daemon's life: one row per series per round for longer than the retention, so rows
    leave the windows and the horizon. Windows, totals and latest rows equal the reference's
    over all rows; an old row resent within the horizon is a duplicate, past it late."""
    step = 20 * NS
    rounds = (RETAIN_S + 1800) * NS // step
    gpu: list[Row] = []
    gpu_a: list[Row] = []
    cpu: list[Row] = []
    jobs: list[list[Row]] = []  # per round: 40 jobs, some ending and new ones starting
    state = State()
    duplicates = late = 0
    for k in range(rounds):
        t = T0 + k * step
        batch_gpu = [gpu_row("n1", "GPU-a", t, util=(k % 5) / 4, energy=1e6 + 300.0 * k * 20)]
        if not 50 <= k % 400 < 60:  # GPU-b falls silent for 200 s now and then: gaps
            batch_gpu.append(gpu_row("n1", "GPU-b", t, util=0.25, power=200.0))
        busy = (10.0 * k, 0.0, 2.0 * k, 0.0, 0.0)
        batch_cpu = [cpu_row("n1", t, 8, busy=busy)]
        gpu += batch_gpu
        gpu_a.append(batch_gpu[0])
        batch_job = [job_row("n1", str(k // 100 * 10 + j), t, 2.0, 0.0, 3.0 * k) for j in range(40)]
        jobs.append(batch_job)
        cpu += batch_cpu
        if k >= 30 and k % 31 == 0:
            # an old GPU-a row resent: 30 rounds back (within the horizon) or 200 (past it)
            old = gpu_a[k - 200 if k >= 200 else k - 30]
            if t - old["time"] < RETAIN_S * NS:
                duplicates += 1
            else:
                late += 1
            batch_gpu = [dict(old), *batch_gpu]
            batch_job = [*jobs[k - 200 if k >= 200 else k - 30][3:5], *batch_job]
        state.ingest("gpu", table("gpu", batch_gpu))
        state.ingest("cpu", table("cpu", batch_cpu))
        state.ingest("job", table("job", batch_job))
    job = [row for rows in jobs for row in rows]
    check_against_reference(state, {"gpu": gpu, "cpu": cpu, "job": job})
    stats = state.tables["gpu"].stats
    assert (stats.duplicates, stats.late) == (duplicates, late)
    # a job that ended keeps its rows until its own newest is 1h + max gap old: a resent row of
    # it counts as a duplicate where a running GPU's would be late
    stats = state.tables["job"].stats
    assert stats.duplicates + stats.late == 2 * (duplicates + late)
    assert stats.duplicates > 2 * duplicates
    assert duplicates and late
    assert state.snapshot().tables["gpu"].windows["1h"].size == 2
    # an hour of rows is not held as Arrow rows to re-sort every round: one per series
    assert state.tables["gpu"].retained.num_rows == 2


# --- the retained rows' structure: compactions, forgotten slots, late and out-of-order rows ------


def test_windows_and_totals_hold_across_each_compaction() -> None:
    """Rows leave the windows while the tail is merged into the base (every 64 rows of a series,
    or every 2): each round's snapshot equals the reference, before, at and after a compaction."""
    state = State()
    data: dict[str, list[Row]] = {"gpu": [], "cpu": []}
    for k in range(70):
        t = ts(10 * k)
        gpu = [gpu_row("n1", "GPU-a", t, util=(k % 7) / 6, energy=100.0 * k)]
        if k % 13 < 9:  # GPU-b skips rounds: rows of one series reach the tail unevenly
            gpu.append(gpu_row("n1", "GPU-b", t, util=0.25))
        cpu = [cpu_row("n1", t, 4, busy=(3.0 * k, 0.0, float(k), 0.0, 0.0))]
        data["gpu"] += gpu
        data["cpu"] += cpu
        state.ingest("gpu", table("gpu", gpu))
        state.ingest("cpu", table("cpu", cpu))
        if k < 3 or 60 <= k <= 66:
            check_against_reference(state, data)
    check_against_reference(state, data)


def test_rows_older_than_the_compacted_ones_are_duplicates_where_retained_else_late() -> None:
    state = TableState("gpu")
    for s in range(100, 400, 10):  # 30 rows: most of them merged into the base by now
        state.ingest(table("gpu", [gpu_row("n1", "GPU-a", ts(s))]))
    windows = {k: v.tolist() for k, v in state.snapshot().windows.items()}
    stale = [
        gpu_row("n1", "GPU-a", ts(110), util=1.0),  # the base's second row: a duplicate
        gpu_row("n1", "GPU-a", ts(380), util=1.0),  # the newest but one: a duplicate
        gpu_row("n1", "GPU-a", ts(115), util=1.0),  # between two retained rows: late
        gpu_row("n1", "GPU-a", ts(50), util=1.0),  # before the series' first row: late
        gpu_row("n1", "GPU-a", ts(110), util=1.0),  # again: a duplicate again
    ]
    state.ingest(table("gpu", stale))
    assert (state.stats.duplicates, state.stats.late) == (3, 2)
    assert {k: v.tolist() for k, v in state.snapshot().windows.items()} == windows
    # an hour later the same old times are past the horizon: late, not duplicates
    state.ingest(table("gpu", [gpu_row("n1", "GPU-a", ts(400 + RETAIN_S))]))
    state.ingest(table("gpu", [gpu_row("n1", "GPU-a", ts(s)) for s in (390, 400, 410)]))
    assert (state.stats.duplicates, state.stats.late) == (3, 5)


def test_a_forgotten_series_comes_back_with_nothing_of_its_past() -> None:
    """Forgotten, a series' slot is dropped at the next compaction; back, it has a new slot: its
    old rows neither count in its windows nor make a resent old row a duplicate."""
    state = State()
    old = [gpu_row("n1", "GPU-a", ts(s), util=1.0) for s in range(0, 200, 10)]
    state.ingest("gpu", table("gpu", old))
    keep_going = [gpu_row("n1", "GPU-b", ts(s), util=0.5) for s in range(0, 4200, 60)]
    for row in keep_going:  # one row a round: GPU-a is forgotten, compactions run meanwhile
        state.ingest("gpu", table("gpu", [row]))
    assert ("n1", "GPU-a") not in state.tables["gpu"].totals
    back = [gpu_row("n1", "GPU-a", ts(s), util=0.0) for s in (3800, 3810, 3820)]
    state.ingest("gpu", table("gpu", back))
    check_against_reference(state, {"gpu": back + keep_going})
    assert state.tables["gpu"].totals[("n1", "GPU-a")]["busy_us"] == 0  # its busy past is gone
    # its old rows are older than its new newest, within its new horizon, and were never
    # retained under its new slot: late; a row of its new life is a duplicate
    stats = state.tables["gpu"].stats
    before = (stats.duplicates, stats.late)
    state.ingest("gpu", table("gpu", [dict(old[-1]), dict(back[1])]))
    assert (stats.duplicates, stats.late) == (before[0] + 1, before[1] + 1)


def test_replay_chunks_out_of_order_drop_the_same_rows_as_one_merge() -> None:
    """Replay's chunks may come out of order: a chunk older than what a series holds repeats
    some retained rows (duplicates) and falls between others (late); a series first seen in the
    later chunk keeps all its rows. Windows equal the reference over the rows kept."""
    a_new = [gpu_row("n1", "GPU-a", ts(s), util=(s % 30) / 30) for s in range(300, 600, 10)]
    a_old = [gpu_row("n1", "GPU-a", ts(s), util=1.0) for s in range(200, 400, 5)]
    b_old = [gpu_row("n1", "GPU-b", ts(s), util=0.5) for s in range(200, 400, 5)]
    state = State()
    state.ingest("gpu", table("gpu", a_new))
    state.ingest("gpu", table("gpu", a_old + b_old))
    stats = state.tables["gpu"].stats
    repeats = sum(1 for r in a_old if r["time"] >= ts(300) and (r["time"] - T0) // NS % 10 == 0)
    assert (stats.duplicates, stats.late) == (repeats, len(a_old) - repeats)
    check_against_reference(state, {"gpu": a_new + b_old})
    # the kept rows in a third chunk, shuffled, are all duplicates now
    again = list(reversed(a_new[::3] + b_old[::4]))
    state.ingest("gpu", table("gpu", again))
    assert stats.duplicates == repeats + len(again)
    check_against_reference(state, {"gpu": a_new + b_old})


def test_the_retained_rows_take_no_more_than_their_times_and_sums(layout: str) -> None:
    """An hour of one-row rounds of 4 GPUs and 20 jobs: a GPU row holds its time and two running
    sums (24 bytes), a job row its time (8 bytes); beyond that only the per-slot tails (with room
    for a few new series) and the expired rows the next compaction drops."""
    if layout != "wide":
        pytest.skip("the layout of the daemon's rounds")
    state = State()
    for k in range(RETAIN_S + 200):
        t = ts(k)
        state.ingest("gpu", table("gpu", [gpu_row("n1", f"GPU-{i}", t) for i in range(4)]))
        state.ingest("job", table("job", [job_row("n1", str(j), t) for j in range(20)]))
    for name, per_row, series in (("gpu", 24, 4), ("job", 8, 20)):
        held = sum(
            a.nbytes for a in vars(state.tables[name]).values() if isinstance(a, np.ndarray)
        ) + sum(
            a.nbytes
            for d in vars(state.tables[name]).values()
            if isinstance(d, dict)
            for a in d.values()
            if isinstance(a, np.ndarray)
        )
        slots = series + series // 8 + 8
        slack = slots * (per_row * state_module.TAIL_ROWS + 64) + series * per_row * 64
        assert held <= series * RETAIN_S * per_row + slack, name
