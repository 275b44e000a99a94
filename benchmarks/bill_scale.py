"""Billing at scale: wall time and peak RSS of ``tally bill`` on a generated multi-day dataset.

The dataset looks like a GPU cluster's: N nodes × 8 GPUs sampled every 10 s, one job per GPU
changing every few hours with fractional allocations, written in the daemon's layout (one file
per table, node and day). The baseline in the same run is the memory of simply loading the whole
dataset with pyarrow, which any approach that is not chunked pays at least.

    python -m benchmarks.bill_scale --rows 50000000 --dir /tmp/tally-bench
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from telemetry.schema import CPU_MODES, CPU_SCHEMA, GPU_SCHEMA, JOB_SCHEMA, OPTIONAL_COLUMNS
from telemetry.store.layout import partition_dir

NS = 1_000_000_000
T0 = 1_788_220_800 * NS  # 2026-09-01T00:00:00Z
GPUS = 8
INTERVAL_S = 10
# The gpu and job files as a release before the optional columns wrote them (the reader fills
# them in): the generated datasets exercise that path too.
GPU_WRITTEN = pa.schema([f for f in GPU_SCHEMA if f.name not in OPTIONAL_COLUMNS["gpu"]])
JOB_WRITTEN = pa.schema([f for f in JOB_SCHEMA if f.name not in OPTIONAL_COLUMNS["job"]])
INVENTORY = """
currency = "USD"
[[pool]]
name = "h100-own"
kind = "gpu"
ownership = "own"
nodes = ["node-0*"]
cost_per_unit_hour = 1.9
price_per_unit_hour = 2.8
[[pool]]
name = "h100-leased"
kind = "gpu"
ownership = "leased"
nodes = ["node-*"]
cost_per_unit_hour = 2.3
price_per_unit_hour = 2.8
[[pool]]
name = "cpu"
kind = "cpu"
ownership = "own"
nodes = ["*"]
cost_per_unit_hour = 0.01
price_per_unit_hour = 0.03
"""


def write_day(root: Path, table: str, data: pa.Table, node: str, day_ns: int) -> None:
    """One table's rows of one node and day, as one zstd Parquet file in the dataset layout."""
    directory = partition_dir(root, table, day_ns, node)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, directory / "part-0.parquet", compression="zstd")


def cached(data: Path, make: Callable[[Path], int]) -> int | None:
    """Make the dataset ``data`` with ``make`` unless a whole one is there: the rows written, or
    None when one was there.

    It is written under ``<name>.partial`` and renamed when whole, so that a run cut off while
    generating leaves nothing a later run would take for the dataset.
    """
    if data.exists():
        return None
    partial = data.with_name(data.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rows = make(partial)
    partial.rename(data)
    return rows


def generate(root: Path, nodes: int, hours: int, seed: int = 1) -> int:
    """Write the dataset; returns its row count."""
    rng = np.random.default_rng(seed)
    per_day = 86400 // INTERVAL_S
    total_steps = hours * 3600 // INTERVAL_S
    rows = 0
    for n in range(nodes):
        node = f"node-{n:03d}"
        for day_start in range(0, total_steps, per_day):
            steps = min(per_day, total_steps - day_start)
            t = T0 + (day_start + np.arange(steps, dtype=np.int64)) * INTERVAL_S * NS
            t_rep = np.tile(t, GPUS)
            gpu = np.repeat(np.arange(GPUS), steps)
            block = (day_start + np.tile(np.arange(steps), GPUS)) // (4 * 360)  # a job every 4 h
            jobs = np.char.add(f"{n}-", (block * GPUS + gpu).astype(str))
            util = np.clip(rng.beta(2, 1.5, size=t_rep.size), 0, 1).astype(np.float32)
            power = (120 + 580 * util).astype(np.float32)
            energy = 1e6 * n + np.cumsum(power.astype(np.float64) * INTERVAL_S)
            size = t_rep.size
            day_ns = int(t[0])
            write_day(root, "gpu", pa.table({
                "time": t_rep, "node": np.full(size, node), "gpu_uuid": np.char.add(f"GPU-{n:03d}-", gpu.astype(str)),
                "gpu_index": gpu.astype(np.int16), "gpu_model": np.full(size, "NVIDIA H100 80GB HBM3"),
                "utilization_ratio": util, "sm_active_ratio": pa.nulls(size, pa.float32()),
                "memory_used_bytes": np.full(size, 40 << 30, np.int64), "memory_total_bytes": np.full(size, 80 << 30, np.int64),
                "power_watts": power, "energy_joules": energy, "temperature_celsius": np.full(size, 55.0, np.float32),
                "job_id": jobs,
            }, schema=GPU_WRITTEN), node, day_ns)  # fmt: skip
            share = rng.choice([0.46, 1.0], size=size).astype(np.float32)
            write_day(root, "job", pa.table({
                "time": t_rep, "node": np.full(size, node), "job_id": jobs,
                "user": np.char.add("u", (block % 7).astype(str)), "account": np.char.add("tenant-", (gpu % 3).astype(str)),
                "cpus_allocated": np.full(size, 12.0, np.float32), "gpus_allocated": share,
                "cpu_seconds": np.cumsum(np.full(size, 12.0 * INTERVAL_S * 0.6)), "memory_bytes": np.full(size, 64 << 30, np.int64),
            }, schema=JOB_WRITTEN), node, day_ns)  # fmt: skip
            cpu: dict[str, object] = {
                "time": t,
                "node": np.full(steps, node),
                "cpus": np.full(steps, 112, np.int32),
            }
            elapsed = (t - T0) / NS + 1
            for mode in CPU_MODES:
                cpu[f"{mode}_seconds"] = elapsed * (112 * 0.5 if mode == "user" else 112 * 0.05)
            cpu.update(
                memory_total_bytes=np.full(steps, 2 << 40, np.int64),
                memory_available_bytes=np.full(steps, 1 << 40, np.int64),
                energy_joules=elapsed * 700.0,
            )
            write_day(root, "cpu", pa.table(cpu, schema=CPU_SCHEMA), node, day_ns)
            rows += 2 * size + steps
    return rows


_MEASURE = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
    "took = time.perf_counter() - start\n"
    "print(took, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
)
_LOAD_ALL = (
    "import pyarrow.dataset as ds, sys\n"
    "tables = [ds.dataset(sys.argv[1] + '/' + n, partitioning='hive').to_table()\n"
    "          for n in ('gpu', 'job', 'cpu')]\n"
)


def measure(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``command``, measured in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[0]), float(out[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=5_000_000, help="about this many rows in all")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    per_hour = args.nodes * (2 * GPUS + 1) * 3600 // INTERVAL_S
    hours = max(1, args.rows // per_hour)
    data = args.dir / "dataset"
    start = time.perf_counter()
    rows = cached(data, lambda into: generate(into, args.nodes, hours))
    if rows is not None:
        print(
            f"generated {rows:,} rows ({args.nodes} nodes x {GPUS} GPUs, {hours} h) in {time.perf_counter() - start:.0f} s"
        )
    inventory = args.dir / "inventory.toml"
    inventory.write_text(INVENTORY)
    bill = [sys.executable, "-m", "telemetry.cli", "bill", str(data), "--inventory", str(inventory),
            "--window", "1d", "--out", str(args.dir / "bill.json")]  # fmt: skip
    took, rss = measure(bill)
    base_took, base_rss = measure([sys.executable, "-c", _LOAD_ALL, str(data)])
    print(f"\nbill of {args.dir}/dataset, window 1d")
    print(f"{'':28} {'seconds':>9} {'peak RSS MiB':>13}")
    print(f"{'tally bill (chunked)':28} {took:9.1f} {rss:13.0f}")
    print(f"{'pyarrow load only':28} {base_took:9.1f} {base_rss:13.0f}")
    print(f"{'ratio tally/baseline':28} {took / base_took:9.2f} {rss / base_rss:13.2f}")


if __name__ == "__main__":
    main()
