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

_NULLABLE = {"energy_kwh", "energy_cost", "emissions_kg", "unit_cost"}
# Money fields: rounded to the currency's decimals by the engine, written with exactly that many.
MONEY = frozenset({"cost", "revenue", "idle_cost", "energy_cost", "charge", "waste_charge"})
POOL_SCHEMA = pa.schema(
    [
        *_WINDOW,
        pa.field("pool", pa.string(), False),
        pa.field("kind", pa.string(), False),
        pa.field("ownership", pa.string()),
        *[
            pa.field(n, _F, n.endswith("_ratio") or n in _NULLABLE)
            for n in (
                "capacity_unit_hours", "monitored_unit_hours", "unmonitored_unit_hours",
                "allocated_unit_hours", "busy_unit_hours", "allocation_ratio", "busy_ratio",
                "energy_kwh", "energy_cost", "emissions_kg", "cost", "revenue", "unit_cost",
                "gross_margin_ratio", "idle_cost", "gap_hours",
            )
        ],
        pa.field("currency", pa.string(), False),
    ]
)  # fmt: skip
_PARTY = [
    pa.field("allocated_unit_hours", _F, False),
    pa.field("busy_unit_hours", _F, False),
    pa.field("efficiency_ratio", _F),
    pa.field("energy_kwh", _F),
    pa.field("charge", _F, False),
    pa.field("waste_charge", _F, False),
]
TENANT_SCHEMA = pa.schema(
    [
        *_WINDOW,
        pa.field("pool", pa.string(), False),
        pa.field("tenant", pa.string(), False),
        *_PARTY,
        pa.field("currency", pa.string(), False),
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
        pa.field("allocation_source", pa.string(), False),
        pa.field("currency", pa.string(), False),
    ]
)
SCHEMAS = {"pools": POOL_SCHEMA, "tenants": TENANT_SCHEMA, "jobs": JOB_SCHEMA}


def to_json(bill: Bill) -> bytes:
    """The SPEC §4 JSON object; the same bill always gives the same bytes."""
    body = {
        "currency": bill.currency,
        "timezone": bill.timezone,
        "pools": bill.pools,
        "tenants": bill.tenants,
        "jobs": bill.jobs,
        "input": bill.input,
    }
    return (json.dumps(body, indent=1, allow_nan=False, ensure_ascii=False) + "\n").encode()


def _rows(bill: Bill, kind: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = getattr(bill, kind)
    return [{**row, "currency": bill.currency} for row in rows]


def to_csv(bill: Bill, kind: str, decimals: int = 2) -> bytes:
    """One CSV of ``kind``; money with exactly ``decimals`` decimals (``12.50``)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SCHEMAS[kind].names, lineterminator="\n")
    writer.writeheader()
    for row in _rows(bill, kind):
        writer.writerow({k: _csv_value(k, v, decimals) for k, v in row.items()})
    return out.getvalue().encode()


def _csv_value(key: str, value: object, decimals: int) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{decimals}f}" if key in MONEY else repr(value)
    return _cell(value)


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


def _money(value: float | None, currency: str, decimals: int = 2) -> str:
    return "-" if value is None else f"{value:,.{decimals}f} {currency}".strip()


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


def to_table(bill: Bill, decimals: int = 2) -> str:
    """A readable invoice summary: per pool capacity, allocated, busy, cost, revenue, unit cost,
    margin and idle cost, a total line per pool kind; then tenants ranked by charge in each
    pool, with what they paid for idle allocation (waste)."""
    c = bill.currency

    def money(value: float | None) -> str:
        return _money(value, c, decimals)

    pools = []
    totals: dict[str, dict[str, float]] = {}
    for p in bill.pools:
        pools.append(
            [p["window_start"], p["pool"], p["kind"], f"{p['capacity_unit_hours']:,.1f}",
             f"{p['allocated_unit_hours']:,.1f}", f"{p['busy_unit_hours']:,.1f}",
             _pct(p["allocation_ratio"]), money(p["cost"]), money(p["revenue"]),
             money(p["unit_cost"]), _pct(p["gross_margin_ratio"]), money(p["idle_cost"])]
        )  # fmt: skip
        into = totals.setdefault(p["kind"], dict.fromkeys(_TOTALS, 0.0))
        for key in _TOTALS:
            into[key] += p[key] or 0.0
    for kind, t in sorted(totals.items()):
        cost, revenue = round(t["cost"], decimals), round(t["revenue"], decimals)
        pools.append(
            ["total", f"all {kind} pools", kind, f"{t['capacity_unit_hours']:,.1f}",
             f"{t['allocated_unit_hours']:,.1f}", f"{t['busy_unit_hours']:,.1f}",
             _pct(_share(t["allocated_unit_hours"], t["capacity_unit_hours"])), money(cost),
             money(revenue), money(_share(cost, t["allocated_unit_hours"])),
             _pct(_share(revenue - cost, revenue)), money(round(t["idle_cost"], decimals))]
        )  # fmt: skip
    pool_columns = [("window", -25), ("pool", -16), ("kind", -4), ("capacity h", 11),
                    ("alloc h", 10), ("busy h", 10), ("alloc", 6), ("cost", 15), ("revenue", 15),
                    ("unit cost", 11), ("margin", 7), ("idle cost", 14)]  # fmt: skip
    ranked = sorted(bill.tenants, key=lambda t: (t["window_start"], t["pool"], -t["charge"]))
    tenants = [
        [t["window_start"], t["pool"], t["tenant"], f"{t['allocated_unit_hours']:,.2f}",
         f"{t['busy_unit_hours']:,.2f}", _pct(t["efficiency_ratio"]), money(t["charge"]),
         money(t["waste_charge"])]
        for t in ranked
    ]  # fmt: skip
    tenant_columns = [("window", -25), ("pool", -16), ("tenant", -20), ("alloc h", 10),
                      ("busy h", 10), ("effic", 6), ("charge", 15), ("waste", 14)]  # fmt: skip
    i = bill.input
    summary = (
        f"input: {i['files']} files, {i['rows']:,} rows, {i['rows_skipped']:,} rows skipped, "
        f"{sum(i.get('rows_out_of_range', {}).values()):,} rows out of range, "
        f"{i['files_quarantined']} files quarantined"
    )
    lines = [
        f"POOLS (windows in {bill.timezone}; money in {c or 'the inventory currency'})",
        *_render(pool_columns, pools),
        "",
        "TENANTS (by charge; waste = charge for allocated units that sat idle)",
        *_render(tenant_columns, tenants),
    ]
    reconciliation = i.get("reconciliation")
    if reconciliation:
        lines += [
            "",
            "ACCOUNTING: {jobs_accounted:,} jobs accounted, {jobs_sampled_only:,} sampled only, "
            "{jobs_accounted_without_samples:,} accounted without samples; jobs with both: "
            "{allocated_unit_hours_sampled:,.2f} unit-h sampled vs "
            "{allocated_unit_hours_accounted:,.2f} accounted".format(**reconciliation),
        ]
    return "\n".join([*lines, "", summary]) + "\n"


_TOTALS = ("capacity_unit_hours", "allocated_unit_hours", "busy_unit_hours", "cost", "revenue",
           "idle_cost")  # fmt: skip


def _share(num: float, den: float) -> float | None:
    return num / den if den else None


def write(bill: Bill, fmt: str, out: Path | None, decimals: int = 2) -> list[Path]:
    """Write ``bill`` in ``fmt``: to ``out`` or stdout (json, table); csv and parquet need ``out``,
    used as a prefix for ``-pools``, ``-tenants`` and ``-jobs`` files. Returns the files written."""
    import sys

    if fmt in ("json", "table"):
        data = to_json(bill) if fmt == "json" else to_table(bill, decimals).encode()
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
            path.write_bytes(to_csv(bill, kind, decimals))
        else:
            pq.write_table(to_arrow(bill, kind), path, compression="zstd")
        written.append(path)
    return written
