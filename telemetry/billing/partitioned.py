"""Bills larger than one process (SPEC §9): the dataset split into partitions by node, each billed
by the same engine into int64 partial sums, merged exactly, and written by the one invoice code.

A series never leaves its node's directory, so a partition needs nothing from any other: its
sums are those the single-process bill would add for its rows. The merge maps each partition's
registry ids back to strings, adds the sums with no int64 wrap (``exact_merge``: a total outside
int64 is an error, never a silent wrap) and takes each job's newest owner; accounting records,
contracts and money then apply once, on the merged sums (``finish_bill``), so the bill's bytes
are those of the single-process bill for any executor and any number of workers.

Partitions are whole nodes (several per task); a node is not split further by time. Rows whose
node differs from their directory's (a file written by hand into another node's directory) could
put one series into two partitions: every task reports the nodes its rows named, and partitions
that share a node are billed again together before anything is merged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernels import get_namespace
from kernels.backend import release, to_host
from kernels.grouped_sums import group_sums
from telemetry.billing.accounting import Record
from telemetry.billing.bill import finish_bill, with_timezone
from telemetry.billing.engine import BILL_COLUMNS, Bill, Biller, PartialSums
from telemetry.billing.inventory import Inventory
from telemetry.billing.period import selected_range
from telemetry.billing.windows import Windows
from telemetry.errors import TallyError
from telemetry.executors import cores, run_tasks
from telemetry.store.dataset import DEFAULT_BUDGET_ROWS, ReadStats, node_of, node_partitions, scan

log = logging.getLogger("tally.bill")

# Below this many bytes of files the default (no --workers) bills in this process: starting a
# pool costs more than it saves.
POOL_MIN_BYTES = 64 << 20
# Tasks per worker: enough that a slow partition does not leave the others idle at the end.
TASKS_PER_WORKER = 4
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_HALF = 32  # sums are split into 32-bit halves: int64 sums of either half cannot wrap
_NAMED_FILES = 3


class PartitionFailed(RuntimeError):
    """A partition's task failed for a reason that is not bad input (a bug): exit 1. The message
    names the partition's files."""


# ------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class BillTask:
    """What one worker bills: the files of some node directories of the dataset at ``root``."""

    root: Path
    node_dirs: tuple[str, ...]
    files: tuple[str, ...]  # relative paths, to name them when the task fails
    inventory: Inventory
    window: int | str
    start_ns: int | None
    end_ns: int | None
    backend: str = "numpy"
    budget_rows: int = DEFAULT_BUDGET_ROWS
    # a report's grids too: (window seconds, max gap seconds); None for a bill
    grids: tuple[int, float] | None = None

    def describe(self) -> str:
        shown = ", ".join(self.files[:_NAMED_FILES])
        more = len(self.files) - _NAMED_FILES
        tail = f", and {more} more" if more > 0 else ""
        return f"partition of {len(self.files)} files ({shown}{tail})"


@dataclass
class BillPart:
    """One partition's partial bill: the engine's sums with its ids spelled out as strings."""

    node_dirs: tuple[str, ...]
    nodes: list[str]
    jobs: list[str]
    names: list[str | None]
    pool_keys: list[np.ndarray]
    pool_sums: list[np.ndarray]
    job_keys: list[np.ndarray]
    job_sums: list[np.ndarray]
    owner: dict[tuple[int, int], tuple[int, int, int]]
    rows: int
    duplicates: int
    shared_intervals: int
    first_ns: int | None
    last_ns: int | None
    stats: ReadStats
    warnings: list[str] = field(default_factory=list)
    nodes_seen: frozenset[str] = frozenset()
    grids: list[Any] | None = None  # a report's SeriesGrid (gpu, cpu) and HealthGrid


class _NodesSeen:
    """Every node named by a row of any table (the engine registers those of gpu, cpu and job
    rows; gpu_job rows only where they meet gpu rows)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def add(self, chunk: dict[str, pa.Table]) -> None:
        table = chunk.get("gpu_job")
        if table is not None and table.num_rows:
            column = table.column("node")
            if pa.types.is_dictionary(column.type):
                column = column.cast(pa.string())
            self.seen.update(v for v in pc.unique(column).to_pylist() if v is not None)


def bill_partition(task: BillTask) -> BillPart:
    """Bill one partition (runs on a worker). Raises ``TallyError`` (bad input) or
    ``PartitionFailed`` (anything else), each naming the partition's files."""
    try:
        return _bill_partition(task)
    except TallyError as exc:
        raise TallyError(f"{task.describe()}: {exc}") from None
    except Exception as exc:
        raise PartitionFailed(f"{task.describe()}: {exc!r}") from exc


def _bill_partition(task: BillTask) -> BillPart:
    xp = get_namespace(task.backend)
    windows = Windows(task.window, task.inventory.timezone)
    wanted = set(task.node_dirs)
    root = task.root
    warnings: list[str] = []

    def select(files: dict[str, list[Path]]) -> dict[str, list[Path]]:
        return {t: [p for p in paths if node_of(root, p) in wanted] for t, paths in files.items()}

    columns: dict[str, tuple[str, ...]] = BILL_COLUMNS

    def fresh() -> list[Any]:
        consumers: list[Any] = [
            Biller(task.inventory, windows, task.start_ns, task.end_ns, xp=xp),
            _NodesSeen(),
        ]
        if task.grids is not None:
            consumers += report_grids(task.grids[0], task.grids[1], task.start_ns, task.end_ns)
        return consumers

    if task.grids is not None:
        from telemetry.billing.report import GRID_COLUMNS

        columns = GRID_COLUMNS
    try:
        consumers, stats = scan(
            root, fresh, task.budget_rows, None, warnings.append, columns, select
        )
    finally:
        release(xp)
    biller, seen, *grids = consumers
    assert isinstance(biller, Biller) and isinstance(seen, _NodesSeen)
    pool_keys, pool_sums = biller.pool_totals()
    job_keys, job_sums = biller.job_parts.compact()
    return BillPart(
        node_dirs=task.node_dirs,
        nodes=list(biller.nodes.values),
        jobs=list(biller.jobs.values),
        names=list(biller.names.values),
        pool_keys=pool_keys,
        pool_sums=pool_sums,
        job_keys=[to_host(k) for k in job_keys],
        job_sums=[to_host(v) for v in job_sums],
        owner=dict(biller.owner),
        rows=biller.rows,
        duplicates=biller.duplicates,
        shared_intervals=biller.shared_intervals,
        first_ns=biller.first_ns,
        last_ns=biller.last_ns,
        stats=stats,
        warnings=warnings,
        nodes_seen=frozenset(biller.nodes.values) | frozenset(seen.seen),
        grids=grids or None,
    )


def report_grids(
    window_s: int, max_gap_s: float, start_ns: int | None, end_ns: int | None
) -> list[Any]:
    """The report's consumers beside the biller: gpu and cpu SeriesGrid, HealthGrid."""
    from telemetry.billing.report import HealthGrid, SeriesGrid

    return [
        SeriesGrid("gpu", window_s, max_gap_s, start_ns, end_ns),
        SeriesGrid("cpu", window_s, max_gap_s, start_ns, end_ns),
        HealthGrid(window_s, start_ns, end_ns),
    ]


# ------------------------------------------------------------------------------ merge
def exact_merge(
    parts: list[tuple[list[np.ndarray], list[np.ndarray]]], width: int, fields: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Grouped int64 sums of several parts added per key, exactly: each sum is split into
    32-bit halves whose int64 sums cannot wrap (fewer than 2^31 rows), and the totals are put
    back together as Python would add them. Raises ``TallyError`` where a total leaves int64."""
    keys = [np.concatenate([p[0][i] for p in parts]) if parts else np.zeros(0, np.int64)
            for i in range(width)]  # fmt: skip
    if keys[0].size == 0:
        return [k.astype(np.int64) for k in keys], [np.zeros(0, np.int64) for _ in range(fields)]
    values = [np.concatenate([p[1][f] for p in parts]).astype(np.int64) for f in range(fields)]
    halves = []
    for v in values:
        halves += [v >> _HALF, v & ((1 << _HALF) - 1)]
    grouped, sums = group_sums([k.astype(np.int64) for k in keys], halves)
    totals = []
    for f in range(fields):
        high, low = sums[2 * f], sums[2 * f + 1]
        high = high + (low >> _HALF)  # exact: |high| < 2^62, the carry < 2^31
        low = low & ((1 << _HALF) - 1)
        wrapped = (high < -(1 << (63 - _HALF))) | (high >= (1 << (63 - _HALF)))
        if wrapped.any():
            i = int(np.flatnonzero(wrapped)[0])
            total = (int(high[i]) << _HALF) + int(low[i])
            raise TallyError(
                f"a bill total ({total}) does not fit in 64 bits: the input holds impossible "
                "values (a counter or a time far out of range)"
            )
        totals.append((high << _HALF) | low)
    return grouped, totals


def merge_parts(
    inventory: Inventory,
    windows: Windows,
    start_ns: int | None,
    end_ns: int | None,
    parts: list[BillPart],
) -> tuple[Biller, ReadStats]:
    """One biller holding the exact sum of the partitions' partial bills, and their read
    statistics added up: what a single process would hold after reading every partition."""
    biller = Biller(inventory, windows, start_ns, end_ns)
    pool_parts, job_parts = [], []
    owners: dict[tuple[str, str], tuple[int, str | None, str | None]] = {}
    for part in sorted(parts, key=lambda p: p.node_dirs):
        nodes = np.array([biller.nodes.id(v) for v in part.nodes] or [0], dtype=np.int64)
        jobs = np.array([biller.jobs.id(v) for v in part.jobs] or [0], dtype=np.int64)
        pool_parts.append((part.pool_keys, part.pool_sums))
        if part.job_keys and part.job_keys[0].size:
            k = part.job_keys
            job_parts.append(([k[0], k[1], nodes[k[2]], jobs[k[3]]], part.job_sums))
        for (node_id, job_id), (time, user_id, tenant_id) in part.owner.items():
            key = (part.nodes[node_id], part.jobs[job_id])
            mine = (time, part.names[user_id], part.names[tenant_id])
            seen = owners.get(key)
            # newest row wins; at the same instant the larger (user, tenant), so the owner
            # does not depend on the order partitions finish in
            if seen is None or _owner_order(mine) > _owner_order(seen):
                owners[key] = mine
        biller.rows += part.rows
        biller.duplicates += part.duplicates
        biller.shared_intervals += part.shared_intervals
        biller.first_ns = _pick(min, biller.first_ns, part.first_ns)
        biller.last_ns = _pick(max, biller.last_ns, part.last_ns)
    for (node, job), (time, user, tenant) in sorted(owners.items(), key=lambda kv: kv[0]):
        biller.owner[(biller.nodes.id(node), biller.jobs.id(job))] = (
            time,
            biller.names.id(user),  # type: ignore[arg-type]  # None: a row without a user
            biller.names.id(tenant),  # type: ignore[arg-type]
        )
    biller.pool_parts = _as_partial(exact_merge(pool_parts, 2, 6), 2)
    biller.job_parts = _as_partial(exact_merge(job_parts, 4, 4), 4)
    return biller, merge_stats([p.stats for p in sorted(parts, key=lambda p: p.node_dirs)])


def _owner_order(owner: tuple[int, str | None, str | None]) -> tuple[int, str, str, bool, bool]:
    time, user, tenant = owner
    return time, user or "", tenant or "", user is not None, tenant is not None


def _pick(choose: Callable[[int, int], int], a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else choose(a, b)


def _as_partial(grouped: tuple[list[np.ndarray], list[np.ndarray]], width: int) -> PartialSums:
    keys, sums = grouped
    partial = PartialSums(width=width)
    if keys[0].size:
        partial.keys, partial.sums, partial.rows = [keys], [sums], int(keys[0].size)
    return partial


def merge_stats(stats: list[ReadStats]) -> ReadStats:
    """Read statistics of several partitions added up (the dataset's span: the widest)."""
    out = ReadStats()
    for s in stats:
        out.files += s.files
        out.rows += s.rows
        out.rows_skipped += s.rows_skipped
        out.files_quarantined += s.files_quarantined
        out.files_skipped += s.files_skipped
        out.problems += s.problems
        out.ruled_out(s.rows_out_of_range)
        out.first_ns = _pick(min, out.first_ns, s.first_ns)
        out.last_ns = _pick(max, out.last_ns, s.last_ns)
    return out


# ------------------------------------------------------------------------------ planning
def plan_tasks(
    root: Path, tasks_wanted: int, make: Callable[[tuple[str, ...], tuple[str, ...]], BillTask]
) -> tuple[list[BillTask], int]:
    """The dataset's node directories grouped into about ``tasks_wanted`` tasks of similar size
    (bytes of files; largest first onto the lightest task), and the dataset's bytes."""
    partitions = node_partitions(root)
    sized = []
    total = 0
    for node_dir, by_table in partitions.items():
        paths = sorted(p for table_files in by_table.values() for p in table_files)
        size = sum(_size(p) for p in paths)
        total += size
        sized.append((size, node_dir, tuple(str(p.relative_to(root)) for p in paths)))
    sized.sort(key=lambda s: (-s[0], s[1]))
    groups: list[tuple[int, list[str], list[str]]] = [
        (0, [], []) for _ in range(max(1, min(tasks_wanted, len(sized))))
    ]
    for size, node_dir, names in sized:
        lightest = min(range(len(groups)), key=lambda g: (groups[g][0], g))
        weight, dirs, files = groups[lightest]
        groups[lightest] = (weight + size, [*dirs, node_dir], [*files, *names])
    tasks = [make(tuple(sorted(d)), tuple(sorted(f))) for _, d, f in groups if d]
    return sorted(tasks, key=lambda t: t.node_dirs), total


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _overlapping(parts: list[BillPart]) -> list[set[int]]:
    """Groups (indexes) of parts that share a node, transitively; only groups of two or more."""
    parent = list(range(len(parts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, part in enumerate(parts):
        for node in part.nodes_seen:
            j = owner.setdefault(node, i)
            if j != i:
                parent[find(i)] = find(j)
    groups: dict[int, set[int]] = {}
    for i in range(len(parts)):
        groups.setdefault(find(i), set()).add(i)
    return [g for g in groups.values() if len(g) > 1]


# ------------------------------------------------------------------------------ the bill
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

    def make(node_dirs: tuple[str, ...], files: tuple[str, ...]) -> BillTask:
        return BillTask(
            root, node_dirs, files, inventory, window, lo, hi, backend, budget_rows, grids
        )

    tasks, size = plan_tasks(root, n * TASKS_PER_WORKER if n > 1 or cluster else 1, make)
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
    groups = _overlapping(parts)
    if groups:
        # rows named a node outside their directory: the partitions sharing it again, as one
        again = []
        for group in groups:
            merged = tuple(sorted(d for i in group for d in parts[i].node_dirs))
            files = tuple(sorted(f for i in group for f in tasks[i].files))
            log.info("partitions %s share a node: billing them together", ", ".join(merged))
            again.append(make(merged, files))
        regrouped = set().union(*groups)
        parts = [p for i, p in enumerate(parts) if i not in regrouped] + run_tasks(
            bill_partition, again, workers=n, cluster=cluster
        )
    parts.sort(key=lambda p: p.node_dirs)
    for part in parts:
        for message in part.warnings:
            warn(message)
    biller, stats = merge_parts(inventory, windows, lo, hi, parts)
    merged_grids = None
    if grids is not None:
        merged_grids = merge_grids([p.grids for p in parts if p.grids is not None], grids, lo, hi)
    return biller, stats, merged_grids


def merge_grids(
    parts: list[list[Any]], grids: tuple[int, float], lo: int | None, hi: int | None
) -> list[Any]:
    """The report's grids of several partitions as one: their series side by side (a series
    lives in one partition), their health readings together."""
    gpu, cpu, health = report_grids(grids[0], grids[1], lo, hi)
    for part in parts:
        for into, grid in ((gpu, part[0]), (cpu, part[1])):
            offset = len(into.labels)
            into.labels += grid.labels
            into.details += grid.details
            into.ids.update({label: i + offset for label, i in grid.ids.items()})
            keys, sums = grid.parts.compact()
            if keys[0].size:
                into.parts.keys.append([keys[0] + offset, keys[1]])
                into.parts.sums.append(sums)
                into.parts.rows += int(keys[0].size)
        health.nodes.update(part[2].nodes)
        health.gpus.update(part[2].gpus)
    return [gpu, cpu, health]
