"""Live aggregation state shared by the daemon and replay: ingest sample batches, keep what the
trailing windows need, accumulate SPEC §3 counters, and publish a snapshot for the exporter.

All row work is done by the ``kernels`` functions on whole columns; Python loops run over
tables and series, never over rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

import kernels
from telemetry.billing.engine import LIVE_WINDOW_SECONDS, Biller, LiveTotals
from telemetry.billing.inventory import Inventory
from telemetry.collectors.base import CollectorStatus
from telemetry.rows import SortedRows, contributions, merge_rows, series_codes
from telemetry.schema import SCHEMAS, screen, validate

NS = 1_000_000_000
# Trailing windows of SPEC §6, label → seconds.
WINDOWS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600}
DEFAULT_MAX_GAP_SECONDS = 60


# Which contributions make each table's trailing utilisation ratio (busy / capacity).
RATIO_PARTS: dict[str, tuple[str, str]] = {
    "gpu": ("busy_us", "capacity_us"),
    "cpu": ("busy_us", "capacity_us"),
}


@dataclass
class IngestStats:
    """Rows offered to a table, and how many were dropped as duplicates or late (out of order)."""

    rows: int = 0
    duplicates: int = 0
    late: int = 0
    out_of_range: int = 0  # a value outside its column's valid range (schema.VALID_RANGES)


@dataclass
class TableSnapshot:
    """Current series of one table: their newest row, accumulated totals and window ratios.

    ``totals`` holds int64 arrays (µs, mJ) aligned with ``latest``'s rows; ``windows`` maps a
    window label to float64 ratios (NaN when the window holds no interval).
    """

    latest: pa.Table
    totals: dict[str, np.ndarray] = field(default_factory=dict)
    windows: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Snapshot:
    """What the exporter renders: table snapshots plus the collectors' last status."""

    tables: dict[str, TableSnapshot] = field(default_factory=dict)
    collectors: dict[str, CollectorStatus] = field(default_factory=dict)
    ingest: dict[str, IngestStats] = field(default_factory=dict)
    # Store counters (daemon only): rows written and failed writes.
    store: dict[str, int] = field(default_factory=dict)
    # Pool and tenant totals since start, when an inventory was given (one all-time window).
    pools: LiveTotals | None = None


class TableState:
    """Incremental state of one sample table.

    Keeps, per series, the rows the longest window still needs (window + max gap), and int64
    totals of every contribution since the series was first seen; a series silent for 1h + max
    gap or longer (behind the table's newest sample) is forgotten with its totals. Rows at or
    before a series' newest retained time are duplicates (same time) or late (older) and are
    dropped and counted.
    """

    def __init__(self, name: str, max_gap_seconds: float = DEFAULT_MAX_GAP_SECONDS) -> None:
        self.name = name
        self.max_gap_ns = int(max_gap_seconds * NS)
        self.retain_ns = max(WINDOWS.values()) * NS + self.max_gap_ns
        self.schema = SCHEMAS[name]
        self.retained = self.schema.empty_table()
        self.totals: dict[tuple[str, ...], dict[str, int]] = {}
        self.stats = IngestStats()

    def ingest(self, batch: pa.Table, checked: bool = False) -> None:
        """Add rows (any order, any series); raises ``SchemaError`` for a non-conforming table.
        ``checked``: ``batch`` is already validated (``State.ingest`` did it)."""
        new = (batch if checked else validate(batch, self.name)).select(self.schema.names)
        if new.num_rows == 0:
            return
        self.stats.rows += new.num_rows
        merged = merge_rows(
            self.retained, new, self.name, self.max_gap_ns, canonical=False, drop_late=True
        )
        self.stats.duplicates += merged.duplicates
        self.stats.late += merged.late
        table, codes, labels, times = merged.table, merged.codes, merged.labels, merged.times
        is_new, parts = merged.is_new, merged.parts

        starts, _ = kernels.segment_bounds(codes)
        for part, values in parts.items():
            sums = kernels.segment_sum(np.where(is_new, values, 0), starts)
            for code, total in zip(codes[starts].tolist(), sums.tolist(), strict=True):
                series = self.totals.setdefault(labels[code], {})
                series[part] = series.get(part, 0) + total

        last = kernels.last_rows(codes)
        code_newest = np.empty(len(labels), dtype=np.int64)
        code_newest[codes[last]] = times[last]
        horizon = int(times[last].max()) - self.retain_ns
        alive = code_newest > horizon
        for code in codes[last][~alive[codes[last]]].tolist():
            self.totals.pop(labels[code], None)
        keep_rows = (times > code_newest[codes] - self.retain_ns) & alive[codes]
        self.retained = table.filter(pa.array(keep_rows))

    def snapshot(self) -> TableSnapshot:
        """Newest row, totals and trailing ratios of every current series.

        A series is current while its newest sample is within ``max_gap`` of its node's newest.
        """
        table = self.retained
        if table.num_rows == 0:
            return TableSnapshot(latest=table)
        codes, labels = series_codes(table, self.name)
        times = table.column("time").cast(pa.int64()).to_numpy()
        # retained is sorted by (code at ingest, time); codes here may number series differently.
        order = kernels.series_order(codes, times)
        codes, times = codes[order], times[order]
        table = table.take(pa.array(order))
        last = kernels.last_rows(codes)
        latest = table.take(pa.array(last))

        nodes = latest.column("node")
        node_codes, _ = series_codes(pa.table({"node": nodes}), "cpu")
        node_newest = np.full(int(node_codes.max()) + 1, np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(node_newest, node_codes, times[last])
        current = times[last] >= node_newest[node_codes] - self.max_gap_ns

        windows: dict[str, np.ndarray] = {}
        if self.name in RATIO_PARTS:
            iv = kernels.intervals(codes, times, self.max_gap_ns)
            parts = contributions(SortedRows(table), self.name, iv)
            num, den = RATIO_PARTS[self.name]
            for label, seconds in WINDOWS.items():
                ratio = kernels.trailing_ratio(
                    codes, times, parts[num], parts[den], seconds * NS, last
                )
                windows[label] = np.clip(ratio, 0.0, 1.0)[current]
        keys = [labels[c] for c in codes[last][current].tolist()]
        names = sorted({p for k in keys for p in self.totals.get(k, {})})
        totals = {
            p: np.array([self.totals.get(k, {}).get(p, 0) for k in keys], dtype=np.int64)
            for p in names
        }
        return TableSnapshot(
            latest=latest.filter(pa.array(current)), totals=totals, windows=windows
        )


# Job batches between two retirements of silent jobs from the live bill.
RETIRE_EVERY = 60


class State:
    """The three table states plus the collectors' last status; thread-safe snapshot swap is the
    caller's job (the daemon publishes each new :class:`Snapshot` by reference).

    With an inventory, every batch also feeds a bill engine whose pool and tenant totals are
    exported as counters (SPEC §6, pools).
    """

    def __init__(
        self, max_gap_seconds: float = DEFAULT_MAX_GAP_SECONDS, inventory: Inventory | None = None
    ) -> None:
        self.tables = {name: TableState(name, max_gap_seconds) for name in SCHEMAS}
        self.biller = None if inventory is None else Biller(inventory, LIVE_WINDOW_SECONDS)
        self._job_batches = 0

    def ingest(self, name: str, batch: pa.Table) -> None:
        """Add rows of table ``name``; rows outside the valid ranges are dropped and counted
        (they would turn counters backwards); raises ``SchemaError`` for a non-conforming table."""
        checked = validate(batch, name)
        kept = screen(checked, name)[0]
        self.tables[name].stats.out_of_range += checked.num_rows - kept.num_rows
        self.tables[name].ingest(kept, checked=True)
        if self.biller is not None:
            self.biller.add({name: kept})
            if name == "job" and kept.num_rows:
                self._job_batches += 1
                if self._job_batches % RETIRE_EVERY == 0:
                    self.biller.retire()

    def snapshot(self, collectors: dict[str, CollectorStatus] | None = None) -> Snapshot:
        tables = {name: st.snapshot() for name, st in self.tables.items() if st.retained.num_rows}
        ingest = {name: IngestStats(**vars(st.stats)) for name, st in self.tables.items()}
        pools = self.biller.live_totals() if self.biller is not None else None
        return Snapshot(
            tables=tables, collectors=dict(collectors or {}), ingest=ingest, pools=pools
        )

    def stats(self) -> dict[str, IngestStats]:
        return {name: st.stats for name, st in self.tables.items()}
