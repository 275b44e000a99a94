"""Sample rows as dicts, a dataset written from them in the SPEC §2 layout (any split), and
bills compared line by line: what the bill tests share."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from telemetry.billing.bill import compute_bill
from telemetry.billing.engine import Bill
from telemetry.billing.inventory import Inventory
from telemetry.schema import CPU_MODES, SCHEMAS
from telemetry.store.layout import partition_dir
from tests.support.units import NS

HOUR = 3600 * NS
T0 = 1_788_220_800 * NS  # 2026-09-01T00:00:00Z

Row = dict[str, Any]
Tables = dict[str, list[Row]]


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns // NS, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- rows ---------------------------------------------------------------------------------------


def gpu_row(
    t: int,
    node: str,
    uuid: str,
    index: int,
    util: float | None,
    power: float | None,
    energy: float | None,
    job: str | None,
) -> Row:
    return {
        "time": t,
        "node": node,
        "gpu_uuid": uuid,
        "gpu_index": index,
        "gpu_model": "NVIDIA A100-SXM4-80GB" if uuid.startswith("GPU") else "MIG 1g.10gb",
        "utilization_ratio": util,
        "sm_active_ratio": None,
        "memory_used_bytes": 3 << 30,
        "memory_total_bytes": 80 << 30,
        "power_watts": power,
        "energy_joules": energy,
        "temperature_celsius": 51.0,
        "job_id": job,
    }


def cpu_row(t: int, node: str, cpus: int, counters: dict[str, float], energy: float | None) -> Row:
    row: Row = {"time": t, "node": node, "cpus": cpus}
    for mode in CPU_MODES:
        row[f"{mode}_seconds"] = counters.get(mode, 0.0)
    row["memory_total_bytes"] = 256 << 30
    row["memory_available_bytes"] = 100 << 30
    row["energy_joules"] = energy
    return row


def job_row(
    t: int,
    node: str,
    job: str,
    user: str,
    account: str,
    cpus: float,
    gpus: float,
    cpu_seconds: float,
) -> Row:
    return {
        "time": t,
        "node": node,
        "job_id": job,
        "user": user,
        "account": account,
        "cpus_allocated": cpus,
        "gpus_allocated": gpus,
        "cpu_seconds": cpu_seconds,
        "memory_bytes": 2 << 30,
    }


def arrow(name: str, rows: Sequence[Row]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMAS[name])


def stored(tables: Tables) -> Tables:
    """The rows as they read back from Parquet (float32 columns rounded), time as int ns."""
    out: Tables = {}
    for name, rows in tables.items():
        table = arrow(name, rows)
        table = table.set_column(0, "time", table.column("time").cast(pa.int64()))
        out[name] = table.to_pylist()
    return out


# --- writing a dataset in the SPEC §2 layout ----------------------------------------------------


@dataclass
class Layout:
    """How rows are split: files per (table, date, node) partition, row-group sizes, order."""

    seed: int = 0
    files_per_partition: int = 3
    empty_files: Sequence[tuple[str, str]] = ()  # (table, node): an extra zero-row file
    in_time_order: bool = False  # as the daemon writes: files and row groups hold time ranges


def write_tables(root: Path, tables: Tables, layout: Layout) -> int:
    """Write ``tables`` shuffled over ``files_per_partition`` files per partition (some may hold
    no rows) with random row-group sizes; returns the number of files written."""
    rng = random.Random(layout.seed)
    files = 0
    for name, rows in tables.items():
        partitions: dict[Path, list[Row]] = {}
        for row in rows:
            partitions.setdefault(partition_dir(root, name, row["time"], row["node"]), []).append(
                row
            )
        for directory, rows_here in sorted(partitions.items()):
            directory.mkdir(parents=True, exist_ok=True)
            part = rows_here[:]
            rng.shuffle(part)
            if layout.in_time_order:
                part.sort(key=lambda r: r["time"])
            cuts = sorted(rng.randint(0, len(part)) for _ in range(layout.files_per_partition - 1))
            bounds = [0, *cuts, len(part)]
            for i, (a, b) in enumerate(itertools.pairwise(bounds)):
                table = arrow(name, part[a:b])
                group = rng.randint(1, max(1, b - a))
                pq.write_table(table, directory / f"part-{i}.parquet", row_group_size=group)
                files += 1
    for name, node in layout.empty_files:
        directory = partition_dir(root, name, T0, node)
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(SCHEMAS[name].empty_table(), directory / "empty.parquet")
        files += 1
    return files


# --- comparing bills ----------------------------------------------------------------------------

ROW_KEYS = {
    "pools": ("window_start", "pool", "kind"),
    "tenants": ("window_start", "pool", "tenant"),
    "jobs": ("window_start", "pool", "job_id", "user", "tenant"),
}


def bill_dict(bill: Bill) -> dict[str, Any]:
    return {"pools": bill.pools, "tenants": bill.tenants, "jobs": bill.jobs, "input": bill.input}


def bill_diff(got: dict[str, Any], want: dict[str, Any], limit: int = 30) -> list[str]:
    """Readable differences between two bills (engine first, reference second)."""
    problems: list[str] = []
    for kind, keys in ROW_KEYS.items():
        g_rows, w_rows = got[kind], want[kind]
        g_keys = [tuple(r[k] for k in keys) for r in g_rows]
        w_keys = [tuple(r[k] for k in keys) for r in w_rows]
        if g_keys != w_keys:
            only_g = [k for k in g_keys if k not in set(w_keys)]
            only_w = [k for k in w_keys if k not in set(g_keys)]
            problems.append(
                f"{kind}: engine has {len(g_keys)} rows, reference {len(w_keys)}; "
                f"only engine {only_g[:5]}, only reference {only_w[:5]}"
                + ("; same rows, different order" if not only_g and not only_w else "")
            )
            continue
        for g, w in zip(g_rows, w_rows, strict=True):
            where = f"{kind}{tuple(w[k] for k in keys)}"
            if list(g) != list(w):
                problems.append(f"{where}: keys {list(g)} != {list(w)}")
                continue
            for name, value in w.items():
                if g[name] != value or type(g[name]) is not type(value):
                    problems.append(f"{where}.{name}: engine {g[name]!r}, reference {value!r}")
    if got["input"] != want["input"]:
        problems.append(f"input: engine {got['input']}, reference {want['input']}")
    if len(problems) > limit:
        problems = [*problems[:limit], f"... and {len(problems) - limit} more"]
    return problems


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    problems = bill_diff(got, want)
    assert not problems, "bills differ:\n" + "\n".join(problems)


def bill_of(
    root: Path,
    inv: Inventory,
    window_s: int,
    start: str | None = None,
    end: str | None = None,
    **kw: Any,
) -> Bill:
    """``compute_bill`` without the unused-glob warnings (small datasets leave pools empty)."""
    return compute_bill(root, inv, window_s, start, end, warn=lambda _: None, **kw)


def gpu_job_row(
    t: int, node: str, uuid: str, job: str, share: float, sm: float | None = None
) -> Row:
    return {"time": t, "node": node, "gpu_uuid": uuid, "job_id": job, "share": share,
            "sm_utilization_ratio": sm, "memory_used_bytes": None}  # fmt: skip
