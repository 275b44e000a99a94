"""The bill engine (``telemetry.bill.compute_bill``) against the plain reference of SPEC §3–4
(``tests.support.bill_reference``), on awkward generated datasets and on hand-computed cases.

Expected values come only from the reference or from hand computation. Floats are compared with
``==``: engine and reference derive them from the same integers with the same expressions, so
they must be bit-identical.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry.billing.inventory import Inventory, parse_inventory
from telemetry.billing.writers import to_json
from telemetry.errors import TallyError
from telemetry.schema import CPU_MODES
from tests.support.bill_reference import reference_bill
from tests.support.bill_rows import (
    HOUR,
    T0,
    Layout,
    Tables,
    assert_same,
    bill_dict,
    bill_of,
    cpu_row,
    gpu_row,
    iso,
    job_row,
    stored,
    write_tables,
)
from tests.support.units import NS

MS = 1_000_000

INVENTORY = """
max_gap_seconds = {gap}
currency = "CNY"

[[pool]]
name = "gpu-own"
kind = "gpu"
ownership = "own"
nodes = ["gpu-a*"]
cost_per_unit_hour = 6.5
price_per_unit_hour = 12.0

[[pool]]
name = "gpu-leased"
kind = "gpu"
ownership = "leased"
nodes = ["gpu-b*", "gpu-a9"]   # gpu-a9 is shadowed: the first matching pool wins
cost_per_unit_hour = 9.25
price_per_unit_hour = 13.7

[[pool]]
name = "cpu-own"
kind = "cpu"
ownership = "own"
nodes = ["cpu-c*"]
cost_per_unit_hour = 0.031
price_per_unit_hour = 0.055

[[pool]]
name = "cpu-gpu-hosts"
kind = "cpu"
ownership = "leased"
nodes = ["gpu-*"]
cost_per_unit_hour = 0.02
price_per_unit_hour = 0.045
"""


def inventory(max_gap_seconds: float = 60) -> Inventory:
    return parse_inventory(INVENTORY.format(gap=max_gap_seconds), "test.toml")


# --- an awkward dataset -------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpus: int  # full GPUs; a MIG instance is added to nodes with more than two
    period_s: int


NODES = (
    NodeSpec("gpu-a1", 3, 15),  # gpu-own / cpu-gpu-hosts
    NodeSpec("gpu-a2", 2, 10),  # gpu-own
    NodeSpec("gpu-b1", 2, 30),  # gpu-leased
    NodeSpec("gpu-x1", 1, 20),  # gpu unassigned, cpu-gpu-hosts
    NodeSpec("cpu-c1", 0, 30),  # cpu-own
    NodeSpec("cpu-c2", 0, 15),  # cpu-own
    NodeSpec("login1", 0, 40),  # unassigned for both kinds
)

# Alibaba GPU trace shapes: gpu_milli 460 is 0.46 of a GPU, and so on.
GPU_SHARES = (0.46, 0.25, 0.125, 0.5, 1.0, 0.05)
CPU_SHARES = (1.0, 4.0, 6.0, 0.5, 8.0, 12.0)
OWNERS = (("alice", "acme"), ("bob", "globex"), ("chen", "acme"), ("dana", "initech"))


@dataclass
class Census:
    """What the generator put in, so tests can check the dataset really is awkward."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


@dataclass
class Job:
    job_id: str
    node: str
    start: int
    end: int
    cpus: float
    gpus: float
    gpu: int | None
    user: str
    account: str
    has_rows: bool = True


def sample_times(
    rng: random.Random, start: int, end: int, period_s: int, gap_rate: float, census: Census
) -> list[int]:
    """Sample instants with jitter (ms and odd ns, for half-µs rounding ties), gaps longer than
    max_gap, and steps of exactly 60 s."""
    t = start + rng.randint(0, period_s * NS)
    out = []
    while t < end:
        out.append(t)
        r = rng.random()
        if r < gap_rate:
            step = rng.randint(61, 1500) * NS + rng.randint(0, NS)
            census.add("gap")
        elif r < 2 * gap_rate:
            step = 60 * NS
        else:
            step = period_s * NS + rng.randint(-1500, 1500) * MS + rng.choice((0, 0, 500, -1500))
        t += step
    return out


def generate(
    seed: int,
    hours: float = 3.0,
    nodes: Sequence[NodeSpec] = NODES,
    gap_rate: float = 0.01,
    restart_rate: float = 0.01,
    null_rate: float = 0.08,
    dup_rate: float = 0.02,
) -> tuple[Tables, Census]:
    """Rows of all three tables around midnight 2026-09-01 with every awkwardness of the brief."""
    rng = random.Random(seed)
    census = Census()
    span = int(hours * HOUR)
    start = T0 - span // 2 - rng.randint(0, 600) * NS
    end = start + span
    tables: Tables = {"gpu": [], "cpu": [], "job": []}
    ids = itertools.count(7001)
    node_names = [n.name for n in nodes]

    for spec in nodes:
        base = sample_times(rng, start, end, spec.period_s, gap_rate, census)

        def kept(base: list[int] = base) -> list[int]:
            return [t for t in base if rng.random() > 0.02]  # a lost sample now and then

        # jobs: one timeline per GPU (shares of it), or two slots on a cpu node
        jobs: list[Job] = []
        for slot in range(max(spec.gpus, 2)):
            t = start + rng.randint(0, 900) * NS
            while t < end:
                length = rng.randint(4, 80) * 60 * NS + rng.randint(0, NS)
                if rng.random() < 0.75:
                    user, account = rng.choice(OWNERS)
                    jobs.append(
                        Job(
                            f"{next(ids)}",
                            spec.name,
                            t,
                            t + length,
                            rng.choice(CPU_SHARES),
                            rng.choice(GPU_SHARES) if spec.gpus else 0.0,
                            slot if spec.gpus else None,
                            user,
                            account,
                            # the first job of a GPU node, and a few others, have no job rows
                            has_rows=not (spec.gpus and (not jobs or rng.random() < 0.08)),
                        )
                    )
                t += length + rng.randint(0, 20) * 60 * NS
        census.add("jobs without job rows", sum(not j.has_rows for j in jobs))

        # gpu rows: per GPU (and a MIG instance on big nodes)
        devices = [(f"GPU-{spec.name}-{g}", g) for g in range(spec.gpus)]
        if spec.gpus > 2:
            devices.append((f"MIG-{spec.name}-0-1g", 0))
        for uuid, g in devices:
            energy = rng.uniform(1e5, 1e7)
            for t in kept():
                power = rng.uniform(60.0, 690.0)
                energy += power * spec.period_s
                if rng.random() < restart_rate:
                    energy = rng.uniform(0.0, 500.0)  # driver reload
                    census.add("gpu energy restart")
                util: float | None = round(rng.random(), 2)
                if rng.random() < null_rate:
                    util = None
                    census.add("null utilisation")
                reading: float | None = energy
                if rng.random() < null_rate:
                    reading = None
                    census.add("null energy, power present")
                if rng.random() < null_rate / 4:
                    reading, power = None, None  # type: ignore[assignment]
                holder = next(
                    (
                        j.job_id
                        for j in jobs
                        if j.gpu == g and j.start <= t < j.end and uuid.startswith("GPU")
                    ),
                    None,
                )
                tables["gpu"].append(gpu_row(t, spec.name, uuid, g, util, power, reading, holder))

        # cpu rows
        cpus = 64 if spec.gpus else 96
        counters = {m: rng.uniform(1e5, 1e6) for m in CPU_MODES}
        rapl: float | None = rng.uniform(1e6, 1e8)
        for t in kept():
            if rng.random() < 0.01:
                cpus = cpus - 2 if cpus > 62 else cpus + 2  # hot-plug
            for m in CPU_MODES:
                counters[m] += rng.uniform(0, cpus * spec.period_s * 0.4)
            if rapl is not None:
                rapl += rng.uniform(100, 400) * spec.period_s
            if rng.random() < restart_rate:
                counters = {m: rng.uniform(0, 50) for m in CPU_MODES}  # reboot
                rapl = rng.uniform(0, 1000)
                census.add("cpu counter restart")
            energy = None if spec.name.startswith("login") else rapl  # RAPL root-only there
            tables["cpu"].append(cpu_row(t, spec.name, cpus, dict(counters), energy))

        # job rows, at the node's sample instants inside each job
        for j in jobs:
            if not j.has_rows:
                continue
            used = 0.0
            for t in base:
                if j.start <= t <= j.end:
                    used += rng.uniform(0, j.cpus * spec.period_s)
                    if rng.random() < restart_rate * 2:
                        used = rng.uniform(0, 5)  # requeued: the cgroup starts over
                        census.add("job cpu_seconds restart")
                    tables["job"].append(
                        job_row(t, j.node, j.job_id, j.user, j.account, j.cpus, j.gpus, used)
                    )

    # a multi-node MPI job on every cpu-only node, and a job id used twice on one node whose
    # latest rows name another account
    cpu_nodes = [n for n in nodes if not n.gpus]
    mpi_start = start + rng.randint(5, 30) * 60 * NS
    for spec in cpu_nodes:
        used = 0.0
        for k in range(rng.randint(1, 200)):
            t = mpi_start + k * spec.period_s * NS + rng.randint(0, 999) * MS
            used += rng.uniform(0, 30)
            tables["job"].append(job_row(t, spec.name, "mpi-1", "erin", "acme", 24.0, 0.0, used))
        census.add("multi-node job rows")
    if cpu_nodes:
        node = cpu_nodes[0].name
        for k, (user, account) in enumerate((("alice", "acme"), ("bob", "globex"))):
            first = start + (10 + 60 * k) * 60 * NS
            for i in range(20):
                t = first + i * 15 * NS
                tables["job"].append(job_row(t, node, "reused", user, account, 2.0, 0.0, i * 9.0))
        census.add("owner change")

    # single-sample series in every table
    t1 = start + span // 3 + 123_456_789
    tables["gpu"].append(gpu_row(t1, node_names[0], "GPU-lonely", 9, 0.9, 300.0, 1e6, "7001"))
    tables["cpu"].append(cpu_row(t1, "cpu-c9", 32, {"user": 10.0}, 5.0))
    tables["job"].append(job_row(t1, node_names[-1], "one-shot", "fay", "umbrella", 1, 0, 1))
    census.add("single sample", 3)

    # exact duplicate rows
    for name, rows in tables.items():
        copies = [dict(r) for r in rows if rng.random() < dup_rate]
        rows.extend(copies)
        census.add(f"duplicate {name}", len(copies))
    return tables, census


# --- the generated datasets against the reference ------------------------------------------------


@pytest.fixture(scope="module")
def awkward() -> tuple[Tables, Census]:
    return generate(seed=20260901)


def test_generated_dataset_has_every_awkwardness(awkward: tuple[Tables, Census]) -> None:
    tables, census = awkward
    for what in (
        "gap",
        "gpu energy restart",
        "cpu counter restart",
        "job cpu_seconds restart",
        "null utilisation",
        "null energy, power present",
        "jobs without job rows",
        "multi-node job rows",
        "owner change",
        "duplicate gpu",
        "duplicate cpu",
        "duplicate job",
    ):
        assert census.counts.get(what, 0) > 0, what
    shares = {r["gpus_allocated"] for r in tables["job"]}
    assert {0.46, 0.125, 0.05} <= shares
    times = sorted({r["time"] for r in tables["cpu"]})
    assert times[0] < T0 < times[-1]  # two dates, so two partitions per node
    node_times = sorted(r["time"] for r in tables["cpu"] if r["node"] == "cpu-c1")
    steps = [b - a for a, b in itertools.pairwise(node_times)]
    assert any(d % 1000 == 500 for d in steps)  # half-µs intervals: rounding ties
    assert any(d == 60 * NS for d in steps)  # exactly max_gap: not a gap


@pytest.mark.parametrize("window_s", [900, 3600, 86400])
def test_awkward_dataset_matches_reference(
    tmp_path: Path, awkward: tuple[Tables, Census], window_s: int
) -> None:
    tables, _ = awkward
    inv = inventory()
    files = write_tables(tmp_path, tables, Layout(seed=window_s, empty_files=[("job", "login1")]))
    bill = bill_of(tmp_path, inv, window_s)
    want = reference_bill(stored(tables), inv, window_s, files=files)
    assert_same(bill_dict(bill), want)
    # the bill is not trivial: every pool kind, unknown tenants, fractional GPUs, null ratios
    pools = {(p["pool"], p["kind"]) for p in bill.pools}
    assert {
        ("gpu-own", "gpu"),
        ("gpu-leased", "gpu"),
        ("unassigned", "gpu"),
        ("cpu-own", "cpu"),
        ("cpu-gpu-hosts", "cpu"),
        ("unassigned", "cpu"),
    } <= pools
    assert any(t["tenant"] == "unknown" for t in bill.tenants)
    # the job id used twice on cpu-c1 takes its owner from its latest row, in every window
    reused = [(j["user"], j["tenant"]) for j in bill.jobs if j["job_id"] == "reused"]
    assert reused and set(reused) == {("bob", "globex")}
    assert any(j["user"] is None for j in bill.jobs)
    assert sum(p["gap_hours"] for p in bill.pools) > 0
    assert bill.input["rows_skipped"] > 0


def test_awkward_dataset_with_smaller_max_gap_and_many_chunks(
    tmp_path: Path, awkward: tuple[Tables, Census]
) -> None:
    tables, _ = awkward
    inv = inventory(max_gap_seconds=16.5)  # most 15–30 s steps of slow nodes become gaps
    files = write_tables(tmp_path, tables, Layout(seed=5, files_per_partition=2))
    bill = bill_of(tmp_path, inv, 3600, budget_rows=2000)
    want = reference_bill(stored(tables), inv, 3600, files=files)
    assert_same(bill_dict(bill), want)


def test_empty_tables_and_single_samples(tmp_path: Path) -> None:
    """A job table holding only an empty file, and series of a single sample."""
    t = T0 + 10 * NS
    tables: Tables = {
        "gpu": [
            gpu_row(t, "gpu-a1", "GPU-0", 0, 0.5, 200.0, 100.0, "9"),
            gpu_row(t + 15 * NS, "gpu-a1", "GPU-0", 0, 0.25, 200.0, 4100.0, "9"),
            gpu_row(t, "gpu-a1", "GPU-1", 1, 0.5, 200.0, 100.0, None),  # one sample only
        ],
        "cpu": [cpu_row(t, "cpu-c1", 8, {"user": 1.0}, 1.0)],  # one sample only
    }
    inv = inventory()
    files = write_tables(tmp_path, tables, Layout(empty_files=[("job", "cpu-c1")]))
    bill = bill_of(tmp_path, inv, 3600)
    want = reference_bill(stored(tables), inv, 3600, files=files)
    assert_same(bill_dict(bill), want)
    # by hand: 15 s of one GPU, 3.75 s busy, 4000 J, job 9 has no job rows
    # a pool with a single sample opens its series only: listed, with nothing in it
    assert [(p["pool"], p["capacity_unit_hours"]) for p in bill.pools] == [
        ("gpu-own", 15 / 3600),
        ("cpu-own", 0.0),
    ]
    assert bill.pools[0]["busy_unit_hours"] == 3_750_000 / 3_600_000_000
    assert bill.pools[0]["energy_kwh"] == 4_000_000 / 3_600_000_000
    assert bill.pools[0]["allocation_ratio"] == 0.0
    assert bill.pools[0]["unit_cost"] is None and bill.pools[0]["gross_margin_ratio"] is None
    # 15/3600 h × 6.5 = 0.02708… → 0.03, rounded once at output (currency_decimals 2)
    assert bill.pools[0]["idle_cost"] == bill.pools[0]["cost"] == 0.03
    assert bill.tenants == [
        {
            "window_start": "2026-09-01T00:00:00Z",
            "window_end": "2026-09-01T01:00:00Z",
            "pool": "gpu-own",
            "tenant": "unknown",
            "allocated_unit_hours": 0.0,
            "busy_unit_hours": 3_750_000 / 3_600_000_000,
            "efficiency_ratio": None,
            "energy_kwh": 4_000_000 / 3_600_000_000,
            "charge": 0.0,
            "waste_charge": 0.0,
        }
    ]
    assert [(j["job_id"], j["user"], j["tenant"]) for j in bill.jobs] == [("9", None, "unknown")]
    assert bill.input == {
        "files": files,
        "rows": 4,
        "rows_skipped": 0,
        "files_quarantined": 0,
        "rows_out_of_range": {},
        "reconciliation": None,
    }


def test_dataset_of_empty_files_bills_nothing(tmp_path: Path) -> None:
    empty = [("gpu", "gpu-a1"), ("cpu", "cpu-c1"), ("job", "cpu-c1")]
    files = write_tables(tmp_path, {}, Layout(empty_files=empty))
    inv = inventory()
    bill = bill_of(tmp_path, inv, 3600)
    assert bill.pools == bill.tenants == bill.jobs == []
    assert bill.input == {
        "files": 3,
        "rows": 0,
        "rows_skipped": 0,
        "files_quarantined": 0,
        "rows_out_of_range": {},
        "reconciliation": None,
    }
    assert_same(bill_dict(bill), reference_bill({}, inv, 3600, files=files))


# --- hand-computed bills ------------------------------------------------------------------------


def test_hand_computed_bill_with_fractional_gpu_and_both_pools(tmp_path: Path) -> None:
    """One GPU node, 0.46 of a GPU and 6 cores allocated to one job, 30 s steps, one restart."""
    t = T0 + 3000 * NS  # 00:50:00
    gpu = [
        gpu_row(t, "gpu-a1", "GPU-0", 0, 0.5, 250.0, 1000.0, "42"),
        gpu_row(t + 30 * NS, "gpu-a1", "GPU-0", 0, 0.5, 250.0, 8500.0, "42"),  # +7500 J
        gpu_row(t + 60 * NS, "gpu-a1", "GPU-0", 0, None, 250.0, 300.0, "42"),  # restart: 300 J
        gpu_row(t + 90 * NS, "gpu-a1", "GPU-0", 0, 1.0, 100.0, None, None),  # power: 3000 J
    ]
    job = [
        job_row(t, "gpu-a1", "42", "ann", "acme", 6.0, 0.46, 100.0),
        job_row(t + 30 * NS, "gpu-a1", "42", "ann", "acme", 6.0, 0.46, 160.0),
        job_row(t + 60 * NS, "gpu-a1", "42", "ann", "acme", 6.0, 0.46, 250.0),
    ]
    tables: Tables = {"gpu": gpu, "job": job}
    inv = inventory()
    write_tables(tmp_path, tables, Layout(files_per_partition=1))
    bill = bill_of(tmp_path, inv, 3600)
    assert_same(bill_dict(bill), reference_bill(stored(tables), inv, 3600, files=2))

    # 0.46 is stored as float32 0.4600000083…; · 30 s = 13_800_000.25… µs → 13_800_000
    assert round(float(pa.scalar(0.46, pa.float32()).as_py()) * 30e6) == 13_800_000
    by_pool = {p["pool"]: p for p in bill.pools}
    assert set(by_pool) == {"gpu-own", "cpu-gpu-hosts"}
    g = by_pool["gpu-own"]
    assert g["capacity_unit_hours"] == 90_000_000 / 3.6e9
    assert g["busy_unit_hours"] == (15_000_000 + 0 + 30_000_000) / 3.6e9
    assert g["energy_kwh"] == (7_500_000 + 300_000 + 3_000_000) / 3.6e9
    assert g["allocated_unit_hours"] == 27_600_000 / 3.6e9
    c = by_pool["cpu-gpu-hosts"]
    assert c["capacity_unit_hours"] == 0.0  # no cpu rows: only allocation
    assert c["allocated_unit_hours"] == 360_000_000 / 3.6e9
    assert c["allocation_ratio"] is None
    jobs = {(j["pool"], j["job_id"]): j for j in bill.jobs}
    assert jobs["gpu-own", "42"]["energy_kwh"] == 7_800_000 / 3.6e9  # the last row has no job
    assert jobs["gpu-own", "42"]["busy_unit_hours"] == 15_000_000 / 3.6e9
    assert jobs["cpu-gpu-hosts", "42"]["busy_unit_hours"] == 150_000_000 / 3.6e9  # used cores
    assert jobs["cpu-gpu-hosts", "42"]["energy_kwh"] is None
    # 0.1 core-h × 0.045 = 0.0045: half a cent rounds to even, 0.00
    assert jobs["cpu-gpu-hosts", "42"]["charge"] == 0.0


def test_from_to_selects_the_instants_between_hand_computed(tmp_path: Path) -> None:
    """--from 00:30 --to 02:45: the intervals whose t_i lies in [00:30, 02:45) count, in the
    windows 00:00, 01:00 and 02:00 (the first and last only in part: SPEC §4, a range billed to
    an instant).

    gpu-a1 GPU-0 samples: 00:10:00, 00:59:30, 01:00:00, 01:00:30, 01:59:50, 02:00:00, 02:00:20.
    - (00:10:00, 00:59:30] is a gap of 2970 s ending inside the range: gap_hours of window 00:00;
    - (00:59:30, 01:00:00] and (01:00:00, 01:00:30]: 30 s each in window 01:00;
    - (01:00:30, 01:59:50] is a gap of 3560 s;
    - (01:59:50, 02:00:00] and (02:00:00, 02:00:20]: 10 s and 20 s in window 02:00.
    cpu-c1 samples 00:00:00 then 01:30:00: a gap opened before the start, closed inside it.
    """
    hhmmss = [(0, 10, 0), (0, 59, 30), (1, 0, 0), (1, 0, 30), (1, 59, 50), (2, 0, 0), (2, 0, 20)]
    times = [T0 + (h * 3600 + m * 60 + s) * NS for h, m, s in hhmmss]
    gpu = [
        gpu_row(t, "gpu-a1", "GPU-0", 0, 0.5, 100.0, 1000.0 * i, "7") for i, t in enumerate(times)
    ]
    job = [job_row(t, "gpu-a1", "7", "ann", "acme", 2.0, 1.0, 0.0) for t in times[1:4]]
    job.append(job_row(T0 + 3 * HOUR, "gpu-a1", "7", "bob", "globex", 2.0, 1.0, 0.0))  # after
    cpu = [
        cpu_row(T0, "cpu-c1", 4, {"user": 0.0}, 0.0),
        cpu_row(T0 + 5400 * NS, "cpu-c1", 4, {"user": 10.0}, 10.0),
    ]
    tables: Tables = {"gpu": gpu, "cpu": cpu, "job": job}
    inv = inventory()
    files = write_tables(tmp_path, tables, Layout(files_per_partition=1))
    bill = bill_of(tmp_path, inv, 3600, "2026-09-01T00:30:00Z", "2026-09-01T02:45:00")
    lo, hi = T0 + 1800 * NS, T0 + (2 * 3600 + 45 * 60) * NS
    assert_same(bill_dict(bill), reference_bill(stored(tables), inv, 3600, lo, hi, files))

    pools = {(p["window_start"][11:16], p["pool"]): p for p in bill.pools}
    assert {w for w, _ in pools} == {"00:00", "01:00", "02:00"}
    assert pools["00:00", "gpu-own"]["capacity_unit_hours"] == 0.0
    assert pools["00:00", "gpu-own"]["gap_hours"] == 2970 / 3600
    g = pools["01:00", "gpu-own"]
    assert g["capacity_unit_hours"] == 60_000_000 / 3.6e9
    assert g["busy_unit_hours"] == 30_000_000 / 3.6e9
    assert g["energy_kwh"] == 2_000_000 / 3.6e9
    assert g["gap_hours"] == 3_560_000_000 / 3.6e9
    assert g["allocated_unit_hours"] == 60_000_000 / 3.6e9  # job rows 01:00:00 and 01:00:30
    assert pools["02:00", "gpu-own"]["capacity_unit_hours"] == 30 / 3600
    c = pools["01:00", "cpu-own"]
    assert c["capacity_unit_hours"] == 0.0
    assert c["gap_hours"] == 5_400_000_000 / 3.6e9
    # the job's latest row (after --to) names bob/globex
    assert {(j["pool"], j["user"], j["tenant"]) for j in bill.jobs} == {
        ("gpu-own", "bob", "globex"),
        ("cpu-gpu-hosts", "bob", "globex"),
    }
    # only one bound: the other side is open
    for start, end, lo_, hi_ in (
        ("2026-09-01T01:00:00Z", None, T0 + HOUR, None),
        (None, "02:00", None, T0 + 2 * HOUR),
    ):
        end_text = None if end is None else f"2026-09-01T{end}:00Z"
        one = bill_of(tmp_path, inv, 3600, start, end_text)
        assert_same(bill_dict(one), reference_bill(stored(tables), inv, 3600, lo_, hi_, files))
    # an empty range is bad input
    with pytest.raises(TallyError):
        bill_of(tmp_path, inv, 3600, "2026-09-01T00:50:00Z", "2026-09-01T00:50:00Z")


# --- properties ---------------------------------------------------------------------------------

SMALL_NODES = (
    NodeSpec("gpu-a1", 2, 15),
    NodeSpec("gpu-b7", 1, 20),
    NodeSpec("cpu-c1", 0, 30),
    NodeSpec("login1", 0, 20),
)


@dataclass(frozen=True)
class Small:
    """Parameters of a small generated dataset (drawn by hypothesis, generated in the test)."""

    seed: int
    nodes: tuple[NodeSpec, ...]
    hours: float
    max_gap: float

    def tables(self) -> Tables:
        tables, _ = generate(
            self.seed,
            hours=self.hours,
            nodes=self.nodes,
            gap_rate=0.03,
            restart_rate=0.03,
            dup_rate=0.05,
        )
        return tables


small_datasets = st.builds(
    Small,
    seed=st.integers(0, 2**32 - 1),
    nodes=st.lists(st.sampled_from(SMALL_NODES), min_size=1, max_size=4, unique=True).map(tuple),
    hours=st.sampled_from([0.6, 1.3, 2.2]),
    max_gap=st.sampled_from([60, 60, 31.5]),
)


PROPERTY = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def with_dataset(tables: Tables, layout: Layout, use: Callable[[Path, int], None]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        use(root, write_tables(root, tables, layout))


@PROPERTY
@given(small_datasets, st.integers(0, 1000), st.integers(0, 1000), st.sampled_from([1, 2, 4]))
def test_resplitting_rows_gives_the_same_bytes_and_the_reference(
    data: Small, seed_a: int, seed_b: int, files: int
) -> None:
    tables = data.tables()
    inv = inventory(data.max_gap)
    outputs: list[bytes] = []

    def bill(root: Path, n_files: int) -> None:
        result = bill_of(root, inv, 3600)
        outputs.append(to_json(result))
        want = reference_bill(stored(tables), inv, 3600, files=n_files)
        assert_same(bill_dict(result), want)

    with_dataset(tables, Layout(seed_a, files, [("cpu", "login1")]), bill)
    with_dataset(tables, Layout(seed_b, files, [("cpu", "login1")]), bill)
    assert outputs[0] == outputs[1]


@PROPERTY
@given(small_datasets, st.sampled_from([10, 40, 250]), st.booleans())
def test_tiny_chunk_budget_gives_the_same_bytes(
    data: Small, budget_rows: int, in_time_order: bool
) -> None:
    """Hundreds of chunks read the same bill as one. (Every chunk re-reads each row group that
    overlaps it, so shuffled files with the smallest budget would be slow: those are time-ordered.)
    """
    tables = data.tables()
    inv = inventory(data.max_gap)
    layout = Layout(budget_rows, 2, in_time_order=in_time_order or budget_rows < 40)

    def check(root: Path, _: int) -> None:
        chunks: dict[str, int] = {}

        def progress(name: str) -> Callable[[int, int, int], None]:
            return lambda done, total, rows: chunks.__setitem__(name, total)

        default = to_json(bill_of(root, inv, 3600, progress=progress("default")))
        tiny = to_json(bill_of(root, inv, 3600, budget_rows=budget_rows, progress=progress("tiny")))
        assert tiny == default
        body = json.loads(default)
        assert body["pools"]  # something was billed
        assert chunks["default"] == 1
        if body["input"]["rows"] > 4 * budget_rows:
            assert chunks["tiny"] > 2

    with_dataset(tables, layout, check)


POOL_SUMS = (
    "capacity_unit_hours",
    "allocated_unit_hours",
    "busy_unit_hours",
    "energy_kwh",
    "cost",
    "revenue",
    "gap_hours",
)
PARTY_SUMS = ("allocated_unit_hours", "busy_unit_hours", "energy_kwh", "charge")
MONEY = {"cost", "revenue", "idle_cost", "charge", "waste_charge", "energy_cost"}


def day_totals(rows: list[dict[str, Any]], keys: Sequence[str], fields: Sequence[str]) -> dict:
    out: dict[tuple[Any, ...], dict[str, float | None]] = {}
    for r in rows:
        key = (r["window_start"][:10], *(r[k] for k in keys))
        sums = out.setdefault(key, {})
        for f in fields:
            if r[f] is None:  # none measured in that window: adds nothing, null only if all are
                sums.setdefault(f, None)
            else:
                sums[f] = (sums.get(f) or 0.0) + r[f]
    return out


@PROPERTY
@given(small_datasets)
def test_hourly_bills_sum_to_the_daily_bill(data: Small) -> None:
    tables = data.tables()
    inv = inventory(data.max_gap)

    def check(root: Path, _: int) -> None:
        hourly = bill_of(root, inv, 3600)
        daily = bill_of(root, inv, 86400)
        assert {p["window_start"][11:] for p in daily.pools} <= {"00:00:00Z"}
        for kind, keys, fields in (
            ("pools", ("pool", "kind"), POOL_SUMS),
            ("tenants", ("pool", "tenant"), PARTY_SUMS),
            ("jobs", ("pool", "job_id", "user", "tenant"), PARTY_SUMS),
        ):
            summed = day_totals(getattr(hourly, kind), keys, fields)
            whole = day_totals(getattr(daily, kind), keys, fields)
            assert summed.keys() == whole.keys(), kind
            for key, sums in whole.items():
                for f, value in sums.items():
                    other = summed[key][f]
                    # money is rounded once per line: 24 hourly lines may drift half a cent each
                    drift = 0.005 * 24 + 1e-9 if f in MONEY else 1e-15
                    if value is None or other is None:
                        assert value is other, (kind, key, f)
                    else:
                        assert math.isclose(other, value, rel_tol=1e-9, abs_tol=drift), (
                            kind,
                            key,
                            f,
                            other,
                            value,
                        )

    with_dataset(tables, Layout(files_per_partition=2), check)


@PROPERTY
@given(
    small_datasets,
    st.integers(-2, 1),
    st.integers(0, 2),
    st.integers(0, 2),
    st.integers(0, 3599),
    st.integers(0, 3599),
)
def test_bill_of_a_range_is_the_sum_of_its_parts(
    data: Small, a_h: int, ab_h: int, bc_h: int, early_s: int, late_s: int
) -> None:
    """[a, c) = [a, b) followed by [b, c) for any instants a < b < c: every interval, tenant and
    job line lands in exactly one part; a window cut by b appears in both, each with its own
    part."""
    tables = data.tables()
    inv = inventory(data.max_gap)
    a = T0 + a_h * HOUR + early_s * NS
    b = T0 + (a_h + ab_h + 1) * HOUR
    c = b + (bc_h + 1) * HOUR + late_s * NS

    def check(root: Path, files: int) -> None:
        whole = bill_of(root, inv, 3600, iso(a), iso(c))
        first = bill_of(root, inv, 3600, iso(a), iso(b))
        second = bill_of(root, inv, 3600, iso(b), iso(c))
        for kind in ("tenants", "jobs"):
            assert getattr(whole, kind) == getattr(first, kind) + getattr(second, kind), kind
        # b is hour-aligned here: no window is cut, so each pool line is in one part
        if early_s == late_s == 0:
            whole_lines = [p for p in whole.pools if _holds_samples(p)]
            parts = [p for p in first.pools + second.pools if _holds_samples(p)]
            assert whole_lines == parts
        want = reference_bill(stored(tables), inv, 3600, a, c, files)
        assert_same(bill_dict(whole), want)

    with_dataset(tables, Layout(files_per_partition=2), check)


def _holds_samples(pool: dict[str, Any]) -> bool:
    keys = ("monitored_unit_hours", "allocated_unit_hours", "busy_unit_hours", "gap_hours")
    return any(pool[k] for k in keys)


def test_conflicting_duplicates_do_not_depend_on_read_order(tmp_path: Path) -> None:
    """Rows with the same series and time but other values: the same one wins in any order."""
    from tests.support.tables import T0, gpu_table, write_dataset

    times = [float(t) for t in range(0, 600, 30)]
    base = gpu_table("gpu-a1", "GPU-x", 0, times, util=0.5, job_id="7")
    other = gpu_table("gpu-a1", "GPU-x", 0, times[5:8], util=0.9, job_id="8")
    outputs = []
    for first, second in ((base, other), (other, base)):
        root = tmp_path / f"d{len(outputs)}"
        write_dataset(root, "gpu", first, name="a")
        write_dataset(root, "gpu", second, name="b")
        outputs.append(to_json(bill_of(root, inventory(), 3600)))
    assert outputs[0] == outputs[1]
    bill = json.loads(outputs[0])
    assert bill["input"]["rows_skipped"] == 3
    # Sorted by every column, util 0.5 sorts before 0.9: 19 intervals at 0.5 remain.
    (pool,) = [p for p in bill["pools"] if p["kind"] == "gpu"]
    assert pool["busy_unit_hours"] * 3600 == pytest.approx(19 * 30 * 0.5)
    assert T0 % NS == 0
