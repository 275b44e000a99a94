"""Array kernels of tally: ordering, counter deltas, interval integration and trailing windows.

Every kernel works on NumPy or CuPy arrays (derived from its inputs); importing this package
imports neither CuPy nor NVML.
"""

from __future__ import annotations

from kernels.backend import BackendError, array_namespace, get_namespace, to_host
from kernels.integrate import (
    cpu_contributions,
    gpu_contributions,
    job_contributions,
    rint_int64,
    share_contributions,
)
from kernels.rolling import first_after, ratio_of_sums, trailing_ratio, trailing_sums
from kernels.series import (
    Intervals,
    counter_delta,
    dedup_mask,
    intervals,
    last_rows,
    segment_bounds,
    segment_sum,
    series_order,
)

__all__ = [
    "BackendError",
    "Intervals",
    "array_namespace",
    "counter_delta",
    "cpu_contributions",
    "dedup_mask",
    "first_after",
    "get_namespace",
    "gpu_contributions",
    "intervals",
    "job_contributions",
    "last_rows",
    "ratio_of_sums",
    "rint_int64",
    "segment_bounds",
    "segment_sum",
    "series_order",
    "share_contributions",
    "to_host",
    "trailing_ratio",
    "trailing_sums",
]
