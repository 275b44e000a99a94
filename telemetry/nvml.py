"""The one NVML gateway: every NVML call of tally goes through :class:`Gateway`.

- The library (nvidia-ml-py, imported as ``pynvml``) is imported and initialised lazily, under a
  lock, on first use, and shut down at exit; tests inject a stand-in module instead.
- ``NotSupported``/``FunctionNotFound`` (and a symbol the binding or driver lacks) give ``None``,
  logged once per function; a function found missing is never called again.
- Versioned symbols (``nvmlDeviceGetTemperatureV``, memory info v2, ``…_v3`` process lists,
  clock event reasons) are probed once and the first that works is used from then on.
- Per-process utilisation keeps NVML's last-seen sample timestamp per device, so each sample is
  read once (:meth:`Gateway.process_utilization`).
- ``GpuIsLost`` raises :class:`GpuLost` for that device only; the caller marks it and goes on.
- :attr:`Gateway.generation` counts successful initialisations: what a caller read once per
  device (UUID, name, handle) holds until it changes, i.e. until NVML went away and came back.
- No library or no driver raises :class:`NvmlUnavailable` with a one-line reason.
- The reads a GPU collector makes every round on every device (process lists, per-process
  samples, field values, utilisation, memory, power, temperature, clock event reasons), and its
  look for pending events, call NVML's C function past pynvml's Python wrapper, into buffers
  made once: the wrappers build their structures, arrays and a Python object per process on
  every call (and raise for "no event"), which costs several times the call itself. A
  stand-in module without C functions, or a symbol pynvml cannot find, takes the wrapper; a C
  call that fails is answered as the wrapper's error would be. The buffers are the gateway's
  own: one gateway serves one thread at a time (each collector has its own).

Nothing here shells out to ``nvidia-smi``.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib
import logging
import operator
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

from telemetry.logs import OnceLogger

log = logging.getLogger("tally.nvml")


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used on this host (no library, no driver, init failed)."""


class GpuLost(RuntimeError):
    """The device fell off the bus (NVML ``GpuIsLost``)."""


class ProcessSample(NamedTuple):
    """One per-process utilisation sample NVML took."""

    pid: int
    time_us: int  # NVML's timestamp, µs
    sm_ratio: float  # SM busy over the sample, 0-1


# NVML return codes the direct calls answer themselves (the rest go through _failed)
_SUCCESS, _NOT_FOUND, _INSUFFICIENT_SIZE, _TIMEOUT, _UNKNOWN = 0, 6, 7, 10, 999
# NVML_VALUE_NOT_AVAILABLE as an unsigned long long: a process' framebuffer NVML cannot tell
_NOT_AVAILABLE_ULL = 2**64 - 1
_GROW_TRIES = 4  # a list that outgrows its buffer again this often is answered as an error


# A C function that writes one answer, made once (Gateway._answer): the function, a reference to
# the answer, the answer, and getters of the fields read from it.
_Request = tuple[Any, Any, Any, tuple[Callable[[Any], Any], ...]]

# The C functions of one number each (Gateway._number): name, answer type, field (clock
# reasons: type and field, the name being the probed variant's)
_UTILIZATION = ("nvmlDeviceGetUtilizationRates", "c_nvmlUtilization_t", "gpu")
_POWER = ("nvmlDeviceGetPowerUsage", ctypes.c_uint, "value")
_CLOCK_REASONS = (ctypes.c_ulonglong, "value")

# What Gateway.readings answers: utilisation (%), memory (used, total bytes), power (mW),
# temperature (°C), clock event reasons (bit mask); None where NVML cannot tell.
Readings = tuple[int | None, tuple[int, int] | None, int | None, int | None, int | None]

# Versioned symbols, newest first: the first one the library and driver answer is kept.
_VARIANTS: dict[str, tuple[str, ...]] = {
    "temperature": ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"),
    "processes": (
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetComputeRunningProcesses",
    ),
    "clock_reasons": (
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
    ),
}


class Gateway:
    """Lazy, locked, fault-tolerant access to NVML (or an injected stand-in ``module``)."""

    def __init__(self, module: Any = None) -> None:
        self._module = module
        self._lock = threading.RLock()
        self._ready = False
        self._missing: set[str] = set()
        self._chosen: dict[str, str] = {}
        self._memory_v2: bool | None = None
        self._once = OnceLogger(log)
        # Per device key: the newest per-process utilisation sample's timestamp (µs) read so far.
        self._last_seen: dict[str, int] = {}
        #: NVML's timestamp (CPU µs) of the newest value the last :meth:`field_values` call
        #: answered; None where it answered none, or gave no timestamp.
        self.field_stamp_us: int | None = None
        #: Successful initialisations so far (0: never initialised).
        self.generation = 0
        # field_values' readers by value type, built once per initialisation
        self._readers: dict[int, Callable[[Any], float]] | None = None
        # field_values' requests by field ids: (fieldId, scopeId 0) pairs, what pynvml writes
        # for a bare id too, but without the TypeError its wrapper takes to tell them apart
        self._field_requests: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self._field_getters: tuple[Any, tuple[Callable[[Any], Any], ...]] = (
            None,
            _FIELD_ATTRIBUTES,
        )
        # NVML's C functions by name (None: the wrapper is used), and the buffers they fill;
        # found anew with each initialisation
        self._c_functions: dict[str, Any] = {}
        self._buffers: dict[object, Any] = {}
        # gpm_metric's requests by metric id: the request, a reference to it, its samples'
        # setters and its one metric's return code and value, made once an initialisation
        self._gpm_requests: dict[int, tuple[Any, ...]] = {}
        # readings' C requests (None: not planned, or not all C: asked one by one)
        self._readings: list[tuple[str, _Request]] | None = None
        # field_values' reader of the C function's answers (False: read them field by field)
        self._field_reader: _FieldReader | Literal[False] | None = None

    # ------------------------------------------------------------------ life cycle
    @property
    def nvml(self) -> Any:
        """The initialised module; raises ``NvmlUnavailable``."""
        if self._ready:  # read without the lock: a racing shutdown fails in NVML as Uninitialized
            return self._module
        with self._lock:
            if not self._ready:
                self._init()
            return self._module

    def _init(self) -> None:
        if self._module is None:
            try:
                self._module = importlib.import_module("pynvml")
            except ImportError as exc:
                raise NvmlUnavailable(f"nvidia-ml-py is not installed ({exc})") from None
        m = self._module
        try:
            m.nvmlInit()
        except m.NVMLError as exc:
            raise NvmlUnavailable(f"NVML init failed: {_reason(exc)}") from None
        except OSError as exc:  # a broken libnvidia-ml.so
            raise NvmlUnavailable(f"NVML library unusable: {exc}") from None
        self._ready = True
        self.generation += 1
        self._readers = None
        self._field_reader = None
        self._readings = None
        self._gpm_requests.clear()
        self._c_functions.clear()
        self._buffers.clear()
        if self.generation == 1:
            atexit.register(self.shutdown)

    def shutdown(self) -> None:
        """Shut NVML down if this gateway initialised it (safe to call twice)."""
        with self._lock:
            if self._ready:
                self._ready = False
                try:
                    self._module.nvmlShutdown()
                except Exception as exc:
                    log.debug("nvmlShutdown: %s", exc)

    # ------------------------------------------------------------------ calls
    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``module.name(*args)``; ``None`` when unsupported or failing, logged once.

        Raises ``GpuLost`` for ``GpuIsLost`` and ``NvmlUnavailable`` when NVML went away.
        """
        return self._invoke(name, args, kwargs)

    def _invoke(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], not_found: Any = None
    ) -> Any:
        """As :meth:`call`; ``NotFound`` gives ``not_found`` (an expected answer for some calls,
        never logged) when that is not ``None``."""
        # the module without the property's call where it is ready (every call of a round); a
        # call racing a shutdown fails in NVML as Uninitialized, handled below
        m = self._module if self._ready else self.nvml
        if name in self._missing:
            return None
        function = getattr(m, name, None)
        if function is None:
            self._missing.add(name)
            self._once.warning(
                f"missing:{name}", f"nvml: {name} is not in this binding; its value is null"
            )
            return None
        try:
            return function(*args, **kwargs)
        except m.NVMLError as exc:
            return self._failed(name, exc, not_found)

    def _failed(self, name: str, exc: BaseException, not_found: Any = None) -> Any:
        """What a call of ``name`` that raised NVML error ``exc`` answers (see :meth:`_invoke`);
        raises ``GpuLost`` or ``NvmlUnavailable`` where :meth:`call` says so."""
        m = self._module
        if isinstance(exc, m.NVMLError_NotFound):
            if not_found is not None:
                return not_found
            self._once.warning(f"error:{name}", f"nvml: {name} failed: {_reason(exc)}; null")
            return None
        if isinstance(exc, m.NVMLError_GpuIsLost):
            raise GpuLost(f"{name}: GPU is lost") from None
        if isinstance(exc, m.NVMLError_FunctionNotFound):
            self._missing.add(name)
            self._readings = None  # planned anew, without it
            self._once.warning(
                f"missing:{name}", f"nvml: the driver has no {name}; its value is null"
            )
            return None
        if isinstance(exc, m.NVMLError_NotSupported):
            self._once.warning(
                f"unsupported:{name}", f"nvml: {name} is not supported on some device; null"
            )
            return None
        if isinstance(exc, m.NVMLError_Uninitialized | m.NVMLError_DriverNotLoaded):
            with self._lock:
                self._ready = False
            raise NvmlUnavailable(f"{name}: {_reason(exc)}") from None
        self._once.warning(f"error:{name}", f"nvml: {name} failed: {_reason(exc)}; null")
        return None

    def variant(self, kind: str, *args: Any) -> Any:
        """Call the newest working symbol of a versioned family (probed once)."""
        chosen = self._chosen.get(kind)
        if chosen is not None:
            return self._invoke(chosen, args, {})
        for name in _VARIANTS[kind]:
            before = len(self._missing)
            value = self.call(name, *args)
            if name in self._missing and len(self._missing) > before:
                continue  # not in this library or driver: try the older symbol
            self._chosen[kind] = name
            return value
        return None

    def process_utilization(
        self, key: str, handle: Any, since: int | None = None
    ) -> list[ProcessSample] | None:
        """Per-process utilisation samples NVML took on ``handle`` since the last call for
        ``key`` (the device's UUID) and after ``since`` (NVML's CPU µs, where given), oldest
        first; each sample is returned once.

        ``[]`` when NVML has no new sample (``NotFound``); ``None`` when the device or driver
        cannot tell (``NotSupported``/``FunctionNotFound``, logged once).
        """
        m = self._module if self._ready else self.nvml
        name = "nvmlDeviceGetProcessUtilization"
        last = self._last_seen.get(key, 0)
        if since is not None and since > last:
            last = since
        function = self._c_function(name)
        struct = getattr(m, "c_nvmlProcessUtilizationSample_t", None)
        if function is None or struct is None or name in self._missing:
            samples = self._invoke(name, (handle, last), {}, [])
            if samples is None:
                return None
            read = [(int(s.timeStamp), int(s.pid), int(s.smUtil)) for s in samples]
        else:
            buffer = self._buffer(name, struct, 128)  # drivers answer about 100 samples
            code = self._fill(function, buffer, lambda b: (handle, b.array, b.ref, b.since(last)))
            if code == _NOT_FOUND:
                return []
            if code != _SUCCESS:
                self._failed(name, m.NVMLError(code))  # raises, or logs once
                return None
            pid, stamp, sm = buffer.getters("pid", "timeStamp", "smUtil")
            read = [(stamp(e), pid(e), sm(e)) for e in buffer.entries()]
        stamped = sorted(
            (stamp, i, pid, sm) for i, (stamp, pid, sm) in enumerate(read) if stamp > last
        )
        if stamped:
            self._last_seen[key] = stamped[-1][0]
        return [ProcessSample(pid, stamp, sm / 100.0) for stamp, _, pid, sm in stamped]

    def processes(self, handle: Any) -> list[tuple[int, int | None]] | None:
        """(PID, framebuffer bytes) of each compute process NVML lists on ``handle``, bytes
        ``None`` where NVML cannot tell; ``None`` when NVML cannot list them (logged once).
        Raises ``GpuLost`` and ``NvmlUnavailable`` as :meth:`call` does."""
        m = self._module if self._ready else self.nvml
        name = self._chosen.get("processes")
        function = self._c_function(name) if name == _VARIANTS["processes"][0] else None
        struct = getattr(m, "c_nvmlProcessInfo_v3_t", None)
        if function is None or struct is None or name is None or name in self._missing:
            listed = self.variant("processes", handle)
            if listed is None:
                return None
            found: list[tuple[int, int | None]] = []
            for p in listed:
                used = getattr(p, "usedGpuMemory", None)
                found.append((int(p.pid), None if used is None else int(used)))
            return found
        buffer = self._buffer(name, struct, 64)
        code = self._fill(function, buffer, lambda b: (handle, b.ref, b.array))
        if code != _SUCCESS:
            self._failed(name, m.NVMLError(code))  # raises, or logs once
            return None
        pid, used_bytes = buffer.getters("pid", "usedGpuMemory")
        return [
            (pid(e), None if (used := used_bytes(e)) == _NOT_AVAILABLE_ULL else used)
            for e in buffer.entries()
        ]

    def temperature(self, handle: Any) -> int | None:
        """The GPU's core temperature (°C) by the newest symbol that works; ``None`` when
        NVML cannot tell (logged once). Raises ``GpuLost`` and ``NvmlUnavailable`` as
        :meth:`call` does."""
        m = self._module if self._ready else self.nvml
        name = self._chosen.get("temperature")
        request = self._temperature_request(name)
        if name is None or request is None:
            value = self.variant("temperature", handle, m.NVML_TEMPERATURE_GPU)
            return None if value is None else int(value)
        answer = self._ask(name, request, handle)
        return None if answer is None else int(request[3][0](answer))

    def next_event(self, events: Any) -> Any:
        """The next event pending in event set ``events`` (an ``nvmlEventData_t``), without
        waiting; ``None`` when none is. Raises the binding's ``NVMLError`` for any other answer
        (a lost GPU, a broken set): nothing pending, the answer of nearly every round, raises
        nothing."""
        m = self._module if self._ready else self.nvml
        function = self._c_function("nvmlEventSetWait_v2")
        struct = getattr(m, "c_nvmlEventData_t", None)
        if function is None or struct is None:
            try:
                return m.nvmlEventSetWait_v2(events, 0)
            except m.NVMLError_Timeout:
                return None
        data = struct()
        code = function(events, ctypes.byref(data), 0)
        if code == _TIMEOUT:
            return None
        if code != _SUCCESS:
            raise m.NVMLError(code)
        return data

    def _c_function(self, name: str | None) -> Any:
        """NVML's C function ``name``, or ``None`` where its wrapper is to be used (a stand-in
        module without C functions, a symbol pynvml cannot find)."""
        if name is None:
            return None
        try:
            return self._c_functions[name]
        except KeyError:
            pass
        function = None
        lookup = getattr(self._module, "_nvmlGetFunctionPointer", None)
        if lookup is not None:
            try:
                function = lookup(name)
            except Exception as exc:  # the wrapper answers what went wrong, where it matters
                log.debug("nvml: %s is called through its wrapper: %s", name, exc)
        self._c_functions[name] = function
        return function

    def _buffer(self, name: str, struct: Any, size: int) -> _Buffer:
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = _Buffer(struct, size)
        return buffer

    @staticmethod
    def _fill(
        function: Any, buffer: _Buffer, arguments: Callable[[_Buffer], tuple[Any, ...]]
    ) -> int:
        """Call a C function that lists entries into ``buffer`` (its count in, the entries
        written out), growing the buffer while NVML answers it is too small, or fills it to the
        last entry (a driver that writes what fits and succeeds must not cut a list short); the
        return code."""
        code = _INSUFFICIENT_SIZE
        for tries_left in range(_GROW_TRIES - 1, -1, -1):
            size = len(buffer.array)
            buffer.count.value = size
            code = function(*arguments(buffer))
            if code == _SUCCESS and buffer.count.value < size:
                return _SUCCESS
            if code not in (_SUCCESS, _INSUFFICIENT_SIZE):
                return int(code)
            if tries_left:
                buffer.grow(max(buffer.count.value, size + 1))
        return int(code)

    def gpm_sample(self, handle: Any, sample: Any) -> bool:
        """Take a GPM sample of ``handle`` into ``sample`` (``nvmlGpmSampleGet``, its C
        function where it has one); False where NVML could not (logged once). Raises as
        :meth:`call` does."""
        m = self._module if self._ready else self.nvml
        name = "nvmlGpmSampleGet"
        function = None if name in self._missing else self._c_function(name)
        if function is None:
            return self._invoke(name, (handle, sample), {}) is not None
        code = function(handle, sample)
        if code != _SUCCESS:
            self._failed(name, m.NVMLError(code))  # raises, or logs once
            return False
        return True

    def gpm_metric(self, metric_id: int, sample1: Any, sample2: Any) -> float | None:
        """GPM metric ``metric_id`` between two samples of one device (``nvmlGpmMetricsGet``),
        as NVML gives it; ``None`` where NVML could not tell (logged once where the call
        failed). Raises as :meth:`call` does."""
        m = self._module if self._ready else self.nvml
        name = "nvmlGpmMetricsGet"
        kept = self._gpm_requests.get(metric_id)
        if kept is None:
            request = m.c_nvmlGpmMetricsGet_t()
            request.version = m.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = 1
            metric = request.metrics[0]
            metric.metricId = metric_id
            kept = self._gpm_requests[metric_id] = (
                request,
                ctypes.byref(request) if isinstance(request, ctypes.Structure) else None,
                _setter(request, "sample1"),
                _setter(request, "sample2"),
                _getter(metric, "nvmlReturn"),
                _getter(metric, "value"),
            )
        request, ref, first, second, return_of, value_of = kept
        first(request, sample1)
        second(request, sample2)
        function = None if name in self._missing or ref is None else self._c_function(name)
        if function is None:
            if self._invoke(name, (request,), {}) is None:
                return None
        else:
            code = function(ref)
            if code != _SUCCESS:
                self._failed(name, m.NVMLError(code))  # raises, or logs once
                return None
        return None if return_of() != _SUCCESS else float(value_of())

    def full_gpu_slices(self, handle: Any) -> int | None:
        """The compute slices of a whole MIG-capable GPU (7 on A100/H100, 4 on A30): the largest
        ``sliceCount`` of its GPU instance profiles, else ``nvmlDeviceGetMaxMigDeviceCount`` (one
        MIG device per slice at most); ``None`` when NVML tells neither.

        Profiles a GPU lacks answer with an error; probing them is expected, so not logged.
        """
        m = self.nvml
        largest = 0
        for profile in range(int(getattr(m, "NVML_GPU_INSTANCE_PROFILE_COUNT", 0))):
            try:
                info = m.nvmlDeviceGetGpuInstanceProfileInfo(handle, profile)
            except m.NVMLError_GpuIsLost:
                raise GpuLost("nvmlDeviceGetGpuInstanceProfileInfo: GPU is lost") from None
            except (m.NVMLError, AttributeError):
                continue
            largest = max(largest, int(info.sliceCount))
        if largest:
            return largest
        count = self.call("nvmlDeviceGetMaxMigDeviceCount", handle)
        return int(count) if count else None

    def memory(self, handle: Any) -> tuple[int, int] | None:
        """(used, total) framebuffer bytes, v2 (``used`` excludes reserved memory) when the
        driver has it; ``None`` when NVML cannot tell (logged once). Raises ``GpuLost`` and
        ``NvmlUnavailable`` as :meth:`call` does."""
        m = self._module if self._ready else self.nvml
        if self._memory_v2 is None:
            version = getattr(m, "nvmlMemory_v2", None)
            if version is not None:
                try:
                    info = m.nvmlDeviceGetMemoryInfo(handle, version=version)
                    self._memory_v2 = True
                    return int(info.used), int(info.total)
                except m.NVMLError_GpuIsLost:
                    raise GpuLost("nvmlDeviceGetMemoryInfo: GPU is lost") from None
                except (m.NVMLError_FunctionNotFound, m.NVMLError_NotSupported, TypeError):
                    pass
                except m.NVMLError as exc:
                    if "Version" not in type(exc).__name__:
                        raise
            self._memory_v2 = False
        if self._memory_v2:
            name = "nvmlDeviceGetMemoryInfo_v2"
            request = self._memory_request()
            if request is not None:
                answer = self._ask(name, request, handle)
                if answer is None:
                    return None
                used, total = request[3]
                return used(answer), total(answer)
            info = self._invoke("nvmlDeviceGetMemoryInfo", (handle,), {"version": m.nvmlMemory_v2})
        else:
            info = self._invoke("nvmlDeviceGetMemoryInfo", (handle,), {})
        return None if info is None else (int(info.used), int(info.total))

    def utilization(self, handle: Any) -> int | None:
        """The percent of NVML's last sample period in which a kernel ran on the GPU;
        ``None`` when NVML cannot tell (logged once). Raises as :meth:`call` does."""
        return self._number(*_UTILIZATION, handle)

    def power_mw(self, handle: Any) -> int | None:
        """The GPU's power draw, milliwatts, as ``nvmlDeviceGetPowerUsage`` tells it; ``None``
        when NVML cannot tell (logged once). Raises as :meth:`call` does."""
        return self._number(*_POWER, handle)

    def clock_reasons(self, handle: Any) -> int | None:
        """The bit mask of what holds the GPU's clocks down, by the newest symbol that works;
        ``None`` when NVML cannot tell (logged once). Raises as :meth:`call` does."""
        name = self._chosen.get("clock_reasons")
        if name is None or name != _VARIANTS["clock_reasons"][0]:
            value = self.variant("clock_reasons", handle)
            return None if value is None else int(value)
        return self._number(name, *_CLOCK_REASONS, handle)

    def readings(self, handle: Any) -> Readings:
        """:meth:`utilization`, :meth:`memory`, :meth:`power_mw`, :meth:`temperature` and
        :meth:`clock_reasons` of ``handle``, in that order, each answered as its method
        answers; in one go where each has its C function (every round on a GPU node)."""
        plan = self._readings
        if plan is None:
            plan = self._readings = self._readings_plan()
        if plan is None:  # a wrapper or a symbol not yet probed: each asked as its method asks
            return (
                self.utilization(handle),
                self.memory(handle),
                self.power_mw(handle),
                self.temperature(handle),
                self.clock_reasons(handle),
            )
        answers: list[Any] = []
        for name, (function, ref, answer, getters) in plan:
            code = function(handle, ref)
            if code != _SUCCESS:
                # raises, or logs once (a symbol the driver lacks: the plan is made anew)
                self._failed(name, self._module.NVMLError(code))
                answers.append(None)
            elif len(getters) == 1:
                answers.append(getters[0](answer))
            else:
                answers.append(tuple(getter(answer) for getter in getters))
        return tuple(answers)

    def _readings_plan(self) -> list[tuple[str, _Request]] | None:
        """The C requests :meth:`readings` makes, each as its method makes it; ``None`` while
        any reading goes through a wrapper (or its symbol is not probed yet)."""
        temperature = self._chosen.get("temperature")
        reasons = self._chosen.get("clock_reasons")
        if temperature is None or reasons is None or not self._memory_v2:
            return None
        if reasons != _VARIANTS["clock_reasons"][0]:
            return None
        requests = [
            (_UTILIZATION[0], self._answer(_UTILIZATION[0], _UTILIZATION[1], _UTILIZATION[2:])),
            ("nvmlDeviceGetMemoryInfo_v2", self._memory_request()),
            (_POWER[0], self._answer(_POWER[0], _POWER[1], _POWER[2:])),
            (temperature, self._temperature_request(temperature)),
            (reasons, self._answer(reasons, _CLOCK_REASONS[0], _CLOCK_REASONS[1:])),
        ]
        planned = [(name, request) for name, request in requests if request is not None]
        return planned if len(planned) == len(requests) else None

    def _memory_request(self) -> _Request | None:
        m = self._module
        return self._answer(
            "nvmlDeviceGetMemoryInfo_v2",
            "c_nvmlMemory_v2_t",
            ("used", "total"),
            version=getattr(m, "nvmlMemory_v2", None),
        )

    def _temperature_request(self, name: str | None) -> _Request | None:
        if name is None or name != _VARIANTS["temperature"][0]:
            return None
        m = self._module
        return self._answer(
            name,
            "c_nvmlTemperature_v1_t",
            ("temperature",),
            version=getattr(m, "nvmlTemperature_v1", None),
            sensorType=m.NVML_TEMPERATURE_GPU,
        )

    def _number(self, name: str, kind: str | Any, field: str, handle: Any) -> int | None:
        """One number NVML's ``name`` answers: ``field`` of its answer of type ``kind`` (see
        :meth:`_answer`), or the wrapper's answer (that field of it, or the number itself)."""
        request = self._answer(name, kind, (field,))
        if request is None:
            value = self._invoke(name, (handle,), {})
            if value is None:
                return None
            # a wrapper answers a structure, or for a plain C number the number itself
            return int(getattr(value, field) if field != "value" else value)
        answer = self._ask(name, request, handle)
        return None if answer is None else int(request[3][0](answer))

    def _answer(
        self, name: str, kind: str | Any, fields: tuple[str, ...], **settings: Any
    ) -> _Request | None:
        """NVML's C function ``name`` that writes one answer of type ``kind`` (a ctypes type, or
        the name of the module's structure, whose fields ``settings`` are set once): the
        function, a reference to the answer made once, the answer, and its ``fields``' own
        getters. ``None`` where the wrapper is to be used (no C function, no such structure,
        a setting the binding lacks: ``None``)."""
        key = ("answer", name)
        kept: _Request | None = self._buffers.get(key)
        if kept is not None:
            return None if name in self._missing else kept
        function = self._c_function(name) if name not in self._missing else None
        struct = getattr(self._module, kind, None) if isinstance(kind, str) else kind
        if function is None or struct is None or None in settings.values():
            return None
        answer = struct()
        for field, value in settings.items():
            getattr(struct, field).__set__(answer, value)
        getters = tuple(getattr(struct, f).__get__ for f in fields)
        kept = self._buffers[key] = (function, ctypes.byref(answer), answer, getters)
        return kept

    def _ask(self, name: str, request: _Request, handle: Any) -> Any:
        """Call the C function of ``request`` (:meth:`_answer`) for ``handle``: its answer, or
        ``None`` where it failed (logged once; raises as :meth:`call` does)."""
        function, ref, answer, _ = request
        code = function(handle, ref)
        if code != _SUCCESS:
            self._failed(name, self._module.NVMLError(code))
            return None
        return answer

    def field_values(self, handle: Any, field_ids: Sequence[int]) -> dict[int, float | None]:
        """Several fields in one NVML call; each unsupported field is ``None``."""
        m = self._module if self._ready else self.nvml
        ids = tuple(field_ids)
        out: dict[int, float | None] = dict.fromkeys(ids)
        self.field_stamp_us = None
        name = "nvmlDeviceGetFieldValues"
        function = self._c_function(name)
        struct = getattr(m, "c_nvmlFieldValue_t", None)
        if function is not None and struct is not None and name not in self._missing:
            request = self._buffers.get(ids)
            if request is None:
                values = (struct * len(ids))()
                for entry, field_id in zip(values, ids, strict=True):
                    struct.fieldId.__set__(entry, field_id)  # scopeId 0
                    # what NVML leaves unwritten never passes for a reading
                    struct.nvmlReturn.__set__(entry, _UNKNOWN)
                request = self._buffers[ids] = (values, bytes(values))
            values, unanswered = request
            ctypes.memmove(values, unanswered, len(unanswered))
            code = function(handle, len(ids), values)
            if code != _SUCCESS:
                self._failed(name, m.NVMLError(code))
                return out
            reader = self._field_reader
            if reader is None:
                reader = self._field_reader = _FieldReader.of(struct, m) or False
            if reader:
                self.field_stamp_us = reader.read(values, ids, out)
                return out
        else:
            request = self._field_requests.get(ids)
            if request is None:
                request = self._field_requests[ids] = [(field_id, 0) for field_id in ids]
            values = self._invoke(name, (handle, request), {})
            if values is None:
                return out
        readers = self._readers
        if readers is None:
            readers = self._readers = self._value_readers()
        struct_type, getters = self._field_getters
        if getattr(values, "_type_", None) is not struct_type:  # not pynvml's array: no shortcut
            getters = _FIELD_ATTRIBUTES
        return_of, type_of, value_of = getters
        newest: int | None = None
        for field_id, value in zip(ids, values, strict=False):
            if return_of(value) == 0:
                read = readers.get(type_of(value))
                if read is not None:
                    out[field_id] = float(read(value_of(value)))
                stamp = getattr(value, "timestamp", None)
                if isinstance(stamp, int) and stamp > 0 and (newest is None or stamp > newest):
                    newest = stamp
        self.field_stamp_us = newest
        return out

    def _value_readers(self) -> dict[int, Callable[[Any], float]]:
        m = self.nvml
        # nvmlFieldValue_t's own field getters: pynvml's structures run Python code on every
        # attribute read (a bytes-to-str check, moot for numbers) that costs several times the read
        struct_type: Any = getattr(m, "c_nvmlFieldValue_t", None)
        try:
            self._field_getters = (
                struct_type,
                (
                    struct_type.nvmlReturn.__get__,
                    struct_type.valueType.__get__,
                    struct_type.value.__get__,
                ),
            )
        except AttributeError:
            self._field_getters = (None, _FIELD_ATTRIBUTES)
        readers: dict[int, Callable[[Any], float]] = {
            m.NVML_VALUE_TYPE_DOUBLE: lambda v: v.dVal,
            m.NVML_VALUE_TYPE_UNSIGNED_INT: lambda v: v.uiVal,
            m.NVML_VALUE_TYPE_UNSIGNED_LONG: lambda v: v.ulVal,
            m.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: lambda v: v.ullVal,
            m.NVML_VALUE_TYPE_SIGNED_LONG_LONG: lambda v: v.sllVal,
        }
        signed_int = getattr(m, "NVML_VALUE_TYPE_SIGNED_INT", None)
        if signed_int is not None:
            readers[signed_int] = lambda v: v.siVal
        return readers


class _FieldReader:
    """Reads an array of ``nvmlFieldValue_t`` NVML filled with one ``struct`` call: each
    entry's value type, return code and value (the union's 8 bytes, read as its member of that
    type is read: from its first byte, in this machine's byte order)."""

    def __init__(self, entry: str, values: dict[int, struct.Struct]) -> None:
        self._entry = entry  # an entry's timestamp, value type, return code and value
        self._values = values
        self._arrays: dict[int, struct.Struct] = {}

    @classmethod
    def of(cls, struct_type: Any, m: Any) -> _FieldReader | None:
        """The reader of ``struct_type`` (pynvml's ``c_nvmlFieldValue_t``) and the value types
        of binding ``m``; ``None`` where the structure is not laid out as NVML's."""
        try:
            kind, code, value = struct_type.valueType, struct_type.nvmlReturn, struct_type.value
            stamp = struct_type.timestamp
            size = ctypes.sizeof(struct_type)
        except (AttributeError, TypeError):
            return None
        if (stamp.size, kind.size, code.size, value.size) != (8, 4, 4, 8):
            return None
        if not (kind.offset + 4 == code.offset and code.offset + 4 == value.offset):
            return None
        if stamp.offset + 8 > kind.offset:
            return None
        gap = kind.offset - stamp.offset - 8
        entry = f"{stamp.offset}xq{gap}xII8s{size - value.offset - 8}x"
        long_code = "Q" if ctypes.sizeof(ctypes.c_ulong) == 8 else "I"
        codes = {
            "NVML_VALUE_TYPE_DOUBLE": "d",
            "NVML_VALUE_TYPE_UNSIGNED_INT": "I",
            "NVML_VALUE_TYPE_UNSIGNED_LONG": long_code,
            "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": "Q",
            "NVML_VALUE_TYPE_SIGNED_LONG_LONG": "q",
            "NVML_VALUE_TYPE_SIGNED_INT": "i",
        }
        values = {
            getattr(m, name): struct.Struct("=" + letter)
            for name, letter in codes.items()
            if getattr(m, name, None) is not None
        }
        return cls(entry, values)

    def read(self, array: Any, ids: tuple[int, ...], out: dict[int, float | None]) -> int | None:
        """Each entry of ``array`` (for field ``ids``) NVML answered with a value of a known
        type, as a float into ``out``; the newest timestamp (µs) of an answered entry, None
        where none was answered."""
        packing = self._arrays.get(len(ids))
        if packing is None:
            packing = self._arrays[len(ids)] = struct.Struct("=" + self._entry * len(ids))
        read = iter(packing.unpack_from(array))
        values = self._values
        newest = 0
        for field_id, stamp, kind, code, value in zip(ids, read, read, read, read, strict=True):
            if code == _SUCCESS:
                number = values.get(kind)
                if number is not None:
                    out[field_id] = float(number.unpack_from(value)[0])
                newest = max(newest, stamp)
        return newest or None


class _Buffer:
    """An array of ``struct`` a C function lists entries into, with its count (in: the
    entries the array holds; out: the entries written) and the structure's field getters."""

    def __init__(self, struct: Any, size: int) -> None:
        self.struct = struct
        self.count = ctypes.c_uint(0)
        self.ref = ctypes.byref(self.count)
        self.array: Any = (struct * size)()
        self._since = ctypes.c_ulonglong(0)
        self._getters: dict[tuple[str, ...], tuple[Callable[[Any], Any], ...]] = {}

    def grow(self, needed: int) -> None:
        size = max(needed, 2 * len(self.array))
        self.array = (self.struct * size)()

    def since(self, time_us: int) -> ctypes.c_ulonglong:
        self._since.value = time_us
        return self._since

    def entries(self) -> list[Any]:
        """The entries written by the last call."""
        return self.array[: min(self.count.value, len(self.array))]  # type: ignore[no-any-return]

    def getters(self, *names: str) -> tuple[Callable[[Any], Any], ...]:
        """Each field's own getter: pynvml's structures run Python code on every attribute
        read (a bytes-to-str check, moot for numbers) that costs several times the read."""
        found = self._getters.get(names)
        if found is None:
            found = self._getters[names] = tuple(getattr(self.struct, n).__get__ for n in names)
        return found


def _setter(structure: Any, field: str) -> Callable[[Any, Any], None]:
    """The setter of ``field`` of ``structure``: its ctypes field's own, past what a binding's
    structure class runs on every attribute access."""
    descriptor = getattr(type(structure), field, None)
    if descriptor is not None and hasattr(descriptor, "offset"):  # a ctypes field
        return descriptor.__set__  # type: ignore[no-any-return]
    return lambda target, value: setattr(target, field, value)


def _getter(structure: Any, field: str) -> Callable[[], Any]:
    """A reader of ``field`` of ``structure`` as it is when called (see :func:`_setter`)."""
    descriptor = getattr(type(structure), field, None)
    if descriptor is not None and hasattr(descriptor, "offset"):
        return functools.partial(descriptor.__get__, structure)
    return functools.partial(getattr, structure, field)


# nvmlReturn, valueType and value of a field value, read as attributes
_FIELD_ATTRIBUTES = (
    operator.attrgetter("nvmlReturn"),
    operator.attrgetter("valueType"),
    operator.attrgetter("value"),
)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
