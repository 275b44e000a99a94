"""``tally aggregate``: follow a dataset that many node daemons write into, bill it as it grows.

Every poll the dataset reader's ``Follower`` returns the rows not read before, files in time
order, so each series arrives oldest first and the bill engine keeps each series' last sample
across polls, exactly as ``tally bill`` does across chunks. A row older than its series' newest
row (a node's files arriving out of order) cannot be billed live any more: it is dropped and
counted (``tally bill`` over the same files still counts it).

Restarts: the dataset is the state. A new aggregator reads every file again before it serves,
so its counters continue from the same totals — never doubled, never reset by the restart. What
the dataset no longer holds (old partitions removed by retention) is kept by a checkpoint of the
exported totals, written after every poll: a restart exports at least what was exported before,
so a counter never goes down and Prometheus never reads a reset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa

from kernels.backend import to_host
from kernels.grouped_sums import group_sums
from telemetry.billing.engine import (
    LIVE_WINDOW_SECONDS,
    NS,
    Biller,
    LiveTotals,
)
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


def _series(live: LiveTotals) -> dict[str, list[float]]:
    """Every counter series of ``live``, keyed by its labels (``_totals`` reads them back)."""
    out = {"\t".join(("pool", *p[:2])): list(p[2:]) for p in live.pools}
    out.update({"\t".join(("tenant", *t[:3])): list(t[3:]) for t in live.tenants})
    return out


def _file_key(key: tuple[str, str]) -> str:
    """A file the follower has read, as the checkpoint lists it: ``table<TAB>stem``."""
    return "\t".join(key)


def _totals(currency: str, series: dict[str, list[float]]) -> LiveTotals:
    """The ``LiveTotals`` of ``_series`` output."""
    pools, tenants = [], []
    for key, values in series.items():
        kind, *labels = key.split("\t")
        if kind == "pool" and len(labels) == 2:
            pools.append((*labels, *values))
        elif kind == "tenant" and len(labels) == 3:
            tenants.append((*labels, *values))
    return LiveTotals(currency, sorted(pools), sorted(tenants))  # type: ignore[arg-type]


def _read_checkpoint(path: Path) -> tuple[dict[str, list[float]], set[str]]:
    """The series and the files read of a checkpoint file; empty (and said) when it is missing
    or unreadable."""
    try:
        data = json.loads(path.read_text())
        series = {
            str(k): [float(v) for v in values]
            for k, values in data["series"].items()
            if all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values)
        }
        return series, {str(f) for f in data.get("files", [])}
    except FileNotFoundError:
        return {}, set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("checkpoint %s unreadable (%s); starting from the dataset's totals", path, exc)
        return {}, set()


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
        checkpoint: Path | None = None,
    ) -> None:
        """``xp`` is the bill engine's array backend (``kernels.get_namespace``); ``checkpoint``
        the JSON file of exported totals kept across restarts (none: counters may go down when
        old files are removed)."""
        self.checkpoint = checkpoint
        # per counter series: what the checkpoint held beyond what the dataset still gives
        self.carried: dict[str, list[float]] | None = None
        self._checkpoint_failed = False
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
        read = 0
        if self.checkpoint is not None and self.carried is None:
            # After a restart: first the files the checkpoint had read, so that what it
            # exported beyond them is exactly what retention removed; then what came since.
            saved, known = _read_checkpoint(self.checkpoint)
            before = [w for w in work if _file_key(self.follower.key(*w)) in known]
            read += self._read(before, progress, len(work), 0)
            self._carry(saved)
            work = [w for w in work if _file_key(self.follower.key(*w)) not in known]
        read += self._read(work, progress, len(work), read)
        self._prune_minutes()
        self.totals.retire()
        if self.checkpoint is not None:
            self._write_checkpoint(self.checkpoint)
        self.last_poll_seconds = time.monotonic() - started
        return read

    def _read(
        self,
        work: list[tuple[str, Path]],
        progress: Callable[[int, int, int], None] | None,
        total: int,
        read: int,
    ) -> int:
        pending: dict[str, list[pa.Table]] = {name: [] for name in SCHEMAS}
        held = 0
        fresh = 0
        for done, (table, path) in enumerate(work, start=1):
            rows = self.follower.new_rows(table, path)
            if rows is not None and rows.num_rows:
                pending[table].append(rows)
                held += rows.num_rows
                fresh += rows.num_rows
            if held >= self.batch_rows:
                self._feed(pending)
                held = 0
            if progress is not None:
                progress(done, max(total, done), read + fresh)
        self._feed(pending)
        return fresh

    def _carry(self, saved: dict[str, list[float]]) -> None:
        """Carry what the checkpoint exported beyond the totals of the files it had read."""
        self.carried = {}
        raw = _series(self.totals.live_totals())
        for key, values in saved.items():
            now = raw.get(key, [0.0] * len(values))
            extra = [max(0.0, v - n) for v, n in zip(values, now, strict=False)]
            if any(extra):
                self.carried[key] = extra
        if self.carried:
            log.info(
                "checkpoint %s: %d counter series carry totals the dataset no longer holds",
                self.checkpoint,
                len(self.carried),
            )

    def _write_checkpoint(self, path: Path) -> None:
        """The exported totals and the files read, atomically (a failure is logged once)."""
        if self.carried is None:
            self.carried = {}  # a first start: nothing to carry
        body = {
            "version": 2,
            "series": _series(self.live_totals()),
            "files": sorted(_file_key(key) for key in self.follower.seen),
        }
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as out:
                out.write(json.dumps(body, sort_keys=True))
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(path)
            self._checkpoint_failed = False
        except OSError as exc:
            if not self._checkpoint_failed:
                log.warning("cannot write checkpoint %s (%s); a restart may reset counters",
                            path, exc.strerror or exc)  # fmt: skip
            self._checkpoint_failed = True

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
        keys, _ = parts.compact()
        keep = keys[0] >= newest // (_MINUTE * NS) - _KEEP_MINUTES
        if not keep.all():
            parts.keep_only(keep)

    # ---------------------------------------------------------------- results
    def live_totals(self) -> LiveTotals:
        """The totals to export: the dataset's, plus what the checkpoint carries."""
        live = self.totals.live_totals()
        if not self.carried:
            return live
        series = _series(live)
        for key, extra in self.carried.items():  # series whose files are all gone too
            now = series.get(key, [0.0] * len(extra))
            series[key] = [v + e for v, e in zip(now, extra, strict=True)]
        return _totals(live.currency, series)

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
                if pool.declared:  # what the bill counts: declared units over those minutes
                    span = ((current - minutes) * _MINUTE * NS, current * _MINUTE * NS)
                    capacity = pool.declared_us(*span)
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
