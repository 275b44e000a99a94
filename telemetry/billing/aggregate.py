"""``tally aggregate``: follow a dataset that many node daemons write into, bill it as it grows.

Every poll the dataset reader's ``Follower`` returns the rows not read before, files in time
order, so each series arrives oldest first and the bill engine keeps each series' last sample
across polls, exactly as ``tally bill`` does across chunks. A row older than its series' newest
row (a node's files arriving out of order) cannot be billed live any more: it is dropped and
counted (``tally bill`` over the same files still counts it).

Restarts: the dataset is the state. A new aggregator reads every file again before it serves,
so its counters continue from the same totals — never doubled, never reset by the restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa

from kernels.backend import to_host
from kernels.grouped_sums import group_sums
from telemetry.billing.engine import LIVE_WINDOW_SECONDS, NS, Biller, LiveTotals
from telemetry.billing.inventory import Inventory
from telemetry.schema import SCHEMAS
from telemetry.store.dataset import Follower

log = logging.getLogger("tally.aggregate")

# Trailing windows of the pool ratios, in minutes (the minute sums are kept a bit longer).
RATIO_WINDOWS = {"1m": 1, "5m": 5, "1h": 60}
_MINUTE = 60
_KEEP_MINUTES = 90
# Rows fed to the bill engine at once while catching up (bounds memory, like tally bill).
BATCH_ROWS = 2_000_000


@dataclass
class PoolRatios:
    """Trailing allocation and busy ratios per (pool, kind, window label); None when no capacity."""

    rows: list[tuple[str, str, str, float | None, float | None]] = field(default_factory=list)


@dataclass
class AggregateStats:
    files: int = 0
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SCHEMAS, 0))
    files_quarantined: int = 0
    newest_ns: int | None = None
    last_poll_seconds: float = 0.0


class Aggregator:
    """Incremental bill of a growing dataset; ``poll()`` reads what is new."""

    def __init__(
        self,
        root: Path,
        inventory: Inventory,
        batch_rows: int = BATCH_ROWS,
        xp: ModuleType = np,
    ) -> None:
        """``xp`` is the bill engine's array backend (``kernels.get_namespace``)."""
        self.root = root
        self.inventory = inventory
        self.batch_rows = batch_rows
        # One bill engine: all-time totals, and the pool sums of recent minutes for the ratios.
        self.totals = Biller(
            inventory, LIVE_WINDOW_SECONDS, drop_late=True, fine_window_seconds=_MINUTE, xp=xp
        )
        self.follower = Follower(root)
        self.last_poll_seconds = 0.0

    # ---------------------------------------------------------------- reading
    def poll(self, progress: Callable[[int, int, int], None] | None = None) -> int:
        """Read and bill every new row of the dataset; returns the rows read.

        Raises ``TallyError`` when the dataset directory is missing or unreadable.
        """
        started = time.monotonic()
        work = self.follower.files()
        pending: dict[str, list[pa.Table]] = {name: [] for name in SCHEMAS}
        held = 0
        read = 0
        for done, (table, path) in enumerate(work, start=1):
            rows = self.follower.new_rows(table, path)
            if rows is not None and rows.num_rows:
                pending[table].append(rows)
                held += rows.num_rows
                read += rows.num_rows
            if held >= self.batch_rows:
                self._feed(pending)
                held = 0
            if progress is not None:
                progress(done, len(work), read)
        self._feed(pending)
        self._prune_minutes()
        self.last_poll_seconds = time.monotonic() - started
        return read

    @property
    def stats(self) -> AggregateStats:
        """What the polls so far have read and set aside."""
        follower = self.follower
        return AggregateStats(
            files=follower.stats.files,
            rows=dict(follower.rows),
            files_quarantined=follower.stats.files_quarantined + follower.stats.files_skipped,
            newest_ns=follower.newest_ns,
            last_poll_seconds=self.last_poll_seconds,
        )

    def _feed(self, pending: dict[str, list[pa.Table]]) -> None:
        for name, parts in pending.items():
            if parts:
                chunk = {name: pa.concat_tables(parts)}
                self.totals.add(chunk)
                parts.clear()

    def _prune_minutes(self) -> None:
        """Keep only the minutes the trailing ratios can still need."""
        newest = self.follower.newest_ns
        parts = self.totals.fine_pool_parts
        if newest is None or not parts.keys:
            return
        keys, sums = parts.compact()
        keep = keys[0] >= newest // (_MINUTE * NS) - _KEEP_MINUTES
        if not keep.all():
            parts.keys = [[k[keep] for k in keys]]
            parts.sums = [[v[keep] for v in sums]]
            parts.rows = int(keep.sum())

    # ---------------------------------------------------------------- results
    def live_totals(self) -> LiveTotals:
        return self.totals.live_totals()

    def ratios(self) -> PoolRatios:
        """Trailing ratios over the last complete minutes before the newest sample."""
        out = PoolRatios()
        newest = self.follower.newest_ns
        if newest is None:
            return out
        keys, sums = self.totals.fine_pool_parts.compact()
        keys, sums = [to_host(k) for k in keys], [to_host(v) for v in sums]
        current = newest // (_MINUTE * NS)  # the minute still filling is left out
        pools = self.totals.pools
        for label, minutes in RATIO_WINDOWS.items():
            inside = (keys[0] >= current - minutes) & (keys[0] < current)
            by_pool, pool_sums = group_sums([keys[1][inside]], [s[inside] for s in sums])
            for i in range(by_pool[0].size):
                pool = pools[int(by_pool[0][i])]
                capacity, allocated, busy = (int(pool_sums[j][i]) for j in range(3))
                alloc_ratio = allocated / capacity if capacity else None
                busy_ratio = busy / capacity if capacity else None
                out.rows.append((pool.name, pool.kind, label, alloc_ratio, busy_ratio))
        out.rows.sort()
        return out


@dataclass(frozen=True)
class AggregateSnapshot:
    """What one poll left to export (published by reference, read by the scrape thread)."""

    totals: LiveTotals | None = None
    ratios: PoolRatios = field(default_factory=PoolRatios)
    rows_read: dict[str, int] = field(default_factory=dict)
    rows_dropped: dict[str, int] = field(default_factory=dict)
    files_read: int = 0
    files_quarantined: int = 0
    newest_ns: int | None = None
    poll_seconds: float = 0.0

    @staticmethod
    def of(aggregator: Aggregator) -> AggregateSnapshot:
        stats = aggregator.stats
        return AggregateSnapshot(
            totals=aggregator.live_totals(),
            ratios=aggregator.ratios(),
            rows_read=dict(stats.rows),
            rows_dropped={
                "duplicate": aggregator.totals.duplicates,
                "late": aggregator.totals.late,
                "out_of_range": sum(aggregator.follower.stats.rows_out_of_range.values()),
            },
            files_read=stats.files,
            files_quarantined=stats.files_quarantined,
            newest_ns=stats.newest_ns,
            poll_seconds=stats.last_poll_seconds,
        )
