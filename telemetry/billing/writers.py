"""Bill writers: JSON (one object), CSV and Parquet (three files), and a table for people."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from telemetry.billing.engine import Bill

FORMATS = ("json", "csv", "parquet", "table")
_TIME = pa.timestamp("ns", tz="UTC")
_F = pa.float64()
_WINDOW = [pa.field("window_start", _TIME, False), pa.field("window_end", _TIME, False)]

POOL_SCHEMA = pa.schema(
    [
        *_WINDOW,
        pa.field("pool", pa.string(), False),
        pa.field("kind", pa.string(), False),
        pa.field("ownership", pa.string()),
        *[
            pa.field(n, _F, n.endswith("_ratio") or n == "unit_cost")
            for n in (
                "capacity_unit_hours", "allocated_unit_hours", "busy_unit_hours",
                "allocation_ratio", "busy_ratio", "energy_kwh", "cost", "revenue", "unit_cost",
                "gross_margin_ratio", "idle_cost", "gap_hours",
            )
        ],
    ]
)  # fmt: skip
_PARTY = [
    pa.field("allocated_unit_hours", _F, False),
    pa.field("busy_unit_hours", _F, False),
    pa.field("efficiency_ratio", _F),
    pa.field("energy_kwh", _F),
    pa.field("charge", _F, False),
]
TENANT_SCHEMA = pa.schema(
    [
        *_WINDOW,
        pa.field("pool", pa.string(), False),
        pa.field("tenant", pa.string(), False),
        *_PARTY,
    ]
)
JOB_SCHEMA = pa.schema(
    [
        *_WINDOW,
        pa.field("pool", pa.string(), False),
        pa.field("job_id", pa.string(), False),
        pa.field("user", pa.string()),
        pa.field("tenant", pa.string(), False),
        *_PARTY,
    ]
)
SCHEMAS = {"pools": POOL_SCHEMA, "tenants": TENANT_SCHEMA, "jobs": JOB_SCHEMA}


def to_json(bill: Bill) -> bytes:
    """The SPEC §4 JSON object; the same bill always gives the same bytes."""
    body = {"pools": bill.pools, "tenants": bill.tenants, "jobs": bill.jobs, "input": bill.input}
    return (json.dumps(body, indent=1, allow_nan=False, ensure_ascii=False) + "\n").encode()


def _rows(bill: Bill, kind: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = getattr(bill, kind)
    return rows


def to_csv(bill: Bill, kind: str) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SCHEMAS[kind].names, lineterminator="\n")
    writer.writeheader()
    for row in _rows(bill, kind):
        writer.writerow(
            {
                k: ("" if v is None else repr(v) if isinstance(v, float) else _cell(v))
                for k, v in row.items()
            }
        )
    return out.getvalue().encode()


def _cell(value: object) -> object:
    """A text cell a spreadsheet will not run: one starting with = + - @ (or a tab or carriage
    return) gets a leading apostrophe (OWASP's advice on CSV injection). User, tenant and job
    names come from the tenants' own environments."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_arrow(bill: Bill, kind: str) -> pa.Table:
    rows = [
        {
            **r,
            "window_start": datetime.fromisoformat(r["window_start"]),
            "window_end": datetime.fromisoformat(r["window_end"]),
        }
        for r in _rows(bill, kind)
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMAS[kind])


def _money(value: float | None, currency: str) -> str:
    return "-" if value is None else f"{value:,.2f} {currency}".strip()


def _energy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"  # none measured is not zero


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _render(columns: list[tuple[str, int]], rows: list[list[str]]) -> list[str]:
    """Fixed-width text columns; a negative width aligns left."""

    def line(cells: list[str]) -> str:
        return " ".join(
            f"{c[:-w]:<{-w}}" if w < 0 else f"{c:>{w}}"
            for c, (_, w) in zip(cells, columns, strict=True)
        )

    head = line([name for name, _ in columns])
    return [head, "-" * len(head), *(line(r) for r in rows)]


def to_table(bill: Bill) -> str:
    """A readable summary: pools first, then tenants ranked by charge within each pool."""
    c = bill.currency
    pools = [
        [p["window_start"], p["pool"], p["kind"], f"{p['capacity_unit_hours']:.2f}",
         _pct(p["allocation_ratio"]), _pct(p["busy_ratio"]), _energy(p["energy_kwh"]),
         _money(p["cost"], c), _money(p["revenue"], c), _pct(p["gross_margin_ratio"])]
        for p in bill.pools
    ]  # fmt: skip
    pool_columns = [("window", -20), ("pool", -16), ("kind", -4), ("capacity h", 11),
                    ("alloc", 6), ("busy", 6), ("energy kWh", 10), ("cost", 16),
                    ("revenue", 16), ("margin", 7)]  # fmt: skip
    ranked = sorted(bill.tenants, key=lambda t: (t["window_start"], t["pool"], -t["charge"]))
    tenants = [
        [t["window_start"], t["pool"], t["tenant"], f"{t['allocated_unit_hours']:.2f}",
         f"{t['busy_unit_hours']:.2f}", _pct(t["efficiency_ratio"]), _money(t["charge"], c)]
        for t in ranked
    ]  # fmt: skip
    tenant_columns = [("window", -20), ("pool", -16), ("tenant", -20), ("alloc h", 10),
                      ("busy h", 10), ("effic", 6), ("charge", 16)]  # fmt: skip
    i = bill.input
    summary = (
        f"input: {i['files']} files, {i['rows']:,} rows, {i['rows_skipped']:,} rows skipped, "
        f"{sum(i.get('rows_out_of_range', {}).values()):,} rows out of range, "
        f"{i['files_quarantined']} files quarantined"
    )
    lines = [
        "POOLS",
        *_render(pool_columns, pools),
        "",
        "TENANTS",
        *_render(tenant_columns, tenants),
    ]
    return "\n".join([*lines, "", summary]) + "\n"


def write(bill: Bill, fmt: str, out: Path | None) -> list[Path]:
    """Write ``bill`` in ``fmt``: to ``out`` or stdout (json, table); csv and parquet need ``out``,
    used as a prefix for ``-pools``, ``-tenants`` and ``-jobs`` files. Returns the files written."""
    import sys

    if fmt in ("json", "table"):
        data = to_json(bill) if fmt == "json" else to_table(bill).encode()
        if out is None:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            return []
        out.write_bytes(data)
        return [out]
    assert out is not None
    stem = out.name.removesuffix(f".{fmt}")
    written = []
    for kind in SCHEMAS:
        path = out.with_name(f"{stem}-{kind}.{fmt}")
        if fmt == "csv":
            path.write_bytes(to_csv(bill, kind))
        else:
            pq.write_table(to_arrow(bill, kind), path, compression="zstd")
        written.append(path)
    return written
