"""The four sample tables of SPEC §2 declared without Arrow: columns, series keys, valid ranges.

The node daemon collects, journals and aggregates from these declarations alone (it never loads
Arrow); :mod:`telemetry.schema` builds the one ``pa.schema`` of each table from them for every
reader and writer of Parquet.
"""

from __future__ import annotations

from typing import NamedTuple

CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
# Modes that count as busy CPU time (SPEC §3); idle, iowait and steal do not.
CPU_BUSY_MODES = ("user", "nice", "system", "irq", "softirq")

# Column kinds, each one Arrow type (schema.ARROW_TYPES) and one NumPy dtype (frame.DTYPES):
# "time", "string", "int16", "int32", "int64", "float32", "float64"; "time" is int64 nanoseconds
# since the epoch, UTC.


class Column(NamedTuple):
    name: str
    kind: str
    nullable: bool = True


def _required(name: str, kind: str) -> Column:
    return Column(name, kind, nullable=False)


TABLES: dict[str, tuple[Column, ...]] = {
    "gpu": (
        _required("time", "time"),
        _required("node", "string"),
        _required("gpu_uuid", "string"),
        _required("gpu_index", "int16"),
        _required("gpu_model", "string"),
        Column("utilization_ratio", "float32"),
        Column("sm_active_ratio", "float32"),
        _required("memory_used_bytes", "int64"),
        _required("memory_total_bytes", "int64"),
        Column("power_watts", "float32"),
        Column("energy_joules", "float64"),
        Column("temperature_celsius", "float32"),
        Column("job_id", "string"),
        # Optional extra columns (SPEC §2 allows nullable additions): absent in older files,
        # filled with nulls on reading.
        Column("mig_profile", "string"),
        Column("ecc_corrected_errors", "int64"),
        Column("ecc_uncorrected_errors", "int64"),
        Column("remapped_rows_pending", "int64"),
        Column("clock_event_reasons", "int64"),
        Column("xid_errors", "int64"),
        Column("xid_last", "int32"),
        # The fraction of one physical GPU this row stands for in capacity: 1 for a whole GPU;
        # slices/total slices for a MIG instance (1g of 7 = 1/7); for the parent of MIG
        # instances the slices no instance holds (0 when fully partitioned), so a MIG GPU counts
        # once. Null (older files) means 1.
        Column("capacity_units", "float32"),
        Column("gpu_instance_id", "int32"),  # MIG instances: NVML's GPU instance id
    ),
    "cpu": (
        _required("time", "time"),
        _required("node", "string"),
        _required("cpus", "int32"),
        *[_required(f"{mode}_seconds", "float64") for mode in CPU_MODES],
        _required("memory_total_bytes", "int64"),
        _required("memory_available_bytes", "int64"),
        Column("energy_joules", "float64"),
    ),
    "job": (
        _required("time", "time"),
        _required("node", "string"),
        _required("job_id", "string"),
        _required("user", "string"),
        _required("account", "string"),
        _required("cpus_allocated", "float32"),
        _required("gpus_allocated", "float32"),
        _required("cpu_seconds", "float64"),
        _required("memory_bytes", "int64"),
        # Optional: where `account` came from: "job-info" (a root-owned file the Slurm prolog
        # wrote), "environment" (the job's own, so the job's owner could change it), null unknown.
        Column("account_source", "string"),
    ),
    # One row per (GPU, job holding it) where a GPU is shared by several jobs (Slurm shards or
    # MPS, Kubernetes time-slicing replicas); a MIG instance is a GPU row of its own, not this.
    "gpu_job": (
        _required("time", "time"),
        _required("node", "string"),
        _required("gpu_uuid", "string"),
        _required("job_id", "string"),
        _required("share", "float32"),  # fraction of the GPU allocated, 0-1
        Column("sm_utilization_ratio", "float32"),  # the job's processes' SM use, 0-1
        Column("memory_used_bytes", "int64"),
    ),
}

# Columns a table may lack (they are added as nulls); all others are required.
OPTIONAL_COLUMNS: dict[str, frozenset[str]] = {
    "gpu": frozenset(
        {
            "mig_profile",
            "ecc_corrected_errors",
            "ecc_uncorrected_errors",
            "remapped_rows_pending",
            "clock_event_reasons",
            "xid_errors",
            "xid_last",
            "capacity_units",
            "gpu_instance_id",
        }
    ),
    "cpu": frozenset(),
    "job": frozenset({"account_source"}),
    "gpu_job": frozenset(),
}

# Columns that identify one time series in each table (SPEC §2).
SERIES_KEYS: dict[str, tuple[str, ...]] = {
    "gpu": ("node", "gpu_uuid"),
    "cpu": ("node",),
    "job": ("node", "job_id"),
    "gpu_job": ("node", "gpu_uuid", "job_id"),
}

# The valid range of every column a bill or a counter adds up (SPEC §2 units), inclusive. A row
# with a value outside it — or NaN or ±inf — is left out and counted, never billed: a float cast
# to int64 past its range gives INT64_MIN on x86 and saturates on a GPU, so no such value may
# reach the integer sums. Ratios may exceed 1 by a little (rounding in the driver); counters and
# allocations stay well inside what int64 microseconds and millijoules hold.
RATIO_TOLERANCE = 0.01
VALID_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "gpu": {
        "utilization_ratio": (0.0, 1.0 + RATIO_TOLERANCE),
        "sm_active_ratio": (0.0, 1.0 + RATIO_TOLERANCE),
        "power_watts": (0.0, 1e5),  # an NVL72 rack draws 1.3e5 W; one GPU far less
        "energy_joules": (0.0, 1e15),  # 31 MW-years: no counter gets there
        "memory_used_bytes": (0.0, 2.0**50),
        "memory_total_bytes": (0.0, 2.0**50),
        "capacity_units": (0.0, 1.0),
    },
    "cpu": {
        "cpus": (0.0, 1e6),
        **{f"{mode}_seconds": (0.0, 1e12) for mode in CPU_MODES},  # 31,700 CPU-years
        "memory_total_bytes": (0.0, 2.0**60),
        "memory_available_bytes": (0.0, 2.0**60),
        "energy_joules": (0.0, 1e15),
    },
    "job": {
        "cpus_allocated": (0.0, 1e6),
        "gpus_allocated": (0.0, 1e6),
        "cpu_seconds": (0.0, 1e12),
        "memory_bytes": (0.0, 2.0**60),
    },
    "gpu_job": {
        "share": (0.0, 1.0 + RATIO_TOLERANCE),
        "sm_utilization_ratio": (0.0, 1.0 + RATIO_TOLERANCE),
        "memory_used_bytes": (0.0, 2.0**50),
    },
}
# Sample times: from 2000 up to 2100. Fixed bounds, not the reading machine's clock, so that a
# bill recomputed later reads the same rows; a row dated 1970 (a zeroed clock) or 2200 is out.
EARLIEST_NS = 946_684_800 * 1_000_000_000  # 2000-01-01T00:00:00Z
LATEST_NS = 4_102_444_800 * 1_000_000_000  # 2100-01-01T00:00:00Z
