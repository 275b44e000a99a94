"""Trailing time-weighted windows over many series at once (SPEC §6 ``*_avg_ratio{window}``)."""

from __future__ import annotations

from typing import Any

from kernels.backend import array_namespace
from kernels.series import segment_bounds


def window_start_index(
    times_sorted: Any, row_start: Any, at: Any, window_ns: int, codes_sorted: Any = None
) -> Any:
    """For each row index in ``at``, the first row of its series with time > t_at - window.

    Rows must be sorted by (series, time). One ``searchsorted`` over a packed (series, time)
    key where it fits in int64, else a vectorised bisection; no Python loop over rows.
    """
    xp = array_namespace(times_sorted, row_start, at)
    fast = _window_start_by_key(xp, times_sorted, row_start, at, window_ns, codes_sorted)
    if fast is not None:
        return fast
    return window_start_bisect(times_sorted, row_start, at, window_ns)


def window_start_bisect(times_sorted: Any, row_start: Any, at: Any, window_ns: int) -> Any:
    """``window_start_index`` by a vectorised bisection over each row's series (any times)."""
    xp = array_namespace(times_sorted, row_start, at)
    # t_at > target always holds, so the answer is in [row start, at]
    return first_after(
        times_sorted, row_start[at], at.astype(xp.int64), times_sorted[at] - window_ns
    )


def first_after(values_sorted: Any, lo: Any, hi: Any, target: Any) -> Any:
    """Per query, the first index in [``lo``, ``hi``) whose value is > ``target``, else ``hi``:
    one vectorised bisection over runs of ``values_sorted`` that are each ascending."""
    xp = array_namespace(values_sorted, lo, hi)
    lo, hi = lo.astype(xp.int64), hi.astype(xp.int64)
    last = max(int(values_sorted.shape[0]) - 1, 0)
    while True:
        active = lo < hi
        if not bool(active.any()):
            return lo
        mid = (lo + hi) // 2
        later = values_sorted[xp.minimum(mid, last)] > target
        hi = xp.where(active & later, mid, hi)
        lo = xp.where(active & ~later, mid + 1, lo)


def _window_start_by_key(
    xp: Any, times_sorted: Any, row_start: Any, at: Any, window_ns: int, codes_sorted: Any = None
) -> Any | None:
    """One sorted search over (series rank, time) packed into an int64, when it fits.

    Rows sorted by (series, time) are sorted by ``rank · K + (t − t_min)`` with K larger than
    any time offset plus the window, so each row's window start is a single ``searchsorted``
    (binary search in compiled code, CUB on a GPU); clamped to the row's own series. None when
    the packed key would overflow (then the bisection runs instead).
    """
    n = times_sorted.shape[0]
    if n == 0:
        return xp.zeros(0, dtype=xp.int64)
    t_min = int(times_sorted.min())
    span = int(times_sorted.max()) - t_min + int(window_ns) + 1
    if codes_sorted is not None:
        rank = codes_sorted.astype(xp.int64) - int(codes_sorted[0])  # monotone in the series
    else:
        opens = xp.zeros(n, dtype=xp.int64)
        opens[row_start] = 1
        rank = xp.cumsum(opens) - 1
    if (int(rank[-1]) + 1) * span >= 2**62:
        return None
    key = rank * span + (times_sorted - t_min)
    first = xp.searchsorted(key, key[at] - window_ns, side="right")
    return xp.maximum(first, row_start[at]).astype(xp.int64)


def trailing_sums(
    codes_sorted: Any, times_sorted: Any, values: list[Any], window_ns: int, at: Any | None = None
) -> list[Any]:
    """Sums of each array in ``values`` over the rows of the same series with t in (t_at - W, t_at].

    Each row's value stands for the interval that ends at that row, so a window holds the
    intervals whose end lies inside it. Integer inputs give exact integer sums. ``at`` selects the
    rows to evaluate (default: every row).
    """
    xp = array_namespace(codes_sorted, times_sorted, *values)
    n = times_sorted.shape[0]
    if at is None:
        at = xp.arange(n, dtype=xp.int64)
    if n == 0:
        return [xp.zeros(0, dtype=v.dtype) for v in values]
    _, row_start = segment_bounds(codes_sorted)
    first = window_start_index(times_sorted, row_start, at, window_ns, codes_sorted)
    sums = []
    for v in values:
        csum = xp.concatenate([xp.zeros(1, dtype=v.dtype), xp.cumsum(v)])
        sums.append(csum[at + 1] - csum[first])
    return sums


def trailing_ratio(
    codes_sorted: Any,
    times_sorted: Any,
    numerator: Any,
    denominator: Any,
    window_ns: int,
    at: Any | None = None,
) -> Any:
    """Time-weighted mean Σnum / Σden over each trailing window; NaN where Σden is 0."""
    num, den = trailing_sums(codes_sorted, times_sorted, [numerator, denominator], window_ns, at)
    return ratio_of_sums(num, den)


def ratio_of_sums(num: Any, den: Any) -> Any:
    """``num / den`` as float64, NaN where ``den`` is 0: the one division every trailing ratio
    makes, so equal integer sums give equal bits wherever they were summed."""
    xp = array_namespace(num, den)
    safe = xp.where(den > 0, den, 1)
    return xp.where(den > 0, num.astype(xp.float64) / safe, xp.nan)
