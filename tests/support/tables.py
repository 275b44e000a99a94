"""Synthetic sample tables with known values, for store, dataset, exporter and CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from telemetry.schema import (
    CPU_MODES,
    CPU_SCHEMA,
    GPU_SCHEMA,
    JOB_SCHEMA,
    OPTIONAL_COLUMNS,
    validate,
)
from telemetry.store.layout import partition_dir
from tests.support.units import NS

# Label values that try to break the exposition: quotes, escapes, newlines, injected lines,
# a huge value, invalid UTF-8 made valid by replacement, the empty string.
HOSTILE = [
    'job"with"quotes',
    "back\\slash\\",
    "new\nline",
    'brace} x{y="1"} 7',
    "# HELP injected",
    "x" * 5000,
    "caf\udcc3\udca9".encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
    "",
]

# 2026-09-01T00:00:00Z, a whole day since the epoch.
T0 = 1_788_220_800 * NS


def cpu_table(node: str, times_s: list[float], cpus: int = 8, busy_share: float = 0.25) -> pa.Table:
    """A cpu table whose busy modes grow at ``busy_share`` of capacity (user+system split 3:1)."""
    t = np.asarray(times_s, dtype=np.float64)
    elapsed = t - t[0] + 1000.0
    busy = elapsed * cpus * busy_share
    data: dict[str, object] = {
        "time": (T0 + np.rint(t * NS)).astype(np.int64),
        "node": [node] * len(t),
        "cpus": np.full(len(t), cpus, dtype=np.int32),
    }
    for mode in CPU_MODES:
        data[f"{mode}_seconds"] = np.zeros(len(t))
    data["user_seconds"] = busy * 0.75
    data["system_seconds"] = busy * 0.25
    data["idle_seconds"] = elapsed * cpus - busy
    data["memory_total_bytes"] = np.full(len(t), 64 << 30, dtype=np.int64)
    data["memory_available_bytes"] = np.full(len(t), 40 << 30, dtype=np.int64)
    data["energy_joules"] = elapsed * 150.0
    return pa.table(data, schema=CPU_SCHEMA)


def gpu_table(
    node: str,
    uuid: str,
    index: int,
    times_s: list[float],
    util: float | None = 0.5,
    job_id: str | None = None,
    model: str = "NVIDIA H100 80GB HBM3",
) -> pa.Table:
    t = np.asarray(times_s, dtype=np.float64)
    n = len(t)
    table = pa.table(
        {
            "time": (T0 + np.rint(t * NS)).astype(np.int64),
            "node": [node] * n,
            "gpu_uuid": [uuid] * n,
            "gpu_index": np.full(n, index, dtype=np.int16),
            "gpu_model": [model] * n,
            "utilization_ratio": [util] * n,
            "sm_active_ratio": [None] * n,
            "memory_used_bytes": np.full(n, 1 << 30, dtype=np.int64),
            "memory_total_bytes": np.full(n, 80 << 30, dtype=np.int64),
            "power_watts": np.full(n, 300.0, dtype=np.float32),
            "energy_joules": (t - t[0]) * 300.0 + 5.0e6,
            "temperature_celsius": np.full(n, 45.0, dtype=np.float32),
            "job_id": [job_id] * n,
        },
        schema=pa.schema([f for f in GPU_SCHEMA if f.name not in OPTIONAL_COLUMNS["gpu"]]),
    )
    return validate(table, "gpu")  # adds the optional columns as nulls


def job_table(
    node: str,
    job_id: str,
    times_s: list[float],
    user: str = "alice",
    account: str = "acme",
    cpus: float = 4.0,
    gpus: float = 1.0,
) -> pa.Table:
    t = np.asarray(times_s, dtype=np.float64)
    n = len(t)
    table = pa.table(
        {
            "time": (T0 + np.rint(t * NS)).astype(np.int64),
            "node": [node] * n,
            "job_id": [job_id] * n,
            "user": [user] * n,
            "account": [account] * n,
            "cpus_allocated": np.full(n, cpus, dtype=np.float32),
            "gpus_allocated": np.full(n, gpus, dtype=np.float32),
            "cpu_seconds": (t - t[0]) * 3.0,
            "memory_bytes": np.full(n, 8 << 30, dtype=np.int64),
        },
        schema=pa.schema([f for f in JOB_SCHEMA if f.name not in OPTIONAL_COLUMNS["job"]]),
    )
    return validate(table, "job")  # adds the optional columns as nulls


def write_dataset(root: Path, table_name: str, table: pa.Table, name: str = "part-0") -> Path:
    """Write ``table`` (one node, one day) as one Parquet file in the SPEC §2 layout."""
    first = int(table.column("time").cast(pa.int64())[0].as_py())
    node = table.column("node")[0].as_py()
    directory = partition_dir(root, table_name, first, node)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.parquet"
    pq.write_table(table, path)
    return path


def write_undecodable_column_name(path: Path, table: pa.Table, column: str) -> None:
    """``table`` written to ``path`` as Parquet with ``column``'s name made invalid UTF-8 in the
    footer (a foreign writer's or a damaged file): its last letter becomes byte 0xFF."""
    placeholder = column[:-1] + "\x7f"  # same length, found only where the name is
    renamed = table.rename_columns([placeholder if n == column else n for n in table.column_names])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(renamed, path, store_schema=False)  # no Arrow schema beside the footer's
    raw = path.read_bytes()
    assert placeholder.encode() in raw
    path.write_bytes(raw.replace(placeholder.encode(), column[:-1].encode() + b"\xff"))
