"""``tally bill``: the dataset reader's time-ordered chunks fed to the bill engine."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from kernels.backend import release
from telemetry.billing.accounting import Record
from telemetry.billing.engine import BILL_COLUMNS, Bill, Biller
from telemetry.billing.inventory import Inventory
from telemetry.billing.period import selected_range
from telemetry.billing.windows import Windows, iso, zone
from telemetry.progress import Progress
from telemetry.store.dataset import DEFAULT_BUDGET_ROWS, ReadStats, scan

log = logging.getLogger("tally.bill")


def compute_bill(
    root: Path,
    inventory: Inventory,
    window: int | str,
    start: str | None = None,
    end: str | None = None,
    budget_rows: int = DEFAULT_BUDGET_ROWS,
    progress: Callable[[int, int, int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
    xp: ModuleType = np,
    accounting: list[Record] | None = None,
    timezone: str | None = None,
    workers: int | None = 1,
    cluster: Any = None,
) -> Bill:
    """The bill of the dataset at ``root``; raises ``TallyError`` for unusable input.

    ``window`` is a length in seconds or ``day``/``week``/``month`` in ``timezone`` (else the
    inventory's). ``accounting`` records, where given, are the allocation of the jobs they name
    (SPEC §4). Without ``progress`` a progress bar is drawn on stderr when it is a terminal.
    ``xp`` is the array backend of the grouped sums; the bill's bytes do not depend on it.
    ``workers`` other than 1 (None: one per core, one process for a small dataset) or a
    ``cluster`` bill the dataset's node partitions there (SPEC §9, ``partitioned``): the same
    bytes.
    """
    if workers != 1 or cluster is not None:
        from telemetry.billing.partitioned import compute_bill_partitioned

        with Progress("billing", step="partition") as bar:
            done = compute_bill_partitioned(
                root, inventory, window, start, end, budget_rows, progress or bar, warn,
                xp.__name__, accounting, timezone, workers, cluster,
            )  # fmt: skip
        if done is not None:
            return done
    inventory = with_timezone(inventory, timezone)
    lo, hi = selected_range(start, end, inventory.timezone)
    windows = Windows(window, inventory.timezone)

    try:
        with Progress("billing") as bar:
            consumers, stats = scan(
                root,
                lambda: [Biller(inventory, windows, lo, hi, xp=xp)],
                budget_rows,
                progress or bar,
                warn,
                BILL_COLUMNS,
            )
    finally:
        release(xp)
    biller = consumers[0]
    assert isinstance(biller, Biller)
    return finish_bill(biller, stats, warn, accounting)


def finish_bill(
    biller: Biller,
    stats: ReadStats,
    warn: Callable[[str], None],
    accounting: list[Record] | None = None,
) -> Bill:
    """The bill of a finished scan (``accounting`` records, where given, the allocation of
    their jobs), warning about inventory globs that matched no node."""
    inventory = biller.inventory
    for problem in inventory.unused_globs(set(biller.nodes.values)):
        warn(f"inventory {inventory.source}: {problem} matches no node in the dataset")
    if biller.start_ns is not None or biller.end_ns is not None:
        _warn_if_empty(biller, stats, warn)
    ruled_out = dict(sorted(stats.rows_out_of_range.items()))
    if ruled_out:
        detail = ", ".join(f"{column} {n:,}" for column, n in ruled_out.items())
        warn(f"rows left out for a value outside its valid range (not billed): {detail}")
    bill = biller.bill(
        {
            "files": stats.files,
            "rows": stats.rows,
            "rows_skipped": biller.duplicates,
            # SPEC §7: set aside, moved or not (a read-only dataset, a journal never moved)
            "files_quarantined": stats.files_quarantined + stats.files_skipped,
            "rows_out_of_range": ruled_out,
        },
        accounting=accounting,
    )
    for note in bill.notes:
        warn(note)
    reconciliation = bill.input.get("reconciliation")
    if reconciliation and reconciliation["jobs_accounted_without_samples"]:
        warn(
            f"{reconciliation['jobs_accounted_without_samples']:,} accounted jobs have no "
            "samples: billed from their accounting record alone (busy 0)"
        )
    return bill


def with_timezone(inventory: Inventory, name: str | None) -> Inventory:
    """``inventory`` with its time zone replaced by ``--timezone`` where one is given."""
    if name is None:
        return inventory
    return replace(inventory, timezone=zone(name, "--timezone"), _prices={})


def _warn_if_empty(biller: Biller, stats: ReadStats, warn: Callable[[str], None]) -> None:
    """A --from/--to that selects no sample: say where the samples are (exit 0 all the same)."""
    keys, _ = biller.pool_totals()
    if keys[0].size or stats.first_ns is None or stats.last_ns is None:
        return

    tz = biller.inventory.timezone

    def name(ns: int | None) -> str:
        return "open" if ns is None else iso(ns, tz)

    warn(
        f"no sample between {name(biller.start_ns)} and {name(biller.end_ns)}: the dataset "
        f"holds samples from {name(stats.first_ns)} to {name(stats.last_ns)}"
    )
