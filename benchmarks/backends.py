"""CuPy against NumPy on the same kernels and data: what the bill engine runs per chunk (order by
series and time, de-duplicate, intervals, SPEC §3 contributions, grouped integer sums) and
trailing ratios.

100M rows by default (pass ``--rows``). Runs only where ``--backend cupy`` can: prints a line
saying so elsewhere. The data is made on the host and copied to the GPU once, outside the timing;
results are copied back and compared for equality.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from kernels.backend import BackendError, get_namespace, to_host
from kernels.grouped_sums import group_sums
from kernels.integrate import gpu_contributions
from kernels.rolling import trailing_ratio
from kernels.series import dedup_mask, intervals, series_order

NS = 1_000_000_000


def _data(rows: int, series: int = 100_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    per = max(1, rows // series)
    codes = np.repeat(np.arange(series, dtype=np.int64), per)[:rows]
    times = 1_788_220_800 * NS + np.tile(np.arange(per, dtype=np.int64) * 10 * NS, series)[:rows]
    return {
        "codes": codes,
        "times": times,
        "window": times // (3600 * NS),
        "pool": codes % 7,
        "busy": rng.integers(0, 10_000_000, size=codes.size).astype(np.int64),
        "cap": np.full(codes.size, 10_000_000, dtype=np.int64),
        "util": rng.random(codes.size),
        "power": rng.random(codes.size) * 700.0,
        "energy": np.cumsum(rng.random(codes.size) * 7000.0),
    }


def _kernels(xp: Any, d: dict[str, Any]) -> list[Any]:
    order = series_order(d["codes"], d["times"])
    codes, times = d["codes"][order], d["times"][order]
    keep = dedup_mask(codes, times)
    rows = order[keep]
    iv = intervals(codes[keep], times[keep], 60 * NS)
    parts = gpu_contributions(iv, d["util"][rows], d["energy"][rows], d["power"][rows])
    keys, sums = group_sums([d["window"][rows], d["pool"][rows]], list(parts.values()))
    ratio = trailing_ratio(d["codes"], d["times"], d["busy"], d["cap"], 300 * NS)
    return [*keys, *sums, ratio]


def _time(xp: Any, d: dict[str, Any], repeat: int) -> tuple[float, list[np.ndarray]]:
    best, out = float("inf"), []
    for _ in range(repeat):
        start = time.perf_counter()
        out = _kernels(xp, d)
        if xp is not np:
            xp.cuda.Stream.null.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, [to_host(a) for a in out]


def run(rows: int = 100_000_000, repeat: int = 3) -> tuple[float, float] | None:
    try:
        cp = get_namespace("cupy")
    except BackendError as exc:
        print(f"\ncupy vs numpy: not run here ({exc})")
        return None
    host = _data(rows)
    device = {k: cp.asarray(v) for k, v in host.items()}
    t_numpy, expected = _time(np, host, 1)
    _time(cp, device, 1)  # compile and warm the memory pool
    t_cupy, got = _time(cp, device, repeat)
    for a, b in zip(expected, got, strict=True):
        if not np.array_equal(a, b, equal_nan=True):
            raise AssertionError("cupy and numpy kernels disagree")
    print(f"\ncupy vs numpy kernels (bill merge + sums, trailing 5m ratio), {rows:,} rows")
    print(f"{'numpy':20} {t_numpy:8.3f} s")
    print(f"{'cupy':20} {t_cupy:8.3f} s")
    print(f"{'speed-up':20} {t_numpy / t_cupy:8.1f}x")
    return t_numpy, t_cupy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000_000)
    args = parser.parse_args(argv)
    run(args.rows)


if __name__ == "__main__":
    main()
