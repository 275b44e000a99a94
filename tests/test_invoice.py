"""Invoices (SPEC §4): declared capacity, calendar windows in a zone, contracts, rounded money,
energy cost, scheduler accounting and shared GPUs (SPEC §3).

Expected values come from hand computation written out in the tests, or from the plain-Python
reference (``tests.support.bill_reference``), never from the engine.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry.billing.accounting import (
    load_accounting,
    parse_sacct_json,
    parse_sacct_parsable,
)
from telemetry.billing.inventory import parse_inventory
from telemetry.billing.writers import to_csv, to_json
from telemetry.errors import TallyError
from telemetry.hostlist import expand_hostlist
from tests.support.bill_reference import reference_bill
from tests.support.bill_rows import (
    T0,
    Layout,
    Tables,
    assert_same,
    bill_dict,
    bill_of,
    cpu_row,
    gpu_job_row,
    gpu_row,
    job_row,
    stored,
    write_tables,
)
from tests.support.cli import tally
from tests.support.units import NS

SHANGHAI = ZoneInfo("Asia/Shanghai")

BASE = """
max_gap_seconds = 60
currency = "CNY"
{extra_top}
[[pool]]
name = "gpu-own"
kind = "gpu"
ownership = "own"
nodes = ["gpu-a*"]
cost_per_unit_hour = 6.5
price_per_unit_hour = 12.0
{gpu_extra}
[[pool]]
name = "cpu"
kind = "cpu"
ownership = "own"
nodes = ["*"]
cost_per_unit_hour = 0.01
price_per_unit_hour = 0.03
{tail}
"""


ZONE = 'currency_decimals = 2\ntimezone = "Asia/Shanghai"'


def inventory_text(extra_top: str = ZONE, gpu_extra: str = "", tail: str = "") -> str:
    return BASE.format(extra_top=extra_top, gpu_extra=gpu_extra, tail=tail)


def local_ns(text: str) -> int:
    """An instant written as Shanghai wall time."""
    return int(datetime.fromisoformat(text).replace(tzinfo=SHANGHAI).timestamp()) * NS


# --- inventory ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra_top", "gpu_extra", "tail", "message"),
    [
        ('timezone = "Mars/Olympus"', "", "", "timezone: 'Mars/Olympus' is not an IANA"),
        ("currency_decimals = 9", "", "", "currency_decimals must be a whole number 0-6"),
        (ZONE, "capacity_units = -1", "", "capacity_units: must be a finite number >= 0"),
        ("", "[[pool.capacity]]\nfrom = 2026-03-01\nunits = 3", "", "steps need capacity_units"),
        ("", "capacity_units = 4\n[[pool.capacity]]\nfrom = 2026-03-01\nunits = 3\n"
         "[[pool.capacity]]\nfrom = 2026-02-01\nunits = 5", "", "steps must be in time order"),
        ("", "capacity_units = 4\n[[pool.capacity]]\nfrom = 2026-03-01", "", "missing key 'units'"),
        ("", "capacity_units = 4\n[[pool.capacity]]\nfrom = 'soon'\nunits = 3", "",
         "capacity[0].from: 'soon' is not an ISO-8601"),
        ("", "pue = 0.5", "", "pue: must be at least 1"),
        ("", "", '[[contract]]\ntenant = "acme"\npool = "gpu-*"', "exactly one of"),
        ("", "", '[[contract]]\ntenant = "acme"\npool = "tpu-*"\ndiscount_ratio = 0.1',
         "'tpu-*' matches no pool"),
        ("", "", '[[contract]]\ntenant = "acme"\ndiscount_ratio = 1.5', "discount_ratio"),
        ("", "", '[[contract]]\ntenant = "acme"\nprice = 3', "unknown key 'price'"),
    ],
)  # fmt: skip
def test_every_new_inventory_key_is_checked(
    extra_top: str, gpu_extra: str, tail: str, message: str
) -> None:
    with pytest.raises(TallyError) as caught:
        parse_inventory(inventory_text(extra_top, gpu_extra, tail), "inv.toml")
    text = str(caught.value)
    assert text.startswith("inventory inv.toml") and message in text and "\n" not in text


def test_contract_first_match_wins_and_discounts_the_list_price() -> None:
    tail = """
[[contract]]
tenant = "research-lab"
pool = "gpu-*"
price_per_unit_hour = 10.0
[[contract]]
tenant = "research-lab"
discount_ratio = 0.5
[[contract]]
tenant = "bank-y"
discount_ratio = 0.15
"""
    inv = parse_inventory(inventory_text(tail=tail), "inv.toml")
    gpu, cpu = inv.pools_of("gpu")[0], inv.pools_of("cpu")[0]
    assert inv.price(gpu, "research-lab") == 10
    assert inv.price(cpu, "research-lab") == Decimal("0.015")  # the second contract
    assert inv.price(gpu, "bank-y") == Decimal("10.2")  # 12 × 0.85, exact
    assert inv.price(gpu, "anyone") == 12


# --- declared capacity, calendar months in a zone ---------------------------------------------


def test_declared_capacity_with_a_step_across_a_month_boundary_in_shanghai(
    tmp_path: Path,
) -> None:
    """4 GPUs declared, 6 from 2026-10-01 12:00 Shanghai time; the node reports 1 GPU for two
    short stretches. Monthly windows in Asia/Shanghai (UTC+8, no DST), billed from 09-20 to
    10-10 local: by hand,
    - September: 09-20 00:00 → 10-01 00:00 local = 264 h × 4 = 1056 GPU-h declared;
    - October: 12 h × 4 + (9 × 24 − 12) h × 6 = 48 + 1224 = 1272 GPU-h.
    Cost = declared × 6.5 whatever was monitored."""
    gpu_extra = 'capacity_units = 4\n[[pool.capacity]]\nfrom = "2026-10-01T12:00:00"\nunits = 6'
    inv = parse_inventory(inventory_text(gpu_extra=gpu_extra), "inv.toml")
    sept, octo = local_ns("2026-09-25T10:00:00"), local_ns("2026-10-02T10:00:00")
    gpu = [gpu_row(t + i * 30 * NS, "gpu-a1", "GPU-0", 0, 0.5, 300.0, None, None)
           for t in (sept, octo) for i in range(121)]  # fmt: skip
    tables: Tables = {"gpu": gpu}
    files = write_tables(tmp_path, tables, Layout())
    bill = bill_of(tmp_path, inv, "month", "2026-09-20", "2026-10-10")
    pools = [p for p in bill.pools if p["pool"] == "gpu-own"]
    assert [(p["window_start"], p["window_end"]) for p in pools] == [
        ("2026-09-01T00:00:00+08:00", "2026-10-01T00:00:00+08:00"),
        ("2026-10-01T00:00:00+08:00", "2026-11-01T00:00:00+08:00"),
    ]
    assert [p["capacity_unit_hours"] for p in pools] == [1056.0, 1272.0]
    assert [p["monitored_unit_hours"] for p in pools] == [1.0, 1.0]  # 120 intervals of 30 s
    assert [p["unmonitored_unit_hours"] for p in pools] == [1055.0, 1271.0]
    assert [p["cost"] for p in pools] == [1056 * 6.5, 1272 * 6.5]
    assert pools[0]["busy_ratio"] == 0.5  # busy over what was seen, not over declared
    lo, hi = local_ns("2026-09-20T00:00:00"), local_ns("2026-10-10T00:00:00")
    want = reference_bill(stored(tables), inv, "month", lo, hi, files)
    assert_same(bill_dict(bill), want)
    # the cpu pool has no samples and no declared capacity: not listed
    assert {p["pool"] for p in bill.pools} == {"gpu-own"}


def test_a_running_month_is_billed_to_the_newest_sample(tmp_path: Path) -> None:
    """No --to: declared capacity accrues up to the newest sample, not to the month's end."""
    inv = parse_inventory(inventory_text(gpu_extra="capacity_units = 2"), "inv.toml")
    start = local_ns("2026-11-03T00:00:00")
    gpu = [gpu_row(start + i * 60 * NS, "gpu-a1", "GPU-0", 0, 1.0, 300.0, None, None)
           for i in range(61)]  # fmt: skip
    write_tables(tmp_path, {"gpu": gpu}, Layout())
    (pool,) = [p for p in bill_of(tmp_path, inv, "month").pools if p["pool"] == "gpu-own"]
    # from the month's start (11-01 00:00 local) to the newest sample (11-03 01:00 local)
    assert pool["window_start"] == "2026-11-01T00:00:00+08:00"
    assert pool["capacity_unit_hours"] == (2 * 24 + 1) * 2


def test_iso_weeks_start_on_monday_and_days_follow_the_zone(tmp_path: Path) -> None:
    inv = parse_inventory(inventory_text(), "inv.toml")
    t = local_ns("2026-09-03T23:30:00")  # a Thursday, 15:30 UTC
    gpu = [gpu_row(t + i * 30 * NS, "gpu-a1", "GPU-0", 0, 0.5, 300.0, None, None)
           for i in range(121)]  # fmt: skip
    write_tables(tmp_path, {"gpu": gpu}, Layout())
    weeks = {p["window_start"] for p in bill_of(tmp_path, inv, "week").pools}
    assert weeks == {"2026-08-31T00:00:00+08:00"}  # Monday
    days = [p["window_start"] for p in bill_of(tmp_path, inv, "day").pools]
    assert days == ["2026-09-03T00:00:00+08:00", "2026-09-04T00:00:00+08:00"]
    utc_days = {p["window_start"] for p in bill_of(tmp_path, inv, "day", timezone="UTC").pools}
    assert utc_days == {"2026-09-03T00:00:00Z"}


# --- money --------------------------------------------------------------------------------------


def test_lines_add_up_to_the_cent_with_half_to_even_and_contracts(tmp_path: Path) -> None:
    """Three tenants on one GPU node over one hour; every charge is a hand-computed exact decimal
    rounded half-to-even, and the pool's revenue is the sum of the rounded lines."""
    tail = """
[[contract]]
tenant = "lab"
pool = "gpu-own"
price_per_unit_hour = 10.0
[[contract]]
tenant = "bank"
discount_ratio = 0.15
"""
    inv = parse_inventory(inventory_text(tail=tail), "inv.toml")
    times = [T0 + i * 15 * NS for i in range(241)]  # one hour at 15 s, inside one day
    jobs = []
    # GPU-seconds per interval: lab 0.000125·15 … chosen so charges end in half cents
    for job, tenant, gpus in (("1", "lab", 0.25), ("2", "bank", 0.125), ("3", "acme", 0.0625)):
        jobs += [job_row(t, "gpu-a1", job, "u", tenant, 1.0, gpus, 0.0) for t in times]
    gpu = [gpu_row(t, "gpu-a1", "GPU-0", 0, 0.4, 300.0, None, None) for t in times]
    tables: Tables = {"gpu": gpu, "job": jobs}
    files = write_tables(tmp_path, tables, Layout())
    bill = bill_of(tmp_path, inv, 86400)
    charges = {(t["pool"], t["tenant"]): t["charge"] for t in bill.tenants}
    # lab: 0.25 GPU-h × 10 = 2.5; bank: 0.125 × 12 × 0.85 = 1.275 → 1.28 (even);
    # acme: 0.0625 × 12 = 0.75; cpu: 1 core-h each × 0.03 (lab's contract is for gpu-own only),
    # bank 0.03 × 0.85 = 0.0255 → 0.03
    assert charges["gpu-own", "lab"] == 2.5
    assert charges["gpu-own", "bank"] == 1.28  # 1.275: a tie, to the even cent
    assert charges["gpu-own", "acme"] == 0.75
    assert charges["cpu", "bank"] == 0.03
    assert charges["cpu", "lab"] == charges["cpu", "acme"] == 0.03
    pools = {p["pool"]: p for p in bill.pools}
    assert pools["gpu-own"]["revenue"] == 4.53
    assert pools["cpu"]["revenue"] == 0.09
    assert (
        pools["gpu-own"]["cost"] == 6.5 and pools["gpu-own"]["idle_cost"] == 3.66
    )  # 6.5 × (1 − 0.4375)
    # the gpu rows name no job: the jobs' GPU busy time is 0, so all they paid for sat idle
    assert {t["tenant"]: t["waste_charge"] for t in bill.tenants if t["pool"] == "gpu-own"} == {
        "lab": 2.5, "bank": 1.28, "acme": 0.75,
    }  # fmt: skip
    assert_same(bill_dict(bill), reference_bill(stored(tables), inv, 86400, files=files))
    csv_text = to_csv(bill, "tenants", 2).decode()
    assert ",0.75,0.75,CNY\n" in csv_text  # two decimals, currency column
    document = json.loads(to_json(bill))
    assert document["currency"] == "CNY" and document["timezone"] == "Asia/Shanghai"


@pytest.mark.parametrize(
    ("numerator", "denominator", "decimals", "rounded"),
    [(125, 1000, 2, 0.12), (135, 1000, 2, 0.14), (2675, 1000, 2, 2.68), (5, 1, 0, 5.0),
     (25, 10, 0, 2.0), (-0, 1, 2, 0.0)],
)  # fmt: skip
def test_money_rounds_exact_amounts_half_to_even(
    numerator: int, denominator: int, decimals: int, rounded: float
) -> None:
    """2.675 is exact here (a float would hold 2.67499… and round down)."""
    from fractions import Fraction

    from telemetry.billing.invoice import _Money

    assert _Money(decimals)(Fraction(numerator, denominator)) == rounded


def test_energy_cost_and_emissions(tmp_path: Path) -> None:
    """1 kWh from the counter (3.6 MJ) × PUE 1.3 × 0.6 CNY = 0.78 CNY; × 540 g/kWh = 0.702 kg."""
    gpu_extra = "energy_price_per_kwh = 0.6\npue = 1.3\ngrid_gco2_per_kwh = 540"
    inv = parse_inventory(inventory_text(gpu_extra=gpu_extra), "inv.toml")
    gpu = [gpu_row(T0 + i * 30 * NS, "gpu-a1", "GPU-0", 0, 0.5, 300.0, 36_000.0 * i, None)
           for i in range(101)]  # fmt: skip
    write_tables(tmp_path, {"gpu": gpu}, Layout())
    (pool,) = [p for p in bill_of(tmp_path, inv, 86400).pools if p["pool"] == "gpu-own"]
    assert pool["energy_kwh"] == 1.0
    assert pool["energy_cost"] == 0.78
    assert pool["emissions_kg"] == pytest.approx(0.702, abs=1e-12)
    # capacity 3000 s × 6.5 / 3600 = 5.41666…; + 0.78 = 6.19666… → 6.20
    assert pool["cost"] == 6.2
    cpu_pool = parse_inventory(inventory_text(), "inv.toml")
    (plain,) = [p for p in bill_of(tmp_path, cpu_pool, 86400).pools if p["pool"] == "gpu-own"]
    assert plain["energy_cost"] is None and plain["emissions_kg"] is None


# --- accounting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("gpu-a[01-03,07],cpu-x1", ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a07", "cpu-x1"]),
        ("node7", ["node7"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("a[009-011]b", ["a009b", "a010b", "a011b"]),
    ],
)
def test_hostlists_expand_as_slurm_does(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["gpu-a[01-", "a]b", "a[3-1]", "a[x]", "a,,b", "a[1[2]]"])
def test_bad_hostlists_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        expand_hostlist(text)


def _sacct_json(jobs: list[dict[str, Any]], version: str) -> str:
    if version == "v0.0.39":  # plain numbers, state a string

        def number(v: int | None) -> Any:
            return 0 if v is None else v

        state = "RUNNING"
    else:  # v0.0.40+: {set, infinite, number} objects, state an array

        def number(v: int | None) -> Any:
            return {"set": v is not None, "infinite": False, "number": v or 0}

        state = ["RUNNING"]
    out = []
    for j in jobs:
        tres = [{"type": "cpu", "name": "", "id": 1, "count": j["cpus"]},
                {"type": "mem", "name": "", "id": 2, "count": 65536},
                {"type": "node", "name": "", "id": 4, "count": 2}]  # fmt: skip
        if j["gpus"]:
            gpus = j["gpus"]
            tres += [{"type": "gres", "name": "gpu", "id": 1001, "count": gpus},
                     {"type": "gres", "name": "gpu:h100", "id": 1002, "count": gpus}]  # fmt: skip
        out.append({
            "account": j["account"], "job_id": j["id"], "user": j["user"], "nodes": j["nodes"],
            "state": {"current": state, "reason": "None"},
            "time": {"start": j["start"], "end": number(j["end"]), "elapsed": 0,
                     "limit": number(1440)},
            "tres": {"allocated": tres, "requested": tres},
            "steps": [],
        })  # fmt: skip
    return json.dumps({"meta": {"plugins": {"data_parser": f"data_parser/{version}"}},
                       "jobs": out, "errors": [], "warnings": []})  # fmt: skip


def _sacct_parsable(jobs: list[dict[str, Any]]) -> str:
    def when(seconds: int | None) -> str:
        if seconds is None:
            return "Unknown"
        return datetime.fromtimestamp(seconds, tz=ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%S")

    lines = ["JobID|JobIDRaw|User|Account|Start|End|AllocTRES|NodeList|State"]
    for j in jobs:
        tres = f"billing={j['cpus']},cpu={j['cpus']},mem=64G,node=2"
        if j["gpus"]:
            tres += f",gres/gpu={j['gpus']},gres/gpu:h100={j['gpus']}"
        lines.append(f"{j['id']}|{j['id']}|{j['user']}|{j['account']}|{when(j['start'])}|"
                     f"{when(j['end'])}|{tres}|{j['nodes']}|RUNNING")  # fmt: skip
        lines.append(f"{j['id']}.batch|{j['id']}.batch|||{when(j['start'])}|{when(j['end'])}|"
                     f"cpu=1|{j['nodes']}|RUNNING")  # fmt: skip
    return "\n".join(lines) + "\n"


S0 = T0 // NS
ACCOUNTED = [
    # two nodes, 4 GPUs: 2 per node, 00:10 → 01:40
    {"id": 101, "user": "ann", "account": "lab", "nodes": "gpu-a[1-2]", "start": S0 + 600,
     "end": S0 + 6000, "cpus": 16, "gpus": 4},
    # still running: up to the bill's end
    {"id": 102, "user": "bob", "account": "bank", "nodes": "gpu-a1", "start": S0 + 3000,
     "end": None, "cpus": 2, "gpus": 1},
    # no samples at all
    {"id": 103, "user": "cid", "account": "acme", "nodes": "gpu-a2", "start": S0 + 60,
     "end": S0 + 660, "cpus": 4, "gpus": 0},
]  # fmt: skip


def _accounting_dataset(tmp_path: Path) -> Tables:
    """Two GPU nodes sampled 00:00 → 02:00 every 60 s; job 101's rows sampled on both nodes
    only from 00:15 (the sampler's view of it starts late), job 102 on gpu-a1, job 9 has rows
    but no record."""
    times = [T0 + i * 60 * NS for i in range(121)]
    gpu, jobs = [], []
    for node in ("gpu-a1", "gpu-a2"):
        gpu += [gpu_row(t, node, f"GPU-{node}", 0, 0.5, 300.0, None, None) for t in times]
        jobs += [job_row(t, node, "101", "ann", "wrong-account", 8.0, 2.0, 0.0)
                 for t in times if T0 + 900 * NS <= t <= T0 + 6000 * NS]  # fmt: skip
    jobs += [job_row(t, "gpu-a1", "102", "bob", "bank", 2.0, 1.0, 0.0)
             for t in times if t >= T0 + 3000 * NS]  # fmt: skip
    jobs += [job_row(t, "gpu-a2", "9", "dan", "misc", 1.0, 0.0, 0.0) for t in times[:30]]
    return {"gpu": gpu, "job": jobs}


@pytest.mark.parametrize("version", ["v0.0.39", "v0.0.41", "v0.0.44"])
def test_accounting_gives_exact_allocation_and_reconciliation(tmp_path: Path, version: str) -> None:
    inv = parse_inventory(inventory_text(extra_top=""), "inv.toml")  # windows in UTC
    tables = _accounting_dataset(tmp_path / "data")
    files = write_tables(tmp_path / "data", tables, Layout())
    as_json = tmp_path / "sacct.json"
    as_json.write_text(_sacct_json(ACCOUNTED, version))
    as_text = tmp_path / "sacct.txt"
    as_text.write_text(_sacct_parsable(ACCOUNTED))
    records = load_accounting([as_json])
    assert records == load_accounting([as_text])
    bill = bill_of(tmp_path / "data", inv, 3600, accounting=records)
    # by hand, window 00:00: job 101 [00:10, 01:00) = 50 min × 2 GPUs on each node
    jobs = {(j["window_start"][11:16], j["pool"], j["job_id"]): j for j in bill.jobs}
    assert jobs["00:00", "gpu-own", "101"]["allocated_unit_hours"] == 2 * 2 * 50 / 60
    assert jobs["01:00", "gpu-own", "101"]["allocated_unit_hours"] == 2 * 2 * 40 / 60
    assert jobs["00:00", "gpu-own", "101"]["tenant"] == "lab"  # from the record
    assert jobs["00:00", "gpu-own", "101"]["allocation_source"] == "accounting"
    # running job 102: from 00:50 to the newest sample, 02:00
    assert jobs["00:00", "gpu-own", "102"]["allocated_unit_hours"] == 10 / 60
    assert jobs["01:00", "gpu-own", "102"]["allocated_unit_hours"] == 1.0
    # job 103: no samples, billed from its record alone (cpu pool, 4 cores × 10 min)
    assert jobs["00:00", "cpu", "103"]["allocated_unit_hours"] == 4 * 10 / 60
    assert jobs["00:00", "cpu", "103"]["busy_unit_hours"] == 0.0
    assert jobs["00:00", "cpu", "9"]["allocation_source"] == "samples"
    reconciliation = bill.input["reconciliation"]
    # jobs with both: 101 sampled 00:15 → 01:40 on two nodes (85 min × 2 GPUs × 2 nodes + 85
    # min × 8 cores × 2 nodes) and 102 (70 min × 1 GPU + 70 min × 2 cores)
    sampled = (85 * 2 * 2 + 85 * 8 * 2 + 70 * 1 + 70 * 2) / 60
    accounted = (90 * 2 * 2 + 90 * 8 * 2 + 70 * 1 + 70 * 2) / 60
    assert reconciliation == {
        "jobs_accounted": 3,
        "jobs_sampled_only": 1,
        "jobs_accounted_without_samples": 1,
        "allocated_unit_hours_sampled": pytest.approx(sampled, abs=1e-9),
        "allocated_unit_hours_accounted": pytest.approx(accounted, abs=1e-9),
        "by_kind": {
            "gpu": {
                "allocated_unit_hours_sampled": pytest.approx((85 * 4 + 70) / 60, abs=1e-9),
                "allocated_unit_hours_accounted": pytest.approx((90 * 4 + 70) / 60, abs=1e-9),
            },
            "cpu": {
                "allocated_unit_hours_sampled": pytest.approx((85 * 16 + 140) / 60, abs=1e-9),
                "allocated_unit_hours_accounted": pytest.approx((90 * 16 + 140) / 60, abs=1e-9),
            },
        },
    }
    want = reference_bill(stored(tables), inv, 3600, files=files, accounting=records)
    assert_same(bill_dict(bill), want)


def test_json_and_parsable2_accounting_give_the_same_bytes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_tables(root, _accounting_dataset(root), Layout())
    (tmp_path / "inv.toml").write_text(inventory_text())
    (tmp_path / "a.json").write_text(_sacct_json(ACCOUNTED, "v0.0.42"))
    (tmp_path / "a.txt").write_text(_sacct_parsable(ACCOUNTED))
    outputs = []
    for name in ("a.json", "a.txt"):
        result = tally("bill", str(root), "--inventory", str(tmp_path / "inv.toml"),
                       "--accounting", str(tmp_path / name), "--window", "day")  # fmt: skip
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])["input"]["reconciliation"]["jobs_accounted"] == 3
    assert "1 accounted jobs have no samples" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"jobs": [{"job_id": 5}]}', "jobs[0]: missing field 'time'"),
        ('{"jobs": [{"job_id": 5, "time": {"start": 10, "end": 20}, "nodes": "a[1-",'
         ' "user": "u", "account": "a"}]}', "jobs[0]: node list 'a[1-'"),
        ('{"jobs": {}}', "no 'jobs' array"),
        ("{not json", "not valid JSON"),
        ("JobIDRaw|User\n", "line 1: the header lacks Account"),
        ("JobIDRaw|User|Account|Start|End|AllocTRES|NodeList\n"
         "7|u|a|2026-09-01T00:00:00|2026-09-01T01:00:00|cpu=x|n1\n", "line 2: AllocTRES item"),
        ("JobIDRaw|User|Account|Start|End|AllocTRES|NodeList\n"
         "7|u|a|yesterday|Unknown|cpu=1|n1\n", "line 2: Start: 'yesterday'"),
        ("JobIDRaw|User|Account|Start|End|AllocTRES|NodeList\n7|u|a\n", "line 2: 3 fields"),
        ("JobIDRaw|User|Account|Start|End|AllocTRES|NodeList\n"
         "7|u|a|2026-09-01T02:00:00|2026-09-01T01:00:00|cpu=1|n1\n", "ends before it starts"),
    ],
)  # fmt: skip
def test_bad_accounting_is_one_line_naming_file_and_record(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "acct"
    path.write_text(content)
    with pytest.raises(TallyError) as caught:
        load_accounting([path])
    text = str(caught.value)
    assert text.startswith(f"accounting {path}") and message in text and "\n" not in text
    root = tmp_path / "data"
    write_tables(root, _accounting_dataset(root), Layout())
    (tmp_path / "inv.toml").write_text(inventory_text())
    result = tally("bill", str(root), "--inventory", str(tmp_path / "inv.toml"),
                   "--accounting", str(path))  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_a_job_on_gpu_shards_keeps_its_sampled_gpu_allocation(tmp_path: Path) -> None:
    """sacct counts shards, not what fraction of a GPU they are: the GPU allocation stays the
    sampled one, the CPUs and the owner come from the record."""
    text = ("JobIDRaw|User|Account|Start|End|AllocTRES|NodeList\n"
            f"101|ann|lab|{datetime.fromtimestamp(S0 + 600).isoformat()}Z|Unknown|"
            "cpu=16,gres/shard=4|gpu-a[1-2]\n")  # fmt: skip
    (record,) = parse_sacct_parsable(text)
    assert record.gpus is None and record.cpus == 16
    inv = parse_inventory(inventory_text(extra_top=""), "inv.toml")
    tables = _accounting_dataset(tmp_path)
    files = write_tables(tmp_path, tables, Layout())
    bill = bill_of(tmp_path, inv, 3600, accounting=[record])
    jobs = {(j["window_start"][11:16], j["pool"], j["job_id"]): j for j in bill.jobs}
    # GPUs: sampled from 00:15 (rows every minute, 2 GPUs on 2 nodes; the 00:15 row only opens
    # the series): 44 one-minute intervals in window 00:00
    assert jobs["00:00", "gpu-own", "101"]["allocated_unit_hours"] == 2 * 2 * 44 / 60
    # cores: from the record, 00:10 to the end of the range, 16 over two nodes
    assert jobs["00:00", "cpu", "101"]["allocated_unit_hours"] == 16 * 50 / 60
    assert jobs["00:00", "gpu-own", "101"]["tenant"] == "lab"
    want = reference_bill(stored(tables), inv, 3600, files=files, accounting=[record])
    assert_same(bill_dict(bill), want)


def test_a_job_on_a_mig_instance_keeps_its_sampled_gpu_allocation(tmp_path: Path) -> None:
    """Slurm counts a MIG instance as one GPU (gres/gpu=1) where capacity counts it as its
    slice fraction (1/7): an accounted job's GPU allocation on a node where it held MIG
    instances stays the sampled one (never 7x the GPU-hours its slice is), its CPUs and owner
    come from the record, and the bill says so. On the same node a job on a whole GPU, and a
    record without samples, are accounted as ever; so is a job on another node."""
    start = datetime.fromtimestamp(S0).isoformat()
    text = ("JobIDRaw|User|Account|Start|End|AllocTRES|NodeList\n"
            f"7|ann|lab|{start}Z|Unknown|cpu=2,gres/gpu=1|gpu-a1\n"
            f"8|bob|ops|{start}Z|Unknown|cpu=4,gres/gpu=1|gpu-a2\n"
            f"9|cid|ops|{start}Z|Unknown|cpu=1,gres/gpu=1|gpu-a1\n"
            f"10|dan|ops|{start}Z|Unknown|cpu=1,gres/gpu=1|gpu-a1\n")  # fmt: skip
    records = parse_sacct_parsable(text)
    inv = parse_inventory(inventory_text(extra_top=""), "inv.toml")
    times = [T0 + i * 60 * NS for i in range(61)]
    gpu, jobs = [], []
    for t in times:
        parent = gpu_row(t, "gpu-a1", "GPU-P", 0, None, 300.0, None, None)
        gpu.append({**parent, "capacity_units": 0.0})  # every slice held by an instance
        for k in range(7):
            mig = gpu_row(t, "gpu-a1", f"MIG-{k}", 0, 1.0 if k == 0 else 0.0, None, None,
                          "7" if k == 0 else None)  # fmt: skip
            gpu.append({**mig, "capacity_units": 1 / 7, "mig_profile": "1g.10gb"})
        gpu.append(gpu_row(t, "gpu-a1", "GPU-W", 1, 0.5, 300.0, None, "9"))  # a whole GPU
        gpu.append(gpu_row(t, "gpu-a2", "GPU-X", 0, 0.5, 300.0, None, "8"))
        jobs.append(job_row(t, "gpu-a1", "7", "ann", "lab", 2.0, 1 / 7, 0.0))
        jobs.append(job_row(t, "gpu-a1", "9", "cid", "ops", 1.0, 0.5, 0.0))  # sampled: 0.5
        jobs.append(job_row(t, "gpu-a2", "8", "bob", "ops", 4.0, 1.0, 0.0))
    tables: Tables = {"gpu": gpu, "job": jobs}
    files = write_tables(tmp_path, tables, Layout())
    bill = bill_of(tmp_path, inv, 3600, accounting=records)

    def total(pool: str, job: str, field: str) -> float:
        return sum(j[field] for j in bill.jobs if (j["pool"], j["job_id"]) == (pool, job))

    # an hour (00:00 to the newest sample at 01:00, two windows) of 1/7 of a GPU (float32)
    assert total("gpu-own", "7", "allocated_unit_hours") == pytest.approx(1 / 7, rel=1e-6)
    assert total("gpu-own", "7", "busy_unit_hours") == pytest.approx(1 / 7, rel=1e-6)
    assert {(j["tenant"], j["user"]) for j in bill.jobs if j["job_id"] == "7"} == {("lab", "ann")}
    assert total("cpu", "7", "allocated_unit_hours") == 2.0  # the record's, the whole hour
    assert total("gpu-own", "8", "allocated_unit_hours") == 1.0  # the record's
    assert total("gpu-own", "9", "allocated_unit_hours") == 1.0  # the record's, not 0.5
    assert total("gpu-own", "10", "allocated_unit_hours") == 1.0  # the record alone
    assert {j["allocation_source"] for j in bill.jobs} == {"accounting"}
    pools = [p for p in bill.pools if p["pool"] == "gpu-own"]
    allocated = sum(p["allocated_unit_hours"] for p in pools)
    assert allocated == pytest.approx(1 / 7 + 3.0, rel=1e-6)
    assert [n for n in bill.notes if "MIG" in n] == [
        "accounting counts each MIG instance as a GPU: the GPU allocation of accounted jobs on "
        "MIG instances (job 7 on gpu-a1) is their sampled one, each instance at its slice "
        "fraction"
    ]
    want = reference_bill(stored(tables), inv, 3600, files=files, accounting=records)
    assert_same(bill_dict(bill), want)
    # the same window whatever the range: a whole-GPU job keeps its record however far it runs
    early = bill_of(tmp_path, inv, 3600, end="2026-09-01T00:30:00Z", accounting=records)
    assert sum(j["allocated_unit_hours"] for j in early.jobs
               if (j["pool"], j["job_id"]) == ("gpu-own", "9")) == 0.5  # fmt: skip


def test_unit_cost_comes_from_the_exact_cost(tmp_path: Path) -> None:
    """unit_cost = cost / allocated from the exact sums, rounded like every money field: ten
    core-minutes at 0.01 a core-hour cost 0.0017 (0.00 on the line), and a unit-hour still cost
    0.01, not 0.00 / allocated."""
    inv = parse_inventory(inventory_text(extra_top=""), "inv.toml")
    times = [T0 + i * 60 * NS for i in range(11)]
    cpu = [cpu_row(t, "c1", 1, {"user": 30.0 * i}, None) for i, t in enumerate(times)]
    jobs = [job_row(t, "c1", "5", "u", "acme", 1.0, 0.0, 30.0 * i) for i, t in enumerate(times)]
    tables: Tables = {"cpu": cpu, "job": jobs}
    files = write_tables(tmp_path, tables, Layout())
    bill = bill_of(tmp_path, inv, 3600)
    (pool,) = [p for p in bill.pools if p["pool"] == "cpu"]
    assert pool["cost"] == 0.0 and pool["allocated_unit_hours"] == pytest.approx(1 / 6)
    assert pool["unit_cost"] == 0.01
    assert_same(bill_dict(bill), reference_bill(stored(tables), inv, 3600, files=files))


def test_pending_jobs_and_steps_carry_no_allocation() -> None:
    text = ("JobIDRaw|User|Account|Start|End|AllocTRES|NodeList\n"
            "8|u|a|Unknown|Unknown||None assigned\n"
            "9|u|a|2026-09-01T00:00:00Z|Unknown|cpu=2|n1\n"
            "9.0|u|a|2026-09-01T00:00:00Z|Unknown|cpu=2|n1\n")  # fmt: skip
    (record,) = parse_sacct_parsable(text)
    assert (record.job_id, record.end_ns, record.cpus, record.nodes) == ("9", None, 2.0, ("n1",))
    pending = {"jobs": [{"job_id": 8, "time": {"start": 0, "end": 0}}]}
    assert parse_sacct_json(json.dumps(pending)) == []


# --- shared GPUs (SPEC §3) ----------------------------------------------------------------------


def _shared_dataset(with_sm: bool) -> Tables:
    """One GPU fully busy for an hour, held by two jobs with shares 0.75 and 0.25 (job rows
    allocate those fractions), while the gpu row names job "1" as the holder."""
    times = [T0 + i * 30 * NS for i in range(121)]
    gpu = [gpu_row(t, "gpu-a1", "GPU-0", 0, 1.0, 300.0, None, "1") for t in times]
    jobs, holders = [], []
    for job, share, sm in (("1", 0.75, 0.5), ("2", 0.25, 0.9)):
        jobs += [job_row(t, "gpu-a1", job, "u", f"t{job}", 1.0, share, 0.0) for t in times]
        holders += [gpu_job_row(t, "gpu-a1", "GPU-0", job, share, sm if with_sm else None)
                    for t in times]  # fmt: skip
    return {"gpu": gpu, "job": jobs, "gpu_job": holders}


@pytest.mark.parametrize("with_sm", [False, True])
def test_shared_gpu_busy_time_is_split_and_no_efficiency_exceeds_one(
    tmp_path: Path, with_sm: bool
) -> None:
    inv = parse_inventory(inventory_text(), "inv.toml")
    tables = _shared_dataset(with_sm)
    files = write_tables(tmp_path, tables, Layout())
    bill = bill_of(tmp_path, inv, 86400)
    gpu_tenants = {t["tenant"]: t for t in bill.tenants if t["pool"] == "gpu-own"}
    busy = {k: v["busy_unit_hours"] for k, v in gpu_tenants.items()}
    if with_sm:
        # SM 0.5 and 0.9 sum to 1.4 > the GPU's 1.0: scaled to 0.5/1.4 and 0.9/1.4 of an hour
        assert busy == pytest.approx({"t1": 0.5 / 1.4, "t2": 0.9 / 1.4}, abs=1e-6)  # float32 SM
    else:
        assert busy == pytest.approx({"t1": 0.75, "t2": 0.25}, abs=1e-9)
    assert sum(busy.values()) == pytest.approx(1.0, abs=1e-9)
    if not with_sm:
        assert all(t["efficiency_ratio"] <= 1.0 for t in gpu_tenants.values())
    assert_same(bill_dict(bill), reference_bill(stored(tables), inv, 86400, files=files))


# --- any split, with accounting and shared GPUs: the same bytes --------------------------------

PROPERTY = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(st.integers(0, 10_000), st.sampled_from([1, 2, 4]), st.sampled_from([3600, "day"]))
def test_any_split_gives_the_same_bytes_with_accounting_on(
    tmp_path_factory: pytest.TempPathFactory, seed: int, files: int, window: int | str
) -> None:
    inv = parse_inventory(inventory_text(gpu_extra="capacity_units = 3"), "inv.toml")
    base = _accounting_dataset(Path("."))
    shared = _shared_dataset(True)
    tables: Tables = {
        "gpu": base["gpu"] + shared["gpu"][:0],
        "job": base["job"],
        "gpu_job": [dict(h, node="gpu-a1", gpu_uuid="GPU-gpu-a1") for h in shared["gpu_job"]],
        "cpu": [cpu_row(T0 + i * 60 * NS, "cpu-c1", 8, {"user": 10.0 * i}, None)
                for i in range(121)],
    }  # fmt: skip
    records = parse_sacct_json(_sacct_json(ACCOUNTED, "v0.0.44"))
    one = tmp_path_factory.mktemp("one")
    write_tables(one, tables, Layout(files_per_partition=1))
    many = tmp_path_factory.mktemp("many")
    count = write_tables(many, tables, Layout(seed=seed, files_per_partition=files))
    a = bill_of(one, inv, window, accounting=records)
    b = bill_of(many, inv, window, accounting=records, budget_rows=200 + seed % 500)
    assert a.input["reconciliation"]["jobs_accounted"] == 3
    a.input["files"] = b.input["files"]  # the one difference: how many files hold the rows
    assert to_json(a) == to_json(b)
    want = reference_bill(stored(tables), inv, window, files=count, accounting=records)
    assert_same(bill_dict(b), want)


def test_a_mig_gpu_is_billed_as_one_gpu_of_capacity(tmp_path: Path) -> None:
    """A MIG-enabled H100 split 3g + 3g (+ 1 slice free): the parent row carries the free
    slice (1/7) and the board's energy, each instance 3/7; an hour is 1 GPU-hour of capacity,
    not 3. A job busy 100 % on one 3g instance is 3/7 GPU-hour busy."""
    inv = parse_inventory(inventory_text(extra_top=""), "inv.toml")
    times = [T0 + i * 30 * NS for i in range(121)]
    gpu = []
    for uuid, units, util, power, job in (
        ("GPU-parent", 1 / 7, None, 400.0, None),
        ("MIG-a", 3 / 7, 1.0, None, "7"),
        ("MIG-b", 3 / 7, 0.0, None, None),
    ):
        gpu += [dict(gpu_row(t, "gpu-a1", uuid, 0, util, power, None, job), capacity_units=units)
                for t in times]  # fmt: skip
    tables: Tables = {"gpu": gpu}
    files = write_tables(tmp_path, tables, Layout())
    bill = bill_of(tmp_path, inv, 86400)
    (pool,) = [p for p in bill.pools if p["pool"] == "gpu-own"]
    assert pool["capacity_unit_hours"] == pytest.approx(1.0, abs=1e-6)  # float32 fractions
    assert pool["busy_unit_hours"] == pytest.approx(3 / 7, abs=1e-6)  # float32 fractions
    assert pool["energy_kwh"] == pytest.approx(
        0.4, abs=1e-6
    )  # float32 fractions  # 400 W for an hour, once
    (job,) = [j for j in bill.jobs if j["job_id"] == "7"]
    assert job["busy_unit_hours"] == pytest.approx(3 / 7, abs=1e-6)  # float32 fractions
    assert_same(bill_dict(bill), reference_bill(stored(tables), inv, 86400, files=files))


def test_live_counters_use_declared_capacity_and_contract_prices() -> None:
    """What the aggregator and the daemon export: a pool declaring 4 GPUs has 4 GPU-seconds of
    capacity per second from the first sample seen to the newest, whatever was monitored; a
    tenant's charge is at its contract price."""
    from telemetry.billing.engine import LIVE_WINDOW_SECONDS, Biller
    from tests.support.bill_rows import arrow

    tail = '[[contract]]\ntenant = "lab"\nprice_per_unit_hour = 10.0'
    inv = parse_inventory(inventory_text(gpu_extra="capacity_units = 4", tail=tail), "inv.toml")
    times = [T0 + i * 60 * NS for i in range(61)]
    biller = Biller(inv, LIVE_WINDOW_SECONDS)
    biller.add({
        "gpu": arrow("gpu", [gpu_row(t, "gpu-a1", "GPU-0", 0, 0.5, 300.0, None, "1")
                             for t in times]),
        "job": arrow("job", [job_row(t, "gpu-a1", "1", "u", "lab", 1.0, 1.0, 0.0)
                             for t in times]),
    })  # fmt: skip
    totals = biller.live_totals()
    pools = {p[0]: p for p in totals.pools}
    assert pools["gpu-own"][2] == 4 * 3600.0  # declared: 4 GPUs over the hour seen
    (lab,) = [t for t in totals.tenants if t[0] == "gpu-own"]
    assert lab[2] == "lab" and lab[5] == pytest.approx(10.0)  # 1 GPU-hour at 10, not 12


# --- what a review found ------------------------------------------------------------------------


def test_nodes_in_no_pool_earn_nothing_whatever_the_contracts(tmp_path: Path) -> None:
    tail = '[[contract]]\ntenant = "acme"\npool = "*"\nprice_per_unit_hour = 10.0'
    inv = parse_inventory(inventory_text(tail=tail), "inv.toml")
    times = [T0 + i * 60 * NS for i in range(61)]
    jobs = [job_row(t, "stray-9", "1", "u", "acme", 1.0, 1.0, 0.0) for t in times]
    write_tables(tmp_path, {"job": jobs}, Layout())
    bill = bill_of(tmp_path, inv, 86400)
    # the GPU is on no gpu pool: unassigned, price 0 even under a contract for every pool; the
    # node's cores are in the catch-all cpu pool, where the contract applies (1 core-h × 10)
    assert {(t["pool"], t["charge"]) for t in bill.tenants} == {("unassigned", 0.0), ("cpu", 10.0)}


def test_a_hostlist_too_large_is_refused_before_it_is_built() -> None:
    import time

    begin = time.monotonic()
    with pytest.raises(ValueError, match="more than 65,536 hosts"):
        expand_hostlist("n[0-999]m[0-999]x[0-999]")
    assert time.monotonic() - begin < 1.0
    assert len(expand_hostlist("n[0-99]m[0-99]")) == 10_000


def test_real_parsable2_records_that_bill_nothing_or_name_no_account() -> None:
    text = ("JobIDRaw|User|Account|Start|End|AllocTRES|NodeList|State\n"
            "1|u||2026-09-01T00:00:00Z|2026-09-01T01:00:00Z|"
            "cpu=2,license/fluent@slurmdb=4,gres/gpu=1|n1|COMPLETED\n"
            "2|u|a|2026-09-01T00:00:00Z|2026-09-01T00:00:00Z|cpu=2|n1|CANCELLED by 0\n"
            "3|u|a|2026-09-01T00:00:00Z|Unknown|cpu=2|None assigned|PENDING\n"
            "4|u|a|2026-09-01T00:00:00Z|Unknown|cpu=2|n2|REQUEUED\n")  # fmt: skip
    (record,) = parse_sacct_parsable(text)
    assert (record.job_id, record.account, record.cpus, record.gpus) == ("1", "unknown", 2.0, 1.0)


@pytest.mark.parametrize("version", ["v0.0.39", "v0.0.40"])
def test_a_running_jobs_unset_energy_does_not_refuse_the_file(version: str) -> None:
    """sacct prints a running job's energy TRES as -2 (Slurm's no-value marker as a signed
    count): tally bills no energy TRES, so the job is read as any other."""
    text = _sacct_json([{"id": 31, "user": "ann", "account": "lab", "nodes": "gpu-a1",
                         "start": S0, "end": None, "cpus": 4, "gpus": 2}], version)  # fmt: skip
    raw = json.loads(text)
    raw["jobs"][0]["tres"]["allocated"].append({"type": "energy", "name": "", "id": 3, "count": -2})
    (record,) = parse_sacct_json(json.dumps(raw))
    assert (record.job_id, record.cpus, record.gpus, record.end_ns) == ("31", 4.0, 2.0, None)
    raw["jobs"][0]["tres"]["allocated"][0]["count"] = -2  # a billed TRES so: still refused
    with pytest.raises(TallyError, match="count -2"):
        parse_sacct_json(json.dumps(raw))


def test_each_run_of_a_requeued_job_is_billed(tmp_path: Path) -> None:
    """``sacct -D`` lists every run of a requeued job: the run that ended in a requeue
    (REQUEUED, with its end) holds its allocation as the later run does, under one job id; a
    REQUEUED record without an end says nothing of when the run stopped and bills nothing."""
    head = "JobIDRaw|User|Account|Start|End|AllocTRES|NodeList|State\n"
    (tmp_path / "sacct").write_text(
        head
        + "20|u|a|2026-09-01T00:00:00Z|2026-09-01T00:20:00Z|cpu=4,gres/gpu=1|n1|REQUEUED\n"
        + "20|u|a|2026-09-01T00:30:00Z|2026-09-01T01:00:00Z|cpu=4,gres/gpu=1|n2|COMPLETED\n"
        + "21|u|a|2026-09-01T00:00:00Z|Unknown|cpu=2|n1|REQUEUED\n"
    )
    records = load_accounting([tmp_path / "sacct"])
    assert [(r.job_id, r.nodes, r.end_ns - r.start_ns) for r in records if r.end_ns] == [
        ("20", ("n1",), 1200 * NS),
        ("20", ("n2",), 1800 * NS),
    ]
    assert len(records) == 2
    inv = parse_inventory(inventory_text(extra_top=""), "inv.toml")
    times = [T0 + i * 60 * NS for i in range(61)]
    tables: Tables = {"cpu": [cpu_row(t, n, 8, {}, None) for t in times for n in ("n1", "n2")]}
    write_tables(tmp_path / "ds", tables, Layout())
    bill = bill_of(tmp_path / "ds", inv, 3600, accounting=records)

    def allocated(pool: str) -> float:
        return sum(j["allocated_unit_hours"] for j in bill.jobs if (j["job_id"], j["pool"]) ==
                   ("20", pool))  # fmt: skip

    assert allocated("cpu") == pytest.approx(4 * (20 + 30) / 60)  # both runs' cores


def test_a_job_in_two_accounting_files_keeps_what_knows_most(tmp_path: Path) -> None:
    head = "JobIDRaw|User|Account|Start|End|AllocTRES|NodeList\n"
    (tmp_path / "old").write_text(head + "7|u|a|2026-09-01T00:00:00Z|Unknown|cpu=1|n1\n")
    (tmp_path / "new").write_text(
        head + "7|u|a|2026-09-01T00:00:00Z|2026-09-01T00:10:00Z|cpu=1|n1\n"
    )
    one = load_accounting([tmp_path / "old", tmp_path / "new"])
    other = load_accounting([tmp_path / "new", tmp_path / "old"])
    assert one == other and one[0].end_ns is not None


def test_declared_capacity_of_a_range_is_the_same_in_windows_of_any_length(
    tmp_path: Path,
) -> None:
    """SPEC §4: declared capacity is the declared units × the window's hours inside the range,
    never raised to what was monitored. Without --to the range ends at the newest sample; one
    at 02:00 sharp closes an interval that belongs to the 02:00 window (SPEC §3), where no
    declared time is left: that window shows monitored time and no capacity, and the range
    costs 2 GPUs × 2 h whatever the window length (raising the window to what was monitored
    made the hourly bill dearer than the daily one)."""
    inv = parse_inventory(inventory_text(extra_top="", gpu_extra="capacity_units = 2"), "i")
    times = [T0 + i * 60 * NS for i in range(121)]
    gpu = [gpu_row(t, "gpu-a1", f"GPU-{g}", g, 0.5, 300.0, None, None) for t in times
           for g in (0, 1)]  # fmt: skip
    jobs = [job_row(t, "gpu-a1", "1", "u", "acme", 1.0, 1.0, 0.0) for t in times]
    tables: Tables = {"gpu": gpu, "job": jobs}
    files = write_tables(tmp_path, tables, Layout())
    bill = bill_of(tmp_path, inv, 3600)
    last = [p for p in bill.pools if p["pool"] == "gpu-own"][-1]
    assert last["window_start"] == "2026-09-01T02:00:00Z"
    assert last["capacity_unit_hours"] == 0 and last["monitored_unit_hours"] == 2 / 60
    assert last["unmonitored_unit_hours"] == 0 and last["allocation_ratio"] is None
    assert_same(bill_dict(bill), reference_bill(stored(tables), inv, 3600, files=files))
    # its energy costs money, but no capacity sat idle: there is none
    priced = parse_inventory(
        inventory_text(extra_top="", gpu_extra="capacity_units = 2\nenergy_price_per_kwh = 5"),
        "i",
    )
    last = [p for p in bill_of(tmp_path, priced, 3600).pools if p["pool"] == "gpu-own"][-1]
    assert last["cost"] > 0 and last["idle_cost"] == 0
    for window in (900, 3600, 86400):
        pools = [p for p in bill_of(tmp_path, inv, window).pools if p["pool"] == "gpu-own"]
        assert round(sum(p["capacity_unit_hours"] for p in pools), 9) == 4, window
        assert round(sum(p["monitored_unit_hours"] for p in pools), 9) == 4, window
        assert sum(Decimal(str(p["cost"])) for p in pools) == 4 * Decimal("6.5"), window


def test_unmeasured_energy_is_null_on_tenant_and_job_lines_too(tmp_path: Path) -> None:
    inv = parse_inventory(inventory_text(), "inv.toml")
    times = [T0 + i * 60 * NS for i in range(31)]
    gpu = [gpu_row(t, "gpu-a1", "GPU-0", 0, 0.5, None, None, "1") for t in times]
    jobs = [job_row(t, "gpu-a1", "1", "u", "acme", 1.0, 1.0, 0.0) for t in times]
    tables: Tables = {"gpu": gpu, "job": jobs}
    files = write_tables(tmp_path, tables, Layout())
    bill = bill_of(tmp_path, inv, 86400)
    gpu_lines = [r for r in bill.pools + bill.tenants + bill.jobs if r["pool"] == "gpu-own"]
    assert gpu_lines and all(r["energy_kwh"] is None for r in gpu_lines)
    assert_same(bill_dict(bill), reference_bill(stored(tables), inv, 86400, files=files))


@pytest.mark.parametrize("version", ["v0.0.39", "v0.0.40"])
def test_a_job_on_mps_keeps_its_sampled_gpu_allocation(version: str) -> None:
    """gres/mps counts shares of a GPU's threads (100 a GPU, as gres.conf sets it), not GPUs:
    like shards, the record leaves the GPU allocation to the samples instead of billing none."""
    text = _sacct_json([{"id": 41, "user": "ann", "account": "lab", "nodes": "gpu-a1",
                         "start": S0, "end": None, "cpus": 4, "gpus": 0}], version)  # fmt: skip
    raw = json.loads(text)
    raw["jobs"][0]["tres"]["allocated"].append(
        {"type": "gres", "name": "mps", "id": 1003, "count": 25}
    )
    (record,) = parse_sacct_json(json.dumps(raw))
    assert (record.cpus, record.gpus) == (4.0, None)
    parsable = ("JobIDRaw|User|Account|Start|End|AllocTRES|NodeList\n"
                "41|ann|lab|2026-09-01T00:00:00Z|Unknown|cpu=4,gres/mps=25|gpu-a1\n")  # fmt: skip
    (record,) = parse_sacct_parsable(parsable)
    assert (record.cpus, record.gpus) == (4.0, None)
    whole = parsable.replace("gres/mps=25", "gres/gpu=1")
    assert parse_sacct_parsable(whole)[0].gpus == 1.0


def test_a_tres_entry_of_another_shape_is_one_error_line_not_a_traceback() -> None:
    """A gres entry whose name is not a string (a foreign or damaged file) names the record;
    gres names that merely begin like a billed one (``mpsx``, ``shardy``) are not billed."""
    text = _sacct_json([{"id": 51, "user": "ann", "account": "lab", "nodes": "gpu-a1",
                         "start": S0, "end": None, "cpus": 2, "gpus": 1}], "v0.0.40")  # fmt: skip
    raw = json.loads(text)
    raw["jobs"][0]["tres"]["allocated"] += [
        {"type": "gres", "name": "mpsx", "id": 1010, "count": -2},
        {"type": "gres", "name": "shardy", "id": 1011, "count": -2},
    ]
    (record,) = parse_sacct_json(json.dumps(raw))
    assert (record.cpus, record.gpus) == (2.0, 1.0)
    raw["jobs"][0]["tres"]["allocated"].append({"type": "gres", "name": 5, "count": 1})
    with pytest.raises(TallyError, match=r"jobs\[0\]: tres.allocated name 5 is not a string"):
        parse_sacct_json(json.dumps(raw))
