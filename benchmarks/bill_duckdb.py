"""``tally bill`` end to end against DuckDB computing the same sums over the same Parquet files.

DuckDB gets SPEC §3 as SQL: window functions give each sample's Δt and counter deltas per
series, intervals longer than max_gap are gaps, every interval belongs to the window holding its
end; sums per (window, pool) and (window, pool, tenant). It is the fair competitor: the query a
data engineer would write instead of running tally. Its results are compared with tally's bill
(relative 1e-6: DuckDB sums floats, tally rounds each interval to integer microseconds) before
any time is printed. Simplifications DuckDB is allowed: the generated data has no duplicate
rows and one tenant per job, so it neither de-duplicates nor looks up a job's newest row.

    python -m benchmarks.bill_duckdb --rows 10000000 --dir /tmp/tally-duck
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bill_scale import INVENTORY, cached, generate

WINDOW_S = 86400
MAX_GAP_S = 60
POOL_SQL = (
    "CASE WHEN node LIKE 'node-0%' THEN 'h100-own' WHEN node LIKE 'node-%' THEN 'h100-leased' "
    "ELSE 'unassigned' END"
)


def _query(root: Path, window_s: int = WINDOW_S, jobs: bool = True) -> str:
    """SPEC §3 sums per (window, pool) and (window, pool, tenant); without ``jobs`` (a dataset
    without a job table) per (window, pool) only."""
    if not jobs:
        return _pool_query(root, window_s)
    w, gap = window_s * 10**9, MAX_GAP_S * 10**9
    src = f"read_parquet('{root}/{{}}/**/*.parquet', hive_partitioning=false)"
    busy_modes = "user_seconds + nice_seconds + system_seconds + irq_seconds + softirq_seconds"
    return f"""
WITH
gpu AS (
  SELECT node, job_id, epoch_ns(time) AS t,
         epoch_ns(time) - lag(epoch_ns(time)) OVER s AS dt,
         utilization_ratio AS u, power_watts AS p, energy_joules AS e,
         lag(energy_joules) OVER s AS e0
  FROM {src.format("gpu")} WINDOW s AS (PARTITION BY node, gpu_uuid ORDER BY time)),
gpu_iv AS (
  SELECT node, job_id, t // {w} AS win, {POOL_SQL} AS pool, dt,
         CASE WHEN dt <= {gap} THEN dt ELSE 0 END AS cap,
         CASE WHEN dt <= {gap} THEN coalesce(u, 0) * dt ELSE 0 END AS busy,
         CASE WHEN dt > {gap} THEN 0
              WHEN e IS NOT NULL AND e0 IS NOT NULL THEN CASE WHEN e < e0 THEN e ELSE e - e0 END
              WHEN p IS NOT NULL THEN p * dt / 1e9 ELSE 0 END AS joules,
         CASE WHEN dt > {gap} THEN dt ELSE 0 END AS gap
  FROM gpu WHERE dt IS NOT NULL),
job AS (
  SELECT node, job_id, account, epoch_ns(time) AS t, gpus_allocated AS g, cpus_allocated AS c,
         epoch_ns(time) - lag(epoch_ns(time)) OVER s AS dt
  FROM {src.format("job")} WINDOW s AS (PARTITION BY node, job_id ORDER BY time)),
job_iv AS (
  SELECT node, job_id, account, t // {w} AS win, {POOL_SQL} AS pool,
         CASE WHEN dt <= {gap} THEN g * dt ELSE 0 END AS gpu_alloc,
         CASE WHEN dt <= {gap} THEN c * dt ELSE 0 END AS cpu_alloc
  FROM job WHERE dt IS NOT NULL),
owner AS (SELECT DISTINCT node, job_id, account FROM {src.format("job")}),
cpu AS (
  SELECT epoch_ns(time) AS t, cpus,
         epoch_ns(time) - lag(epoch_ns(time)) OVER s AS dt,
         {busy_modes} AS b, lag({busy_modes}) OVER s AS b0
  FROM {src.format("cpu")} WINDOW s AS (PARTITION BY node ORDER BY time)),
cpu_pool AS (
  SELECT t // {w} AS win, 'cpu' AS pool,
         sum(CASE WHEN dt <= {gap} THEN cpus * dt ELSE 0 END) AS cap,
         sum(CASE WHEN dt > {gap} THEN 0 WHEN b < b0 THEN b ELSE b - b0 END) * 1e9 AS busy
  FROM cpu WHERE dt IS NOT NULL GROUP BY ALL),
pools AS (
  SELECT win, pool, sum(cap) AS cap, sum(busy) AS busy, sum(joules) AS joules, sum(gap) AS gap
  FROM gpu_iv GROUP BY ALL),
alloc AS (
  SELECT win, pool, sum(gpu_alloc) AS alloc FROM job_iv GROUP BY ALL
  UNION ALL
  SELECT win, 'cpu', sum(cpu_alloc) FROM job_iv GROUP BY ALL),
tenant_alloc AS (
  SELECT win, pool, account, sum(gpu_alloc) AS alloc FROM job_iv GROUP BY ALL),
tenant_busy AS (
  SELECT g.win, g.pool, o.account, sum(g.busy) AS busy
  FROM gpu_iv g JOIN owner o USING (node, job_id) GROUP BY ALL)
SELECT 'pool' AS kind, p.win, p.pool, NULL AS tenant, p.cap, a.alloc, p.busy, p.joules
FROM (SELECT * FROM pools UNION ALL SELECT win, pool, cap, busy, 0, 0 FROM cpu_pool) p
LEFT JOIN alloc a USING (win, pool)
UNION ALL
SELECT 'tenant', a.win, a.pool, a.account, NULL, a.alloc, b.busy, NULL
FROM tenant_alloc a LEFT JOIN tenant_busy b USING (win, pool, account)
"""


def _pool_query(root: Path, window_s: int) -> str:
    full = _query(root, window_s)
    head = full[: full.index("job AS (")]
    cpu = full[full.index("cpu AS (") : full.index("alloc AS (")]
    return f"""{head}{cpu.rstrip().rstrip(",")}
SELECT 'pool' AS kind, p.win, p.pool, NULL AS tenant, p.cap, 0 AS alloc, p.busy, p.joules
FROM (SELECT * FROM pools UNION ALL SELECT win, pool, cap, busy, 0, 0 FROM cpu_pool) p
"""


def run_duckdb(
    root: Path, window_s: int = WINDOW_S, jobs: bool = True
) -> tuple[float, list[tuple[object, ...]]]:
    import duckdb

    con = duckdb.connect()
    start = time.perf_counter()
    rows = con.execute(_query(root, window_s, jobs)).fetchall()
    return time.perf_counter() - start, rows


def run_tally(
    root: Path, inventory: Path, backend: str = "numpy"
) -> tuple[float, dict[str, list[dict[str, object]]]]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "telemetry.cli", "--quiet", "bill", str(root), "--inventory",
         str(inventory), "--window", "1d", "--backend", backend],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    took = time.perf_counter() - start
    bill: dict[str, list[dict[str, object]]] = json.loads(done.stdout)
    return took, bill


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def compare(
    bill: dict[str, list[dict[str, object]]],
    rows: list[tuple[object, ...]],
    window_s: int = WINDOW_S,
    jobs: bool = True,
) -> int:
    """Assert DuckDB's sums equal the bill's; returns how many numbers were compared."""
    day = window_s
    pools = {}
    tenants = {}
    for kind, win, pool, tenant, cap, alloc, busy, joules in rows:
        key = (int(win) * day, str(pool))  # type: ignore[call-overload]
        if kind == "pool":
            pools[key] = (cap, alloc, busy, joules)
        else:
            tenants[(*key, str(tenant))] = (alloc, busy)
    from datetime import datetime

    def start_s(row: dict[str, object]) -> int:
        return int(datetime.fromisoformat(str(row["window_start"])).timestamp())

    compared = 0
    for p in bill["pools"]:
        cap, alloc, busy, joules = pools[(start_s(p), str(p["pool"]))]
        checks = [
            (p["capacity_unit_hours"], cap, 3.6e12),
            (p["allocated_unit_hours"], alloc or 0.0, 3.6e12),
            (p["busy_unit_hours"], busy, 3.6e12),
        ]
        if p["kind"] == "gpu":
            checks.append((p["energy_kwh"], joules, 3.6e6))
        for ours, theirs, per in checks:
            theirs_h = float(theirs) / per  # type: ignore[arg-type]
            if not _close(float(ours), theirs_h):  # type: ignore[arg-type]
                raise AssertionError(f"pool {p['pool']}: tally {ours} vs duckdb {theirs_h}")
            compared += 1
    for t in bill["tenants"] if jobs else []:
        if t["pool"] == "cpu":
            continue
        alloc, busy = tenants[(start_s(t), str(t["pool"]), str(t["tenant"]))]
        for ours, theirs in ((t["allocated_unit_hours"], alloc), (t["busy_unit_hours"], busy)):
            if not _close(float(ours), float(theirs or 0.0) / 3.6e12):  # type: ignore[arg-type]
                raise AssertionError(f"tenant {t['tenant']}: tally {ours} vs duckdb {theirs}")
            compared += 1
    return compared


def run(rows: int, nodes: int, root: Path) -> tuple[float, float]:
    """Seconds for tally bill and for DuckDB on the same ~``rows`` rows."""
    hours = max(1, round(rows / (nodes * (2 * 8 + 1) * 360)))
    data = root / f"n{nodes}-h{hours}"
    made = cached(data, lambda into: generate(into, nodes, hours))
    if made is not None:
        print(f"generated {made:,} rows in {data}")
    inventory = root / "inventory.toml"
    inventory.write_text(f"max_gap_seconds = {MAX_GAP_S}\n" + INVENTORY)
    # Best of two runs each: the first pays for a cold page cache and cold imports.
    ours = [run_tally(data, inventory) for _ in range(2)]
    t_tally, bill = min(r[0] for r in ours), ours[-1][1]
    theirs = [run_duckdb(data) for _ in range(2)]
    t_duck, result = min(r[0] for r in theirs), theirs[-1][1]
    compared = compare(bill, result)
    print(f"\ntally bill vs DuckDB, {bill_rows(bill):,} rows, window 1d ({compared} sums equal)")
    print(f"{'tally bill (numpy)':24} {t_tally:8.2f} s")
    print(f"{'duckdb':24} {t_duck:8.2f} s")
    print(f"{'ratio tally/duckdb':24} {t_tally / t_duck:8.2f}")
    return t_tally, t_duck


def bill_rows(bill: dict[str, object]) -> int:
    inputs = bill["input"]
    assert isinstance(inputs, dict)
    return int(inputs["rows"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    run(args.rows, args.nodes, args.dir)


if __name__ == "__main__":
    main()
