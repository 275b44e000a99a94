"""Which files each task of a partitioned bill (SPEC §9) reads: node directories grouped into
tasks of similar bytes, and a node of more than ``SLICE_BYTES`` cut into time slices whose cuts
come from the files' footers.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from telemetry.billing.engine import NS
from telemetry.billing.partition_tasks import BillTask
from telemetry.schema import EARLIEST_NS, LATEST_NS, SchemaError
from telemetry.store.dataset import TimeSlice, node_partitions, time_span
from telemetry.store.layout import JOURNAL_SUFFIX

# A node with more bytes of files than this is billed in time slices of about this many bytes.
SLICE_BYTES = 128 << 20
MAX_SLICES = 1024  # of one node
HOUR_NS = 3600 * NS


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
        # a journal still grows (the current hour): every slice reads it for the rows it owns
        files = tuple(sorted(name for name, span, _ in spans
                             if name.endswith(JOURNAL_SUFFIX)
                             or _reaches(span, low, high, lookback_ns)))  # fmt: skip
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
