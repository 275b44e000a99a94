"""``tally aggregate``: follow a dataset that many node daemons write into, bill it as it grows.

Every poll lists the dataset; files not seen before are read whole, files that grew (a daemon's
journal of the current hour) from the first row not yet read, and a journal's Parquet twin
(written when the hour is compacted) only for rows later than those its journal gave. Files are
fed in time order, so each series arrives oldest first and the bill engine keeps each series'
last sample across polls, exactly as ``tally bill`` does across chunks. A row older than its
series' newest row (a node's files arriving out of order) cannot be billed live any more: it is
dropped and counted (``tally bill`` over the same files still counts it).

Restarts: the dataset is the state. A new aggregator reads every file again before it serves,
so its counters continue from the same totals — never doubled, never reset by the restart.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernels.backend import to_host
from kernels.billing import group_sums
from telemetry.billing import NS, Biller, LiveTotals
from telemetry.dataset import discover, read_file
from telemetry.errors import TallyError
from telemetry.inventory import Inventory
from telemetry.schema import SCHEMAS, SchemaError
from telemetry.state import LIVE_WINDOW_SECONDS
from telemetry.store import JOURNAL_SUFFIX, QUARANTINE, quarantine

log = logging.getLogger("tally.aggregate")

# Trailing windows of the pool ratios, in minutes (the minute sums are kept a bit longer).
RATIO_WINDOWS = {"1m": 1, "5m": 5, "1h": 60}
_MINUTE = 60
_KEEP_MINUTES = 90
# Rows fed to the bill engine at once while catching up (bounds memory, like tally bill).
BATCH_ROWS = 2_000_000
_DATE = re.compile(r"date=(\d{4}-\d{2}-\d{2})")


@dataclass
class _Seen:
    """What has been read of one file stem (a journal and, later, its Parquet twin)."""

    size: int = -1
    mtime_ns: int = -1
    journal_rows: int = 0
    until_ns: int = -(2**62)  # newest time read from the journal
    parquet_done: bool = False


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


def _order_key(root: Path, path: Path) -> tuple[str, str, str]:
    relative = path.relative_to(root)
    date = _DATE.search(str(relative))
    return (date.group(1) if date else "", path.stem, str(relative))


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
        self.seen: dict[tuple[str, str], _Seen] = {}
        self.stats = AggregateStats()

    # ---------------------------------------------------------------- reading
    def poll(self, progress: Callable[[int, int, int], None] | None = None) -> int:
        """Read and bill every new row of the dataset; returns the rows read.

        Raises ``TallyError`` when the dataset directory is missing or unreadable.
        """
        started = time.monotonic()
        try:
            files = discover(self.root)
        except TallyError as exc:
            if "holds no sample files" in str(exc):
                files = {}
            else:
                raise
        work: list[tuple[tuple[str, str, str], str, Path]] = []
        for table, paths in files.items():
            for path in paths:
                if QUARANTINE in path.relative_to(self.root).parts:
                    continue
                work.append((_order_key(self.root, path), table, path))
        work.sort()
        pending: dict[str, list[pa.Table]] = {name: [] for name in SCHEMAS}
        held = 0
        read = 0
        for done, (_, table, path) in enumerate(work, start=1):
            rows = self._new_rows(table, path)
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
        self.stats.last_poll_seconds = time.monotonic() - started
        return read

    def _new_rows(self, table: str, path: Path) -> pa.Table | None:
        key = (table, str(path.relative_to(self.root).with_suffix("")))
        seen = self.seen.setdefault(key, _Seen())
        try:
            info = path.stat()
        except FileNotFoundError:
            return None  # compacted or removed since the listing
        is_journal = path.suffix == JOURNAL_SUFFIX
        if not is_journal and seen.parquet_done and info.st_mtime_ns == seen.mtime_ns:
            return None
        if is_journal and (info.st_size, info.st_mtime_ns) == (seen.size, seen.mtime_ns):
            return None
        try:
            data = read_file(path, table)
        except SchemaError as exc:
            self._skip(key, path, info, f"{exc}")
            return None
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError) as exc:
            if is_journal:
                return None  # being written or torn: read again next poll
            if quarantine(self.root, path, f"unreadable Parquet: {exc}") is not None:
                self.stats.files_quarantined += 1
            else:
                self._skip(key, path, info, str(exc))
            return None
        data = data.select(SCHEMAS[table].names)
        seen.size, seen.mtime_ns = info.st_size, info.st_mtime_ns
        if is_journal:
            new = data.slice(seen.journal_rows)
            seen.journal_rows = data.num_rows
        else:
            first_time = not seen.parquet_done
            seen.parquet_done = True
            new = data
            if seen.journal_rows:  # the compacted twin of a journal already read
                times = data.column("time").cast(pa.int64())
                new = data.filter(pc.greater(times, pa.scalar(seen.until_ns, pa.int64())))
            if first_time:
                self.stats.files += 1
        if new.num_rows:
            self.stats.rows[table] += new.num_rows
            newest = int(pc.max(new.column("time").cast(pa.int64())).as_py())
            if is_journal:
                seen.until_ns = max(seen.until_ns, newest)
            if self.stats.newest_ns is None or newest > self.stats.newest_ns:
                self.stats.newest_ns = newest
        return new

    def _skip(self, key: tuple[str, str], path: Path, info: object, reason: str) -> None:
        seen = self.seen[key]
        if not seen.parquet_done:
            log.warning("skipping %s: %s", path, reason)
        seen.parquet_done = True
        seen.size = getattr(info, "st_size", -1)
        seen.mtime_ns = getattr(info, "st_mtime_ns", -1)

    def _feed(self, pending: dict[str, list[pa.Table]]) -> None:
        for name, parts in pending.items():
            if parts:
                chunk = {name: pa.concat_tables(parts)}
                self.totals.add(chunk)
                parts.clear()

    def _prune_minutes(self) -> None:
        """Keep only the minutes the trailing ratios can still need."""
        newest = self.stats.newest_ns
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
        newest = self.stats.newest_ns
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
            },
            files_read=stats.files,
            files_quarantined=stats.files_quarantined,
            newest_ns=stats.newest_ns,
            poll_seconds=stats.last_poll_seconds,
        )
