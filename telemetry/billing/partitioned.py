"""Bills larger than one process (SPEC §9): the dataset split into partitions by node, and a
node whose files are many bytes by time, each billed by the same engine into int64 partial sums,
merged exactly, and written by the one invoice code.

A series never leaves its node's directory, so a partition of whole nodes needs nothing from any
other: its sums are those the single-process bill would add for its rows. A node with more than
``SLICE_BYTES`` of files is cut by time into slices of about that many bytes (the cuts from the
files' footers: each file's bytes spread over its time span, on whole hours where that keeps
the slices apart), and a slice's task reads only the files that reach into it or into the
``max_gap`` before it. An interval (t_{i-1}, t_i] belongs to the slice holding t_i, whose task
carries each series' last row of that lookback in (the same canonical row one process would
carry: duplicates share a time, so they never straddle a cut), so counter deltas, restarts and
shared-GPU splits come out as one process gives them. A series silent for longer than the
lookback opens a gap at its first row of the slice: every slice reports each capacity series'
first and last time and whether it carried a row in, and the merge adds those gaps' length to
``gap_us`` (all else a gap adds is nothing, SPEC §3). Every row, file and impossible time is
counted by one slice (``TimeSlice``); a job's owner is its newest row wherever it lies.

The merge maps each partition's registry ids back to strings, adds the sums with no int64 wrap
(``exact_merge``: a total outside int64 is an error, never a silent wrap) and takes each job's
newest owner; accounting records, contracts and money then apply once, on the merged sums
(``finish_bill``), so the bill's bytes are those of the single-process bill for any executor,
any number of workers and any cut.

Rows whose node differs from their directory's (a file written by hand into another node's
directory) could put one series into two partitions: every task reports the nodes its rows
named, and the partitions of different directories that share a node are billed again together,
whole, before anything is merged; so is a sliced node one of whose slices set a file aside while
it read (the others may have read that file's rows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from telemetry.billing.accounting import Record
from telemetry.billing.bill import finish_bill, with_timezone
from telemetry.billing.engine import NS, Bill, Biller
from telemetry.billing.inventory import Inventory
from telemetry.billing.partition_merge import merge_grids, merge_parts
from telemetry.billing.partition_plan import plan_tasks
from telemetry.billing.partition_tasks import BillPart, BillTask, bill_partition
from telemetry.billing.period import selected_range
from telemetry.billing.windows import Windows
from telemetry.executors import cores, run_tasks
from telemetry.store.dataset import DEFAULT_BUDGET_ROWS, ReadStats, TimeSlice, node_of
from telemetry.store.layout import QUARANTINE

log = logging.getLogger("tally.bill")

# Below this many bytes of files the default (no --workers) bills in this process: starting a
# pool costs more than it saves.
POOL_MIN_BYTES = 64 << 20
# Tasks per worker: enough that a slow partition does not leave the others idle at the end.
TASKS_PER_WORKER = 4


def _billed_again(
    parts: list[BillPart], lost: frozenset[str] = frozenset()
) -> list[tuple[set[int], str]]:
    """Groups (indexes) of parts to bill again as one, whole, and why: parts of different
    directories that share a node, transitively; a sliced node one of whose slices set a file
    aside while it read; a node of ``lost`` (a file of it set aside by a worker that died)."""
    parent = list(range(len(parts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[object, int] = {}
    for i, part in enumerate(parts):
        # the slices of a node go together, whatever their rows name
        for key in [*part.nodes_seen, part.node_dirs]:
            j = owner.setdefault(key, i)
            if j != i:
                parent[find(i)] = find(j)
    groups: dict[int, set[int]] = {}
    for i in range(len(parts)):
        groups.setdefault(find(i), set()).add(i)
    again = []
    for group in groups.values():
        if len({parts[i].node_dirs for i in group}) > 1:
            again.append((group, "share a node: billing them together"))
        elif any(
            parts[i].time_slice is not None
            and (parts[i].stats.files_quarantined or parts[i].stats.files_skipped)
            for i in group
        ):
            again.append((group, "set a file aside in one time slice: billing the node whole"))
        elif any(d in lost for i in group for d in parts[i].node_dirs):
            again.append((group, "had a file set aside by a worker that died: billing it again"))
    return sorted(again, key=lambda g: min(g[0]))


def _set_aside_unreported(root: Path, tasks: list[BillTask], parts: list[BillPart]) -> list[str]:
    """The plan's files moved to quarantine/ while the tasks ran that no finished part names: an
    attempt whose worker then died set them aside (its task ran again without them, but a node's
    other time slices may have read their rows, and the bill would not say so)."""
    if not (root / QUARANTINE).is_dir():  # nothing was set aside: no file to look for
        return []
    planned = {f for task in tasks for f in task.known or task.files}
    gone = [f for f in sorted(planned)
            if not (root / f).exists() and (root / QUARANTINE / f).exists()]  # fmt: skip
    if not gone:
        return []
    said = [m for part in parts for m in [*part.warnings, *part.stats.problems]]
    return [f for f in gone if not any(str(root / f) in m for m in said)]


def compute_bill_partitioned(
    root: Path,
    inventory: Inventory,
    window: int | str,
    start: str | None = None,
    end: str | None = None,
    budget_rows: int = DEFAULT_BUDGET_ROWS,
    progress: Callable[[int, int, int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
    backend: str = "numpy",
    accounting: list[Record] | None = None,
    timezone: str | None = None,
    workers: int | None = None,
    cluster: Any = None,
) -> Bill | None:
    """The bill of the dataset at ``root`` billed partition by partition (SPEC §9); the same
    bytes as ``compute_bill``'s. ``workers`` processes on this machine (None: one per core), or
    ``cluster`` (``local``, ``local:N``, ``tcp://HOST:PORT`` or a ``distributed.Client``).

    Returns None where one process is the better choice (``workers`` None and a dataset below
    ``POOL_MIN_BYTES``, or one partition only): the caller bills in this process. Raises
    ``TallyError`` for bad input and ``PartitionFailed``/``WorkerLost`` for failures that are
    not, each before anything is returned: never a partial bill.
    """
    inventory = with_timezone(inventory, timezone)
    lo, hi = selected_range(start, end, inventory.timezone)
    done = run_partitions(
        root, inventory, window, lo, hi, budget_rows, progress, warn, backend, workers, cluster
    )
    if done is None:
        return None
    biller, stats, _ = done
    return finish_bill(biller, stats, warn, accounting)


def run_partitions(
    root: Path,
    inventory: Inventory,
    window: int | str,
    lo: int | None,
    hi: int | None,
    budget_rows: int = DEFAULT_BUDGET_ROWS,
    progress: Callable[[int, int, int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
    backend: str = "numpy",
    workers: int | None = None,
    cluster: Any = None,
    grids: tuple[int, float] | None = None,
) -> tuple[Biller, ReadStats, list[Any] | None] | None:
    """Every node partition of the dataset billed where told and merged: one biller holding the
    exact sums (``bill()`` on it is the single-process bill) and the read statistics; with
    ``grids`` (a report's window and max gap) also the report's grids, merged. None where one
    process is the better choice (see ``compute_bill_partitioned``). The engine to call for any
    command that bills (bill, report, plan)."""
    windows = Windows(window, inventory.timezone)
    auto = workers is None and cluster is None
    n = cores() if workers is None else max(1, workers)

    def make(
        node_dirs: tuple[str, ...],
        files: tuple[str, ...],
        time_slice: TimeSlice | None = None,
        known: frozenset[str] = frozenset(),
    ) -> BillTask:
        return BillTask(root, node_dirs, files, inventory, window, lo, hi, backend, budget_rows,
                        grids, time_slice, known)  # fmt: skip

    lookback_ns = int(inventory.max_gap_seconds * NS)  # as the biller's max gap
    wanted = n * TASKS_PER_WORKER if n > 1 or cluster else 1
    tasks, size = plan_tasks(root, wanted, make, lookback_ns)
    if auto and (size < POOL_MIN_BYTES or len(tasks) < 2):
        return None
    rows_done = 0
    finished = 0

    def done(_: int, part: BillPart) -> None:
        nonlocal rows_done, finished
        rows_done += part.stats.rows
        finished += 1
        if progress is not None:
            progress(finished, len(tasks), rows_done)

    parts = run_tasks(bill_partition, tasks, workers=n, cluster=cluster, on_done=done)
    unreported = _set_aside_unreported(root, tasks, parts)
    lost = frozenset(node_of(root, root / f) for f in unreported)
    groups = _billed_again(parts, lost)
    if groups:
        again = []
        for group, why in groups:
            merged = tuple(sorted({d for i in group for d in parts[i].node_dirs}))
            files = tuple(sorted({f for i in group for f in tasks[i].known or tasks[i].files}))
            log.info("partitions %s %s", ", ".join(merged), why)
            again.append(make(merged, files))
        redone = run_tasks(bill_partition, again, workers=n, cluster=cluster)
        for (group, _), part in zip(groups, redone, strict=True):
            # what the first run set aside lies in quarantine/ now: its count carries over
            part.stats.files_quarantined += sum(parts[i].stats.files_quarantined for i in group)
            said = [m for i in sorted(group) for m in parts[i].warnings]
            mine = [f for f in unreported if node_of(root, root / f) in part.node_dirs]
            part.stats.files_quarantined += len(mine)
            said += [f"{root / f}: set aside by a worker that died; billed without it"
                     for f in mine]  # fmt: skip
            part.warnings = list(dict.fromkeys([*said, *part.warnings]))
        regrouped = set().union(*(group for group, _ in groups))
        parts = [p for i, p in enumerate(parts) if i not in regrouped] + redone
    parts.sort(key=BillPart.order)
    for part in parts:
        for message in part.warnings:
            warn(message)
    biller, stats = merge_parts(inventory, windows, lo, hi, parts)
    merged_grids = None
    if grids is not None:
        merged_grids = merge_grids(parts, grids, lo, hi)
    return biller, stats, merged_grids
