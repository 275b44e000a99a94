"""``tally bill``: the dataset reader's time-ordered chunks fed to the bill engine."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import numpy as np

from kernels.backend import release
from telemetry.billing.engine import BILL_COLUMNS, Bill, Biller
from telemetry.billing.inventory import Inventory
from telemetry.billing.period import selected_range
from telemetry.progress import Progress
from telemetry.store.dataset import DEFAULT_BUDGET_ROWS, ReadStats, scan

log = logging.getLogger("tally.bill")


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
    if biller.start_ns is not None or biller.end_ns is not None:
        _warn_if_empty(biller, stats, warn)
    ruled_out = dict(sorted(stats.rows_out_of_range.items()))
    if ruled_out:
        detail = ", ".join(f"{column} {n:,}" for column, n in ruled_out.items())
        warn(f"rows left out for a value outside its valid range (not billed): {detail}")
    return biller.bill(
        {
            "files": stats.files,
            "rows": stats.rows,
            "rows_skipped": biller.duplicates,
            # SPEC §7: set aside, moved or not (a read-only dataset, a journal never moved)
            "files_quarantined": stats.files_quarantined + stats.files_skipped,
            "rows_out_of_range": ruled_out,
        }
    )


def _warn_if_empty(biller: Biller, stats: ReadStats, warn: Callable[[str], None]) -> None:
    """A --from/--to that selects no sample: say where the samples are (exit 0 all the same)."""
    keys, _ = biller.pool_totals()
    if keys[0].size or stats.first_ns is None or stats.last_ns is None:
        return

    def iso(ns: int | None) -> str:
        if ns is None:
            return "open"
        return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat().replace("+00:00", "Z")

    warn(
        f"no sample between {iso(biller.start_ns)} and {iso(biller.end_ns)}: the dataset holds "
        f"samples from {iso(stats.first_ns)} to {iso(stats.last_ns)}"
    )
