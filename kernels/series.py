"""Ordering, de-duplication and interval boundaries of many time series held in flat arrays.

A series is identified by an integer code per row; times are int64 nanoseconds since the epoch.
Every function works on NumPy or CuPy arrays alike (the namespace is derived from the inputs)
and loops over nothing but a logarithmic number of vector steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kernels.backend import array_namespace


def series_order(codes: Any, times: Any) -> Any:
    """Indices that sort rows by (series code, time), stable for equal keys.

    Codes and times are packed into one int64 key and sorted once when it fits (a stable sort
    finds the runs that files written in time order already have); else a two-key lexsort.
    """
    xp = array_namespace(codes, times)
    n = codes.shape[0]
    if n == 0:
        return xp.zeros(0, dtype=xp.int64)
    t_min, c_min = int(times.min()), int(codes.min())
    span = int(times.max()) - t_min + 1
    if (int(codes.max()) - c_min + 1) * span < 2**62:
        key = (codes.astype(xp.int64) - c_min) * span + (times - t_min)
        return xp.argsort(key, kind="stable")
    return xp.lexsort(xp.stack([times, codes]))


def first_of_runs(*keys: Any) -> Any:
    """Boolean mask, True where a row's keys differ from the previous row's (row 0 is True)."""
    xp = array_namespace(*keys)
    n = keys[0].shape[0]
    mask = xp.ones(n, dtype=bool)
    if n > 1:
        differs = xp.zeros(n - 1, dtype=bool)
        for key in keys:
            differs |= key[1:] != key[:-1]
        mask[1:] = differs
    return mask


def dedup_mask(codes_sorted: Any, times_sorted: Any) -> Any:
    """Mask keeping the first row of each (series, time) run of sorted rows (SPEC §3)."""
    return first_of_runs(codes_sorted, times_sorted)


@dataclass(frozen=True)
class Intervals:
    """Per-row interval (t_{i-1}, t_i] of sorted, de-duplicated rows.

    ``dt_ns`` is the interval length (0 on a series' first row), ``opens`` marks first rows,
    ``gap`` marks intervals longer than the gap limit, ``valid`` the intervals that count.
    """

    dt_ns: Any
    opens: Any
    gap: Any
    valid: Any


def intervals(codes_sorted: Any, times_sorted: Any, max_gap_ns: int) -> Intervals:
    """Interval lengths and validity for rows sorted by (series, time) without duplicates."""
    xp = array_namespace(codes_sorted, times_sorted)
    opens = first_of_runs(codes_sorted)
    dt = xp.zeros(times_sorted.shape[0], dtype=xp.int64)
    if dt.shape[0] > 1:
        dt[1:] = times_sorted[1:] - times_sorted[:-1]
    dt = xp.where(opens, 0, dt)
    gap = (~opens) & (dt > max_gap_ns)
    valid = (~opens) & (~gap)
    return Intervals(dt_ns=dt, opens=opens, gap=gap, valid=valid)


def counter_delta(values: Any, opens: Any) -> Any:
    """Counter increase per row: x_i - x_{i-1}, or x_i where the counter went backwards (restart).

    A series' first row gives NaN (nothing to compare with); a null (NaN) reading on either side
    gives NaN. Result is float64.
    """
    xp = array_namespace(values, opens)
    x = values.astype(xp.float64, copy=False)
    d = xp.full(x.shape[0], xp.nan, dtype=xp.float64)
    if x.shape[0] > 1:
        step = x[1:] - x[:-1]
        d[1:] = xp.where(step < 0, x[1:], step)
    return xp.where(opens, xp.nan, d)


def segment_bounds(codes_sorted: Any) -> tuple[Any, Any]:
    """Start index of each series' run of rows and, per row, the start index of its series."""
    xp = array_namespace(codes_sorted)
    opens = first_of_runs(codes_sorted)
    starts = xp.nonzero(opens)[0]
    row_start = starts[xp.cumsum(opens) - 1] if codes_sorted.shape[0] else starts
    return starts, row_start


def segment_sum(values: Any, starts: Any) -> Any:
    """Sum of ``values`` over each run beginning at ``starts`` (exact for integers)."""
    xp = array_namespace(values, starts)
    if starts.shape[0] == 0:
        return xp.zeros(0, dtype=values.dtype)
    csum = xp.concatenate([xp.zeros(1, dtype=values.dtype), xp.cumsum(values)])
    ends = xp.concatenate([starts[1:], xp.asarray([values.shape[0]], dtype=starts.dtype)])
    return csum[ends] - csum[starts]


def last_rows(codes_sorted: Any) -> Any:
    """Index of the last row of each series in rows sorted by series."""
    xp = array_namespace(codes_sorted)
    n = codes_sorted.shape[0]
    if n == 0:
        return xp.zeros(0, dtype=xp.int64)
    ends = xp.ones(n, dtype=bool)
    ends[:-1] = codes_sorted[1:] != codes_sorted[:-1]
    return xp.nonzero(ends)[0]
