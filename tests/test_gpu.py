"""The gpu collector and NVML gateway against a stand-in built from real H100/H200 readings."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporters.prometheus import TallyCollector
from telemetry.collectors import CollectorContext, Runner
from telemetry.collectors.gpu import GpuCollector, mig_profile
from telemetry.nvml import Gateway, GpuLost, NvmlUnavailable
from telemetry.state import State
from telemetry.store.dataset import ReadStats, discover, read_table
from tests.support.daemon import daemon_in_process, scrape_daemon
from tests.support.gpu_side import asked
from tests.support.nvml.library import FakeClock, FakeNVML
from tests.support.nvml.profiles import (
    H100_IDLE,
    H100_LOADED,
    H100_MIG,
    H200_LOADED,
    MiB,
    ProcessProfile,
)
from tests.support.promtool import promtool_check

FIXTURES = Path(__file__).parent / "fixtures"


def _ctx(fake: Any, procfs: Path | None = None) -> CollectorContext:
    proc = procfs or FIXTURES / "normal_host" / "proc"
    return CollectorContext(
        procfs=proc, sysfs=FIXTURES / "normal_host" / "sys", node="gpu-a1", nvml_module=fake
    )


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """One clock for the stand-in and the collector's GPM spacing."""
    fake_clock = FakeClock(start=1000.0)
    monkeypatch.setattr("telemetry.collectors.gpu.time.monotonic", fake_clock.now)
    return fake_clock


def _rows(collector: GpuCollector) -> dict[str, dict[str, Any]]:
    out = collector.collect()
    return {r["gpu_uuid"]: r for r in out["gpu"]}


def test_values_come_through_in_base_units(clock: FakeClock) -> None:
    fake = FakeNVML([H100_LOADED, H100_IDLE, H200_LOADED], clock=clock)
    rows = list(_rows(GpuCollector(_ctx(fake))).values())
    assert [r["gpu_index"] for r in rows] == [0, 1, 2]
    for row, device in zip(rows, fake.devices, strict=True):
        p = device.profile
        assert row["gpu_uuid"] == device.uuid and row["gpu_model"] == p.name
        assert row["utilization_ratio"] == p.utilization_gpu / 100
        assert row["memory_used_bytes"] == p.memory_used
        assert row["memory_total_bytes"] == p.memory_total
        assert row["power_watts"] == p.power_mw / 1000
        assert row["temperature_celsius"] == p.temperature_gpu
        assert row["energy_joules"] == pytest.approx(device.energy_mj() / 1000, abs=1)
        assert row["ecc_uncorrected_errors"] == p.ecc_uncorrected_volatile
        assert row["mig_profile"] is None and row["job_id"] is None
    # The H100 capture: 19818 MiB used of 81559 MiB, 629.45 W at 100 %.
    assert rows[0]["memory_total_bytes"] == 81559 * MiB and rows[0]["power_watts"] == 629.45


def test_energy_is_the_cumulative_counter_in_joules(clock: FakeClock) -> None:
    fake = FakeNVML([H100_LOADED], clock=clock)
    collector = GpuCollector(_ctx(fake))
    first = next(iter(_rows(collector).values()))["energy_joules"]
    clock.advance(10.0)
    second = next(iter(_rows(collector).values()))["energy_joules"]
    assert second - first == pytest.approx(629.45 * 10.0, rel=1e-3)


POWER_ONLY = FakeNVML([H100_LOADED])  # the daemon's stand-in in the energy-from-power test


def test_energy_from_power_leaves_the_counter_unread_and_counts_power_times_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--gpu.energy power``: the driver's energy counter is never asked (neither as a field
    nor by its own function), rows carry no energy, the health fields are still read, and
    the exported energy is SPEC §3's fallback, power x time."""
    asked: list[int] = []
    answer = POWER_ONLY.nvmlDeviceGetFieldValues

    def recording(handle: Any, field_ids: Any) -> Any:
        asked.extend(f[0] if isinstance(f, tuple) else f for f in field_ids)
        return answer(handle, field_ids)

    monkeypatch.setattr(POWER_ONLY, "nvmlDeviceGetFieldValues", recording)
    data = tmp_path / "data"
    with daemon_in_process(data, "watts", "tests.test_gpu:POWER_ONLY", gpu_energy="power") as d:
        ticks = iter(int((1_800_000_000 + s) * 1e9) for s in (0, 10, 20))
        d.runner.clock_ns = lambda: next(ticks)
        for _ in range(3):
            d.round()
        text = d.render_text().decode()
        stored = read_table(data, "gpu", discover(data)["gpu"], ReadStats())
    assert asked and pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION not in asked
    assert pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL in asked
    assert POWER_ONLY.calls["nvmlDeviceGetTotalEnergyConsumption"] == 0
    assert stored.num_rows == 3 and stored.column("energy_joules").null_count == 3
    watts = H100_LOADED.power_mw / 1000
    assert stored.column("power_watts").to_pylist() == [pytest.approx(watts)] * 3  # float32
    energy = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tally_gpu_energy_joules_total{")
    ]
    assert energy == [pytest.approx(watts * 20)]  # two 10 s intervals


def test_sm_activity_from_gpm_needs_two_samples_100ms_apart(clock: FakeClock) -> None:
    fake = FakeNVML([H100_LOADED], clock=clock)
    fake.devices[0].sm_activity_pct = 73.0
    collector = GpuCollector(_ctx(fake))
    assert next(iter(_rows(collector).values()))["sm_active_ratio"] is None  # first sample only
    clock.advance(0.05)
    assert next(iter(_rows(collector).values()))["sm_active_ratio"] is None  # too soon
    clock.advance(1.0)
    assert next(iter(_rows(collector).values()))["sm_active_ratio"] == pytest.approx(0.73)
    fake.devices[0].sm_activity_pct = 20.0
    clock.advance(1.0)
    assert next(iter(_rows(collector).values()))["sm_active_ratio"] == pytest.approx(0.20)
    assert fake.calls["nvmlGpmQueryDeviceSupport"] == 1


def test_mig_instances_are_rows_with_their_profile(clock: FakeClock) -> None:
    fake = FakeNVML([H100_MIG], clock=clock)
    rows = _rows(GpuCollector(_ctx(fake)))
    parent = fake.devices[0]
    migs = [r for r in rows.values() if r["mig_profile"] is not None]
    assert sorted(r["mig_profile"] for r in migs) == sorted(
        i.profile for i in H100_MIG.mig_instances
    )
    for mig in parent.mig_devices:
        row = rows[mig.uuid]
        assert row["gpu_uuid"].startswith("MIG-") and row["gpu_index"] == 0
        assert row["memory_total_bytes"] == mig.profile.memory_total
        assert row["utilization_ratio"] is None  # NotSupported on MIG handles, as on real drivers
    assert rows[parent.uuid]["mig_profile"] is None
    assert mig_profile("NVIDIA H100 80GB HBM3 MIG 1g.10gb") == "1g.10gb"
    assert mig_profile("NVIDIA H100 80GB HBM3") is None


def test_a_lost_gpu_is_skipped_logged_once_and_comes_back(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeNVML([H100_LOADED, H100_IDLE], clock=clock)
    collector = GpuCollector(_ctx(fake))
    assert len(_rows(collector)) == 2
    fake.lose_gpu(1)
    with caplog.at_level(logging.WARNING, logger="tally"):
        for _ in range(3):
            rows = _rows(collector)
            assert [r["gpu_index"] for r in rows.values()] == [0]
    lost = [r.message for r in caplog.records if "GPU is lost" in r.message]
    assert len(lost) == 1, lost
    fake.restore_gpu(1)
    assert len(_rows(collector)) == 2


def test_unsupported_fields_are_null_and_logged_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeNVML([H100_LOADED], clock=clock)
    fake.set_unsupported(0, "nvmlDeviceGetPowerUsage")
    fake.set_unsupported_fields(0, fake.NVML_FI_DEV_ECC_DBE_VOL_TOTAL)
    collector = GpuCollector(_ctx(fake))
    with caplog.at_level(logging.WARNING, logger="tally"):
        for _ in range(3):
            row = next(iter(_rows(collector).values()))
            assert row["power_watts"] is None and row["ecc_uncorrected_errors"] is None
            assert row["utilization_ratio"] == 1.0
    assert sum("nvmlDeviceGetPowerUsage" in r.message for r in caplog.records) == 1


def test_field_values_are_batched_and_versioned_symbols_probed_once(clock: FakeClock) -> None:
    fake = FakeNVML([H100_LOADED, H100_IDLE], clock=clock, old_driver=True)
    collector = GpuCollector(_ctx(fake))
    for _ in range(3):
        rows = list(_rows(collector).values())
        assert rows[0]["temperature_celsius"] == H100_LOADED.temperature_gpu  # the old symbol
        assert rows[0]["clock_event_reasons"] == H100_LOADED.clocks_event_reasons
    assert fake.calls["nvmlDeviceGetFieldValues"] == 6  # one per device per round
    assert fake.calls["nvmlDeviceGetTemperatureV"] == 1  # probed once, then the older symbol
    assert fake.calls["nvmlDeviceGetTemperature"] == 6
    assert fake.calls["nvmlDeviceGetCurrentClocksEventReasons"] == 1
    assert fake.calls["nvmlGpmQueryDeviceSupport"] <= 2  # once per device, never again


@pytest.mark.parametrize("c_functions", [True, False], ids=["c-functions", "wrappers"])
def test_field_values_from_pynvml_arrays_and_from_plain_objects(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch, c_functions: bool
) -> None:
    hidden = [] if c_functions else ["_nvmlGetFunctionPointer"]
    fake = FakeNVML([H100_LOADED], clock=clock, hidden=hidden)
    fake.set_unsupported_fields(0, fake.NVML_FI_DEV_ECC_DBE_VOL_TOTAL)
    gateway = Gateway(fake)
    handle = gateway.call("nvmlDeviceGetHandleByIndex", 0)
    ids = [
        fake.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,  # unsigned long long
        fake.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,  # not supported here
        fake.NVML_FI_DEV_MEMORY_TEMP,  # unsigned int
        10_000,  # unknown to the driver
    ]
    for _ in range(2):  # the second call reuses the first one's request
        assert gateway.field_values(handle, ids) == {
            ids[0]: float(fake.devices[0].energy_mj()),
            ids[1]: None,
            ids[2]: float(H100_LOADED.temperature_memory),
            ids[3]: None,
        }
        clock.advance(1.0)
    assert fake.c_calls["nvmlDeviceGetFieldValues"] == (2 if c_functions else 0)
    if c_functions:
        return
    asked: list[Any] = []

    def plain(handle: Any, fieldIds: list[Any]) -> list[Any]:  # another binding's answer
        asked.append(fieldIds)
        value = SimpleNamespace(dVal=2.5)
        return [SimpleNamespace(nvmlReturn=0, valueType=fake.NVML_VALUE_TYPE_DOUBLE, value=value)]

    monkeypatch.setattr(fake, "nvmlDeviceGetFieldValues", plain)
    assert gateway.field_values(handle, ids[:1]) == {ids[0]: 2.5}
    assert asked == [[(ids[0], 0)]]  # scope 0: what pynvml writes for a bare id as well


def test_field_values_of_every_value_type_read_as_the_union_reads_them(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C function's answers are read by one struct call: each value type's member of the
    union, as ctypes reads it (a wide unsigned, a negative signed, a double, 32 bits of a
    union whose other bytes are set), a failed entry and an unknown type null."""
    fake = FakeNVML([H100_LOADED], clock=clock)
    gateway = Gateway(fake)
    handle = gateway.call("nvmlDeviceGetHandleByIndex", 0)
    entries = [  # value type, union member, value
        (fake.NVML_VALUE_TYPE_DOUBLE, "dVal", -2.5e-300),
        (fake.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", 2**32 - 1),
        (fake.NVML_VALUE_TYPE_UNSIGNED_LONG, "ulVal", 2**40 + 3),
        (fake.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 2**64 - 2),
        (fake.NVML_VALUE_TYPE_SIGNED_LONG_LONG, "sllVal", -(2**62) - 1),
        (fake.NVML_VALUE_TYPE_SIGNED_INT, "siVal", -7),
        (fake.NVML_VALUE_TYPE_UNSIGNED_INT, "ullVal", 2**63 + 5),  # high bytes not the uint's
        (fake.NVML_VALUE_TYPE_DOUBLE, "dVal", 1.0),  # answered with an error
        (99, "ullVal", 5),  # a type this gateway does not know
    ]
    ids = tuple(range(1000, 1000 + len(entries)))
    expected: dict[int, float | None] = {}

    def answer(handle: Any, count: int, values: Any) -> int:
        for entry, field_id, (kind, member, value) in zip(values, ids, entries, strict=True):
            entry.fieldId, entry.valueType = field_id, kind
            entry.nvmlReturn = 3 if field_id == ids[7] else 0
            setattr(entry.value, member, value)
            known = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}
            read = None if kind not in known else getattr(entry.value, known[kind])
            expected[field_id] = None if entry.nvmlReturn or read is None else float(read)
        return 0

    lookup = fake._nvmlGetFunctionPointer
    monkeypatch.setattr(
        fake,
        "_nvmlGetFunctionPointer",
        lambda name: answer if name == "nvmlDeviceGetFieldValues" else lookup(name),
    )
    for _ in range(2):  # the second call reads with the struct the first made
        expected.clear()
        got = gateway.field_values(handle, ids)
        assert got == expected and len(expected) == len(entries)
    assert got[ids[1]] == 2**32 - 1 and got[ids[5]] == -7.0 and got[ids[6]] == 5.0
    assert got[ids[7]] is None and got[ids[8]] is None


def test_c_functions_read_what_the_wrappers_read(clock: FakeClock) -> None:
    """The gateway's calls past pynvml's wrappers (buffers kept between calls, grown when NVML
    answers they are too small) give the collector what the wrappers give, round after round,
    through faults."""
    profiles = [H100_LOADED, H100_IDLE, H100_MIG, H200_LOADED]
    fakes = {
        hidden: FakeNVML(profiles, clock=clock, hidden=hidden)
        for hidden in ((), ("_nvmlGetFunctionPointer",))
    }
    # more processes and samples than the kept buffers first hold; one framebuffer unknown
    unknown = 2**64 - 1
    crowd = [ProcessProfile(5000 + i, (i + 1) * MiB, sm_util_pct=i % 100) for i in range(150)]
    crowd.append(ProcessProfile(9999, unknown, sm_util_pct=7))
    for fake in fakes.values():
        fake.set_processes(1, crowd)
    collectors = {hidden: GpuCollector(_ctx(fake)) for hidden, fake in fakes.items()}
    faults = {
        1: lambda f: (f.inject_xid(0, 79), f.inject_xid(0, 48), f.inject_xid(2, 13)),
        2: lambda f: f.set_unsupported(0, "nvmlDeviceGetTemperatureV"),
        3: lambda f: f.set_unsupported(1, "nvmlDeviceGetComputeRunningProcesses_v3"),
        4: lambda f: (
            f.set_unsupported(1, "nvmlDeviceGetProcessUtilization"),
            f.set_unsupported(2, "nvmlGpmSampleGet"),
        ),
        5: lambda f: f.lose_gpu(3),
        6: lambda f: f.set_unsupported_fields(0, f.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION),
        7: lambda f: (
            f.set_unsupported(0, "nvmlDeviceGetPowerUsage"),
            f.set_unsupported(1, "nvmlDeviceGetUtilizationRates"),
            f.set_unsupported(1, "nvmlDeviceGetMemoryInfo"),
            f.set_unsupported(0, "nvmlDeviceGetCurrentClocksEventReasons"),
        ),
    }
    for round_ in range(8):
        clock.advance(1.0)
        for fake in fakes.values():
            if round_ in faults:
                faults[round_](fake)
        with_c, wrappers = (asked(c.collect()) for c in collectors.values())
        assert with_c == wrappers, f"round {round_}"
        if round_ == 1:  # all 151 processes and their samples, the unknown framebuffer null
            side = {r["gpu_uuid"]: r for r in with_c["_gpu_pids"]}[fakes[()].devices[1].uuid]
            assert len(side["pids"]) == 151 and side["memory"][9999] is None
            assert side["sm"][5042] == 0.42
            assert side["memory"][5149] == 150 * MiB
    assert (with_c["gpu"][0]["xid_errors"], with_c["gpu"][0]["xid_last"]) == (2, 48)
    assert with_c["gpu"][0]["temperature_celsius"] is None
    assert with_c["gpu"][0]["energy_joules"] is not None  # the older call answers instead
    assert 3 not in {r["gpu_index"] for r in with_c["gpu"]}
    assert with_c["gpu"][0]["power_watts"] is None
    assert with_c["gpu"][0]["clock_event_reasons"] is None
    idle = {r["gpu_index"]: r for r in with_c["gpu"]}[1]
    assert (idle["utilization_ratio"], idle["memory_used_bytes"]) == (None, 0)
    c_calls = fakes[()].c_calls
    assert c_calls["nvmlDeviceGetComputeRunningProcesses_v3"] > 8
    assert c_calls["nvmlDeviceGetProcessUtilization"] > 8
    assert c_calls["nvmlDeviceGetFieldValues"] > 8 and c_calls["nvmlDeviceGetTemperatureV"] > 8
    assert c_calls["nvmlEventSetWait_v2"] >= 8 + 3  # each round's look, and each XID
    assert c_calls["nvmlGpmSampleGet"] > 8 and c_calls["nvmlGpmMetricsGet"] > 8
    gpm = {r["gpu_index"]: r["sm_active_ratio"] for r in with_c["gpu"] if "sm_active_ratio" in r}
    assert gpm[0] is not None and gpm[2] is None  # GPM given up where a sample failed
    for name in (
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetMemoryInfo_v2",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetCurrentClocksEventReasons",
    ):
        assert c_calls[name] > 8, name
    assert not fakes[("_nvmlGetFunctionPointer",)].c_calls


def test_a_c_function_the_driver_lacks_is_not_called_again(clock: FakeClock) -> None:
    """Memory v2 found missing in the driver by its C function: null, and never asked again
    (review finding: it was remembered under the wrapper's name, and called every round)."""
    fake = FakeNVML([H100_IDLE], clock=clock)
    gateway = Gateway(fake)
    handle = gateway.call("nvmlDeviceGetHandleByIndex", 0)
    for _ in range(2):  # the first probes the version through the wrapper, the second is C
        assert gateway.memory(handle) is not None
    fake.missing_symbols.add("nvmlDeviceGetMemoryInfo_v2")
    before = fake.c_calls["nvmlDeviceGetMemoryInfo_v2"]
    for _ in range(3):
        assert gateway.memory(handle) is None
    assert fake.c_calls["nvmlDeviceGetMemoryInfo_v2"] == before + 1


_READINGS = (
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTemperatureV",
    "nvmlDeviceGetCurrentClocksEventReasons",
)


def _alone(gateway: Gateway, handle: Any) -> tuple[Any, ...]:
    """The five readings, each asked by its own method."""
    return (
        gateway.utilization(handle),
        gateway.memory(handle),
        gateway.power_mw(handle),
        gateway.temperature(handle),
        gateway.clock_reasons(handle),
    )


def test_readings_in_one_go_answer_and_fail_as_each_reading_alone(clock: FakeClock) -> None:
    """A device's five readings asked in one go (each on its C function) answer what their own
    methods answer: NotSupported nulls that reading alone, asked again next round; a symbol the
    driver lacks is null and never called again, also where another call found it missing
    first; a lost GPU raises."""
    fake = FakeNVML([H100_LOADED, H100_LOADED], clock=clock)
    gateway = Gateway(fake)
    h0, h1 = (gateway.call("nvmlDeviceGetHandleByIndex", i) for i in (0, 1))
    first = gateway.readings(h0)  # probes the versions through the wrappers
    assert first == _alone(gateway, h0) and None not in first
    c_calls = dict(fake.c_calls)
    assert gateway.readings(h0) == first == _alone(gateway, h0)
    assert all(fake.c_calls[name] == c_calls[name] + 2 for name in _READINGS)

    fake.set_unsupported(0, "nvmlDeviceGetPowerUsage")
    for _ in range(2):
        before = fake.c_calls["nvmlDeviceGetPowerUsage"]
        util, memory, power, temperature, reasons = gateway.readings(h0)
        assert power is None and fake.c_calls["nvmlDeviceGetPowerUsage"] == before + 1
        assert (util, memory, temperature, reasons) == (first[0], first[1], *first[3:])
        assert gateway.readings(h1)[2] == first[2]  # the other GPU answers it

    fake.missing_symbols.add("nvmlDeviceGetMemoryInfo_v2")
    before = fake.c_calls["nvmlDeviceGetMemoryInfo_v2"]
    for _ in range(3):
        assert gateway.readings(h1) == (first[0], None, *first[2:])
    assert fake.c_calls["nvmlDeviceGetMemoryInfo_v2"] == before + 1

    fake.lose_gpu(1)
    with pytest.raises(GpuLost):
        gateway.readings(h1)

    # found missing by a reading's own method (as a MIG instance's is asked): not called again
    fresh = FakeNVML([H100_LOADED], clock=clock)
    gateway = Gateway(fresh)
    handle = gateway.call("nvmlDeviceGetHandleByIndex", 0)
    gateway.readings(handle)
    gateway.readings(handle)
    fresh.missing_symbols.add("nvmlDeviceGetMemoryInfo_v2")
    assert gateway.memory(handle) is None
    before = fresh.c_calls["nvmlDeviceGetMemoryInfo_v2"]
    assert gateway.readings(handle)[1] is None
    assert fresh.c_calls["nvmlDeviceGetMemoryInfo_v2"] == before


@pytest.mark.parametrize("c_functions", [True, False], ids=["c-functions", "wrappers"])
def test_gpm_metrics_answer_and_fail_alike_through_c_and_wrappers(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch, c_functions: bool
) -> None:
    """GPM through its C functions answers as through pynvml's wrappers: the SM metric between
    two samples, null for a metric NVML does not give, null (logged) for a failed call, a lost
    GPU raised; the kept request is made anew after NVML is initialised again."""
    hidden = [] if c_functions else ["_nvmlGetFunctionPointer"]
    fake = FakeNVML([H100_LOADED], clock=clock, hidden=hidden)
    gateway = Gateway(fake)
    handle = gateway.call("nvmlDeviceGetHandleByIndex", 0)

    def two_samples() -> tuple[Any, Any]:
        first, second = gateway.call("nvmlGpmSampleAlloc"), gateway.call("nvmlGpmSampleAlloc")
        assert gateway.gpm_sample(handle, first)
        clock.advance(1.0)
        assert gateway.gpm_sample(handle, second)
        return first, second

    s1, s2 = two_samples()
    sm = gateway.gpm_metric(fake.NVML_GPM_METRIC_SM_UTIL, s1, s2)
    assert sm is not None and 0.0 < sm <= 100.0
    assert gateway.gpm_metric(fake.NVML_GPM_METRIC_SM_OCCUPANCY, s1, s2) is None
    works = fake.nvmlGpmMetricsGet

    def failing(code: int) -> Any:
        def answer(request: Any) -> Any:
            raise pynvml.NVMLError(code)

        return answer

    monkeypatch.setattr(fake, "nvmlGpmMetricsGet", failing(pynvml.NVML_ERROR_UNKNOWN))
    assert gateway.gpm_metric(fake.NVML_GPM_METRIC_SM_UTIL, s1, s2) is None
    monkeypatch.setattr(fake, "nvmlGpmMetricsGet", failing(pynvml.NVML_ERROR_GPU_IS_LOST))
    with pytest.raises(GpuLost):
        gateway.gpm_metric(fake.NVML_GPM_METRIC_SM_UTIL, s1, s2)
    monkeypatch.setattr(fake, "nvmlGpmMetricsGet", works)
    gateway.shutdown()
    handle = gateway.call("nvmlDeviceGetHandleByIndex", 0)  # initialised again
    s1, s2 = two_samples()
    assert gateway.gpm_metric(fake.NVML_GPM_METRIC_SM_UTIL, s1, s2) == pytest.approx(sm)
    assert fake.c_calls["nvmlGpmMetricsGet"] == (5 if c_functions else 0)


def test_c_lists_are_read_whole_when_a_driver_fills_what_fits(clock: FakeClock) -> None:
    """A driver that fills an array too small and succeeds (rather than answering
    InsufficientSize) still has every process and every sample read: an array filled to its
    last entry is grown and asked again."""
    crowd = [ProcessProfile(5000 + i, MiB, sm_util_pct=1 + i % 99) for i in range(150)]
    answers = []
    for hidden in ((), ("_nvmlGetFunctionPointer",)):
        fake = FakeNVML([H100_LOADED], clock=clock, hidden=hidden)
        fake.c_lists_fill_what_fits = True
        fake.set_processes(0, crowd)
        gateway = Gateway(fake)
        handle = gateway.call("nvmlDeviceGetHandleByIndex", 0)
        gateway.processes(handle)  # the first call probes the versions through the wrappers
        clock.advance(2.0)
        answers.append((gateway.processes(handle), gateway.process_utilization("g", handle)))
    (processes, samples), (wrapper_processes, wrapper_samples) = answers
    assert processes is not None and len(processes) == 150
    assert processes == wrapper_processes
    assert samples is not None and len(samples) > 128  # more than the first array held
    assert [(s.pid, s.sm_ratio) for s in samples] == [
        (s.pid, s.sm_ratio) for s in wrapper_samples or []
    ]


def test_no_library_or_driver_fails_the_collector_not_the_round(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    from telemetry.collectors.cpu import CpuCollector

    for fake in (
        FakeNVML([H100_LOADED], library_present=False),
        FakeNVML([H100_LOADED], driver_loaded=False),
    ):
        ctx = _ctx(fake)
        runner = Runner([CpuCollector(ctx), GpuCollector(ctx)])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tally"):
            for _ in range(3):
                result = runner.run()
                assert result.status["cpu"].success and not result.status["gpu"].success
                assert "gpu" not in result.tables and result.tables["cpu"].num_rows == 1
        assert sum("collector gpu failed" in r.message for r in caplog.records) == 1
    with pytest.raises(NvmlUnavailable, match="NVML init failed"):
        _ = Gateway(FakeNVML(library_present=False)).nvml


def test_xid_events_are_counted_without_blocking(clock: FakeClock) -> None:
    fake = FakeNVML([H100_LOADED, H100_IDLE], clock=clock)
    collector = GpuCollector(_ctx(fake))
    _rows(collector)  # registers the event set
    fake.inject_xid(1, 79)
    fake.inject_xid(1, 48)
    start = time.perf_counter()
    rows = list(_rows(collector).values())
    assert time.perf_counter() - start < 0.5
    assert (rows[1]["xid_errors"], rows[1]["xid_last"]) == (2, 48)
    assert (rows[0]["xid_errors"], rows[0]["xid_last"]) == (0, None)


def test_gpu_job_from_slurm_claim_else_from_process_cgroup(
    tmp_path: Path, clock: FakeClock
) -> None:
    fake = FakeNVML([H100_LOADED, H100_IDLE], clock=clock)
    fake.set_processes(0, [])
    fake.set_processes(1, [4242])
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text(
        "0::/system.slice/slurmstepd.scope/job_777/step_0/user/task_0\n"
    )
    collector = GpuCollector(_ctx(fake, proc))

    class Claims(GpuCollector):
        name = "claims-test"

        def collect(self) -> dict[str, list[dict[str, Any]]]:
            return {"_gpu_job": [{"gpu_index": 0, "job_id": "555"}]}

    result = Runner([collector, Claims(_ctx(fake, proc))]).run()
    jobs = dict(
        zip(
            result.tables["gpu"].to_arrow().column("gpu_index").to_pylist(),
            result.tables["gpu"].to_arrow().column("job_id").to_pylist(),
            strict=True,
        )
    )
    assert jobs == {0: "555", 1: "777"}


def assert_promtool_clean_but_dcgm_labels(promtool: str, text: bytes) -> None:
    """dcgm-exporter's camelCase labels (UUID, modelName, Hostname) and its energy counter
    without ``_total`` are what its dashboards use; promtool's style lint flags exactly those and
    nothing else."""
    check = promtool_check(promtool, text)
    complaints = [line for line in check.stderr.decode().splitlines() if line.strip()]
    energy = 'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter metrics should have "_total" suffix'
    assert all(c.startswith("DCGM_") and ("camelCase" in c or energy in c) for c in complaints), (
        complaints
    )
    without = b"\n".join(line for line in text.splitlines() if b"DCGM_" not in line) + b"\n"
    clean = promtool_check(promtool, without)
    assert clean.returncode == 0, clean.stdout + clean.stderr


def _exposition(fake: FakeNVML, clock: FakeClock, dcgm: bool) -> bytes:
    ctx = _ctx(fake)
    runner = Runner([GpuCollector(ctx)])
    state = State()
    for _ in range(3):
        result = runner.run()
        state.ingest("gpu", result.tables["gpu"])
        clock.advance(5.0)
        time.sleep(0.002)  # distinct sample times
    snapshot = state.snapshot(result.status)
    return TallyCollector(lambda: snapshot, dcgm_compat=dcgm).render_text()  # as served


def test_exposition_with_dcgm_compat_passes_promtool(clock: FakeClock, promtool: str) -> None:
    fake = FakeNVML([H100_LOADED, H100_MIG], clock=clock)
    text = _exposition(fake, clock, dcgm=True)
    assert_promtool_clean_but_dcgm_labels(promtool, text)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    }
    h100 = fake.devices[0]
    labels = (
        ("GPU_I_ID", ""),  # empty: no label to Prometheus, as dcgm-exporter omits it
        ("GPU_I_PROFILE", ""),
        ("Hostname", "gpu-a1"),
        ("UUID", h100.uuid),
        ("device", "nvidia0"),
        ("gpu", "0"),
        ("modelName", H100_LOADED.name),
    )
    assert samples[("DCGM_FI_DEV_FB_USED", labels)] == H100_LOADED.memory_used / MiB
    assert samples[("DCGM_FI_DEV_GPU_UTIL", labels)] == 100.0
    assert samples[("DCGM_FI_DEV_POWER_USAGE", labels)] == pytest.approx(629.45)
    # What dcgm-exporter's own dashboard fills its instance and gpu variables from.
    assert samples[("DCGM_FI_DEV_GPU_TEMP", labels)] == H100_LOADED.temperature_gpu
    temps = {dict(k[1])["gpu"] for k in samples if k[0] == "DCGM_FI_DEV_GPU_TEMP"}
    assert temps == {"0", "1"}
    # Energy typed as dcgm-exporter types it: a counter under its bare name.
    assert b"# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n" in text
    assert b"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION_total" not in text
    # MIG instances carry their profile and GPU instance id (the capture's GI 2 is the 3g).
    mig = fake.devices[1].mig_devices[0]
    used = {dict(k[1])["UUID"]: dict(k[1]) for k in samples if k[0] == "DCGM_FI_DEV_FB_USED"}
    assert (used[mig.uuid]["GPU_I_PROFILE"], used[mig.uuid]["GPU_I_ID"]) == ("3g.40gb", "2")
    assert used[mig.uuid]["gpu"] == "1"
    migs = [k for k in samples if k[0] == "tally_gpu_info" and dict(k[1])["mig_profile"]]
    assert len(migs) == len(H100_MIG.mig_instances)
    plain = _exposition(FakeNVML([H100_LOADED], clock=clock), clock, dcgm=False)
    assert b"DCGM_" not in plain


def test_daemon_end_to_end_with_the_stand_in(tmp_path: Path, promtool: str) -> None:
    text = scrape_daemon(
        tmp_path / "data", "gpu-e2e",
        "--path.procfs", str(FIXTURES / "normal_host" / "proc"),
        "--path.sysfs", str(FIXTURES / "normal_host" / "sys"),
        "--nvml.module", "tests.support.nvml.standin:NVML", "--dcgm-compat",
    )  # fmt: skip
    assert_promtool_clean_but_dcgm_labels(promtool, text)
    assert b'tally_collector_success{collector="gpu"} 1.0' in text
    assert text.count(b"tally_gpu_info{") == 2 + len(H100_MIG.mig_instances)
    assert b'tally_cpus{node="gpu-e2e"} 64.0' in text
    gpu_files = list((tmp_path / "data" / "gpu").rglob("*.parquet"))
    assert gpu_files, "gpu samples were stored"


def test_daemon_attributes_gpus_to_slurm_jobs_end_to_end(tmp_path: Path, promtool: str) -> None:
    """Fixture roots with Slurm cgroups v2 and the stand-in: job 1002 claims GPUs 0 and 1."""
    import shutil

    root = tmp_path / "node"
    shutil.copytree(FIXTURES / "slurm_v2", root)
    for name in ("stat", "meminfo"):
        shutil.copy(FIXTURES / "normal_host" / "proc" / name, root / "proc" / name)
    text = scrape_daemon(
        tmp_path / "data", "node07",
        "--path.procfs", str(root / "proc"), "--path.sysfs", str(root / "sys"),
        "--nvml.module", "tests.support.nvml.standin:NVML",
    )  # fmt: skip
    check = promtool_check(promtool, text)
    assert check.returncode == 0, check.stdout + check.stderr
    samples = [
        (s.name, s.labels, s.value)
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    ]
    held = {(lab["gpu"], lab["job"]) for name, lab, _ in samples if name == "tally_gpu_job_info"}
    # GPU 0 (whole H100) and GPU 1 (MIG parent and its instances) belong to job 1002.
    assert ("0", "1002") in held and ("1", "1002") in held
    jobs = {lab["job"]: lab for name, lab, _ in samples if name == "tally_job_info"}
    assert {"1001", "1002", "1003", "1004", "1005", "2001"} <= set(jobs)
    assert jobs["1002"]["user"] == "bob" and jobs["1002"]["account"] == "chemistry"
    alloc = {lab["job"]: v for name, lab, v in samples if name == "tally_job_gpus_allocated"}
    assert alloc["1002"] == 2.0 and alloc["1001"] == 0.0


def test_what_cannot_change_is_asked_once_and_again_after_a_loss_or_a_new_init(
    clock: FakeClock,
) -> None:
    """Count, handles, UUIDs, names and MIG mode are asked once per NVML initialisation; a GPU
    lost after that is still skipped the round it is lost, and asked anew when it is back."""
    fake = FakeNVML([H100_LOADED, H100_IDLE], clock=clock)
    gateway = Gateway(fake)
    collector = GpuCollector(_ctx(fake), gateway)
    static = (
        "nvmlDeviceGetCount",
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetName",
        "nvmlDeviceGetMigMode",
    )
    first = _rows(collector)
    for _ in range(3):
        clock.advance(1.0)
        assert set(_rows(collector)) == set(first)
    assert [fake.calls[name] for name in static] == [1, 2, 2, 2, 2]
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 8  # the rest is read every round
    fake.lose_gpu(1)
    assert [r["gpu_index"] for r in _rows(collector).values()] == [0]  # the same round
    fake.restore_gpu(1)
    rows = _rows(collector)
    assert rows[fake.devices[1].uuid]["gpu_model"] == H100_IDLE.name
    assert fake.calls["nvmlDeviceGetUUID"] == 3  # asked afresh for the GPU that came back
    # The driver goes away and comes back: everything is asked anew.
    fake.driver_loaded = False
    while fake._init_count:
        fake.nvmlShutdown()
    with pytest.raises(NvmlUnavailable):
        collector.collect()
    fake.driver_loaded = True
    fake.reset_calls()
    assert set(_rows(collector)) == set(first)
    assert [fake.calls[name] for name in static] == [1, 2, 2, 2, 2]
    assert gateway.generation == 2
