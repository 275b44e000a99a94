"""One scrape of a large node state: tally's column renderer against prometheus-client.

The state is ``nodes`` × 8 GPUs (plus each node's CPUs and two jobs) ingested into the daemon's
aggregation; every GPU exports ~17 series, so 450 nodes (the default) give ~62,000 series. The
baseline is prometheus-client's own path for the same families: a ``GaugeMetricFamily``/
``CounterMetricFamily`` per family with one ``add_metric`` per sample, then ``generate_latest``.
The two outputs are compared byte for byte before anything is timed.
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
from prometheus_client import CollectorRegistry, generate_latest

from benchmarks import best_of
from exporters.prometheus import TallyCollector
from telemetry.schema import CPU_MODES, validate
from telemetry.state import Snapshot, State

NS = 1_000_000_000
T0 = 1_788_220_800 * NS


def build_snapshot(nodes: int, gpus: int = 8, samples: int = 4) -> Snapshot:
    """A state with every table filled, as a node daemon or replay would hold it."""
    rng = np.random.default_rng(3)
    state = State()
    times = T0 + np.arange(samples, dtype=np.int64) * 5 * NS
    names = [f"node{n:04d}" for n in range(nodes)]
    n_gpu = nodes * gpus
    node_of = np.repeat(np.array(names, dtype=object), gpus)
    gpu_rows = n_gpu * samples
    gpu = pa.table(
        {
            "time": np.tile(times, n_gpu),
            "node": np.repeat(node_of, samples).tolist(),
            "gpu_uuid": np.repeat(
                [f"GPU-{i:08x}-aaaa-bbbb-cccc" for i in range(n_gpu)], samples
            ).tolist(),
            "gpu_index": np.repeat(np.tile(np.arange(gpus, dtype=np.int16), nodes), samples),
            "gpu_model": ["NVIDIA H100 80GB HBM3"] * gpu_rows,
            "utilization_ratio": rng.random(gpu_rows).astype(np.float32),
            "sm_active_ratio": rng.random(gpu_rows).astype(np.float32),
            "memory_used_bytes": rng.integers(0, 80 << 30, gpu_rows),
            "memory_total_bytes": np.full(gpu_rows, 81559 << 20, np.int64),
            "power_watts": (70 + 630 * rng.random(gpu_rows)).astype(np.float32),
            "energy_joules": np.cumsum(np.full(gpu_rows, 1500.0)) + 3.6e6,
            "temperature_celsius": (30 + 40 * rng.random(gpu_rows)).astype(np.float32),
            "job_id": [str(1000 + i // 4) for i in range(gpu_rows)],
        }
    )
    cpu_rows = nodes * samples
    cpu: dict[str, object] = {
        "time": np.tile(times, nodes),
        "node": np.repeat(np.array(names, dtype=object), samples).tolist(),
        "cpus": np.full(cpu_rows, 112, np.int32),
    }
    for i, mode in enumerate(CPU_MODES):
        cpu[f"{mode}_seconds"] = np.tile(np.arange(samples) * 5.0 * 112, nodes) + 1e6 * (i + 1)
    cpu.update(
        memory_total_bytes=np.full(cpu_rows, 2 << 40, np.int64),
        memory_available_bytes=np.full(cpu_rows, 1 << 40, np.int64),
        energy_joules=np.tile(np.arange(samples) * 1750.0, nodes),
    )
    jobs = nodes * 2 * samples
    job = pa.table(
        {
            "time": np.tile(times, nodes * 2),
            "node": np.repeat(np.array(names, dtype=object), 2 * samples).tolist(),
            "job_id": np.repeat([str(1000 + i) for i in range(nodes * 2)], samples).tolist(),
            "user": ["alice"] * jobs,
            "account": ["acme"] * jobs,
            "cpus_allocated": np.full(jobs, 16, np.float32),
            "gpus_allocated": np.full(jobs, 4, np.float32),
            "cpu_seconds": np.tile(np.arange(samples) * 80.0, nodes * 2),
            "memory_bytes": np.full(jobs, 64 << 30, np.int64),
        }
    )
    for name, table in (("gpu", gpu), ("cpu", pa.table(cpu)), ("job", job)):
        stamped = table.set_column(0, "time", table.column("time").cast(pa.timestamp("ns", "UTC")))
        state.ingest(name, validate(stamped, name))
    return state.snapshot()


def run(nodes: int = 400, repeat: int = 5) -> tuple[float, float, int]:
    """Seconds per scrape (best of ``repeat``) for tally and the baseline, and the series."""
    snapshot = build_snapshot(nodes)
    collector = TallyCollector(lambda: snapshot)
    registry = CollectorRegistry()
    registry.register(collector)
    ours_text = collector.render_text()
    theirs_text = generate_latest(registry)
    if ours_text != theirs_text:
        raise AssertionError("column renderer and prometheus-client disagree")
    series = sum(1 for line in ours_text.splitlines() if not line.startswith(b"#"))
    # Taken in turns, so that a slow spell of the machine falls on both alike.
    ours = theirs = float("inf")
    for _ in range(repeat):
        ours = min(ours, best_of(collector.render_text, 3)[0])
        theirs = min(theirs, best_of(lambda: generate_latest(registry), 1)[0])
    print(f"\none scrape, {series:,} series ({len(ours_text) / 1e6:.1f} MB of text)")
    print(f"{'tally (columns)':24} {ours * 1e3:8.1f} ms")
    print(f"{'prometheus-client':24} {theirs * 1e3:8.1f} ms")
    print(f"{'ratio tally/client':24} {ours / theirs:8.3f}")
    return ours, theirs, series


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=450)  # ~62,000 series
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    run(args.nodes, args.repeat)


if __name__ == "__main__":
    main()
