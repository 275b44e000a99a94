"""Prometheus exposition of a :class:`~telemetry.state.Snapshot` (SPEC §6).

:class:`TallyCollector` is a custom prometheus-client collector: every scrape rebuilds all metric
families from the newest snapshot (no ``remove()`` bookkeeping, a vanished series simply is not
rendered), and ``describe()`` lists the families so registering it triggers no collection.
Sample timestamps are never exported; label values are escaped by the client's text encoder, so
no input can add a series.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from telemetry import __version__
from telemetry.billing import LiveTotals
from telemetry.schema import CPU_MODES
from telemetry.state import Snapshot, TableSnapshot

Family = GaugeMetricFamily | CounterMetricFamily

# name → (type, help, label names); the single source for describe() and collect().
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tally_cpu_seconds": (
        "counter",
        "CPU time summed over CPUs, by mode, in seconds (/proc/stat).",
        ("node", "mode"),
    ),
    "tally_cpus": ("gauge", "Logical CPUs online.", ("node",)),
    "tally_memory_total_bytes": (
        "gauge",
        "Total memory in bytes (/proc/meminfo MemTotal).",
        ("node",),
    ),
    "tally_memory_available_bytes": (
        "gauge",
        "Available memory in bytes (/proc/meminfo MemAvailable).",
        ("node",),
    ),
    "tally_cpu_energy_joules": (
        "counter",
        "CPU package energy in joules since the collector started (RAPL, wrap-corrected).",
        ("node",),
    ),
    "tally_cpu_utilization_ratio": (
        "gauge",
        "Busy core-seconds over capacity core-seconds in the trailing window (0-1).",
        ("node", "window"),
    ),
    "tally_gpu_info": (
        "gauge",
        "GPU identity; always 1.",
        ("node", "gpu", "uuid", "model", "mig_profile"),
    ),
    "tally_gpu_utilization_ratio": (
        "gauge",
        "GPU utilisation over the last sample period (0-1).",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_sm_active_ratio": (
        "gauge",
        "GPM SM activity over the last sample period (0-1).",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_busy_seconds": (
        "counter",
        "Utilisation-weighted GPU seconds since tally started.",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_memory_used_bytes": (
        "gauge",
        "Framebuffer memory used in bytes.",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_memory_total_bytes": (
        "gauge",
        "Framebuffer memory in bytes.",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_power_watts": ("gauge", "Board power draw in watts.", ("node", "gpu", "uuid")),
    "tally_gpu_energy_joules": (
        "counter",
        "GPU energy in joules since tally started (counter deltas, else power x time).",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_temperature_celsius": (
        "gauge",
        "GPU temperature in degrees Celsius.",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_utilization_avg_ratio": (
        "gauge",
        "Time-weighted GPU utilisation over the trailing window (0-1).",
        ("node", "gpu", "uuid", "window"),
    ),
    "tally_gpu_ecc_errors": (
        "counter",
        "ECC errors since the driver loaded (volatile), by type corrected or uncorrected.",
        ("node", "gpu", "uuid", "type"),
    ),
    "tally_gpu_remapped_rows_pending": (
        "gauge",
        "1 if a row remapping is pending (the GPU needs a reset), else 0.",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_clock_event_reasons": (
        "gauge",
        "Bitmask of NVML clock event (throttle) reasons; 0 means clocks are not held back.",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_xid_errors": (
        "counter",
        "XID critical error events seen since tally started.",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_last_xid": (
        "gauge",
        "Number of the last XID critical error.",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_job_info": (
        "gauge",
        "Job holding a GPU; always 1. Join on it rather than labelling every GPU series.",
        ("node", "gpu", "uuid", "job"),
    ),
    "tally_job_info": ("gauge", "Job identity; always 1.", ("node", "job", "user", "account")),
    "tally_job_cpu_seconds": (
        "counter",
        "CPU seconds used by the job's cgroup on this node.",
        ("node", "job"),
    ),
    "tally_job_cpus_allocated": (
        "gauge",
        "Cores allocated to the job on this node.",
        ("node", "job"),
    ),
    "tally_job_gpus_allocated": (
        "gauge",
        "GPUs allocated to the job on this node (fractional when shared).",
        ("node", "job"),
    ),
    "tally_job_memory_bytes": (
        "gauge",
        "Current memory of the job's cgroup in bytes.",
        ("node", "job"),
    ),
    "tally_collector_success": (
        "gauge",
        "1 if the collector's last round succeeded, else 0.",
        ("collector",),
    ),
    "tally_collector_duration_seconds": (
        "gauge",
        "Duration of the collector's last round in seconds.",
        ("collector",),
    ),
    "tally_samples_ingested": (
        "counter",
        "Sample rows offered to the aggregation state.",
        ("table",),
    ),
    "tally_samples_dropped": (
        "counter",
        "Sample rows dropped: duplicate (same series and time) or late "
        "(older than the series' newest).",
        ("table", "reason"),
    ),
    "tally_store_rows_written": ("counter", "Sample rows appended to the data directory.", ()),
    "tally_store_errors": (
        "counter",
        "Failed writes to the data directory (disk full, read-only, ...).",
        (),
    ),
    "tally_pool_capacity_unit_seconds": (
        "counter",
        "Unit-seconds of capacity (GPU-seconds or core-seconds) since start.",
        ("pool", "kind"),
    ),
    "tally_pool_allocated_unit_seconds": (
        "counter",
        "Unit-seconds allocated to jobs since start.",
        ("pool", "kind"),
    ),
    "tally_pool_busy_unit_seconds": (
        "counter",
        "Utilisation-weighted unit-seconds since start.",
        ("pool", "kind"),
    ),
    "tally_tenant_allocated_unit_seconds": (
        "counter",
        "Unit-seconds allocated to the tenant's jobs since start.",
        ("pool", "kind", "tenant"),
    ),
    "tally_tenant_charge": (
        "counter",
        "What the tenant owes for allocated unit-time since start, in the currency.",
        ("pool", "kind", "tenant", "currency"),
    ),
    "tally_build_info": ("gauge", "tally build; always 1.", ("version",)),
}


def _family(name: str) -> Family:
    kind, doc, labels = METRICS[name]
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(name, doc, labels=list(labels))


def _strings(table: pa.Table, column: str, default: str = "") -> list[str]:
    if column not in table.column_names:
        return [default] * table.num_rows
    return ["" if v is None else str(v) for v in table.column(column).to_pylist()]


def _numbers(table: pa.Table, column: str) -> list[float | None]:
    values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    return [None if math.isnan(v) else v for v in values.tolist()]


def _add_values(family: Family, labels: list[list[str]], values: Any) -> Family:
    for label_values, value in zip(labels, values, strict=True):
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            family.add_metric(label_values, float(value))
    return family


def _sorted(snapshot: TableSnapshot, keys: list[str]) -> TableSnapshot:
    """The same snapshot with rows ordered by ``keys`` so the exposition is deterministic."""
    latest = snapshot.latest
    if latest.num_rows < 2:
        return snapshot
    order = pc.sort_indices(latest, sort_keys=[(k, "ascending") for k in keys]).to_numpy()
    return TableSnapshot(
        latest=latest.take(pa.array(order)),
        totals={k: v[order] for k, v in snapshot.totals.items()},
        windows={k: v[order] for k, v in snapshot.windows.items()},
    )


def cpu_families(snap: TableSnapshot) -> Iterator[Family]:
    snap = _sorted(snap, ["node"])
    t = snap.latest
    nodes = [[n] for n in _strings(t, "node")]
    seconds = _family("tally_cpu_seconds")
    for mode in CPU_MODES:
        for node, value in zip(nodes, _numbers(t, f"{mode}_seconds"), strict=True):
            if value is not None:
                seconds.add_metric([node[0], mode], value)
    yield seconds
    yield _add_values(_family("tally_cpus"), nodes, _numbers(t, "cpus"))
    yield _add_values(_family("tally_memory_total_bytes"), nodes, _numbers(t, "memory_total_bytes"))
    yield _add_values(
        _family("tally_memory_available_bytes"), nodes, _numbers(t, "memory_available_bytes")
    )
    yield _add_values(_family("tally_cpu_energy_joules"), nodes, _numbers(t, "energy_joules"))
    util = _family("tally_cpu_utilization_ratio")
    for window, ratios in snap.windows.items():
        _add_values(util, [[n[0], window] for n in nodes], ratios.tolist())
    yield util


def gpu_families(snap: TableSnapshot) -> Iterator[Family]:
    snap = _sorted(snap, ["node", "gpu_index", "gpu_uuid"])
    t = snap.latest
    node, index, uuid = _strings(t, "node"), _strings(t, "gpu_index"), _strings(t, "gpu_uuid")
    ids = [list(x) for x in zip(node, index, uuid, strict=True)]
    info = _family("tally_gpu_info")
    for i, model, mig in zip(
        ids, _strings(t, "gpu_model"), _strings(t, "mig_profile"), strict=True
    ):
        info.add_metric([*i, model, mig], 1.0)
    yield info
    yield _add_values(_family("tally_gpu_utilization_ratio"), ids, _numbers(t, "utilization_ratio"))
    yield _add_values(_family("tally_gpu_sm_active_ratio"), ids, _numbers(t, "sm_active_ratio"))
    yield _add_values(
        _family("tally_gpu_busy_seconds"), ids, (snap.totals["busy_us"] / 1e6).tolist()
    )
    yield _add_values(_family("tally_gpu_memory_used_bytes"), ids, _numbers(t, "memory_used_bytes"))
    yield _add_values(
        _family("tally_gpu_memory_total_bytes"), ids, _numbers(t, "memory_total_bytes")
    )
    yield _add_values(_family("tally_gpu_power_watts"), ids, _numbers(t, "power_watts"))
    yield _add_values(
        _family("tally_gpu_energy_joules"), ids, (snap.totals["energy_mj"] / 1e3).tolist()
    )
    yield _add_values(
        _family("tally_gpu_temperature_celsius"), ids, _numbers(t, "temperature_celsius")
    )
    avg = _family("tally_gpu_utilization_avg_ratio")
    for window, ratios in snap.windows.items():
        _add_values(avg, [[*i, window] for i in ids], ratios.tolist())
    yield avg
    ecc = _family("tally_gpu_ecc_errors")
    for kind, column in (
        ("corrected", "ecc_corrected_errors"),
        ("uncorrected", "ecc_uncorrected_errors"),
    ):
        _add_values(ecc, [[*i, kind] for i in ids], _numbers(t, column))
    yield ecc
    yield _add_values(
        _family("tally_gpu_remapped_rows_pending"), ids, _numbers(t, "remapped_rows_pending")
    )
    yield _add_values(
        _family("tally_gpu_clock_event_reasons"), ids, _numbers(t, "clock_event_reasons")
    )
    yield _add_values(_family("tally_gpu_xid_errors"), ids, _numbers(t, "xid_errors"))
    yield _add_values(_family("tally_gpu_last_xid"), ids, _numbers(t, "xid_last"))
    holder = _family("tally_gpu_job_info")
    for i, job in zip(ids, t.column("job_id").to_pylist(), strict=True):
        if job is not None:
            holder.add_metric([*i, job], 1.0)
    yield holder


def job_families(snap: TableSnapshot) -> Iterator[Family]:
    snap = _sorted(snap, ["node", "job_id"])
    t = snap.latest
    ids = [list(x) for x in zip(_strings(t, "node"), _strings(t, "job_id"), strict=True)]
    info = _family("tally_job_info")
    for i, user, account in zip(ids, _strings(t, "user"), _strings(t, "account"), strict=True):
        info.add_metric([*i, user, account], 1.0)
    yield info
    yield _add_values(_family("tally_job_cpu_seconds"), ids, _numbers(t, "cpu_seconds"))
    yield _add_values(_family("tally_job_cpus_allocated"), ids, _numbers(t, "cpus_allocated"))
    yield _add_values(_family("tally_job_gpus_allocated"), ids, _numbers(t, "gpus_allocated"))
    yield _add_values(_family("tally_job_memory_bytes"), ids, _numbers(t, "memory_bytes"))


def pool_families(live: LiveTotals) -> Iterator[Family]:
    """Pool and tenant counters from the live bill (all-time totals)."""
    names = ("capacity", "allocated", "busy")
    families = [_family(f"tally_pool_{n}_unit_seconds") for n in names]
    for pool, kind, *values in live.pools:
        for family, value in zip(families, values, strict=True):
            family.add_metric([pool, kind], value)
    yield from families
    allocated = _family("tally_tenant_allocated_unit_seconds")
    charge = _family("tally_tenant_charge")
    for pool, kind, tenant, seconds, money in live.tenants:
        allocated.add_metric([pool, kind, tenant], seconds)
        charge.add_metric([pool, kind, tenant, live.currency], money)
    yield allocated
    yield charge


def self_families(snapshot: Snapshot) -> Iterator[Family]:
    names = sorted(snapshot.collectors)
    if names:
        success = _family("tally_collector_success")
        duration = _family("tally_collector_duration_seconds")
        for name in names:
            status = snapshot.collectors[name]
            success.add_metric([name], 1.0 if status.success else 0.0)
            duration.add_metric([name], status.duration_seconds)
        yield success
        yield duration
    ingested = _family("tally_samples_ingested")
    dropped = _family("tally_samples_dropped")
    for table in sorted(snapshot.ingest):
        stats = snapshot.ingest[table]
        ingested.add_metric([table], float(stats.rows))
        dropped.add_metric([table, "duplicate"], float(stats.duplicates))
        dropped.add_metric([table, "late"], float(stats.late))
    yield ingested
    yield dropped
    if snapshot.store:
        for key in ("rows_written", "errors"):
            family = _family(f"tally_store_{key}")
            family.add_metric([], float(snapshot.store.get(key, 0)))
            yield family
    info = _family("tally_build_info")
    info.add_metric([__version__], 1.0)
    yield info


_RENDERERS: dict[str, Callable[[TableSnapshot], Iterator[Family]]] = {
    "cpu": cpu_families,
    "gpu": gpu_families,
    "job": job_families,
}


# dcgm-exporter's names, units and labels, so its dashboards work unchanged (opt-in; these are
# the only series in percent, MiB and mJ). Gauges: dcgm-exporter's energy counter has no _total.
DCGM_METRICS: dict[str, tuple[str, str, float]] = {
    "DCGM_FI_DEV_GPU_UTIL": ("GPU utilization (in %).", "utilization_ratio", 100.0),
    "DCGM_FI_DEV_FB_USED": ("Framebuffer memory used (in MiB).", "memory_used_bytes", 1 / 2**20),
    "DCGM_FI_DEV_POWER_USAGE": ("Power draw (in W).", "power_watts", 1.0),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": (
        "Total energy consumption since boot (in mJ).",
        "energy_joules",
        1000.0,
    ),
    "DCGM_FI_PROF_SM_ACTIVE": (
        "Ratio of cycles an SM has at least 1 warp assigned.",
        "sm_active_ratio",
        1.0,
    ),
}
DCGM_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]


def dcgm_families(snap: TableSnapshot) -> Iterator[Family]:
    snap = _sorted(snap, ["node", "gpu_index", "gpu_uuid"])
    t = snap.latest
    indexes = _strings(t, "gpu_index")
    labels = [
        [index, uuid, f"nvidia{index}", model, node]
        for index, uuid, model, node in zip(
            indexes,
            _strings(t, "gpu_uuid"),
            _strings(t, "gpu_model"),
            _strings(t, "node"),
            strict=True,
        )
    ]
    for name, (doc, column, scale) in DCGM_METRICS.items():
        family = GaugeMetricFamily(name, doc, labels=DCGM_LABELS)
        values = [None if v is None else v * scale for v in _numbers(t, column)]
        yield _add_values(family, labels, values)


class TallyCollector:
    """prometheus-client collector rendering whatever snapshot ``source`` returns at scrape time.

    ``dcgm_compat`` adds dcgm-exporter's metric names for existing dashboards.
    """

    def __init__(self, source: Callable[[], Snapshot], dcgm_compat: bool = False) -> None:
        self._source = source
        self._dcgm = dcgm_compat

    def describe(self) -> list[Metric]:
        families: list[Metric] = [_family(name) for name in METRICS]
        if self._dcgm:
            families += [
                GaugeMetricFamily(n, d, labels=DCGM_LABELS) for n, (d, _, _) in DCGM_METRICS.items()
            ]
        return families

    def collect(self) -> Iterator[Metric]:
        snapshot = self._source()
        for table, render in _RENDERERS.items():
            snap = snapshot.tables.get(table)
            if snap is not None and snap.latest.num_rows:
                yield from render(snap)
                if table == "gpu" and self._dcgm:
                    yield from dcgm_families(snap)
        if snapshot.pools is not None:
            yield from pool_families(snapshot.pools)
        yield from self_families(snapshot)
