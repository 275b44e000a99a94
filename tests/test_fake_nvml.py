"""Pin the NVML stand-in (tests/support/nvml/) to the real pynvml's names, types and errors."""

from __future__ import annotations

import ctypes
import inspect
import threading

import pynvml
import pytest

from tests.support.nvml.library import FakeClock, FakeNVML
from tests.support.nvml.profiles import H100_IDLE, H100_LOADED, H100_MIG, H200_LOADED, PROFILES, MiB


def started(*profiles: object, **kwargs: object) -> FakeNVML:
    fake = FakeNVML(list(profiles) or [H100_LOADED], **kwargs)  # type: ignore[arg-type]
    fake.nvmlInit()
    return fake


IMPLEMENTED = [
    name
    for name in dir(FakeNVML)
    if name.startswith("nvml") and inspect.isfunction(getattr(FakeNVML, name))
]


def test_every_function_has_pynvml_name_and_parameters() -> None:
    fake = FakeNVML()
    assert len(IMPLEMENTED) > 40
    for name in IMPLEMENTED:
        real = inspect.signature(getattr(pynvml, name))
        mine = inspect.signature(getattr(fake, name))
        assert list(mine.parameters) == list(real.parameters), name
        defaults = [p.default for p in mine.parameters.values()]
        assert defaults == [p.default for p in real.parameters.values()], name


def test_exceptions_and_constants_are_the_real_ones() -> None:
    fake = FakeNVML()
    for name in ("NVMLError", "NVMLError_NotSupported", "NVMLError_GpuIsLost", "NVMLError_Timeout"):
        assert getattr(fake, name) is getattr(pynvml, name)
    assert fake.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION == pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION
    assert fake.nvmlMemory_v2 == pynvml.nvmlMemory_v2
    assert fake.c_nvmlGpmMetricsGet_t is pynvml.c_nvmlGpmMetricsGet_t
    assert not hasattr(fake, "nvmlDeviceGetBAR1MemoryInfo")  # not implemented -> absent


def test_errors_are_raised_like_pynvml() -> None:
    fake = FakeNVML([H100_MIG])
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    mig = fake.nvmlDeviceGetMigDeviceHandleByIndex(fake.nvmlDeviceGetHandleByIndex(0), 0)
    with pytest.raises(pynvml.NVMLError) as caught:
        fake.nvmlDeviceGetUtilizationRates(mig)
    assert type(caught.value) is pynvml.NVMLError_NotSupported
    assert caught.value.value == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert caught.value == pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetPowerUsage(None)


def test_init_faults() -> None:
    missing = FakeNVML(library_present=False)
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        missing.nvmlInit()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        missing.nvmlSystemGetDriverVersion()
    no_driver = FakeNVML(driver_loaded=False)
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        no_driver.nvmlInit()
    fake = started()
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()


def test_structures_and_capture_values() -> None:
    fake = started(H100_LOADED)
    h = fake.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(h, pynvml.c_nvmlDevice_t)
    assert fake.nvmlDeviceGetName(h) == "NVIDIA H100 80GB HBM3"
    assert fake.nvmlDeviceGetUUID(h).startswith("GPU-")
    assert fake.nvmlSystemGetDriverVersion() == "590.48.01"
    util = fake.nvmlDeviceGetUtilizationRates(h)
    assert isinstance(util, pynvml.c_nvmlUtilization_t)
    assert (util.gpu, util.memory) == (100, 11)
    v1 = fake.nvmlDeviceGetMemoryInfo(h)
    assert isinstance(v1, pynvml.c_nvmlMemory_t)
    assert v1.total == 81559 * MiB == 85_520_809_984
    assert v1.used + v1.free == v1.total
    v2 = fake.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    assert isinstance(v2, pynvml.c_nvmlMemory_v2_t)
    assert (v2.reserved, v2.used) == (479 * MiB, 19818 * MiB)
    assert fake.nvmlDeviceGetPowerUsage(h) == 629_450
    assert fake.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == 59
    assert fake.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU) == 59
    assert fake.nvmlDeviceGetRemappedRows(h) == (0, 0, 0, 0)
    assert fake.nvmlDeviceGetCurrentClocksEventReasons(h) == 0
    procs = fake.nvmlDeviceGetComputeRunningProcesses(h)
    assert [(p.pid, p.usedGpuMemory) for p in procs][-1] == (11345, 15690 * MiB)
    assert procs[0].gpuInstanceId == 0xFFFFFFFF
    assert set(PROFILES) >= {"h100_idle", "h100_loaded", "h200_loaded", "h100_mig"}
    assert "APPROXIMATION" in H200_LOADED.source


def test_field_values_use_the_value_union() -> None:
    fake = started(H100_IDLE)
    h = fake.nvmlDeviceGetHandleByIndex(0)
    ids = [
        pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
        pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
        (pynvml.NVML_FI_DEV_REMAPPED_PENDING, 0),
        pynvml.NVML_FI_DEV_NVLINK_BANDWIDTH_C0_TOTAL,  # not modelled -> per-entry NotSupported
    ]
    values = fake.nvmlDeviceGetFieldValues(h, ids)
    assert all(isinstance(v, pynvml.c_nvmlFieldValue_t) for v in values)
    energy, dbe, pending, nvlink = values
    assert (energy.fieldId, energy.nvmlReturn) == (ids[0], pynvml.NVML_SUCCESS)
    assert energy.valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    assert energy.value.ullVal == fake.nvmlDeviceGetTotalEnergyConsumption(h) > 0
    assert isinstance(energy.value, pynvml.c_nvmlValue_t)
    assert dbe.value.ullVal == 0
    assert (pending.fieldId, pending.valueType) == (144, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT)
    assert pending.value.uiVal == 0
    assert nvlink.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_energy_and_gpm_follow_the_clock() -> None:
    clock = FakeClock(start=0.0)
    fake = started(H100_LOADED, clock=clock)
    h = fake.nvmlDeviceGetHandleByIndex(0)
    e0 = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    clock.advance(10.0)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) - e0 == 6_294_500  # 629.45 W * 10 s
    fake.devices[0].power_mw = 100_000
    clock.advance(1.0)
    assert fake.nvmlDeviceGetTotalEnergyConsumption(h) - e0 == 6_394_500

    assert fake.nvmlGpmQueryDeviceSupport(h).isSupportedDevice == 1
    s1, s2 = fake.nvmlGpmSampleAlloc(), fake.nvmlGpmSampleAlloc()
    fake.nvmlGpmSampleGet(h, s1)
    clock.advance(1.0)
    fake.devices[0].sm_activity_pct = 0.0
    clock.advance(1.0)
    fake.nvmlGpmSampleGet(h, s2)
    mg = fake.c_nvmlGpmMetricsGet_t()
    mg.version = fake.NVML_GPM_METRICS_GET_VERSION
    mg.numMetrics = 1
    mg.sample1, mg.sample2 = s1, s2
    mg.metrics[0].metricId = fake.NVML_GPM_METRIC_SM_UTIL
    fake.nvmlGpmMetricsGet(mg)
    assert mg.metrics[0].nvmlReturn == pynvml.NVML_SUCCESS
    assert mg.metrics[0].value == pytest.approx(50.0)  # 100 % for 1 s, 0 % for 1 s
    fake.nvmlGpmSampleFree(s1)
    fake.nvmlGpmSampleFree(s2)


def test_mig_partitioned_h100() -> None:
    fake = started(H100_MIG)
    gpu = fake.nvmlDeviceGetHandleByIndex(0)
    assert fake.nvmlDeviceGetMigMode(gpu) == [pynvml.NVML_DEVICE_MIG_ENABLE] * 2
    assert fake.nvmlDeviceGetMaxMigDeviceCount(gpu) == 7
    migs = []
    for i in range(fake.nvmlDeviceGetMaxMigDeviceCount(gpu)):
        try:
            migs.append(fake.nvmlDeviceGetMigDeviceHandleByIndex(gpu, i))
        except pynvml.NVMLError_NotFound:
            continue
    names = [fake.nvmlDeviceGetName(m) for m in migs]
    assert names == [
        "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
        "NVIDIA H100 80GB HBM3 MIG 2g.20gb",
        "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
        "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
    ]
    assert all(fake.nvmlDeviceGetUUID(m).startswith("MIG-") for m in migs)
    assert [fake.nvmlDeviceGetGpuInstanceId(m) for m in migs] == [2, 3, 9, 10]
    assert fake.nvmlDeviceGetMemoryInfo(migs[0]).total == 40448 * MiB
    parent = fake.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(migs[2])
    assert fake.nvmlDeviceGetUUID(parent) == fake.nvmlDeviceGetUUID(gpu)
    assert fake.nvmlDeviceIsMigDeviceHandle(migs[0]).value == 1
    for fn in (fake.nvmlDeviceGetUtilizationRates, fake.nvmlDeviceGetPowerUsage):
        with pytest.raises(pynvml.NVMLError_NotSupported):
            fn(migs[0])
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetUtilizationRates(gpu)  # whole GPU in MIG mode: N/A
    assert fake.nvmlDeviceGetPowerUsage(gpu) == 432_210
    assert [p.pid for p in fake.nvmlDeviceGetComputeRunningProcesses(migs[0])] == [
        21180,
        21181,
        21198,
    ]
    assert fake.nvmlDeviceGetComputeRunningProcesses(migs[1]) == []


def test_gpu_lost_after_n_calls_and_restored() -> None:
    fake = started(H100_LOADED, H100_IDLE)
    h0 = fake.nvmlDeviceGetHandleByIndex(0)
    fake.lose_gpu(0, after_calls=2)
    fake.nvmlDeviceGetPowerUsage(h0)
    fake.nvmlDeviceGetName(h0)
    for _ in range(3):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            fake.nvmlDeviceGetUUID(h0)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetHandleByIndex(0)
    assert fake.nvmlDeviceGetPowerUsage(fake.nvmlDeviceGetHandleByIndex(1)) == 69_850
    fake.restore_gpu(0)
    assert fake.nvmlDeviceGetPowerUsage(h0) == 629_450


def test_unsupported_and_old_driver() -> None:
    fake = started(H100_IDLE, H100_IDLE)
    fake.set_unsupported(1, "nvmlDeviceGetTotalEnergyConsumption")
    fake.set_unsupported_fields(1, pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION)
    h0, h1 = fake.nvmlDeviceGetHandleByIndex(0), fake.nvmlDeviceGetHandleByIndex(1)
    fake.nvmlDeviceGetTotalEnergyConsumption(h0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetTotalEnergyConsumption(h1)
    (field,) = fake.nvmlDeviceGetFieldValues(h1, [pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION])
    assert field.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED

    old = started(H100_IDLE, old_driver=True)
    h = old.nvmlDeviceGetHandleByIndex(0)
    for call in (
        lambda: old.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU),
        lambda: old.nvmlDeviceGetComputeRunningProcesses(h),
        lambda: old.nvmlDeviceGetComputeRunningProcesses_v3(h),
        lambda: old.nvmlGpmQueryDeviceSupport(h),
        lambda: old.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2),
    ):
        with pytest.raises(pynvml.NVMLError_FunctionNotFound):
            call()
    assert old.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == 41
    assert old.nvmlDeviceGetComputeRunningProcesses_v2(h) == []
    hidden = FakeNVML(hidden=["nvmlDeviceGetTemperatureV"])
    assert not hasattr(hidden, "nvmlDeviceGetTemperatureV")


def test_hidden_names_are_absent_on_that_instance_only() -> None:
    hidden = started(H100_IDLE, hidden=["nvmlDeviceGetTemperatureV", "nvmlMemory_v2"])
    assert hidden.hidden == {"nvmlDeviceGetTemperatureV", "nvmlMemory_v2"}
    assert getattr(hidden, "nvmlMemory_v2", None) is None
    with pytest.raises(AttributeError, match="nvmlDeviceGetTemperatureV"):
        hidden.nvmlDeviceGetTemperatureV  # noqa: B018
    assert isinstance(hidden, FakeNVML)
    h = hidden.nvmlDeviceGetHandleByIndex(0)
    assert hidden.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == 41
    other = started(H100_IDLE)
    assert other.hidden == frozenset()
    h = other.nvmlDeviceGetHandleByIndex(0)
    assert other.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU) == 41
    assert other.nvmlMemory_v2 == pynvml.nvmlMemory_v2


def test_a_handle_that_is_no_device_is_an_invalid_argument() -> None:
    fake = started(H100_IDLE)
    sample = fake.nvmlGpmSampleAlloc()
    elsewhere = ctypes.create_string_buffer(8)
    for handle in (
        pynvml.c_nvmlDevice_t(),  # NULL
        ctypes.cast(elsewhere, pynvml.c_nvmlDevice_t),
        ctypes.cast(sample, pynvml.c_nvmlDevice_t),  # another kind of object
        sample,
        ctypes.addressof(elsewhere),
        "GPU-0",
    ):
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            fake.nvmlDeviceGetPowerUsage(handle)
    address = ctypes.cast(fake.nvmlDeviceGetHandleByIndex(0), ctypes.c_void_p).value
    assert fake.nvmlDeviceGetPowerUsage(address) == H100_IDLE.power_mw  # as the C library


def test_xid_events() -> None:
    fake = started(H100_LOADED, H100_IDLE)
    event_set = fake.nvmlEventSetCreate()
    assert isinstance(event_set, pynvml.c_nvmlEventSet_t)
    h1 = fake.nvmlDeviceGetHandleByIndex(1)
    fake.nvmlDeviceRegisterEvents(h1, pynvml.nvmlEventTypeXidCriticalError, event_set)
    with pytest.raises(pynvml.NVMLError_Timeout):
        fake.nvmlEventSetWait_v2(event_set, 0)
    assert fake.inject_xid(0, 48) == 0  # GPU 0 not registered: dropped
    assert fake.inject_xid(1, 79) == 1
    event = fake.nvmlEventSetWait_v2(event_set, 1000)
    assert isinstance(event, pynvml.c_nvmlEventData_t)
    assert (event.eventType, event.eventData) == (pynvml.nvmlEventTypeXidCriticalError, 79)
    assert event.gpuInstanceId == 0xFFFFFFFF
    assert fake.nvmlDeviceGetUUID(event.device) == fake.nvmlDeviceGetUUID(h1)
    with pytest.raises(pynvml.NVMLError_Timeout):
        fake.nvmlEventSetWait_v2(event_set, 0)
    fake.nvmlEventSetFree(event_set)


def test_blocking_wait_is_woken_by_another_thread() -> None:
    fake = started(H100_IDLE, blocking_event_wait=True)
    event_set = fake.nvmlEventSetCreate()
    fake.nvmlDeviceRegisterEvents(
        fake.nvmlDeviceGetHandleByIndex(0), pynvml.nvmlEventTypeXidCriticalError, event_set
    )
    timer = threading.Timer(0.05, fake.inject_xid, args=(0, 31))
    timer.start()
    try:
        assert fake.nvmlEventSetWait_v2(event_set, 5000).eventData == 31
    finally:
        timer.join()


def test_call_counters_and_processes() -> None:
    fake = started(H100_IDLE, H100_IDLE)
    handles = [fake.nvmlDeviceGetHandleByIndex(i) for i in range(fake.nvmlDeviceGetCount())]
    fake.set_processes(1, [(4242, 512 * MiB), 4243])
    for h in handles:
        fake.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION])
    procs = fake.nvmlDeviceGetComputeRunningProcesses(handles[1])
    assert [(p.pid, p.usedGpuMemory) for p in procs] == [(4242, 512 * MiB), (4243, 0)]
    assert fake.calls["nvmlDeviceGetFieldValues"] == 2
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == 2
    uuid1 = fake.devices[1].uuid
    assert fake.handle_calls[("nvmlDeviceGetComputeRunningProcesses", uuid1)] == 1
    assert uuid1 != fake.devices[0].uuid
    fake.reset_calls()
    assert not fake.calls
