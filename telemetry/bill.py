"""``tally bill``: read a dataset in time-ordered chunks and feed the bill engine."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from datetime import UTC, date, datetime
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np
import pyarrow as pa

from kernels.backend import release
from telemetry.billing import BILL_COLUMNS, NS, Bill, Biller
from telemetry.chunks import (
    DEFAULT_BUDGET_ROWS,
    DamagedFile,
    chunk_bounds,
    plan,
    read_ahead,
    read_chunks,
)
from telemetry.dataset import ReadStats, discover
from telemetry.errors import TallyError
from telemetry.inventory import Inventory
from telemetry.progress import Progress

log = logging.getLogger("tally.bill")


def parse_instant(text: str, what: str) -> int:
    """ISO-8601 date or date-time (naive means UTC) → ns since the epoch; raises ``TallyError``."""
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise TallyError(f"{what}: {text!r} is not an ISO-8601 date or time") from None
    return int(moment.timestamp()) * NS + moment.microsecond * 1000


def selected_range(
    window_s: int, start: str | None, end: str | None
) -> tuple[int | None, int | None]:
    """Window-aligned [start, end): the windows wholly inside --from/--to."""
    w = window_s * NS
    lo = None if start is None else -(-parse_instant(start, "--from") // w) * w
    hi = None if end is None else parse_instant(end, "--to") // w * w
    if lo is not None and hi is not None and hi <= lo:
        raise TallyError(f"--from {start} / --to {end} select no whole {window_s}s window")
    return lo, hi


class ChunkConsumer(Protocol):
    """Anything fed the dataset's time-ordered chunks (the bill engine, the report's grids)."""

    def add(self, chunk: dict[str, pa.Table]) -> None: ...


def scan(
    root: Path,
    start: Callable[[], Sequence[ChunkConsumer]],
    budget_rows: int = DEFAULT_BUDGET_ROWS,
    progress: Callable[[int, int, int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
    columns: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Sequence[ChunkConsumer], ReadStats]:
    """Feed every chunk of the dataset at ``root`` to fresh consumers from ``start()``.

    A file found damaged only while its rows are read is quarantined and the scan starts over
    with new consumers, so the result is exactly that of the remaining files. ``columns`` limits
    what is decoded and validated per table. Raises ``TallyError`` for unusable input.
    """
    stats = ReadStats()
    while True:
        # Files quarantined by earlier attempts are inside quarantine/ now: carry their count.
        stats = ReadStats(files_quarantined=stats.files_quarantined)
        consumers = start()
        try:
            _scan_once(root, consumers, budget_rows, progress, stats, columns)
            return consumers, stats
        except DamagedFile as exc:
            if not exc.quarantined:
                raise TallyError(
                    f"{exc}; it cannot be moved to quarantine, remove it and read again"
                ) from None
            warn(f"{exc.path}: damaged ({exc.reason}); quarantined, reading again without it")
            stats.files_quarantined += 1


def _scan_once(
    root: Path,
    consumers: Sequence[ChunkConsumer],
    budget_rows: int,
    progress: Callable[[int, int, int], None] | None,
    stats: ReadStats,
    columns: Mapping[str, Sequence[str]] | None,
) -> None:
    pieces = plan(root, discover(root), stats)
    if not pieces:
        return
    first = min(p.min_ns for p in pieces)
    last = max(p.max_ns for p in pieces)
    # Every row is read, whatever --from/--to select (the biller counts only the selected
    # windows): the interval ending at a series' first selected row may be a gap opened long
    # before the start, and a job's user and tenant come from its latest row anywhere.
    bounds = chunk_bounds(pieces, first, last, budget_rows)
    with closing(read_ahead(read_chunks(root, pieces, bounds, stats, columns))) as chunks:
        for i, chunk in enumerate(chunks, start=1):
            for consumer in consumers:
                consumer.add(chunk)
            if progress is not None:
                progress(i, len(bounds), stats.rows)


def compute_bill(
    root: Path,
    inventory: Inventory,
    window_s: int,
    start: str | None = None,
    end: str | None = None,
    budget_rows: int = DEFAULT_BUDGET_ROWS,
    progress: Callable[[int, int, int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
    xp: ModuleType = np,
) -> Bill:
    """The bill of the dataset at ``root``; raises ``TallyError`` for unusable input.

    Without ``progress`` a progress bar is drawn on stderr when it is a terminal. ``xp`` is the
    array backend of the grouped sums (``kernels.get_namespace``); the bill's bytes do not
    depend on it.
    """
    lo, hi = selected_range(window_s, start, end)
    try:
        with Progress("billing") as bar:
            consumers, stats = scan(
                root,
                lambda: [Biller(inventory, window_s, lo, hi, xp=xp)],
                budget_rows,
                progress or bar,
                warn,
                BILL_COLUMNS,
            )
    finally:
        release(xp)
    biller = consumers[0]
    assert isinstance(biller, Biller)
    return finish_bill(biller, stats, warn)


def finish_bill(biller: Biller, stats: ReadStats, warn: Callable[[str], None]) -> Bill:
    """The bill of a finished scan, warning about inventory globs that matched no node."""
    inventory = biller.inventory
    for problem in inventory.unused_globs(set(biller.nodes.values)):
        warn(f"inventory {inventory.source}: {problem} matches no node in the dataset")
    return biller.bill(
        {
            "files": stats.files,
            "rows": stats.rows,
            "rows_skipped": biller.duplicates,
            "files_quarantined": stats.files_quarantined,
        }
    )
