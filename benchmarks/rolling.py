"""Trailing time-weighted means: tally's kernels against polars ``rolling_*_by(...).over(series)``.

Both compute, for every row of every series, the busy/capacity ratio over the trailing 5-minute
window, on the same generated data (GPU series sampled every 10 s). Prints seconds and the ratio
tally / polars (below 1 means tally is faster). The results are compared, not just timed.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import numpy as np

import kernels
from benchmarks import best_of

NS = 1_000_000_000


def _data(series: int, rows_per_series: int, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(series, dtype=np.int64), rows_per_series)
    steps = rng.integers(9 * NS, 11 * NS, size=codes.size)
    times = (
        1_788_220_800 * NS
        + np.cumsum(steps)
        - np.repeat(np.cumsum(steps)[::rows_per_series], rows_per_series)
    )
    busy = rng.integers(0, 10_000_000, size=codes.size).astype(np.int64)
    cap = np.full(codes.size, 10_000_000, dtype=np.int64)
    return {"codes": codes, "times": times, "busy": busy, "cap": cap}


def run(series: int, rows: int, window_s: int = 300) -> tuple[float, float, float]:
    """Best-of-3 seconds for tally, polars' equivalent ratio, and polars' plain rolling mean."""
    import polars as pl

    d = _data(series, rows)
    window = window_s * NS
    t_ours, ours = best_of(
        lambda: kernels.trailing_ratio(d["codes"], d["times"], d["busy"], d["cap"], window)
    )
    frame = pl.DataFrame(
        {"s": d["codes"], "t": d["times"].astype("datetime64[ns]"), "b": d["busy"], "c": d["cap"]}
    )
    size = timedelta(seconds=window_s)
    t_polars, out = best_of(
        lambda: frame.with_columns(
            (
                pl.col("b").rolling_sum_by("t", window_size=size).over("s")
                / pl.col("c").rolling_sum_by("t", window_size=size).over("s")
            ).alias("r")
        )
    )
    theirs = out["r"].to_numpy()
    # What a polars user reaches for first: the plain rolling mean of each row's ratio (not
    # time-weighted, so only its time is compared).
    with_u = frame.with_columns((pl.col("b") / pl.col("c")).alias("u"))
    t_mean, _ = best_of(
        lambda: with_u.with_columns(pl.col("u").rolling_mean_by("t", window_size=size).over("s"))
    )
    # polars' window is (t - W, t] as well: the results must agree.
    if not np.allclose(ours, theirs, rtol=1e-12, atol=0, equal_nan=True):
        raise AssertionError("tally and polars disagree on trailing means")
    print(f"\nrolling 5m ratio, {series} series x {rows} rows = {series * rows:,} rows")
    print(f"{'tally (numpy)':20} {t_ours:8.3f} s")
    print(f"{'polars sum_by ratio':20} {t_polars:8.3f} s")
    print(f"{'polars mean_by':20} {t_mean:8.3f} s")
    print(f"{'ratio tally/sum_by':20} {t_ours / t_polars:8.2f}")
    print(f"{'ratio tally/mean_by':20} {t_ours / t_mean:8.2f}")
    return t_ours, t_polars, t_mean


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args(argv)
    run(args.series, args.rows)


if __name__ == "__main__":
    main()
