"""``tally report``: what the HTML report shows, computed from a stored dataset in one scan.

The bill engine gives the per-window pool, tenant and job rows; alongside it, grids of every GPU
(and every node's CPUs) × window hold SPEC §3 integer sums — capacity, busy, held by a job and
gap time — so the heatmaps agree with the bill to the microsecond. Money and ratios are derived
from those sums only here, at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import kernels
from kernels.backend import release
from kernels.grouped_sums import window_index
from telemetry.billing.accounting import Record
from telemetry.billing.bill import finish_bill, with_timezone
from telemetry.billing.engine import BILL_COLUMNS, NS, Bill, Biller, PartialSums
from telemetry.billing.inventory import Inventory
from telemetry.billing.period import selected_range
from telemetry.billing.plan import DEFAULT_STABLE_CV, HOUR_SECONDS, Plan, plan_of
from telemetry.billing.windows import Windows
from telemetry.errors import TallyError
from telemetry.merge import last_of_series, merge_rows
from telemetry.schema import SCHEMAS, validate
from telemetry.store.dataset import (
    DEFAULT_BUDGET_ROWS,
    ReadStats,
    ValidatedChunk,
    discover,
    plan,
    scan,
)
from telemetry.store.layout import QUARANTINE

# Report windows tried by ``--window auto``: the shortest that keeps the charts readable.
AUTO_WINDOWS_S = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
AUTO_MAX_POINTS = 240
# What the report reads of each table: the bill's columns, the GPUs' index and model, and their
# health readings.
HEALTH_COLUMNS = (
    "temperature_celsius",
    "ecc_corrected_errors",
    "ecc_uncorrected_errors",
    "xid_errors",
    "clock_event_reasons",
)
GRID_COLUMNS: dict[str, tuple[str, ...]] = {
    **BILL_COLUMNS,
    "gpu": tuple(dict.fromkeys((*BILL_COLUMNS["gpu"], "gpu_index", "gpu_model", *HEALTH_COLUMNS))),
}
# NVML clock event reasons that mean the GPU was held back: software power cap, hardware
# slowdown, software and hardware thermal slowdown, power brake (idle and app clocks are not).
THROTTLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80
GRID_FIELDS = ("capacity_us", "busy_us", "held_us", "gap_us", "seen_us")


def auto_window(first_ns: int, last_ns: int) -> int:
    """The shortest of ``AUTO_WINDOWS_S`` giving at most ``AUTO_MAX_POINTS`` windows."""
    span_s = max(0, last_ns - first_ns) / NS
    for window in AUTO_WINDOWS_S:
        if span_s / window <= AUTO_MAX_POINTS:
            return window
    return AUTO_WINDOWS_S[-1]


class SeriesGrid:
    """Integer sums per (series, window) of one sample table (``gpu`` or ``cpu``).

    A series is a GPU (node, uuid) or a node's CPUs. ``held_us`` is capacity time during which
    a GPU's sample named a job; ``gap_us`` is time lost to gaps longer than ``max_gap``;
    ``seen_us`` is time covered by intervals that count (wall time, not unit time).
    """

    def __init__(
        self,
        table: str,
        window_s: int,
        max_gap_s: float,
        start_ns: int | None = None,
        end_ns: int | None = None,
    ) -> None:
        self.table = table
        self.window_ns = window_s * NS
        self.max_gap_ns = int(max_gap_s * NS)
        self.start_ns, self.end_ns = start_ns, end_ns
        self.carry = SCHEMAS[table].empty_table().select(list(GRID_COLUMNS[table]))
        self.parts = PartialSums(width=2)
        self.ids: dict[tuple[str, ...], int] = {}
        self.labels: list[tuple[str, ...]] = []
        self.details: list[dict[str, Any]] = []  # per series: index, model of a GPU

    def _rows(self, chunk: dict[str, pa.Table]) -> pa.Table | None:
        """This grid's table of ``chunk``, validated, with the grid's columns; None if empty."""
        new = chunk.get(self.table)
        if new is None or not new.num_rows:
            return None
        wanted = GRID_COLUMNS[self.table]
        if isinstance(chunk, ValidatedChunk):
            return new.select(list(wanted))
        return validate(new, self.table, wanted)

    def add(self, chunk: dict[str, pa.Table]) -> None:
        new = self._rows(chunk)
        if new is None:
            return
        merged = merge_rows(
            self.carry, new, self.table, self.max_gap_ns, canonical=True, drop_late=False
        )
        rows, times = merged.rows, merged.times
        self.carry = rows.take(kernels.last_rows(merged.codes))
        # Rows are sorted by series: each code's first row is found by a binary search.
        firsts = np.searchsorted(merged.codes, np.arange(len(merged.labels)))
        first_rows = rows.take(firsts) if self.table == "gpu" else None
        local = np.array([self._id(label, first_rows, i)
                          for i, label in enumerate(merged.labels)],
                         dtype=np.int64)  # fmt: skip
        series = local[merged.codes] if merged.codes.size else merged.codes
        counted = merged.is_new.copy()
        if self.start_ns is not None:
            counted &= times >= self.start_ns
        if self.end_ns is not None:
            counted &= times < self.end_ns
        parts = merged.parts
        if self.table == "gpu":
            held = rows.gather(
                pc.is_valid(rows.arrow.column("job_id")).to_numpy(zero_copy_only=False)
            )
        else:
            held = np.zeros(times.size, dtype=bool)
        iv = merged.intervals
        seen = np.where(iv.valid, iv.dt_ns // 1000, 0)
        self.parts.add(
            [series, window_index(times, self.window_ns)],
            [
                parts["capacity_us"],
                parts["busy_us"],
                np.where(held, parts["capacity_us"], 0),
                parts["gap_us"],
                seen,
            ],
            counted,
        )

    def prime(self, chunk: dict[str, pa.Table]) -> None:
        """Take each series' last row from rows that only open the intervals of later ones (a
        time slice's lookback, SPEC §9): nothing counts, no series is added."""
        new = self._rows(chunk)
        if new is not None:
            self.carry = last_of_series(self.carry, new, self.table)

    def _id(self, label: tuple[str, ...], table: pa.Table | None, row: int) -> int:
        """The grid row of series ``label``; ``row`` is one of its rows in ``table`` (a GPU's
        index and model are read from it)."""
        found = self.ids.get(label)
        if found is None:
            found = self.ids[label] = len(self.labels)
            self.labels.append(label)
            detail: dict[str, Any] = {"node": label[0]}
            if table is not None:
                detail["index"] = int(table.column("gpu_index")[row].as_py())
                detail["model"] = str(table.column("gpu_model")[row].as_py())
            self.details.append(detail)
        return found

    def matrices(self, first_window: int, windows: int) -> dict[str, np.ndarray]:
        """``GRID_FIELDS`` as int64 [series × windows] from window index ``first_window``."""
        keys, sums = self.parts.compact()
        out = {name: np.zeros((len(self.labels), windows), np.int64) for name in GRID_FIELDS}
        if keys[0].size:
            column = keys[1] - first_window
            inside = (column >= 0) & (column < windows)
            for name, values in zip(GRID_FIELDS, sums, strict=True):
                out[name][keys[0][inside], column[inside]] = values[inside]
        return out


@dataclass
class GpuHealth:
    """One GPU's health over the range: counter increases and how often it was held back."""

    node: str
    uuid: str
    samples: int = 0
    throttled: int = 0  # samples with a THROTTLE_MASK reason
    temperature_max: float | None = None
    power_sum: float = 0.0
    power_samples: int = 0
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # column -> (min, max)

    def increase(self, column: str) -> int:
        """How much a cumulative counter grew (max − min of its readings; 0 without any)."""
        low, high = self.counters.get(column, (0, 0))
        return high - low


class HealthGrid:
    """GPU health for the report: per (node, window) mean board power and peak temperature, per
    GPU ECC and XID increases and the share of samples it was throttled (NVML clock events)."""

    def __init__(self, window_s: int, start_ns: int | None, end_ns: int | None) -> None:
        self.window_ns = window_s * NS
        self.start_ns, self.end_ns = start_ns, end_ns
        # (node, window) -> [power sum, power samples, max temperature]
        self.nodes: dict[tuple[str, int], list[float]] = {}
        self.gpus: dict[tuple[str, str], GpuHealth] = {}

    def add(self, chunk: dict[str, pa.Table]) -> None:
        table = chunk.get("gpu")
        if table is None or not table.num_rows:
            return
        times = table.column("time").cast(pa.int64())
        keep = pc.is_valid(times)
        if self.start_ns is not None:
            keep = pc.and_(keep, pc.greater_equal(times, pa.scalar(self.start_ns, pa.int64())))
        if self.end_ns is not None:
            keep = pc.and_(keep, pc.less(times, pa.scalar(self.end_ns, pa.int64())))
        table = table.filter(keep)
        if not table.num_rows:
            return
        node = pc.cast(table.column("node"), pa.string())
        uuid = pc.cast(table.column("gpu_uuid"), pa.string())
        ns = table.column("time").cast(pa.int64()).to_numpy()
        window = pa.array(np.floor_divide(ns, self.window_ns))
        reasons = table.column("clock_event_reasons")
        throttled = pc.not_equal(pc.bit_wise_and(pc.fill_null(reasons, 0), THROTTLE_MASK), 0)
        view = pa.table(
            {
                "node": node,
                "uuid": uuid,
                "window": window,
                "power": table.column("power_watts"),
                "temperature": table.column("temperature_celsius"),
                "throttled": throttled.cast(pa.int64()),
                **{c: table.column(c) for c in HEALTH_COLUMNS[1:4]},
            }
        )
        per_node = view.group_by(["node", "window"]).aggregate(
            [("power", "sum"), ("power", "count"), ("temperature", "max")]
        )
        for n, w, total, count, hottest in zip(*(c.to_pylist() for c in per_node.columns),
                                               strict=True):  # fmt: skip
            into = self.nodes.setdefault((n, w), [0.0, 0, float("nan")])
            into[0] += total or 0.0
            into[1] += count
            if hottest is not None and not hottest <= into[2]:
                into[2] = hottest
        counters = HEALTH_COLUMNS[1:4]
        per_gpu = view.group_by(["node", "uuid"]).aggregate(
            [("throttled", "sum"), ("throttled", "count"), ("power", "sum"), ("power", "count"),
             ("temperature", "max"), *[(c, agg) for c in counters for agg in ("min", "max")]]
        )  # fmt: skip
        for row in per_gpu.to_pylist():
            gpu = self.gpus.setdefault(
                (row["node"], row["uuid"]), GpuHealth(row["node"], row["uuid"])
            )
            gpu.samples += row["throttled_count"]
            gpu.throttled += row["throttled_sum"] or 0
            gpu.power_sum += row["power_sum"] or 0.0
            gpu.power_samples += row["power_count"]
            hottest = row["temperature_max"]
            if hottest is not None and (
                gpu.temperature_max is None or hottest > gpu.temperature_max
            ):
                gpu.temperature_max = hottest
            for c in counters:
                low, high = row[f"{c}_min"], row[f"{c}_max"]
                if low is None:
                    continue
                old = gpu.counters.get(c)
                gpu.counters[c] = (
                    (low, high) if old is None else (min(old[0], low), max(old[1], high))
                )


@dataclass
class Grid:
    """One table's grid: series labels, window starts (ns) and the int64 sums."""

    labels: list[tuple[str, ...]]
    details: list[dict[str, Any]]
    window_starts_ns: np.ndarray
    sums: dict[str, np.ndarray]


@dataclass
class QuarantinedFile:
    path: str
    size_bytes: int


@dataclass
class ReportData:
    """Everything the report shows."""

    dataset: str
    window_s: int
    bill: Bill
    gpu: Grid
    cpu: Grid
    quarantined: list[QuarantinedFile] = field(default_factory=list)
    first_ns: int | None = None
    last_ns: int | None = None
    health: HealthGrid | None = None
    # the same sums as one window over the whole range: totals with money rounded once, equal
    # to a one-window bill of the range (the per-window ``bill`` draws the charts)
    summary: Bill | None = None
    # SPEC §10 from an hourly bill of the same scan
    plan: Plan | None = None

    @property
    def totals(self) -> Bill:
        return self.summary if self.summary is not None else self.bill


def collect_report(
    root: Path,
    inventory: Inventory,
    window: int | None,
    start: str | None = None,
    end: str | None = None,
    budget_rows: int = DEFAULT_BUDGET_ROWS,
    progress: Callable[[int, int, int], None] | None = None,
    warn: Callable[[str], None] = lambda _: None,
    xp: ModuleType = np,
    accounting: list[Record] | None = None,
    timezone: str | None = None,
    stable_cv: float = DEFAULT_STABLE_CV,
    workers: int | None = 1,
    cluster: Any = None,
) -> ReportData:
    """Scan the dataset at ``root`` once; ``window`` None picks one (``auto_window``). An
    hourly bill engine beside the report's feeds the plan (SPEC §10, ``stable_cv``).

    ``xp`` is the array backend of the report's bill (the grids stay on NumPy: they are small
    matrices drawn on the host). ``workers``/``cluster`` as for ``compute_bill``: the bill's
    sums and the grids' integer sums are those of one process (SPEC §9). Raises ``TallyError``
    for unusable input, as ``tally bill`` does.
    """
    looked = ReadStats()
    pieces = plan(root, discover(root), looked)
    if not pieces:
        raise TallyError(f"dataset {root} holds no readable rows")
    first = min(p.min_ns for p in pieces)
    last = max(p.max_ns for p in pieces)
    inventory = with_timezone(inventory, timezone)
    lo, hi = selected_range(start, end, inventory.timezone)
    if window is None:
        window = auto_window(max(first, lo or first), min(last, (hi or last + 1) - 1))
    max_gap = inventory.max_gap_seconds

    def fresh() -> list[Any]:
        # hours labelled in the bill's zone, as ``tally plan`` labels them
        hourly = Biller(inventory, Windows(HOUR_SECONDS, inventory.timezone), lo, hi, xp=xp)
        return [
            Biller(inventory, window, lo, hi, xp=xp),
            SeriesGrid("gpu", window, max_gap, lo, hi),
            SeriesGrid("cpu", window, max_gap, lo, hi),
            HealthGrid(window, lo, hi),
            hourly,
        ]

    done = None
    if workers != 1 or cluster is not None:
        from telemetry.billing.partitioned import run_partitions

        done = run_partitions(
            root, inventory, window, lo, hi, budget_rows, progress, warn, xp.__name__,
            workers, cluster, grids=(window, max_gap),
        )  # fmt: skip
    if done is not None:
        biller, stats, grids_of = done
        # the plan's hourly sums: the same partitions once more, with hour windows
        hours = run_partitions(
            root, inventory, HOUR_SECONDS, lo, hi, budget_rows, None, lambda _: None,
            xp.__name__, workers, cluster,
        )  # fmt: skip
        assert hours is not None  # the same dataset and executor choose partitions again
        consumers: Sequence[Any] = [biller, *(grids_of or []), hours[0]]
    else:
        try:
            consumers, stats = scan(root, fresh, budget_rows, progress, warn, GRID_COLUMNS)
        finally:
            release(xp)
    stats.files_quarantined += looked.files_quarantined
    biller, gpu, cpu, health, hourly = consumers
    assert isinstance(biller, Biller) and isinstance(hourly, Biller)
    assert isinstance(gpu, SeriesGrid)
    assert isinstance(cpu, SeriesGrid) and isinstance(health, HealthGrid)
    bill = finish_bill(biller, stats, warn, accounting)
    planned = plan_of(
        hourly.bill(dict(bill.input), accounting=accounting),
        hourly.bill(dict(bill.input), whole=True, accounting=accounting),
        inventory,
        stable_cv,
    )
    window_ns = window * NS
    w_first = (lo if lo is not None else first) // window_ns
    w_last = ((hi - 1) if hi is not None else last) // window_ns
    windows = max(0, int(w_last - w_first + 1))
    starts = (np.arange(windows, dtype=np.int64) + w_first) * window_ns
    grids = [
        Grid(g.labels, g.details, starts, g.matrices(int(w_first), windows)) for g in (gpu, cpu)
    ]
    for grid in grids:
        _sort_by_node(grid)
    return ReportData(
        dataset=str(root),
        window_s=window,
        bill=bill,
        gpu=grids[0],
        cpu=grids[1],
        quarantined=_quarantined(root),
        first_ns=first if lo is None else max(first, lo),
        last_ns=last if hi is None else min(last, hi - 1),
        health=health,
        summary=biller.bill(dict(bill.input), whole=True, accounting=accounting),
        plan=planned,
    )


def _sort_by_node(grid: Grid) -> None:
    order = sorted(
        range(len(grid.labels)),
        key=lambda i: (grid.labels[i][0], grid.details[i].get("index", 0), grid.labels[i]),
    )
    grid.labels = [grid.labels[i] for i in order]
    grid.details = [grid.details[i] for i in order]
    index = np.asarray(order, dtype=np.int64)
    grid.sums = {name: m[index] if m.shape[0] else m for name, m in grid.sums.items()}


def _quarantined(root: Path) -> list[QuarantinedFile]:
    base = root / QUARANTINE
    found: list[QuarantinedFile] = []
    if base.is_dir():
        for directory, _, names in os.walk(base):
            for name in sorted(names):
                path = Path(directory) / name
                try:
                    size = path.stat().st_size
                except OSError:
                    size = 0
                found.append(QuarantinedFile(str(path.relative_to(root)), size))
    return sorted(found, key=lambda f: f.path)


def coarsen(
    sums: dict[str, np.ndarray], starts: np.ndarray, at_most: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Merge adjacent windows (exact integer sums) until there are at most ``at_most``."""
    windows = starts.size
    if windows <= at_most:
        return sums, starts
    k = -(-windows // at_most)
    pad = (-windows) % k
    out = {}
    for name, m in sums.items():
        padded = np.pad(m, ((0, 0), (0, pad)))
        out[name] = padded.reshape(m.shape[0], -1, k).sum(axis=2)
    return out, starts[::k]


def totals_by(
    rows: list[dict[str, Any]], keys: tuple[str, ...], fields: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Sum ``fields`` of bill rows over windows, per distinct ``keys``; None counts as 0."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        into = merged.setdefault(key, {**{k: row[k] for k in keys}, **dict.fromkeys(fields, 0.0)})
        for f in fields:
            into[f] += row[f] or 0.0
    return list(merged.values())
