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

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernels import get_namespace
from kernels.backend import release, to_host
from kernels.grouped_sums import group_sums, window_index
from telemetry.billing.accounting import Record
from telemetry.billing.bill import finish_bill, with_timezone
from telemetry.billing.engine import BILL_COLUMNS, NS, POOL_FIELDS, Bill, Biller, PartialSums
from telemetry.billing.inventory import Inventory
from telemetry.billing.period import selected_range
from telemetry.billing.windows import Windows, iso
from telemetry.errors import TallyError
from telemetry.executors import cores, run_tasks
from telemetry.schema import EARLIEST_NS, LATEST_NS, SERIES_KEYS, SchemaError
from telemetry.store.dataset import (
    DEFAULT_BUDGET_ROWS,
    ReadStats,
    TimeSlice,
    node_of,
    node_partitions,
    scan,
    time_span,
)

log = logging.getLogger("tally.bill")

# Below this many bytes of files the default (no --workers) bills in this process: starting a
# pool costs more than it saves.
POOL_MIN_BYTES = 64 << 20
# Tasks per worker: enough that a slow partition does not leave the others idle at the end.
TASKS_PER_WORKER = 4
# A node with more bytes of files than this is billed in time slices of about this many bytes.
SLICE_BYTES = 128 << 20
MAX_SLICES = 1024  # of one node
HOUR_NS = 3600 * NS
# The capacity tables, whose gaps count (SPEC §3: gap_hours)
GAP_TABLES = ("gpu", "cpu")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_HALF = 32  # sums are split into 32-bit halves: int64 sums of either half cannot wrap
_NAMED_FILES = 3


class PartitionFailed(RuntimeError):
    """A partition's task failed for a reason that is not bad input (a bug): exit 1. The message
    names the partition's files."""


# ------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class BillTask:
    """What one worker bills: the files of some node directories of the dataset at ``root``, or
    one time slice of one node's."""

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
    # a time slice of the node: ``files`` are those it reads of the ``known`` files of the node
    # when the bill was planned (a file written since is read by every slice)
    time_slice: TimeSlice | None = None
    known: frozenset[str] = frozenset()

    def describe(self) -> str:
        shown = ", ".join(self.files[:_NAMED_FILES])
        more = len(self.files) - _NAMED_FILES
        tail = f", and {more} more" if more > 0 else ""
        what = f"partition of {len(self.files)} files ({shown}{tail})"
        if self.time_slice is not None:
            low, high = self.time_slice.start_ns, self.time_slice.end_ns
            what += (
                f" from {'the first row' if low is None else iso(low)}"
                f" to {'the last row' if high is None else iso(high)}"
            )
        return what

    def order(self) -> tuple[tuple[str, ...], int]:
        """Partitions in the order of their directories, a node's slices in time order."""
        return _order(self.node_dirs, self.time_slice)


def _order(node_dirs: tuple[str, ...], time_slice: TimeSlice | None) -> tuple[tuple[str, ...], int]:
    low = None if time_slice is None else time_slice.start_ns
    return node_dirs, INT64_MIN if low is None else low


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
    time_slice: TimeSlice | None = None
    # a time slice's capacity series: (table, label) -> (first time, last time, carried in)
    ends: dict[tuple[str, tuple[str, ...]], tuple[int, int, bool]] = field(default_factory=dict)

    def order(self) -> tuple[tuple[str, ...], int]:
        return _order(self.node_dirs, self.time_slice)


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


class _SeriesEnds:
    """A time slice's capacity series (gpu, cpu): the first and last time of each in the slice,
    and whether its lookback held a row of it (else its first row opened it here, though an
    earlier slice may hold its previous row: a gap the merge adds)."""

    def __init__(self) -> None:
        self.ends: dict[tuple[str, tuple[str, ...]], tuple[int, int, bool]] = {}
        self.carried: set[tuple[str, tuple[str, ...]]] = set()

    def prime(self, chunk: dict[str, pa.Table]) -> None:
        for name, label, _, _ in self._spans(chunk):
            self.carried.add((name, label))

    def add(self, chunk: dict[str, pa.Table]) -> None:
        for name, label, low, high in self._spans(chunk):
            key = (name, label)
            seen = self.ends.get(key)
            if seen is None:
                self.ends[key] = (low, high, key in self.carried)
            else:
                self.ends[key] = (min(seen[0], low), max(seen[1], high), seen[2])

    @staticmethod
    def _spans(chunk: dict[str, pa.Table]) -> list[tuple[str, tuple[str, ...], int, int]]:
        found = []
        for name in GAP_TABLES:
            table = chunk.get(name)
            if table is None or not table.num_rows:
                continue
            keys = list(SERIES_KEYS[name])
            columns = {}
            for key in keys:
                column = table.column(key)
                if pa.types.is_dictionary(column.type):
                    column = column.cast(pa.string())
                columns[key] = column
            view = pa.table({**columns, "t": table.column("time").cast(pa.int64())})
            spans = view.group_by(keys).aggregate([("t", "min"), ("t", "max")])
            labels = zip(*(spans.column(k).to_pylist() for k in keys), strict=True)
            lows, highs = spans.column("t_min").to_pylist(), spans.column("t_max").to_pylist()
            for label, low, high in zip(labels, lows, highs, strict=True):
                if low is not None:
                    found.append((name, tuple(str(v) for v in label), low, high))
        return found


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
    mine, known = set(task.files), task.known

    def reads(path: Path) -> bool:
        if node_of(root, path) not in wanted:
            return False
        return (
            not known
            or str(path.relative_to(root)) in mine
            or str(path.relative_to(root)) not in known
        )

    def select(files: dict[str, list[Path]]) -> dict[str, list[Path]]:
        return {t: [p for p in paths if reads(p)] for t, paths in files.items()}

    columns: dict[str, tuple[str, ...]] = BILL_COLUMNS

    def fresh() -> list[Any]:
        consumers: list[Any] = [
            Biller(task.inventory, windows, task.start_ns, task.end_ns, xp=xp),
            _NodesSeen(),
            _SeriesEnds(),
        ]
        if task.grids is not None:
            consumers += report_grids(task.grids[0], task.grids[1], task.start_ns, task.end_ns)
        return consumers

    if task.grids is not None:
        from telemetry.billing.report import GRID_COLUMNS

        columns = GRID_COLUMNS
    try:
        consumers, stats = scan(
            root, fresh, task.budget_rows, None, warnings.append, columns, select, task.time_slice
        )
    finally:
        release(xp)
    biller, seen, ends, *grids = consumers
    assert isinstance(biller, Biller) and isinstance(seen, _NodesSeen)
    assert isinstance(ends, _SeriesEnds)
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
        time_slice=task.time_slice,
        ends=ends.ends if task.time_slice is not None else {},
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
    for part in sorted(parts, key=BillPart.order):
        nodes = np.array([biller.nodes.id(v) for v in part.nodes] or [0], dtype=np.int64)
        jobs = np.array([biller.jobs.id(v) for v in part.jobs] or [0], dtype=np.int64)
        if part.pool_keys[0].size:  # a time slice may hold no counted row
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
    for table in GAP_TABLES:
        gaps = [g for g in slice_gaps(parts, start_ns, end_ns) if g.table == table]
        if gaps:
            times = np.array([g.time_ns for g in gaps], np.int64)
            sums = [np.zeros(len(gaps), np.int64) for _ in POOL_FIELDS]
            sums[POOL_FIELDS.index("gap_us")] = _gap_us(gaps)
            pools = biller.pool_ids([g.label[0] for g in gaps], table)
            pool_parts.append(([windows.index(times), pools], sums))
    biller.pool_parts = _as_partial(exact_merge(pool_parts, 2, 6), 2)
    biller.job_parts = _as_partial(exact_merge(job_parts, 4, 4), 4)
    return biller, merge_stats([p.stats for p in sorted(parts, key=BillPart.order)])


@dataclass(frozen=True)
class SliceGap:
    """A gap (SPEC §3) whose rows lie in two time slices of a node further apart than a slice's
    lookback: the slice of its closing row saw that row open its series (nothing added)."""

    table: str
    label: tuple[str, ...]  # the series key (node, gpu_uuid) or (node,)
    time_ns: int  # of the row that closes it
    length_ns: int


def slice_gaps(parts: list[BillPart], start_ns: int | None, end_ns: int | None) -> list[SliceGap]:
    """The gaps between the time slices of each sliced node whose closing row counts (inside
    [start_ns, end_ns), as the biller counts rows)."""
    sliced: dict[tuple[str, ...], list[BillPart]] = {}
    for part in parts:
        if part.time_slice is not None:
            sliced.setdefault(part.node_dirs, []).append(part)
    gaps = []
    for _, slices in sorted(sliced.items()):
        last: dict[tuple[str, tuple[str, ...]], int] = {}
        for part in sorted(slices, key=BillPart.order):
            for key, (first, final, carried) in sorted(part.ends.items()):
                before = last.get(key)
                counted = (start_ns is None or first >= start_ns) and (
                    end_ns is None or first < end_ns
                )
                if before is not None and not carried and counted:
                    gaps.append(SliceGap(key[0], key[1], first, first - before))
                last[key] = final
    return gaps


def _gap_us(gaps: list[SliceGap]) -> np.ndarray:
    """Each gap's length in µs, rounded as the engine rounds it (``kernels.integrate.gap_us``)."""
    lengths = np.array([g.length_ns for g in gaps], np.int64)
    return np.asarray(np.rint(lengths / 1000.0).astype(np.int64))


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
class MakeTask(Protocol):
    def __call__(
        self,
        node_dirs: tuple[str, ...],
        files: tuple[str, ...],
        time_slice: TimeSlice | None = None,
        known: frozenset[str] = frozenset(),
    ) -> BillTask: ...


def plan_tasks(
    root: Path, tasks_wanted: int, make: MakeTask, lookback_ns: int = 0
) -> tuple[list[BillTask], int]:
    """The dataset's node directories grouped into about ``tasks_wanted`` tasks of similar size
    (bytes of files; largest first onto the lightest task), a node of more than ``SLICE_BYTES``
    cut into time slices of a task each (``lookback_ns``: the max gap), and the dataset's
    bytes."""
    partitions = node_partitions(root)
    sized = []
    total = 0
    tasks = []
    for node_dir, by_table in partitions.items():
        paths = sorted(p for table_files in by_table.values() for p in table_files)
        size = sum(_size(p) for p in paths)
        total += size
        names = tuple(str(p.relative_to(root)) for p in paths)
        slices = time_slices(root, by_table, size, lookback_ns) if size > SLICE_BYTES else []
        if slices:
            known = frozenset(names)
            tasks += [make((node_dir,), files, cut, known) for cut, files in slices]
            continue
        sized.append((size, node_dir, names))
    sized.sort(key=lambda s: (-s[0], s[1]))
    groups: list[tuple[int, list[str], list[str]]] = [
        (0, [], []) for _ in range(max(1, min(tasks_wanted, len(sized))))
    ]
    for size, node_dir, names in sized:
        lightest = min(range(len(groups)), key=lambda g: (groups[g][0], g))
        weight, dirs, files = groups[lightest]
        groups[lightest] = (weight + size, [*dirs, node_dir], [*files, *names])
    tasks += [make(tuple(sorted(d)), tuple(sorted(f))) for _, d, f in groups if d]
    return sorted(tasks, key=BillTask.order), total


def time_slices(
    root: Path, by_table: dict[str, list[Path]], size: int, lookback_ns: int
) -> list[tuple[TimeSlice, tuple[str, ...]]]:
    """One node's files cut into time slices of about ``SLICE_BYTES`` each, with the files each
    slice reads (those reaching into it or into the lookback before it; a file without rows:
    the first slice). Empty where the node is better billed whole: a file whose footer cannot
    be read (its task sets it aside as one process would) or rows all at one instant."""
    spans: list[tuple[str, tuple[int, int] | None, int]] = []
    for table, paths in by_table.items():
        for path in paths:
            try:
                span = time_span(path, table)
            except (SchemaError, pa.ArrowException, OSError):
                return []
            spans.append((str(path.relative_to(root)), span, _size(path)))
    wanted = min(MAX_SLICES, -(-size // max(1, SLICE_BYTES)))
    cuts = slice_cuts([(*span, weight) for _, span, weight in spans if span], wanted)
    if not cuts:
        return []
    edges: list[int | None] = [None, *cuts, None]
    out = []
    for low, high in itertools.pairwise(edges):
        files = tuple(sorted(name for name, span, _ in spans
                             if _reaches(span, low, high, lookback_ns)))  # fmt: skip
        out.append((TimeSlice(low, high, lookback_ns), files))
    return out


def _reaches(span: tuple[int, int] | None, low: int | None, high: int | None, back: int) -> bool:
    if span is None:
        return low is None
    first, last = span
    return (low is None or last >= low - back) and (high is None or first < high)


def slice_cuts(spans: list[tuple[int, int, int]], slices: int) -> list[int]:
    """Times (ns) that cut files of (first time, last time, bytes) into ``slices`` parts of
    about equal bytes, each file's bytes spread evenly over its span (impossible times left
    out); on the nearest whole hours where that keeps them distinct (a daemon's hourly files
    then stay whole). Sorted, distinct, inside the files' span; empty for fewer than two
    parts."""
    kept = [(max(a, EARLIEST_NS), min(b, LATEST_NS), w) for a, b, w in spans]
    kept = [(a, b, w) for a, b, w in kept if a <= b]
    if slices < 2 or not kept:
        return []
    low = np.array([a for a, _, _ in kept], np.int64)
    high = np.array([b for _, b, _ in kept], np.int64) + 1
    weight = np.array([max(1, w) for _, _, w in kept], np.float64)
    first, end = int(low.min()), int(high.max())
    if end - first < 2:
        return []
    # the bytes before time t: piecewise linear between the files' ends
    rate = weight / (high - low).astype(np.float64)
    points = np.concatenate([low, high])
    steps = np.concatenate([rate, -rate])
    order = np.argsort(points, kind="stable")
    points, steps = points[order], steps[order]
    slope = np.cumsum(steps)
    below = np.concatenate([[0.0], np.cumsum(slope[:-1] * np.diff(points).astype(np.float64))])
    targets = weight.sum() * np.arange(1, slices) / slices
    at = np.clip(np.searchsorted(below, targets, side="right") - 1, 0, points.size - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.where(slope[at] > 0, (targets - below[at]) / slope[at], 0.0)
    cuts = sorted({int(c) for c in points[at] + np.floor(step).astype(np.int64)})
    hours = sorted({(c + HOUR_NS // 2) // HOUR_NS * HOUR_NS for c in cuts})
    if len(hours) == len(cuts):  # whole hours, where no two slices become one
        cuts = hours
    return [c for c in cuts if first < c < end]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _billed_again(parts: list[BillPart]) -> list[tuple[set[int], str]]:
    """Groups (indexes) of parts to bill again as one, whole, and why: parts of different
    directories that share a node, transitively; a sliced node one of whose slices set a file
    aside while it read."""
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
    return sorted(again, key=lambda g: min(g[0]))


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
    groups = _billed_again(parts)
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


def merge_grids(
    parts: list[BillPart], grids: tuple[int, float], lo: int | None, hi: int | None
) -> list[Any]:
    """The report's grids of several partitions as one: each series' sums added over the
    partitions holding it (a node's time slices; its details from the first), the gaps between
    slices added, their health readings together."""
    gpu, cpu, health = report_grids(grids[0], grids[1], lo, hi)
    for part in sorted(parts, key=BillPart.order):
        if part.grids is None:
            continue
        for into, grid in ((gpu, part.grids[0]), (cpu, part.grids[1])):
            ids = [_grid_row(into, label, grid.details[i]) for i, label in enumerate(grid.labels)]
            rows = np.array(ids or [0], dtype=np.int64)
            keys, sums = grid.parts.compact()
            if keys[0].size:
                into.parts.keys.append([rows[keys[0]], keys[1]])
                into.parts.sums.append(sums)
                into.parts.rows += int(keys[0].size)
        _merge_health(health, part.grids[2])
    from telemetry.billing.report import GRID_FIELDS

    for gap in slice_gaps(parts, lo, hi):
        into = gpu if gap.table == "gpu" else cpu
        sums = [np.zeros(1, np.int64) for _ in GRID_FIELDS]
        sums[GRID_FIELDS.index("gap_us")] = _gap_us([gap])
        at = np.array([gap.time_ns], np.int64)
        into.parts.keys.append([np.array([into.ids[gap.label]]), window_index(at, into.window_ns)])
        into.parts.sums.append(sums)
        into.parts.rows += 1
    return [gpu, cpu, health]


def _grid_row(grid: Any, label: tuple[str, ...], detail: dict[str, Any]) -> int:
    found: int | None = grid.ids.get(label)
    if found is None:
        found = grid.ids[label] = len(grid.labels)
        grid.labels.append(label)
        grid.details.append(detail)
    return found


def _merge_health(into: Any, part: Any) -> None:
    """A partition's HealthGrid added to ``into`` (a node's time slices share nodes, windows and
    GPUs)."""
    for key, (power, samples, hottest) in part.nodes.items():
        mine = into.nodes.setdefault(key, [0.0, 0, float("nan")])
        mine[0] += power
        mine[1] += samples
        if not np.isnan(hottest) and not hottest <= mine[2]:  # NaN: no reading
            mine[2] = hottest
    for key, gpu in part.gpus.items():
        mine = into.gpus.get(key)
        if mine is None:
            into.gpus[key] = gpu
            continue
        mine.samples += gpu.samples
        mine.throttled += gpu.throttled
        mine.power_sum += gpu.power_sum
        mine.power_samples += gpu.power_samples
        if gpu.temperature_max is not None and (
            mine.temperature_max is None or gpu.temperature_max > mine.temperature_max
        ):
            mine.temperature_max = gpu.temperature_max
        for column, (low, high) in gpu.counters.items():
            old = mine.counters.get(column)
            mine.counters[column] = (
                (low, high) if old is None else (min(old[0], low), max(old[1], high))
            )
