"""A plain-Python reference of SPEC §3 (interval semantics) and §6 (trailing window ratios).

Written with loops, lists and dicts only, independent of ``kernels`` and ``telemetry.state``, so
the vectorised code can be checked against it row by row.

Rounding and floating point: every interval's product is rounded on its own with Python's
``round()`` (half-to-even, the same rule as ``numpy.rint``). To make the reference agree with the
kernels *bit for bit*, each product is evaluated with the same float64 expression, in the same
order, that the SPEC's unit conversion naturally gives and that the kernels use:

- Δt in µs is ``dt_ns / 1000.0`` (int → float64, then one division);
- a rate times Δt is ``float(rate) * (dt_ns / 1000.0)`` (float32 inputs widen exactly to float64);
- power·Δt in joules is ``float(power) * (dt_ns / 1e9)``, and joules become mJ as ``j * 1000.0``;
- counter deltas in seconds become µs as ``d * 1e6``;
- the cpu busy counter is ``user + nice + system + irq + softirq`` summed left to right.

Any other association (say ``util * dt_ns / 1000``) can differ in the last bit, which flips a
rounding now and then; that would be a difference of float evaluation, not of semantics.

Nulls are ``None`` or ``NaN``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.support.units import NS

WINDOWS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600}
BUSY_MODES = ("user", "nice", "system", "irq", "softirq")
SERIES_KEYS: dict[str, tuple[str, ...]] = {
    "gpu": ("node", "gpu_uuid"),
    "cpu": ("node",),
    "job": ("node", "job_id"),
}
PARTS: dict[str, tuple[str, ...]] = {
    "gpu": ("capacity_us", "busy_us", "energy_mj", "gap_us"),
    "cpu": ("capacity_us", "busy_us", "energy_mj", "gap_us"),
    "job": ("cpus_allocated_us", "gpus_allocated_us", "cpu_used_us"),
}

Row = dict[str, Any]


def is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# --- ordering and duplicates ------------------------------------------------------------------


def sort_order(codes: Sequence[int], times: Sequence[int]) -> list[int]:
    """Row indices sorted by (series, time); equal keys keep their input order."""
    return sorted(range(len(codes)), key=lambda i: (codes[i], times[i]))


def kept_rows(codes: Sequence[int], times: Sequence[int]) -> list[int]:
    """Indices of the rows that survive de-duplication (first occurrence of each (series, time)
    in input order wins), listed in (series, time) order."""
    first: dict[tuple[int, int], int] = {}
    for i, key in enumerate(zip(codes, times, strict=True)):
        if key not in first:
            first[key] = i
    return [first[key] for key in sorted(first)]


# --- intervals and counters of one series (rows sorted by time, no duplicates) ---------------


@dataclass(frozen=True)
class Interval:
    dt_ns: int  # 0 on the series' first row
    opens: bool
    gap: bool
    valid: bool


def series_intervals(times: Sequence[int], max_gap_ns: int) -> list[Interval]:
    out = []
    for i, t in enumerate(times):
        if i == 0:
            out.append(Interval(0, True, False, False))
            continue
        dt = t - times[i - 1]
        gap = dt > max_gap_ns
        out.append(Interval(dt, False, gap, not gap))
    return out


def series_deltas(values: Sequence[float | None]) -> list[float | None]:
    """Counter increase ending at each row; None on the first row or where a reading is null."""
    out: list[float | None] = [None] if len(values) else []
    for prev, cur in itertools.pairwise(values):
        if is_null(prev) or is_null(cur):
            out.append(None)
            continue
        d = float(cur) - float(prev)
        out.append(float(cur) if d < 0 else d)
    return out


def _us(dt_ns: int) -> float:
    return dt_ns / 1000.0


def gpu_parts(
    times: Sequence[int],
    utilization: Sequence[float | None],
    energy: Sequence[float | None],
    power: Sequence[float | None],
    max_gap_ns: int,
    units: Sequence[float | None] | None = None,
) -> list[dict[str, int]]:
    """``units``: the fraction of a physical GPU each row is (MIG slices), null → 1."""
    out = []
    deltas = series_deltas(energy)
    for i, iv in enumerate(series_intervals(times, max_gap_ns)):
        share = 1.0 if units is None or is_null(units[i]) else float(units[i])  # type: ignore[arg-type]
        parts = {"capacity_us": 0, "busy_us": 0, "energy_mj": 0, "gap_us": 0}
        if iv.gap:
            parts["gap_us"] = round(_us(iv.dt_ns))
        if iv.valid:
            util = 0.0 if is_null(utilization[i]) else float(utilization[i])  # type: ignore[arg-type]
            d = deltas[i]
            if d is not None:
                joules = d
            elif not is_null(power[i]):
                joules = float(power[i]) * (iv.dt_ns / 1e9)  # type: ignore[arg-type]
            else:
                joules = 0.0
            parts["capacity_us"] = round(share * _us(iv.dt_ns))
            parts["busy_us"] = round((util * share) * _us(iv.dt_ns))
            parts["energy_mj"] = round(joules * 1000.0)
        out.append(parts)
    return out


def cpu_parts(
    times: Sequence[int],
    cpus: Sequence[int | float],
    busy_seconds: Sequence[float | None],
    energy: Sequence[float | None],
    max_gap_ns: int,
) -> list[dict[str, int]]:
    out = []
    busy_d = series_deltas(busy_seconds)
    energy_d = series_deltas(energy)
    for i, iv in enumerate(series_intervals(times, max_gap_ns)):
        parts = {"capacity_us": 0, "busy_us": 0, "energy_mj": 0, "gap_us": 0}
        if iv.gap:
            parts["gap_us"] = round(_us(iv.dt_ns))
        if iv.valid:
            parts["capacity_us"] = round(float(cpus[i]) * _us(iv.dt_ns))
            b, e = busy_d[i], energy_d[i]
            parts["busy_us"] = 0 if b is None else round(b * 1e6)
            parts["energy_mj"] = 0 if e is None else round(e * 1000.0)
        out.append(parts)
    return out


def job_parts(
    times: Sequence[int],
    cpus_allocated: Sequence[float],
    gpus_allocated: Sequence[float],
    cpu_seconds: Sequence[float | None],
    max_gap_ns: int,
) -> list[dict[str, int]]:
    out = []
    used = series_deltas(cpu_seconds)
    for i, iv in enumerate(series_intervals(times, max_gap_ns)):
        parts = {"cpus_allocated_us": 0, "gpus_allocated_us": 0, "cpu_used_us": 0}
        if iv.valid:
            parts["cpus_allocated_us"] = round(float(cpus_allocated[i]) * _us(iv.dt_ns))
            parts["gpus_allocated_us"] = round(float(gpus_allocated[i]) * _us(iv.dt_ns))
            u = used[i]
            parts["cpu_used_us"] = 0 if u is None else round(u * 1e6)
        out.append(parts)
    return out


# --- trailing windows ---------------------------------------------------------------------------


def trailing_sum(times: Sequence[int], values: Sequence[int], at: int, window_ns: int) -> int:
    """Σ values[j] over the rows j of one series with times[j] in (times[at] - W, times[at]]."""
    lo, hi = times[at] - window_ns, times[at]
    return sum(v for t, v in zip(times, values, strict=True) if lo < t <= hi)


def window_ratio(
    times: Sequence[int], busy: Sequence[int], capacity: Sequence[int], window_ns: int
) -> float | None:
    """Σbusy / Σcapacity over the intervals whose end lies in (T - W, T], T = newest time."""
    newest = max(range(len(times)), key=lambda i: times[i])
    num = trailing_sum(times, busy, newest, window_ns)
    den = trailing_sum(times, capacity, newest, window_ns)
    return None if den == 0 else num / den


# --- whole tables (rows as dicts with the SPEC §2 column names, time as int ns) --------------


def table_series(name: str, rows: Sequence[Row]) -> dict[tuple[str, ...], list[Row]]:
    """Rows grouped by series key, de-duplicated (first occurrence wins), sorted by time."""
    keys = SERIES_KEYS[name]
    series: dict[tuple[str, ...], dict[int, Row]] = {}
    for row in rows:
        by_time = series.setdefault(tuple(row[k] for k in keys), {})
        by_time.setdefault(row["time"], row)
    return {key: [by_time[t] for t in sorted(by_time)] for key, by_time in series.items()}


def cpu_busy_seconds(row: Row) -> float:
    total = 0.0
    for mode in BUSY_MODES:
        total = total + row[f"{mode}_seconds"]
    return total


def rows_parts(name: str, rows: Sequence[Row], max_gap_ns: int) -> list[dict[str, int]]:
    """Per-row contributions of one series' de-duplicated, time-sorted rows."""
    times = [r["time"] for r in rows]

    def col(c: str) -> list[Any]:
        return [r[c] for r in rows]

    if name == "gpu":
        units = [r.get("capacity_units") for r in rows]
        return gpu_parts(
            times, col("utilization_ratio"), col("energy_joules"), col("power_watts"), max_gap_ns,
            units,
        )  # fmt: skip
    if name == "cpu":
        busy = [cpu_busy_seconds(r) for r in rows]
        return cpu_parts(times, col("cpus"), busy, col("energy_joules"), max_gap_ns)
    return job_parts(
        times, col("cpus_allocated"), col("gpus_allocated"), col("cpu_seconds"), max_gap_ns
    )


def sum_parts(name: str, parts: Sequence[dict[str, int]]) -> dict[str, int]:
    totals = dict.fromkeys(PARTS[name], 0)
    for p in parts:
        for k, v in p.items():
            totals[k] += v
    return totals


def alive_series(
    series: dict[tuple[str, ...], list[Row]], max_gap_seconds: float
) -> dict[tuple[str, ...], list[Row]]:
    """Series not silent for 1h + max_gap behind the table's newest sample.

    The SPEC leaves the exact boundary open; like the state, a series exactly 1h + max_gap
    behind counts as evicted.
    """
    if not series:
        return {}
    retain = WINDOWS["1h"] * NS + int(max_gap_seconds * NS)
    newest = max(rows[-1]["time"] for rows in series.values())
    return {k: rows for k, rows in series.items() if rows[-1]["time"] > newest - retain}


def table_totals(
    name: str, rows: Sequence[Row], max_gap_seconds: float = 60, evict: bool = True
) -> dict[tuple[str, ...], dict[str, int]]:
    """Per-series totals of every contribution (of the series still alive when ``evict``)."""
    max_gap_ns = int(max_gap_seconds * NS)
    series = table_series(name, rows)
    if evict:
        series = alive_series(series, max_gap_seconds)
    return {k: sum_parts(name, rows_parts(name, s, max_gap_ns)) for k, s in series.items()}


def _clip(ratio: float | None) -> float | None:
    return None if ratio is None else min(1.0, max(0.0, ratio))


def newest_by_node(data: dict[str, Sequence[Row]]) -> dict[str, int]:
    """Each node's newest sample time over every table's rows."""
    newest: dict[str, int] = {}
    for rows in data.values():
        for row in rows:
            newest[row["node"]] = max(newest.get(row["node"], row["time"]), row["time"])
    return newest


def table_snapshot(
    name: str,
    rows: Sequence[Row],
    max_gap_seconds: float = 60,
    elsewhere: dict[str, int] | None = None,
) -> dict[tuple[str, ...], dict[str, Any]]:
    """What a snapshot should hold per current series: newest time, totals, window ratios.

    Current: alive, and newest sample no more than max_gap behind the newest of its node, in
    this table or in ``elsewhere`` (each node's newest sample in any table).
    Ratios (gpu and cpu only) are clipped to [0, 1]; None where the window holds no capacity.
    """
    max_gap_ns = int(max_gap_seconds * NS)
    series = alive_series(table_series(name, rows), max_gap_seconds)
    node_newest: dict[str, int] = dict(elsewhere or {})
    for key, s in series.items():
        node_newest[key[0]] = max(node_newest.get(key[0], s[-1]["time"]), s[-1]["time"])
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for key, s in series.items():
        if s[-1]["time"] < node_newest[key[0]] - max_gap_ns:
            continue
        parts = rows_parts(name, s, max_gap_ns)
        windows: dict[str, float | None] = {}
        if name in ("gpu", "cpu"):
            times = [r["time"] for r in s]
            busy = [p["busy_us"] for p in parts]
            cap = [p["capacity_us"] for p in parts]
            for label, seconds in WINDOWS.items():
                windows[label] = _clip(window_ratio(times, busy, cap, seconds * NS))
        out[key] = {
            "time": s[-1]["time"],
            "totals": sum_parts(name, parts),
            "windows": windows,
        }
    return out


def group_by(items: Sequence[Any], key: Callable[[Any], Any]) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out
