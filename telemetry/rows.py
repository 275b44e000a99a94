"""From Arrow sample tables to kernel inputs: series codes and SPEC §3 contributions.

Shared by the live state (daemon, replay) and the bill engine, so both integrate the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import kernels
from kernels.backend import to_backend, to_host
from telemetry.schema import CPU_BUSY_MODES, SERIES_KEYS


def dictionary_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str]]:
    """Per row the index of its value in a list of distinct values (null → -1), and that list.

    A dictionary-encoded column keeps its codes: the chunks' dictionaries are unified, and only
    when the result repeats a value (legal in a Parquet dictionary page, so possible in a hostile
    file) are the strings encoded afresh, so equal values always share one code.
    """
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if pa.types.is_dictionary(column.type):
        unified = column.unify_dictionaries()
        dictionary = (
            unified.chunk(0).dictionary if unified.num_chunks else pa.array([], pa.string())
        )
        if len(pc.unique(dictionary)) != len(dictionary):
            return dictionary_codes(column.cast(column.type.value_type))
        encoded = unified
    else:
        encoded = pc.dictionary_encode(column)
        combined = encoded.combine_chunks() if encoded.num_chunks != 1 else encoded.chunk(0)
        dictionary = combined.dictionary
        encoded = pa.chunked_array([combined])
    indices = [chunk.indices for chunk in encoded.chunks]
    codes = (
        np.concatenate(
            [np.asarray(pc.fill_null(i, -1).to_numpy(zero_copy_only=False), np.int64)
             for i in indices]
        )
        if indices
        else np.zeros(0, np.int64)
    )  # fmt: skip
    return codes, [str(v) for v in dictionary.to_pylist()]


def series_codes(table: pa.Table, name: str) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Integer code per row for the table's series key, and the key tuple of each code.

    Each key column is dictionary-encoded on its own and the codes combined, so no value of a
    key (whatever characters it holds) can make two series collide.
    """
    combined = np.zeros(table.num_rows, dtype=np.int64)
    dictionaries: list[list[str]] = []
    for key in SERIES_KEYS[name]:
        codes, dictionary = dictionary_codes(table.column(key))
        dictionaries.append(dictionary)
        combined = combined * max(1, len(dictionary)) + codes
    space = 1
    for dictionary in dictionaries:
        space *= max(1, len(dictionary))
    if space <= max(1 << 16, 4 * table.num_rows):
        # Few possible keys (a node's GPUs, a cluster's jobs): rank them by a presence table, the
        # same sorted codes np.unique gives, without sorting every row.
        present = np.zeros(space, dtype=bool)
        present[combined] = True
        unique = np.nonzero(present)[0]
        rank = np.cumsum(present) - 1
        inverse = rank[combined]
    else:
        unique, inverse = np.unique(combined, return_inverse=True)
    labels = []
    for code in unique.tolist():
        parts, rest = [], code
        for dictionary in reversed(dictionaries):
            rest, index = divmod(rest, len(dictionary))
            parts.append(dictionary[index])
        labels.append(tuple(reversed(parts)))
    return inverse.astype(np.int64), labels


def float_column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with nulls as NaN."""
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


class SortedRows:
    """The rows of ``source`` in ``order`` without moving every column: numeric columns are
    gathered as arrays of ``xp`` (each copied to the device once), the reordered Arrow table is
    built only when asked for. ``order`` lives in ``xp`` too."""

    def __init__(self, source: pa.Table, order: Any = None, xp: ModuleType = np) -> None:
        self.source = source
        self.order = order
        self.xp = xp

    @cached_property
    def host_order(self) -> np.ndarray | None:
        """``order`` as a NumPy array (copied from the device once, when Arrow needs it)."""
        return None if self.order is None else to_host(self.order)

    def float(self, name: str) -> Any:
        """Column ``name`` as float64 in row order, nulls as NaN."""
        return self.gather(float_column(self.source, name))

    def gather(self, values: np.ndarray) -> Any:
        """Host ``values`` of the source's rows, in row order, on the backend."""
        values = to_backend(self.xp, values)
        return values if self.order is None else values[self.order]

    def take(self, rows: Any) -> pa.Table:
        """The rows at positions ``rows`` (of the sorted order), every column."""
        rows = to_host(rows)
        picked = rows if self.host_order is None else self.host_order[rows]
        return self.source.take(pa.array(picked))

    @cached_property
    def table(self) -> pa.Table:
        """Every column, reordered (one Arrow ``take`` of the whole table, on first use)."""
        order = self.host_order
        return self.source if order is None else self.source.take(pa.array(order))


def contributions(rows: SortedRows, name: str, iv: kernels.Intervals) -> dict[str, np.ndarray]:
    """SPEC §3 per-row integer contributions of sorted, de-duplicated rows."""
    if name == "gpu":
        units = (
            rows.float("capacity_units") if "capacity_units" in rows.source.column_names else None
        )
        return kernels.gpu_contributions(
            iv,
            rows.float("utilization_ratio"),
            rows.float("energy_joules"),
            rows.float("power_watts"),
            units,
        )
    if name == "cpu":
        busy = sum(float_column(rows.source, f"{mode}_seconds") for mode in CPU_BUSY_MODES)
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


def canonical_duplicates(table: pa.Table, order: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``order`` with each run of duplicates (same series and time) led by a canonical row.

    Rows that share a series and a time but differ elsewhere would otherwise be chosen by read
    order, and the bill would depend on how rows were split into files. The run's rows are
    sorted by every column and the first is kept, whatever order they arrived in.
    """
    n = keep.size
    in_run = ~keep.copy()
    in_run[:-1] |= ~keep[1:]  # the first row of a run is followed by a dropped one
    positions = np.nonzero(in_run)[0]
    run_id = np.cumsum(keep)[positions]
    subset = table.take(pa.array(order[positions]))
    for i, field in enumerate(subset.schema):  # Arrow sorts strings, not dictionary codes
        if pa.types.is_dictionary(field.type):
            subset = subset.set_column(i, field.name, subset.column(i).cast(field.type.value_type))
    subset = subset.append_column("__run", pa.array(run_id))
    keys = [("__run", "ascending")] + [(name, "ascending") for name in table.column_names]
    ranked = pc.sort_indices(subset, sort_keys=keys).to_numpy()  # nulls sort last
    first_of_run = np.ones(ranked.size, dtype=bool)
    first_of_run[1:] = run_id[ranked][1:] != run_id[ranked][:-1]
    leaders = ranked[first_of_run]
    result = order.copy()
    lead_positions = positions[np.nonzero(keep[positions])[0]]
    result[lead_positions] = order[positions[leaders]]
    assert lead_positions.size == leaders.size <= n
    return result


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
    def table(self) -> pa.Table:
        """The merged rows as one Arrow table in (series, time) order."""
        return self.rows.table


def merge_rows(
    earlier: pa.Table,
    new: pa.Table,
    name: str,
    max_gap_ns: int,
    *,
    canonical: bool,
    drop_late: bool,
    xp: ModuleType = np,
) -> MergedRows:
    """Merge ``new`` rows after ``earlier`` ones (which open the intervals of new rows).

    Of duplicates the earlier row wins, and among new rows the first read, or with
    ``canonical`` the first by every column (independent of read order). With ``drop_late``,
    new rows older than their series' newest earlier row are dropped.

    With ``xp`` CuPy, the series codes, times and numeric columns are copied to the GPU once and
    ordering, de-duplication, intervals and contributions run there; ``codes``, ``times``,
    ``is_new`` and ``parts`` of the result are device arrays. Arrow work (string keys, the rare
    canonical choice among conflicting duplicates, late rows) stays on the host.
    """
    if earlier.num_rows and earlier.schema != new.schema:  # plain strings in one, codes in other
        earlier = earlier.cast(new.schema)
    combined = pa.concat_tables([earlier, new]) if earlier.num_rows else new
    host_codes, labels = series_codes(combined, name)
    host_times = combined.column("time").cast(pa.int64()).to_numpy()
    codes, times = to_backend(xp, host_codes), to_backend(xp, host_times)  # one copy each
    is_new = xp.ones(combined.num_rows, dtype=bool)
    is_new[: earlier.num_rows] = False
    order = kernels.series_order(codes, times)
    codes, times, is_new = codes[order], times[order], is_new[order]
    keep = kernels.dedup_mask(codes, times)
    duplicates = int(xp.count_nonzero(~keep & is_new))
    if canonical and not bool(keep.all()):
        order = to_backend(xp, canonical_duplicates(combined, to_host(order), to_host(keep)))
    late = 0
    if drop_late:
        is_late = to_backend(
            xp, _late_rows(to_host(codes), to_host(times), to_host(is_new), len(labels))
        )
        is_late &= keep
        late = int(xp.count_nonzero(is_late))
        keep &= ~is_late
    order, codes, times, is_new = order[keep], codes[keep], times[keep], is_new[keep]
    rows = SortedRows(combined, order, xp)
    iv = kernels.intervals(codes, times, max_gap_ns)
    return MergedRows(
        rows, codes, labels, times, is_new, contributions(rows, name, iv), duplicates, late, iv
    )


def last_of_series(earlier: pa.Table, new: pa.Table, name: str) -> pa.Table:
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
