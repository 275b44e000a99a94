"""From Arrow sample tables to kernel inputs: series codes and SPEC §3 contributions.

Shared by the live state (daemon, replay) and the bill engine, so both integrate the same way.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import kernels
from telemetry.schema import CPU_BUSY_MODES, SERIES_KEYS


def series_codes(table: pa.Table, name: str) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Integer code per row for the table's series key, and the key tuple of each code.

    Each key column is dictionary-encoded on its own and the codes combined, so no value of a
    key (whatever characters it holds) can make two series collide.
    """
    combined = np.zeros(table.num_rows, dtype=np.int64)
    dictionaries: list[list[str]] = []
    for key in SERIES_KEYS[name]:
        encoded = pc.dictionary_encode(table.column(key)).combine_chunks()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        dictionaries.append([str(v) for v in encoded.dictionary.to_pylist()])
        combined = combined * len(dictionaries[-1]) + codes
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


def contributions(table: pa.Table, name: str, iv: kernels.Intervals) -> dict[str, np.ndarray]:
    """SPEC §3 per-row integer contributions of a sorted, de-duplicated table."""
    if name == "gpu":
        return kernels.gpu_contributions(
            iv,
            float_column(table, "utilization_ratio"),
            float_column(table, "energy_joules"),
            float_column(table, "power_watts"),
        )
    if name == "cpu":
        busy = sum(float_column(table, f"{mode}_seconds") for mode in CPU_BUSY_MODES)
        return kernels.cpu_contributions(
            iv,
            float_column(table, "cpus"),
            np.asarray(busy, dtype=np.float64),
            float_column(table, "energy_joules"),
        )
    return kernels.job_contributions(
        iv,
        float_column(table, "cpus_allocated"),
        float_column(table, "gpus_allocated"),
        float_column(table, "cpu_seconds"),
    )
