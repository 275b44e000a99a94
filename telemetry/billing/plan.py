"""``tally plan`` (SPEC §10): which tenants belong on owned capacity, and how much to own.

Everything comes from the bill engine run with one-hour windows: a tenant's demand in an hour is
its allocated unit-hours in that hour's bill (a unit-hour per hour is one unit), summed over the
kind's owned and leased pools; an hour without a bill line is 0. The analysis is polars
expressions over those rows: the demand series, inverted-CDF quantiles, coefficients of
variation, the hour-by-hour placement and the capacity plan. Four tables come out — ownership,
tenants, placement, capacity — as DataFrames, JSON and a table for people.

One cost model for the what-ifs: owned capacity costs c_o per unit-hour whether used or not,
leased capacity c_l per unit-hour used, on demand, with no minimum term. c_o and c_l are the
kind's pools' ``cost_per_unit_hour`` weighted by their capacity over the range (energy, which
follows use rather than ownership, is left out of both). The bill's real cost, energy included,
is in the ownership table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from telemetry.billing.accounting import Record
from telemetry.billing.bill import finish_bill, with_timezone
from telemetry.billing.engine import BILL_COLUMNS, Bill, Biller
from telemetry.billing.inventory import Inventory
from telemetry.billing.period import selected_range
from telemetry.billing.windows import Windows
from telemetry.billing.writers import _render
from telemetry.progress import Progress
from telemetry.store.dataset import DEFAULT_BUDGET_ROWS, scan

log = logging.getLogger("tally.plan")

HOUR_SECONDS = 3600
DEFAULT_STABLE_CV = 0.25
SECTIONS = ("ownership", "tenants", "placement", "capacity")
KINDS = ("gpu", "cpu")  # GPU first: it carries the money
OWNERSHIPS = ("own", "leased")
# n·q is rounded to this many decimals before its ceiling is taken: 30 × 0.1 is 3, not the
# 3.0000000000000004 binary floats make of it.
_INDEX_DECIMALS = 9

_F = pl.Float64
OWNERSHIP_SCHEMA: dict[str, Any] = {
    "kind": pl.String, "ownership": pl.String, "capacity_unit_hours": _F,
    "allocated_unit_hours": _F, "busy_unit_hours": _F, "allocation_ratio": _F, "revenue": _F,
    "revenue_share": _F, "cost": _F, "unit_cost": _F, "gross_margin_ratio": _F,
}  # fmt: skip
TENANT_SCHEMA: dict[str, Any] = {
    "kind": pl.String, "tenant": pl.String, "mean_units": _F, "p10_units": _F,
    "p90_units": _F, "cv": _F, "stable": pl.Boolean,
}  # fmt: skip
PLACEMENT_SCHEMA: dict[str, Any] = {
    "kind": pl.String, "own_allocation_ratio_actual": _F, "own_allocation_ratio_planned": _F,
    "leased_unit_hours_actual": _F, "leased_unit_hours_planned": _F, "cost_actual": _F,
    "cost_planned": _F, "note": pl.String,
}  # fmt: skip
CAPACITY_SCHEMA: dict[str, Any] = {
    "kind": pl.String, "owned_units_now": _F, "owned_units_optimal": _F, "cost_now": _F,
    "cost_optimal": _F, "saving": _F, "note": pl.String,
}  # fmt: skip
SCHEMAS = {
    "ownership": OWNERSHIP_SCHEMA,
    "tenants": TENANT_SCHEMA,
    "placement": PLACEMENT_SCHEMA,
    "capacity": CAPACITY_SCHEMA,
}


@dataclass
class Plan:
    """The four SPEC §10 tables, and what the report draws beside them.

    ``hourly`` holds per (kind, hour): ``window_start``, ``demand_units`` (D_t) and
    ``owned_units`` (owned capacity that hour); ``split`` per (kind, tenant, hour) the tenant's
    demand and the planned ``owned_units``/``leased_units``; ``rates`` per kind c_o, c_l and the
    hours T. ``notes`` are the lines a person should read (also in the rows' ``note``).
    """

    ownership: pl.DataFrame
    tenants: pl.DataFrame
    placement: pl.DataFrame
    capacity: pl.DataFrame
    hourly: pl.DataFrame
    split: pl.DataFrame
    rates: pl.DataFrame
    currency: str = ""
    timezone: str = "UTC"
    currency_decimals: int = 2
    stable_cv: float = DEFAULT_STABLE_CV
    notes: list[str] = field(default_factory=list)

    def frames(self) -> dict[str, pl.DataFrame]:
        """The JSON's four tables as DataFrames."""
        return {name: getattr(self, name) for name in SECTIONS}


# ------------------------------------------------------------------------------- computing


def compute_plan(
    root: Path,
    inventory: Inventory,
    start: str | None = None,
    end: str | None = None,
    *,
    stable_cv: float = DEFAULT_STABLE_CV,
    accounting: list[Record] | None = None,
    timezone: str | None = None,
    budget_rows: int = DEFAULT_BUDGET_ROWS,
    progress: Callable[[int, int, int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
    workers: int | None = 1,
    cluster: Any = None,
) -> Plan:
    """The plan of the dataset at ``root`` over [start, end); raises ``TallyError`` for unusable
    input, as ``tally bill`` does. One scan feeds an hourly bill engine — in partitions on a
    process pool or Dask (``workers``, ``cluster``: SPEC §9) where asked, the same numbers."""
    inventory = with_timezone(inventory, timezone)
    lo, hi = selected_range(start, end, inventory.timezone)

    def fresh() -> list[Biller]:
        return [Biller(inventory, Windows(HOUR_SECONDS, inventory.timezone), lo, hi)]

    with Progress("planning") as bar:
        done = None
        if workers != 1 or cluster is not None:
            from telemetry.billing.partitioned import run_partitions

            done = run_partitions(
                root, inventory, HOUR_SECONDS, lo, hi, budget_rows, progress or bar, warn,
                "numpy", workers, cluster,
            )  # fmt: skip
        if done is not None:
            biller, stats, _ = done
        else:
            consumers, stats = scan(root, fresh, budget_rows, progress or bar, warn, BILL_COLUMNS)
            (only,) = consumers
            assert isinstance(only, Biller)
            biller = only
    hourly = finish_bill(biller, stats, warn, accounting)
    whole = biller.bill(dict(hourly.input), whole=True, accounting=accounting)
    return plan_of(hourly, whole, inventory, stable_cv)


def inverted_cdf(column: str | pl.Expr, q: float | pl.Expr) -> pl.Expr:
    """The inverted-CDF quantile (Hyndman–Fan type 1) of ``column`` at ``q``: its
    ⌈n·q⌉-th smallest value (the smallest when n·q ≤ 1), an observed value, never
    interpolated. In a group_by it is per group; ``q`` may be an expression (its first value)."""
    values = pl.col(column) if isinstance(column, str) else column
    level = q.first() if isinstance(q, pl.Expr) else pl.lit(q)
    rank = (pl.len() * level).round(_INDEX_DECIMALS).ceil().cast(pl.Int64)
    return values.sort().get((rank - 1).clip(lower_bound=0))


def plan_of(hourly: Bill, whole: Bill, inventory: Inventory, stable_cv: float) -> Plan:
    """The plan from an hourly bill and the same range as one window (``whole``)."""
    decimals = inventory.currency_decimals
    meta = pl.DataFrame(
        [
            {"pool": p.name, "kind": p.kind, "ownership": p.ownership,
             "rate": float(p.cost_per_unit_hour)}
            for p in inventory.pools
        ],
        schema={"pool": pl.String, "kind": pl.String, "ownership": pl.String, "rate": _F},
    )  # fmt: skip
    pool_columns = {"window_start": pl.String, "pool": pl.String, "kind": pl.String,
                    "capacity_unit_hours": _F, "allocated_unit_hours": _F,
                    "busy_unit_hours": _F, "cost": _F, "revenue": _F}  # fmt: skip
    pools_h = _frame(hourly.pools, pool_columns)
    tenants_h = _frame(
        hourly.tenants,
        {"window_start": pl.String, "pool": pl.String, "tenant": pl.String,
         "allocated_unit_hours": _F},
    )  # fmt: skip
    # Every pool is in every window of the bill: its windows are the hours of the range, in
    # order (ISO strings do not sort across a change of UTC offset).
    hours = (
        pools_h.select("window_start")
        .unique(maintain_order=True)
        .with_row_index("hour")
        .with_columns(pl.col("hour").cast(pl.Int64))
    )
    # a kind with pools, or with samples on nodes of no pool (an unassigned pool that holds
    # something): not a kind the inventory never names and the dataset never shows
    seen = pools_h.filter(
        (pl.col("capacity_unit_hours") > 0) | (pl.col("allocated_unit_hours") > 0)
    )
    kinds = [k for k in KINDS if k in set(meta["kind"]) | set(seen["kind"])]
    kind_frame = pl.DataFrame({"kind": kinds}, schema={"kind": pl.String})
    kind_order = {k: i for i, k in enumerate(KINDS)}
    notes: dict[str, list[str]] = {k: [] for k in kinds}
    general: list[str] = []

    pools_h = pools_h.join(hours, on="window_start", maintain_order="left").join(
        meta.drop("kind"), on="pool", how="left", maintain_order="left"
    )
    stray = pools_h.filter(pl.col("ownership").is_null() & (pl.col("allocated_unit_hours") > 0))
    for kind, hours_off in (
        stray.group_by("kind", maintain_order=True).agg(pl.col("allocated_unit_hours").sum()).rows()
    ):
        general.append(
            f"{hours_off:,.2f} {kind} unit-hours were allocated on nodes of no pool "
            "(pool unassigned): left out of the plan; add their nodes to a pool"
        )
    planned_pools = pools_h.filter(pl.col("ownership").is_in(OWNERSHIPS))

    # Demand: per (kind, tenant, hour) over owned and leased pools, a missing hour = 0.
    demand_rows = (
        tenants_h.join(hours, on="window_start", maintain_order="left")
        .join(meta.filter(pl.col("ownership").is_in(OWNERSHIPS)), on="pool")
        .group_by("kind", "tenant", "hour", maintain_order=True)
        .agg(pl.col("allocated_unit_hours").sum().alias("demand"))
    )
    present = demand_rows.group_by("kind", "tenant", maintain_order=True).agg(
        pl.col("demand").sum().alias("total")
    )
    demand = (
        present.filter(pl.col("total") > 0)
        .select("kind", "tenant")
        .join(hours.select("hour"), how="cross")
        .join(demand_rows, on=["kind", "tenant", "hour"], how="left", maintain_order="left")
        .with_columns(pl.col("demand").fill_null(0.0))
    )
    tenants = _profiles(demand, stable_cv)

    # Per (kind, hour): total demand D_t and owned capacity C_t.
    own_h = (
        planned_pools.filter(pl.col("ownership") == "own")
        .group_by("kind", "hour", maintain_order=True)
        .agg(pl.col("capacity_unit_hours").sum().alias("owned_units"),
             pl.col("allocated_unit_hours").sum().alias("own_allocated"))
    )  # fmt: skip
    leased_h = (
        planned_pools.filter(pl.col("ownership") == "leased")
        .group_by("kind", "hour", maintain_order=True)
        .agg(pl.col("allocated_unit_hours").sum().alias("leased_allocated"))
    )
    grid = kind_frame.join(hours, how="cross")
    hourly_frame = (
        grid.join(
            demand.group_by("kind", "hour", maintain_order=True).agg(
                pl.col("demand").sum().alias("demand_units")
            ),
            on=["kind", "hour"],
            how="left",
        )
        .join(own_h, on=["kind", "hour"], how="left", maintain_order="left")
        .join(leased_h, on=["kind", "hour"], how="left", maintain_order="left")
        .with_columns(
            pl.col("demand_units", "owned_units", "own_allocated", "leased_allocated").fill_null(
                0.0
            )
        )
        .sort(pl.col("kind").replace_strict(kind_order, return_dtype=pl.Int64), "hour")
    )

    rates = _rates(whole, meta, kind_frame, hours.height)
    split = _placement_split(demand, tenants, hourly_frame)
    ownership = _ownership(whole, meta, kinds, decimals)
    if hours.height:
        placement = _placement(hourly_frame, split, rates, meta, notes, decimals)
        capacity = _capacity(hourly_frame, rates, meta, notes, decimals)
    else:
        why = "no hour in the range: nothing to plan"
        general.append(why)
        empty = {"kind": kinds, "note": [why] * len(kinds)}
        placement = pl.DataFrame(empty).select(
            pl.col(c).cast(t) if c in empty else pl.lit(None, t).alias(c)
            for c, t in PLACEMENT_SCHEMA.items()
        )
        capacity = pl.DataFrame(empty).select(
            pl.col(c).cast(t) if c in empty else pl.lit(None, t).alias(c)
            for c, t in CAPACITY_SCHEMA.items()
        )
    by_kind = pl.col("kind").replace_strict(kind_order, return_dtype=pl.Int64)
    placement, capacity = placement.sort(by_kind), capacity.sort(by_kind)
    kind_notes = [f"{kind}: {note}" for kind in kinds for note in notes[kind]]
    return Plan(
        ownership=ownership,
        tenants=tenants,
        placement=placement,
        capacity=capacity,
        hourly=hourly_frame.select("kind", "hour", "window_start", "demand_units", "owned_units"),
        split=split,
        rates=rates,
        currency=hourly.currency,
        timezone=hourly.timezone,
        currency_decimals=decimals,
        stable_cv=stable_cv,
        notes=general + kind_notes,
    )


def _frame(rows: list[dict[str, Any]], schema: dict[str, Any]) -> pl.DataFrame:
    """Bill rows as a DataFrame of the ``schema`` columns (an empty bill gives an empty frame)."""
    return pl.DataFrame([{k: r[k] for k in schema} for r in rows], schema=schema)


def _profiles(demand: pl.DataFrame, stable_cv: float) -> pl.DataFrame:
    """Per (kind, tenant): mean, inverted-CDF p10 and p90 of the hourly units, CV (population
    standard deviation / mean) and ``stable`` (CV ≤ ``stable_cv``)."""
    stats = demand.group_by("kind", "tenant", maintain_order=True).agg(
        pl.col("demand").mean().alias("mean_units"),
        inverted_cdf("demand", 0.1).alias("p10_units"),
        inverted_cdf("demand", 0.9).alias("p90_units"),
        pl.col("demand").std(ddof=0).alias("std"),
    )
    order = {k: i for i, k in enumerate(KINDS)}
    return (
        stats.with_columns(
            pl.when(pl.col("mean_units") > 0)
            .then(pl.col("std") / pl.col("mean_units"))
            .otherwise(None)
            .alias("cv")
        )
        .with_columns((pl.col("cv") <= stable_cv).fill_null(False).alias("stable"))
        .sort(
            pl.col("kind").replace_strict(order, return_dtype=pl.Int64),
            pl.col("stable"),
            pl.col("p10_units"),
            pl.col("mean_units"),
            pl.col("tenant"),
            descending=[False, True, True, True, False],
        )
        .select(list(TENANT_SCHEMA))
        .cast(pl.Schema(TENANT_SCHEMA))
    )


def _placement_split(
    demand: pl.DataFrame, tenants: pl.DataFrame, hourly: pl.DataFrame
) -> pl.DataFrame:
    """Hour by hour, owned capacity filled with tenants' demand: stable tenants first, then by
    baseline (p10), largest first (then by name); a tenant's demand is split where owned
    capacity runs out."""
    return (
        demand.join(
            tenants.select("kind", "tenant", "stable", "p10_units"),
            on=["kind", "tenant"],
            maintain_order="left",
        )
        .join(
            hourly.select("kind", "hour", "owned_units"), on=["kind", "hour"], maintain_order="left"
        )
        .sort(
            ["kind", "hour", "stable", "p10_units", "tenant"],
            descending=[False, False, True, True, False],
        )
        .with_columns(
            (pl.col("demand").cum_sum().over("kind", "hour") - pl.col("demand")).alias("before")
        )
        .with_columns(
            pl.min_horizontal(
                pl.col("demand"), (pl.col("owned_units") - pl.col("before")).clip(lower_bound=0.0)
            ).alias("planned_owned")
        )
        .select(
            "kind",
            "tenant",
            "hour",
            "demand",
            pl.col("planned_owned").alias("owned_units"),
            (pl.col("demand") - pl.col("planned_owned")).alias("leased_units"),
        )
    )


def _rates(whole: Bill, meta: pl.DataFrame, kinds: pl.DataFrame, hours: int) -> pl.DataFrame:
    """Per kind: c_o and c_l, the pools' cost_per_unit_hour weighted by their capacity over the
    range (a plain mean where the pools had no capacity), null without such pools; T hours."""
    capacity = _frame(whole.pools, {"pool": pl.String, "capacity_unit_hours": _F})
    per = (
        meta.filter(pl.col("ownership").is_in(OWNERSHIPS))
        .join(capacity, on="pool", how="left", maintain_order="left")
        .with_columns(pl.col("capacity_unit_hours").fill_null(0.0))
        .group_by("kind", "ownership", maintain_order=True)
        .agg(
            pl.when(pl.col("capacity_unit_hours").sum() > 0)
            .then((pl.col("rate") * pl.col("capacity_unit_hours")).sum()
                  / pl.col("capacity_unit_hours").sum())
            .otherwise(pl.col("rate").mean())
            .alias("c")
        )
    )  # fmt: skip

    def of(ownership: str, name: str) -> pl.DataFrame:
        return per.filter(pl.col("ownership") == ownership).select("kind", pl.col("c").alias(name))

    return (
        kinds.join(of("own", "c_own"), on="kind", how="left", maintain_order="left")
        .join(of("leased", "c_leased"), on="kind", how="left", maintain_order="left")
        .with_columns(pl.lit(hours, pl.Int64).alias("hours"))
    )


def _ownership(whole: Bill, meta: pl.DataFrame, kinds: list[str], decimals: int) -> pl.DataFrame:
    """Per kind and ownership over the range: the bill's capacity, allocation, busy time, money."""
    pools = _frame(
        whole.pools,
        {"pool": pl.String, "capacity_unit_hours": _F, "allocated_unit_hours": _F,
         "busy_unit_hours": _F, "cost": _F, "revenue": _F},
    ).join(meta.select("pool", "kind", "ownership"), on="pool", maintain_order="left")  # fmt: skip
    sums = pools.group_by("kind", "ownership", maintain_order=True).agg(
        pl.col("capacity_unit_hours", "allocated_unit_hours", "busy_unit_hours").sum(),
        pl.col("revenue").sum().round(decimals),
        pl.col("cost").sum().round(decimals),
    )
    kind_order = {k: i for i, k in enumerate(kinds)}
    own_order = {o: i for i, o in enumerate(OWNERSHIPS)}
    return (
        sums.with_columns(
            _ratio(pl.col("allocated_unit_hours"), pl.col("capacity_unit_hours")).alias(
                "allocation_ratio"
            ),
            _ratio(pl.col("revenue"), pl.col("revenue").sum().over("kind")).alias("revenue_share"),
            _ratio(pl.col("cost"), pl.col("allocated_unit_hours")).alias("unit_cost"),
            _ratio(pl.col("revenue") - pl.col("cost"), pl.col("revenue")).alias(
                "gross_margin_ratio"
            ),
        )
        .sort(
            pl.col("kind").replace_strict(kind_order, return_dtype=pl.Int64),
            pl.col("ownership").replace_strict(own_order, return_dtype=pl.Int64),
        )
        .select(list(OWNERSHIP_SCHEMA))
        .cast(pl.Schema(OWNERSHIP_SCHEMA))
    )


def _ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    """num / den, null where den is 0 (SPEC §4)."""
    return pl.when(den != 0).then(num / den).otherwise(None)


def _placement(
    hourly: pl.DataFrame,
    split: pl.DataFrame,
    rates: pl.DataFrame,
    meta: pl.DataFrame,
    notes: dict[str, list[str]],
    decimals: int,
) -> pl.DataFrame:
    """Per kind: own allocation ratio, leased unit-hours and cost (owned capacity × c_o + leased
    unit-hours × c_l), as placed today and as the stable-first placement would place it."""
    planned = split.group_by("kind", maintain_order=True).agg(
        pl.col("owned_units").sum().alias("planned_owned"),
        pl.col("leased_units").sum().alias("planned_leased"),
    )
    totals = (
        hourly.group_by("kind", maintain_order=True)
        .agg(pl.col("owned_units", "own_allocated", "leased_allocated", "demand_units").sum())
        .join(planned, on="kind", how="left", maintain_order="left")
        .join(rates, on="kind", maintain_order="left")
        .with_columns(pl.col("planned_owned", "planned_leased").fill_null(0.0))
    )
    rows = []
    for t in totals.iter_rows(named=True):
        kind = t["kind"]
        has_own = _has(meta, kind, "own")
        has_leased = _has(meta, kind, "leased")
        why = []
        if t["demand_units"] == 0:
            why.append(_no_demand(kind))
        if not has_own:
            why.append(_no_pool(kind, "own"))
        if not has_leased:
            why.append(_no_pool(kind, "leased"))
        owned_cost = t["c_own"] * t["owned_units"] if has_own else 0.0
        c_leased = t["c_leased"] if has_leased else None
        rows.append(
            {
                "kind": kind,
                "own_allocation_ratio_actual": _div(t["own_allocated"], t["owned_units"]),
                "own_allocation_ratio_planned": _div(t["planned_owned"], t["owned_units"]),
                "leased_unit_hours_actual": t["leased_allocated"],
                "leased_unit_hours_planned": t["planned_leased"],
                "cost_actual": _money(owned_cost, c_leased, t["leased_allocated"], decimals),
                "cost_planned": _money(owned_cost, c_leased, t["planned_leased"], decimals),
                "note": "; ".join(why) or None,
            }
        )
        notes[kind].extend(why)
    return pl.DataFrame(rows, schema=PLACEMENT_SCHEMA)


def _capacity(
    hourly: pl.DataFrame,
    rates: pl.DataFrame,
    meta: pl.DataFrame,
    notes: dict[str, list[str]],
    decimals: int,
) -> pl.DataFrame:
    """Per kind: C* = the (1 − c_o/c_l) inverted-CDF quantile of hourly demand (0 where c_o ≥
    c_l), today's owned units (owned capacity-hours / T), cost(C) = c_o·C·T + c_l·Σ max(D_t − C,
    0) of each and the saving."""
    # null without an owned or leased cost: such kinds get no C* (see the notes below)
    level = (
        pl.when(pl.col("c_leased") > 0)
        .then(1 - pl.col("c_own") / pl.col("c_leased"))
        .otherwise(0.0)
        .fill_null(0.0)
    )
    per = (
        hourly.join(rates, on="kind", maintain_order="left")
        .group_by("kind", maintain_order=True)
        .agg(
            pl.len().alias("hours"),
            pl.col("demand_units").sum().alias("demand"),
            pl.col("owned_units").sum().alias("owned_hours"),
            pl.col("c_own").first(),
            pl.col("c_leased").first(),
            inverted_cdf("demand_units", level).alias("q"),
            level.first().alias("level"),
        )
        .with_columns(
            pl.when(pl.col("level") <= 0).then(0.0).otherwise(pl.col("q")).alias("optimal"),
            (pl.col("owned_hours") / pl.col("hours")).alias("now"),
        )
    )
    costs = (
        hourly.join(
            per.select("kind", "now", "optimal", "c_own", "c_leased"),
            on="kind",
            maintain_order="left",
        )
        .group_by("kind", maintain_order=True)
        .agg(_cost_expr("now").alias("cost_now"), _cost_expr("optimal").alias("cost_optimal"))
    )
    rows = []
    for t in per.join(costs, on="kind", maintain_order="left").iter_rows(named=True):
        kind = t["kind"]
        why = []
        usable = True
        for ownership in OWNERSHIPS:
            if not _has(meta, kind, ownership):
                why.append(_no_pool(kind, ownership))
                usable = False
        if t["demand"] == 0:
            why.append(_no_demand(kind))
            usable = False
        elif usable and t["c_own"] >= t["c_leased"]:
            why.append(
                f"owned {kind} capacity costs at least what leased does "
                f"({t['c_own']:g} ≥ {t['c_leased']:g} per unit-hour): owning none is cheapest"
            )
        now = t["now"] if _has(meta, kind, "own") else 0.0
        cost_now: float | None = round(t["cost_now"], decimals) if usable else None
        cost_optimal: float | None = round(t["cost_optimal"], decimals) if usable else None
        rows.append(
            {
                "kind": kind,
                "owned_units_now": now,
                "owned_units_optimal": t["optimal"] if usable else None,
                "cost_now": cost_now,
                "cost_optimal": cost_optimal,
                "saving": (
                    round(cost_now - cost_optimal, decimals)
                    if cost_now is not None and cost_optimal is not None
                    else None
                ),
                "note": "; ".join(why) or None,
            }
        )
        notes[kind].extend(w for w in why if w not in notes[kind])
    return pl.DataFrame(rows, schema=CAPACITY_SCHEMA)


def _cost_expr(capacity: str) -> pl.Expr:
    """cost(C) = c_o·C·T + c_l·Σ_t max(D_t − C, 0) over a kind's hours, C the column
    ``capacity``."""
    c = pl.col(capacity).first()
    owned = pl.col("c_own").first() * c * pl.len()
    leased = pl.col("c_leased").first() * (pl.col("demand_units") - c).clip(lower_bound=0.0).sum()
    return owned + leased


def _no_demand(kind: str) -> str:
    return f"no {kind} allocation in the range: no demand to plan for"


def _no_pool(kind: str, ownership: str) -> str:
    """Why a kind without owned or leased pools has no costs or capacity plan."""
    if ownership == "own":
        return f"no owned {kind} pool: no owned cost per unit-hour (everything is leased)"
    return f"no leased {kind} pool: no leased cost per unit-hour to weigh owning against"


def _money(owned: float, c_leased: float | None, leased: float, decimals: int) -> float | None:
    """Owned capacity cost + leased unit-hours × c_l, rounded; None without a leased cost."""
    return None if c_leased is None else round(owned + c_leased * leased, decimals)


def _has(meta: pl.DataFrame, kind: str, ownership: str) -> bool:
    return meta.filter((pl.col("kind") == kind) & (pl.col("ownership") == ownership)).height > 0


def _div(num: float, den: float) -> float | None:
    return num / den if den else None


# ------------------------------------------------------------------------------- writing


def to_json(plan: Plan) -> bytes:
    """One object: ``currency`` and the four SPEC §10 tables as lists of rows."""
    body: dict[str, Any] = {"currency": plan.currency}
    body.update({name: frame.to_dicts() for name, frame in plan.frames().items()})
    return (json.dumps(body, indent=1, allow_nan=False, ensure_ascii=False) + "\n").encode()


def to_table(plan: Plan) -> str:
    """The four tables for people, with each note on a line of its own."""
    d = plan.currency_decimals
    cur = plan.currency

    def money(value: float | None) -> str:
        return "-" if value is None else f"{value:,.{d}f} {cur}".strip()

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value * 100:.1f}%"

    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    ownership = [
        [r["kind"], r["ownership"], num(r["capacity_unit_hours"]), num(r["allocated_unit_hours"]),
         num(r["busy_unit_hours"]), pct(r["allocation_ratio"]), money(r["revenue"]),
         pct(r["revenue_share"]), money(r["cost"]), money(r["unit_cost"]),
         pct(r["gross_margin_ratio"])]
        for r in plan.ownership.iter_rows(named=True)
    ]  # fmt: skip
    tenants = [
        [r["kind"], r["tenant"], num(r["mean_units"], 2), num(r["p10_units"], 2),
         num(r["p90_units"], 2), num(r["cv"], 2), "yes" if r["stable"] else "no"]
        for r in plan.tenants.iter_rows(named=True)
    ]  # fmt: skip
    placement = [
        [r["kind"], pct(r["own_allocation_ratio_actual"]), pct(r["own_allocation_ratio_planned"]),
         num(r["leased_unit_hours_actual"]), num(r["leased_unit_hours_planned"]),
         money(r["cost_actual"]), money(r["cost_planned"])]
        for r in plan.placement.iter_rows(named=True)
    ]  # fmt: skip
    capacity = [
        [r["kind"], num(r["owned_units_now"], 2), num(r["owned_units_optimal"], 2),
         money(r["cost_now"]), money(r["cost_optimal"]), money(r["saving"])]
        for r in plan.capacity.iter_rows(named=True)
    ]  # fmt: skip
    rates = [
        f"{r['kind']}: c_o {num(r['c_own'], 4)}, c_l {num(r['c_leased'], 4)} per unit-hour, "
        f"{r['hours']} hours"
        for r in plan.rates.iter_rows(named=True)
    ]
    lines = [
        f"OWN VS LEASED (money in {cur or 'the inventory currency'})",
        *_render(
            [("kind", -4), ("ownership", -9), ("capacity h", 11), ("alloc h", 10),
             ("busy h", 10), ("alloc", 6), ("revenue", 15), ("share", 6), ("cost", 15),
             ("unit cost", 11), ("margin", 7)],
            ownership,
        ),
        "",
        f"TENANTS (hourly allocated units; stable = CV <= {plan.stable_cv:g}; "
        "quantiles are inverted-CDF)",
        *_render(
            [("kind", -4), ("tenant", -20), ("mean", 9), ("p10", 9), ("p90", 9), ("cv", 6),
             ("stable", 6)],
            tenants,
        ),
        "",
        "PLACEMENT (stable tenants first into owned capacity, hour by hour; "
        "cost = owned capacity x c_o + leased unit-hours x c_l)",
        *_render(
            [("kind", -4), ("own alloc now", 13), ("planned", 8), ("leased h now", 12),
             ("planned", 10), ("cost now", 15), ("cost planned", 15)],
            placement,
        ),
        "",
        "CAPACITY (owned units minimising c_o*C*T + c_l*sum max(D_t - C, 0))",
        *_render(
            [("kind", -4), ("owned now", 10), ("optimal", 10), ("cost now", 15),
             ("cost optimal", 15), ("saving", 15)],
            capacity,
        ),
        "",
        *rates,
    ]  # fmt: skip
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines) + "\n"
