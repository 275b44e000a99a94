"""The partial bills of a partitioned bill (SPEC §9) merged into what one process would hold:
registry ids mapped back to strings, int64 sums added with no wrap (``exact_merge``), each job's
newest owner, the gaps between a node's time slices, a report's grids and health readings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.grouped_sums import group_sums, window_index
from telemetry.billing.engine import POOL_FIELDS, Biller, PartialSums
from telemetry.billing.inventory import Inventory
from telemetry.billing.partition_tasks import GAP_TABLES, BillPart, report_grids
from telemetry.billing.windows import Windows
from telemetry.errors import TallyError
from telemetry.store.dataset import ReadStats

_HALF = 32  # sums are split into 32-bit halves: int64 sums of either half cannot wrap


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
        biller.mig_held |= part.mig_held
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
