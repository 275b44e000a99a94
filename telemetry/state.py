"""Live aggregation state shared by the daemon and replay: ingest sample batches, keep what the
trailing windows need, accumulate SPEC §3 counters, and publish a snapshot for the exporter.

All row work is done by the ``kernels`` functions on whole columns; Python loops run over
tables and series, never over rows. Rows come as Arrow tables (replay) or as Frames (the node
daemon, which so never loads Arrow); the snapshot holds the kind that came in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

import kernels
from telemetry.collectors.base import CollectorStatus
from telemetry.frame import Frame
from telemetry.merge import Table, as_rows, merge_rows
from telemetry.tables import TABLES

if TYPE_CHECKING:  # the bill engine is imported only when an inventory asks for pools
    import pyarrow as pa

    from telemetry.billing.engine import LiveTotals
    from telemetry.billing.inventory import Inventory

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

    latest: Table
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

    A round costs in proportion to its new rows, not to the hour of rows retained: only each
    series' newest row is kept as Arrow (it opens the next interval and is what the snapshot
    shows); older rows are kept as their series id, time and, for tables with trailing ratios,
    the two contributions the ratio sums (fixed once a row is in: a later row can only follow
    it). The duplicate check and the windows read those arrays.
    """

    def __init__(self, name: str, max_gap_seconds: float = DEFAULT_MAX_GAP_SECONDS) -> None:
        self.name = name
        self.max_gap_ns = int(max_gap_seconds * NS)
        self.retain_ns = max(WINDOWS.values()) * NS + self.max_gap_ns
        self.newest: Table = Frame.empty(name)  # each live series' newest row
        self.totals: dict[tuple[str, ...], dict[str, int]] = {}
        self.stats = IngestStats()
        # Every retained row as (series id, time) sorted by both, with its ratio contributions.
        # Ids are never reused; a forgotten series' rows stay until the next compaction.
        self._ids: dict[tuple[str, ...], int] = {}
        self._next_id = 0
        self._row_ids = np.zeros(0, dtype=np.int64)
        self._row_times = np.zeros(0, dtype=np.int64)
        self._row_parts: dict[str, np.ndarray] = {}
        self._compacted_rows = 0
        # Rows not yet inserted into the sorted arrays: a table without windows inserts them
        # in batches (its arrays are only read for the rare repeat of an older row).
        self._pending: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
        self._pending_rows = 0
        self._newest_ns: dict[int, int] = {}  # series id → its newest time

    @property
    def retained(self) -> Table:
        """The newest row of every series still kept (older rows live on as times and sums)."""
        return self.newest

    def ingest(self, batch: Table, checked: bool = False) -> None:
        """Add rows (any order, any series); raises ``SchemaError`` for a non-conforming Arrow
        table. ``checked``: ``batch`` is already validated (``State.ingest`` did it; a Frame
        conforms by construction)."""
        new = batch if isinstance(batch, Frame) else _conformed(batch, self.name, checked)
        if new.num_rows == 0:
            return
        self.stats.rows += new.num_rows
        new = self._drop_repeats_of_older_rows(new)
        if new.num_rows == 0:
            return  # nothing kept: the newest rows, and so every horizon, are unchanged
        merged = merge_rows(
            self.newest, new, self.name, self.max_gap_ns, canonical=False, drop_late=True
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
            gone = self._ids.pop(labels[code], None)
            if gone is not None:
                self._newest_ns.pop(gone, None)
        self.newest = as_rows(table, self.name).take(last[alive[codes[last]]])
        fresh = np.nonzero(is_new & alive[codes])[0]
        self._add_rows(
            [labels[c] for c in codes[fresh].tolist()],
            times[fresh],
            {p: parts[p][fresh] for p in RATIO_PARTS.get(self.name, ())},
        )

    def _drop_repeats_of_older_rows(self, new: Table) -> Table:
        """``new`` without the rows that repeat (series, time) of a retained row older than the
        series' newest, counted as duplicates: the earlier row wins, as in a full merge."""
        if not self._ids:
            return new
        reader = as_rows(new, self.name)
        times = reader.times()
        codes, labels = reader.series_codes()
        ids = [self._ids.get(labels[c], -1) for c in codes.tolist()]
        unseen = np.iinfo(np.int64).min  # a new series repeats nothing
        newest = np.array([self._newest_ns.get(i, unseen) for i in ids], dtype=np.int64)
        older = np.nonzero(times < newest)[0]
        if older.size == 0:
            return new
        self._flush_pending()
        lo = np.searchsorted(self._row_ids, ids, side="left")
        hi = np.searchsorted(self._row_ids, ids, side="right")
        repeat = np.zeros(new.num_rows, dtype=bool)
        for i in older.tolist():
            run = self._row_times[lo[i] : hi[i]]
            at = int(np.searchsorted(run, times[i]))
            # A row past its series' horizon is gone (whether compacted away yet or not).
            repeat[i] = (
                at < run.size and run[at] == times[i] and times[i] > newest[i] - self.retain_ns
            )
        if not repeat.any():
            return new
        self.stats.duplicates += int(repeat.sum())
        return reader.take(np.nonzero(~repeat)[0])

    def _add_rows(
        self, labels: list[tuple[str, ...]], times: np.ndarray, parts: dict[str, np.ndarray]
    ) -> None:
        """Add kept new rows (each newer than its series' retained rows): pending, then inserted
        in (id, time) order."""
        ids = np.empty(len(labels), dtype=np.int64)
        for i, key in enumerate(labels):
            found = self._ids.get(key)
            if found is None:
                found = self._ids[key] = self._next_id
                self._next_id += 1
            ids[i] = found
        for series, t in zip(ids.tolist(), times.tolist(), strict=True):
            self._newest_ns[series] = max(t, self._newest_ns.get(series, t))
        self._pending.append((ids, times, parts))
        self._pending_rows += ids.size
        # The windows read the arrays every round; otherwise insert ~1/16 of them at a time.
        if self.name in RATIO_PARTS or self._pending_rows > max(1024, self._row_ids.size // 16):
            self._flush_pending()

    def _flush_pending(self) -> None:
        """Insert the pending rows into the sorted arrays; now and then compact them."""
        if not self._pending:
            return
        ids = np.concatenate([chunk[0] for chunk in self._pending])
        times = np.concatenate([chunk[1] for chunk in self._pending])
        order = np.lexsort((times, ids))
        ids, times = ids[order], times[order]
        at = np.searchsorted(self._row_ids, ids, side="right")
        self._row_ids = np.insert(self._row_ids, at, ids)
        self._row_times = np.insert(self._row_times, at, times)
        for part in self._pending[0][2]:
            values = np.concatenate([chunk[2][part] for chunk in self._pending])
            held = self._row_parts.get(part)
            if held is None:
                held = np.zeros(0, dtype=values.dtype)
            self._row_parts[part] = np.insert(held, at, values[order])
        self._pending, self._pending_rows = [], 0
        if self._row_ids.size > self._compacted_rows + max(1024, self._compacted_rows // 16):
            self._compact()

    def _compact(self) -> None:
        """Drop rows of forgotten series and rows past their series' horizon."""
        ids, times = self._row_ids, self._row_times
        keep = np.isin(ids, np.fromiter(self._ids.values(), dtype=np.int64, count=len(self._ids)))
        if ids.size:
            starts, _ = kernels.segment_bounds(ids)
            bounds = np.append(starts, ids.size)
            newest = np.repeat(times[bounds[1:] - 1], np.diff(bounds))  # per row, its series'
            keep &= times > newest - self.retain_ns
        self._row_ids, self._row_times = ids[keep], times[keep]
        self._row_parts = {p: v[keep] for p, v in self._row_parts.items()}
        self._compacted_rows = int(self._row_ids.size)

    def snapshot(self) -> TableSnapshot:
        """Newest row, totals and trailing ratios of every current series.

        A series is current while its newest sample is within ``max_gap`` of its node's newest.
        """
        table = self.newest
        if table.num_rows == 0:
            return TableSnapshot(latest=table)
        reader = as_rows(table, self.name)
        codes, labels = reader.series_codes()
        times = reader.times()
        order = kernels.series_order(codes, times)  # one row per series: by series key
        codes, times = codes[order], times[order]

        node_ids: dict[str, int] = {}  # every series key starts with its node
        node_codes = np.array(
            [node_ids.setdefault(labels[c][0], len(node_ids)) for c in codes.tolist()],
            dtype=np.int64,
        )
        node_newest = np.full(len(node_ids), np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(node_newest, node_codes, times)
        current = times >= node_newest[node_codes] - self.max_gap_ns

        windows: dict[str, np.ndarray] = {}
        if self.name in RATIO_PARTS:
            ids = np.array([self._ids[labels[c]] for c in codes.tolist()], dtype=np.int64)
            at = np.searchsorted(self._row_ids, ids, side="right") - 1
            num, den = RATIO_PARTS[self.name]
            for label, seconds in WINDOWS.items():
                ratio = kernels.trailing_ratio(
                    self._row_ids,
                    self._row_times,
                    self._row_parts[num],
                    self._row_parts[den],
                    seconds * NS,
                    at,
                )
                windows[label] = np.clip(ratio, 0.0, 1.0)[current]
        keys = [labels[c] for c in codes[current].tolist()]
        names = sorted({p for k in keys for p in self.totals.get(k, {})})
        totals = {
            p: np.array([self.totals.get(k, {}).get(p, 0) for k in keys], dtype=np.int64)
            for p in names
        }
        latest = reader.take(order[current])
        return TableSnapshot(latest=latest, totals=totals, windows=windows)


def _conformed(batch: pa.Table, name: str, checked: bool) -> pa.Table:
    """An Arrow batch with exactly the table's columns, validated unless ``checked``."""
    from telemetry.schema import SCHEMAS, validate

    return (batch if checked else validate(batch, name)).select(SCHEMAS[name].names)


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
        self.tables = {name: TableState(name, max_gap_seconds) for name in TABLES}
        self.biller = None
        if inventory is not None:
            from telemetry.billing.engine import LIVE_WINDOW_SECONDS, Biller

            self.biller = Biller(inventory, LIVE_WINDOW_SECONDS)
        self._job_batches = 0

    def ingest(self, name: str, batch: Table) -> None:
        """Add rows of table ``name``; rows outside the valid ranges are dropped and counted
        (they would turn counters backwards); raises ``SchemaError`` for a non-conforming Arrow
        table."""
        kept: Table
        if isinstance(batch, Frame):
            kept, dropped = batch.screened()
        else:
            from telemetry.schema import screen, validate

            checked = validate(batch, name)
            kept = screen(checked, name)[0]
            dropped = checked.num_rows - kept.num_rows
        self.tables[name].stats.out_of_range += dropped
        self.tables[name].ingest(kept, checked=True)
        if self.biller is not None:  # bills read Arrow: a daemon with an inventory loads it
            self.biller.add({name: kept.to_arrow() if isinstance(kept, Frame) else kept})
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
