"""``tally demo DIR``: a small, realistic demo dataset for the tour, demos and tests.

Job shapes (CPU, whole and fractional GPUs, QoS class, duration) are 400 pods of the public
Alibaba GPU cluster trace 2023 (Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing
Workloads with Fragmentation Gradient Descent", USENIX ATC '23), kept in ``demo_shapes.csv``.
The trace has allocations only; utilisation is generated per QoS class (latency-sensitive
services run light, best-effort training runs hot, a few jobs sit allocated and idle), and the
last node misses 20 minutes of samples, so a bill, a report and a replay of the demo show
pools, tenants, waste and gaps the way a real cluster does.

Besides the samples it writes what an invoice needs: ``inventory.toml`` with declared capacity,
a time zone, a contract and energy prices, and ``sacct.json``, the scheduler's accounting of the
Slurm jobs (``sacct --json``, data_parser v0.0.42 shape) with their exact start and end, which
the 30 s samples only see to the tick. Fractional GPUs get ``gpu_job`` rows (SPEC §2); the last
node of four or more is a Kubernetes node whose jobs are pods (``<namespace>/<pod>``), which
Slurm's accounting does not know.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from telemetry.schema import CPU_MODES, validate
from telemetry.store.layout import partition_dir

NS = 1_000_000_000
SHAPES = Path(__file__).with_name("demo_shapes.csv")
TENANTS = {
    "LS": "inference-co",
    "BE": "research-lab",
    "Burstable": "startup-x",
    "Guaranteed": "bank-y",
}
INVENTORY = """max_gap_seconds = 90
currency = "USD"
currency_decimals = 2
timezone = "Asia/Shanghai"

[[pool]]
name = "h100-own"
kind = "gpu"
ownership = "own"
nodes = ["gpu-a*"]
cost_per_unit_hour = 1.90
price_per_unit_hour = 2.80
capacity_units = {own_gpus}
energy_price_per_kwh = 0.09
pue = 1.3
grid_gco2_per_kwh = 540

[[pool]]
name = "h100-leased"
kind = "gpu"
ownership = "leased"
nodes = ["gpu-b*"]
cost_per_unit_hour = 2.40
price_per_unit_hour = 2.80
capacity_units = {leased_gpus}

[[pool]]
name = "cpu"
kind = "cpu"
ownership = "own"
nodes = ["*"]
cost_per_unit_hour = 0.012
price_per_unit_hour = 0.030
capacity_units = {cores}

[[contract]]
tenant = "research-lab"
pool = "h100-*"
discount_ratio = 0.15
"""


@dataclass
class _Job:
    job_id: str
    node: int
    gpus: list[int]
    share: float  # of each GPU
    cpus: float
    account: str
    start: int
    end: int
    busy: float
    cpu_use: float  # share of its allocated cores it keeps busy, before the daily cycle


def _shapes() -> list[dict[str, str]]:
    with open(SHAPES, newline="") as f:
        return list(csv.DictReader(f))


def _schedule(
    nodes: int, gpus: int, steps: int, interval: int, rng: np.random.Generator
) -> list[_Job]:
    """Place trace jobs onto GPUs over time: whole GPUs exclusive, fractions packed together."""
    free_at = np.zeros((nodes, gpus))  # step when each GPU frees up
    used = np.zeros((nodes, gpus))  # share in use while busy
    jobs: list[_Job] = []
    for i, shape in enumerate(_shapes() * 4):
        want, milli = int(shape["num_gpu"]), int(shape["gpu_milli"])
        if want == 0:
            continue
        share = milli / 1000 if want == 1 else 1.0
        node = i % nodes
        start = int(free_at[node].min())
        if start >= steps:
            continue
        duration = int(np.clip(int(shape["duration_s"]), 1200, 4 * 3600) // interval)
        order = np.argsort(free_at[node] + used[node] * 0.5)
        if want == 1 and share < 1:
            candidates = [g for g in order if used[node, g] + share <= 1.0]
            chosen = candidates[:1] or list(order[:1])
        else:
            chosen = list(order[:want])
        if len(chosen) < want:
            continue
        start = int(max(free_at[node, g] for g in chosen)) if share >= 1 else start
        end = min(steps, start + duration)
        for g in chosen:
            if share >= 1 or used[node, g] + share > 1.0:
                free_at[node, g], used[node, g] = end, share
            else:
                used[node, g] += share
                free_at[node, g] = max(free_at[node, g], end)
        qos = shape["qos"]
        busy = {"LS": 0.35, "BE": 0.85}.get(qos, 0.6) * float(rng.uniform(0.7, 1.15))
        # CPU use per QoS: inference services idle between requests, training keeps its data
        # loaders busy, burstable work is all over the place.
        low, high = {"LS": (0.15, 0.45), "BE": (0.6, 0.95), "Guaranteed": (0.45, 0.7)}.get(
            qos, (0.2, 0.9)
        )
        cpu_use = float(rng.uniform(low, high))
        if rng.random() < 0.08:
            busy, cpu_use = 0.02, 0.03  # allocated and idle: the waste a report should show
        jobs.append(
            _Job(
                str(100000 + i),
                node,
                [int(g) for g in chosen],
                share,
                int(shape["cpu_milli"]) / 1000,
                TENANTS.get(qos, "other"),
                start,
                end,
                min(busy, 1.0),
                cpu_use,
            )
        )
    return jobs


def generate_demo(
    out: Path, nodes: int = 4, hours: float = 6, interval: int = 30, seed: int = 1
) -> int:
    """Write the demo dataset and ``inventory.toml`` under ``out``; returns the row count."""
    rng = np.random.default_rng(seed)
    gpus = 8
    steps = int(hours * 3600 // interval)
    start_ns = 1_788_220_800 * NS  # 2026-09-01T00:00:00Z
    times = start_ns + np.arange(steps, dtype=np.int64) * interval * NS
    names = [f"gpu-{'a' if n < (nodes + 1) // 2 else 'b'}{n + 1:02d}" for n in range(nodes)]
    jobs = _schedule(nodes, gpus, steps, interval, rng)
    kubernetes = nodes - 1 if nodes >= 4 else None
    for job in jobs:
        if job.node == kubernetes:  # a pod: namespace = tenant; CPUs in millicores
            job.job_id = f"{job.account}/{_POD_KIND[job.account]}-{int(job.job_id):x}"
        else:  # Slurm allocates whole cores
            job.cpus = float(math.ceil(job.cpus))
    # The last node's daemon is down for 20 minutes at 60 % of the span (a reboot, say), so the
    # report's coverage section and the bill's gap_hours have something real to show.
    outage = None
    if nodes > 1 and hours >= 1:
        begin = int(times[int(steps * 0.6)])
        outage = (begin, begin + 1200 * NS)
    # Load follows the working day (Asia/Shanghai, the trace's home: peak 14:00 UTC+8).
    hour = (times // NS % 86400) / 3600.0
    daily = 0.75 + 0.25 * np.cos(2 * np.pi * (hour - 6.0) / 24.0)
    cpus = 112
    rows = 0
    for n, node in enumerate(names):
        node_busy = np.full(steps, 0.6)  # cores the OS and the daemons keep busy
        util = np.zeros((gpus, steps))
        holder = np.full((gpus, steps), None, dtype=object)
        job_rows = []
        shared_rows = []
        for job in (j for j in jobs if j.node == n):
            span = slice(job.start, job.end)
            for g in job.gpus:
                util[g, span] += job.busy * job.share
                holder[g, span] = np.where(holder[g, span] == None, job.job_id, holder[g, span])  # noqa: E711
                k = job.end - job.start
                if job.share < 1 and k > 0:  # a fractional GPU: who holds how much of it
                    sm = np.clip(job.busy * job.share * rng.normal(1.0, 0.05, k), 0, 1)
                    shared_rows.append({
                        "time": times[span], "node": [node] * k,
                        "gpu_uuid": [_uuid(n, g, seed)] * k, "job_id": [job.job_id] * k,
                        "share": np.full(k, job.share, np.float32),
                        "sm_utilization_ratio": sm.astype(np.float32),
                        "memory_used_bytes": np.full(k, int(job.share * 60e9), np.int64),
                    })  # fmt: skip
            k = job.end - job.start
            if k <= 0:
                continue
            wobble = rng.normal(1.0, 0.08, k).clip(0.5, 1.5)
            used = np.clip(job.cpu_use * daily[span] * wobble, 0.0, 1.0) * job.cpus
            node_busy[span] += used
            job_rows.append({
                "time": times[span], "node": [node] * k, "job_id": [job.job_id] * k,
                "user": [_user(job)] * k, "account": [job.account] * k,
                "cpus_allocated": np.full(k, job.cpus, np.float32),
                "gpus_allocated": np.full(k, len(job.gpus) * job.share, np.float32),
                "cpu_seconds": np.cumsum(used * interval),
                "memory_bytes": np.full(k, int(job.cpus * 4) << 30, np.int64),
            })  # fmt: skip
        util = np.clip(util + rng.normal(0, 0.02, util.shape), 0, 1).astype(np.float32)
        power = (70 + 630 * util).astype(np.float32)
        temperature = (35 + 30 * util).astype(np.float32)
        # Health, so the report's health section has something real to show: GPU 2 of the
        # second node runs hot and throttles under load, GPU 3 of the first node collects
        # corrected ECC errors, GPU 5 of the last node hits an XID 79 (fell off the bus).
        reasons = np.where(util < 0.05, 0x1, 0).astype(np.int64)  # GPU idle
        corrected = np.zeros((gpus, steps), np.int64)
        xid = np.zeros((gpus, steps), np.int64)
        xid_last = np.full((gpus, steps), None, dtype=object)
        if n == 1 % nodes:
            hot = util[2] > 0.5
            temperature[2] += np.where(hot, 18, 6).astype(np.float32)
            reasons[2] = np.where(hot, 0x20, reasons[2])  # software thermal slowdown
        if n == 0:
            corrected[3] = np.cumsum(rng.random(steps) < 0.02)
        if n == nodes - 1 and steps > 2:
            fault = int(steps * 0.7)
            xid[5, fault:] = 1
            xid_last[5, fault:] = 79
        energy = np.cumsum(power.astype(np.float64) * interval, axis=1) + 3.6e6
        gpu = pa.table({
            "time": np.tile(times, gpus), "node": [node] * (gpus * steps),
            "gpu_uuid": [_uuid(n, g, seed) for g in range(gpus) for _ in range(steps)],
            "gpu_index": np.repeat(np.arange(gpus, dtype=np.int16), steps),
            "gpu_model": ["NVIDIA H100 80GB HBM3"] * (gpus * steps),
            "utilization_ratio": util.ravel(), "sm_active_ratio": (util * 0.8).ravel(),
            "memory_used_bytes": (util.ravel() * 60e9).astype(np.int64), "memory_total_bytes": np.full(gpus * steps, 81559 << 20, np.int64),
            "power_watts": power.ravel(), "energy_joules": energy.ravel(),
            "temperature_celsius": temperature.ravel(), "job_id": list(holder.ravel()),
            "ecc_corrected_errors": corrected.ravel(),
            "ecc_uncorrected_errors": np.zeros(gpus * steps, np.int64),
            "remapped_rows_pending": np.zeros(gpus * steps, np.int64),
            "clock_event_reasons": reasons.ravel(),
            "xid_errors": xid.ravel(),
            "xid_last": pa.array(list(xid_last.ravel()), pa.int32()),
        })  # fmt: skip
        if n == 0 and steps > 4:
            # A noisy neighbour: a process outside every job burns 24 cores for a fifth of the
            # span, so this node's CPU stripe runs hotter than its jobs' use explains.
            node_busy[steps // 5 : 2 * steps // 5] += 24.0
        busy_cores = np.minimum(node_busy, cpus)
        busy_seconds = np.cumsum(busy_cores * interval)
        elapsed = np.arange(1, steps + 1) * interval
        cpu: dict[str, object] = {
            "time": times,
            "node": [node] * steps,
            "cpus": np.full(steps, cpus, np.int32),
        }
        for mode in CPU_MODES:
            cpu[f"{mode}_seconds"] = np.zeros(steps)
        cpu["user_seconds"] = busy_seconds * 0.8 + 1e6
        cpu["system_seconds"] = busy_seconds * 0.2 + 2e5
        cpu["idle_seconds"] = elapsed * cpus - busy_seconds + 5e6
        cpu.update(
            memory_total_bytes=np.full(steps, 2 << 40, np.int64),
            memory_available_bytes=np.full(steps, 1 << 40, np.int64),
            energy_joules=np.cumsum((180.0 + 2.5 * busy_cores) * interval),  # watts by load
        )
        tables = {"gpu": gpu, "cpu": pa.table(cpu)}
        if job_rows:
            tables["job"] = pa.concat_tables([pa.table(r) for r in job_rows])
        if shared_rows:
            tables["gpu_job"] = pa.concat_tables([pa.table(r) for r in shared_rows])
        for name, whole in tables.items():
            table = whole
            if outage is not None and n == nodes - 1:
                t = whole.column("time")
                table = whole.filter(pc.or_(pc.less(t, outage[0]), pc.greater_equal(t, outage[1])))
            stamped = table.set_column(
                0, "time", table.column("time").cast(pa.timestamp("ns", tz="UTC"))
            )
            data = validate(stamped, name)
            directory = partition_dir(out, name, int(times[0]), node)
            directory.mkdir(parents=True, exist_ok=True)
            pq.write_table(data, directory / "demo.parquet", compression="zstd")
            rows += data.num_rows
    own = (nodes + 1) // 2
    (out / "inventory.toml").write_text(
        INVENTORY.format(own_gpus=own * gpus, leased_gpus=(nodes - own) * gpus, cores=nodes * cpus)
    )
    slurm = [j for j in jobs if j.node != kubernetes and j.end > j.start]
    (out / "sacct.json").write_text(_sacct(slurm, names, times, interval, rng))
    return rows


_POD_KIND = {"inference-co": "infer", "research-lab": "train", "startup-x": "notebook",
             "bank-y": "risk", "other": "job"}  # fmt: skip


def _uuid(node: int, gpu: int, seed: int) -> str:
    return f"GPU-{node:04x}{gpu:04x}-5a1e-4c6d-9e3f-{seed:012x}"


def _user(job: _Job) -> str:
    if "/" in job.job_id:  # a pod runs as its namespace's service account
        return f"system:serviceaccount:{job.account}:default"
    return f"u{int(job.job_id) % 17:02d}"


def _sacct(
    jobs: list[_Job], names: list[str], times: np.ndarray, interval: int, rng: np.random.Generator
) -> str:
    """``sacct --json`` of the Slurm jobs: each started up to one sample interval before the
    first sample that shows it and ended up to one after the last (a job running at the end of
    the data is still running: end 0)."""
    records = []
    last = int(times[-1]) // NS
    for job in jobs:
        start = int(times[job.start]) // NS - int(rng.integers(1, interval))
        end = int(times[job.end - 1]) // NS + int(rng.integers(1, interval))
        running = end > last
        tres = [{"type": "cpu", "name": None, "id": 1, "count": int(job.cpus)},
                {"type": "mem", "name": None, "id": 2, "count": int(job.cpus * 4096)},
                {"type": "node", "name": None, "id": 4, "count": 1}]  # fmt: skip
        if job.share >= 1:
            tres.append({"type": "gres", "name": "gpu", "id": 1001, "count": len(job.gpus)})
        else:  # a fraction of a GPU is a number of shards (8 per GPU here)
            shards = max(1, round(job.share * 8))
            tres.append({"type": "gres", "name": "shard", "id": 1003, "count": shards})
        records.append({
            "account": job.account, "job_id": int(job.job_id), "user": _user(job),
            "nodes": names[job.node], "partition": "gpu",
            "state": {"current": ["RUNNING" if running else "COMPLETED"], "reason": "None"},
            "time": {"start": start, "end": 0 if running else end, "submission": start - 30,
                     "limit": {"set": True, "infinite": False, "number": 240}},
            "tres": {"allocated": tres, "requested": tres},
            "required": {"CPUs": int(job.cpus)}, "steps": [],
        })  # fmt: skip
    meta = {"plugins": {"data_parser": "data_parser/v0.0.42", "accounting_storage": "slurmdbd"},
            "slurm": {"version": {"major": "24", "micro": "5", "minor": "05"},
                      "release": "24.05.5"}}  # fmt: skip
    return json.dumps({"meta": meta, "jobs": records, "warnings": [], "errors": []}, indent=1)
