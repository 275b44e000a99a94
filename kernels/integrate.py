"""Interval integration of the sample tables into exact integer sums (SPEC §3).

Each function takes the columns of one table, sorted by (series, time) and de-duplicated, with
their :class:`~kernels.series.Intervals`, and returns per-row int64 contributions of the interval
that ends at that row: unit-microseconds (``*_us``) and millijoules (``*_mj``). Each product is
rounded half-to-even on its own, so any sum of contributions is the same on every backend and for
every split of the input. Nulls arrive as NaN and count as SPEC §3 says.
"""

from __future__ import annotations

from typing import Any

from kernels.backend import array_namespace
from kernels.series import Intervals, counter_delta


def rint_int64(x: Any) -> Any:
    """Round half-to-even to int64; NaN becomes 0."""
    xp = array_namespace(x)
    return xp.rint(xp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)).astype(xp.int64)


def _dt_us(iv: Intervals) -> Any:
    return iv.dt_ns / 1000.0


def _counted(iv: Intervals, x: Any) -> Any:
    """``rint_int64(x)`` on valid intervals, 0 elsewhere (one pass fewer than nan_to_num)."""
    xp = array_namespace(x)
    return xp.where(iv.valid & xp.isfinite(x), xp.rint(x), 0.0).astype(xp.int64)


def gap_us(iv: Intervals) -> Any:
    """Length of each gap interval in microseconds, 0 elsewhere."""
    xp = array_namespace(iv.dt_ns)
    return xp.where(iv.gap, xp.rint(_dt_us(iv)), 0.0).astype(xp.int64)


def gpu_contributions(
    iv: Intervals,
    utilization_ratio: Any,
    energy_joules: Any,
    power_watts: Any,
    capacity_units: Any | None = None,
) -> dict[str, Any]:
    """GPU capacity, busy and energy per interval.

    capacity_us = units·Δt; busy_us = (utilization·units)·Δt (null → 0), where units is the
    fraction of a physical GPU the row stands for (a MIG instance's slices; null → 1);
    energy_mj = counter delta when both readings exist, else power·Δt when power is present,
    else 0; gap_us = Δt of gaps.
    """
    xp = array_namespace(iv.dt_ns, utilization_ratio, energy_joules, power_watts)
    dt_us = _dt_us(iv)
    util = xp.nan_to_num(utilization_ratio.astype(xp.float64), nan=0.0)
    units = 1.0
    if capacity_units is not None:
        units = xp.nan_to_num(capacity_units.astype(xp.float64), nan=1.0)
    delta = counter_delta(energy_joules, iv.opens)
    from_power = power_watts.astype(xp.float64) * (iv.dt_ns / 1e9)
    joules = xp.where(xp.isnan(delta), from_power, delta)
    return {
        "capacity_us": _counted(iv, units * dt_us),
        "busy_us": _counted(iv, (util * units) * dt_us),
        "energy_mj": _counted(iv, joules * 1000.0),
        "gap_us": gap_us(iv),
    }


def cpu_contributions(
    iv: Intervals, cpus: Any, busy_seconds: Any, energy_joules: Any
) -> dict[str, Any]:
    """CPU capacity core-µs (cpus·Δt), busy core-µs (counter delta of the busy modes' sum),
    energy mJ (counter delta of RAPL energy, 0 where a reading is null) and gap µs."""
    xp = array_namespace(iv.dt_ns, cpus, busy_seconds, energy_joules)
    return {
        "capacity_us": _counted(iv, cpus.astype(xp.float64) * _dt_us(iv)),
        "busy_us": _counted(iv, counter_delta(busy_seconds, iv.opens) * 1e6),
        "energy_mj": _counted(iv, counter_delta(energy_joules, iv.opens) * 1000.0),
        "gap_us": gap_us(iv),
    }


def job_contributions(
    iv: Intervals, cpus_allocated: Any, gpus_allocated: Any, cpu_seconds: Any
) -> dict[str, Any]:
    """Job allocated core-µs and GPU-µs (allocation·Δt) and used core-µs (cpu_seconds delta)."""
    xp = array_namespace(iv.dt_ns, cpus_allocated, gpus_allocated, cpu_seconds)
    dt_us = _dt_us(iv)
    return {
        "cpus_allocated_us": _counted(iv, cpus_allocated.astype(xp.float64) * dt_us),
        "gpus_allocated_us": _counted(iv, gpus_allocated.astype(xp.float64) * dt_us),
        "cpu_used_us": _counted(iv, counter_delta(cpu_seconds, iv.opens) * 1e6),
    }


def share_contributions(iv: Intervals, share: Any) -> Any:
    """A shared GPU's share-µs held by one job (share·Δt); the bill splits by the gpu rows'
    intervals, this is what a job's gpu_job series alone shows."""
    xp = array_namespace(iv.dt_ns, share)
    return _counted(iv, share.astype(xp.float64) * _dt_us(iv))
