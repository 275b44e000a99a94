"""What the NVML stand-in and the ``gpu`` collector cost: µs per NVML call, CPU ms per round.

``python -m benchmarks.fake_nvml_cost [--rounds 30] [--pause 1.0]``

- µs per call of the stand-in (:class:`tests.support.nvml.library.FakeNVML`, 8 loaded H100s) for
  the calls the ``gpu`` collector makes each round, best of 5 repeats in a tight loop (warm
  caches: a floor);
- the same for pynvml's own wrapper of ``nvmlDeviceGetPowerUsage`` over a C function that does
  nothing (``strlen`` of an empty string stands in for the driver): the Python and ctypes cost a
  real call has before the driver does any work;
- CPU ms per round of the ``gpu`` collector alone on :data:`benchmarks.node_tree.NVML`, with
  ``--pause`` seconds between rounds (1 s: caches as cold as in the daemon).

Run it from the checkout to measure (``PYTHONPATH`` set to it): it only uses public API, so the
same file measures an older checkout too.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml

from tests.support.nvml.library import FakeClock, FakeNVML
from tests.support.nvml.profiles import H100_LOADED


def _per_call_us(fn: Callable[[], Any], number: int = 20_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def fake_calls() -> dict[str, float]:
    """µs per call of the stand-in, by call."""
    fake = FakeNVML([H100_LOADED] * 8, clock=FakeClock())
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(3)
    fields = [
        pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
        pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL,
        pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
        pynvml.NVML_FI_DEV_REMAPPED_PENDING,
    ]
    scoped = [(field_id, 0) for field_id in fields]
    since = int((fake.clock.now() - 1.0) * 1e6)  # one second of samples, as a 1 s round reads
    sample1, sample2 = fake.nvmlGpmSampleAlloc(), fake.nvmlGpmSampleAlloc()
    fake.nvmlGpmSampleGet(h, sample1)
    fake.clock.advance(1.0)
    fake.nvmlGpmSampleGet(h, sample2)

    def gpm_metrics() -> Any:
        metrics = pynvml.c_nvmlGpmMetricsGet_t()
        metrics.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        metrics.numMetrics = 1
        metrics.sample1, metrics.sample2 = sample1, sample2
        metrics.metrics[0].metricId = pynvml.NVML_GPM_METRIC_SM_UTIL
        return fake.nvmlGpmMetricsGet(metrics)

    return {
        "nvmlDeviceGetPowerUsage": _per_call_us(lambda: fake.nvmlDeviceGetPowerUsage(h)),
        "nvmlDeviceGetTemperatureV": _per_call_us(
            lambda: fake.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU)
        ),
        "nvmlDeviceGetUtilizationRates": _per_call_us(
            lambda: fake.nvmlDeviceGetUtilizationRates(h)
        ),
        "nvmlDeviceGetMemoryInfo (v2)": _per_call_us(
            lambda: fake.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
        ),
        "nvmlDeviceGetFieldValues (4)": _per_call_us(
            lambda: fake.nvmlDeviceGetFieldValues(h, fields)
        ),
        "nvmlDeviceGetFieldValues (4 (id, scope))": _per_call_us(
            lambda: fake.nvmlDeviceGetFieldValues(h, scoped)
        ),
        "nvmlDeviceGetComputeRunningProcesses (3)": _per_call_us(
            lambda: fake.nvmlDeviceGetComputeRunningProcesses(h)
        ),
        "nvmlDeviceGetProcessUtilization (1 s)": _per_call_us(
            lambda: fake.nvmlDeviceGetProcessUtilization(h, since)
        ),
        "nvmlGpmSampleGet": _per_call_us(lambda: fake.nvmlGpmSampleGet(h, sample2)),
        "nvmlGpmMetricsGet (1 metric)": _per_call_us(gpm_metrics),
    }


def pynvml_floor() -> float:
    """µs per ``pynvml.nvmlDeviceGetPowerUsage`` when the C function returns at once."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    empty = ctypes.create_string_buffer(1)  # strlen(handle) == 0 == NVML_SUCCESS
    handle = ctypes.cast(empty, pynvml.c_nvmlDevice_t)
    cache = pynvml._nvmlGetFunctionPointer_cache
    saved = cache.get("nvmlDeviceGetPowerUsage")
    cache["nvmlDeviceGetPowerUsage"] = libc.strlen
    try:
        return _per_call_us(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
    finally:
        if saved is None:
            del cache["nvmlDeviceGetPowerUsage"]
        else:
            cache["nvmlDeviceGetPowerUsage"] = saved


def collector_round_ms(rounds: int, pause: float) -> tuple[float, float]:
    """(mean, median) CPU ms of one ``gpu`` collector round, ``pause`` s between rounds."""
    from benchmarks import node_tree
    from telemetry.collectors.base import CollectorContext
    from telemetry.collectors.gpu import GpuCollector

    context = CollectorContext(
        procfs=Path("/proc"), sysfs=Path("/sys"), node="bench", nvml_module=node_tree.NVML
    )
    collector = GpuCollector(context)
    spent = []
    for k in range(rounds + 3):
        time.sleep(pause)
        t0 = time.process_time()
        collector.collect()
        if k >= 3:  # the first rounds ask what holds for the initialisation
            spent.append(time.process_time() - t0)
    collector.close()
    return statistics.mean(spent) * 1e3, statistics.median(spent) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--pause", type=float, default=1.0)
    parser.add_argument("--no-calls", action="store_true", help="only the collector's rounds")
    args = parser.parse_args(argv)
    if not args.no_calls:
        print("µs per call, tight loop")
        for name, us in fake_calls().items():
            print(f"  stand-in {name:44}{us:8.2f}")
        print(f"  pynvml nvmlDeviceGetPowerUsage, no-op C function{pynvml_floor():12.2f}")
    mean, median = collector_round_ms(args.rounds, args.pause)
    print(f"gpu collector, {args.pause:g} s between rounds: CPU ms per round mean {mean:.3f}, "
          f"median {median:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
