"""The bill engine (SPEC §3–4): capacity, allocation, busy time, energy and money per window,
pool, tenant and job, exactly and reproducibly.

Input arrives in time-ordered chunks (any number, any split of the rows); each table keeps the
last sample of every series across chunk boundaries, so intervals that straddle a boundary count
exactly once. Every sum is an int64 of unit-microseconds or millijoules, each interval rounded on
its own, so the totals — and therefore the bill's bytes — do not depend on how the rows were
split into files, row groups or chunks. Money and hours are derived from the integers only at
output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import kernels
from kernels.backend import array_namespace, to_backend, to_host
from kernels.grouped_sums import group_sums, window_index
from telemetry.billing.inventory import Inventory, Pool
from telemetry.billing.windows import Windows
from telemetry.merge import SortedRows, last_of_series, merge_rows
from telemetry.rows import dictionary_codes
from telemetry.schema import CPU_BUSY_MODES, SCHEMAS, validate
from telemetry.store.dataset import ValidatedChunk

NS = 1_000_000_000
# The live bill's single window (daemon, replay, aggregate): longer than any process lives, so
# its totals are all-time.
LIVE_WINDOW_SECONDS = 10**9
# A live bill retires a job silent this long (at least max_gap + 1 h): past the longest trailing
# window and any gap.
RETIRE_AFTER_NS = 3 * 3600 * NS
US_PER_HOUR = 3_600_000_000
MJ_PER_KWH = 3_600_000_000
UNKNOWN_TENANT = "unknown"

# The columns the bill reads of each table (SPEC §3): the rest is never decoded or moved.
BILL_COLUMNS: dict[str, tuple[str, ...]] = {
    "gpu": ("time", "node", "gpu_uuid", "utilization_ratio", "power_watts", "energy_joules",
            "job_id", "capacity_units"),
    "cpu": ("time", "node", "cpus", *(f"{m}_seconds" for m in CPU_BUSY_MODES), "energy_joules"),
    "job": ("time", "node", "job_id", "user", "account", "cpus_allocated", "gpus_allocated",
            "cpu_seconds"),
    "gpu_job": ("time", "node", "gpu_uuid", "job_id", "share", "sm_utilization_ratio"),
}  # fmt: skip

# energy_readings counts capacity rows with an energy reading (a counter, or a GPU's power): a
# pool-window without any has no measured energy, null in the bill rather than 0.
POOL_FIELDS = ("capacity_us", "allocated_us", "busy_us", "energy_mj", "gap_us", "energy_readings")
JOB_FIELDS = ("allocated_us", "busy_us", "energy_mj", "used_us")
_COMPACT_AT = 1 << 20


class Registry:
    """Stable integer ids for strings seen across chunks (id order = first seen)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.values: list[str] = []

    def id(self, value: str) -> int:
        found = self.ids.get(value)
        if found is None:
            found = self.ids[value] = len(self.values)
            self.values.append(value)
        return found

    def encode(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Id per row; null → -1."""
        codes, dictionary = dictionary_codes(column)
        mapping = np.array([self.id(v) for v in dictionary] + [-1], dtype=np.int64)
        ids: np.ndarray = mapping[codes]  # a null's code -1 picks the trailing -1
        return ids


@dataclass
class PartialSums:
    """Grouped int64 partial sums, compacted now and then by re-grouping."""

    width: int
    xp: Any = np  # NumPy, or CuPy: the partial sums then live on the GPU until output
    keys: list[list[np.ndarray]] = field(default_factory=list)
    sums: list[list[np.ndarray]] = field(default_factory=list)
    rows: int = 0

    def __getstate__(self) -> dict[str, Any]:
        # the backend travels by name (a module cannot be pickled): partial sums sent from a
        # worker process (SPEC §9)
        return {**self.__dict__, "xp": self.xp.__name__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from kernels import get_namespace

        self.__dict__.update(state, xp=get_namespace(state["xp"]))

    def add(self, keys: list[np.ndarray], sums: list[np.ndarray], where: np.ndarray) -> None:
        """Group and keep the rows where ``where`` is True."""
        if keys[0].size == 0:
            return
        if self.xp is not array_namespace(*keys, *sums, where):
            raise TypeError("PartialSums: inputs must already live on its backend")
        k, s = group_sums(keys, sums, where)
        if k[0].size == 0:
            return
        self.keys.append(k)
        self.sums.append(s)
        self.rows += k[0].size
        if self.rows > _COMPACT_AT and len(self.keys) > 1:
            self.compact()

    def compact(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The sums as one grouped part (keys sorted and unique)."""
        if not self.keys:
            return [np.zeros(0, np.int64)] * self.width, []
        if len(self.keys) == 1:  # group_sums' output: already grouped
            return self.keys[0], self.sums[0]
        xp = self.xp
        keys = [xp.concatenate([k[i] for k in self.keys]) for i in range(self.width)]
        sums = [xp.concatenate([s[i] for s in self.sums]) for i in range(len(self.sums[0]))]
        keys, sums = group_sums(keys, sums)
        self.keys, self.sums, self.rows = [keys], [sums], keys[0].size
        return keys, sums

    def keep_only(self, keep: Any) -> None:
        """Drop the groups of the compacted sums where ``keep`` (bool, on the backend) is
        False."""
        keys, sums = self.compact()
        self.keys, self.sums = [[k[keep] for k in keys]], [[v[keep] for v in sums]]
        self.rows = int(keep.sum())


@dataclass
class Bill:
    """A finished bill: the three row kinds of SPEC §4 and the ``input`` summary."""

    pools: list[dict[str, Any]]
    tenants: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    input: dict[str, Any]
    currency: str = ""
    timezone: str = "UTC"
    notes: list[str] = field(default_factory=list)  # warnings for the person reading it


@dataclass
class LiveTotals:
    """All-time totals per pool and per (pool, tenant), for counters (SPEC §6, pools).

    ``pools`` rows are (pool, kind, capacity_s, allocated_s, busy_s); ``tenants`` rows are
    (pool, kind, tenant, allocated_s, busy_s, charge), in unit-seconds and the inventory's
    currency; a tenant's busy time is its GPUs' busy time in gpu pools and its jobs' used CPU
    time in cpu pools (as in the bill).
    """

    currency: str
    pools: list[tuple[str, str, float, float, float]]
    tenants: list[tuple[str, str, str, float, float, float]]


class Biller:
    """Accumulates a bill from time-ordered chunks of sample tables.

    ``start_ns``/``end_ns`` (window-aligned) select the windows that count; rows before the start
    still open the intervals that end inside it. With ``drop_late`` a row older than its series'
    newest row already added is dropped and counted in ``late`` (a follower that cannot go back
    in time). With ``fine_window_seconds`` the pool sums are also kept per finer window in
    ``fine_pool_parts`` (from the same merge: one pass gives a follower its all-time totals and
    its recent minutes). ``xp`` (NumPy or CuPy) is where the grouped integer sums are formed and
    kept; every backend gives the same integers.
    """

    def __init__(
        self,
        inventory: Inventory,
        window: int | Windows,
        start_ns: int | None = None,
        end_ns: int | None = None,
        *,
        drop_late: bool = False,
        fine_window_seconds: int | None = None,
        xp: Any = np,
    ) -> None:
        self.inventory = inventory
        self.drop_late = drop_late
        self.late = 0
        self.windows = window if isinstance(window, Windows) else Windows(int(window))
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.max_gap_ns = int(inventory.max_gap_seconds * NS)
        self.pools: list[Pool] = inventory.pools_of("gpu") + inventory.pools_of("cpu")
        self._first = {"gpu": 0, "cpu": len(inventory.pools_of("gpu"))}
        self.nodes = Registry()
        self.jobs = Registry()
        self.names = Registry()  # users and tenants
        self._node_pool = {"gpu": np.zeros(0, np.int64), "cpu": np.zeros(0, np.int64)}
        self.carry = {
            name: SCHEMAS[name].empty_table().select(list(BILL_COLUMNS[name])) for name in SCHEMAS
        }
        self.xp = xp
        self.pool_parts = PartialSums(width=2, xp=xp)  # (window, pool)
        self.fine_window_ns = None if fine_window_seconds is None else fine_window_seconds * NS
        self.fine_pool_parts = PartialSums(width=2, xp=xp)  # (fine window, pool)
        self.job_parts = PartialSums(width=4, xp=xp)  # (window, pool, node, job)
        self.owner: dict[tuple[int, int], tuple[int, int, int]] = {}  # → (time, user, tenant)
        # (node, job) of counted gpu rows of less than one GPU of capacity naming the job: MIG
        # instances it held, which an accounting record counts as whole GPUs
        self.mig_held: set[tuple[str, str]] = set()
        # sums of jobs retired from a live bill, per (window, pool, tenant): JOB_FIELDS
        self.retired: dict[tuple[int, int, int], list[int]] = {}
        self.retire_after_ns = max(RETIRE_AFTER_NS, self.max_gap_ns + 3600 * NS)
        self.rows = 0
        self.duplicates = 0
        self.uuids = Registry()
        # first and newest time of a counted row (ns): the bill's range where --from/--to is open
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.shared_intervals = 0  # gpu intervals split over a shared GPU's jobs (SPEC §3)

    # ---------------------------------------------------------------- ingestion
    def add(self, chunk: dict[str, pa.Table]) -> None:
        """Add one chunk; every row must be later than the rows of earlier chunks' series."""
        checked = isinstance(chunk, ValidatedChunk)
        tables = {}
        for name in ("gpu_job", "gpu", "cpu", "job"):
            table = chunk.get(name)
            if table is not None and table.num_rows:
                wanted = BILL_COLUMNS[name]
                tables[name] = (
                    table.select(list(wanted)) if checked else validate(table, name, wanted)
                )
        holders = tables.pop("gpu_job", None)
        for name, table in tables.items():
            self._add_table(name, table, holders if name == "gpu" else None)

    def prime(self, chunk: dict[str, pa.Table]) -> None:
        """Take each series' last row from rows that only open the intervals of later ones (a
        time slice's lookback, SPEC §9): nothing counts, no name is registered."""
        checked = isinstance(chunk, ValidatedChunk)
        for name in ("gpu", "cpu", "job"):
            table = chunk.get(name)
            if table is not None and table.num_rows:
                wanted = BILL_COLUMNS[name]
                table = table.select(list(wanted)) if checked else validate(table, name, wanted)
                self.carry[name] = last_of_series(self.carry[name], table, name)

    def _note_mig_held(self, rows: SortedRows, counted: Any, nodes: Any, jobs: Any) -> None:
        """Add (node, job) of counted gpu rows of less than one GPU (``capacity_units``) that
        name a job; ``counted``, ``nodes`` and ``jobs`` (ids) are in the rows' sorted order."""
        split = pc.fill_null(pc.less(rows.arrow.column("capacity_units"), 1.0), False)
        if not pc.any(split).as_py():
            return
        ordered = rows.gather(split.to_numpy(zero_copy_only=False).astype(np.int64))
        held = (ordered > 0) & counted & (jobs >= 0)
        pairs = np.unique(np.stack([to_host(nodes[held]), to_host(jobs[held])]), axis=1)
        self.mig_held.update(
            (self.nodes.values[n], self.jobs.values[j]) for n, j in pairs.T.tolist()
        )

    def pool_ids(self, nodes: list[str], kind: str) -> np.ndarray:
        """The pool (index into ``pools``) of each named node for ``kind`` (gpu, cpu)."""
        ids = np.array([self.nodes.id(node) for node in nodes], dtype=np.int64)
        return np.asarray(to_host(self._pool_of(to_backend(self.xp, ids), kind)), np.int64)

    def _pool_of(self, node_ids: Any, kind: str) -> Any:
        known = self._node_pool[kind]
        if len(self.nodes.values) > known.size:
            fresh = self.nodes.values[known.size :]
            local = self.inventory.assign(fresh, kind)
            extra = np.asarray(local, dtype=np.int64) + self._first[kind]
            known = self._node_pool[kind] = np.concatenate([known, extra])
        return to_backend(self.xp, known)[node_ids]

    def _add_table(self, name: str, new: pa.Table, holders: pa.Table | None = None) -> None:
        self.rows += new.num_rows
        merged = merge_rows(
            self.carry[name],
            new,
            name,
            self.max_gap_ns,
            canonical=True,
            drop_late=self.drop_late,
            xp=self.xp,
        )
        self.duplicates += merged.duplicates
        self.late += merged.late
        rows, codes, times, is_new, parts = (
            merged.rows, merged.codes, merged.times, merged.is_new, merged.parts,
        )  # fmt: skip
        self.carry[name] = rows.take(kernels.last_rows(codes))

        counted = is_new.copy()
        if self.start_ns is not None:
            counted &= times >= self.start_ns
        if self.end_ns is not None:
            counted &= times < self.end_ns
        self._note_range(times, counted)
        window = self.windows.index(times)
        # The series key starts with the node (and is (node, job) for jobs): ids per series.
        xp = self.xp
        nodes = to_backend(xp, self._ids_of(self.nodes, merged.labels, 0))[codes]
        zeros = xp.zeros(times.shape[0], dtype=xp.int64)
        m = counted
        fine = None if self.fine_window_ns is None else window_index(times, self.fine_window_ns)

        def add_pool(pool: np.ndarray, sums: list[np.ndarray]) -> None:
            self.pool_parts.add([window, pool], sums, m)
            if fine is not None:
                self.fine_pool_parts.add([fine, pool], sums, m)

        if name in ("gpu", "cpu"):
            # Capacity rows: gpu rows feed gpu pools, cpu rows cpu pools.
            pool = self._pool_of(nodes, name)
            source = rows.arrow.column("energy_joules")
            readings = pc.is_valid(source)
            if name == "gpu":
                readings = pc.or_(readings, pc.is_valid(rows.arrow.column("power_watts")))
            measured = rows.gather(readings.to_numpy(zero_copy_only=False).astype(np.int64))
            add_pool(pool, [parts["capacity_us"], zeros, parts["busy_us"], parts["energy_mj"],
                            parts["gap_us"], measured])  # fmt: skip
        if name == "gpu":
            jobs = rows.gather(self.jobs.encode(rows.arrow.column("job_id")))
            self._note_mig_held(rows, m, nodes, jobs)
            held = m & (jobs >= 0)
            if holders is not None:
                shared = self._split_shared(holders, merged, m, window, pool, nodes, parts)
                held &= ~shared
            self.job_parts.add(
                [window, pool, nodes, jobs],
                [zeros, parts["busy_us"], parts["energy_mj"], zeros],
                held,
            )
        elif name == "job":
            jobs = to_backend(xp, self._ids_of(self.jobs, merged.labels, 1))[codes]
            for kind, allocated in (("gpu", "gpus_allocated_us"), ("cpu", "cpus_allocated_us")):
                pool = self._pool_of(nodes, kind)
                add_pool(pool, [zeros, parts[allocated], zeros, zeros, zeros, zeros])
                self.job_parts.add(
                    [window, pool, nodes, jobs],
                    [parts[allocated], zeros, zeros, parts["cpu_used_us"]],
                    m,
                )
            self._note_owners(rows, codes, times, nodes, jobs)

    def _note_range(self, times: Any, counted: Any) -> None:
        xp = self.xp
        if times.shape[0] == 0:
            return
        # one copy from the device per table and chunk: both ends together
        ends = to_host(xp.stack([xp.where(counted, times, 2**62).min(),
                                 xp.where(counted, times, -(2**62)).max()]))  # fmt: skip
        low, high = int(ends[0]), int(ends[1])
        if low > high:  # nothing counted
            return
        self.first_ns = low if self.first_ns is None else min(self.first_ns, low)
        self.last_ns = high if self.last_ns is None else max(self.last_ns, high)

    def _split_shared(
        self,
        holders: pa.Table,
        merged: Any,
        counted: Any,
        window: Any,
        pool: Any,
        nodes: Any,
        parts: dict[str, Any],
    ) -> Any:
        """SPEC §3, shared GPUs: the busy time and energy of each counted gpu interval that has
        gpu_job rows at its t_i go to the jobs holding the GPU — by their SM utilisation where
        every holder has one (scaled down to at most the GPU's busy time), else in proportion to
        their shares; energy in the proportions of busy time (of shares where it is 0). Returns
        the mask of the gpu rows so split (their own job_id no longer counts)."""
        xp = self.xp
        codes, times = merged.codes, merged.times
        uuid_of_series = to_backend(xp, self._ids_of(self.uuids, merged.labels, 1))
        # one copy from the device: each row's node, GPU, time, interval parts and whether it
        # counts
        host = to_host(xp.stack([
            counted.astype(xp.int64), nodes, uuid_of_series[codes], times,
            parts["busy_us"], parts["energy_mj"], parts["capacity_us"],
        ]))  # fmt: skip
        rows_at = np.flatnonzero(host[0])
        shared = np.zeros(times.shape[0], dtype=bool)
        if rows_at.size == 0:
            return to_backend(xp, shared)
        gpu_side = pa.table(
            {
                "i": pa.array(rows_at),
                "n": pa.array(host[1][rows_at]),
                "u": pa.array(host[2][rows_at]),
                "t": pa.array(host[3][rows_at]),
            }
        )
        # Duplicate holder rows (same GPU, job and time) count once, whatever their order.
        names = holders.column("job_id")
        if pa.types.is_dictionary(names.type):
            names = names.cast(pa.string())
        held = pa.table(
            {
                "n": pa.array(self.nodes.encode(holders.column("node"))),
                "u": pa.array(self.uuids.encode(holders.column("gpu_uuid"))),
                "t": holders.column("time").cast(pa.int64()),
                "name": names,
                "share": holders.column("share").cast(pa.float64()),
                "sm": holders.column("sm_utilization_ratio").cast(pa.float64()),
            }
        )
        keys = ["n", "u", "t", "name"]
        held = held.group_by(keys).aggregate([("share", "max"), ("sm", "max")])
        held = held.rename_columns([*keys, "share", "sm"])
        joined = gpu_side.join(held, ["n", "u", "t"], join_type="inner")
        if joined.num_rows == 0:
            return to_backend(xp, shared)
        # holders in job-name order: sums of shares do not depend on the order rows arrived in
        joined = joined.sort_by([("i", "ascending"), ("name", "ascending")])
        joined = joined.append_column("j", pa.array(self.jobs.encode(joined.column("name"))))
        i = joined.column("i").to_numpy()
        job = joined.column("j").to_numpy()
        share = joined.column("share").to_numpy()
        sm = joined.column("sm").to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.r_[True, i[1:] != i[:-1]])
        group = np.cumsum(np.r_[True, i[1:] != i[:-1]]) - 1
        gpu_rows = i[starts]
        busy, energy, dt = (host[k][gpu_rows].astype(np.float64) for k in (4, 5, 6))
        shares_total = np.add.reduceat(share, starts)
        by_sm = np.logical_and.reduceat(~np.isnan(sm), starts)
        sm_busy = np.nan_to_num(sm) * dt[group]
        sm_total = np.add.reduceat(sm_busy, starts)
        scale = np.where(sm_total > busy, busy / np.where(sm_total > 0, sm_total, 1.0), 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            by_share = np.where(shares_total[group] > 0, share / shares_total[group], 0.0)
            job_busy = np.where(by_sm[group], sm_busy * scale[group], busy[group] * by_share)
            busy_total = np.add.reduceat(job_busy, starts)
            weight = np.where(
                busy_total[group] > 0, job_busy / np.where(busy_total > 0, busy_total, 1)[group],
                by_share,
            )  # fmt: skip
        usable = shares_total[group] > 0
        job_energy = energy[group] * weight
        shared[gpu_rows[shares_total > 0]] = True
        self.shared_intervals += int((shares_total > 0).sum())
        pick = to_backend(xp, i[usable])
        zeros = xp.zeros(int(usable.sum()), dtype=xp.int64)
        self.job_parts.add(
            [window[pick], pool[pick], nodes[pick], to_backend(xp, job[usable])],
            [zeros, to_backend(xp, np.rint(job_busy[usable]).astype(np.int64)),
             to_backend(xp, np.rint(job_energy[usable]).astype(np.int64)), zeros],
            xp.ones(int(usable.sum()), dtype=bool),
        )  # fmt: skip
        return to_backend(xp, shared)

    @staticmethod
    def _ids_of(registry: Registry, labels: list[tuple[str, ...]], part: int) -> np.ndarray:
        """Registry id of part ``part`` of each series label (indexed by series code)."""
        return np.array([registry.id(label[part]) for label in labels] or [0], dtype=np.int64)

    def _note_owners(
        self,
        rows: SortedRows,
        codes: np.ndarray,
        times: np.ndarray,
        nodes: np.ndarray,
        jobs: np.ndarray,
    ) -> None:
        last = kernels.last_rows(codes)
        latest = rows.take(last)
        users = latest.column("user").to_pylist()
        tenants = latest.column("account").to_pylist()
        # One row per series: brought to the host together.
        last_nodes, last_jobs, last_times = (
            to_host(a[last]).tolist() for a in (nodes, jobs, times)
        )
        for node, job, time, user, tenant in zip(
            last_nodes, last_jobs, last_times, users, tenants, strict=True
        ):
            key = (node, job)
            seen = self.owner.get(key)
            if seen is None or time >= seen[0]:
                self.owner[key] = (time, self.names.id(user), self.names.id(tenant))

    def retire(self) -> int:
        """Live totals only: fold the jobs silent for ``retire_after_ns`` — behind the newest job
        row of their own node, so a node with a wrong clock or late files cannot retire anyone
        else's — into per-tenant sums and forget them (keys, owners, carried rows), so a live
        bill's cost per round stays flat under job churn (100k jobs took a round from 14 to
        410 ms). The silence is longer than ``max_gap``: a retired job that comes back would
        open a gap anyway. ``bill()`` lists retired jobs no more; returns how many retired."""
        newest: dict[int, int] = {}
        for (node, _), (time_ns, _, _) in self.owner.items():
            if time_ns > newest.get(node, -(2**62)):
                newest[node] = time_ns
        gone = {
            key: o for key, o in self.owner.items() if o[0] < newest[key[0]] - self.retire_after_ns
        }
        if not gone:
            return 0
        keys, sums = self.job_parts.compact()
        keys, sums = [to_host(k) for k in keys], [to_host(v) for v in sums]
        packed = keys[2].astype(np.int64) * (1 << 32) + keys[3].astype(np.int64)
        gone_packed = np.array([n * (1 << 32) + j for n, j in gone], dtype=np.int64)
        leaving = np.isin(packed, gone_packed)
        for i in np.flatnonzero(leaving).tolist():
            tenant = gone[(int(keys[2][i]), int(keys[3][i]))][2]
            into = self.retired.setdefault(
                (int(keys[0][i]), int(keys[1][i]), tenant), [0] * len(JOB_FIELDS)
            )
            for f, values in enumerate(sums):
                into[f] += int(values[i])
        self.job_parts.keep_only(to_backend(self.xp, ~leaving))
        for key in gone:
            del self.owner[key]
        carry = self.carry["job"]
        if carry.num_rows:
            names = {(self.nodes.values[n], self.jobs.values[j]) for n, j in gone}
            node_col = carry.column("node").to_pylist()
            job_col = carry.column("job_id").to_pylist()
            keep = [(n, j) not in names for n, j in zip(node_col, job_col, strict=True)]
            self.carry["job"] = carry.filter(pa.array(keep))
        return len(gone)

    # ---------------------------------------------------------------- output
    def pool_totals(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(window, pool) keys and their POOL_FIELDS sums (NumPy, whatever the backend)."""
        keys, sums = self.pool_parts.compact()
        return [to_host(k) for k in keys], [to_host(v) for v in sums]

    def job_totals(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(window, pool, node, job) keys and their JOB_FIELDS sums (NumPy, whatever the
        backend); empty arrays where no job has a sum."""
        keys, sums = self.job_parts.compact()
        if not sums:
            sums = [np.zeros(0, np.int64) for _ in JOB_FIELDS]
        return [to_host(k) for k in keys], [to_host(v) for v in sums]

    def owner_ids(
        self,
        nodes: np.ndarray,
        jobs: np.ndarray,
        overrides: dict[int, tuple[int, int]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """User and tenant ids of each (node, job): ``overrides`` per job (accounting) first,
        else the job's newest row on that node, else no user and tenant ``unknown``."""
        unknown = self.names.id(UNKNOWN_TENANT)
        users, tenants = [], []
        for node, job in zip(nodes.tolist(), jobs.tolist(), strict=True):
            found = None if overrides is None else overrides.get(job)
            if found is None:
                seen = self.owner.get((node, job))
                found = (seen[1], seen[2]) if seen is not None else (-1, unknown)
            users.append(found[0])
            tenants.append(found[1])
        return np.array(users, dtype=np.int64), np.array(tenants, dtype=np.int64)

    def tenant_sums(
        self, windows: np.ndarray, pools: np.ndarray, tenants: np.ndarray, sums: list[np.ndarray]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """JOB_FIELDS sums per (window, pool, tenant), with a live bill's retired jobs (already
        per tenant) folded in."""
        keys = [windows, pools, tenants]
        if self.retired:
            retired = list(self.retired.items())
            keys = [np.concatenate([k, np.array([r[0][i] for r in retired], np.int64)])
                    for i, k in enumerate(keys)]  # fmt: skip
            sums = [np.concatenate([v, np.array([r[1][f] for r in retired], np.int64)])
                    for f, v in enumerate(sums)]  # fmt: skip
        return group_sums(keys, sums)

    def live_totals(self, declared: bool = True) -> LiveTotals:
        """Totals over every window so far, per pool and per (pool, tenant). ``declared``:
        pools declaring capacity_units count it from the first sample to the newest (the
        whole dataset's exporters: replay, aggregate); else every pool counts what its
        series show (a node daemon: its own share, which sums across nodes, SPEC §6)."""
        keys, sums = self.pool_totals()
        by_pool, by_pool_sums = group_sums([keys[1]], sums)
        pools = []
        for i in range(by_pool[0].size):
            pool = self.pools[int(by_pool[0][i])]
            capacity, allocated, busy = (int(by_pool_sums[j][i]) / 1e6 for j in range(3))
            if (
                declared
                and pool.declared
                and self.first_ns is not None
                and self.last_ns is not None
            ):
                # declared capacity from the first sample seen to the newest (SPEC §4)
                capacity = pool.declared_us(self.first_ns, self.last_ns) / 1e6
            pools.append((pool.name, pool.kind, capacity, allocated, busy))
        keys, sums = self.job_totals()
        _, tenant_ids = self.owner_ids(keys[2], keys[3])
        tk, ts = self.tenant_sums(keys[0], keys[1], tenant_ids, sums)
        by_tenant, tenant_sums = group_sums([tk[1], tk[2]], ts)
        tenants = []
        for i in range(by_tenant[0].size):
            pool = self.pools[int(by_tenant[0][i])]
            allocated_s = int(tenant_sums[0][i]) / 1e6
            busy_us = tenant_sums[3 if pool.kind == "cpu" else 1][i]  # JOB_FIELDS: used, busy
            tenant = self.names.values[int(by_tenant[1][i])]
            charge = allocated_s / 3600.0 * float(self.inventory.price(pool, tenant))
            tenants.append((pool.name, pool.kind, tenant, allocated_s, int(busy_us) / 1e6, charge))
        return LiveTotals(self.inventory.currency, sorted(pools), sorted(tenants))

    def bill(
        self,
        input_stats: dict[str, Any] | None = None,
        whole: bool = False,
        accounting: list[Any] | None = None,
    ) -> Bill:
        """The bill of everything added so far (SPEC §4; ``telemetry.billing.invoice``); with
        ``whole`` one window spans the bill's range (totals with money rounded once);
        ``accounting`` records (``telemetry.billing.accounting.Record``) are the allocation of
        the jobs they name."""
        from telemetry.billing.invoice import build_bill

        return build_bill(self, input_stats or {}, whole, accounting)
