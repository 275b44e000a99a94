"""Live aggregation state shared by the daemon and replay: ingest sample batches, keep what the
trailing windows need, accumulate SPEC §3 counters, and publish a snapshot for the exporter.

All row work is done by the ``kernels`` functions on whole columns; Python loops run over
tables and series, never over rows. Rows come as Arrow tables (replay) or as Frames (the node
daemon, which so never loads Arrow); the snapshot holds the kind that came in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

import kernels
from telemetry.collectors.base import CollectorStatus
from telemetry.frame import Frame
from telemetry.merge import Table, as_rows, concat, merge_rows
from telemetry.tables import TABLES

if TYPE_CHECKING:  # the bill engine is imported only when an inventory asks for pools
    import pyarrow as pa

    from telemetry.billing.engine import LiveTotals
    from telemetry.billing.inventory import Inventory

NS = 1_000_000_000
# Trailing windows of SPEC §6, label → seconds.
WINDOWS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600}
DEFAULT_MAX_GAP_SECONDS = 60
# Rows per series appended between two compactions of a table's retained rows (see TableState):
# up to TAIL_ROWS while the tail's cells (slots · rows) stay under TAIL_CELLS, as on a node, and
# down to MIN_TAIL_ROWS where the series are many. A compaction rewrites every row retained (an
# hour of them): on a node's daemon, a wide tail makes that four times rarer for 0.5 MiB.
TAIL_ROWS = 256
MIN_TAIL_ROWS = 64
TAIL_CELLS = 1 << 16
_NO_TIME = np.iinfo(np.int64).max  # an unused tail cell: after every window start
_PACKED_KEY_LIMIT = 2**62  # slots · span must stay below it for one search over all slots


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

    def filtered(self, keep: np.ndarray) -> TableSnapshot:
        """The rows where ``keep`` (bool, one per row) is true, with their totals and ratios."""
        rows = np.nonzero(keep)[0]
        latest = self.latest
        if isinstance(latest, Frame):
            latest = latest.take(rows)
        else:
            import pyarrow as pa

            latest = latest.take(pa.array(rows, type=pa.int64()))
        return TableSnapshot(
            latest=latest,
            totals={k: v[rows] for k, v in self.totals.items()},
            windows={k: v[rows] for k, v in self.windows.items()},
        )


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
    # (node, index, UUID or None) of each GPU NVML answered "lost" for in the newest round
    # (daemon only; see hide_lost_gpus)
    lost_gpus: list[tuple[str, int, str | None]] = field(default_factory=list)

    def hide_lost_gpus(self) -> None:
        """Leave the GPUs of :attr:`lost_gpus` (with their MIG instances and gpu_job rows) out of
        the tables: their newest readings are from before they were lost, not current. Their
        totals stay in the state and are shown again when the GPU answers again."""
        gpus = self.tables.get("gpu")
        if not self.lost_gpus or gpus is None:
            return
        lost = {(node, index) for node, index, _ in self.lost_gpus}
        nodes, indices = _values(gpus.latest, "node"), _values(gpus.latest, "gpu_index")
        hidden = np.array([key in lost for key in zip(nodes, indices, strict=True)], dtype=bool)
        if not hidden.any():
            return
        uuids = _values(gpus.latest, "gpu_uuid")
        gone = {(n, u) for n, u, h in zip(nodes, uuids, hidden.tolist(), strict=True) if h}
        self.tables["gpu"] = gpus.filtered(~hidden)
        shared = self.tables.get("gpu_job")
        if shared is not None:
            keys = zip(_values(shared.latest, "node"), _values(shared.latest, "gpu_uuid"),
                       strict=True)  # fmt: skip
            self.tables["gpu_job"] = shared.filtered(
                np.array([key not in gone for key in keys], dtype=bool)
            )


class TableState:
    """Incremental state of one sample table.

    Keeps, per series, the rows the longest window still needs (window + max gap), and int64
    totals of every contribution since the series was first seen; a series silent for 1h + max
    gap or longer (behind the table's newest sample) is forgotten with its totals. Rows at or
    before a series' newest retained time are duplicates (same time) or late (older) and are
    dropped and counted.

    A round costs in proportion to its new rows, not to the hour of rows retained: only each
    series' newest row is kept whole, as an Arrow table or a Frame as the rows came (it opens
    the next interval and is what the snapshot shows); older rows are kept as their time and,
    for tables with trailing ratios, the running sums of the two contributions the ratio sums
    before that row (fixed once a row is in: a later row can only follow it). Each series has a
    slot; its rows live in a compact base sorted by (slot, time) and, once newer, in a small
    per-slot tail of at most ``TAIL_ROWS`` rows (fewer for many series). A round appends to the
    tail; a full tail is merged into the base (a compaction, which also drops rows past their
    series' horizon and the slots of forgotten series). A window sum is the slot's running sum
    less the running sum before the first row inside the window.
    """

    def __init__(self, name: str, max_gap_seconds: float = DEFAULT_MAX_GAP_SECONDS) -> None:
        self.name = name
        self.max_gap_ns = int(max_gap_seconds * NS)
        self.retain_ns = max(WINDOWS.values()) * NS + self.max_gap_ns
        self.newest: Table = Frame.empty(name)  # each live series' newest row
        # The series key of each of those rows where they are a Frame (None for Arrow): a Frame
        # batch's series are coded once per ingest, not again with the newest rows.
        self._newest_keys: list[tuple[str, ...]] | None = []
        self.totals: dict[tuple[str, ...], dict[str, int]] = {}
        self.stats = IngestStats()
        self._parts = RATIO_PARTS.get(name, ())
        self._windows_ns = np.array([s * NS for s in WINDOWS.values()], dtype=np.int64)
        # Series → slot. Slots are not reused before a compaction renumbers the live ones.
        self._ids: dict[tuple[str, ...], int] = {}
        self._slots = 0  # slots handed out since the last compaction
        # Per slot (arrays sized to a capacity ≥ _slots): newest time, running sums of the
        # ratio parts up to and with the newest row, rows in the tail, the base rows' range.
        self._newest_ns = np.zeros(0, dtype=np.int64)
        self._running: dict[str, np.ndarray] = {p: np.zeros(0, dtype=np.int64) for p in self._parts}
        self._tail_n = np.zeros(0, dtype=np.int64)
        self._base_start = np.zeros(0, dtype=np.int64)
        self._base_end = np.zeros(0, dtype=np.int64)
        # The tail: per slot, its newest rows' times (unused cells _NO_TIME, after every
        # threshold) and running sums before each row.
        self._tail_times = np.zeros((0, _tail_width(0)), dtype=np.int64)
        self._tail_cum: dict[str, np.ndarray] = {
            p: np.zeros(self._tail_times.shape, dtype=np.int64) for p in self._parts
        }
        # The base: rows sorted by (slot, time) of the slots below _base_slots, each row's time
        # as the key slot · span + (time − t_min), searchable at once for every slot (span 0
        # and t_min 0 where that would overflow: the key is the time, searched slot by slot).
        self._base_slots = 0
        self._base_key = np.zeros(0, dtype=np.int64)
        self._base_cum: dict[str, np.ndarray] = {
            p: np.zeros(0, dtype=np.int64) for p in self._parts
        }
        self._span = 0
        self._t_min = 0

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
        coded = None
        if isinstance(new, Frame) or self._ids:  # an Arrow batch is coded by the merge itself
            new_codes, new_keys = as_rows(new, self.name).series_codes()
            new, new_codes = self._drop_repeats_of_older_rows(new, new_codes, new_keys)
            coded = self._series_after_newest(new, new_codes, new_keys)
        if new.num_rows == 0:
            return  # nothing kept: the newest rows, and so every horizon, are unchanged
        merged = merge_rows(
            self.newest,
            new,
            self.name,
            self.max_gap_ns,
            canonical=False,
            drop_late=True,
            series=coded,
        )
        self.stats.duplicates += merged.duplicates
        self.stats.late += merged.late
        codes, labels, times = merged.codes, merged.labels, merged.times
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
            self._ids.pop(labels[code], None)
        newest_rows = last[alive[codes[last]]]
        self.newest = merged.rows.take(newest_rows)  # from the rows as they came: no reordering
        self._newest_keys = None
        if isinstance(self.newest, Frame):
            self._newest_keys = [labels[c] for c in codes[newest_rows].tolist()]
        fresh = np.nonzero(is_new & alive[codes])[0]
        if fresh.size:
            runs, _ = kernels.segment_bounds(codes[fresh])  # rows are sorted by series, time
            keys = [labels[c] for c in codes[fresh][runs].tolist()]
            self._append(
                self._slots_of(keys), runs, times[fresh], {p: parts[p][fresh] for p in self._parts}
            )

    def _slots_of(self, keys: list[tuple[str, ...]]) -> np.ndarray:
        """The slot of each series in ``keys``, handing out new ones (may compact first)."""
        self._reserve(sum(key not in self._ids for key in keys))
        slots = np.empty(len(keys), dtype=np.int64)
        for i, key in enumerate(keys):
            found = self._ids.get(key)
            if found is None:
                found = self._ids[key] = self._slots
                self._slots += 1
            slots[i] = found
        return slots

    def _reserve(self, more: int) -> None:
        """Room for ``more`` new slots: a compaction drops forgotten slots when they are the
        most, else the per-slot arrays grow by half. A tail more than twice as wide as the
        slots to come allow is narrowed: made anew while it is empty, else by a compaction."""
        needed = self._slots + more
        too_wide = self._tail_times.shape[1] > 2 * _tail_width(needed)
        if needed <= self._tail_n.size and not too_wide:
            return
        if too_wide and not self._tail_n[: self._slots].any():
            width = _tail_width(_capacity(needed))
            self._tail_times = np.full((self._tail_n.size, width), _NO_TIME, dtype=np.int64)
            self._tail_cum = {p: np.zeros(self._tail_times.shape, np.int64) for p in self._parts}
        elif too_wide or self._slots - len(self._ids) > len(self._ids):
            self._compact(more=more)
        if self._slots + more > self._tail_n.size:
            self._resize(max(self._slots + more, self._tail_n.size * 3 // 2, 8))

    def _resize(self, capacity: int) -> None:
        """Per-slot arrays with room for ``capacity`` slots, keeping what the first ``_slots``
        hold."""

        def grown(old: np.ndarray, fill: int) -> np.ndarray:
            if old.shape[0] == capacity:
                return old
            out = np.full((capacity, *old.shape[1:]), fill, dtype=np.int64)
            n = min(self._slots, old.shape[0])
            out[:n] = old[:n]
            return out

        self._newest_ns = grown(self._newest_ns, 0)
        self._tail_n = grown(self._tail_n, 0)
        self._base_start = grown(self._base_start, 0)
        self._base_end = grown(self._base_end, 0)
        self._tail_times = grown(self._tail_times, _NO_TIME)
        for p in self._parts:
            self._running[p] = grown(self._running[p], 0)
            self._tail_cum[p] = grown(self._tail_cum[p], 0)

    def _append(
        self, slots: np.ndarray, runs: np.ndarray, times: np.ndarray, parts: dict[str, np.ndarray]
    ) -> None:
        """Add kept new rows, sorted by series and time and each newer than its series' retained
        rows; ``runs`` starts each series' run, whose slot is in ``slots``."""
        counts = np.diff(np.append(runs, times.size))
        ends = runs + counts - 1
        row_slots = np.repeat(slots, counts)
        rank = np.arange(times.size) - np.repeat(runs, counts)  # row's place in its run
        cum: dict[str, np.ndarray] = {}
        for p, values in parts.items():
            inclusive = np.cumsum(values)
            before = inclusive - values
            start_sum = before[runs]
            cum[p] = self._running[p][row_slots] + before - np.repeat(start_sum, counts)
            self._running[p][slots] += inclusive[ends] - start_sum
        self._newest_ns[slots] = times[ends]
        if (self._tail_n[slots] + counts > self._tail_times.shape[1]).any():
            self._compact((row_slots, times, cum))
            return
        cols = self._tail_n[row_slots] + rank
        self._tail_times[row_slots, cols] = times
        for p in self._parts:
            self._tail_cum[p][row_slots, cols] = cum[p]
        self._tail_n[slots] += counts

    def _compact(
        self,
        extra: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]] | None = None,
        more: int = 0,
    ) -> None:
        """Merge the tail (and ``extra`` rows: slots, times, running sums before each) into the
        base, with room (and a tail width) for ``more`` slots to come; drop rows past their
        series' horizon and the slots of forgotten series; renumber the live slots in their
        order."""
        n = self._slots
        live = np.sort(np.fromiter(self._ids.values(), dtype=np.int64, count=len(self._ids)))
        renumber = np.full(n, -1, dtype=np.int64)
        renumber[live] = np.arange(live.size)
        base_slots = np.repeat(
            np.arange(self._base_slots), (self._base_end - self._base_start)[: self._base_slots]
        )
        in_tail = np.arange(self._tail_times.shape[1]) < self._tail_n[:n, None]
        slot_parts = [base_slots, np.nonzero(in_tail)[0]]
        time_parts = [
            self._base_key - base_slots * self._span + self._t_min,
            self._tail_times[:n][in_tail],
        ]
        cum_parts = {p: [self._base_cum[p], self._tail_cum[p][:n][in_tail]] for p in self._parts}
        if extra is not None:
            slot_parts.append(extra[0])
            time_parts.append(extra[1])
            for p in self._parts:
                cum_parts[p].append(extra[2][p])
        old_slots = np.concatenate(slot_parts)
        times = np.concatenate(time_parts)
        new_slots = renumber[old_slots]
        keep = np.nonzero((new_slots >= 0) & (times > self._newest_ns[old_slots] - self.retain_ns))[
            0
        ]
        # Within a slot, base rows precede tail rows precede extra rows, each in time order.
        keep = keep[np.argsort(new_slots[keep], kind="stable")]
        new_slots, times = new_slots[keep], times[keep]
        self._base_cum = {p: np.concatenate(cum_parts[p])[keep] for p in self._parts}

        self._ids = {key: int(renumber[slot]) for key, slot in self._ids.items()}
        self._newest_ns = self._newest_ns[live]
        for p in self._parts:
            self._running[p] = self._running[p][live]
        self._slots = self._base_slots = live.size
        # Fresh per-slot tail and base ranges (with room for new series), the tail empty.
        self._tail_n = self._base_start = self._base_end = np.zeros(0, dtype=np.int64)
        capacity = _capacity(live.size + more)
        self._tail_times = np.zeros((0, _tail_width(capacity)), dtype=np.int64)
        self._tail_cum = {p: self._tail_times for p in self._parts}
        self._resize(capacity)
        counts = np.bincount(new_slots, minlength=live.size)
        self._base_end[: live.size] = np.cumsum(counts)
        self._base_start[: live.size] = self._base_end[: live.size] - counts
        self._span, self._t_min = 0, 0
        if times.size:
            t_min = int(times.min())
            span = int(times.max()) - t_min + 2  # offsets 0 … span − 2; −1 and span − 1 bound
            if live.size * span < _PACKED_KEY_LIMIT:
                self._span, self._t_min = span, t_min
        self._base_key = new_slots * self._span + (times - self._t_min)

    def _base_first_after(self, slots: np.ndarray, after_ns: np.ndarray) -> np.ndarray:
        """Per query, the first base row of slot ``slots[i]`` with time > ``after_ns[i]``, or the
        end of the slot's base rows (0 for a slot without any)."""
        in_base = slots < self._base_slots
        if self._span:
            clipped = np.clip(after_ns - self._t_min, -1, self._span - 1)
            target = np.where(in_base, slots, 0) * self._span + clipped
            first = np.searchsorted(self._base_key, target, side="right")
            return np.where(in_base, first, 0)
        # the key is the time: bisect each slot's rows
        bisected: np.ndarray = kernels.first_after(
            self._base_key, self._base_start[slots], self._base_end[slots], after_ns
        )
        return bisected

    def _series_after_newest(
        self, new: Table, codes: np.ndarray, keys: list[tuple[str, ...]]
    ) -> tuple[np.ndarray, list[tuple[str, ...]]] | None:
        """Series codes and keys of the newest rows then ``new``'s (its rows' ``codes`` of
        ``keys``), numbered from the newest rows' keys kept from the last ingest: Frames only
        (None otherwise: the merge codes the rows itself)."""
        if self._newest_keys is None or not isinstance(new, Frame):
            return None
        ids = {key: code for code, key in enumerate(self._newest_keys)}  # one row a series
        recode = np.fromiter((ids.setdefault(k, len(ids)) for k in keys), np.int64, len(keys))
        combined = np.concatenate([np.arange(len(self._newest_keys)), recode[codes]])
        return combined, list(ids)

    def _drop_repeats_of_older_rows(
        self, new: Table, codes: np.ndarray, labels: list[tuple[str, ...]]
    ) -> tuple[Table, np.ndarray]:
        """``new`` (its rows' series ``codes`` of keys ``labels``) without the rows that repeat
        (series, time) of a retained row older than the series' newest, counted as duplicates:
        the earlier row wins, as in a full merge; and the codes of the rows kept."""
        if not self._ids:
            return new, codes
        reader = as_rows(new, self.name)
        times = reader.times()
        code_slots = np.array([self._ids.get(key, -1) for key in labels], dtype=np.int64)
        slots = code_slots[codes]
        unseen = _INT64_MIN  # a new series repeats nothing
        newest = np.where(slots >= 0, self._newest_ns[slots], unseen)
        older = np.nonzero(times < newest)[0]
        if older.size == 0:
            return new, codes
        slots, at = slots[older], times[older]
        first = self._base_first_after(slots, at - 1)
        in_base = first < self._base_end[slots]
        found = np.zeros(older.size, dtype=bool)
        if in_base.any():
            row = np.minimum(first, self._base_key.size - 1)
            base_ns = self._base_key[row] - np.where(in_base, slots, 0) * self._span + self._t_min
            found = in_base & (base_ns == at)
        tail = (self._tail_times[slots] == at[:, None]) & (
            np.arange(self._tail_times.shape[1]) < self._tail_n[slots][:, None]
        )
        found |= tail.any(axis=1)
        # A row past its series' horizon is gone (whether compacted away yet or not).
        found &= at > newest[older] - self.retain_ns
        if not found.any():
            return new, codes
        self.stats.duplicates += int(found.sum())
        repeat = np.zeros(new.num_rows, dtype=bool)
        repeat[older] = found
        kept = np.nonzero(~repeat)[0]
        return reader.take(kept), codes[kept]

    def _window_sums(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Per window (rows) and slot (columns), each ratio part summed over the slot's rows with
        time in (newest − window, newest]: exact int64, as ``kernels.trailing_sums``."""
        after = self._newest_ns[slots][None, :] - self._windows_ns[:, None]
        wide = np.broadcast_to(slots, after.shape)
        first = self._base_first_after(wide.ravel(), after.ravel()).reshape(after.shape)
        in_base = first < self._base_end[slots][None, :]
        # Tail rows at or before the window's start: the first row inside is the next one.
        skipped = (self._tail_times[slots][None, :, :] <= after[:, :, None]).sum(axis=2)
        sums = {}
        for p in self._parts:
            before = self._tail_cum[p][wide, np.minimum(skipped, self._tail_times.shape[1] - 1)]
            if self._base_key.size:
                in_base_before = self._base_cum[p][np.minimum(first, self._base_key.size - 1)]
                before = np.where(in_base, in_base_before, before)
            sums[p] = self._running[p][slots][None, :] - before
        return sums

    def node_newest(self) -> dict[str, int]:
        """Each node's newest sample time in this table, int64 ns."""
        table = self.newest
        if table.num_rows == 0:
            return {}
        reader = as_rows(table, self.name)
        if self._newest_keys is not None:
            nodes = [key[0] for key in self._newest_keys]
        else:
            codes, labels = reader.series_codes()
            nodes = [labels[c][0] for c in codes.tolist()]
        return _newest_by_node(nodes, reader.times())

    def snapshot(self, node_newest: dict[str, int] | None = None) -> TableSnapshot:
        """Newest row, totals and trailing ratios of every current series.

        A series is current while its newest sample is within ``max_gap`` of its node's newest:
        ``node_newest``, each node's newest sample in every table, this one included (a job
        that ended on a node that has no job left is not current once the node's other tables
        run a max gap past it); by default this table's own (:meth:`node_newest`).
        """
        table = self.newest
        if table.num_rows == 0:
            return TableSnapshot(latest=table)
        if node_newest is None:
            node_newest = self.node_newest()
        reader = as_rows(table, self.name)
        if self._newest_keys is not None:  # a Frame's rows, one a series: coded already
            codes, labels = np.arange(table.num_rows), self._newest_keys
        else:
            codes, labels = reader.series_codes()
        times = reader.times()
        order = kernels.series_order(codes, times)  # one row per series: by series key
        codes, times = codes[order], times[order]
        # every series key starts with its node
        newest = np.array([node_newest[labels[c][0]] for c in codes.tolist()], dtype=np.int64)
        current = times >= newest - self.max_gap_ns
        keys = [labels[c] for c in codes[current].tolist()]

        windows: dict[str, np.ndarray] = {}
        if self._parts:
            slots = np.array([self._ids[key] for key in keys], dtype=np.int64)
            sums = self._window_sums(slots)
            num, den = (sums[p] for p in RATIO_PARTS[self.name])
            ratio = kernels.ratio_of_sums(num, den)  # trailing_ratio's own division
            for i, label in enumerate(WINDOWS):
                windows[label] = np.clip(ratio[i], 0.0, 1.0)
        series_totals = [self.totals.get(k, {}) for k in keys]
        names = sorted({p for series in series_totals for p in series})
        totals = {p: _int64_array([series.get(p, 0) for series in series_totals]) for p in names}
        latest = reader.take(order[current])
        return TableSnapshot(latest=latest, totals=totals, windows=windows)


class LatestTableState:
    """The newest row of each series of one table, and nothing older: for the tables the
    exporter shows only as they are now (``job``, ``gpu_job``: no counters, no windows) where
    their rows come in time order, as the node daemon's do. No totals, no trailing ratios.

    A row at or before its series' newest time is dropped and counted: a duplicate at that
    time, else late (a full :class:`TableState` tells a late row that repeats an older retained
    row as a duplicate; this one keeps no older row). Of rows repeating one (series, time)
    within a batch the first wins. A series silent for 1h + max gap behind the table's newest
    sample is forgotten, as in :class:`TableState`.
    """

    def __init__(self, name: str, max_gap_seconds: float = DEFAULT_MAX_GAP_SECONDS) -> None:
        self.name = name
        self.max_gap_ns = int(max_gap_seconds * NS)
        self.retain_ns = max(WINDOWS.values()) * NS + self.max_gap_ns
        self.newest: Table = Frame.empty(name)  # each live series' newest row
        self._keys: list[tuple[str, ...]] = []  # the series key of each of those rows
        self._times = np.zeros(0, dtype=np.int64)  # and its time, int64 ns
        self.totals: dict[tuple[str, ...], dict[str, int]] = {}  # none kept
        self.stats = IngestStats()

    @property
    def retained(self) -> Table:
        return self.newest

    def ingest(self, batch: Table, checked: bool = False) -> None:
        """Add rows (any order, any series); raises ``SchemaError`` for a non-conforming Arrow
        table (``checked``: already validated)."""
        new = batch if isinstance(batch, Frame) else _conformed(batch, self.name, checked)
        if new.num_rows == 0:
            return
        self.stats.rows += new.num_rows
        reader = as_rows(new, self.name)
        codes, keys = reader.series_codes()
        times = np.asarray(reader.times(), dtype=np.int64)
        held = {key: row for row, key in enumerate(self._keys)}
        old_row = np.array([held.get(key, -1) for key in keys], dtype=np.int64)
        code_before = np.where(
            old_row >= 0, self._times[np.maximum(old_row, 0)] if self._keys else 0, _INT64_MIN
        )
        order = kernels.series_order(codes, times)
        sorted_codes, sorted_times = codes[order], times[order]
        before = code_before[sorted_codes]
        repeat = np.zeros(order.size, dtype=bool)
        repeat[1:] = (sorted_codes[1:] == sorted_codes[:-1]) & (
            sorted_times[1:] == sorted_times[:-1]
        )
        stale = sorted_times <= before
        late = sorted_times < before
        self.stats.late += int(late.sum())
        self.stats.duplicates += int((stale & ~late).sum() + (repeat & ~stale).sum())
        kept = ~(stale | repeat)
        if not kept.any():
            return
        runs = sorted_codes[kept]
        last = order[kept][kernels.last_rows(runs)]  # each updated series' newest new row
        updated = old_row[codes[last]]
        stay = np.ones(len(self._keys), dtype=bool)
        stay[updated[updated >= 0]] = False
        staying = np.nonzero(stay)[0]
        rows = concat(as_rows(self.newest, self.name).take(staying), reader.take(last))
        row_keys = [self._keys[i] for i in staying.tolist()]
        row_keys += [keys[c] for c in codes[last].tolist()]
        row_times = np.concatenate([self._times[staying], times[last]])
        alive = row_times > int(row_times.max()) - self.retain_ns
        if not alive.all():
            live = np.nonzero(alive)[0]
            rows = as_rows(rows, self.name).take(live)
            row_keys = [row_keys[i] for i in live.tolist()]
            row_times = row_times[live]
        self.newest, self._keys, self._times = rows, row_keys, row_times

    def node_newest(self) -> dict[str, int]:
        """Each node's newest sample time in this table, int64 ns."""
        return _newest_by_node([key[0] for key in self._keys], self._times)

    def snapshot(self, node_newest: dict[str, int] | None = None) -> TableSnapshot:
        """The newest row of every current series (as :meth:`TableState.snapshot` tells
        current), in the order they were kept."""
        table = self.newest
        if table.num_rows == 0:
            return TableSnapshot(latest=table)
        if node_newest is None:
            node_newest = self.node_newest()
        newest = [node_newest[key[0]] for key in self._keys]
        horizon = np.array(newest, dtype=np.int64) - self.max_gap_ns
        current = self._times >= horizon
        if current.all():
            return TableSnapshot(latest=table)
        return TableSnapshot(latest=as_rows(table, self.name).take(np.nonzero(current)[0]))


def _newest_by_node(nodes: list[str], times: Any) -> dict[str, int]:
    """Per node of ``nodes``, the newest of its rows' ``times`` (int64 ns)."""
    newest: dict[str, int] = {}
    for node, time in zip(nodes, np.asarray(times, dtype=np.int64).tolist(), strict=True):
        if time > newest.get(node, _INT64_MIN):
            newest[node] = time
    return newest


def _capacity(slots: int) -> int:
    """Per-slot arrays for ``slots`` slots, with room for some more."""
    return slots + slots // 8 + 8


def _tail_width(capacity: int) -> int:
    """Tail rows per slot for ``capacity`` slots."""
    return max(min(TAIL_ROWS, MIN_TAIL_ROWS), min(TAIL_ROWS, TAIL_CELLS // max(capacity, 1)))


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
        self,
        max_gap_seconds: float = DEFAULT_MAX_GAP_SECONDS,
        inventory: Inventory | None = None,
        declared_capacity: bool = True,
        latest_only: frozenset[str] = frozenset(),
    ) -> None:
        """``latest_only``: tables kept as :class:`LatestTableState` (rows in time order, shown
        only as they are now: the node daemon's job and gpu_job)."""
        self.tables: dict[str, TableState | LatestTableState] = {
            name: (LatestTableState if name in latest_only else TableState)(name, max_gap_seconds)
            for name in TABLES
        }
        self.biller = None
        # pool capacity: the inventory's declared units (a whole dataset), else what the
        # series show (one node of many: Biller.live_totals)
        self.declared_capacity = declared_capacity
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
        node_newest: dict[str, int] = {}  # each node's newest sample in any table
        for st in self.tables.values():
            for node, time in st.node_newest().items():
                node_newest[node] = max(time, node_newest.get(node, time))
        tables = {
            name: st.snapshot(node_newest)
            for name, st in self.tables.items()
            if st.retained.num_rows
        }
        ingest = {name: IngestStats(**vars(st.stats)) for name, st in self.tables.items()}
        pools = None
        if self.biller is not None:
            pools = self.biller.live_totals(self.declared_capacity)
        return Snapshot(
            tables=tables, collectors=dict(collectors or {}), ingest=ingest, pools=pools
        )

    def stats(self) -> dict[str, IngestStats]:
        return {name: st.stats for name, st in self.tables.items()}


def _values(table: Table, column: str) -> list[object]:
    """A column as Python values (None for null)."""
    if isinstance(table, Frame):
        return table.values(column)
    return table.column(column).to_pylist()  # type: ignore[no-any-return]


_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def _int64_array(totals: list[int]) -> np.ndarray:
    """Running totals as int64 exposition values (see :func:`_int64`)."""
    if totals and not (min(totals) >= _INT64_MIN and max(totals) <= _INT64_MAX):
        totals = [_int64(total) for total in totals]
    return np.array(totals, dtype=np.int64)


def _int64(total: int) -> int:
    """A running total as an int64 exposition value: saturated past int64 (garbage readings,
    summed, can pass it; a scrape must not fail for them)."""
    return min(max(total, _INT64_MIN), _INT64_MAX)
