"""Bills on many workers (SPEC §9): ``tally bill`` against DuckDB on the issue's shape, scaling on
a Dask ``LocalCluster``, and peak RSS of a large bill.

The shape: 125 nodes × 8 GPUs sampled every 10 s for 24 h (8.6M gpu rows), a cpu row per node
and step and one job row per node and step (the job holding the node's GPUs; 2.2M rows), one
file per table, node and day. DuckDB computes the same per-window pool and tenant sums over the
same Parquet (``bill_duckdb``'s query, results compared before a time is printed), for 1 h and
1 d windows, with the job table and without it. tally runs as a command with default settings
(a process per core) and with ``--workers 1``; DuckDB in a warm process. Best of two each.

    python -m benchmarks.bill_cluster --dir /tmp/tally-cluster [--nodes 125] [--hours 24]
    python -m benchmarks.bill_cluster --dir D --scaling        # 1, 2, 4 LocalCluster workers
    python -m benchmarks.bill_cluster --dir D --rss-hours 480  # /usr/bin/time -v of a big bill
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks import bill_duckdb
from benchmarks.bill_scale import GPU_WRITTEN, INVENTORY, JOB_WRITTEN, cached, write_day
from telemetry.schema import CPU_MODES, CPU_SCHEMA

NS = 1_000_000_000
T0 = 1_788_220_800 * NS  # 2026-09-01T00:00:00Z
GPUS = 8
STEP_S = 10
JOB_HOURS = 3


def _strings(values: list[str], indices: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32)), values).cast(
        pa.string()
    )


def generate(root: Path, nodes: int, hours: int, jobs: bool = True, seed: int = 1) -> int:
    """Write the dataset (one file per table, node and day); returns its row count."""
    rng = np.random.default_rng(seed)
    per_day = 86400 // STEP_S
    total = hours * 3600 // STEP_S
    rows = 0
    for n in range(nodes):
        node = f"node-{n:03d}"
        for first in range(0, total, per_day):
            steps = min(per_day, total - first)
            step = first + np.arange(steps, dtype=np.int64)
            t = T0 + step * STEP_S * NS
            block = step // (JOB_HOURS * 3600 // STEP_S)
            names = [f"{n * 1000 + int(b)}" for b in range(int(block[0]), int(block[-1]) + 1)]
            job_of_step = block - block[0]
            size = steps * GPUS
            gpu = np.repeat(np.arange(GPUS), steps)
            util = np.clip(rng.beta(2, 1.5, size=size), 0, 1).astype(np.float32)
            power = (120 + 580 * util).astype(np.float32)
            energy = 1e6 * n + np.cumsum(power.astype(np.float64) * STEP_S)
            write_day(root, "gpu", pa.table({
                "time": np.tile(t, GPUS), "node": _strings([node], np.zeros(size)),
                "gpu_uuid": _strings([f"GPU-{n:03d}-{g}" for g in range(GPUS)], gpu),
                "gpu_index": gpu.astype(np.int16),
                "gpu_model": _strings(["NVIDIA H100 80GB HBM3"], np.zeros(size)),
                "utilization_ratio": util, "sm_active_ratio": pa.nulls(size, pa.float32()),
                "memory_used_bytes": np.full(size, 40 << 30, np.int64),
                "memory_total_bytes": np.full(size, 80 << 30, np.int64),
                "power_watts": power, "energy_joules": energy,
                "temperature_celsius": np.full(size, 55.0, np.float32),
                "job_id": _strings(names, np.tile(job_of_step, GPUS)),
            }, schema=GPU_WRITTEN), node, int(t[0]))  # fmt: skip
            if jobs:
                write_day(root, "job", pa.table({
                    "time": t, "node": _strings([node], np.zeros(steps)),
                    "job_id": _strings(names, job_of_step),
                    "user": _strings([f"u{k}" for k in range(7)], block % 7),
                    "account": _strings([f"tenant-{k}" for k in range(3)], (block + n) % 3),
                    "cpus_allocated": np.full(steps, 96.0, np.float32),
                    "gpus_allocated": np.full(steps, 8.0, np.float32),
                    "cpu_seconds": np.cumsum(np.full(steps, 96.0 * STEP_S * 0.6)),
                    "memory_bytes": np.full(steps, 64 << 30, np.int64),
                }, schema=JOB_WRITTEN), node, int(t[0]))  # fmt: skip
                rows += steps
            elapsed = (t - T0) / NS + 1
            cpu: dict[str, object] = {"time": t, "node": _strings([node], np.zeros(steps)),
                                      "cpus": np.full(steps, 112, np.int32)}  # fmt: skip
            for mode in CPU_MODES:
                cpu[f"{mode}_seconds"] = elapsed * (112 * 0.5 if mode == "user" else 112 * 0.05)
            cpu.update(
                memory_total_bytes=np.full(steps, 2 << 40, np.int64),
                memory_available_bytes=np.full(steps, 1 << 40, np.int64),
                energy_joules=elapsed * 700.0,
            )
            write_day(root, "cpu", pa.table(cpu, schema=CPU_SCHEMA), node, int(t[0]))
            rows += size + steps
    return rows


def _tally(data: Path, inventory: Path, window: str, *flags: str) -> tuple[float, dict]:  # type: ignore[type-arg]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "telemetry.cli", "--quiet", "bill", str(data), "--inventory",
         str(inventory), "--window", window, *flags],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return time.perf_counter() - start, json.loads(done.stdout)


def versus_duckdb(root: Path, nodes: int, hours: int) -> list[tuple[str, float, float, float]]:
    """(case, tally default s, tally --workers 1 s, DuckDB s) for 1 h and 1 d windows, with and
    without the job table; the sums compared first."""
    with_jobs = root / f"n{nodes}-h{hours}"
    made = cached(with_jobs, lambda into: generate(into, nodes, hours))
    if made is not None:
        print(f"generated {made:,} rows in {with_jobs}")
    without = root / f"n{nodes}-h{hours}-nojobs"
    if not without.exists():
        without.mkdir()
        for table in ("gpu", "cpu"):  # the same files, no job table
            (without / table).symlink_to(with_jobs / table)
    inventory = root / "inventory.toml"
    inventory.write_text(f"max_gap_seconds = {bill_duckdb.MAX_GAP_S}\n" + INVENTORY)
    out = []
    for data, jobs in ((with_jobs, True), (without, False)):
        for window, seconds in (("1h", 3600), ("1d", 86400)):
            ours = [_tally(data, inventory, window) for _ in range(2)]
            one = [_tally(data, inventory, window, "--workers", "1") for _ in range(2)]
            theirs = [bill_duckdb.run_duckdb(data, seconds, jobs) for _ in range(2)]
            compared = bill_duckdb.compare(ours[-1][1], theirs[-1][1], seconds, jobs)
            assert ours[-1][1] == one[-1][1], "the pool's bill differs from one process's"
            case = f"window {window}, {'with' if jobs else 'without'} job rows"
            best = (min(r[0] for r in ours), min(r[0] for r in one), min(r[0] for r in theirs))
            ratio = best[0] / best[2]
            print(f"{case}: tally {best[0]:.2f} s (1 process {best[1]:.2f} s), DuckDB "
                  f"{best[2]:.2f} s, ratio {ratio:.2f} ({compared} sums equal)")  # fmt: skip
            out.append((case, *best))
    return out


def scaling(root: Path, nodes: int, hours: int, workers: tuple[int, ...] = (1, 2, 4)) -> None:
    """Seconds and rows/s per worker of the 1 h bill on a LocalCluster of 1, 2, 4 workers (the
    cluster started before the clock starts)."""
    import distributed

    from telemetry.billing.bill import compute_bill
    from telemetry.billing.inventory import parse_inventory
    from telemetry.billing.writers import to_json

    data = root / f"n{nodes}-h{hours}"
    made = cached(data, lambda into: generate(into, nodes, hours))
    if made is not None:
        print(f"generated {made:,} rows in {data}")
    inventory = parse_inventory(f"max_gap_seconds = 60\n{INVENTORY}", "inventory.toml")
    quiet = {"warn": lambda _: None, "progress": lambda *_: None}
    start = time.perf_counter()
    want = to_json(compute_bill(data, inventory, 3600, **quiet))  # type: ignore[arg-type]
    single = time.perf_counter() - start
    rows = json.loads(want)["input"]["rows"]
    print(f"one process, no Dask: {single:.2f} s, {rows / single / 1e6:.2f} M rows/s")
    for n in workers:
        with (
            distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                     dashboard_address=None, silence_logs=40) as cluster,
            distributed.Client(cluster) as client,
        ):  # fmt: skip
            client.run(lambda: __import__("telemetry.billing.partitioned"))  # warm imports
            times = []
            for _ in range(2):
                start = time.perf_counter()
                got = to_json(compute_bill(data, inventory, 3600, cluster=client, **quiet))  # type: ignore[arg-type]
                times.append(time.perf_counter() - start)
                assert got == want, f"{n} workers: the bill differs"
        best = min(times)
        print(f"LocalCluster {n} workers: {best:.2f} s, {rows / best / 1e6:.2f} M rows/s, "
              f"{rows / best / n / 1e6:.2f} M rows/s per worker")  # fmt: skip


def peak_rss(root: Path, nodes: int, hours: int, *flags: str) -> None:
    """``/usr/bin/time -v tally bill`` of a large dataset: wall time, rows/s, peak RSS of the
    command and of its largest worker."""
    data = root / f"n{nodes}-h{hours}"
    start = time.perf_counter()
    made = cached(data, lambda into: generate(into, nodes, hours))
    if made is not None:
        print(f"generated {made:,} rows in {data} in {time.perf_counter() - start:.0f} s")
    inventory = root / "inventory.toml"
    inventory.write_text(f"max_gap_seconds = 60\n{INVENTORY}")
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "telemetry.cli", "--quiet", "bill",
               str(data), "--inventory", str(inventory), "--window", "1d",
               "--out", str(root / "big.json"), *flags]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tree_peak = 0
    while proc.poll() is None:  # the whole process tree: pool workers are not waited by time
        tree_peak = max(tree_peak, _tree_rss_kib(proc.pid))
        time.sleep(0.05)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"tally bill failed: {stderr[-2000:]}")
    done = subprocess.CompletedProcess(command, 0, "", stderr)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])  # type: ignore[index]
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.+)", done.stderr)[1]  # type: ignore[index]
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** (len(parts) - 1 - i) for i, p in enumerate(parts))
    rows = json.loads((root / "big.json").read_text())["input"]["rows"]
    print(f"{rows:,} rows {' '.join(flags) or '(default)'}: {seconds:.1f} s, "
          f"{rows / seconds / 1e6:.2f} M rows/s, peak RSS of the largest process "
          f"{rss / 1024:.0f} MiB (/usr/bin/time -v), of all its processes together "
          f"{tree_peak / 1024:.0f} MiB (sampled every 50 ms)")  # fmt: skip


def _tree_rss_kib(root_pid: int) -> int:
    """Resident KiB of ``root_pid`` and every process below it, from /proc."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        parent[int(entry)] = int(fields.get("PPid", "0").strip())
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0])
    total = 0
    for pid, kib in rss.items():
        p = pid
        while p and p != root_pid:
            p = parent.get(p, 0)
        if p == root_pid:
            total += kib
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=125)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--scaling", action="store_true", help="1, 2, 4 LocalCluster workers")
    parser.add_argument("--rss-hours", type=int, help="hours of the large bill for peak RSS")
    parser.add_argument("--skip-duckdb", action="store_true")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores")
    if not args.skip_duckdb:
        versus_duckdb(args.dir, args.nodes, args.hours)
    if args.scaling:
        scaling(args.dir, args.nodes, args.hours)
    if args.rss_hours:
        peak_rss(args.dir, args.nodes, args.rss_hours)
        peak_rss(args.dir, args.nodes, args.rss_hours, "--workers", "1")


if __name__ == "__main__":
    main()
