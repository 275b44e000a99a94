"""From the engine's integer sums to the bill's rows (SPEC §4): the bill's range and windows,
declared capacity, scheduler accounting, contract prices and money rounded once.

Every amount is computed exactly (``Fraction``) from the int64 unit-µs and mJ sums and rounded
half-to-even to the currency's decimals only here, at output; a pool's revenue is the sum of its
rounded tenant charges, so an invoice's lines add up to the cent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from kernels.grouped_sums import group_sums
from telemetry.billing.inventory import UNASSIGNED, Pool, exact
from telemetry.billing.windows import iso

if TYPE_CHECKING:
    from telemetry.billing.accounting import Record
    from telemetry.billing.engine import Bill, Biller

US_PER_HOUR = 3_600_000_000
MJ_PER_KWH = 3_600_000_000
ACCOUNTING, SAMPLES = "accounting", "samples"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


@dataclass
class _Jobs:
    """Per (window, pool, node, job) sums on the host: allocated, busy, energy, used."""

    keys: list[np.ndarray]
    sums: list[np.ndarray]
    # job id → (user id, tenant id) from accounting, over every node of the job
    owners: dict[int, tuple[int, int]] = field(default_factory=dict)
    accounted: set[int] = field(default_factory=set)
    # accounted jobs whose GPU allocation stayed the sampled one: they held MIG instances
    mig_sampled: set[str] = field(default_factory=set)


def bill_range(biller: Biller) -> tuple[int, int] | None:
    """[start, end) of the bill: --from (else the start of the first window holding a sample)
    to --to (else the newest sample's time); None when neither is known."""
    windows = biller.windows
    lo = biller.start_ns
    if lo is None and biller.first_ns is not None:
        lo = windows.start_of(windows.id_of(biller.first_ns))
    hi = biller.end_ns if biller.end_ns is not None else biller.last_ns
    if lo is None or hi is None or hi < lo:
        return None
    return lo, hi


class _Frame:
    """Window names and bounds of one bill: the biller's windows, or one window spanning the
    whole range (``whole``: a report's totals, money rounded once over the range)."""

    def __init__(self, biller: Biller, span: tuple[int, int] | None, whole: bool) -> None:
        self.biller, self.span, self.whole = biller, span, whole
        self._names: dict[int, dict[str, str]] = {}
        self.measured: set[tuple[int, int]] = set()  # (window, pool) with an energy reading

    def bounds(self, window: int) -> tuple[int, int]:
        if self.whole and self.span is not None:
            return self.span
        return self.biller.windows.bounds(window)

    def head(self, window: int, pool: Pool) -> dict[str, Any]:
        names = self._names.get(window)
        if names is None:  # one per window, not one per bill row
            if self.whole and self.span is not None:
                tz = self.biller.windows.tz
                start, end = iso(self.span[0], tz), iso(self.span[1], tz)
            else:
                start, end = self.biller.windows.names(window)
            names = self._names[window] = {"window_start": start, "window_end": end}
        return {**names, "pool": pool.name}


def build_bill(
    biller: Biller,
    input_stats: dict[str, Any],
    whole: bool = False,
    accounting: list[Record] | None = None,
) -> Bill:
    """The SPEC §4 bill of everything the biller holds; with ``whole`` one window spans the
    bill's range; ``accounting`` records replace the sampled allocation of their jobs."""
    from telemetry.billing.engine import Bill

    inventory = biller.inventory
    span = bill_range(biller)
    frame = _Frame(biller, span, whole)
    keys, sums = biller.pool_totals()
    pool_sums: dict[tuple[int, int], list[int]] = {}
    for i, (w, p) in enumerate(zip(keys[0].tolist(), keys[1].tolist(), strict=True)):
        into = pool_sums.setdefault((0 if whole else int(w), int(p)), [0] * len(sums))
        for f, values in enumerate(sums):
            into[f] += int(values[i])
    jobs = _Jobs(*biller.job_totals())
    if whole:
        jobs.keys[0] = np.zeros_like(jobs.keys[0])
    reconciliation = None
    if accounting is not None:
        reconciliation = _apply_accounting(biller, jobs, pool_sums, accounting, span, whole)
    window_ids = sorted({w for w, _ in pool_sums} | set(jobs.keys[0].tolist()))
    if whole:
        window_ids = [0] if span is not None or window_ids else []
    elif span is not None:
        lo, hi = span
        first = biller.windows.id_of(lo)
        last = biller.windows.id_of(max(lo, hi - 1))
        window_ids = sorted(set(window_ids) | set(range(first, last + 1)))
    listed = {p for _, p in pool_sums} | set(jobs.keys[1].tolist())
    listed |= {i for i, pool in enumerate(biller.pools) if pool.declared}
    frame.measured = {key for key, sums in pool_sums.items() if sums[5]}
    tenants, charges = _tenant_rows(biller, jobs, frame)
    job_rows = _job_rows(biller, jobs, frame)
    pools_out = []
    undeclared = set()
    for window in window_ids:
        for index in sorted(listed):
            pool = biller.pools[index]
            row = _pool_row(biller, frame, window, index, pool_sums.get((window, index)), charges)
            pools_out.append(row)
            if not pool.declared and pool.name != UNASSIGNED and row["monitored_unit_hours"]:
                undeclared.add(pool.name)
    notes = []
    if undeclared:
        notes.append(
            f"pools without capacity_units ({', '.join(sorted(undeclared))}): capacity is what "
            "was monitored, so time without samples costs nothing; declare capacity_units"
        )
    if jobs.mig_sampled:
        shown = ", ".join(sorted(jobs.mig_sampled)[:5])
        more = len(jobs.mig_sampled) - 5
        notes.append(
            f"accounting counts each MIG instance as a GPU: the GPU allocation of accounted "
            f"jobs on MIG instances ({shown}{f' and {more} more' if more > 0 else ''}) is their "
            "sampled one, each instance at its slice fraction"
        )
    stats: dict[str, Any] = {"files": 0, "rows": biller.rows,
                             "rows_skipped": biller.duplicates, "files_quarantined": 0}  # fmt: skip
    stats.update(input_stats)
    stats["reconciliation"] = reconciliation
    return Bill(
        pools_out,
        tenants,
        job_rows,
        stats,
        inventory.currency,
        timezone=inventory.timezone_name,
        notes=notes,
    )


# ---------------------------------------------------------------------------- money
class _Money:
    def __init__(self, decimals: int) -> None:
        self.decimals = decimals

    def __call__(self, amount: Fraction) -> float:
        """Half-to-even at the currency's decimals (``round`` of a Fraction is exact)."""
        return float(round(amount, self.decimals)) + 0.0


def _waste(charge: Fraction, allocated_us: int, busy_us: int) -> Fraction:
    if allocated_us <= 0 or busy_us >= allocated_us:
        return Fraction(0)
    return charge * (1 - Fraction(busy_us, allocated_us))


# ---------------------------------------------------------------------------- rows
def _pool_row(
    biller: Biller,
    frame: _Frame,
    window: int,
    index: int,
    sums: list[int] | None,
    charges: dict[tuple[int, int], Fraction],
) -> dict[str, Any]:
    pool = biller.pools[index]
    money = _Money(biller.inventory.currency_decimals)
    monitored_us, allocated_us, busy_us, energy_mj, gap_us, readings = sums or [0] * 6
    capacity_us = monitored_us
    if pool.declared:
        start, end = frame.bounds(window)
        if frame.span is not None:
            start, end = max(start, frame.span[0]), min(end, frame.span[1])
        # exactly the declared units over the window's part of the range (SPEC §4), whatever
        # was seen: the same range costs the same in windows of any length. More monitored
        # than declared (a node added without updating the inventory) shows as an allocation
        # ratio above 1 and no unmonitored time, not as capacity nobody declared.
        capacity_us = pool.declared_us(start, end) if end > start else 0
    measured = bool(readings)
    energy_kwh = Fraction(energy_mj, MJ_PER_KWH)
    pue = exact(pool.pue) if pool.pue is not None else Fraction(1)
    energy_cost = None
    if pool.energy_price_per_kwh is not None and measured:
        energy_cost = energy_kwh * pue * exact(pool.energy_price_per_kwh)
    emissions = None
    if pool.grid_gco2_per_kwh is not None and measured:
        emissions = float(energy_kwh * pue * exact(pool.grid_gco2_per_kwh) / 1000)
    cost_exact = Fraction(capacity_us, US_PER_HOUR) * exact(pool.cost_per_unit_hour)
    cost_exact += energy_cost or 0
    cost = money(cost_exact)
    revenue = float(charges.get((window, index), Fraction(0))) + 0.0  # rounded lines' sum
    allocated = allocated_us / US_PER_HOUR
    # capacity nobody bought; none where the window holds no capacity (the newest sample's
    # interval past the declared range: its energy is no idle capacity)
    idle = Fraction(0)
    if capacity_us:
        idle = cost_exact * max(Fraction(0), 1 - Fraction(allocated_us, capacity_us))
    return {
        **frame.head(window, pool),
        "kind": pool.kind,
        "ownership": pool.ownership,
        "capacity_unit_hours": capacity_us / US_PER_HOUR,
        "monitored_unit_hours": monitored_us / US_PER_HOUR,
        "unmonitored_unit_hours": max(0, capacity_us - monitored_us) / US_PER_HOUR,
        "allocated_unit_hours": allocated,
        "busy_unit_hours": busy_us / US_PER_HOUR,
        "allocation_ratio": _ratio(allocated_us, capacity_us),
        "busy_ratio": _ratio(busy_us, monitored_us),
        "energy_kwh": float(energy_kwh) if measured else None,
        "energy_cost": None if energy_cost is None else money(energy_cost),
        "emissions_kg": emissions,
        "cost": cost,
        "revenue": revenue,
        # money per allocated unit-hour from the exact sums, rounded like every money field
        "unit_cost": money(cost_exact / Fraction(allocated_us, US_PER_HOUR))
        if allocated_us
        else None,
        "gross_margin_ratio": _ratio(revenue - cost, revenue),
        "idle_cost": money(idle),
        "gap_hours": gap_us / US_PER_HOUR,
    }


def _party_body(
    biller: Biller, pool: Pool, tenant: str, sums: list[int], measured: bool
) -> tuple[dict[str, Any], Fraction] | None:
    """A tenant's or job's line; its energy is null where its pool-window measured none."""
    allocated_us, busy_us, energy_mj, used_us = sums
    if pool.kind == "cpu":
        busy_us = used_us  # SPEC §4: a cpu pool's busy is the jobs' used core-time
    if not any((allocated_us, busy_us, energy_mj)):
        return None
    money = _Money(biller.inventory.currency_decimals)
    charge = Fraction(allocated_us, US_PER_HOUR) * biller.inventory.price(pool, tenant)
    return {
        "allocated_unit_hours": allocated_us / US_PER_HOUR,
        "busy_unit_hours": busy_us / US_PER_HOUR,
        "efficiency_ratio": _ratio(busy_us, allocated_us),
        "energy_kwh": energy_mj / MJ_PER_KWH if pool.kind == "gpu" and measured else None,
        "charge": money(charge),
        "waste_charge": money(_waste(charge, allocated_us, busy_us)),
    }, charge


def _tenant_rows(
    biller: Biller, jobs: _Jobs, frame: _Frame
) -> tuple[list[dict[str, Any]], dict[tuple[int, int], Fraction]]:
    """Tenant rows and each (window, pool)'s revenue: the sum of its rounded tenant charges."""
    _, tenant = biller.owner_ids(jobs.keys[2], jobs.keys[3], jobs.owners)
    tk, ts = biller.tenant_sums(jobs.keys[0], jobs.keys[1], tenant, jobs.sums)
    out: list[dict[str, Any]] = []
    revenue: dict[tuple[int, int], Fraction] = {}
    decimals = biller.inventory.currency_decimals
    for i in range(tk[0].size):
        window, index = int(tk[0][i]), int(tk[1][i])
        pool = biller.pools[index]
        name = biller.names.values[int(tk[2][i])]
        line = [int(s[i]) for s in ts]
        made = _party_body(biller, pool, name, line, (window, index) in frame.measured)
        if made is None:
            continue
        body, charge = made
        revenue[(window, index)] = revenue.get((window, index), Fraction(0)) + round(
            charge, decimals
        )
        out.append({**frame.head(window, pool), "tenant": name, **body,
                    "_order": (window, index, name)})  # fmt: skip
    out.sort(key=lambda r: r["_order"])
    for row in out:
        del row["_order"]
    return out, revenue


def _job_rows(biller: Biller, jobs: _Jobs, frame: _Frame) -> list[dict[str, Any]]:
    user, tenant = biller.owner_ids(jobs.keys[2], jobs.keys[3], jobs.owners)
    jk, js = group_sums([jobs.keys[0], jobs.keys[1], jobs.keys[3], user, tenant], jobs.sums)
    out: list[dict[str, Any]] = []
    for i in range(jk[0].size):
        window, index, job_index = int(jk[0][i]), int(jk[1][i]), int(jk[2][i])
        pool = biller.pools[index]
        tenant_name = biller.names.values[int(jk[4][i])]
        line = [int(s[i]) for s in js]
        made = _party_body(biller, pool, tenant_name, line, (window, index) in frame.measured)
        if made is None:
            continue
        job = biller.jobs.values[job_index]
        user_name = biller.names.values[int(jk[3][i])] if int(jk[3][i]) >= 0 else None
        source = ACCOUNTING if job_index in jobs.accounted else SAMPLES
        out.append({**frame.head(window, pool), "job_id": job, "user": user_name,
                    "tenant": tenant_name, **made[0], "allocation_source": source,
                    "_order": (window, index, job, user_name or "", tenant_name)})  # fmt: skip
    out.sort(key=lambda r: r["_order"])
    for row in out:
        del row["_order"]
    return out


# ---------------------------------------------------------------------------- accounting
def _apply_accounting(
    biller: Biller,
    jobs: _Jobs,
    pool_sums: dict[tuple[int, int], list[int]],
    records: list[Record],
    span: tuple[int, int] | None,
    whole: bool,
) -> dict[str, Any]:
    """Replace the sampled allocation of every accounted job by the exact overlap of its
    [start, end) with each window of the range (SPEC §4), and return ``input.reconciliation``.

    Not a job's GPUs on a node where it held MIG instances (:attr:`Biller.mig_held`): Slurm
    counts each instance as one GPU, where capacity counts it at its slice fraction (SPEC §2),
    so there its GPU allocation stays the sampled one, as for shards (the record's count is no
    count of GPUs). A record without samples is billed from the record alone."""
    sampled_jobs = {job for _, job in biller.owner} & set(jobs.keys[3].tolist())
    lo, hi = span if span is not None else (0, 0)
    inside = [r for r in records if r.start_ns < hi and (r.end_ns is None or r.end_ns > lo)]
    rows: list[tuple[int, int, int, int, int]] = []  # window, pool, node, job, allocated µs
    # the kinds whose allocation accounting gives, per job (not GPUs of a job on shards)
    replaced: dict[int, tuple[str, ...]] = {}
    for record in inside:
        job = biller.jobs.id(record.job_id)
        jobs.accounted.add(job)
        jobs.owners[job] = (biller.names.id(record.user), biller.names.id(record.account))
        kinds = (("gpu", record.gpus), ("cpu", record.cpus))
        replaced[job] = tuple(kind for kind, total in kinds if total is not None)
        a, b = max(record.start_ns, lo), min(record.end_ns if record.end_ns is not None else hi, hi)
        if b <= a:
            continue
        share = len(record.nodes)
        for node_name in record.nodes:
            node = biller.nodes.id(node_name)
            for kind, total in kinds:
                if not total:
                    continue
                if kind == "gpu" and (node_name, record.job_id) in biller.mig_held:
                    jobs.mig_sampled.add(f"job {record.job_id} on {node_name}")
                    continue
                units = exact(total) / share
                pool = biller.inventory.assign([node_name], kind)[0] + biller._first[kind]
                window = biller.windows.id_of(a)
                while True:
                    w_start, w_end = biller.windows.bounds(window)
                    if w_start >= b:
                        break
                    overlap = min(b, w_end) - max(a, w_start)
                    if overlap > 0:
                        rows.append((window, pool, node, job, round(units * overlap / 1000)))
                    window += 1
    gpu_pools = biller._first["cpu"]  # pool indexes below it are gpu pools
    mig = {(biller.nodes.id(node), biller.jobs.id(job)) for node, job in biller.mig_held}
    was = np.array(
        [("gpu" if pool < gpu_pools else "cpu") in replaced.get(job, ())
         and not (pool < gpu_pools and (node, job) in mig)
         for pool, node, job in zip(jobs.keys[1].tolist(), jobs.keys[2].tolist(),
                                    jobs.keys[3].tolist(), strict=True)],
        dtype=bool,
    )  # fmt: skip
    both = sampled_jobs & jobs.accounted
    in_both = was & np.isin(jobs.keys[3], np.array(sorted(both), dtype=np.int64))
    kind_of = np.where(jobs.keys[1] < gpu_pools, 0, 1)
    sampled_by_kind = [int(jobs.sums[0][in_both & (kind_of == k)].sum()) for k in (0, 1)]
    sampled_us = sum(sampled_by_kind)
    # the pools' allocation: the sampled allocation of accounted jobs out, the accounted in
    for i in np.flatnonzero(was).tolist():
        key = (int(jobs.keys[0][i]), int(jobs.keys[1][i]))
        pool_sums.setdefault(key, [0] * 6)[1] -= int(jobs.sums[0][i])
    if whole:
        rows = [(0, pool, node, job, us) for _, pool, node, job, us in rows]
    for window, pool, _, _, us in rows:
        pool_sums.setdefault((window, pool), [0] * 6)[1] += us
    accounted_by_kind = [
        sum(us for _, pool, _, job, us in rows if job in both and (pool >= gpu_pools) == k)
        for k in (False, True)
    ]
    accounted_us = sum(accounted_by_kind)
    jobs.sums[0] = np.where(was, 0, jobs.sums[0])
    if rows:
        extra = np.array(rows, dtype=np.int64)
        jobs.keys = [np.concatenate([k, extra[:, c]]) for c, k in enumerate(jobs.keys)]
        zeros = np.zeros(len(rows), dtype=np.int64)
        jobs.sums = [np.concatenate([jobs.sums[0], extra[:, 4]])] + [
            np.concatenate([v, zeros]) for v in jobs.sums[1:]
        ]
    return {
        "jobs_accounted": len(jobs.accounted),
        "jobs_sampled_only": len(sampled_jobs - jobs.accounted),
        "jobs_accounted_without_samples": len(jobs.accounted - sampled_jobs),
        "allocated_unit_hours_sampled": sampled_us / US_PER_HOUR,
        "allocated_unit_hours_accounted": accounted_us / US_PER_HOUR,
        # GPU-hours and core-hours apart: the totals above add the two kinds of unit
        "by_kind": {
            kind: {
                "allocated_unit_hours_sampled": sampled_by_kind[k] / US_PER_HOUR,
                "allocated_unit_hours_accounted": accounted_by_kind[k] / US_PER_HOUR,
            }
            for k, kind in enumerate(("gpu", "cpu"))
        },
    }
