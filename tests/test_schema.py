from __future__ import annotations

import pyarrow as pa
import pytest

from telemetry.schema import (
    CPU_SCHEMA,
    GPU_JOB_SCHEMA,
    GPU_SCHEMA,
    JOB_SCHEMA,
    SCHEMAS,
    SchemaError,
    validate,
)
from tests.support.tables import cpu_table, gpu_table


def test_schemas_follow_the_spec_column_for_column() -> None:
    # Column names and types transcribed by hand from SPEC §2.
    ts = pa.timestamp("ns", tz="UTC")
    assert [(f.name, f.type) for f in GPU_SCHEMA] == [
        ("time", ts), ("node", pa.string()), ("gpu_uuid", pa.string()), ("gpu_index", pa.int16()),
        ("gpu_model", pa.string()), ("utilization_ratio", pa.float32()),
        ("sm_active_ratio", pa.float32()), ("memory_used_bytes", pa.int64()),
        ("memory_total_bytes", pa.int64()), ("power_watts", pa.float32()),
        ("energy_joules", pa.float64()), ("temperature_celsius", pa.float32()),
        ("job_id", pa.string()),
        ("mig_profile", pa.string()), ("ecc_corrected_errors", pa.int64()),
        ("ecc_uncorrected_errors", pa.int64()), ("remapped_rows_pending", pa.int64()),
        ("clock_event_reasons", pa.int64()), ("xid_errors", pa.int64()), ("xid_last", pa.int32()),
        ("capacity_units", pa.float32()), ("gpu_instance_id", pa.int32()),
    ]  # fmt: skip
    modes = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    assert [(f.name, f.type) for f in CPU_SCHEMA] == [
        ("time", ts), ("node", pa.string()), ("cpus", pa.int32()),
        *[(f"{m}_seconds", pa.float64()) for m in modes],
        ("memory_total_bytes", pa.int64()), ("memory_available_bytes", pa.int64()),
        ("energy_joules", pa.float64()),
    ]  # fmt: skip
    assert [(f.name, f.type) for f in JOB_SCHEMA] == [
        ("time", ts), ("node", pa.string()), ("job_id", pa.string()), ("user", pa.string()),
        ("account", pa.string()), ("cpus_allocated", pa.float32()),
        ("gpus_allocated", pa.float32()), ("cpu_seconds", pa.float64()),
        ("memory_bytes", pa.int64()), ("account_source", pa.string()),
    ]  # fmt: skip
    assert [(f.name, f.type) for f in GPU_JOB_SCHEMA] == [
        ("time", ts), ("node", pa.string()), ("gpu_uuid", pa.string()), ("job_id", pa.string()),
        ("share", pa.float32()), ("sm_utilization_ratio", pa.float32()),
        ("memory_used_bytes", pa.int64()),
    ]  # fmt: skip
    nullable = {name: {f.name for f in s if f.nullable} for name, s in SCHEMAS.items()}
    assert nullable == {
        "gpu": {"utilization_ratio", "sm_active_ratio", "power_watts", "energy_joules",
                "temperature_celsius", "job_id", "mig_profile", "ecc_corrected_errors",
                "ecc_uncorrected_errors", "remapped_rows_pending", "clock_event_reasons",
                "xid_errors", "xid_last", "capacity_units",
                "gpu_instance_id"},
        "cpu": {"energy_joules"},
        "job": {"account_source"},
        "gpu_job": {"sm_utilization_ratio", "memory_used_bytes"},
    }  # fmt: skip


def test_valid_table_passes_unchanged() -> None:
    table = cpu_table("n1", [0, 5, 10])
    assert validate(table, "cpu").equals(table)


def test_missing_column_is_named() -> None:
    table = cpu_table("n1", [0, 5]).drop_columns(["steal_seconds"])
    with pytest.raises(SchemaError, match=r"cpu: missing column 'steal_seconds'"):
        validate(table, "cpu")


def test_wrong_type_is_named() -> None:
    table = cpu_table("n1", [0, 5])
    table = table.set_column(2, "cpus", pa.array(["8", "8"]))
    with pytest.raises(SchemaError, match=r"column 'cpus' has type string, expected int32"):
        validate(table, "cpu")


def test_nulls_in_required_column_are_named() -> None:
    table = gpu_table("n1", "GPU-a", 0, [0, 5])
    table = table.set_column(3, "gpu_index", pa.array([0, None], pa.int16()))
    with pytest.raises(SchemaError, match=r"column 'gpu_index' has 1 null"):
        validate(table, "gpu")


def test_naive_timestamps_are_refused_and_other_zones_converted() -> None:
    table = cpu_table("n1", [0, 5])
    raw = table.column("time").cast(pa.int64())
    naive = table.set_column(0, "time", raw.cast(pa.timestamp("ns")))
    with pytest.raises(SchemaError, match="time"):
        validate(naive, "cpu")
    micro = table.set_column(0, "time", raw.cast(pa.timestamp("ns", tz="Europe/Berlin")))
    assert validate(micro, "cpu").column("time").equals(table.column("time"))


def test_lossless_casts_and_extra_columns() -> None:
    table = cpu_table("n1", [0, 5])
    table = table.set_column(1, "node", table.column("node").cast(pa.large_string()))
    table = table.append_column("rack", pa.array(["r1", "r2"]))
    out = validate(table.select(["rack", *table.column_names[:-1]]), "cpu")
    assert out.schema.names[: len(CPU_SCHEMA)] == CPU_SCHEMA.names
    assert out.schema.names[-1] == "rack"
    assert out.schema.field("node").type == pa.string()


def test_values_that_do_not_fit_are_refused() -> None:
    table = gpu_table("n1", "GPU-a", 0, [0, 5])
    table = table.set_column(3, "gpu_index", pa.array([0, 70000], pa.int64()))
    with pytest.raises(SchemaError, match="gpu_index"):
        validate(table, "gpu")


def test_unknown_table() -> None:
    with pytest.raises(SchemaError, match="unknown table"):
        validate(cpu_table("n1", [0]), "disk")


def test_optional_extra_columns_are_added_as_nulls_to_older_files() -> None:
    from telemetry.schema import OPTIONAL_COLUMNS

    table = gpu_table("n1", "GPU-a", 0, [0, 5]).drop_columns(sorted(OPTIONAL_COLUMNS["gpu"]))
    out = validate(table, "gpu")
    assert out.schema.names == GPU_SCHEMA.names
    assert all(out.column(c).null_count == 2 for c in OPTIONAL_COLUMNS["gpu"])
    with pytest.raises(SchemaError, match="'job_id'"):
        validate(table.drop_columns(["job_id"]), "gpu")
