"""The collector framework: a registry by name, a per-collector error boundary, row merging.

A collector reads one source (``/proc/stat``, RAPL zones, NVML, …) and returns partial rows for
one or more sample tables. The daemon runs every enabled collector each round, each inside its
own error boundary, and merges their rows by series key, so that e.g. the ``cpu`` and ``rapl``
collectors together fill one ``cpu`` table row. Nothing here hard-codes a filesystem root: the
roots come in a :class:`CollectorContext`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from telemetry.collectors.attribution import ATTRIBUTION_WRITES, attribute_gpus
from telemetry.collectors.files import KeptFiles
from telemetry.frame import Frame, RoundBatch, check_column, row_columns
from telemetry.logs import OnceLogger
from telemetry.tables import SERIES_KEYS, TABLES

Row = dict[str, Any]
Columns = dict[str, Sequence[Any]]  # a table's values by column, down its rows


@dataclass(frozen=True)
class CollectorContext:
    """What collectors may know of the host: injected filesystem roots, node name, USER_HZ."""

    procfs: Path
    sysfs: Path
    node: str
    user_hz: int = 100
    # A stand-in for the ``pynvml`` module (tests, --nvml.module); None means the real library.
    nvml_module: Any = None
    # The host's root (--path.rootfs: where /var/log/pods is, and etc/passwd names job owners'
    # uids), the kubelet's pod-resources socket (None:
    # <rootfs>/var/lib/kubelet/pod-resources/kubelet.sock) and --k8s.tenant-label.
    rootfs: Path = Path("/")
    podresources: Path | None = None
    k8s_tenant_label: str | None = None
    # Root-owned files a Slurm prolog writes, one per job (--slurm.job-info-dir).
    slurm_job_info_dir: Path = Path("/run/tally/jobs")
    # --gpu.energy: read the driver's total-energy counter (True), or leave GPU energy
    # null for SPEC §3's power x time (the counter read spins 3 ms of CPU on some drivers).
    gpu_energy_counter: bool = True


class Collector:
    """Base class: subclasses set ``name``/``help`` and implement :meth:`collect`.

    ``collect`` returns ``{table: [row, …]}`` with partial rows (``time`` and ``node`` are filled
    in by the caller) and raises any exception to fail this round; state that must survive
    between rounds (previous counter readings) lives on the instance.
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    default_enabled: ClassVar[bool] = True

    def __init__(self, ctx: CollectorContext) -> None:
        self.ctx = ctx

    def collect(self) -> dict[str, list[Row]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the collector holds (files, libraries); default: nothing."""


class CheckedRows(list[Row]):
    """A collector's rows of one table with their ``columns`` as :func:`row_columns` makes
    them, every value checked by the collector itself (:func:`check_rows`): what it gives
    round after round with only some numbers new, which it knows fit."""

    def __init__(self, rows: list[Row], columns: Columns) -> None:
        super().__init__(rows)
        self.columns = columns


REGISTRY: dict[str, type[Collector]] = {}


def register(cls: type[Collector]) -> type[Collector]:
    """Class decorator: make a collector available by its ``name``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"collector name {cls.name!r} is empty or registered twice")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class CollectorStatus:
    """Outcome of one collector in one round (feeds ``tally_collector_*``)."""

    success: bool
    duration_seconds: float
    error: str | None = None


@dataclass
class Round:
    """Everything one collection round produced: each sample table's rows (``batches``)."""

    time_ns: int
    batches: dict[str, RoundBatch]
    status: dict[str, CollectorStatus] = field(default_factory=dict)
    rows_dropped: int = 0
    # (index, UUID or None) of each GPU NVML answered "lost" for this round
    lost_gpus: list[tuple[int, str | None]] = field(default_factory=list)

    @property
    def tables(self) -> dict[str, Frame]:
        """Each table's rows as a :class:`Frame`."""
        return {table: batch.frame() for table, batch in self.batches.items()}


class Runner:
    """Runs enabled collectors with one error boundary each and assembles one batch a table."""

    def __init__(
        self,
        collectors: list[Collector],
        clock_ns: Callable[[], int] = time.time_ns,
        once: OnceLogger | None = None,
    ) -> None:
        self.collectors = collectors
        self.clock_ns = clock_ns
        self.once = once or OnceLogger()
        # the cgroup files of the processes NVML lists on GPUs, read every round
        self._pid_files = KeptFiles(limit=256)

    def run(self) -> Round:
        """Collect one round. Never raises for a collector's fault; it is reported in status."""
        now = self.clock_ns()
        partial: dict[str, list[Row]] = {}
        # each table's columns as checked, while one collector alone gave its rows (None: more)
        checked_columns: dict[str, Columns | None] = {}
        status: dict[str, CollectorStatus] = {}
        for collector in self.collectors:
            start = time.perf_counter()
            try:
                produced = collector.collect()
                columns = check_rows(produced)
            except Exception as exc:
                took = time.perf_counter() - start
                message = f"collector {collector.name} failed: {_one_line(exc)}"
                self.once.warning(f"collector:{collector.name}", message)
                status[collector.name] = CollectorStatus(False, took, _one_line(exc))
                continue
            status[collector.name] = CollectorStatus(True, time.perf_counter() - start)
            self.once.clear(f"collector:{collector.name}")
            for table, rows in produced.items():
                partial.setdefault(table, []).extend(rows)
                first = table not in checked_columns
                checked_columns[table] = columns.get(table) if first else None
        node = self.collectors[0].ctx.node if self.collectors else ""
        if self.collectors:
            attribute_gpus(partial, self.collectors[0].ctx.procfs, self._pid_files)
            for table, names in ATTRIBUTION_WRITES.items():  # what it changed in place
                kept = checked_columns.get(table)
                if kept is not None:
                    rows = partial[table]
                    for name in names:
                        kept[name] = [row.get(name) for row in rows]
            # the one table attribution makes rather than fills in from checked rows
            gpu_job = check_rows({"gpu_job": partial.get("gpu_job", [])})
            checked_columns["gpu_job"] = gpu_job.get("gpu_job")
        lost = [(int(r["gpu_index"]), r["gpu_uuid"]) for r in partial.get("_gpu_lost", [])]
        batches, dropped = assemble(partial, now, node, checked=True, columns=checked_columns)
        return Round(now, batches, status, dropped, lost)

    def close(self) -> None:
        for collector in self.collectors:
            collector.close()
        self._pid_files.close()


_KINDS = {table: {c.name: c.kind for c in columns} for table, columns in TABLES.items()}


def check_rows(produced: dict[str, list[Row]]) -> dict[str, Columns]:
    """Raise ``ValueError`` unless every value fits its table's column type; the columns of
    each sample table's rows (:func:`row_columns`), checked.

    Run inside a collector's error boundary, so a value that would not convert (an int64
    overflow, a string for a number) fails that collector alone, not the round's assembly.
    """
    checked: dict[str, Columns] = {}
    for table, rows in produced.items():
        if table.startswith("_"):
            continue  # side outputs for attribution, not sample tables
        kinds = _KINDS.get(table)
        if kinds is None:
            raise ValueError(f"rows for unknown table {table!r}")
        if type(rows) is CheckedRows and rows.columns.keys() <= kinds.keys():
            checked[table] = rows.columns
            continue
        columns = row_columns(rows)
        for name in sorted(columns):
            if name not in kinds:
                raise ValueError(f"{table}: unknown column {name!r}")
            try:
                check_column(kinds[name], columns[name])
            except (ValueError, OverflowError, TypeError) as exc:
                raise ValueError(f"{table}.{name}: {exc}") from None
        checked[table] = columns
    return checked


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def assemble(
    partial: dict[str, list[Row]],
    time_ns: int,
    node: str,
    checked: bool = False,
    columns: dict[str, Columns | None] | None = None,
) -> tuple[dict[str, RoundBatch], int]:
    """Merge partial rows of one round by series key into one batch per sample table.

    Rows lacking a non-nullable column after merging (e.g. only RAPL energy because the ``cpu``
    collector failed) are dropped; their count is returned. ``checked``: every value passed
    :func:`check_rows` already (else they are checked here: ``ValueError``). ``columns``: what
    :func:`row_columns` made of a table's rows already, where it is known.
    """
    if not checked:
        check_rows(partial)
    batches: dict[str, RoundBatch] = {}
    dropped = 0
    constants = {"time": time_ns, "node": node}
    for table, rows in partial.items():
        if table.startswith("_"):
            continue
        # Time and node are the round's: the rest of a series key tells its rows apart.
        keys = [k for k in SERIES_KEYS[table] if k not in constants]
        given = columns.get(table) if columns is not None else None
        table_columns = row_columns(rows) if given is None else given
        absent = [None] * len(rows)
        if keys:
            series = list(zip(*[table_columns.get(k, absent) for k in keys], strict=True))
        else:
            series = [()] * len(rows)
        count = len(rows)
        if len(set(series)) != count:  # rows of one series from two collectors: merged
            merged: dict[tuple[Any, ...], Row] = {}
            for key, row in zip(series, rows, strict=True):
                earlier = merged.get(key)
                merged[key] = row if earlier is None else {**earlier, **row}
            table_columns = row_columns(list(merged.values()))
            count = len(merged)
        batch = RoundBatch.from_columns(table, table_columns, count, constants)
        dropped += count - batch.num_rows
        if batch.num_rows:
            batches[table] = batch
    return batches, dropped
