"""Exact grouped sums for bills: int64 totals per group key, on NumPy or CuPy.

Where the key space is small (windows × pools × jobs of one chunk), each group is a bin of a
``bincount`` whose float64 partial sums provably stay exact; otherwise groups are formed by
sorting a packed key (CUB radix sorts on a GPU) and summing each run with int64 cumulative sums.
Either way every total is exact and independent of the input's order.
"""

from __future__ import annotations

from typing import Any

from kernels.backend import array_namespace
from kernels.series import first_of_runs, segment_sum


def window_index(times_ns: Any, window_ns: int) -> Any:
    """Index of the window [k·W, (k+1)·W) that contains each time (floor division)."""
    xp = array_namespace(times_ns)
    return xp.floor_divide(times_ns, window_ns)


def group_sums(
    keys: list[Any], values: list[Any], where: Any | None = None
) -> tuple[list[Any], list[Any]]:
    """Unique key tuples (sorted lexicographically) and the int64 sum of each value per group.

    ``keys`` are integer arrays of equal length (first is the most significant); ``values`` are
    int64 arrays of that length; ``where`` (bool, optional) leaves out the rows where it is
    False. Exact for any int64 values whose sums fit in int64.

    When the packed key space is small next to the rows (pools × windows, a cluster's jobs), the
    groups are counted into bins (O(n), no sort); else the packed keys are sorted.
    """
    xp = array_namespace(*keys, *values, where)
    if keys[0].shape[0] == 0:
        return [k[:0] for k in keys], [v[:0] for v in values]
    lows, spans, total = _key_spans(keys, where)
    if total == 0:  # every row left out
        return [k[:0] for k in keys], [v[:0] for v in values]
    if total <= _dense_limit(keys[0].shape[0]):
        binned = _binned_sums(xp, keys, values, where, lows, spans, total)
        if binned is not None:
            return binned
    if where is not None:
        keys, values = [k[where] for k in keys], [v[where] for v in values]
    order, packed = _lexicographic_order(xp, keys, lows, spans, total)
    if packed is not None:  # one gather finds the groups; the keys are read at group starts only
        starts = xp.nonzero(first_of_runs(packed[order]))[0]
        firsts = order[starts]
        return [k[firsts] for k in keys], [segment_sum(v[order], starts) for v in values]
    sorted_keys = [k[order] for k in keys]
    starts = xp.nonzero(first_of_runs(*sorted_keys))[0]
    sums = [segment_sum(v[order], starts) for v in values]
    return [k[starts] for k in sorted_keys], sums


# Float64 adds integers exactly while every partial sum stays below 2^53.
_EXACT = 2**53
_LOW_BITS = 24


def _dense_limit(rows: int) -> int:
    return max(1 << 16, 2 * rows)


def _key_spans(keys: list[Any], where: Any | None) -> tuple[list[int], list[int], int]:
    """Each key's minimum and span (over every row: no gather for ``where``), and the product of
    the spans; 0 when ``where`` leaves out every row."""
    if where is not None and not bool(where.any()):
        return [0] * len(keys), [0] * len(keys), 0
    lows = [int(k.min()) for k in keys]
    spans = [int(k.max()) - low + 1 for k, low in zip(keys, lows, strict=True)]
    total = 1
    for span in spans:
        total *= span
    return lows, spans, total


def _pack(xp: Any, keys: list[Any], lows: list[int], spans: list[int]) -> Any:
    packed = xp.zeros(keys[0].shape[0], dtype=xp.int64)
    for k, low, span in zip(keys, lows, spans, strict=True):
        packed *= span
        packed += k.astype(xp.int64, copy=False) - low
    return packed


def _binned_sums(
    xp: Any,
    keys: list[Any],
    values: list[Any],
    where: Any | None,
    lows: list[int],
    spans: list[int],
    total: int,
) -> tuple[list[Any], list[Any]] | None:
    """group_sums by counting into one bin per possible key (``bincount``, atomics on a GPU).

    Float64 bins are exact while every partial sum stays below 2^53; values too large for that
    are split into a low 24-bit part and the rest, each summed exactly and recombined in int64.
    Rows left out by ``where`` go to one extra bin that is dropped. None when even the split
    parts could round (more than 2^29 rows, or values near the int64 limit).
    """
    n = keys[0].shape[0]
    how = []  # per value: "zero" (nothing to add), "whole" (exact in float64 bins) or "split"
    for v in values:
        biggest = max(-int(v.min()), int(v.max()))
        if biggest == 0:
            how.append("zero")
        elif biggest * n < _EXACT:
            how.append("whole")
        elif (biggest >> _LOW_BITS) * n < _EXACT and n << _LOW_BITS < _EXACT:
            how.append("split")
        else:
            return None
    packed = (
        _pack(xp, keys, lows, spans)
        if where is None
        else xp.where(where, _pack(xp, keys, lows, spans), total)
    )
    counts = xp.bincount(packed, minlength=total + 1)[:total]
    groups = xp.nonzero(counts)[0]
    out_keys: list[Any] = []
    rest = groups
    for k, low, span in zip(reversed(keys), reversed(lows), reversed(spans), strict=True):
        out_keys.append((rest % span + low).astype(k.dtype, copy=False))
        rest = rest // span
    out_keys.reverse()
    sums = []
    for v, kind in zip(values, how, strict=True):
        if kind == "zero":
            sums.append(xp.zeros(groups.shape[0], dtype=xp.int64))
            continue
        if kind == "whole":
            bins = xp.bincount(packed, weights=v.astype(xp.float64), minlength=total + 1)
            sums.append(bins[groups].astype(xp.int64))
            continue
        high = v >> _LOW_BITS  # floor: low = v - high·2^24 is in [0, 2^24)
        low = v & ((1 << _LOW_BITS) - 1)
        high_bins = xp.bincount(packed, weights=high.astype(xp.float64), minlength=total + 1)
        low_bins = xp.bincount(packed, weights=low.astype(xp.float64), minlength=total + 1)
        sums.append(
            (high_bins[groups].astype(xp.int64) << _LOW_BITS) + low_bins[groups].astype(xp.int64)
        )
    return out_keys, sums


def _lexicographic_order(
    xp: Any, keys: list[Any], lows: list[int], spans: list[int], total: int
) -> tuple[Any, Any | None]:
    """Row order sorting ``keys`` lexicographically (first key most significant), and the packed
    key when one was built.

    When the keys' ranges multiply to less than 2^62 they are packed into one int64 per row and
    sorted once (about 4x faster than a multi-key lexsort); otherwise a lexsort (packed None).
    """
    if total >= 2**62:
        return xp.lexsort(xp.stack(list(reversed(keys)))), None
    packed = _pack(xp, keys, lows, spans)
    return xp.argsort(packed, kind="stable"), packed
