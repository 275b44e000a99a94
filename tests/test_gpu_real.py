"""The real thing: NVML on a GPU machine (``pytest -m gpu``); skipped where there is no GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from telemetry.collectors import CollectorContext, Runner
from telemetry.collectors.gpu import GpuCollector
from telemetry.nvml import Gateway, NvmlUnavailable

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gateway() -> Gateway:
    gw = Gateway()
    try:
        count = gw.call("nvmlDeviceGetCount")
    except NvmlUnavailable as exc:
        pytest.skip(f"no NVML here: {exc}")
    if not count:
        pytest.skip("NVML sees no GPU")
    return gw


def test_real_gpus_give_sane_rows(gateway: Gateway) -> None:
    ctx = CollectorContext(procfs=Path("/proc"), sysfs=Path("/sys"), node="real")
    collector = GpuCollector(ctx, gateway)
    runner = Runner([collector])
    first = runner.run()
    second = runner.run()
    assert second.status["gpu"].success, second.status["gpu"].error
    table = second.tables["gpu"]
    assert table.num_rows >= gateway.call("nvmlDeviceGetCount")
    assert (table.times() > 1_600_000_000 * 10**9).all()  # ns since the epoch, this decade
    # The rows through the table's schema, as the store writes them (ns times left out:
    # to_pylist would make datetimes of them).
    for row in table.to_arrow().drop_columns(["time"]).to_pylist():
        assert row["gpu_uuid"].startswith(("GPU-", "MIG-"))
        assert (
            row["memory_total_bytes"] > 0
            and 0 <= row["memory_used_bytes"] <= row["memory_total_bytes"]
        )
        if row["utilization_ratio"] is not None:
            assert 0.0 <= row["utilization_ratio"] <= 1.0
        if row["power_watts"] is not None:
            assert 0.0 < row["power_watts"] < 2000.0
        if row["temperature_celsius"] is not None:
            assert 0.0 < row["temperature_celsius"] < 120.0
    assert first.tables["gpu"].num_rows == table.num_rows
    took_ms = second.status["gpu"].duration_seconds * 1e3
    print(f"\n{table.num_rows} GPU rows; round took {took_ms:.2f} ms")
