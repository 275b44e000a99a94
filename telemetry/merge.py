"""Merging sample rows by series and time, and their SPEC §3 contributions.

Shared by the live state (daemon, replay) and the bill engine, so both integrate the same way.
Rows come as Arrow tables (readers, bills) or as :class:`~telemetry.frame.Frame` (the node
daemon, which never loads Arrow); both are read through the small :class:`Rows` interface, and
everything past it is NumPy (or CuPy) kernels on whole columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

import kernels
from kernels.backend import to_backend, to_host
from telemetry.frame import Frame
from telemetry.tables import CPU_BUSY_MODES

if TYPE_CHECKING:
    import pyarrow as pa

# A table of sample rows: Arrow (readers and bills) or a Frame (the daemon).
Table: TypeAlias = "pa.Table | Frame"


class Rows(Protocol):
    """What the merge reads of a table of rows."""

    num_rows: int

    def has(self, column: str) -> bool: ...

    def times(self) -> np.ndarray: ...

    def floats(self, column: str) -> np.ndarray: ...

    def series_codes(self) -> tuple[np.ndarray, list[tuple[str, ...]]]: ...

    def take(self, rows: np.ndarray) -> Any: ...


def as_rows(table: Table, name: str) -> Rows:
    """``table`` read through :class:`Rows` (Arrow is imported only for an Arrow table)."""
    if isinstance(table, Frame):
        return table
    from telemetry.rows import ArrowRows

    return ArrowRows(table, name)


def concat(earlier: Table, new: Table) -> Table:
    """``earlier`` rows followed by ``new`` ones, of one kind (or ``earlier`` empty)."""
    if not earlier.num_rows:
        return new
    if isinstance(new, Frame):
        assert isinstance(earlier, Frame)
        return Frame.concat([earlier, new])
    from telemetry.rows import concat_arrow

    return concat_arrow(earlier, new)


class SortedRows:
    """The rows of ``source`` in ``order`` without moving every column: numeric columns are
    gathered as arrays of ``xp`` (each copied to the device once), the reordered table is built
    only when asked for. ``order`` lives in ``xp`` too."""

    def __init__(self, source: Table, name: str, order: Any = None, xp: ModuleType = np) -> None:
        self.source = source
        self.reader = as_rows(source, name)
        self.order = order
        self.xp = xp

    @cached_property
    def host_order(self) -> np.ndarray | None:
        """``order`` as a NumPy array (copied from the device once, when a take needs it)."""
        return None if self.order is None else to_host(self.order)

    @property
    def arrow(self) -> pa.Table:
        """The source as the Arrow table it is where bills read it."""
        assert not isinstance(self.source, Frame), "bills read Arrow tables"
        return self.source

    def float(self, name: str) -> Any:
        """Column ``name`` as float64 in row order, nulls as NaN."""
        return self.gather(self.reader.floats(name))

    def gather(self, values: np.ndarray) -> Any:
        """Host ``values`` of the source's rows, in row order, on the backend."""
        values = to_backend(self.xp, values)
        return values if self.order is None else values[self.order]

    def take(self, rows: Any) -> Any:
        """The rows at positions ``rows`` (of the sorted order), every column."""
        rows = to_host(rows)
        picked = rows if self.host_order is None else self.host_order[rows]
        return self.reader.take(picked)

    @cached_property
    def table(self) -> Any:
        """Every column, reordered (one take of the whole table, on first use)."""
        order = self.host_order
        return self.source if order is None else self.reader.take(order)


def contributions(rows: SortedRows, name: str, iv: kernels.Intervals) -> dict[str, np.ndarray]:
    """SPEC §3 per-row integer contributions of sorted, de-duplicated rows."""
    if name == "gpu":
        units = rows.float("capacity_units") if rows.reader.has("capacity_units") else None
        return kernels.gpu_contributions(
            iv,
            rows.float("utilization_ratio"),
            rows.float("energy_joules"),
            rows.float("power_watts"),
            units,
        )
    if name == "cpu":
        busy = sum(rows.reader.floats(f"{mode}_seconds") for mode in CPU_BUSY_MODES)
        return kernels.cpu_contributions(
            iv,
            rows.float("cpus"),
            rows.gather(np.asarray(busy, dtype=np.float64)),
            rows.float("energy_joules"),
        )
    if name == "gpu_job":
        return {"share_us": kernels.share_contributions(iv, rows.float("share"))}
    return kernels.job_contributions(
        iv,
        rows.float("cpus_allocated"),
        rows.float("gpus_allocated"),
        rows.float("cpu_seconds"),
    )


@dataclass
class MergedRows:
    """Earlier rows and new rows of one table, sorted by (series, time) and de-duplicated, with
    each row's interval and SPEC §3 contributions. ``is_new`` marks the rows of ``new``;
    ``duplicates`` and ``late`` count new rows dropped."""

    rows: SortedRows
    codes: np.ndarray
    labels: list[tuple[str, ...]]
    times: np.ndarray
    is_new: np.ndarray
    parts: dict[str, np.ndarray]
    duplicates: int
    late: int
    intervals: kernels.Intervals

    @property
    def table(self) -> Any:
        """The merged rows as one table (of the input's kind) in (series, time) order."""
        return self.rows.table


def merge_rows(
    earlier: Table,
    new: Table,
    name: str,
    max_gap_ns: int,
    *,
    canonical: bool,
    drop_late: bool,
    xp: ModuleType = np,
    series: tuple[np.ndarray, list[tuple[str, ...]]] | None = None,
) -> MergedRows:
    """Merge ``new`` rows after ``earlier`` ones (which open the intervals of new rows).

    Of duplicates the earlier row wins, and among new rows the first read, or with
    ``canonical`` the first by every column (independent of read order; Arrow tables only). With
    ``drop_late``, new rows older than their series' newest earlier row are dropped.

    With ``xp`` CuPy, the series codes, times and numeric columns are copied to the GPU once and
    ordering, de-duplication, intervals and contributions run there; ``codes``, ``times``,
    ``is_new`` and ``parts`` of the result are device arrays. String keys, the rare canonical
    choice among conflicting duplicates and late rows stay on the host.

    ``series``: the series codes and keys of ``earlier`` then ``new`` rows where the caller has
    them (as :meth:`Rows.series_codes` of the two together gives them, codes in any order).
    """
    combined = concat(earlier, new)
    reader = as_rows(combined, name)
    host_codes, labels = reader.series_codes() if series is None else series
    host_times = reader.times()
    codes, times = to_backend(xp, host_codes), to_backend(xp, host_times)  # one copy each
    is_new = xp.ones(combined.num_rows, dtype=bool)
    is_new[: earlier.num_rows] = False
    order = kernels.series_order(codes, times)
    codes, times, is_new = codes[order], times[order], is_new[order]
    keep = kernels.dedup_mask(codes, times)
    duplicates = int(xp.count_nonzero(~keep & is_new))
    if canonical and not bool(keep.all()):
        canonical_order = getattr(reader, "canonical_order", None)
        if canonical_order is None:
            raise TypeError("a canonical merge needs Arrow tables")
        order = to_backend(xp, canonical_order(to_host(order), to_host(keep)))
    late = 0
    if drop_late:
        is_late = to_backend(
            xp, _late_rows(to_host(codes), to_host(times), to_host(is_new), len(labels))
        )
        is_late &= keep
        late = int(xp.count_nonzero(is_late))
        keep &= ~is_late
    order, codes, times, is_new = order[keep], codes[keep], times[keep], is_new[keep]
    rows = SortedRows(combined, name, order, xp)
    iv = kernels.intervals(codes, times, max_gap_ns)
    return MergedRows(
        rows, codes, labels, times, is_new, contributions(rows, name, iv), duplicates, late, iv
    )


def last_of_series(earlier: Table, new: Table, name: str) -> Any:
    """Each series' last row among ``earlier`` and ``new`` (of duplicates the canonical one, as
    ``merge_rows`` keeps it): what a reader carries into its next chunk."""
    merged = merge_rows(earlier, new, name, 0, canonical=True, drop_late=False)
    return merged.rows.take(kernels.last_rows(merged.codes))


def _late_rows(codes: np.ndarray, times: np.ndarray, is_new: np.ndarray, series: int) -> np.ndarray:
    """New rows older than their series' newest earlier row (rows sorted by series, time)."""
    newest_earlier = np.full(series, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(newest_earlier, codes[~is_new], times[~is_new])
    late: np.ndarray = is_new & (times < newest_earlier[codes])
    return late
