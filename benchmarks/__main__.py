"""Run every benchmark and print one table of ratios: ``python -m benchmarks [--quick] [--dir D]``.

Each line is tally and its baseline measured in the same run on the same data (results compared
for equality where both compute the same thing), with the issue's goal for the ratio.
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
from pathlib import Path

from benchmarks import (
    backends,
    bill_cluster,
    bill_duckdb,
    daemon_cost,
    exposition,
    node_tree,
    rolling,
)


def _machine() -> str:
    import os

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, 10 s daemon run")
    parser.add_argument("--dir", type=Path, help="where to keep the generated bill datasets")
    args = parser.parse_args()
    quick = args.quick
    table: list[tuple[str, str, str, str, str]] = []

    ours, sum_by, mean_by = rolling.run(100, 500) if quick else rolling.run(1000, 2000)
    ratio = f"{ours / mean_by:.2f}"
    table.append(("trailing 5m means vs polars rolling_mean_by().over()",
                  f"{ours:.3f} s", f"{mean_by:.3f} s", ratio, "≤ 0.5"))  # fmt: skip
    table.append(("  same, vs polars rolling_sum_by() ratio (equal results)",
                  f"{ours:.3f} s", f"{sum_by:.3f} s", f"{ours / sum_by:.2f}", "–"))  # fmt: skip

    fast, client, series = exposition.run(40 if quick else 400)
    table.append((f"one scrape, {series:,} series vs prometheus-client generate_latest",
                  f"{fast * 1e3:.1f} ms", f"{client * 1e3:.1f} ms", f"{fast / client:.3f}",
                  "≤ 0.05"))  # fmt: skip

    with tempfile.TemporaryDirectory() as scratch:
        root = args.dir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        rows = 500_000 if quick else 10_000_000
        t_tally, t_duck = bill_duckdb.run(rows, 10 if quick else 50, root)
        ratio = f"{t_tally / t_duck:.2f}"
        table.append((f"tally bill end to end, {rows:,} rows vs DuckDB SQL",
                      f"{t_tally:.2f} s", f"{t_duck:.2f} s", ratio, "≤ 1.0"))  # fmt: skip

        # the 1 h-window shape (125 nodes x 8 GPUs x 24 h at 10 s), default settings
        for case, ours_s, _, duck_s in bill_cluster.versus_duckdb(
            root, 10 if quick else 125, 2 if quick else 24
        ):
            table.append((f"tally bill (a process per core), {case} vs DuckDB",
                          f"{ours_s:.2f} s", f"{duck_s:.2f} s", f"{ours_s / duck_s:.2f}",
                          "≤ 1.0"))  # fmt: skip

    gpu = backends.run(1_000_000 if quick else 100_000_000)
    if gpu is None:
        table.append(("cupy vs numpy kernels, 100M rows", "no GPU", "", "", "≥ 20×"))
    else:
        t_np, t_cp = gpu
        table.append(("cupy vs numpy kernels (numpy is the baseline)", f"{t_cp:.3f} s",
                      f"{t_np:.3f} s", f"{t_np / t_cp:.1f}× faster", "≥ 20×"))  # fmt: skip

    with tempfile.TemporaryDirectory() as scratch:  # the GPUs: pynvml over a stand-in driver
        driver = node_tree.build_driver_stub(Path(scratch))
        # Scraped as Prometheus usually scrapes (every 15 s), as the goal and the docs measure.
        measured = daemon_cost.run(10 if quick else 300, 1.0, scrape_interval=15.0, driver=driver)
    exporters = {e.name: e for e in measured}
    tally, node = exporters["tally"], exporters.get("node_exporter")
    tally_cpu = (tally.cpu / tally.wall + tally.compaction / 3600) * 100
    node_cpu = node.cpu / node.wall * 100 if node else math.nan
    table.append(("daemon at 1 s, 8 GPUs, 50 jobs, scraped every 15 s: CPU % of a core in all"
                  " (baseline: node_exporter)",
                  f"{tally_cpu:.2f} %", f"{node_cpu:.2f} %" if node else "not installed",
                  f"{tally_cpu / node_cpu:.1f}" if node else "–", "tally ≤ 0.25 %"))  # fmt: skip
    node_rss = node.rss / 2**20 if node else math.nan
    table.append(("  same, RSS MiB (baseline: node_exporter)", f"{tally.rss / 2**20:.1f}",
                  f"{node_rss:.1f}" if node else "not installed",
                  f"{tally.rss / 2**20 / node_rss:.2f}" if node else "–", "≤ 2.0"))  # fmt: skip

    print(f"\nmachine: {_machine()}")
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    header = ("benchmark", "tally", "baseline", "ratio", "goal")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    for row in (header, *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
