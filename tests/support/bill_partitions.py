"""Datasets for the partitioned bill (SPEC §9): several nodes with every awkwardness a merge could
get wrong — duplicates, gaps, counter restarts, a job on several nodes, a job whose owner
changes, shared GPUs, a MIG instance on the gpu-b nodes — written in any split, and sacct records
for some of the jobs."""

from __future__ import annotations

import os
import random
import signal
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from telemetry.billing.partition_tasks import BillPart, BillTask, bill_partition
from telemetry.store.layout import quarantine
from tests.support.bill_rows import T0, Tables, arrow, cpu_row, gpu_job_row, gpu_row, job_row
from tests.support.units import NS

INVENTORY = """
max_gap_seconds = 60
currency = "EUR"
currency_decimals = 2

[[pool]]
name = "gpu-own"
kind = "gpu"
ownership = "own"
nodes = ["gpu-a*"]
cost_per_unit_hour = 2.1
price_per_unit_hour = 3.3
capacity_units = 5
energy_price_per_kwh = 0.27
pue = 1.3

[[pool]]
name = "gpu-leased"
kind = "gpu"
ownership = "leased"
nodes = ["gpu-b*"]
cost_per_unit_hour = 2.9
price_per_unit_hour = 4.1

[[pool]]
name = "cpu"
kind = "cpu"
ownership = "own"
nodes = ["*"]
cost_per_unit_hour = 0.02
price_per_unit_hour = 0.05

[[contract]]
tenant = "acme"
pool = "gpu-*"
discount_ratio = 0.15
"""

OWNERS = (("alice", "acme"), ("bob", "globex"), ("chen", "acme"), ("dana", "initech"))


def generate(seed: int, nodes: int = 5, hours: float = 1.5) -> Tables:
    """Rows of gpu, cpu, job and gpu_job tables for ``nodes`` nodes around T0."""
    rng = random.Random(seed)
    start = T0 - int(hours * 1800) * NS
    end = start + int(hours * 3600) * NS
    tables: Tables = {"gpu": [], "cpu": [], "job": [], "gpu_job": []}
    names = [("gpu-a" if i % 3 != 2 else "gpu-b") + str(i) for i in range(nodes - 1)] + ["cpu-c1"]
    for n, node in enumerate(names):
        period = rng.choice((10, 15, 30))
        times = []
        t = start + rng.randint(0, period) * NS + rng.randint(0, NS)
        while t < end:
            times.append(t)
            r = rng.random()
            gap = r < 0.03
            t += (rng.randint(61, 900) if gap else period) * NS + rng.randint(-900, 900) * 10**6
        gpus = 0 if node.startswith("cpu") else 2
        # jobs: one on each GPU in turn, and "mpi-1" on every node (a job on several nodes)
        jobs = [(str(1000 * (n + 1) + k), k % 2, rng.choice(OWNERS)) for k in range(4)]
        span = (end - start) // 4
        for g in range(gpus):
            energy = rng.uniform(1e5, 1e6)
            for t in times:
                if rng.random() < 0.02:
                    continue  # a lost sample
                power = rng.uniform(60, 700)
                energy += power * period
                if rng.random() < 0.02:
                    energy = rng.uniform(0, 100)  # a driver reload restarts the counter
                k = min(3, (t - start) // span)
                holder = jobs[k][0] if jobs[k][1] == g else None
                util = None if rng.random() < 0.05 else round(rng.random(), 2)
                row = gpu_row(t, node, f"GPU-{node}-{g}", g, util, power, energy, holder)
                if node.startswith("gpu-b") and g == 1:  # a MIG 3g instance: 3/7 of a GPU
                    row.update(capacity_units=3 / 7, mig_profile="3g.40gb")
                tables["gpu"].append(row)
                if g == 1 and k == 2:  # GPU 1 shared by two pods in the third quarter
                    tables["gpu_job"] += [
                        gpu_job_row(t, node, f"GPU-{node}-1", f"pod-{n}-a", 0.5, None),
                        gpu_job_row(t, node, f"GPU-{node}-1", f"pod-{n}-b", 0.25, None),
                    ]
        counters = {"user": rng.uniform(1e4, 1e5), "system": rng.uniform(1e3, 1e4)}
        for t in times:
            for mode in counters:
                counters[mode] += rng.uniform(0, 32 * period * 0.5)
            if rng.random() < 0.02:
                counters = {m: rng.uniform(0, 10) for m in counters}  # a reboot
            tables["cpu"].append(cpu_row(t, node, 32, dict(counters), None))
        for k, (job, _, (user, account)) in enumerate(jobs):
            used = 0.0
            for t in times[k * len(times) // 4 : (k + 1) * len(times) // 4]:
                used += rng.uniform(0, 4 * period)
                if rng.random() < 0.03:
                    used = 1.0  # requeued: the cgroup starts over
                tables["job"].append(job_row(t, node, job, user, account, 4.0, 1.0, used))
        for i, t in enumerate(times[: len(times) // 2]):
            # a multi-node job whose owner changes half-way (the newest row names it)
            user, account = ("erin", "acme") if i < len(times) // 4 else ("fay", "initech")
            tables["job"].append(job_row(t, node, "777", user, account, 8.0, 0.0, i * 3.0))
    for rows in tables.values():  # exact duplicates
        rows.extend([dict(r) for r in rows if rng.random() < 0.03])
    return tables


def write_split(root: Path, tables: Tables, seed: int, stray: bool = False) -> None:
    """Each (table, node) shuffled over 1–3 files under ``node=`` directories, one per day, with
    random row groups; with ``stray`` some rows of one node go into another node's directory
    (a series crossing partitions)."""
    rng = random.Random(seed)
    for name, rows in tables.items():
        by_dir: dict[Path, list[dict[str, object]]] = {}
        for row in rows:
            node = str(row["node"])
            if stray and node.endswith("1") and rng.random() < 0.2:
                node = "cpu-c1" if node != "cpu-c1" else "gpu-a0"
            day = datetime.fromtimestamp(int(row["time"]) // NS, tz=UTC).strftime("%Y-%m-%d")
            by_dir.setdefault(root / name / f"date={day}" / f"node={node}", []).append(row)
        for directory, part in sorted(by_dir.items()):
            directory.mkdir(parents=True, exist_ok=True)
            rng.shuffle(part)
            files = rng.randint(1, 3)
            for i in range(files):
                chunk = part[i::files]
                if chunk:
                    pq.write_table(arrow(name, chunk), directory / f"part-{i}.parquet",
                                   row_group_size=rng.randint(1, len(chunk)))  # fmt: skip


def sacct_parsable(tables: Tables) -> str:
    """``sacct --parsable2`` records for every third job of the job rows (multi-node job 777
    among them, with its nodes as a hostlist), one still running."""
    spans: dict[str, tuple[int, int, set[str]]] = {}
    for row in tables["job"]:
        low, high, nodes = spans.get(row["job_id"], (row["time"], row["time"], set()))
        nodes.add(row["node"])
        spans[row["job_id"]] = (min(low, row["time"]), max(high, row["time"]), nodes)

    def when(ns: int | None) -> str:
        if ns is None:
            return "Unknown"
        return datetime.fromtimestamp(ns // NS, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")

    lines = ["JobIDRaw|User|Account|Start|End|AllocTRES|NodeList"]
    for i, (job, (low, high, nodes)) in enumerate(sorted(spans.items())):
        if i % 3:
            continue
        end = None if i % 2 else high + 90 * NS
        lines.append(f"{job}|acct-user|lab|{when(low - 120 * NS)}|{when(end)}|"
                     f"cpu=6,gres/gpu=1|{','.join(sorted(nodes))}")  # fmt: skip
    return "\n".join(lines) + "\n"


# --- a node cut into time slices: everything awkward exactly on a cut ---------------------------

BOUNDARY_NODE = "gpu-a0"
HOUR = 3600 * NS
CUTS = (T0 + HOUR, T0 + 2 * HOUR, T0 + 3 * HOUR)


def boundary_tables() -> tuple[Tables, Tables]:
    """One node's rows over four hours at 10 s with, exactly on the cuts ``CUTS``: a duplicate
    (the same series and time, other values), a GPU energy counter restart, a CPU reboot and a
    requeued job (counters start over), a gap whose previous row lies beyond the max gap (60 s)
    before the cut, a GPU silent for a whole slice, intervals of exactly the max gap whose
    previous row lies exactly one max gap before the cut, a GPU shared by two pods and a job
    whose owner changes. Returns the rows and, apart, the duplicates (for their own files)."""
    b1, b2, b3 = CUTS
    node = BOUNDARY_NODE
    rows: Tables = {"gpu": [], "cpu": [], "job": [], "gpu_job": []}
    dups: Tables = {"gpu": [], "cpu": [], "job": [], "gpu_job": []}
    times = list(range(T0, T0 + 4 * HOUR + 1, 10 * NS))
    energy = [5e5, 7e5]
    for t in times:
        for g in range(2):
            if g == 0 and b2 - 60 * NS < t < b2:
                continue  # an interval of exactly the max gap, closed on the cut
            if g == 1 and (b1 - 300 * NS < t < b1 or b2 - 600 * NS < t < b3 + 100 * NS):
                continue  # a gap closed on the cut; silent through the whole second slice
            energy[g] += 300.0 * 10
            if g == 0 and t == b1:
                energy[g] = 42.0  # the driver reloaded: the counter starts over on the cut
            util = ((t // NS) % 7) / 10
            job = "42" if g == 0 else None
            rows["gpu"].append(gpu_row(t, node, f"GPU-{node}-{g}", g, util, 300.0, energy[g], job))
            if g == 0 and t in (b1, b3):
                dups["gpu"].append(
                    gpu_row(t, node, f"GPU-{node}-{g}", g, 0.95, 310.0, energy[g] + 1, job)
                )
        if b1 - 30 * NS <= t <= b1 + 30 * NS:  # GPU 0 shared by two pods across the cut
            rows["gpu_job"] += [
                gpu_job_row(t, node, f"GPU-{node}-0", "pod-x", 0.5, None),
                gpu_job_row(t, node, f"GPU-{node}-0", "pod-y", 0.25, None),
            ]
    counters = {"user": 5e4, "system": 4e3}
    for t in times:
        if b3 - 200 * NS < t < b3:
            continue  # a CPU gap closed on the third cut
        for mode in counters:
            counters[mode] += 40.0
        if t == b1:
            counters = {"user": 3.0, "system": 1.0}  # a reboot on the cut
        rows["cpu"].append(cpu_row(t, node, 32, dict(counters), None))
        if t == b1:
            dups["cpu"].append(cpu_row(t, node, 32, {"user": 9.0, "system": 2.0}, None))
    used = 0.0
    for t in times:
        used = 1.0 if t == b1 else used + 25.0  # requeued on the cut: the cgroup starts over
        user, account = ("erin", "acme") if t < b2 else ("fay", "initech")
        rows["job"].append(job_row(t, node, "42", user, account, 4.0, 1.0, used))
    for t in (b1 - 120 * NS, b1 - 60 * NS, b1):  # exactly the max gap, then its newest row twice
        rows["job"].append(job_row(t, node, "43", "zed", "globex", 2.0, 0.0, t / NS % 1000))
    dups["job"].append(job_row(b1, node, "43", "amy", "acme", 2.0, 0.0, 7.0))
    return rows, dups


def write_hourly(root: Path, tables: Tables, extra: Tables) -> None:
    """Rows in the daemon's layout: one file per table, node and hour (named by the hour), and
    ``extra`` rows in a second file of their hour."""
    for name in tables:
        for suffix, rows in (("", tables[name]), ("-b", extra[name])):
            by_hour: dict[int, list[dict[str, object]]] = {}
            for row in rows:
                by_hour.setdefault(int(row["time"]) // HOUR, []).append(row)
            for hour, part in sorted(by_hour.items()):
                stamp = datetime.fromtimestamp(hour * 3600, tz=UTC)
                directory = root / name / f"date={stamp:%Y-%m-%d}" / f"node={part[0]['node']}"
                directory.mkdir(parents=True, exist_ok=True)
                pq.write_table(
                    arrow(name, part), directory / f"part-{stamp:%Y%m%dT%H%M%SZ}{suffix}.parquet"
                )


def bill_or_die(task: BillTask) -> BillPart:
    """``bill_partition`` run in a pool worker that then SIGKILLs itself before it returns (a
    worker killed mid-run): once where ``die-once`` lies beside the dataset (the task that
    removes it dies), every time where ``die-always`` does."""
    part = bill_partition(task)
    beside = task.root.parent
    try:
        (beside / "die-once").unlink()
    except FileNotFoundError:
        if not (beside / "die-always").exists():
            return part
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: the process was killed")


def set_aside_then_die(task: BillTask) -> BillPart:
    """``bill_partition`` in a pool worker; the first task to read the file that
    ``set-aside-then-die`` beside the dataset names moves it to quarantine/ (as a scan does with
    a file it finds damaged) and SIGKILLs its own process: a worker lost after it set a file
    aside, whose task then runs again without the file."""
    marker = task.root.parent / "set-aside-then-die"
    try:
        name = marker.read_text()
    except FileNotFoundError:
        return bill_partition(task)
    if name not in task.files:
        return bill_partition(task)
    try:  # one task claims it
        marker.rename(marker.with_name("set-aside-then-die.claimed"))
    except FileNotFoundError:
        return bill_partition(task)
    quarantine(task.root, task.root / name, "damaged (a test)")
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: the process was killed")
