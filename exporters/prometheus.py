"""Prometheus exposition of a :class:`~telemetry.state.Snapshot` (SPEC §6).

:class:`TallyCollector` is a custom prometheus-client collector: every scrape rebuilds all metric
families from the newest snapshot (no ``remove()`` bookkeeping, a vanished series simply is not
rendered), and ``describe()`` lists the families so registering it triggers no collection.
Families are built as columns (:mod:`exporters.exposition`): the text format is rendered from
them directly, OpenMetrics through prometheus-client. Sample timestamps are never exported;
label values are escaped, so no input can add a series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from exporters.exposition import (
    ColumnFamily,
    LabelColumn,
    PrefixCache,
    label_values,
    render_text,
    strings,
    to_client_metric,
)
from exporters.process import FAMILIES as PROCESS_FAMILIES
from exporters.process import ProcessFamilies
from telemetry import __version__
from telemetry.frame import Frame
from telemetry.merge import Table
from telemetry.state import Snapshot, TableSnapshot
from telemetry.tables import CPU_MODES

if TYPE_CHECKING:  # annotations only: a node daemon without an inventory never bills
    from prometheus_client.core import Metric

    from telemetry.billing.aggregate import AggregateSnapshot
    from telemetry.billing.engine import LiveTotals

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
    "tally_gpu_lost": (
        "gauge",
        "1 for a GPU NVML answers is lost (off the bus: XID 79, a reset needed); its other "
        "series are left out until it answers again.",
        ("node", "gpu", "uuid"),
    ),
    "tally_gpu_job_info": (
        "gauge",
        "Job holding a GPU (each job of a shared GPU); always 1. Join on it rather than "
        "labelling every GPU series.",
        ("node", "gpu", "uuid", "job"),
    ),
    "tally_gpu_job_utilization_ratio": (
        "gauge",
        "SM utilisation of the job's processes on a GPU it shares with other jobs, over the last "
        "sample period (0-1; NVML per-process samples).",
        ("node", "gpu", "uuid", "job"),
    ),
    "tally_gpu_job_share": (
        "gauge",
        "Fraction of a shared GPU allocated to the job (0-1; shards, replicas or MPS threads, "
        "else an equal split between the jobs holding it).",
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
        "Sample rows dropped: duplicate (same series and time), late (older than the series' "
        "newest) or out_of_range (a value outside its column's valid range).",
        ("table", "reason"),
    ),
    "tally_store_rows_written": ("counter", "Sample rows appended to the data directory.", ()),
    "tally_store_errors": (
        "counter",
        "Failed writes to the data directory (disk full, read-only, deleted, ...).",
        (),
    ),
    "tally_clock_steps": (
        "counter",
        "Wall-clock jumps the daemon saw; sample times kept the monotonic course.",
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
    "tally_tenant_busy_unit_seconds": (
        "counter",
        "Unit-seconds the tenant's jobs kept busy since start (GPU busy time; used CPU time).",
        ("pool", "kind", "tenant"),
    ),
    "tally_tenant_charge": (
        "counter",
        "What the tenant owes for allocated unit-time since start, in the currency.",
        ("pool", "kind", "tenant", "currency"),
    ),
    "tally_build_info": ("gauge", "tally build; always 1.", ("version",)),
    "tally_pool_allocation_ratio": (
        "gauge",
        "Allocated over capacity unit-time of the pool in the trailing window (aggregator, 0-1).",
        ("pool", "kind", "window"),
    ),
    "tally_pool_busy_ratio": (
        "gauge",
        "Busy over capacity unit-time of the pool in the trailing window (aggregator, 0-1).",
        ("pool", "kind", "window"),
    ),
    "tally_aggregate_rows_read": (
        "counter",
        "Sample rows the aggregator read from the dataset, by table.",
        ("table",),
    ),
    "tally_aggregate_rows_dropped": (
        "counter",
        "Rows the aggregator could not bill live: duplicate, late (older than their series) or "
        "out_of_range (a value outside its column's valid range).",
        ("reason",),
    ),
    "tally_aggregate_files_quarantined": (
        "counter",
        "Unreadable files the aggregator moved to quarantine/.",
        (),
    ),
    "tally_aggregate_newest_sample_age_seconds": (
        "gauge",
        "Seconds between now and the newest sample in the dataset (how far behind it is).",
        (),
    ),
    "tally_aggregate_poll_duration_seconds": (
        "gauge",
        "Seconds the last poll of the dataset took.",
        (),
    ),
}


def _family(name: str) -> ColumnFamily:
    kind, doc, labels = METRICS[name]
    return ColumnFamily(name, kind, doc, labels)


def _column(table: Table, column: str, default: str = "") -> LabelColumn:
    """A label column as strings (null → empty); ``default`` when the table lacks it. A Frame
    (the node daemon) gives Python strings, an Arrow table (replay) an Arrow string array."""
    if isinstance(table, Frame):
        return table.strings(column) if table.has(column) else default
    if column not in table.column_names:
        return default
    import pyarrow as pa
    import pyarrow.compute as pc

    values = table.column(column).combine_chunks()
    # An Arrow scalar, not "": a Python str argument makes pyarrow try to import dateutil.
    return pc.fill_null(pc.cast(values, pa.string()), pa.scalar("", pa.string()))


def _numbers(table: Table, column: str) -> np.ndarray:
    """A column as float64, null → NaN (not exported)."""
    if isinstance(table, Frame):
        return table.floats(column)
    from telemetry.rows import float_column

    return float_column(table, column)


def _valid(table: Table, column: str) -> np.ndarray:
    """Where ``column`` holds a value."""
    if isinstance(table, Frame):
        return table.is_valid(column)
    import pyarrow.compute as pc

    held: np.ndarray = pc.is_valid(table.column(column)).to_numpy(zero_copy_only=False)
    return held


def _order(table: Table, keys: list[str]) -> np.ndarray:
    """Row positions of ``table`` ordered by ``keys``."""
    if isinstance(table, Frame):
        return table.sort_indices(keys)
    import pyarrow.compute as pc

    order: np.ndarray = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys])
    return np.asarray(order)


def _take(table: Table, rows: np.ndarray) -> Table:
    if isinstance(table, Frame):
        return table.take(rows)
    import pyarrow as pa

    return table.take(pa.array(rows))


def _sorted(snapshot: TableSnapshot, keys: list[str]) -> TableSnapshot:
    """The same snapshot with rows ordered by ``keys`` so the exposition is deterministic."""
    latest = snapshot.latest
    if latest.num_rows < 2:
        return snapshot
    order = _order(latest, keys)
    return TableSnapshot(
        latest=_take(latest, order),
        totals={k: v[order] for k, v in snapshot.totals.items()},
        windows={k: v[order] for k, v in snapshot.windows.items()},
    )


def _one(name: str, columns: Sequence[LabelColumn], values: np.ndarray) -> ColumnFamily:
    family = _family(name)
    family.add(columns, values)
    return family


def cpu_families(snap: TableSnapshot) -> Iterator[ColumnFamily]:
    snap = _sorted(snap, ["node"])
    t = snap.latest
    nodes = [_column(t, "node")]
    seconds = _family("tally_cpu_seconds")
    for mode in CPU_MODES:
        seconds.add([*nodes, mode], _numbers(t, f"{mode}_seconds"))
    yield seconds
    yield _one("tally_cpus", nodes, _numbers(t, "cpus"))
    yield _one("tally_memory_total_bytes", nodes, _numbers(t, "memory_total_bytes"))
    yield _one("tally_memory_available_bytes", nodes, _numbers(t, "memory_available_bytes"))
    yield _one("tally_cpu_energy_joules", nodes, _numbers(t, "energy_joules"))
    util = _family("tally_cpu_utilization_ratio")
    for window, ratios in snap.windows.items():
        util.add([*nodes, window], ratios)
    yield util


def gpu_families(
    snap: TableSnapshot, shared: TableSnapshot | None = None
) -> Iterator[ColumnFamily]:
    """The GPU families; ``shared``: the gpu_job rows, whose jobs join tally_gpu_job_info."""
    snap = _sorted(snap, ["node", "gpu_index", "gpu_uuid"])
    t = snap.latest
    ids = [_column(t, "node"), _column(t, "gpu_index"), _column(t, "gpu_uuid")]
    ones = np.ones(t.num_rows)
    yield _one("tally_gpu_info", [*ids, _column(t, "gpu_model"), _column(t, "mig_profile")], ones)
    yield _one("tally_gpu_utilization_ratio", ids, _numbers(t, "utilization_ratio"))
    yield _one("tally_gpu_sm_active_ratio", ids, _numbers(t, "sm_active_ratio"))
    yield _one("tally_gpu_busy_seconds", ids, snap.totals["busy_us"] / 1e6)
    yield _one("tally_gpu_memory_used_bytes", ids, _numbers(t, "memory_used_bytes"))
    yield _one("tally_gpu_memory_total_bytes", ids, _numbers(t, "memory_total_bytes"))
    yield _one("tally_gpu_power_watts", ids, _numbers(t, "power_watts"))
    yield _one("tally_gpu_energy_joules", ids, snap.totals["energy_mj"] / 1e3)
    yield _one("tally_gpu_temperature_celsius", ids, _numbers(t, "temperature_celsius"))
    avg = _family("tally_gpu_utilization_avg_ratio")
    for window, ratios in snap.windows.items():
        avg.add([*ids, window], ratios)
    yield avg
    ecc = _family("tally_gpu_ecc_errors")
    for kind, column in (
        ("corrected", "ecc_corrected_errors"),
        ("uncorrected", "ecc_uncorrected_errors"),
    ):
        ecc.add([*ids, kind], _numbers(t, column))
    yield ecc
    yield _one("tally_gpu_remapped_rows_pending", ids, _numbers(t, "remapped_rows_pending"))
    yield _one("tally_gpu_clock_event_reasons", ids, _numbers(t, "clock_event_reasons"))
    yield _one("tally_gpu_xid_errors", ids, _numbers(t, "xid_errors"))
    yield _one("tally_gpu_last_xid", ids, _numbers(t, "xid_last"))
    held = _valid(t, "job_id")
    info = _one("tally_gpu_job_info", [*ids, _column(t, "job_id")], np.where(held, 1.0, np.nan))
    if shared is not None and shared.latest.num_rows:
        info.add(*_holders(t, shared.latest))
    yield info


def lost_gpu_family(lost: list[tuple[str, int, str | None]]) -> ColumnFamily:
    """tally_gpu_lost of each (node, index, UUID or None) lost GPU."""
    rows = sorted((node, index, uuid or "") for node, index, uuid in lost)
    columns = [strings([r[0] for r in rows]), strings([str(r[1]) for r in rows]),
               strings([r[2] for r in rows])]  # fmt: skip
    return _one("tally_gpu_lost", columns, np.ones(len(rows)))


def _times(table: Table) -> list[int]:
    """Sample times, int64 ns."""
    if isinstance(table, Frame):
        return [int(t) for t in table.times()]
    import pyarrow as pa

    return [int(t) for t in table.column("time").cast(pa.int64()).to_numpy()]


def _holders(gpus: Table, shared: Table) -> tuple[list[list[str]], np.ndarray]:
    """tally_gpu_job_info series of the jobs holding shared GPUs (SPEC §2 gpu_job) besides the
    job in the GPU's own row: one per (GPU, job) whose gpu_job row is of the GPU's newest row's
    time (SPEC §3 matches them by it: a job that let the GPU go is listed no more)."""
    nodes, uuids = _labels_of(_column(gpus, "node")), _labels_of(_column(gpus, "gpu_uuid"))
    keys = list(zip(nodes, uuids, strict=True))
    index = dict(zip(keys, _labels_of(_column(gpus, "gpu_index")), strict=True))
    newest = dict(zip(keys, _times(gpus), strict=True))
    jobs = _labels_of(_column(gpus, "job_id"))
    own = {
        key for key, valid in zip(zip(nodes, uuids, jobs, strict=True), _valid(gpus, "job_id"),
                                  strict=True) if valid
    }  # fmt: skip
    held = zip(_labels_of(_column(shared, "node")), _labels_of(_column(shared, "gpu_uuid")),
               _labels_of(_column(shared, "job_id")), _times(shared), strict=True)  # fmt: skip
    extra = sorted({
        (node, uuid, job) for node, uuid, job, time in held
        if (node, uuid, job) not in own and newest.get((node, uuid)) == time
    })  # fmt: skip
    columns = [[k[0] for k in extra], [index[k[:2]] for k in extra], [k[1] for k in extra],
               [k[2] for k in extra]]  # fmt: skip
    return columns, np.ones(len(extra))


def _labels_of(column: LabelColumn) -> list[str]:
    """A label column's values (never a constant here: these come from table columns)."""
    assert not isinstance(column, str)
    return label_values(column)


def gpu_job_families(snap: TableSnapshot, gpus: TableSnapshot | None) -> Iterator[ColumnFamily]:
    """Per-job series of shared GPUs; the ``gpu`` label (NVML index) comes from the GPU's own
    newest row (empty where the GPU has none)."""
    t = _take(snap.latest, _order(snap.latest, ["node", "gpu_uuid", "job_id"]))
    nodes, uuids = _column(t, "node"), _column(t, "gpu_uuid")
    assert not isinstance(nodes, str) and not isinstance(uuids, str)
    node_list, uuid_list = _labels_of(nodes), _labels_of(uuids)
    index: dict[tuple[str, str], str] = {}
    if gpus is not None and gpus.latest.num_rows:
        g = gpus.latest
        keys = zip(_labels_of(_column(g, "node")), _labels_of(_column(g, "gpu_uuid")), strict=True)
        index = dict(zip(keys, _labels_of(_column(g, "gpu_index")), strict=True))
    gpu = [index.get(key, "") for key in zip(node_list, uuid_list, strict=True)]
    ids = [nodes, gpu, uuids, _column(t, "job_id")]
    yield _one("tally_gpu_job_utilization_ratio", ids, _numbers(t, "sm_utilization_ratio"))
    yield _one("tally_gpu_job_share", ids, _numbers(t, "share"))


def job_families(snap: TableSnapshot) -> Iterator[ColumnFamily]:
    snap = _sorted(snap, ["node", "job_id"])
    t = snap.latest
    ids = [_column(t, "node"), _column(t, "job_id")]
    owner = [_column(t, "user"), _column(t, "account")]
    yield _one("tally_job_info", [*ids, *owner], np.ones(t.num_rows))
    yield _one("tally_job_cpu_seconds", ids, _numbers(t, "cpu_seconds"))
    yield _one("tally_job_cpus_allocated", ids, _numbers(t, "cpus_allocated"))
    yield _one("tally_job_gpus_allocated", ids, _numbers(t, "gpus_allocated"))
    yield _one("tally_job_memory_bytes", ids, _numbers(t, "memory_bytes"))


def pool_families(live: LiveTotals) -> Iterator[ColumnFamily]:
    """Pool and tenant counters from the live bill (all-time totals)."""
    pools = [strings([p[0] for p in live.pools]), strings([p[1] for p in live.pools])]
    for i, name in enumerate(("capacity", "allocated", "busy"), start=2):
        values = np.array([p[i] for p in live.pools], dtype=np.float64)
        yield _one(f"tally_pool_{name}_unit_seconds", pools, values)
    tenants = [strings([str(t[j]) for t in live.tenants]) for j in range(3)]
    seconds = np.array([t[3] for t in live.tenants], dtype=np.float64)
    busy = np.array([t[4] for t in live.tenants], dtype=np.float64)
    money = np.array([t[5] for t in live.tenants], dtype=np.float64)
    yield _one("tally_tenant_allocated_unit_seconds", tenants, seconds)
    yield _one("tally_tenant_busy_unit_seconds", tenants, busy)
    yield _one("tally_tenant_charge", [*tenants, live.currency], money)


def self_families(snapshot: Snapshot) -> Iterator[ColumnFamily]:
    names = sorted(snapshot.collectors)
    if names:
        status = [snapshot.collectors[name] for name in names]
        column = [strings(names)]
        yield _one("tally_collector_success",  column,
                   np.array([1.0 if s.success else 0.0 for s in status]))  # fmt: skip
        yield _one("tally_collector_duration_seconds", column,
                   np.array([s.duration_seconds for s in status], dtype=np.float64))  # fmt: skip
    tables = sorted(snapshot.ingest)
    stats = [snapshot.ingest[t] for t in tables]
    yield _one("tally_samples_ingested", [strings(tables)],
               np.array([s.rows for s in stats], dtype=np.float64))  # fmt: skip
    dropped = _family("tally_samples_dropped")
    for table, s in zip(tables, stats, strict=True):
        dropped.add([table, "duplicate"], np.array([s.duplicates], dtype=np.float64))
        dropped.add([table, "late"], np.array([s.late], dtype=np.float64))
        dropped.add([table, "out_of_range"], np.array([s.out_of_range], dtype=np.float64))
    yield dropped
    if snapshot.store:
        for key in ("rows_written", "errors"):
            yield _one(f"tally_store_{key}", [],
                       np.array([snapshot.store.get(key, 0)], dtype=np.float64))  # fmt: skip
        steps = np.array([snapshot.store.get("clock_steps", 0)], dtype=np.float64)
        yield _one("tally_clock_steps", [], steps)
    yield _one("tally_build_info", [__version__], np.ones(1))


_RENDERERS: dict[str, Callable[[TableSnapshot], Iterator[ColumnFamily]]] = {
    "cpu": cpu_families,
    "gpu": gpu_families,
    "job": job_families,
}


# dcgm-exporter's names, units, types and labels, so its dashboards work unchanged (opt-in; these
# are the only series in percent, MiB and mJ). Types as dcgm-exporter's default counter list
# gives them: energy is a counter exposed under its bare name, without _total (see ColumnFamily).
# GPU_TEMP is what its Grafana dashboard fills the instance and gpu variables from.
DCGM_METRICS: dict[str, tuple[str, str, str, float]] = {
    "DCGM_FI_DEV_GPU_TEMP": ("gauge", "GPU temperature (in C).", "temperature_celsius", 1.0),
    "DCGM_FI_DEV_GPU_UTIL": ("gauge", "GPU utilization (in %).", "utilization_ratio", 100.0),
    "DCGM_FI_DEV_FB_USED": (
        "gauge",
        "Framebuffer memory used (in MiB).",
        "memory_used_bytes",
        1 / 2**20,
    ),
    "DCGM_FI_DEV_POWER_USAGE": ("gauge", "Power draw (in W).", "power_watts", 1.0),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": (
        "counter",
        "Total energy consumption since the driver loaded (in mJ).",
        "energy_joules",
        1000.0,
    ),
    "DCGM_FI_PROF_SM_ACTIVE": (
        "gauge",
        "Ratio of cycles an SM has at least 1 warp assigned.",
        "sm_active_ratio",
        1.0,
    ),
}
# GPU_I_PROFILE and GPU_I_ID are set on MIG instances only; an empty label is no label to
# Prometheus, as dcgm-exporter leaves them out on whole GPUs.
DCGM_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname", "GPU_I_PROFILE", "GPU_I_ID"]


def _dcgm_family(name: str) -> ColumnFamily:
    kind, doc, _, _ = DCGM_METRICS[name]
    return ColumnFamily(name, kind, doc, tuple(DCGM_LABELS), total_suffix=False)


def dcgm_families(snap: TableSnapshot) -> Iterator[ColumnFamily]:
    snap = _sorted(snap, ["node", "gpu_index", "gpu_uuid"])
    t = snap.latest
    index = _column(t, "gpu_index")
    device = [f"nvidia{i}" for i in _labels_of(index)]
    labels = [index, _column(t, "gpu_uuid"), device, _column(t, "gpu_model"), _column(t, "node")]
    labels += [_column(t, "mig_profile"), _column(t, "gpu_instance_id")]
    for name, (_, _, column, scale) in DCGM_METRICS.items():
        family = _dcgm_family(name)
        family.add(labels, _numbers(t, column) * scale)
        yield family


class TallyCollector:
    """Renders whatever snapshot ``source`` returns at scrape time: straight to the text format
    and OpenMetrics (``render_text``, ``render_openmetrics``: the bytes prometheus-client
    writes, without one object per sample), and as a prometheus-client collector (``collect``,
    for the formats only the client writes).

    ``dcgm_compat`` adds dcgm-exporter's metric names for existing dashboards; ``process``
    gives the exporter's own ``process_*`` families, rendered last; ``arrow`` False keeps
    pyarrow out of the process however large a family grows (the node daemon).
    """

    def __init__(
        self,
        source: Callable[[], Snapshot],
        dcgm_compat: bool = False,
        process: ProcessFamilies | None = None,
        arrow: bool = True,
    ) -> None:
        self._source = source
        self._dcgm = dcgm_compat
        self._process = process
        self._arrow = arrow
        self._prefixes = PrefixCache()

    def describe(self) -> list[Metric]:
        families = [_family(name) for name in METRICS]
        if self._dcgm:
            families += [_dcgm_family(name) for name in DCGM_METRICS]
        if self._process is not None:
            families += [ColumnFamily(n, k, doc, ()) for n, (k, doc) in PROCESS_FAMILIES.items()]
        return [to_client_metric(f) for f in families]

    def families(self) -> Iterator[ColumnFamily]:
        """Every family of the newest snapshot, in exposition order."""
        snapshot = self._source()
        for table, render in _RENDERERS.items():
            snap = snapshot.tables.get(table)
            if snap is not None and snap.latest.num_rows:
                if table == "gpu":
                    yield from gpu_families(snap, snapshot.tables.get("gpu_job"))
                else:
                    yield from render(snap)
                if table == "gpu" and self._dcgm:
                    yield from dcgm_families(snap)
        if snapshot.lost_gpus:
            yield lost_gpu_family(snapshot.lost_gpus)
        shared = snapshot.tables.get("gpu_job")
        if shared is not None and shared.latest.num_rows:
            yield from gpu_job_families(shared, snapshot.tables.get("gpu"))
        if snapshot.pools is not None:
            yield from pool_families(snapshot.pools)
        yield from self_families(snapshot)
        if self._process is not None:
            yield from self._process()

    def collect(self) -> Iterator[Metric]:
        for family in self.families():
            yield to_client_metric(family)

    def render_text(self) -> bytes:
        """The text exposition of the newest snapshot (what ``generate_latest`` would write)."""
        return render_text(self.families(), self._prefixes, arrow=self._arrow)

    def render_openmetrics(self) -> bytes:
        """OpenMetrics 1.0.0 of the newest snapshot (what the client's OpenMetrics
        ``generate_latest`` would write)."""
        return render_text(self.families(), self._prefixes, openmetrics=True, arrow=self._arrow)


def aggregate_families(snapshot: AggregateSnapshot, now_ns: int) -> Iterator[ColumnFamily]:
    """The cluster aggregator's families: pool and tenant counters, trailing ratios, itself."""
    if snapshot.totals is not None:
        yield from pool_families(snapshot.totals)
    rows = snapshot.ratios.rows
    labels = [strings([str(r[j]) for r in rows]) for j in range(3)]
    allocation = np.array([np.nan if r[3] is None else r[3] for r in rows], dtype=np.float64)
    busy = np.array([np.nan if r[4] is None else r[4] for r in rows], dtype=np.float64)
    yield _one("tally_pool_allocation_ratio", labels, allocation)
    yield _one("tally_pool_busy_ratio", labels, busy)
    tables = sorted(snapshot.rows_read)
    read = np.array([snapshot.rows_read[t] for t in tables], dtype=np.float64)
    yield _one("tally_aggregate_rows_read", [strings(tables)], read)
    reasons = sorted(snapshot.rows_dropped)
    dropped = np.array([snapshot.rows_dropped[r] for r in reasons], dtype=np.float64)
    yield _one("tally_aggregate_rows_dropped", [strings(reasons)], dropped)
    yield _one("tally_aggregate_files_quarantined", [], np.array([snapshot.files_quarantined]))
    if snapshot.newest_ns is not None:
        age = max(0.0, (now_ns - snapshot.newest_ns) / 1e9)
        yield _one("tally_aggregate_newest_sample_age_seconds", [], np.array([age]))
    yield _one("tally_aggregate_poll_duration_seconds", [], np.array([snapshot.poll_seconds]))
    yield _one("tally_build_info", [__version__], np.ones(1))


class AggregateCollector:
    """The aggregator's exposition, like :class:`TallyCollector` (text from columns)."""

    NAMES = (
        "tally_pool_capacity_unit_seconds",
        "tally_pool_allocated_unit_seconds",
        "tally_pool_busy_unit_seconds",
        "tally_tenant_allocated_unit_seconds",
        "tally_tenant_busy_unit_seconds",
        "tally_tenant_charge",
        "tally_pool_allocation_ratio",
        "tally_pool_busy_ratio",
        "tally_aggregate_rows_read",
        "tally_aggregate_rows_dropped",
        "tally_aggregate_files_quarantined",
        "tally_aggregate_newest_sample_age_seconds",
        "tally_aggregate_poll_duration_seconds",
        "tally_build_info",
    )

    def __init__(self, source: Callable[[], AggregateSnapshot]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return [to_client_metric(_family(name)) for name in self.NAMES]

    def families(self) -> Iterator[ColumnFamily]:
        return aggregate_families(self._source(), time.time_ns())

    def collect(self) -> Iterator[Metric]:
        for family in self.families():
            yield to_client_metric(family)

    def render_text(self) -> bytes:
        return render_text(self.families())

    def render_openmetrics(self) -> bytes:
        return render_text(self.families(), openmetrics=True)
