"""A stand-in for the ``pynvml`` module (nvidia-ml-py) for tests on machines without a GPU.

Tests inject a :class:`FakeNVML` instance into tally's NVML gateway wherever the gateway would
use the real ``pynvml`` module.  The instance exposes, under the same names and with the same
parameter names and return types, the subset of nvidia-ml-py that tally uses:

* the real exception classes and constants, copied from the installed ``pynvml`` (so
  ``fake.NVMLError_NotSupported is pynvml.NVMLError_NotSupported`` and errors are raised the way
  pynvml raises them: ``pynvml.NVMLError(code)``, which instantiates the per-code subclass);
* the real ctypes structure classes (``c_nvmlMemory_t``, ``c_nvmlFieldValue_t``,
  ``c_nvmlGpmMetricsGet_t``, ``c_nvmlEventData_t`` ...): every function returns the very
  structure type pynvml returns, handles are ``pynvml.c_nvmlDevice_t`` pointers, event sets are
  ``c_nvmlEventSet_t`` and GPM samples are ``c_nvmlGpmSample_t``;
* the ``nvml*`` functions listed in ``FakeNVML.__doc__``.  A function of pynvml that the fake
  does not implement is absent (``AttributeError``), so a gateway that starts using a new call
  fails loudly instead of silently getting a default.

Building a fake::

    fake = FakeNVML([H100_LOADED, H100_IDLE])        # two GPUs, index 0 and 1
    fake = FakeNVML([PROFILES["h100_mig"]])            # one MIG-partitioned H100
    fake = FakeNVML([H100_IDLE] * 8, clock=FakeClock(start=0.0))

Fault injection (all from tests, at any time)::

    fake.library_present = False           # nvmlInit -> NVMLError_LibraryNotFound
    fake.driver_loaded = False             # nvmlInit -> NVMLError_DriverNotLoaded
    FakeNVML(..., old_driver=True)         # versioned symbols -> NVMLError_FunctionNotFound
    FakeNVML(..., hidden=["nvmlDeviceGetTemperatureV"])   # attribute absent (old bindings)
    FakeNVML(..., hidden=["_nvmlGetFunctionPointer"])     # no C functions: wrappers only
    fake.lose_gpu(0, after_calls=3)        # 4th handle call on GPU 0 onwards -> GpuIsLost
    fake.restore_gpu(0)
    fake.set_unsupported(1, "nvmlDeviceGetTotalEnergyConsumption")   # -> NotSupported
    fake.set_unsupported_fields(1, pynvml.NVML_FI_DEV_REMAPPED_PENDING)
    fake.inject_xid(0, 79)                 # delivered to event sets registered for XIDs
    fake.set_processes(0, [(4242, 512 * MiB)])
    fake.set_processes(0, [ProcessProfile(4242, 512 * MiB, sm_util_pct=60)])  # sampled from now on
    fake.devices[0].power_mw = 350_000     # energy integrates power over fake.clock
    fake.clock.advance(10.0)
    fake.calls["nvmlDeviceGetFieldValues"] # per-function call counter (every call, even failing)
    fake.handle_calls[("nvmlDeviceGetPowerUsage", uuid)]   # per-function, per-handle counter
    fake.c_calls["nvmlDeviceGetFieldValues"]  # calls of the C function, past pynvml's wrapper
    fake.c_lists_fill_what_fits = True     # a list too long for its array: filled, success

The C functions (``fake._nvmlGetFunctionPointer(name)``, pynvml's lookup) answer as
libnvidia-ml does, with a return code and the results written into the caller's buffers, for the
few functions tally's gateway calls past pynvml's wrappers (``C_FUNCTIONS``); each calls the
fake's Python function of that name, so every fault injected above shows through it too.

The devices it presents are the profiles of ``tests.support.nvml.profiles``.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import pynvml

from tests.support.nvml.profiles import (
    H100_IDLE,
    NVML_INVALID_ID,
    DeviceProfile,
    MigInstanceProfile,
    ProcessProfile,
)

#: The fake driver's per-process utilisation sampling: one sample per active process every
#: ``PROCESS_SAMPLE_PERIOD_S`` (on multiples of it), kept for ``PROCESS_SAMPLE_BUFFER_S``.  Real
#: drivers sample on their own period into a bounded buffer; these numbers are the fake's choice.
PROCESS_SAMPLE_PERIOD_S = 0.5
PROCESS_SAMPLE_BUFFER_S = 30.0

#: C symbols a driver older than the installed bindings lacks.  pynvml resolves symbols lazily, so
#: calling a wrapper whose symbol is missing raises ``NVMLError_FunctionNotFound``.  Note that
#: pynvml's ``nvmlDeviceGetComputeRunningProcesses`` calls the ``_v3`` symbol, and
#: ``nvmlDeviceGetMemoryInfo(h, version=...)`` the ``_v2`` symbol.  This set models "an older
#: libnvidia-ml" for fault injection; it is not the exact symbol table of one release.
OLD_DRIVER_MISSING_SYMBOLS = frozenset(
    {
        "nvmlDeviceGetTemperatureV",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetMemoryInfo_v2",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlGpmQueryDeviceSupport",
        "nvmlGpmSampleAlloc",
        "nvmlGpmSampleGet",
        "nvmlGpmSampleFree",
        "nvmlGpmMetricsGet",
    }
)


# --------------------------------------------------------------------------------------------
# Runtime state
# --------------------------------------------------------------------------------------------


class FakeClock:
    """Manually advanced clock in seconds; callable, so it can stand in for ``time.monotonic``."""

    def __init__(self, start: float = 1_000.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._now += seconds
        return self._now


_S = TypeVar("_S")


def _raise(code: int) -> Any:
    # pynvml raises NVMLError(code); NVMLError.__new__ picks the per-code subclass.
    raise pynvml.NVMLError(code)


def _write(target: _S, **fields: Any) -> _S:
    """Write ``fields`` of a pynvml structure the way the C library does, past the Python
    ``__setattr__`` of pynvml's structures, which a real call never runs for what the driver
    fills in (it costs several times the write)."""
    cls = type(target)
    for name, value in fields.items():
        getattr(cls, name).__set__(target, value)
    return target


def _read(source: Any, name: str) -> Any:
    """Read a field as the C library does (past pynvml's ``__getattribute__``)."""
    return getattr(type(source), name).__get__(source)


class _Anchored:
    """An object with a stable address, used as the target of a ctypes handle."""

    def __init__(self) -> None:
        self._anchor = ctypes.create_string_buffer(1)

    @property
    def address(self) -> int:
        return ctypes.addressof(self._anchor)


class FakeDevice(_Anchored):
    """Mutable state of one physical GPU (tests may change any attribute)."""

    is_mig = False

    def __init__(self, index: int, profile: DeviceProfile, uuid: str, clock: FakeClock) -> None:
        super().__init__()
        self.index = index
        self.profile = profile
        self.name = profile.name
        self.uuid = uuid
        self.pci_bus_id = profile.pci_bus_id
        self.memory_total = profile.memory_total
        self.memory_reserved = profile.memory_reserved
        self.memory_used = profile.memory_used
        self.utilization_gpu = profile.utilization_gpu
        self.utilization_memory = profile.utilization_memory
        self.power_instant_mw = profile.power_instant_mw
        self.power_limit_mw = profile.power_limit_mw
        self.temperature_gpu = profile.temperature_gpu
        self.temperature_memory = profile.temperature_memory
        self.clocks_event_reasons = profile.clocks_event_reasons
        self.ecc_corrected_volatile = profile.ecc_corrected_volatile
        self.ecc_uncorrected_volatile = profile.ecc_uncorrected_volatile
        self.ecc_corrected_aggregate = profile.ecc_corrected_aggregate
        self.ecc_uncorrected_aggregate = profile.ecc_uncorrected_aggregate
        self.remapped_rows = profile.remapped_rows
        self.mig_mode = list(profile.mig_mode)
        self.max_mig_devices = profile.max_mig_devices
        self.gpm_supported = profile.gpm_supported
        self._processes: list[ProcessProfile] = list(profile.processes)
        # (since, processes) in time order: which processes ran, for per-process samples.
        self.process_history: list[tuple[float, tuple[ProcessProfile, ...]]] = [
            (clock.now(), tuple(profile.processes))
        ]
        self.mig_devices: list[FakeMigDevice] = []
        #: Python function names (e.g. "nvmlDeviceGetPowerUsage") that raise NotSupported here.
        self.unsupported: set[str] = set()
        #: Field ids that come back with nvmlReturn == NVML_ERROR_NOT_SUPPORTED.
        self.unsupported_fields: set[int] = set()
        self.lost = False
        self.lost_after: int | None = None
        self._clock = clock
        self._t_last = clock.now()
        self._power_mw = profile.power_mw
        default_sm = profile.utilization_gpu or 0
        self._sm_activity = float(
            profile.sm_activity_pct if profile.sm_activity_pct is not None else default_sm
        )
        self._energy_mj = float(profile.energy_start_mj)
        self._sm_integral = 0.0  # percent * seconds

    @property
    def mig_enabled(self) -> bool:
        return bool(self.mig_mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE)

    @property
    def processes(self) -> list[ProcessProfile]:
        return self._processes

    @processes.setter
    def processes(self, value: list[ProcessProfile]) -> None:
        self._processes = list(value)
        now = self._clock.now()
        self.process_history = [(t, p) for t, p in self.process_history if t < now]
        self.process_history.append((now, tuple(value)))

    def processes_at(self, t: float) -> tuple[ProcessProfile, ...]:
        running: tuple[ProcessProfile, ...] = ()
        for since, procs in self.process_history:
            if since > t:
                break
            running = procs
        return running

    def _settle(self) -> None:
        now = self._clock.now()
        dt = now - self._t_last
        if dt > 0:
            self._energy_mj += self._power_mw * dt  # mW * s = mJ
            self._sm_integral += self._sm_activity * dt
            self._t_last = now

    @property
    def power_mw(self) -> int:
        return self._power_mw

    @power_mw.setter
    def power_mw(self, value: int) -> None:
        self._settle()  # energy up to now accrued at the old power
        self._power_mw = int(value)

    @property
    def sm_activity_pct(self) -> float:
        return self._sm_activity

    @sm_activity_pct.setter
    def sm_activity_pct(self, value: float) -> None:
        self._settle()
        self._sm_activity = float(value)

    def energy_mj(self) -> int:
        self._settle()
        return int(self._energy_mj)

    def sm_integral(self) -> float:
        self._settle()
        return self._sm_integral

    @property
    def root(self) -> FakeDevice:
        return self


class FakeMigDevice(_Anchored):
    """One MIG device (GPU instance + compute instance) of a MIG-enabled :class:`FakeDevice`."""

    is_mig = True

    def __init__(self, parent: FakeDevice, mig_index: int, p: MigInstanceProfile, uuid: str):
        super().__init__()
        self.parent = parent
        self.mig_index = mig_index
        self.profile = p
        self.name = f"{parent.name} MIG {p.profile}"
        self.uuid = uuid
        self.gpu_instance_id = p.gpu_instance_id
        self.compute_instance_id = p.compute_instance_id
        self.memory_total = p.memory_total
        self.memory_reserved = 0
        self.memory_used = p.memory_used
        self.sm_count = p.sm_count
        self.slices = p.slices
        self.unsupported: set[str] = set()
        self.unsupported_fields: set[int] = set()

    @property
    def root(self) -> FakeDevice:
        return self.parent


@functools.lru_cache(maxsize=1024)
def _process_info(p: ProcessProfile) -> Any:
    """The ``nvmlProcessInfo_t`` the C library fills for ``p`` (only ever read: made once)."""
    return _write(
        pynvml.c_nvmlProcessInfo_v3_t(),
        pid=p.pid,
        usedGpuMemory=p.used_gpu_memory,
        gpuInstanceId=NVML_INVALID_ID if p.gpu_instance_id is None else p.gpu_instance_id,
        computeInstanceId=(
            NVML_INVALID_ID if p.compute_instance_id is None else p.compute_instance_id
        ),
    )


class _EventSet(_Anchored):
    def __init__(self) -> None:
        super().__init__()
        self.registrations: dict[int, int] = {}  # device index -> event type mask
        self.queue: deque[tuple[FakeDevice, int, int, int]] = deque()


class _GpmSample(_Anchored):
    def __init__(self) -> None:
        super().__init__()
        self.device: FakeDevice | None = None
        self.timestamp = 0.0
        self.sm_integral = 0.0


def _unique_uuid(uuid: str, taken: set[str]) -> str:
    """Keep the capture's (masked) UUID format; bump the last group until it is unique."""
    if uuid not in taken:
        return uuid
    head, _, last = uuid.rpartition("-")
    n = int(last, 16)
    while True:
        n += 1
        candidate = f"{head}-{n:0{len(last)}x}"
        if candidate not in taken:
            return candidate


_F = TypeVar("_F", bound=Callable[..., Any])


def _nvml_api(
    symbol: str | Callable[..., str] | None = None, *, device: bool = False
) -> Callable[[_F], _F]:
    """Wrap a fake NVML function the way pynvml + libnvidia-ml behave.

    Order of checks, as in pynvml: library not loaded -> Uninitialized (pynvml's
    ``_nvmlGetFunctionPointer``), C symbol missing -> FunctionNotFound, not initialised ->
    Uninitialized (returned by the C library), then for device functions: bad handle ->
    InvalidArgument, GPU lost -> GpuIsLost, function marked unsupported -> NotSupported.
    """

    def decorate(fn: _F) -> _F:
        name = fn.__name__
        symbol_of = symbol if callable(symbol) else None
        fixed_symbol = name if symbol_of is not None else (symbol or name)
        handle_parameter = fn.__code__.co_varnames[1] if device else ""

        # The hot path of every test and benchmark: checks inlined, the handle resolved once.
        @functools.wraps(fn)
        def wrapper(self: FakeNVML, *args: Any, **kwargs: Any) -> Any:
            sym = fixed_symbol if symbol_of is None else symbol_of(*args, **kwargs)
            with self._lock:
                self.calls[name] += 1
                if not self._lib_loaded:
                    _raise(pynvml.NVML_ERROR_UNINITIALIZED)
                if sym in self.missing_symbols:
                    _raise(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
                if not self._init_count:
                    _raise(pynvml.NVML_ERROR_UNINITIALIZED)
                if not device:
                    return fn(self, *args, **kwargs)
                if args:
                    handle, rest = args[0], args[1:]
                else:
                    handle, rest = kwargs.pop(handle_parameter), ()
                dev = self._lookup(handle, _DEVICE_KINDS)
                self._touch(dev, name)  # lost GPU, NotSupported
                return fn(self, dev, *rest, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _memory_symbol(*args: Any, **kwargs: Any) -> str:
    version = args[1] if len(args) > 1 else kwargs.get("version")
    return "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo"


_Dev = FakeDevice | FakeMigDevice
_DEVICE_KINDS = (FakeDevice, FakeMigDevice)


def _remapped(i: int) -> Callable[[FakeDevice], int | None]:
    return lambda dev: dev.remapped_rows[i] if dev.remapped_rows else None


_ULL, _UI = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
# nvmlFieldValue_t as the C library fills it after the request (fieldId, scopeId): timestamp,
# latencyUsec, valueType, nvmlReturn, then the value union (uiVal: its first 4 bytes).
_FIELD_VALUE_SIZE = ctypes.sizeof(pynvml.c_nvmlFieldValue_t)
_FIELD_ID = struct.Struct("=I")
_FIELD_RESULT_AT = pynvml.c_nvmlFieldValue_t.timestamp.offset
_FIELD_FAILED = struct.Struct("=qqII")
_FIELD_ULL = struct.Struct("=qqIIQ")
_FIELD_UINT = struct.Struct("=qqIII")
assert (
    pynvml.c_nvmlFieldValue_t.fieldId.offset,
    pynvml.c_nvmlFieldValue_t.value.offset,
    pynvml.c_nvmlFieldValue_t.nvmlReturn.offset,
) == (0, _FIELD_RESULT_AT + _FIELD_FAILED.size, _FIELD_RESULT_AT + _FIELD_FAILED.size - 4)
#: The field values the fake answers on a whole GPU: field id -> (valueType, reading); a reading
#: of None answers NotSupported.
_FIELDS: dict[int, tuple[int, Callable[[FakeDevice], int | None]]] = {
    pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: (_ULL, FakeDevice.energy_mj),
    pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL: (_ULL, lambda dev: dev.ecc_corrected_volatile),
    pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL: (_ULL, lambda dev: dev.ecc_uncorrected_volatile),
    pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL: (_ULL, lambda dev: dev.ecc_corrected_aggregate),
    pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL: (_ULL, lambda dev: dev.ecc_uncorrected_aggregate),
    pynvml.NVML_FI_DEV_REMAPPED_COR: (_UI, _remapped(0)),
    pynvml.NVML_FI_DEV_REMAPPED_UNC: (_UI, _remapped(1)),
    pynvml.NVML_FI_DEV_REMAPPED_PENDING: (_UI, _remapped(2)),
    pynvml.NVML_FI_DEV_REMAPPED_FAILURE: (_UI, _remapped(3)),
    pynvml.NVML_FI_DEV_MEMORY_TEMP: (_UI, lambda dev: dev.temperature_memory),
    pynvml.NVML_FI_DEV_POWER_INSTANT: (_UI, lambda dev: dev.power_instant_mw),
}
# A pointer's value without ctypes.cast (a foreign-function call): its bytes, as a void pointer.
_pointer_value = ctypes.c_void_p.from_buffer_copy


class _Absent:
    """A binding's name hidden on one :class:`FakeNVML` (as if nvidia-ml-py were older): reading
    it raises ``AttributeError``, so ``hasattr`` is false and ``getattr(m, name, None)`` is None.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        raise AttributeError(self.name)


# --------------------------------------------------------------------------------------------
# The module stand-in
# --------------------------------------------------------------------------------------------


class FakeNVML:
    """Drop-in for the ``pynvml`` module.

    Implemented functions: nvmlInit, nvmlInitWithFlags, nvmlShutdown, nvmlErrorString,
    nvmlSystemGetDriverVersion, nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex,
    nvmlDeviceGetHandleByUUID, nvmlDeviceGetIndex, nvmlDeviceGetUUID, nvmlDeviceGetName,
    nvmlDeviceGetUtilizationRates, nvmlDeviceGetMemoryInfo, nvmlDeviceGetPowerUsage,
    nvmlDeviceGetTotalEnergyConsumption, nvmlDeviceGetPowerManagementLimit,
    nvmlDeviceGetEnforcedPowerLimit, nvmlDeviceGetTemperature, nvmlDeviceGetTemperatureV,
    nvmlDeviceGetMigMode, nvmlDeviceGetMaxMigDeviceCount, nvmlDeviceGetMigDeviceHandleByIndex,
    nvmlDeviceGetDeviceHandleFromMigDeviceHandle, nvmlDeviceIsMigDeviceHandle,
    nvmlDeviceGetGpuInstanceId, nvmlDeviceGetComputeInstanceId, nvmlDeviceGetFieldValues,
    nvmlDeviceGetTotalEccErrors, nvmlDeviceGetRemappedRows,
    nvmlDeviceGetCurrentClocksEventReasons, nvmlDeviceGetCurrentClocksThrottleReasons,
    nvmlDeviceGetComputeRunningProcesses (+ _v2, _v3), nvmlDeviceGetProcessUtilization,
    nvmlDeviceGetAttributes (+ _v2), nvmlDeviceGetGpuInstanceProfileInfo, nvmlGpmQueryDeviceSupport,
    nvmlGpmSampleAlloc, nvmlGpmSampleGet, nvmlGpmSampleFree, nvmlGpmMetricsGet,
    nvmlEventSetCreate, nvmlDeviceRegisterEvents, nvmlEventSetWait_v2, nvmlEventSetFree.
    """

    def __init__(
        self,
        profiles: Sequence[DeviceProfile] = (H100_IDLE,),
        *,
        clock: FakeClock | None = None,
        driver_version: str | None = None,
        library_present: bool = True,
        driver_loaded: bool = True,
        old_driver: bool = False,
        missing_symbols: Iterable[str] = (),
        hidden: Iterable[str] = (),
        blocking_event_wait: bool = False,
    ) -> None:
        self._lock = threading.RLock()
        self._events_changed = threading.Condition(self._lock)
        self.clock = clock if clock is not None else FakeClock()
        self.driver_version = driver_version or (
            profiles[0].driver_version if profiles else "590.48.01"
        )
        #: False: nvmlInit raises LibraryNotFound, every other call Uninitialized (as pynvml).
        self.library_present = library_present
        #: False: nvmlInit raises DriverNotLoaded.
        self.driver_loaded = driver_loaded
        #: Any other NVML error code nvmlInit should fail with (e.g. NVML_ERROR_NO_PERMISSION).
        self.init_error: int | None = None
        #: C symbols absent from the fake libnvidia-ml -> NVMLError_FunctionNotFound.
        self.missing_symbols: set[str] = set(missing_symbols)
        if old_driver:
            self.missing_symbols |= OLD_DRIVER_MISSING_SYMBOLS
        # Python attribute names that do not exist at all (older nvidia-ml-py bindings): this
        # instance gets a class of its own where they are absent, so that no attribute access
        # pays for a check (a ``__getattribute__`` override would, ~1,000 times a round).
        absent = {name: _Absent(name) for name in hidden if name.startswith(("nvml", "_nvml"))}
        if absent:
            self.__class__ = type(type(self).__name__, (type(self),), absent)
        #: True: nvmlEventSetWait_v2 really waits (up to its timeout) for inject_xid from
        #: another thread.  False: it raises NVMLError_Timeout at once when nothing is pending.
        self.blocking_event_wait = blocking_event_wait
        self.calls: Counter[str] = Counter()
        self.c_calls: Counter[str] = Counter()
        #: True: a C function listing into an array too small fills it and succeeds (what
        #: NVML's documentation does not rule out) instead of answering InsufficientSize.
        self.c_lists_fill_what_fits = False
        self.handle_calls: Counter[tuple[str, str]] = Counter()
        self._lib_loaded = False
        self._init_count = 0
        self._objects: dict[int, Any] = {}
        self.devices: list[FakeDevice] = []
        taken: set[str] = set()
        for index, profile in enumerate(profiles):
            dev = FakeDevice(index, profile, _unique_uuid(profile.uuid, taken), self.clock)
            taken.add(dev.uuid)
            for mig_index, inst in enumerate(profile.mig_instances):
                mig = FakeMigDevice(dev, mig_index, inst, _unique_uuid(inst.uuid, taken))
                taken.add(mig.uuid)
                dev.mig_devices.append(mig)
                self._objects[mig.address] = mig
            self.devices.append(dev)
            self._objects[dev.address] = dev

    def _nvmlGetFunctionPointer(self, name: str) -> Callable[..., int]:
        """pynvml's lookup of a C function: one of ``C_FUNCTIONS``, taking the C arguments and
        answering a return code. Library not loaded -> Uninitialized; a symbol the fake has no C
        function for, or a missing one, -> FunctionNotFound (as pynvml raises them)."""
        with self._lock:
            if not self._lib_loaded:
                _raise(pynvml.NVML_ERROR_UNINITIALIZED)
            c_function = C_FUNCTIONS.get(name)
            if c_function is None or name in self.missing_symbols:
                _raise(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

        def call(*args: Any) -> int:
            with self._lock:
                self.c_calls[name] += 1
            return c_function(self, *args)

        return call

    @property
    def hidden(self) -> frozenset[str]:
        """The ``nvml*`` names absent from this instance (fixed when it is made)."""
        return frozenset(n for n, v in vars(type(self)).items() if isinstance(v, _Absent))

    def __repr__(self) -> str:
        return f"FakeNVML({[d.profile.key for d in self.devices]!r}, driver={self.driver_version})"

    # ---------------------------------------------------------------- test controls

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()
            self.handle_calls.clear()

    def lose_gpu(self, index: int, after_calls: int = 0) -> None:
        """GPU ``index`` falls off the bus after ``after_calls`` more calls on its handles."""
        with self._lock:
            dev = self.devices[index]
            if after_calls <= 0:
                dev.lost = True
            else:
                dev.lost_after = after_calls

    def restore_gpu(self, index: int) -> None:
        with self._lock:
            dev = self.devices[index]
            dev.lost = False
            dev.lost_after = None

    def set_unsupported(
        self, index: int, *function_names: str, mig_index: int | None = None
    ) -> None:
        """Make ``function_names`` raise NotSupported on GPU ``index`` (or on one MIG device)."""
        with self._lock:
            dev = self.devices[index]
            target = dev if mig_index is None else dev.mig_devices[mig_index]
            target.unsupported.update(function_names)

    def set_unsupported_fields(self, index: int, *field_ids: int) -> None:
        with self._lock:
            self.devices[index].unsupported_fields.update(field_ids)

    def set_processes(
        self, index: int, processes: Iterable[ProcessProfile | tuple[int, int] | int]
    ) -> None:
        """Replace the compute processes of GPU ``index`` (pid, or (pid, used bytes))."""
        procs: list[ProcessProfile] = []
        for p in processes:
            if isinstance(p, ProcessProfile):
                procs.append(p)
            elif isinstance(p, int):
                procs.append(ProcessProfile(p, 0))
            else:
                procs.append(ProcessProfile(p[0], p[1]))
        with self._lock:
            self.devices[index].processes = procs

    def inject_xid(
        self,
        index: int,
        xid: int,
        *,
        gpu_instance_id: int = NVML_INVALID_ID,
        compute_instance_id: int = NVML_INVALID_ID,
    ) -> int:
        """Raise an XID on GPU ``index``; returns how many event sets received it.

        Like the driver, an event reaches only the event sets that registered this GPU for
        ``nvmlEventTypeXidCriticalError`` before it happened; otherwise it is dropped.
        """
        delivered = 0
        with self._lock:
            dev = self.devices[index]
            for obj in self._objects.values():
                if not isinstance(obj, _EventSet):
                    continue
                mask = obj.registrations.get(index, 0)
                if mask & pynvml.nvmlEventTypeXidCriticalError:
                    obj.queue.append((dev, xid, gpu_instance_id, compute_instance_id))
                    delivered += 1
            self._events_changed.notify_all()
        return delivered

    # ---------------------------------------------------------------- internals

    def _lookup(self, ptr: Any, kind: Any) -> Any:
        """The object a handle points at, if it is a ``kind``; else InvalidArgument."""
        if isinstance(ptr, ctypes._Pointer):  # what the fake hands out: no cast needed
            address = _pointer_value(ptr).value
        else:
            try:
                address = ctypes.cast(ptr, ctypes.c_void_p).value
            except (ctypes.ArgumentError, TypeError):
                address = None
        obj = self._objects.get(address) if address else None
        if not isinstance(obj, kind):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return obj

    def _touch(self, dev: _Dev, name: str) -> None:
        self.handle_calls[(name, dev.uuid)] += 1
        root = dev.root
        if root.lost_after is not None and not root.lost:
            if root.lost_after <= 0:
                root.lost = True
            else:
                root.lost_after -= 1
        if root.lost:
            _raise(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in dev.unsupported:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)

    @staticmethod
    def _handle(obj: _Anchored, ptr_type: Any = None) -> Any:
        return ctypes.cast(ctypes.c_void_p(obj.address), ptr_type or pynvml.c_nvmlDevice_t)

    @staticmethod
    def _whole_gpu(dev: _Dev) -> FakeDevice:
        # Real drivers answer most per-GPU queries on a MIG device handle with NOT_SUPPORTED
        # (nvidia-smi shows N/A for utilisation/power/temperature of MIG devices).
        if isinstance(dev, FakeMigDevice):
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        assert isinstance(dev, FakeDevice)
        return dev

    # ---------------------------------------------------------------- init / system

    def _init(self, name: str) -> None:
        with self._lock:
            self.calls[name] += 1
            if not self.library_present:
                _raise(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
            self._lib_loaded = True
            if "nvmlInitWithFlags" in self.missing_symbols:
                _raise(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            if not self.driver_loaded:
                _raise(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
            if self.init_error is not None:
                _raise(self.init_error)
            self._init_count += 1

    def nvmlInit(self) -> None:
        self._init("nvmlInit")

    def nvmlInitWithFlags(self, flags: int) -> None:
        self._init("nvmlInitWithFlags")

    @_nvml_api()
    def nvmlShutdown(self) -> None:
        self._init_count -= 1

    def nvmlErrorString(self, result: int) -> str:
        with self._lock:
            self.calls["nvmlErrorString"] += 1
            if not self._lib_loaded:
                _raise(pynvml.NVML_ERROR_UNINITIALIZED)
            return str(pynvml.NVMLError._errcode_to_string.get(result, "Unknown Error"))

    @_nvml_api()
    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver_version

    @_nvml_api("nvmlDeviceGetCount_v2")
    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    # ---------------------------------------------------------------- handles / identity

    @_nvml_api("nvmlDeviceGetHandleByIndex_v2")
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if not isinstance(index, int) or not 0 <= index < len(self.devices):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        dev = self.devices[index]
        self._touch(dev, "nvmlDeviceGetHandleByIndex")
        return self._handle(dev)

    @_nvml_api()
    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> Any:
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for dev in self.devices:
            candidates: list[_Dev] = [dev, *dev.mig_devices]
            for candidate in candidates:
                if candidate.uuid == wanted:
                    self._touch(candidate, "nvmlDeviceGetHandleByUUID")
                    return self._handle(candidate)
        return _raise(pynvml.NVML_ERROR_NOT_FOUND)

    @_nvml_api(device=True)
    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self._whole_gpu(handle).index  # MIG handle: NotSupported (fake's choice)

    @_nvml_api(device=True)
    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return str(handle.uuid)  # pynvml decodes the C string (convertStrBytes)

    @_nvml_api(device=True)
    def nvmlDeviceGetName(self, handle: Any) -> str:
        return str(handle.name)

    # ---------------------------------------------------------------- telemetry

    @_nvml_api(device=True)
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        dev = self._whole_gpu(handle)
        if dev.mig_enabled or dev.utilization_gpu is None:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)  # captures: "GPU: N/A" in MIG mode
        return _write(
            pynvml.c_nvmlUtilization_t(),
            gpu=dev.utilization_gpu,
            memory=dev.utilization_memory or 0,
        )

    @_nvml_api(_memory_symbol, device=True)
    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        total, reserved, used = handle.memory_total, handle.memory_reserved, handle.memory_used
        free = max(total - reserved - used, 0)
        if not version:
            # v1 (nvmlMemory_t): "used" is reserved + allocated, i.e. total - free.
            return _write(pynvml.c_nvmlMemory_t(), total=total, free=free, used=total - free)
        if version != pynvml.nvmlMemory_v2:
            _raise(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        mem2 = pynvml.c_nvmlMemory_v2_t()
        mem2.version = version  # pynvml's wrapper writes the version, the library the rest
        return _write(mem2, total=total, reserved=reserved, free=free, used=used)

    @_nvml_api(device=True)
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._whole_gpu(handle).power_mw

    @_nvml_api(device=True)
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return self._whole_gpu(handle).energy_mj()

    @_nvml_api(device=True)
    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        return self._whole_gpu(handle).power_limit_mw

    @_nvml_api(device=True)
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._whole_gpu(handle).power_limit_mw

    def _temperature(self, dev: _Dev, sensor: int) -> int:
        gpu = self._whole_gpu(dev)
        if not isinstance(sensor, int) or not 0 <= sensor < pynvml.NVML_TEMPERATURE_COUNT:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.temperature_gpu

    @_nvml_api(device=True)
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        return self._temperature(handle, sensor)

    @_nvml_api(device=True)
    def nvmlDeviceGetTemperatureV(
        self, handle: Any, sensor: int, version: int = pynvml.nvmlTemperature_v1
    ) -> int:
        if version != pynvml.nvmlTemperature_v1:
            _raise(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return self._temperature(handle, sensor)

    @_nvml_api(device=True)
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._whole_gpu(handle).clocks_event_reasons

    @_nvml_api(device=True)
    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self._whole_gpu(handle).clocks_event_reasons

    @_nvml_api(device=True)
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, errorType: int, counterType: int) -> int:
        dev = self._whole_gpu(handle)
        table = {
            (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC): (
                dev.ecc_corrected_volatile
            ),
            (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC): (
                dev.ecc_uncorrected_volatile
            ),
            (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC): (
                dev.ecc_corrected_aggregate
            ),
            (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC): (
                dev.ecc_uncorrected_aggregate
            ),
        }
        if (errorType, counterType) not in table:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return table[(errorType, counterType)]

    @_nvml_api(device=True)
    def nvmlDeviceGetRemappedRows(self, device: Any) -> tuple[int, int, int, int]:
        dev = self._whole_gpu(device)
        if dev.remapped_rows is None:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)  # captures: "Remapped Rows: N/A" in MIG mode
        assert dev.remapped_rows is not None
        return tuple(dev.remapped_rows)  # type: ignore[return-value]

    # ---------------------------------------------------------------- field values

    @staticmethod
    def _field(dev: _Dev, field_id: int) -> tuple[int, int] | None:
        """(valueType, value) of one field, None when not supported."""
        if isinstance(dev, FakeMigDevice) or field_id in dev.unsupported_fields:
            return None
        found = _FIELDS.get(field_id)
        if found is None:
            return None
        value_type, read = found
        value = read(dev)
        return None if value is None else (value_type, int(value))

    @_nvml_api(device=True)
    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: Sequence[Any]) -> Any:
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        timestamp_us = int(self.clock.now() * 1_000_000)
        for i, requested in enumerate(fieldIds):
            try:  # as pynvml's own wrapper writes the request
                values[i].fieldId, values[i].scopeId = requested
            except TypeError:
                values[i].fieldId = requested
            # What the C library writes: the rest of the structure, in place.
            at = i * _FIELD_VALUE_SIZE
            result = self._field(handle, _FIELD_ID.unpack_from(values, at)[0])
            if result is None:
                _FIELD_FAILED.pack_into(
                    values, at + _FIELD_RESULT_AT, timestamp_us, 0, 0, _NOT_SUPPORTED
                )
            else:
                value_type, number = result
                layout = _FIELD_UINT if value_type == _UI else _FIELD_ULL
                layout.pack_into(
                    values, at + _FIELD_RESULT_AT, timestamp_us, 0, value_type, 0, number
                )
        return values

    # ---------------------------------------------------------------- processes

    def _processes(self, dev: _Dev) -> list[Any]:
        root = dev.root
        procs = root.processes
        if isinstance(dev, FakeMigDevice):
            procs = [
                p
                for p in procs
                if p.gpu_instance_id == dev.gpu_instance_id
                and p.compute_instance_id in (None, dev.compute_instance_id)
            ]
        # pynvml's wrapper turns each structure the library filled into a new friendly object,
        # a framebuffer NVML cannot tell (NVML_VALUE_NOT_AVAILABLE) into None
        listed = [pynvml.nvmlStructToFriendlyObject(_process_info(p)) for p in procs]
        for obj in listed:
            if obj.usedGpuMemory == pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value:
                obj.usedGpuMemory = None
        return listed

    @_nvml_api("nvmlDeviceGetComputeRunningProcesses_v3", device=True)
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        return self._processes(handle)

    @_nvml_api(device=True)
    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any) -> list[Any]:
        return self._processes(handle)

    @_nvml_api(device=True)
    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Any) -> list[Any]:
        return self._processes(handle)

    @_nvml_api(device=True)
    def nvmlDeviceGetProcessUtilization(self, handle: Any, timeStamp: int) -> list[Any]:
        """Samples newer than ``timeStamp`` (µs), one per active process per sample period.

        As the driver: samples since ``timeStamp`` still in the buffer, oldest first; a process
        with 0 % SM and memory utilisation is not sampled; none at all -> NotFound.  In MIG mode
        (parent or MIG handle) -> NotSupported (the fake's choice: per-process utilisation is a
        whole-GPU feature).
        """
        dev = self._whole_gpu(handle)
        if dev.mig_enabled:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        now = self.clock.now()
        period = PROCESS_SAMPLE_PERIOD_S
        first = max(int(timeStamp) / 1e6, now - PROCESS_SAMPLE_BUFFER_S)
        tick = int(first // period) + 1
        samples = []
        while tick * period <= now:
            at = tick * period
            stamp = round(at * 1_000_000)
            for p in dev.processes_at(at):
                if (p.sm_util_pct or p.mem_util_pct) and stamp > timeStamp:
                    sample = _write(
                        pynvml.c_nvmlProcessUtilizationSample_t(),
                        pid=p.pid,
                        timeStamp=stamp,
                        smUtil=p.sm_util_pct,
                        memUtil=p.mem_util_pct,
                    )  # encUtil, decUtil: 0
                    samples.append(sample)
            tick += 1
        if not samples:
            _raise(pynvml.NVML_ERROR_NOT_FOUND)
        return samples

    # ---------------------------------------------------------------- MIG geometry

    @_nvml_api("nvmlDeviceGetAttributes_v2", device=True)
    def nvmlDeviceGetAttributes(self, device: Any) -> Any:
        return self._attributes(device)

    @_nvml_api(device=True)
    def nvmlDeviceGetAttributes_v2(self, device: Any) -> Any:
        return self._attributes(device)

    def _attributes(self, dev: _Dev) -> Any:
        if not isinstance(dev, FakeMigDevice):
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)  # NVML: "only supports MIG device handles"
        assert isinstance(dev, FakeMigDevice)
        attrs = pynvml.c_nvmlDeviceAttributes()
        attrs.multiprocessorCount = dev.sm_count
        attrs.gpuInstanceSliceCount = dev.slices
        attrs.computeInstanceSliceCount = dev.slices
        attrs.memorySizeMB = dev.memory_total // (1024 * 1024)
        return attrs

    @_nvml_api(
        lambda *a, **k: (
            "nvmlDeviceGetGpuInstanceProfileInfo"
            if (a[2] if len(a) > 2 else k.get("version", 2)) == 1
            else "nvmlDeviceGetGpuInstanceProfileInfoV"
        ),
        device=True,
    )
    def nvmlDeviceGetGpuInstanceProfileInfo(
        self, device: Any, profile: int, version: int = 2
    ) -> Any:
        if isinstance(device, FakeMigDevice):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if (
            not isinstance(profile, int)
            or not 0 <= profile < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT
        ):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        found = [p for p in device.profile.gi_profiles if p.index == profile]
        if not device.mig_enabled or not found:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        p = found[0]
        info: Any
        if version == 1:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_t()
        else:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
            info.name = f"MIG {p.name}".encode()
        info.id, info.sliceCount, info.instanceCount = p.id, p.slices, p.instances
        info.multiprocessorCount, info.memorySizeMB = p.sm_count, p.memory_mib
        return info

    # ---------------------------------------------------------------- MIG

    @_nvml_api(device=True)
    def nvmlDeviceGetMigMode(self, device: Any) -> list[int]:
        return list(self._whole_gpu(device).mig_mode)

    @_nvml_api(device=True)
    def nvmlDeviceGetMaxMigDeviceCount(self, device: Any) -> int:
        return self._whole_gpu(device).max_mig_devices

    @_nvml_api(device=True)
    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: Any, index: int) -> Any:
        if isinstance(device, FakeMigDevice):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not isinstance(index, int) or not 0 <= index < device.max_mig_devices:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not device.mig_enabled or index >= len(device.mig_devices):
            _raise(pynvml.NVML_ERROR_NOT_FOUND)  # empty slot
        return self._handle(device.mig_devices[index])

    @_nvml_api(device=True)
    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice: Any) -> Any:
        if not isinstance(migDevice, FakeMigDevice):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._handle(migDevice.parent)

    @_nvml_api(device=True)
    def nvmlDeviceIsMigDeviceHandle(self, device: Any) -> Any:
        # pynvml returns the c_uint itself here, not its .value.
        return ctypes.c_uint(1 if isinstance(device, FakeMigDevice) else 0)

    @_nvml_api(device=True)
    def nvmlDeviceGetGpuInstanceId(self, device: Any) -> int:
        if not isinstance(device, FakeMigDevice):
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)  # fake's choice for a full-GPU handle
        return int(device.gpu_instance_id)

    @_nvml_api(device=True)
    def nvmlDeviceGetComputeInstanceId(self, device: Any) -> int:
        if not isinstance(device, FakeMigDevice):
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(device.compute_instance_id)

    # ---------------------------------------------------------------- GPM

    @_nvml_api(device=True)
    def nvmlGpmQueryDeviceSupport(self, device: Any) -> Any:
        dev = self._whole_gpu(device)
        support = pynvml.c_nvmlGpmSupport_t()
        support.version = pynvml.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = 1 if dev.gpm_supported else 0
        return support

    @_nvml_api()
    def nvmlGpmSampleAlloc(self) -> Any:
        sample = _GpmSample()
        self._objects[sample.address] = sample
        return self._handle(sample, pynvml.c_nvmlGpmSample_t)

    @_nvml_api()
    def nvmlGpmSampleFree(self, gpmSample: Any) -> None:
        sample = self._lookup(gpmSample, _GpmSample)
        del self._objects[sample.address]

    @_nvml_api(device=True)
    def nvmlGpmSampleGet(self, device: Any, gpmSample: Any) -> Any:
        dev = self._whole_gpu(device)
        if not dev.gpm_supported:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        sample = self._lookup(gpmSample, _GpmSample)
        sample.device = dev
        sample.timestamp = self.clock.now()
        sample.sm_integral = dev.sm_integral()
        return gpmSample

    @_nvml_api()
    def nvmlGpmMetricsGet(self, metricsGet: Any) -> Any:
        # The C library reads and writes the structure directly (_read/_write).
        if _read(metricsGet, "version") != pynvml.NVML_GPM_METRICS_GET_VERSION:
            _raise(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        count = _read(metricsGet, "numMetrics")
        if count > pynvml.NVML_GPM_METRIC_MAX:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        s1 = self._lookup(_read(metricsGet, "sample1"), _GpmSample)
        s2 = self._lookup(_read(metricsGet, "sample2"), _GpmSample)
        if s1.device is None or s1.device is not s2.device or s2.timestamp <= s1.timestamp:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)  # fake's choice for unusable samples
        if s1.device.lost:
            _raise(pynvml.NVML_ERROR_GPU_IS_LOST)
        sm_util = (s2.sm_integral - s1.sm_integral) / (s2.timestamp - s1.timestamp)
        metrics = _read(metricsGet, "metrics")
        for i in range(count):
            metric = metrics[i]
            if _read(metric, "metricId") == pynvml.NVML_GPM_METRIC_SM_UTIL:
                _write(metric, value=sm_util, nvmlReturn=pynvml.NVML_SUCCESS)
            else:
                _write(metric, value=0.0, nvmlReturn=pynvml.NVML_ERROR_NOT_SUPPORTED)
        return metricsGet

    # ---------------------------------------------------------------- events

    @_nvml_api()
    def nvmlEventSetCreate(self) -> Any:
        event_set = _EventSet()
        self._objects[event_set.address] = event_set
        return self._handle(event_set, pynvml.c_nvmlEventSet_t)

    @_nvml_api(device=True)
    def nvmlDeviceRegisterEvents(self, handle: Any, eventTypes: int, eventSet: Any) -> None:
        dev = self._whole_gpu(handle)  # register on the parent; MIG events carry the GI id
        event_set = self._lookup(eventSet, _EventSet)
        event_set.registrations[dev.index] = event_set.registrations.get(dev.index, 0) | int(
            eventTypes
        )

    @_nvml_api()
    def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> Any:
        event_set = self._lookup(eventSet, _EventSet)
        if not event_set.queue and self.blocking_event_wait and timeoutms > 0:
            self._events_changed.wait_for(lambda: bool(event_set.queue), timeoutms / 1000.0)
        if not event_set.queue:
            if any(self.devices[i].lost for i in event_set.registrations):
                _raise(pynvml.NVML_ERROR_GPU_IS_LOST)
            _raise(pynvml.NVML_ERROR_TIMEOUT)
        dev, xid, gi, ci = event_set.queue.popleft()
        data = pynvml.c_nvmlEventData_t()
        data.device = self._handle(dev)
        data.eventType = pynvml.nvmlEventTypeXidCriticalError
        data.eventData = xid
        data.gpuInstanceId = gi
        data.computeInstanceId = ci
        return data

    @_nvml_api()
    def nvmlEventSetFree(self, eventSet: Any) -> None:
        event_set = self._lookup(eventSet, _EventSet)
        del self._objects[event_set.address]


# --------------------------------------------------------------------------------------------
# The C functions: libnvidia-ml's calling convention over the fake's Python functions
# --------------------------------------------------------------------------------------------

_SUCCESS = pynvml.NVML_SUCCESS
_INSUFFICIENT_SIZE = pynvml.NVML_ERROR_INSUFFICIENT_SIZE


def _target(argument: Any) -> Any:
    """What a pointer argument points to: ``byref(x)`` -> x; an array passed as is."""
    return getattr(argument, "_obj", argument)


def _list_into(
    fake: FakeNVML, count_ref: Any, array: Any, entries: list[Any], write: Callable[..., None]
) -> int:
    """NVML's listing convention: the count says how many entries the array holds; too few (or
    no array) -> InsufficientSize with the count needed, else the entries and their count. With
    ``fake.c_lists_fill_what_fits``, an array too small is filled and the call succeeds."""
    count = _target(count_ref)
    if array is not None and count.value < len(entries) and fake.c_lists_fill_what_fits:
        for i in range(count.value):
            write(array, i, entries[i])
        return _SUCCESS
    if array is None or count.value < len(entries):
        count.value = len(entries)
        return _INSUFFICIENT_SIZE if entries else _SUCCESS
    for i, entry in enumerate(entries):
        write(array, i, entry)
    count.value = len(entries)
    return _SUCCESS


def _write_process(array: Any, i: int, p: Any) -> None:
    used = p.usedGpuMemory
    _write(
        array[i],
        pid=p.pid,
        usedGpuMemory=pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value if used is None else used,
        gpuInstanceId=p.gpuInstanceId,
        computeInstanceId=p.computeInstanceId,
    )


def _write_sample(array: Any, i: int, sample: Any) -> None:
    array[i] = sample  # a structure assigned to an array element is copied


def _c_processes(fake: FakeNVML, handle: Any, count_ref: Any, infos: Any) -> int:
    try:
        listed = fake.nvmlDeviceGetComputeRunningProcesses_v3(handle)
    except pynvml.NVMLError as exc:
        return int(exc.value)
    return _list_into(fake, count_ref, infos, listed, _write_process)


def _c_process_utilization(
    fake: FakeNVML, handle: Any, samples: Any, count_ref: Any, last_seen: Any
) -> int:
    try:
        found = fake.nvmlDeviceGetProcessUtilization(handle, getattr(last_seen, "value", last_seen))
    except pynvml.NVMLError as exc:
        return int(exc.value)
    return _list_into(fake, count_ref, samples, found, _write_sample)


def _c_temperature(fake: FakeNVML, handle: Any, answer_ref: Any) -> int:
    answer = _target(answer_ref)
    if _read(answer, "version") != pynvml.nvmlTemperature_v1:
        return int(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    try:
        value = fake.nvmlDeviceGetTemperatureV(handle, _read(answer, "sensorType"))
    except pynvml.NVMLError as exc:
        return int(exc.value)
    _write(answer, temperature=value)
    return _SUCCESS


def _c_utilization(fake: FakeNVML, handle: Any, answer_ref: Any) -> int:
    try:
        util = fake.nvmlDeviceGetUtilizationRates(handle)
    except pynvml.NVMLError as exc:
        return int(exc.value)
    _write(_target(answer_ref), gpu=_read(util, "gpu"), memory=_read(util, "memory"))
    return _SUCCESS


def _c_memory_v2(fake: FakeNVML, handle: Any, answer_ref: Any) -> int:
    answer = _target(answer_ref)
    try:
        memory = fake.nvmlDeviceGetMemoryInfo(handle, version=_read(answer, "version"))
    except pynvml.NVMLError as exc:
        return int(exc.value)
    fields = ("total", "reserved", "free", "used")
    _write(answer, **{name: _read(memory, name) for name in fields})
    return _SUCCESS


def _c_number(name: str) -> Callable[..., int]:
    """The C function of a call that writes one number (``c_uint``, ``c_ulonglong``)."""

    def call(fake: FakeNVML, handle: Any, answer_ref: Any) -> int:
        try:
            value = getattr(fake, name)(handle)
        except pynvml.NVMLError as exc:
            return int(exc.value)
        _target(answer_ref).value = value
        return _SUCCESS

    return call


def _c_gpm_sample_get(fake: FakeNVML, handle: Any, sample: Any) -> int:
    try:
        fake.nvmlGpmSampleGet(handle, sample)
    except pynvml.NVMLError as exc:
        return int(exc.value)
    return _SUCCESS


def _c_gpm_metrics_get(fake: FakeNVML, request_ref: Any) -> int:
    try:
        fake.nvmlGpmMetricsGet(_target(request_ref))
    except pynvml.NVMLError as exc:
        return int(exc.value)
    return _SUCCESS


def _c_field_values(fake: FakeNVML, handle: Any, count: Any, values: Any) -> int:
    array = _target(values)
    requested = [
        (_read(array[i], "fieldId"), _read(array[i], "scopeId"))
        for i in range(getattr(count, "value", count))
    ]
    try:
        answered = fake.nvmlDeviceGetFieldValues(handle, requested)
    except pynvml.NVMLError as exc:
        return int(exc.value)
    ctypes.memmove(array, answered, ctypes.sizeof(answered))
    return _SUCCESS


def _c_event_wait(fake: FakeNVML, event_set: Any, data_ref: Any, timeout_ms: Any) -> int:
    try:
        data = fake.nvmlEventSetWait_v2(event_set, getattr(timeout_ms, "value", timeout_ms))
    except pynvml.NVMLError as exc:
        return int(exc.value)
    target = _target(data_ref)
    ctypes.memmove(ctypes.addressof(target), ctypes.addressof(data), ctypes.sizeof(data))
    return _SUCCESS


#: The C functions the fake library has (``FakeNVML._nvmlGetFunctionPointer``).
C_FUNCTIONS: dict[str, Callable[..., int]] = {
    "nvmlDeviceGetComputeRunningProcesses_v3": _c_processes,
    "nvmlDeviceGetProcessUtilization": _c_process_utilization,
    "nvmlDeviceGetTemperatureV": _c_temperature,
    "nvmlDeviceGetFieldValues": _c_field_values,
    "nvmlEventSetWait_v2": _c_event_wait,
    "nvmlDeviceGetUtilizationRates": _c_utilization,
    "nvmlDeviceGetMemoryInfo_v2": _c_memory_v2,
    "nvmlDeviceGetPowerUsage": _c_number("nvmlDeviceGetPowerUsage"),
    "nvmlDeviceGetCurrentClocksEventReasons": _c_number("nvmlDeviceGetCurrentClocksEventReasons"),
    "nvmlGpmSampleGet": _c_gpm_sample_get,
    "nvmlGpmMetricsGet": _c_gpm_metrics_get,
}


def _is_exported(name: str, value: Any) -> bool:
    if name.startswith("_") or hasattr(FakeNVML, name):
        return False
    if isinstance(value, type):  # NVMLError*, c_nvml* structures, pointer types
        return True
    if callable(value):  # functions the fake does not implement stay absent
        return False
    return name.startswith(("NVML", "nvml", "c_nvml"))


# Copy constants, exception classes and ctypes structures from the installed bindings, so that
# `fake.NVMLError_NotSupported is pynvml.NVMLError_NotSupported` etc.
for _name, _value in vars(pynvml).items():
    if _is_exported(_name, _value):
        setattr(FakeNVML, _name, _value)
FakeNVML.nvmlStructToFriendlyObject = staticmethod(pynvml.nvmlStructToFriendlyObject)  # type: ignore[attr-defined]
FakeNVML.nvmlExceptionClass = staticmethod(pynvml.nvmlExceptionClass)  # type: ignore[attr-defined]
