"""``gpu`` collector: every GPU and MIG instance through the NVML gateway (SPEC §2 gpu table).

Per device one batched field-value read (energy, ECC, row remapping) plus the calls NVML has no
field for. SM activity comes from GPM (Hopper and later): the previous round's sample is kept
and compared with this round's, so the collector never sleeps. XID critical errors arrive through
an NVML event set drained without blocking. A lost GPU is logged once and skipped until NVML
answers for it again; the others go on. Each round lists the GPUs lost in it (side output
``_gpu_lost``: index and the UUID last seen at that index, ``None`` if never), so that the
exposition marks them and shows none of their stale readings.

What cannot change while NVML stays initialised is asked once per device: the device count, each
handle, UUID and name, and the current MIG mode (a mode change is only activated by a GPU reset,
which NVML refuses while a client such as this one holds the GPU; it stays "pending"). A lost
GPU or a new NVML initialisation (``Gateway.generation``) asks again. MIG instances are
enumerated every round: they are created and destroyed while the GPU runs.

Capacity (``capacity_units``, the fraction of one physical GPU a row stands for): 1 for a GPU
without MIG. A MIG-enabled GPU counts once: each MIG instance is its own row carrying its compute
slices over the GPU's (1g of 7 = 1/7: ``nvmlDeviceGetAttributes`` on the MIG handle over the
largest GPU instance profile's ``sliceCount``, else ``nvmlDeviceGetMaxMigDeviceCount``), and the
parent row (whole-GPU power, energy, temperature) keeps the slices no instance holds, 0 when the
GPU is fully partitioned.

Per process (side output ``_gpu_pids``, for attribution): the PIDs NVML lists on each GPU or MIG
instance, their framebuffer use, and their mean SM utilisation over the samples NVML took since
the previous round (``Gateway.process_utilization``; ``None`` where NVML gives none).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from telemetry.collectors.base import Collector, CollectorContext, Row, register
from telemetry.logs import OnceLogger
from telemetry.nvml import Gateway, GpuLost, NvmlUnavailable, ProcessSample

log = logging.getLogger("tally.gpu")

GPM_MIN_SECONDS = 0.1
_MIG_PROFILE = re.compile(r"\bMIG\s+(\S+)\s*$")
# Compute slices in a MIG profile name: "3g.40gb" -> 3, "1c.3g.40gb" (one CI of a GI) -> 1.
_PROFILE_SLICES = re.compile(r"^(?:(\d+)c\.)?(\d+)g\.")


def mig_profile(name: str) -> str | None:
    """The MIG profile in an NVML MIG device name (``… MIG 1g.10gb`` → ``1g.10gb``)."""
    match = _MIG_PROFILE.search(name)
    return match.group(1) if match else None


def profile_slices(profile: str) -> int | None:
    """Compute slices of a MIG profile name (``2g.20gb`` → 2, ``1c.3g.40gb`` → 1)."""
    match = _PROFILE_SLICES.match(profile)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


@dataclass
class _Device:
    """What NVML says of one device index that holds for one initialisation."""

    handle: Any
    uuid: str | None = None
    model: str | None = None
    mig_enabled: bool | None = None


@dataclass
class _DeviceState:
    gpm_sample: Any = None
    gpm_time: float = 0.0
    xid_total: int = 0
    xid_last: int | None = None
    spare: list[Any] = field(default_factory=list)
    field_stamp_us: int | None = None  # NVML's time of the last round's field values


class ProcessSm:
    """The mean SM utilisation (0-1) of each PID over the past round on one GPU, asked of NVML
    when first called: only a GPU several jobs hold needs it (attribution asks), and a node's
    GPUs are mostly held whole. The samples are those after ``since``, NVML's time of the
    previous round's field values, so that a GPU not asked for rounds gives its last round's,
    not what NVML's buffer kept since. ``None`` where NVML gives no sample (or cannot tell,
    or the GPU stopped answering since the round read it)."""

    __slots__ = ("_answer", "_asked", "_gateway", "_handle", "_since", "_uuid")

    def __init__(self, gateway: Gateway, uuid: str, handle: Any, since: int | None) -> None:
        self._gateway, self._uuid, self._handle, self._since = gateway, uuid, handle, since
        self._asked = False
        self._answer: dict[int, float] | None = None

    def __call__(self) -> dict[int, float] | None:
        if not self._asked:
            self._asked = True
            try:
                samples = self._gateway.process_utilization(self._uuid, self._handle, self._since)
            except (GpuLost, NvmlUnavailable):  # said by the next round's reading of the GPU
                samples = None
            self._answer = mean_sm(samples)
        return self._answer


def mean_sm(samples: list[ProcessSample] | None) -> dict[int, float] | None:
    """Each PID's mean SM utilisation over ``samples``; None where there is none ([] tells
    nothing per job: null)."""
    if not samples:
        return None
    totals: dict[int, list[float]] = {}
    for sample in samples:
        totals.setdefault(sample.pid, []).append(sample.sm_ratio)
    return {pid: sum(values) / len(values) for pid, values in totals.items()}


@register
class GpuCollector(Collector):
    name = "gpu"
    help = "GPUs and MIG instances through NVML: utilisation, memory, power, energy, health"

    def __init__(self, ctx: CollectorContext, gateway: Gateway | None = None) -> None:
        super().__init__(ctx)
        self.gw = gateway or Gateway(ctx.nvml_module)
        self._state: dict[str, _DeviceState] = {}
        self._lost: set[int] = set()
        self._events: Any = None
        self._events_ready = False
        self._once = OnceLogger(log)
        self._gpm_ok: dict[str, bool] = {}
        self._slices: dict[str, int | None] = {}  # MIG parent UUID -> its compute slices
        # By index, for one gateway generation: handles, UUIDs, names, MIG mode, the count.
        self._devices: dict[int, _Device] = {}
        self._count: int | None = None
        self._generation = -1
        # ECC SBE and DBE totals and remapped rows pending, after the energy counter if read
        self._field_ids: tuple[int, ...] = ()
        self._energy_id: int | None = None
        self._uuids: dict[int, str] = {}  # the UUID last read at each index (for a lost GPU)

    # ------------------------------------------------------------------ round
    def collect(self) -> dict[str, list[Row]]:
        m = self.gw.nvml  # raises NvmlUnavailable: this collector fails, the daemon goes on
        if self._generation != self.gw.generation:  # NVML (re)initialised: ask everything anew
            self._generation = self.gw.generation
            self._devices.clear()
            self._count = None
            health = (
                m.NVML_FI_DEV_ECC_SBE_VOL_TOTAL,
                m.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
                m.NVML_FI_DEV_REMAPPED_PENDING,
            )
            self._energy_id = None
            if self.ctx.gpu_energy_counter:
                self._energy_id = m.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION
            self._field_ids = health if self._energy_id is None else (self._energy_id, *health)
        count = self._count
        if count is None:
            count = self.gw.call("nvmlDeviceGetCount") or 0
            self._count = count or None  # a failed count is asked again next round
        handles = []
        lost: list[Row] = []
        for index in range(count):
            device = self._devices.get(index)
            if device is None:
                try:
                    handle = self.gw.call("nvmlDeviceGetHandleByIndex", index)
                except GpuLost:
                    self._mark_lost(index, lost)
                    continue
                if handle is None:
                    continue
                device = self._devices[index] = _Device(handle)
            handles.append((index, device))
        if not self._events_ready:
            self._setup_events([(index, device.handle) for index, device in handles])
        xids = self._drain_xids()
        rows: list[Row] = []
        pids: list[Row] = []
        for index, device in handles:
            try:
                device_rows, device_pids = self._read_device(m, index, device, xids)
            except GpuLost:
                self._devices.pop(index, None)  # asked afresh when it answers again
                self._mark_lost(index, lost)
                continue
            if index in self._lost:
                self._lost.discard(index)
                self._once.clear(f"lost:{index}")
                log.warning("gpu %d answers again", index)
            rows.extend(device_rows)
            pids.extend(device_pids)
        return {"gpu": rows, "_gpu_pids": pids, "_gpu_lost": lost}

    def _mark_lost(self, index: int, lost: list[Row]) -> None:
        lost.append({"gpu_index": index, "gpu_uuid": self._uuids.get(index)})
        self._lost.add(index)
        self._once.warning(
            f"lost:{index}", f"gpu {index}: GPU is lost; skipped until it answers again"
        )

    # ------------------------------------------------------------------ one device
    def _read_device(
        self, m: Any, index: int, device: _Device, xids: dict[int, list[int]]
    ) -> tuple[list[Row], list[Row]]:
        handle = device.handle
        uuid = device.uuid
        if uuid is None:
            answer = self.gw.call("nvmlDeviceGetUUID", handle)
            uuid = _text(answer)
            if answer is not None:  # a failed call is asked again next round
                device.uuid = uuid
                self._uuids[index] = uuid
        model = device.model
        if model is None:
            answer = self.gw.call("nvmlDeviceGetName", handle)
            model = _text(answer or "unknown")
            if answer is not None:
                device.model = model
        state = self._state.get(uuid)
        if state is None:
            state = self._state[uuid] = _DeviceState()
        sbe_id, dbe_id, remapped_id = self._field_ids[-3:]
        fields = self.gw.field_values(handle, self._field_ids)
        since, state.field_stamp_us = state.field_stamp_us, self.gw.field_stamp_us
        energy_mj = None
        if self._energy_id is not None:
            energy_mj = fields[self._energy_id]
            if energy_mj is None:
                energy_mj = self.gw.call("nvmlDeviceGetTotalEnergyConsumption", handle)
        util, memory, power_mw, temperature, reasons = self.gw.readings(handle)
        for code in xids.get(index, []):
            state.xid_total += 1
            state.xid_last = code
        row: Row = {
            "gpu_uuid": uuid,
            "gpu_index": index,
            "gpu_model": model,
            "utilization_ratio": None if util is None else util / 100.0,
            "sm_active_ratio": self._sm_active(m, uuid, handle, state),
            "memory_used_bytes": 0 if memory is None else memory[0],
            "memory_total_bytes": 0 if memory is None else memory[1],
            "power_watts": None if power_mw is None else power_mw / 1000.0,
            "energy_joules": None if energy_mj is None else energy_mj / 1000.0,
            "temperature_celsius": None if temperature is None else float(temperature),
            "job_id": None,
            "mig_profile": None,
            "ecc_corrected_errors": _int(fields[sbe_id]),
            "ecc_uncorrected_errors": _int(fields[dbe_id]),
            "remapped_rows_pending": _int(fields[remapped_id]),
            "clock_event_reasons": reasons,
            "xid_errors": state.xid_total,
            "xid_last": state.xid_last,
            "capacity_units": 1.0,
        }
        rows = [row]
        mig_enabled = device.mig_enabled
        if mig_enabled is None:
            mode = self.gw.call("nvmlDeviceGetMigMode", handle)
            mig_enabled = bool(mode and mode[0])
            if mode is not None:  # no answer (not supported, failed) is asked again
                device.mig_enabled = mig_enabled
        # In MIG mode the processes belong to the instances; the parent lists them all again.
        pids = [self._processes(uuid, index, handle, not mig_enabled, since)]
        pids[0]["mig_parent"] = mig_enabled
        if mig_enabled:
            total = self._total_slices(uuid, handle)
            held = 0
            for mig_row, mig_pids, slices in self._mig_devices(handle, index, model):
                mig_row["capacity_units"] = min(slices / total, 1.0)
                rows.append(mig_row)
                pids.append(mig_pids)
                held += slices
            row["capacity_units"] = max(total - held, 0) / total  # the slices no instance holds
        return rows, pids

    def _processes(
        self, uuid: str, index: int, handle: Any, sampled: bool = True, since: int | None = None
    ) -> Row:
        """The side-output row of one GPU or MIG instance: PIDs, framebuffer bytes per PID
        (``None`` where NVML cannot tell) and ``sm``, the mean SM utilisation per PID (0-1)
        over the past round (``None`` where NVML gives no samples): a :class:`ProcessSm` to
        call where NVML's time of the last round (``since``) is known, else read now."""
        memory = dict(self.gw.processes(handle) or ())
        sm: dict[int, float] | ProcessSm | None = None
        if sampled and since is not None:
            sm = ProcessSm(self.gw, uuid, handle, since)
        elif sampled:
            sm = mean_sm(self.gw.process_utilization(uuid, handle))
        return {
            "gpu_uuid": uuid,
            "gpu_index": index,
            "pids": list(memory),
            "memory": memory,
            "sm": sm,
        }

    def _total_slices(self, uuid: str, handle: Any) -> int:
        """Compute slices of a MIG-enabled GPU (asked once per GPU)."""
        if uuid not in self._slices:
            self._slices[uuid] = self.gw.full_gpu_slices(handle)
        total = self._slices[uuid]
        if not total:
            # NVML tells too little; 7 slices is what every MIG GPU but the A30 has.
            self._once.warning(
                f"slices:{uuid}", f"gpu {uuid}: MIG slice count unknown to NVML; taken as 7"
            )
            return 7
        return total

    def _mig_devices(
        self, handle: Any, index: int, parent_model: str
    ) -> list[tuple[Row, Row, int]]:
        """(gpu row, side-output row, compute slices) of each MIG device of a GPU."""
        slots = self.gw.call("nvmlDeviceGetMaxMigDeviceCount", handle) or 0
        out = []
        for slot in range(slots):
            try:
                mig = self.gw.nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except self.gw.nvml.NVMLError_NotFound:
                continue
            except self.gw.nvml.NVMLError_GpuIsLost:
                raise GpuLost("MIG handle: GPU is lost") from None
            except self.gw.nvml.NVMLError:
                continue
            uuid = _text(self.gw.call("nvmlDeviceGetUUID", mig))
            name = _text(self.gw.call("nvmlDeviceGetName", mig) or parent_model)
            memory = self.gw.memory(mig)
            util = self.gw.utilization(mig)
            profile = mig_profile(name) or name
            instance = self.gw.call("nvmlDeviceGetGpuInstanceId", mig)
            row: Row = {
                "gpu_uuid": uuid,
                "gpu_index": index,
                "gpu_model": parent_model,
                "utilization_ratio": None if util is None else util / 100.0,
                "memory_used_bytes": 0 if memory is None else memory[0],
                "memory_total_bytes": 0 if memory is None else memory[1],
                "job_id": None,
                "mig_profile": profile,
                "gpu_instance_id": None if instance is None else int(instance),
            }
            side = {**self._processes(uuid, index, mig), "mig": True}
            out.append((row, side, self._slice_count(mig, profile)))
        return out

    def _slice_count(self, mig: Any, profile: str) -> int:
        """Compute slices of one MIG device: NVML's attributes, else its profile name, else 1."""
        attributes = self.gw.call("nvmlDeviceGetAttributes", mig)
        slices = None if attributes is None else int(attributes.computeInstanceSliceCount)
        slices = slices or profile_slices(profile)
        if not slices:
            self._once.warning(
                f"slices:{profile}", f"gpu: MIG {profile}: slice count unknown; counted as 1"
            )
        return slices or 1

    # ------------------------------------------------------------------ GPM
    def _sm_active(self, m: Any, uuid: str, handle: Any, state: _DeviceState) -> float | None:
        if self._gpm_ok.get(uuid) is False:
            return None
        if uuid not in self._gpm_ok:
            support = self.gw.call("nvmlGpmQueryDeviceSupport", handle)
            self._gpm_ok[uuid] = bool(support is not None and support.isSupportedDevice)
            if not self._gpm_ok[uuid]:
                return None
        sample = state.spare.pop() if state.spare else self.gw.call("nvmlGpmSampleAlloc")
        if sample is None or not self.gw.gpm_sample(handle, sample):
            self._gpm_ok[uuid] = False
            return None
        now = time.monotonic()
        previous, previous_time = state.gpm_sample, state.gpm_time
        ratio = None
        if previous is not None and now - previous_time >= GPM_MIN_SECONDS:
            percent = self.gw.gpm_metric(m.NVML_GPM_METRIC_SM_UTIL, previous, sample)
            if percent is not None:
                ratio = min(max(percent / 100.0, 0.0), 1.0)
        elif previous is not None:
            state.spare.append(sample)  # too soon: keep the older sample as the baseline
            return None
        if previous is not None:
            state.spare.append(previous)
        state.gpm_sample, state.gpm_time = sample, now
        return ratio

    # ------------------------------------------------------------------ XID events
    def _setup_events(self, handles: list[tuple[int, Any]]) -> None:
        if self._events_ready:
            return
        self._events_ready = True
        m = self.gw.nvml
        events = self.gw.call("nvmlEventSetCreate")
        if events is None:
            return
        for _, handle in handles:
            self.gw.call(
                "nvmlDeviceRegisterEvents", handle, m.nvmlEventTypeXidCriticalError, events
            )
        self._events = events

    def _drain_xids(self) -> dict[int, list[int]]:
        if self._events is None:
            return {}
        m = self.gw.nvml
        found: dict[int, list[int]] = {}
        for _ in range(1000):  # bounded: never hold the loop on an event storm
            try:
                data = self.gw.next_event(self._events)
            except m.NVMLError_GpuIsLost:
                break  # reported by the device loop
            except m.NVMLError as exc:
                self._once.warning("xid", f"gpu: reading XID events failed: {exc}")
                break
            if data is None:
                break  # nothing pending
            index = _device_index(m, data.device)  # events carry a fresh handle object
            if index is not None:
                found.setdefault(index, []).append(int(data.eventData))
        return found

    def close(self) -> None:
        if self._events is not None:
            with contextlib.suppress(Exception):  # closing anyway
                self.gw.call("nvmlEventSetFree", self._events)
        self.gw.shutdown()


def _device_index(m: Any, device: Any) -> int | None:
    try:
        return int(m.nvmlDeviceGetIndex(device))
    except Exception:
        return None


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
