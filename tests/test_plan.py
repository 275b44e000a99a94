"""``tally plan`` (SPEC §10) and the notebook API (``tally.scan``, ``tally.bill``, ``tally.plan``).

The dataset is built with known hourly demand per tenant — a constant tenant, a day/night tenant
and a bursty one — and every number of the plan is checked against a plain-Python computation
from that demand and the inventory, never from the engine: Fractions for the quantile ranks,
``statistics.pstdev`` for the CV, a brute-force search for the cheapest owned capacity and a
hand-written loop for the placement.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from fractions import Fraction
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tally
from telemetry.billing.inventory import parse_inventory
from telemetry.billing.plan import Plan, compute_plan, inverted_cdf, to_json, to_table
from telemetry.billing.report import collect_report
from telemetry.billing.report_html import render_report
from telemetry.errors import TallyError
from telemetry.schema import SCHEMAS
from telemetry.store.layout import partition_dir
from tests.support.bill_rows import HOUR, T0, Layout, Tables, iso, job_row, write_tables
from tests.support.cli import tally as run_tally
from tests.support.units import NS

HOURS = 24
STEADY = [4.0] * HOURS  # CV 0: stable
DAYNIGHT_OWN = [1.0] * HOURS  # the day/night tenant's small job on the second owned pool
DAYNIGHT_LEASED = [5.0 if 8 <= h < 20 else 1.0 for h in range(HOURS)]
# 0 in most hours: those hours have no bill line at all (a missing hour is 0)
BURSTY = [10.0 if h in (3, 11, 17) else 2.5 if h == 20 else 0.0 for h in range(HOURS)]
JOBS = (  # tenant, node, job, units per hour
    ("steady", "own-a1", "j-steady", STEADY),
    ("daynight", "own-b1", "j-dn-own", DAYNIGHT_OWN),
    ("daynight", "lsd-1", "j-dn-leased", DAYNIGHT_LEASED),
    ("bursty", "lsd-2", "j-burst", BURSTY),
)
DEMAND = {  # tenant -> hourly GPUs, as built (the expectation, not read back)
    "steady": STEADY,
    "daynight": [a + b for a, b in zip(DAYNIGHT_OWN, DAYNIGHT_LEASED, strict=True)],
    "bursty": BURSTY,
}
OWN_POOLS = ((6, Fraction("2.0")), (3, Fraction("2.6")))  # (declared units, cost per unit-hour)
LEASED_UNITS, LEASED_COST = 20, Fraction("3.5")
PRICE_OWN, PRICE_LEASED = Fraction(4), Fraction("4.5")

INVENTORY = """
max_gap_seconds = 120
currency = "EUR"
[[pool]]
name = "own-a"
kind = "gpu"
ownership = "own"
nodes = ["own-a*"]
cost_per_unit_hour = 2.0
price_per_unit_hour = 4.0
capacity_units = 6
[[pool]]
name = "own-b"
kind = "gpu"
ownership = "own"
nodes = ["own-b*"]
cost_per_unit_hour = 2.6
price_per_unit_hour = 4.0
capacity_units = 3
{leased}
"""
LEASED = """
[[pool]]
name = "leased"
kind = "gpu"
ownership = "leased"
nodes = ["lsd-*"]
cost_per_unit_hour = {cost}
price_per_unit_hour = 4.5
capacity_units = 20
"""
START, END = iso(T0), iso(T0 + HOURS * HOUR)
OWNERSHIP_FIELDS = ["kind", "ownership", "capacity_unit_hours", "allocated_unit_hours",
                    "busy_unit_hours", "allocation_ratio", "revenue", "revenue_share", "cost",
                    "unit_cost", "gross_margin_ratio"]  # fmt: skip
TENANT_FIELDS = ["kind", "tenant", "mean_units", "p10_units", "p90_units", "cv", "stable"]
PLACEMENT_FIELDS = ["kind", "own_allocation_ratio_actual", "own_allocation_ratio_planned",
                    "leased_unit_hours_actual", "leased_unit_hours_planned", "cost_actual",
                    "cost_planned", "note"]  # fmt: skip
CAPACITY_FIELDS = ["kind", "owned_units_now", "owned_units_optimal", "cost_now", "cost_optimal",
                   "saving", "note"]  # fmt: skip


def inventory_text(leased_cost: str | None = "3.5") -> str:
    leased = "" if leased_cost is None else LEASED.format(cost=leased_cost)
    return INVENTORY.format(leased=leased)


def demand_rows() -> Tables:
    """Job rows every 60 s: the row at t carries the units of the hour holding t, so each hour's
    allocation is exactly its units × 1 h (a row a minute before the range opens each series)."""
    rows = []
    for tenant, node, job, units in JOBS:
        times = [T0 - 60 * NS] + [T0 + h * HOUR + k * 60 * NS for h in range(HOURS)
                                  for k in range(60)]  # fmt: skip
        for t in times:
            hour = max(0, (t - T0) // HOUR)
            rows.append(job_row(t, node, job, "u", tenant, 0.0, units[hour], 0.0))
    return {"job": rows}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("plan")
    root = base / "data"
    write_tables(root, demand_rows(), Layout(seed=5, files_per_partition=2))
    inventory = base / "inventory.toml"
    inventory.write_text(inventory_text())
    return root, inventory


def plan_of(root: Path, text: str, **kw: Any) -> Plan:
    kw.setdefault("start", START)
    kw.setdefault("end", END)
    return compute_plan(root, parse_inventory(text), warn=lambda _: None, **kw)


# ------------------------------------------------------------------- plain-Python expectations


def rank_quantile(values: list[float], q: Fraction) -> float:
    """Inverted CDF: the ⌈n·q⌉-th smallest (the smallest where that is < 1)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * q)) - 1]


def hourly_total() -> list[float]:
    return [sum(DEMAND[t][h] for t in DEMAND) for h in range(HOURS)]


def rates() -> tuple[Fraction, Fraction]:
    units = sum(u for u, _ in OWN_POOLS)
    return sum(u * c for u, c in OWN_POOLS) / units, LEASED_COST


def cost_of(capacity: float, c_own: Fraction, c_leased: Fraction) -> float:
    d = hourly_total()
    return float(c_own * Fraction(capacity) * HOURS
                 + c_leased * sum(Fraction(max(x - capacity, 0.0)) for x in d))  # fmt: skip


def hand_placement(owned: float) -> dict[str, list[float]]:
    """Hour by hour: stable tenants first, then by p10 (largest first), then by name."""
    stats = {t: (cv(v) <= 0.25, rank_quantile(v, Fraction(1, 10))) for t, v in DEMAND.items()}
    order = sorted(DEMAND, key=lambda t: (not stats[t][0], -stats[t][1], t))
    placed = {t: [0.0] * HOURS for t in DEMAND}
    for h in range(HOURS):
        left = owned
        for tenant in order:
            take = min(DEMAND[tenant][h], left)
            placed[tenant][h] = take
            left -= take
    return placed


def cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


def close(a: float | None, b: float, rel: float = 1e-12) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


# ------------------------------------------------------------------- the quantile itself


def test_inverted_cdf_matches_the_definition_where_interpolated_quantiles_do_not() -> None:
    rng = random.Random(3)
    cases = [(list(range(1, 31)), Fraction(1, 10)), ([5.0, 1.0, 7.0, 3.0], Fraction(1, 2)),
             ([2.0], Fraction(9, 10)), ([4.0, 4.0, 9.0], Fraction(0))]  # fmt: skip
    cases += [([rng.choice([0.0, 1.5, 2.0, 7.25]) for _ in range(rng.randint(1, 40))],
               Fraction(rng.randint(0, 20), 20)) for _ in range(200)]  # fmt: skip
    for values, q in cases:
        got = pl.DataFrame({"x": values}).select(inverted_cdf("x", float(q))).item()
        assert got == rank_quantile(values, q), (values, q)
    # polars' own "lower" picks the floor((n − 1)·q)-th: not the inverted CDF (1..10 at 0.95:
    # lower gives 9, the inverted CDF 10)
    lower = pl.Series(list(range(1, 11))).quantile(0.95, interpolation="lower")
    assert lower == 9 and rank_quantile(list(range(1, 11)), Fraction(95, 100)) == 10


# ------------------------------------------------------------------- the four tables


def test_tenant_profiles_are_the_hourly_demand_statistics(dataset: tuple[Path, Path]) -> None:
    root, _ = dataset
    plan = plan_of(root, inventory_text())
    rows = {r["tenant"]: r for r in plan.tenants.to_dicts()}
    assert set(rows) == set(DEMAND)
    for tenant, values in DEMAND.items():
        row = rows[tenant]
        assert row["kind"] == "gpu"
        assert close(row["mean_units"], statistics.fmean(values)), tenant
        assert row["p10_units"] == rank_quantile(values, Fraction(1, 10)), tenant
        assert row["p90_units"] == rank_quantile(values, Fraction(9, 10)), tenant
        assert close(row["cv"], cv(values)), tenant
        assert row["stable"] is (cv(values) <= 0.25), tenant
    assert rows["steady"]["stable"] and rows["steady"]["cv"] == 0.0
    assert rows["bursty"]["p10_units"] == 0.0  # its empty hours count as 0, not as missing
    # stable first, then by baseline
    assert [r["tenant"] for r in plan.tenants.to_dicts()] == ["steady", "daynight", "bursty"]
    loose = plan_of(root, inventory_text(), stable_cv=0.6)
    assert {r["tenant"]: r["stable"] for r in loose.tenants.to_dicts()} == {
        "steady": True, "daynight": True, "bursty": False}  # fmt: skip


def test_hourly_demand_and_owned_capacity_per_hour(dataset: tuple[Path, Path]) -> None:
    root, _ = dataset
    hourly = plan_of(root, inventory_text()).hourly
    assert hourly["demand_units"].to_list() == hourly_total()
    assert hourly["owned_units"].to_list() == [9.0] * HOURS


def test_ownership_table_is_the_bill_per_ownership(dataset: tuple[Path, Path]) -> None:
    root, _ = dataset
    rows = plan_of(root, inventory_text()).ownership.to_dicts()
    assert [list(r) for r in rows] == [OWNERSHIP_FIELDS] * 2
    own, leased = rows
    own_alloc = sum(STEADY) + sum(DAYNIGHT_OWN)
    leased_alloc = sum(DAYNIGHT_LEASED) + sum(BURSTY)
    own_cost = float(sum(u * c for u, c in OWN_POOLS) * HOURS)
    leased_cost = float(LEASED_UNITS * LEASED_COST * HOURS)
    own_rev, leased_rev = float(own_alloc * PRICE_OWN), float(leased_alloc * PRICE_LEASED)
    assert (own["ownership"], leased["ownership"]) == ("own", "leased")
    assert own["capacity_unit_hours"] == 9 * HOURS
    assert leased["capacity_unit_hours"] == LEASED_UNITS * HOURS
    assert own["allocated_unit_hours"] == own_alloc
    assert leased["allocated_unit_hours"] == leased_alloc
    assert own["busy_unit_hours"] == 0.0  # no gpu rows: nothing was seen busy
    assert close(own["allocation_ratio"], own_alloc / (9 * HOURS))
    assert own["cost"] == round(own_cost, 2) and leased["cost"] == round(leased_cost, 2)
    assert own["revenue"] == round(own_rev, 2) and leased["revenue"] == round(leased_rev, 2)
    assert close(own["revenue_share"], own_rev / (own_rev + leased_rev))
    assert close(own["revenue_share"] + leased["revenue_share"], 1.0)
    assert close(own["unit_cost"], own_cost / own_alloc)
    assert close(leased["gross_margin_ratio"], (leased_rev - leased_cost) / leased_rev)


def test_capacity_plan_is_the_cost_minimum(dataset: tuple[Path, Path]) -> None:
    root, _ = dataset
    plan = plan_of(root, inventory_text())
    [row] = plan.capacity.to_dicts()
    assert list(row) == CAPACITY_FIELDS
    c_own, c_leased = rates()
    d = hourly_total()
    expected = rank_quantile(d, 1 - c_own / c_leased)
    assert row["owned_units_optimal"] == expected
    # brute force: cost(C) is piecewise linear with kinks at the demand values, so its minimum
    # over C >= 0 is at 0 or at one of them; a fine grid finds nothing cheaper either
    candidates = [0.0, *d, *(x / 8 for x in range(0, 8 * 25))]
    best = min(cost_of(c, c_own, c_leased) for c in candidates)
    assert math.isclose(cost_of(expected, c_own, c_leased), best, rel_tol=1e-12)
    assert row["owned_units_now"] == 9.0
    assert row["cost_optimal"] == round(cost_of(expected, c_own, c_leased), 2)
    assert row["cost_now"] == round(cost_of(9.0, c_own, c_leased), 2)
    assert close(row["saving"], row["cost_now"] - row["cost_optimal"])
    assert row["saving"] >= 0 and row["note"] is None
    [r] = plan.rates.to_dicts()
    assert close(r["c_own"], float(c_own)) and r["c_leased"] == 3.5 and r["hours"] == HOURS


def test_placement_fills_owned_capacity_with_stable_tenants_first(
    dataset: tuple[Path, Path],
) -> None:
    root, _ = dataset
    plan = plan_of(root, inventory_text())
    placed = hand_placement(9.0)
    split = plan.split.sort("tenant", "hour")
    for tenant, values in DEMAND.items():
        mine = split.filter(pl.col("tenant") == tenant)
        assert mine["owned_units"].to_list() == placed[tenant], tenant
        assert mine["leased_units"].to_list() == [
            d - o for d, o in zip(values, placed[tenant], strict=True)
        ], tenant
    [row] = plan.placement.to_dicts()
    assert list(row) == PLACEMENT_FIELDS
    c_own, c_leased = rates()
    owned_hours = 9.0 * HOURS
    planned_owned = sum(sum(v) for v in placed.values())
    planned_leased = sum(hourly_total()) - planned_owned
    actual_leased = sum(DAYNIGHT_LEASED) + sum(BURSTY)
    assert close(row["own_allocation_ratio_actual"], (sum(STEADY) + sum(DAYNIGHT_OWN)) / 216)
    assert close(row["own_allocation_ratio_planned"], planned_owned / owned_hours)
    assert row["leased_unit_hours_actual"] == actual_leased
    assert close(row["leased_unit_hours_planned"], planned_leased)
    owned_cost = float(c_own) * owned_hours
    assert row["cost_actual"] == round(owned_cost + float(c_leased) * actual_leased, 2)
    assert row["cost_planned"] == round(owned_cost + float(c_leased) * planned_leased, 2)
    # one cost model: the planned placement costs what the capacity plan says today's costs
    assert row["cost_planned"] == plan.capacity["cost_now"][0]


# ------------------------------------------------------------------- bad input


def test_a_range_without_demand_says_why_instead_of_a_number(dataset: tuple[Path, Path]) -> None:
    root, _ = dataset
    later = plan_of(root, inventory_text(), start=iso(T0 + 48 * HOUR), end=iso(T0 + 50 * HOUR))
    [cap] = later.capacity.to_dicts()
    assert cap["owned_units_optimal"] is None and cap["saving"] is None
    assert "no gpu allocation in the range" in cap["note"]
    assert later.tenants.height == 0
    assert "note: gpu: no gpu allocation in the range" in to_table(later)
    nothing = plan_of(root, inventory_text(), start=iso(T0 + 480 * HOUR), end=None)
    [place] = nothing.placement.to_dicts()
    assert (
        place["cost_planned"] is None and place["note"] == "no hour in the range: nothing to plan"
    )
    json.loads(to_json(nothing))  # valid JSON, nulls and all


def test_a_kind_without_leased_pools_has_no_capacity_plan(dataset: tuple[Path, Path]) -> None:
    root, _ = dataset
    plan = plan_of(root, inventory_text(leased_cost=None))
    [cap] = plan.capacity.to_dicts()
    [place] = plan.placement.to_dicts()
    assert cap["owned_units_optimal"] is None and cap["cost_now"] is None
    assert "no leased gpu pool" in cap["note"] and "no leased gpu pool" in place["note"]
    assert place["cost_actual"] is None
    # the leased nodes fall into no pool: their allocation is named, not silently lost
    table = to_table(plan)
    assert "note: gpu: no leased gpu pool" in table
    assert f"{sum(DAYNIGHT_LEASED) + sum(BURSTY):,.2f} gpu unit-hours were allocated on nodes " in (
        table
    )


def test_a_kind_without_owned_pools_has_no_capacity_plan(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rows = [r for r in demand_rows()["job"] if r["node"].startswith("lsd")]
    write_tables(root, {"job": rows}, Layout(seed=1, files_per_partition=1))
    plan = plan_of(root, "currency = 'EUR'\nmax_gap_seconds = 120\n" + LEASED.format(cost=3.5))
    [cap] = plan.capacity.to_dicts()
    [place] = plan.placement.to_dicts()
    assert cap["owned_units_optimal"] is None and "no owned gpu pool" in cap["note"]
    assert place["own_allocation_ratio_actual"] is None
    assert place["leased_unit_hours_planned"] == sum(DAYNIGHT_LEASED) + sum(BURSTY)


def test_owning_dearer_than_leasing_plans_zero_owned(dataset: tuple[Path, Path]) -> None:
    root, _ = dataset
    plan = plan_of(root, inventory_text(leased_cost="2.0"))
    [cap] = plan.capacity.to_dicts()
    assert cap["owned_units_optimal"] == 0.0  # SPEC §10: 0 if c_o >= c_l
    assert "owning none is cheapest" in cap["note"]
    assert cap["cost_optimal"] == round(2.0 * sum(hourly_total()), 2)
    assert "owning none is cheapest" in to_table(plan)


# ------------------------------------------------------------------- CLI and formats


def test_cli_json_shape_and_table(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, inv = dataset
    args = ["plan", str(root), "--inventory", str(inv), "--from", START, "--to", END]
    result = run_tally(*args)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert list(body) == ["currency", "ownership", "tenants", "placement", "capacity"]
    assert body["currency"] == "EUR"
    for section, fields in (
        ("ownership", OWNERSHIP_FIELDS),
        ("tenants", TENANT_FIELDS),
        ("placement", PLACEMENT_FIELDS),
        ("capacity", CAPACITY_FIELDS),
    ):
        assert body[section] and all(list(r) == fields for r in body[section]), section
    out = tmp_path / "plan.txt"
    table = run_tally(*args, "--format", "table", "--out", str(out))
    assert table.returncode == 0 and table.stdout == ""
    text = out.read_text()
    for heading in ("OWN VS LEASED", "TENANTS", "PLACEMENT", "CAPACITY"):
        assert heading in text
    assert "steady" in text and "EUR" in text
    bad = run_tally(*args, "--stable-cv", "-1")
    assert bad.returncode == 2 and "--stable-cv" in bad.stderr
    missing = run_tally("plan", str(tmp_path / "nowhere"), "--inventory", str(inv))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# ------------------------------------------------------------------- the notebook API


def test_api_plan_and_bill_equal_the_json(dataset: tuple[Path, Path]) -> None:
    root, inv = dataset
    frames = tally.plan(root, inv, start=START, end=END)
    body = json.loads(run_tally("plan", str(root), "--inventory", str(inv), "--from", START,
                                "--to", END).stdout)  # fmt: skip
    assert list(frames) == ["ownership", "tenants", "placement", "capacity"]
    for name, frame in frames.items():
        assert isinstance(frame, pl.DataFrame)
        assert frame.to_dicts() == body[name], name
    bill = tally.bill(str(root), str(inv), window="1d", start=START, end=END)
    billed = json.loads(run_tally("bill", str(root), "--inventory", str(inv), "--window", "1d",
                                  "--from", START, "--to", END).stdout)  # fmt: skip
    assert list(bill) == ["pools", "tenants", "jobs"]
    for name, frame in bill.items():
        assert frame.to_dicts() == billed[name], name


def test_api_scan_reads_every_row_with_the_schema(dataset: tuple[Path, Path]) -> None:
    root, _ = dataset
    frame = tally.scan(root, "job")
    assert isinstance(frame, pl.LazyFrame)
    rows = frame.collect()
    assert rows.height == len(demand_rows()["job"])
    assert rows.schema == pl.DataFrame(SCHEMAS["job"].empty_table()).schema
    per_job = rows.group_by("job_id").agg(pl.col("gpus_allocated").sum()).sort("job_id")
    want = {job: units[0] + 60 * sum(units) for _, _, job, units in JOBS}
    assert dict(per_job.iter_rows()) == want
    with pytest.raises(TallyError, match="unknown table"):
        tally.scan(root, "nope")


def test_api_scan_honours_quarantine_and_checks_the_schema(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rows = demand_rows()["job"][:200]
    write_tables(root, {"job": rows}, Layout(seed=2, files_per_partition=2))
    where = partition_dir(root, "job", T0, "own-a1")
    (where / "torn.parquet").write_bytes(b"PAR1 not a parquet file")
    foreign = pa.table({"time": pa.array([T0], pa.timestamp("ns", tz="UTC")), "node": [7]})
    pq.write_table(foreign, where / "foreign.parquet")
    # a good file already set aside stays out
    aside = root / "quarantine" / where.relative_to(root)
    aside.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:5], schema=SCHEMAS["job"]), aside / "old.parquet")
    said: list[str] = []
    got = tally.scan(root, "job", warn=said.append).collect()
    assert got.height == len(rows)
    assert not (where / "torn.parquet").exists() and (aside / "torn.parquet").exists()
    assert not (where / "foreign.parquet").exists() and (aside / "foreign.parquet").exists()
    assert len(said) == 2 and any("foreign.parquet" in s and "node" in s for s in said)
    # a file lacking a required column is set aside as well, the warning naming the column
    pq.write_table(pa.table({"time": pa.array([T0], pa.timestamp("ns", tz="UTC"))}),
                   where / "old-layout.parquet")  # fmt: skip
    said.clear()
    assert tally.scan(root, "job", warn=said.append).collect().height == len(rows)
    assert not (where / "old-layout.parquet").exists()
    assert (aside / "old-layout.parquet").exists()
    assert len(said) == 1 and "old-layout.parquet" in said[0] and "'node'" in said[0]


# ------------------------------------------------------------------- the report


def test_report_shows_the_plan(dataset: tuple[Path, Path]) -> None:
    root, _ = dataset
    inventory = parse_inventory(inventory_text())
    data = collect_report(root, inventory, 3600, START, END, stable_cv=0.25)
    assert data.plan is not None
    alone = plan_of(root, inventory_text())
    for name in ("ownership", "tenants", "placement", "capacity"):
        assert data.plan.frames()[name].to_dicts() == alone.frames()[name].to_dicts(), name
    page = render_report(data)
    assert 'id="plan"' in page
    assert "Hourly gpu demand, owned capacity and C*" in page
    assert "gpu tenants: size against variability" in page
    assert f"C* = {alone.capacity['owned_units_optimal'][0]:,.2f}" in page


def test_demand_is_the_hourly_bill_with_accounting(tmp_path: Path) -> None:
    """On the demo (fractional GPUs, a leased pool, Slurm accounting): each kind's hourly demand
    is the sum of the hourly bill's tenant lines in its owned and leased pools, accounting
    included, and each tenant's mean is its allocation over the hours."""
    from telemetry.billing.accounting import load_accounting
    from telemetry.billing.inventory import load_inventory
    from telemetry.demo import generate_demo
    from tests.support.bill_rows import bill_of

    out = tmp_path / "demo"
    generate_demo(out, nodes=2, hours=3)
    inventory = load_inventory(out / "inventory.toml")
    records = load_accounting([out / "sacct.json"])
    plan = compute_plan(out, inventory, accounting=records, warn=lambda _: None)
    bill = bill_of(out, inventory, 3600, accounting=records)
    kind = {p["pool"]: (p["kind"], p["ownership"]) for p in bill.pools}
    hours = list(dict.fromkeys(p["window_start"] for p in bill.pools))
    want: dict[tuple[str, str], float] = {}
    per_tenant: dict[tuple[str, str], float] = {}
    for t in bill.tenants:
        k, ownership = kind[t["pool"]]
        if ownership in ("own", "leased"):
            key = (k, t["window_start"])
            want[key] = want.get(key, 0.0) + t["allocated_unit_hours"]
            who = (k, t["tenant"])
            per_tenant[who] = per_tenant.get(who, 0.0) + t["allocated_unit_hours"]
    assert any(j["allocation_source"] == "accounting" for j in bill.jobs)
    for row in plan.hourly.iter_rows(named=True):
        expected = want.get((row["kind"], row["window_start"]), 0.0)
        assert math.isclose(row["demand_units"], expected, rel_tol=1e-12, abs_tol=1e-12)
    assert plan.hourly["window_start"].unique(maintain_order=True).to_list() == hours
    for row in plan.tenants.iter_rows(named=True):
        total = per_tenant[(row["kind"], row["tenant"])]
        assert math.isclose(row["mean_units"], total / len(hours), rel_tol=1e-12)
