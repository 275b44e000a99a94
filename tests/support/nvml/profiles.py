"""Device profiles of the NVML stand-in: real GPUs' readings, from public captures.

Device profiles and where their numbers come from
-------------------------------------------------
Every profile carries its source in ``DeviceProfile.source``.  All captures are public
``nvidia-smi`` captures from the repository ``utkuozdemir/nvidia_gpu_exporter`` (folder
``internal/captures``, collected with its ``collect.sh``; identifiers are masked by that tool with
format-preserving placeholders, e.g. ``GPU-00000000-0000-0000-0000-000000000000``):

``h100_idle``   ``linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt`` (commit c58c3331e071),
                section ``idle :: query (-q)`` (+ ``idle :: query-gpu`` CSV for the clocks
                event reason bitmask).
``h100_loaded`` same file, section ``load :: query (-q)`` (gpu-burn + 2 memhog processes) and
                ``load :: query-gpu`` CSV for the bitmask.
``h200_idle``   ``linux-x86_64__nvidia-h200__580.173.02.txt`` (commit 18a7dc5a4958),
                section ``idle :: query (-q)``.  That capture has no load section.
``h200_loaded`` APPROXIMATION - no public capture of a loaded, non-MIG H200 was found.  Built
                from ``linux-x86_64__nvidia-h200-mig__590.48.01.txt`` (commit 0eee0d3187e2),
                section ``load :: query (-q)``, whole-GPU readings (power, temperatures,
                framebuffer, processes) taken while the GPU was MIG-partitioned and presented
                here as a MIG-disabled GPU.  Whole-GPU utilisation is N/A in MIG mode, so
                utilisation 97 % / 7 % comes from the same file's ``idle :: query-accounted-apps``
                row for the gpu_burn process (pid 10550).
``h100_mig``    ``linux-x86_64__nvidia-h100-mig__590.48.01.txt`` (commit c58c3331e071),
                sections ``capabilities :: list (-L)`` (MIG device names/UUIDs) and
                ``load :: query (-q)`` (instances 3g.40gb, 2g.20gb and two 1g.10gb; gpu_burn and
                two memhog processes in GPU instance 2).

Memory values are the capture's MiB figures times 1 MiB; ``free`` is derived as
``total - reserved - used`` so it can be 1 MiB below nvidia-smi's rounded display.  Power is the
capture's "Average Power Draw" (what ``nvmlDeviceGetPowerUsage`` reports on Hopper), the
``NVML_FI_DEV_POWER_INSTANT`` field is "Instantaneous Power Draw".

GPU instance profiles (``H100_GI_PROFILES``, what ``nvmlDeviceGetGpuInstanceProfileInfo``
answers on an H100 80GB in MIG mode): profile ids and placements as ``nvidia-smi mig -lgip`` /
``-lgipp`` print them on an H100 80GB (1g.10gb id 19, 1g.10gb+me 20, 1g.20gb 15, 2g.20gb 14,
3g.40gb 9, 4g.40gb 5, 7g.80gb 0; the 7g profile spans all 7 compute slices); SM counts of the 1g,
2g and 3g profiles from the h100_mig capture's instances, 132 for the whole H100 SXM5; memory
sizes from the capture's instances, 4g and 7g from ``-lgip``'s 39.50 and 79.25 GiB.

Per-process SM utilisation (``ProcessProfile.sm_util_pct``, what
``nvmlDeviceGetProcessUtilization`` samples): the captures hold none per process.  gpu_burn is
given the GPU utilisation its capture shows (100 % on the H100, 97 % on the H200 per
``query-accounted-apps``), memhog (which only allocates) 0 %.  APPROXIMATION.

Not taken from a capture (the fake's choices, documented where they are made):
the energy counter's starting value (``SYNTHETIC_ENERGY_START_MJ``), the GPM SM activity (defaults
to the profile's GPU utilisation), ``NVML_VALUE_TYPE_*`` of field values (chosen to match the C
type of the equivalent direct getter), the symbol set of the "old driver" and the error codes of a
few MIG corner cases.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pynvml

MiB = 1024 * 1024

#: Captures carry no energy counter.  A real counter starts when the driver loads, so the fake
#: starts from a non-zero value (1 kWh in mJ) to catch code that assumes it starts at zero.
SYNTHETIC_ENERGY_START_MJ = 3_600_000_000

#: What NVML writes into ``gpuInstanceId``/``computeInstanceId`` outside MIG (nvidia-smi: "N/A").
NVML_INVALID_ID = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Profiles (immutable data taken from captures)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessProfile:
    pid: int
    used_gpu_memory: int  # bytes
    gpu_instance_id: int | None = None  # None outside MIG
    compute_instance_id: int | None = None
    sm_util_pct: int = 0  # per-process SM utilisation NVML samples (percent)
    mem_util_pct: int = 0  # per-process memory-controller utilisation (percent)


@dataclass(frozen=True)
class GpuInstanceProfile:
    """One row of ``nvmlDeviceGetGpuInstanceProfileInfo`` (keyed by NVML profile index)."""

    index: int  # NVML_GPU_INSTANCE_PROFILE_* constant
    id: int  # the profile id nvidia-smi shows
    name: str
    slices: int  # sliceCount
    instances: int  # instanceCount
    sm_count: int
    memory_mib: int


@dataclass(frozen=True)
class MigInstanceProfile:
    profile: str  # e.g. "1g.10gb"
    uuid: str  # "MIG-..."
    gpu_instance_id: int
    compute_instance_id: int
    memory_total: int  # bytes
    memory_used: int  # bytes
    sm_count: int
    slices: int  # compute slices (gpuInstanceSliceCount = computeInstanceSliceCount, one CI)


@dataclass(frozen=True)
class DeviceProfile:
    key: str
    source: str
    name: str
    uuid: str
    pci_bus_id: str
    driver_version: str
    memory_total: int  # bytes
    memory_reserved: int  # bytes
    memory_used: int  # bytes
    utilization_gpu: int | None  # percent; None -> NotSupported (whole GPU in MIG mode)
    utilization_memory: int | None
    power_mw: int  # nvmlDeviceGetPowerUsage
    power_instant_mw: int  # NVML_FI_DEV_POWER_INSTANT
    power_limit_mw: int
    temperature_gpu: int  # C
    temperature_memory: int  # C, NVML_FI_DEV_MEMORY_TEMP
    clocks_event_reasons: int  # bitmask
    ecc_corrected_volatile: int = 0
    ecc_uncorrected_volatile: int = 0
    ecc_corrected_aggregate: int = 0
    ecc_uncorrected_aggregate: int = 0
    remapped_rows: tuple[int, int, int, int] | None = (0, 0, 0, 0)  # None -> NotSupported
    mig_mode: tuple[int, int] = (0, 0)  # (current, pending)
    max_mig_devices: int = 7
    gi_profiles: tuple[GpuInstanceProfile, ...] = ()  # answered only in MIG mode
    mig_instances: tuple[MigInstanceProfile, ...] = ()
    processes: tuple[ProcessProfile, ...] = ()
    sm_activity_pct: float | None = None  # GPM SM util; None -> utilization_gpu (approximation)
    gpm_supported: bool = True
    energy_start_mj: int = SYNTHETIC_ENERGY_START_MJ


_EXPORTER = "utkuozdemir/nvidia_gpu_exporter"
_H100_FILE = "internal/captures/linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt"
_H100_MIG_FILE = "internal/captures/linux-x86_64__nvidia-h100-mig__590.48.01.txt"
_H200_FILE = "internal/captures/linux-x86_64__nvidia-h200__580.173.02.txt"
_H200_MIG_FILE = "internal/captures/linux-x86_64__nvidia-h200-mig__590.48.01.txt"
_MASKED_GPU_UUID = "GPU-00000000-0000-0000-0000-000000000000"

H100_GI_PROFILES = (
    GpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.10gb", 1, 7, 16, 9984),
    GpuInstanceProfile(
        pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.10gb+me", 1, 1, 16, 9984
    ),
    GpuInstanceProfile(
        pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.20gb", 1, 4, 16, 20096
    ),
    GpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.20gb", 2, 3, 32, 20096),
    GpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.40gb", 3, 2, 60, 40448),
    GpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.40gb", 4, 1, 64, 40448),
    GpuInstanceProfile(pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.80gb", 7, 1, 132, 81152),
)

H100_IDLE = DeviceProfile(
    key="h100_idle",
    source=f"{_EXPORTER} {_H100_FILE} @c58c3331e071, 'idle :: query (-q)'",
    name="NVIDIA H100 80GB HBM3",
    uuid=_MASKED_GPU_UUID,
    pci_bus_id="00000000:00:09.0",
    driver_version="590.48.01",
    memory_total=81559 * MiB,
    memory_reserved=479 * MiB,
    memory_used=0,
    utilization_gpu=0,
    utilization_memory=0,
    power_mw=69_850,  # Average Power Draw 69.85 W
    power_instant_mw=69_620,  # Instantaneous Power Draw 69.62 W
    power_limit_mw=700_000,
    temperature_gpu=41,
    temperature_memory=48,
    clocks_event_reasons=pynvml.nvmlClocksEventReasonGpuIdle,  # CSV: 0x0000000000000001
    gi_profiles=H100_GI_PROFILES,
)

H100_LOADED = replace(
    H100_IDLE,
    key="h100_loaded",
    source=f"{_EXPORTER} {_H100_FILE} @c58c3331e071, 'load :: query (-q)'",
    memory_used=19818 * MiB,
    utilization_gpu=100,
    utilization_memory=11,
    power_mw=629_450,  # 629.45 W
    power_instant_mw=588_390,  # 588.39 W
    temperature_gpu=59,
    temperature_memory=55,
    clocks_event_reasons=pynvml.nvmlClocksEventReasonNone,  # CSV: 0x0000000000000000
    processes=(
        ProcessProfile(11327, 2566 * MiB),  # /root/tools/memhog
        ProcessProfile(11328, 1542 * MiB),  # /root/tools/memhog
        ProcessProfile(11345, 15690 * MiB, sm_util_pct=100),  # ./gpu_burn
    ),
)

H200_IDLE = DeviceProfile(
    key="h200_idle",
    source=f"{_EXPORTER} {_H200_FILE} @18a7dc5a4958, 'idle :: query (-q)'",
    name="NVIDIA H200",
    uuid=_MASKED_GPU_UUID,
    pci_bus_id="00000000:83:00.0",
    driver_version="580.173.02",
    memory_total=143771 * MiB,
    memory_reserved=616 * MiB,
    memory_used=0,
    utilization_gpu=0,
    utilization_memory=0,
    power_mw=85_160,  # 85.16 W
    power_instant_mw=84_760,  # 84.76 W
    power_limit_mw=700_000,
    temperature_gpu=37,
    temperature_memory=38,
    clocks_event_reasons=pynvml.nvmlClocksEventReasonGpuIdle,  # Idle: Active
)

H200_LOADED = replace(
    H200_IDLE,
    key="h200_loaded",
    source=(
        f"APPROXIMATION: {_EXPORTER} {_H200_MIG_FILE} @0eee0d3187e2, 'load :: query (-q)' "
        "whole-GPU readings taken in MIG mode, presented MIG-disabled; utilisation from "
        "'idle :: query-accounted-apps' (gpu_burn, pid 10550)"
    ),
    driver_version="590.48.01",
    memory_reserved=614 * MiB,
    memory_used=16959 * MiB,
    utilization_gpu=97,
    utilization_memory=7,
    power_mw=294_940,  # 294.94 W
    power_instant_mw=292_140,  # 292.14 W
    temperature_gpu=36,
    temperature_memory=39,
    clocks_event_reasons=pynvml.nvmlClocksEventReasonNone,  # Idle: Not Active
    processes=(
        ProcessProfile(12249, 2194 * MiB),  # /root/tools/memhog
        ProcessProfile(12250, 1170 * MiB),  # /root/tools/memhog
        ProcessProfile(12267, 13526 * MiB, sm_util_pct=97),  # ./gpu_burn
    ),
)


def _mig(
    n: int, profile: str, gi: int, ci: int, total: int, used: int, sms: int
) -> MigInstanceProfile:
    # The capture's masked MIG UUIDs: MIG-0000000N-0000-0000-0000-00000000000N.
    uuid = f"MIG-{n:08x}-0000-0000-0000-{n:012x}"
    slices = next(p.slices for p in H100_GI_PROFILES if p.name == profile)
    return MigInstanceProfile(profile, uuid, gi, ci, total * MiB, used * MiB, sms, slices)


H100_MIG = replace(
    H100_IDLE,
    key="h100_mig",
    source=f"{_EXPORTER} {_H100_MIG_FILE} @c58c3331e071, 'capabilities :: list (-L)' and "
    "'load :: query (-q)'",
    memory_used=11125 * MiB,
    utilization_gpu=None,  # "Utilization GPU: N/A" in MIG mode
    utilization_memory=None,
    power_mw=432_210,  # 432.21 W
    power_instant_mw=444_720,  # 444.72 W
    temperature_gpu=53,
    temperature_memory=58,
    clocks_event_reasons=pynvml.nvmlClocksEventReasonNone,
    remapped_rows=None,  # "Remapped Rows: N/A" in MIG mode
    mig_mode=(pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE),
    mig_instances=(  # "-L" order; (profile, GI, CI, FB total MiB, FB used MiB, SMs)
        _mig(0, "3g.40gb", 2, 0, 40448, 11091, 60),
        _mig(1, "2g.20gb", 3, 0, 20096, 17, 32),
        _mig(2, "1g.10gb", 9, 0, 9984, 9, 16),
        _mig(3, "1g.10gb", 10, 0, 9984, 9, 16),
    ),
    processes=(
        ProcessProfile(21180, 2296 * MiB, 2, 0),  # /root/tools/memhog
        ProcessProfile(21181, 1272 * MiB, 2, 0),  # /root/tools/memhog
        ProcessProfile(21198, 7484 * MiB, 2, 0),  # ./gpu_burn
    ),
    # Approximation: gpu_burn busy on GI 2 (60 of the H100's 132 SMs) -> ~45 % of the whole GPU.
    sm_activity_pct=45.0,
)

PROFILES: dict[str, DeviceProfile] = {
    p.key: p for p in (H100_IDLE, H100_LOADED, H200_IDLE, H200_LOADED, H100_MIG)
}
