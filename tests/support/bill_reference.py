"""A plain-Python reference of the bill (SPEC §3–4), independent of ``kernels`` and
``telemetry.billing.engine``: loops over rows, dicts of integer sums, money only at output.

Per-interval contributions come from :mod:`tests.reference` (itself checked against the kernels);
everything above them — pools, ownership of nodes, windows, the ``--from/--to`` selection,
tenants and jobs, rounding to hours and money, omission and order of rows — is restated here from
the SPEC and the decisions that fill its gaps:

- a node belongs, per kind, to the first pool of that kind with a matching ``nodes`` glob
  (``fnmatchcase``), else to that kind's ``unassigned`` pool (no ownership, cost and price 0);
- gpu pools take capacity, busy, energy and gaps from gpu rows, cpu pools from cpu rows; every job
  row gives ``gpus_allocated·Δt`` to its node's gpu pool and ``cpus_allocated·Δt`` to its node's
  cpu pool;
- per (pool, node, job): allocated from job rows; in gpu pools busy and energy from the gpu rows
  whose ``job_id`` is the job, in cpu pools busy is the job's used core-time and energy is null;
  user and tenant are those of the (node, job)'s job row with the latest time in the whole
  dataset (user None, tenant ``unknown`` without one);
- a selection [start, end) counts the intervals whose t_i lies in it; earlier rows still open
  intervals (a gap opened before the start and closed inside counts in full);
- tenant and job rows whose additive fields are all zero are left out; pools are listed in every
  window of the bill's range (SPEC §4) once they hold any row or declare capacity;
- a pool-window's energy is null when none of its capacity rows has an energy reading (the
  counter, or a GPU's power);
- money is ``Decimal`` arithmetic rounded half-to-even at output (the engine uses ``Fraction``);
- calendar windows are computed with ``datetime`` in the zone, one window at a time;
- shared GPUs (gpu_job rows at a gpu row's time) split that interval's busy time and energy per
  SPEC §3, holders taken in job-name order with the same float64 expressions as the engine.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from fractions import Fraction
from typing import Any

from telemetry.billing.accounting import Record
from telemetry.billing.inventory import Inventory
from tests.support import reference as ref
from tests.support.units import NS

UNASSIGNED = "unassigned"
UNKNOWN = "unknown"
US_PER_HOUR = 3_600_000_000
MJ_PER_KWH = 3_600_000_000
TABLES = ("gpu", "cpu", "job")
READ_TABLES = ("gpu", "cpu", "job", "gpu_job")

Row = dict[str, Any]
PoolInfo = dict[str, Any]  # name, kind, ownership, nodes, cost, price


def pool_list(inventory: Inventory) -> list[PoolInfo]:
    """gpu pools in file order, gpu ``unassigned``, cpu pools in file order, cpu ``unassigned``;
    the position in this list is the pool's sort index."""
    out: list[PoolInfo] = []
    for kind in ("gpu", "cpu"):
        for p in inventory.pools:
            if p.kind == kind:
                out.append(
                    {
                        "name": p.name,
                        "kind": kind,
                        "ownership": p.ownership,
                        "nodes": list(p.nodes),
                        "cost": p.cost_per_unit_hour,
                        "price": p.price_per_unit_hour,
                        "steps": list(p.capacity_steps),
                        "energy_price": p.energy_price_per_kwh,
                        "pue": p.pue,
                        "gco2": p.grid_gco2_per_kwh,
                    }
                )
        out.append(
            {
                "name": UNASSIGNED,
                "kind": kind,
                "ownership": None,
                "nodes": [],
                "cost": 0.0,
                "price": 0.0,
                "steps": [],
                "energy_price": None,
                "pue": None,
                "gco2": None,
            }
        )
    return out


def pool_index(pools: Sequence[PoolInfo], node: str, kind: str) -> int:
    """Index of ``node``'s pool of ``kind``: the first with a matching glob, else unassigned."""
    for i, p in enumerate(pools):
        if p["kind"] == kind and any(fnmatch.fnmatchcase(node, g) for g in p["nodes"]):
            return i
    return next(i for i, p in enumerate(pools) if p["kind"] == kind and p["name"] == UNASSIGNED)


def iso(seconds: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    return moment.isoformat().replace("+00:00", "Z")


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def _add(target: dict[Any, dict[str, int]], key: Any, **values: int) -> None:
    sums = target.setdefault(key, {})
    for k, v in values.items():
        sums[k] = sums.get(k, 0) + v


def duplicates(rows: Iterable[Row], name: str) -> int:
    """Rows that repeat an earlier row's (series key, time)."""
    seen: set[tuple[Any, ...]] = set()
    count = 0
    for r in rows:
        key = (*(r[k] for k in ref.SERIES_KEYS[name]), r["time"])
        if key in seen:
            count += 1
        seen.add(key)
    return count


def dec(value: float | int) -> Decimal:
    """The decimal a person wrote in the inventory."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def money(amount: Decimal, decimals: int) -> float:
    return float(amount.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_EVEN)) + 0.0


def rounded(amount: Decimal, decimals: int) -> Decimal:
    return amount.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_EVEN)


class RefWindows:
    """Window of an instant: fixed lengths from the epoch, or calendar day/week/month in a zone
    (datetime arithmetic, one instant at a time)."""

    def __init__(self, window: int | str, tz: tzinfo) -> None:
        self.window, self.tz = window, tz

    def _local_start(self, day: date) -> int:
        moment = datetime(day.year, day.month, day.day, tzinfo=self.tz)
        return int(moment.timestamp()) * NS

    def of(self, t: int) -> tuple[int, int]:
        if isinstance(self.window, int):
            w = self.window * NS
            return t // w * w, t // w * w + w
        local = datetime.fromtimestamp(t // NS, tz=UTC).astimezone(self.tz).date()
        if self.window == "day":
            first, after = local, local + timedelta(days=1)
        elif self.window == "week":
            first = local - timedelta(days=local.weekday())
            after = first + timedelta(days=7)
        else:
            first = local.replace(day=1)
            after = (first + timedelta(days=32)).replace(day=1)
        return self._local_start(first), self._local_start(after)

    def name(self, ns: int) -> str:
        moment = datetime.fromtimestamp(ns // NS, tz=UTC).astimezone(self.tz)
        text = moment.isoformat()
        return text.replace("+00:00", "Z") if self.tz is UTC else text


def contract_price(inventory: Inventory, pool: PoolInfo, tenant: str) -> Decimal:
    for c in inventory.contracts:
        if c.tenant == tenant and fnmatch.fnmatchcase(pool["name"], c.pool):
            if c.price_per_unit_hour is not None:
                return dec(c.price_per_unit_hour)
            return dec(pool["price"]) * (1 - dec(c.discount_ratio or 0.0))
    return dec(pool["price"])


def declared_us(pool: PoolInfo, a: int, b: int) -> int:
    total = 0
    steps = pool["steps"]
    for i, (begin, units) in enumerate(steps):
        until = steps[i + 1][0] if i + 1 < len(steps) else b
        lo, hi = max(a, begin), min(b, until)
        if hi > lo:
            exact = dec(units) * Decimal(hi - lo) / 1000
            total += int(exact.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    return total


def _split_shared(
    holders: list[Row], busy_us: int, energy_mj: int, dt_us: int
) -> list[tuple[str, int, int]]:
    """SPEC §3 for one gpu interval: (job, busy µs, energy mJ) per holder."""
    merged: dict[str, tuple[float, float]] = {}
    for h in holders:  # duplicates: the larger share and SM figure
        share = float(h["share"])
        sm = h.get("sm_utilization_ratio")
        sm = math.nan if sm is None else float(sm)
        if h["job_id"] in merged:
            s0, m0 = merged[h["job_id"]]
            share = max(share, s0)
            sm = m0 if math.isnan(sm) else sm if math.isnan(m0) else max(sm, m0)
        merged[h["job_id"]] = (share, sm)
    jobs = sorted(merged)
    total_share = 0.0
    for j in jobs:
        total_share += merged[j][0]
    if total_share <= 0:
        return []
    busy, energy, dt = float(busy_us), float(energy_mj), float(dt_us)
    by_share = {j: merged[j][0] / total_share for j in jobs}
    if all(not math.isnan(merged[j][1]) for j in jobs):
        raw = {j: merged[j][1] * dt for j in jobs}
        total = 0.0
        for j in jobs:
            total += raw[j]
        scale = busy / total if total > busy else 1.0
        job_busy = {j: raw[j] * scale for j in jobs}
    else:
        job_busy = {j: busy * by_share[j] for j in jobs}
    busy_total = 0.0
    for j in jobs:
        busy_total += job_busy[j]
    out = []
    for j in jobs:
        weight = job_busy[j] / busy_total if busy_total > 0 else by_share[j]
        out.append((j, round(job_busy[j]), round(energy * weight)))
    return out


def reference_bill(
    tables: dict[str, list[Row]],
    inventory: Inventory,
    window: int | str,
    start_ns: int | None = None,
    end_ns: int | None = None,
    files: int = 0,
    accounting: list[Record] | None = None,
    tz: tzinfo | None = None,
) -> dict[str, Any]:
    """The bill of ``tables`` (rows as dicts, ``time`` as int ns) as plain dicts and lists.

    ``start_ns``/``end_ns`` are the selection [start, end). ``input`` counts every row of the
    dataset whatever the selection: earlier rows open the selection's intervals, later ones can
    name a job's owner.
    """
    zone = tz if tz is not None else inventory.timezone
    windows = RefWindows(window, zone)
    decimals = inventory.currency_decimals
    pools = pool_list(inventory)
    max_gap_ns = int(inventory.max_gap_seconds * NS)

    def counted(t: int) -> bool:
        return (start_ns is None or t >= start_ns) and (end_ns is None or t < end_ns)

    holders: dict[tuple[str, str, int], list[Row]] = {}
    for h in tables.get("gpu_job", []):
        holders.setdefault((h["node"], h["gpu_uuid"], h["time"]), []).append(h)

    seen_times: list[int] = []
    pool_sums: dict[tuple[int, int], dict[str, int]] = {}  # (window start, pool)
    party: dict[tuple[int, int, str, str], dict[str, int]] = {}  # (window, pool, node, job)
    for name in TABLES:
        for series in ref.table_series(name, tables.get(name, [])).values():
            node = series[0]["node"]
            for row, p in zip(series, ref.rows_parts(name, series, max_gap_ns), strict=True):
                t = row["time"]
                if not counted(t):
                    continue
                seen_times.append(t)
                w = windows.of(t)[0]
                if name in ("gpu", "cpu"):
                    pi = pool_index(pools, node, name)
                    # a reading: the energy counter, or on a GPU its power
                    reading = row["energy_joules"] is not None or (
                        name == "gpu" and row["power_watts"] is not None
                    )
                    _add(
                        pool_sums,
                        (w, pi),
                        capacity=p["capacity_us"],
                        busy=p["busy_us"],
                        energy=p["energy_mj"],
                        gap=p["gap_us"],
                        readings=int(reading),
                    )
                    if name != "gpu":
                        continue
                    split = _split_shared(
                        holders.get((node, row["gpu_uuid"], t), []),
                        p["busy_us"], p["energy_mj"], p["capacity_us"],
                    )  # fmt: skip
                    if split:
                        for job, busy_us, energy_mj in split:
                            _add(party, (w, pi, node, job), busy=busy_us, energy=energy_mj)
                    elif row["job_id"] is not None:
                        _add(
                            party,
                            (w, pi, node, row["job_id"]),
                            busy=p["busy_us"],
                            energy=p["energy_mj"],
                        )
                    continue
                for kind, part in (("gpu", "gpus_allocated_us"), ("cpu", "cpus_allocated_us")):
                    pi = pool_index(pools, node, kind)
                    _add(pool_sums, (w, pi), allocated=p[part])
                    _add(
                        party,
                        (w, pi, node, row["job_id"]),
                        allocated=p[part],
                        used=p["cpu_used_us"],
                    )

    # Owner of each (node, job): its job row with the latest time anywhere in the dataset.
    owner: dict[tuple[str, str], tuple[int, str, str]] = {}
    for r in tables.get("job", []):
        key = (r["node"], r["job_id"])
        if key not in owner or r["time"] > owner[key][0]:
            owner[key] = (r["time"], r["user"], r["account"])

    # The bill's range: --from (else the first sampled window's start) to --to (else the
    # newest sample's time).
    lo = start_ns if start_ns is not None else (
        windows.of(min(seen_times))[0] if seen_times else None
    )  # fmt: skip
    hi = end_ns if end_ns is not None else (max(seen_times) if seen_times else None)
    span = (lo, hi) if lo is not None and hi is not None and hi >= lo else None

    accounted: dict[str, Record] = {}
    reconciliation = None
    if accounting is not None:
        a_lo, a_hi = span if span is not None else (0, 0)
        for r in accounting:
            if r.start_ns < a_hi and (r.end_ns is None or r.end_ns > a_lo):
                accounted[r.job_id] = r
        sampled_jobs = {job for (_, _, _, job) in party} & {job for (_, job) in owner}
        both = sampled_jobs & set(accounted)

        # (node, job) of counted gpu rows of less than one GPU naming a job: MIG instances it
        # held, which Slurm counts as whole GPUs
        mig_held = {
            (row["node"], row["job_id"])
            for row in tables.get("gpu", [])
            if counted(row["time"])
            and row.get("job_id") is not None
            and row.get("capacity_units") is not None
            and row["capacity_units"] < 1
        }

        # the sampled allocation of accounted jobs is replaced (GPUs only where the record
        # counts GPUs: not shards, not the MIG instances a job held on a node)
        def replaced(job: str, pi: int, node: str) -> bool:
            record = accounted.get(job)
            if record is None:
                return False
            if pools[pi]["kind"] == "cpu":
                return True
            return record.gpus is not None and (node, job) not in mig_held

        sampled_by = {
            kind: sum(
                s.get("allocated", 0)
                for (_, pi, node, job), s in party.items()
                if job in both and replaced(job, pi, node) and pools[pi]["kind"] == kind
            )
            for kind in ("gpu", "cpu")
        }
        for (w, pi, node, job), s in party.items():
            if replaced(job, pi, node) and s.get("allocated", 0):
                pool_sums[(w, pi)]["allocated"] -= s["allocated"]
                s["allocated"] = 0
        accounted_by = {"gpu": 0, "cpu": 0}
        for r in accounted.values():
            a, b = max(r.start_ns, a_lo), min(a_hi if r.end_ns is None else r.end_ns, a_hi)
            for node in r.nodes:
                for kind, total in (("gpu", r.gpus), ("cpu", r.cpus)):
                    if not total or b <= a or (kind == "gpu" and (node, r.job_id) in mig_held):
                        continue
                    units = dec(total) / len(r.nodes)
                    pi = pool_index(pools, node, kind)
                    t = a
                    while t < b:
                        w0, w1 = windows.of(t)
                        overlap = min(b, w1) - t
                        us = int((units * overlap / 1000).quantize(Decimal(1), ROUND_HALF_EVEN))
                        _add(pool_sums, (w0, pi), allocated=us)
                        _add(party, (w0, pi, node, r.job_id), allocated=us)
                        if r.job_id in both:
                            accounted_by[kind] += us
                        t = w1
        reconciliation = {
            "jobs_accounted": len(accounted),
            "jobs_sampled_only": len(sampled_jobs - set(accounted)),
            "jobs_accounted_without_samples": len(set(accounted) - sampled_jobs),
            "allocated_unit_hours_sampled": sum(sampled_by.values()) / US_PER_HOUR,
            "allocated_unit_hours_accounted": sum(accounted_by.values()) / US_PER_HOUR,
            "by_kind": {
                kind: {
                    "allocated_unit_hours_sampled": sampled_by[kind] / US_PER_HOUR,
                    "allocated_unit_hours_accounted": accounted_by[kind] / US_PER_HOUR,
                }
                for kind in ("gpu", "cpu")
            },
        }

    def window_head(w: int) -> dict[str, str]:
        return {"window_start": windows.name(w), "window_end": windows.name(windows.of(w)[1])}

    # Tenant and job sums first: a pool's revenue is the sum of its tenants' rounded charges.
    tenant_sums: dict[tuple[int, int, str], dict[str, int]] = {}
    job_sums: dict[tuple[int, int, str, str, str], dict[str, int]] = {}
    users: dict[tuple[int, int, str, str, str], str | None] = {}
    for (w, pi, node, job), s in party.items():
        if job in accounted:
            user, tenant = accounted[job].user, accounted[job].account
        else:
            found = owner.get((node, job))
            user, tenant = (found[1], found[2]) if found else (None, UNKNOWN)
        busy = s.get("busy", 0) if pools[pi]["kind"] == "gpu" else s.get("used", 0)
        values = {"allocated": s.get("allocated", 0), "busy": busy, "energy": s.get("energy", 0)}
        _add(tenant_sums, (w, pi, tenant), **values)
        key = (w, pi, job, user or "", tenant)
        _add(job_sums, key, **values)
        users[key] = user

    def measured(w: int, pi: int) -> bool:
        return bool(pool_sums.get((w, pi), {}).get("readings", 0))

    def party_body(
        pi: int, tenant: str, s: dict[str, int], energy_known: bool = True
    ) -> dict[str, Any] | None:
        if s["allocated"] == s["busy"] == s["energy"] == 0:
            return None
        pool = pools[pi]
        with localcontext() as ctx:
            ctx.prec = 60
            charge = Decimal(s["allocated"]) * contract_price(inventory, pool, tenant) / US_PER_HOUR
            waste = Decimal(0)
            if s["allocated"] > 0 and s["busy"] < s["allocated"]:
                waste = charge * (1 - Decimal(s["busy"]) / Decimal(s["allocated"]))
        return {
            "allocated_unit_hours": s["allocated"] / US_PER_HOUR,
            "busy_unit_hours": s["busy"] / US_PER_HOUR,
            "efficiency_ratio": _ratio(s["busy"], s["allocated"]),
            "energy_kwh": s["energy"] / MJ_PER_KWH
            if pool["kind"] == "gpu" and energy_known
            else None,
            "charge": money(charge, decimals),
            "waste_charge": money(waste, decimals),
            "_charge": rounded(charge, decimals),
        }

    tenants_out = []
    revenue: dict[tuple[int, int], Decimal] = {}
    for (w, pi, tenant), s in sorted(tenant_sums.items()):
        body = party_body(pi, tenant, s, measured(w, pi))
        if body is not None:
            revenue[(w, pi)] = revenue.get((w, pi), Decimal(0)) + body.pop("_charge")
            head = {**window_head(w), "pool": pools[pi]["name"], "tenant": tenant}
            tenants_out.append({**head, **body})
    jobs_out = []
    for (w, pi, job, user_key, tenant), s in sorted(job_sums.items()):
        body = party_body(pi, tenant, s, measured(w, pi))
        if body is not None:
            del body["_charge"]
            user = users[(w, pi, job, user_key, tenant)]
            head = {**window_head(w), "pool": pools[pi]["name"], "job_id": job}
            source = "accounting" if job in accounted else "samples"
            jobs_out.append(
                {**head, "user": user, "tenant": tenant, **body, "allocation_source": source}
            )

    window_starts = {w for w, _ in pool_sums} | {w for w, _, _, _ in party}
    if span is not None:
        t = windows.of(span[0])[0]
        last = windows.of(max(span[0], span[1] - 1))[0]
        while t <= last:
            window_starts.add(t)
            t = windows.of(t)[1]
    listed = {pi for _, pi in pool_sums} | {pi for _, pi, _, _ in party}
    listed |= {i for i, p in enumerate(pools) if p["steps"]}
    pools_out = []
    for w in sorted(window_starts):
        w_end = windows.of(w)[1]
        for pi in sorted(listed):
            row = _pool_row(pools[pi], pool_sums.get((w, pi), {}), (w, w_end), span,
                            revenue.get((w, pi), Decimal(0)), decimals)  # fmt: skip
            pools_out.append({**window_head(w), **row})

    read = {name: tables.get(name, []) for name in READ_TABLES}
    return {
        "pools": pools_out,
        "tenants": tenants_out,
        "jobs": jobs_out,
        "input": {
            "files": files,
            "rows": sum(len(rows) for rows in read.values()),
            "rows_skipped": sum(duplicates(read[name], name) for name in TABLES),
            "files_quarantined": 0,
            # the generated datasets hold no value outside the valid ranges; the screen is
            # tested on its own (test_bad_data)
            "rows_out_of_range": {},
            "reconciliation": reconciliation,
        },
    }


def _pool_row(
    pool: PoolInfo,
    s: dict[str, int],
    window: tuple[int, int],
    span: tuple[int, int] | None,
    revenue_dec: Decimal,
    decimals: int,
) -> dict[str, Any]:
    monitored, alloc_us, busy_us = s.get("capacity", 0), s.get("allocated", 0), s.get("busy", 0)
    energy_mj, gap_us, readings = s.get("energy", 0), s.get("gap", 0), s.get("readings", 0)
    capacity = monitored
    if pool["steps"]:
        a, b = window
        if span is not None:
            a, b = max(a, span[0]), min(b, span[1])
        capacity = declared_us(pool, a, b) if b > a else 0
    with localcontext() as ctx:
        ctx.prec = 60
        kwh = Decimal(energy_mj) / MJ_PER_KWH
        pue = dec(pool["pue"]) if pool["pue"] is not None else Decimal(1)
        energy_cost = None
        if pool["energy_price"] is not None and readings:
            energy_cost = kwh * pue * dec(pool["energy_price"])
        cost_exact = Decimal(capacity) * dec(pool["cost"]) / US_PER_HOUR + (energy_cost or 0)
        idle = Decimal(0)  # no capacity: none idle
        if capacity:
            idle = cost_exact * max(Decimal(0), 1 - Decimal(alloc_us) / Decimal(capacity))
        unit_cost = None
        if alloc_us:
            unit_cost = money(cost_exact * US_PER_HOUR / Decimal(alloc_us), decimals)
    emissions = None
    if pool["gco2"] is not None and readings:
        pue_f = Fraction(Decimal(repr(pool["pue"]))) if pool["pue"] is not None else 1
        emissions = float(
            Fraction(energy_mj, MJ_PER_KWH) * pue_f * Fraction(Decimal(repr(pool["gco2"]))) / 1000
        )
    cost = money(cost_exact, decimals)
    revenue = float(revenue_dec) + 0.0
    allocated = alloc_us / US_PER_HOUR
    return {
        "pool": pool["name"],
        "kind": pool["kind"],
        "ownership": pool["ownership"],
        "capacity_unit_hours": capacity / US_PER_HOUR,
        "monitored_unit_hours": monitored / US_PER_HOUR,
        "unmonitored_unit_hours": max(0, capacity - monitored) / US_PER_HOUR,
        "allocated_unit_hours": allocated,
        "busy_unit_hours": busy_us / US_PER_HOUR,
        "allocation_ratio": _ratio(alloc_us, capacity),
        "busy_ratio": _ratio(busy_us, monitored),
        # none measured in the window is unknown, not zero
        "energy_kwh": energy_mj / MJ_PER_KWH if readings else None,
        "energy_cost": None if energy_cost is None else money(energy_cost, decimals),
        "emissions_kg": emissions,
        "cost": cost,
        "revenue": revenue,
        "unit_cost": unit_cost,
        "gross_margin_ratio": _ratio(revenue - cost, revenue),
        "idle_cost": money(idle, decimals),
        "gap_hours": gap_us / US_PER_HOUR,
    }
