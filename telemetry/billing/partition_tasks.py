"""What one worker of a partitioned bill (SPEC §9) does: a task names some node directories of
the dataset, or one time slice of one node's files, and ``bill_partition`` bills it with the
same engine as one process into int64 partial sums (a ``BillPart``), naming its files in any
error. How tasks are planned: ``partition_plan``; how parts are merged: ``partition_merge``;
the whole: ``partitioned``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kernels import get_namespace
from kernels.backend import release, to_host
from telemetry.billing.engine import BILL_COLUMNS, Biller
from telemetry.billing.inventory import Inventory
from telemetry.billing.windows import Windows, iso
from telemetry.errors import TallyError
from telemetry.schema import SERIES_KEYS
from telemetry.store.dataset import DEFAULT_BUDGET_ROWS, ReadStats, TimeSlice, node_of, scan

# The capacity tables, whose gaps count (SPEC §3: gap_hours)
GAP_TABLES = ("gpu", "cpu")
INT64_MIN = -(2**63)
_NAMED_FILES = 3


class PartitionFailed(RuntimeError):
    """A partition's task failed for a reason that is not bad input (a bug): exit 1. The message
    names the partition's files."""


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
    mig_held: frozenset[tuple[str, str]] = frozenset()  # Biller.mig_held
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
        mig_held=frozenset(biller.mig_held),
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
