"""The HTML report: one self-contained file (plotly.js inlined, no network needed to view it).

Every string from the data (node, tenant, job, user names) is escaped: in HTML by ``html.escape``
and inside the charts by plotly's JSON encoder, which escapes ``<``, ``>`` and ``/``.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from telemetry.billing.engine import NS
from telemetry.billing.report import ReportData, coarsen, totals_by

HEATMAP_MAX_COLUMNS = 240
# A GPU-window is "allocated but idle" when a job held it at least this share of the covered
# time and the GPU was busy less than IDLE_BELOW of it.
HELD_AT_LEAST = 0.5
IDLE_BELOW = 0.10
TOP_JOBS = 25
# A GPU throttled by power or heat at least this share of its samples is flagged.
THROTTLED_AT_LEAST = 0.05
TOP_TENANT_LINES = 8
CELL_MAX_CHARS = 40
UNITS = {"gpu": "GPU-hours", "cpu": "core-hours"}
_PALETTE = ("#1f5fbf", "#2e7d32", "#8e24aa", "#e07b00", "#00838f", "#6d4c41", "#c2185b")
_CONFIG = {"displaylogo": False, "responsive": True}
_LAYOUT: dict[str, Any] = {
    "template": "plotly_white",
    "margin": {"l": 70, "r": 20, "t": 90, "b": 50},
    # above the plot, under the title: never far below it, never over the x axis labels
    "legend": {"orientation": "h", "x": 0, "xanchor": "left", "y": 1.0, "yanchor": "bottom"},
    "title": {"y": 0.98, "yanchor": "top"},
}
# Unallocated GPU-windows in the heatmap, and the allocated-but-idle mark.
UNALLOCATED_COLOR = "rgba(200,204,212,1)"
IDLE_COLOR = "rgba(215,38,38,0.9)"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1400px; padding: 0 1rem; color: #1d2330; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #d8dde6; }
.meta { color: #5a6478; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.7rem; border-bottom: 1px solid #e6e9ef; text-align: right; }
th { background: #f3f5f9; } td.text, th.text { text-align: left; }
.note { color: #5a6478; font-size: 0.9rem; max-width: 60rem; }
.bad { color: #b3261e; font-weight: 600; }
.headline { display: flex; flex-wrap: wrap; gap: 0.8rem; margin: 1.2rem 0; }
.card { border: 1px solid #d8dde6; border-radius: 6px; padding: 0.6rem 1rem; min-width: 9rem;
        background: #f8f9fb; }
.card .value { font-size: 1.6rem; font-weight: 650; }
.card .label { color: #5a6478; font-size: 0.85rem; }
.card .sub { color: #5a6478; font-size: 0.8rem; }
"""

# Installed before plotly.js so that any error while the page renders is recorded on <body>
# (headless browsers and tests read it back from the DOM).
_ERROR_TRAP = """
window.__tallyErrors = [];
window.addEventListener("error", function (e) {
  window.__tallyErrors.push(String(e.message));
  document.documentElement.setAttribute("data-errors", window.__tallyErrors.join(" | "));
});
"""


def _iso(ns: int | None) -> str:
    if ns is None:
        return "—"
    return datetime.fromtimestamp(ns // NS, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _label(text: str) -> str:
    """A data string for a chart: plotly renders legend, tick and hover text as HTML (it follows
    ``<a href>``), so every name is escaped before it gets there."""
    return html.escape(str(text), quote=False)


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _money(value: float | None, currency: str) -> str:
    """An amount with its currency; "—" alone where there is none (no "— USD")."""
    return "—" if value is None else f"{value:,.2f} {currency}"


def _kind_order(kind: str) -> int:
    return 0 if kind == "gpu" else 1  # GPU pools first: they carry the money


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _table(headers: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """An HTML table; cells are escaped here, so callers pass plain text."""

    def cell(tag: str, i: int, value: str) -> str:
        cls = ' class="text"' if i < text_columns else ""
        if len(value) > CELL_MAX_CHARS:  # the whole value stays readable on hover
            shown = value[: CELL_MAX_CHARS - 1] + "…"
            return f'<{tag}{cls} title="{html.escape(value)}">{html.escape(shown)}</{tag}>'
        return f"<{tag}{cls}>{html.escape(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Charts:
    """Numbers the chart divs and renders each figure without plotly.js (inlined once)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, figure: go.Figure, height: int = 420) -> str:
        self.count += 1
        own = figure.layout.to_plotly_json()  # what the chart set itself wins over the defaults
        figure.update_layout(**_LAYOUT, height=height)
        figure.update_layout({k: own[k] for k in ("legend", "margin") if k in own})
        return str(
            pio.to_html(
                figure,
                full_html=False,
                include_plotlyjs=False,
                div_id=f"chart-{self.count}",
                config=_CONFIG,
                default_height=f"{height}px",
            )
        )


def render_report(data: ReportData) -> str:
    """The report as one HTML document (str)."""
    charts = _Charts()
    bill = data.bill
    currency = bill.currency
    sections = [
        _headline(data, currency),
        _pools_section(data, charts, currency),
        _heatmap_section(data, charts),
        _tenants_section(data, charts, currency),
        _jobs_section(data, charts, currency),
        _plan_section(data, charts, currency),
        _health_section(data, charts),
        _coverage_section(data, charts),
    ]
    title = f"tally report — {data.dataset}"
    inputs = bill.input
    meta = (
        f"Samples from {_iso(data.first_ns)} to {_iso(data.last_ns)}, "
        f"window {_duration(data.window_s)}; {inputs.get('files', 0):,} files, "
        f"{inputs.get('rows', 0):,} rows read."
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script>{_ERROR_TRAP}</script>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<h1>Utilisation and billing report</h1>"
        f'<p class="meta">{html.escape(data.dataset)} — {html.escape(meta)}</p>'
        + "".join(sections)
        + f'<p class="meta" id="charts-count" data-charts="{charts.count}">'
        "Generated by tally from stored samples; every figure is derived from the same integer "
        "microsecond and millijoule sums as <code>tally bill</code>.</p></body></html>\n"
    )


def _card(key: str, label: str, value: str, sub: str = "") -> str:
    extra = f'<div class="sub">{html.escape(sub)}</div>' if sub else ""
    return (
        f'<div class="card" id="headline-{key}"><div class="label">{html.escape(label)}</div>'
        f'<div class="value">{html.escape(value)}</div>{extra}</div>'
    )


def _headline(data: ReportData, currency: str) -> str:
    """The answer first: the fleet's GPU-hours, how much of them was sold and used, and what
    idle capacity and idle allocations cost."""
    pools = data.totals.pools
    gpu = [p for p in pools if p["kind"] == "gpu"]
    capacity = sum(p["capacity_unit_hours"] for p in gpu)
    allocated = sum(p["allocated_unit_hours"] for p in gpu)
    busy = sum(p["busy_unit_hours"] for p in gpu)
    monitored = sum(p["monitored_unit_hours"] for p in gpu)  # SPEC §4: busy of what was seen
    revenue = sum(p["revenue"] for p in pools)
    cost = sum(p["cost"] for p in pools)
    idle_cost = sum(p["idle_cost"] or 0.0 for p in pools)
    wasted = sum(t["waste_charge"] for t in data.totals.tenants)
    cards = [
        _card("gpu-hours", "GPU capacity", f"{capacity:,.1f} GPU-h"),
        _card("allocation", "GPUs allocated", _pct(_ratio(allocated, capacity)),
              f"{allocated:,.1f} GPU-h sold"),
        _card("busy", "GPUs busy", _pct(_ratio(busy, monitored)),
              f"{busy:,.1f} of {monitored:,.1f} GPU-h monitored"),
        _card("idle-cost", "Idle cost", _money(idle_cost, currency),
              "capacity nobody was allocated"),
        _card("waste", "Waste charge", _money(wasted, currency),
              "paid for allocated units that sat idle"),
        _card("margin", "Gross margin", _pct(_ratio(revenue - cost, revenue)),
              f"revenue {_money(revenue, currency)}, cost {_money(cost, currency)}"),
    ]  # fmt: skip
    return '<div class="headline" id="headline">' + "".join(cards) + "</div>"


def _pools_section(data: ReportData, charts: _Charts, currency: str) -> str:
    rows = data.bill.pools  # per window: the charts
    fields = (
        "capacity_unit_hours",
        "monitored_unit_hours",
        "allocated_unit_hours",
        "busy_unit_hours",
        "energy_kwh",
        "cost",
        "revenue",
        "idle_cost",
        "gap_hours",
    )
    totals = sorted(
        totals_by(data.totals.pools, ("pool", "kind", "ownership"), fields),
        key=lambda r: (_kind_order(r["kind"]), r["pool"]),
    )
    table_rows = []
    for t in totals:
        capacity, allocated = t["capacity_unit_hours"], t["allocated_unit_hours"]
        table_rows.append(
            [
                t["pool"],
                t["kind"],
                t["ownership"] or "—",
                f"{_num(capacity, 1)} {UNITS[t['kind']]}",
                _pct(_ratio(allocated, capacity)),
                _pct(_ratio(t["busy_unit_hours"], t["monitored_unit_hours"])),
                _num(t["energy_kwh"], 1) if t["energy_kwh"] else "—",
                _money(t["cost"], currency),
                _money(t["revenue"], currency),
                _money(_ratio(t["cost"], allocated), currency),
                _pct(_ratio(t["revenue"] - t["cost"], t["revenue"])),
                _money(t["idle_cost"], currency),
            ]
        )
    headers = [
        "pool",
        "kind",
        "ownership",
        "capacity",
        "allocation",
        "busy",
        "energy kWh",
        "cost",
        "revenue",
        "unit cost",
        "gross margin",
        "idle cost",
    ]
    ratios = make_subplots(
        rows=max(1, len(totals)),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.12 if len(totals) <= 3 else 0.08,
        subplot_titles=[
            _label(f"{t['pool']} ({t['kind']}, {t['ownership'] or 'no owner'})") for t in totals
        ],
    )
    kinds = sorted({t["kind"] for t in totals}, key=_kind_order)
    money = make_subplots(
        rows=max(1, len(kinds)),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.15,
        subplot_titles=[f"{kind.upper()} pools" for kind in kinds],
    )
    per_day = 86400 / data.window_s
    for row, t in enumerate(totals, start=1):
        mine = [r for r in rows if r["pool"] == t["pool"] and r["kind"] == t["kind"]]
        x = [r["window_start"] for r in mine]
        name = _label(t["pool"])
        first = row == 1
        ratios.add_trace(
            go.Scatter(x=x, y=[r["allocation_ratio"] for r in mine], name="allocation ratio",
                       line={"color": "#1f5fbf"}, legendgroup="a", showlegend=first),
            row=row, col=1,
        )  # fmt: skip
        ratios.add_trace(
            go.Scatter(x=x, y=[r["busy_ratio"] for r in mine], name="busy ratio",
                       line={"color": "#e07b00"}, legendgroup="b", showlegend=first),
            row=row, col=1,
        )  # fmt: skip
        ratios.update_yaxes(tickformat=".0%", range=[0, 1.05], tickvals=[0.25, 0.5, 0.75, 1],
                            row=row, col=1)  # fmt: skip
        at = kinds.index(t["kind"]) + 1
        color = _PALETTE[(row - 1) % len(_PALETTE)]
        money.add_trace(
            go.Scatter(x=x, y=[r["revenue"] * per_day for r in mine], name=f"{name} revenue",
                       line={"color": color}),
            row=at, col=1,
        )  # fmt: skip
        money.add_trace(
            go.Scatter(x=x, y=[r["cost"] * per_day for r in mine], name=f"{name} cost",
                       line={"color": color, "dash": "dash"}),
            row=at, col=1,
        )  # fmt: skip
    ratios.update_xaxes(ticklabelstandoff=8)
    ratios.update_layout(title="Allocation ratio and busy ratio per window")
    money.update_yaxes(rangemode="tozero", tickformat=",.0f", title=f"{currency} per day")
    money.update_layout(
        title=f"Revenue (solid) and cost (dashed), at each window's rate per day ({currency})",
        hovermode="x unified",
        legend={"y": 1.06},  # above the first subplot's title
        margin={"t": 140},
    )
    money.update_traces(hovertemplate="%{y:,.2f}")
    return (
        "<h2>Pools</h2>"
        + _table(headers, table_rows, text_columns=3)
        + '<p class="note">Unit cost is cost per allocated unit-hour; gross margin is '
        "(revenue − cost) / revenue; idle cost is the cost of capacity nobody was allocated.</p>"
        + charts(ratios, height=160 + 210 * max(1, len(totals)))
        + charts(money, height=180 + 260 * max(1, len(kinds)))
    )


def _heatmap_section(data: ReportData, charts: _Charts) -> str:
    parts = ["<h2>GPU utilisation</h2>"]
    gpu = data.gpu
    if not gpu.labels:
        return (
            parts[0] + "<p>No GPU samples in the selected range.</p>" + _cpu_heatmap(data, charts)
        )
    sums, starts = coarsen(gpu.sums, gpu.window_starts_ns, HEATMAP_MAX_COLUMNS)
    capacity = sums["capacity_us"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        busy = np.where(capacity > 0, sums["busy_us"] / capacity, np.nan)
        held = np.where(capacity > 0, sums["held_us"] / capacity, np.nan)
    idle = np.where((held >= HELD_AT_LEAST) & (busy < IDLE_BELOW), 1.0, np.nan)
    unallocated = np.where(held < HELD_AT_LEAST, 1.0, np.nan)  # NaN held (no samples) stays blank
    busy_allocated = np.where(held >= HELD_AT_LEAST, busy, np.nan)
    x = [_iso(int(s)) for s in starts]
    y = list(range(len(gpu.labels)))
    names = [_label(f"{d['node']} · GPU {d.get('index', '?')}") for d in gpu.details]
    hover = np.stack(
        [held, np.broadcast_to(np.array(names, dtype=object)[:, None], busy.shape)], axis=-1
    )
    figure = go.Figure()
    figure.add_trace(
        go.Heatmap(
            z=unallocated,
            x=x,
            y=y,
            zmin=0,
            zmax=1,
            showscale=False,
            colorscale=[[0, UNALLOCATED_COLOR], [1, UNALLOCATED_COLOR]],
            customdata=hover,
            hovertemplate="%{customdata[1]}<br>%{x}<br>unallocated (held "
            "%{customdata[0]:.0%})<extra></extra>",
            name="unallocated",
        )
    )
    figure.add_trace(
        go.Heatmap(
            z=busy_allocated,
            x=x,
            y=y,
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            customdata=hover,
            colorbar={"title": {"text": "busy"}, "tickformat": ".0%"},
            hovertemplate="%{customdata[1]}<br>%{x}<br>busy %{z:.0%}, allocated "
            "%{customdata[0]:.0%}<extra></extra>",
            name="busy",
        )
    )
    figure.add_trace(
        go.Heatmap(
            z=idle,
            x=x,
            y=y,
            zmin=0,
            zmax=1,
            showscale=False,
            hoverinfo="skip",
            colorscale=[[0, IDLE_COLOR], [1, IDLE_COLOR]],
            name="allocated but idle",
        )
    )
    for label, color in (("unallocated", UNALLOCATED_COLOR), ("allocated but idle", IDLE_COLOR)):
        figure.add_trace(  # legend entries for the two flat layers
            go.Scatter(x=[None], y=[None], mode="markers", name=label, showlegend=True,
                       marker={"symbol": "square", "size": 12, "color": color})
        )  # fmt: skip
    boundaries = [
        i - 0.5
        for i in range(1, len(gpu.details))
        if gpu.details[i]["node"] != gpu.details[i - 1]["node"]
    ]
    for b in boundaries:
        figure.add_hline(y=b, line={"color": "white", "width": 2})
    figure.update_yaxes(tickvals=y, ticktext=names, autorange="reversed", title="node · GPU")
    figure.update_layout(
        title="GPU busy ratio per window where a job held the GPU, grouped by node",
        legend={"x": 1, "xanchor": "right"},
    )
    rows = len(names)
    height = int(160 + rows * min(18, max(4, 1800 // max(rows, 1))))
    idle_cells = int(np.count_nonzero(idle == 1.0))
    window_s = int((starts[1] - starts[0]) // NS) if starts.size > 1 else data.window_s
    unallocated_cells = int(np.count_nonzero(unallocated == 1.0))
    parts.append(
        f'<p class="note">Each cell is one GPU over {_duration(window_s)}. Where a job held the '
        f"GPU at least {HELD_AT_LEAST:.0%} of the time the colour is its busy ratio; grey cells "
        f'were unallocated (<span id="unallocated-cells">{unallocated_cells}</span>); blank '
        f"cells have no samples; red marks allocated cells busy less than {IDLE_BELOW:.0%} — "
        f'<span class="bad" id="idle-cells">{idle_cells}</span> such cells.</p>'
    )
    parts.append(charts(figure, height=height))
    return "".join(parts) + _cpu_heatmap(data, charts)


def _node_heatmap(
    charts: _Charts,
    data: ReportData,
    z: np.ndarray,
    starts: np.ndarray,
    what: str,
    title: str,
    colorscale: Any,
) -> str:
    """One row per node (the cpu grid's order), one column per (coarsened) window."""
    names = [_label(d["node"]) for d in data.cpu.details]
    y = list(range(len(names)))
    figure = go.Figure(
        go.Heatmap(
            z=z, x=[_iso(int(s)) for s in starts], y=y, zmin=0, zmax=1, colorscale=colorscale,
            colorbar={"title": {"text": what}, "tickformat": ".0%"},
            hovertemplate="%{x}<br>" + what + " %{z:.0%}<extra></extra>",
        )
    )  # fmt: skip
    figure.update_yaxes(tickvals=y, ticktext=names, autorange="reversed", title="node")
    figure.update_layout(title=title)
    height = int(160 + len(names) * min(18, max(4, 1200 // max(len(names), 1))))
    return charts(figure, height=height)


def _cpu_heatmap(data: ReportData, charts: _Charts) -> str:
    cpu = data.cpu
    if not cpu.labels:
        return ""
    sums, starts = coarsen(cpu.sums, cpu.window_starts_ns, HEATMAP_MAX_COLUMNS)
    capacity = sums["capacity_us"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        busy = np.where(capacity > 0, sums["busy_us"] / capacity, np.nan)
    title = "CPU busy ratio per window and node"
    return "<h2>CPU utilisation</h2>" + _node_heatmap(
        charts, data, busy, starts, "CPU busy", title, "Viridis"
    )


def _tenants_section(data: ReportData, charts: _Charts, currency: str) -> str:
    rows = data.totals.tenants
    kinds = {(p["pool"]): p["kind"] for p in data.totals.pools}
    per: dict[str, dict[str, float]] = {}
    for r in rows:
        t = per.setdefault(
            r["tenant"],
            {"charge": 0.0, "waste": 0.0, "gpu_alloc": 0.0, "gpu_busy": 0.0, "cpu_alloc": 0.0,
             "cpu_busy": 0.0, "gpu_waste": 0.0},
        )  # fmt: skip
        kind = kinds.get(r["pool"], "gpu")
        wasted = r["waste_charge"]
        t["charge"] += r["charge"]
        t["waste"] += wasted
        t[f"{kind}_alloc"] += r["allocated_unit_hours"]
        t[f"{kind}_busy"] += r["busy_unit_hours"]
        if kind == "gpu":
            t["gpu_waste"] += wasted
    ranked = sorted(per.items(), key=lambda item: (-item[1]["charge"], item[0]))
    table_rows = [
        [
            str(rank),
            tenant,
            _money(t["charge"], currency),
            _money(t["waste"], currency),
            _num(t["gpu_alloc"], 1),
            _pct(_ratio(t["gpu_busy"], t["gpu_alloc"])),
            _money(t["gpu_waste"], currency),
            _num(t["cpu_alloc"], 1),
            _pct(_ratio(t["cpu_busy"], t["cpu_alloc"])),
        ]
        for rank, (tenant, t) in enumerate(ranked, start=1)
    ]
    headers = [
        "#",
        "tenant",
        "charge",
        "waste charge",
        "GPU-hours",
        "GPU efficiency",
        "GPU waste",
        "core-hours",
        "CPU efficiency",
    ]
    if not ranked:
        return "<h2>Tenants</h2><p>No allocations in the selected range.</p>"
    tenants = [t for t, _ in ranked][::-1]  # largest at the top of a horizontal bar chart
    names = [_label(t) for t in tenants]
    used = [per[t]["charge"] - per[t]["waste"] for t in tenants]
    idle = [per[t]["waste"] for t in tenants]
    bars = go.Figure()
    bars.add_trace(
        go.Bar(y=names, x=used, orientation="h", name="charge for busy units",
               marker={"color": "#2e7d32"},
               hovertemplate="%{y}<br>%{x:,.2f} " + html.escape(currency) + "<extra></extra>")
    )  # fmt: skip
    bars.add_trace(
        go.Bar(y=names, x=idle, orientation="h", name="waste charge (idle allocations)",
               marker={"color": "#d62728"},
               text=[f"{per[t]['charge']:,.2f} {currency} total" for t in tenants],
               textposition="outside", cliponaxis=False,
               hovertemplate="%{y}<br>%{x:,.2f} " + html.escape(currency) + "<extra></extra>")
    )  # fmt: skip
    bars.update_layout(
        barmode="stack",
        title=f"Charge per tenant ({currency}): busy and idle",
        legend={"traceorder": "normal"},
    )
    widest = max(per[t]["charge"] for t in tenants)
    # room on the right for the totals, so small tenants' bars still carry a readable number
    bars.update_xaxes(range=[0, widest * 1.3 or 1], tickformat=",.0f", title=currency)
    bars.update_yaxes(automargin=True)
    top = [t for t, _ in ranked[:TOP_TENANT_LINES]]
    over_time = go.Figure()
    per_day = 86400 / data.window_s
    for tenant in top:
        charge: dict[str, float] = {}
        for r in rows:
            if r["tenant"] == tenant:
                charge[r["window_start"]] = charge.get(r["window_start"], 0.0) + r["charge"]
        x = sorted(charge)
        over_time.add_trace(
            go.Scatter(x=x, y=[charge[k] * per_day for k in x], name=_label(tenant), mode="lines")
        )
    over_time.update_yaxes(rangemode="tozero", tickformat=",.0f", title=f"{currency} per day")
    over_time.update_layout(
        title=f"Charge of the top {len(top)} tenants, at each window's rate per day ({currency})"
    )
    return (
        "<h2>Tenants</h2>"
        '<p class="note">Ranked by charge. Efficiency is busy / allocated unit-hours; the waste '
        "charge is what a tenant paid for allocated units that sat idle: charge × (1 − "
        "efficiency).</p>"
        + _table(headers, table_rows, text_columns=2)
        + charts(bars, height=max(300, 140 + 46 * len(names)))
        + charts(over_time, height=380)
    )


def _jobs_section(data: ReportData, charts: _Charts, currency: str) -> str:
    kinds = {p["pool"]: p["kind"] for p in data.totals.pools}
    gpu_rows = [r for r in data.totals.jobs if kinds.get(r["pool"]) == "gpu"]
    fields = ("allocated_unit_hours", "busy_unit_hours", "charge")
    jobs = totals_by(gpu_rows, ("pool", "job_id", "user", "tenant"), fields)
    waste_of: dict[tuple[str, str], float] = {}
    for r in gpu_rows:
        key = (r["pool"], r["job_id"])
        waste_of[key] = waste_of.get(key, 0.0) + r["waste_charge"]
    for j in jobs:
        j["wasted"] = max(0.0, j["allocated_unit_hours"] - j["busy_unit_hours"])
        j["efficiency"] = _ratio(j["busy_unit_hours"], j["allocated_unit_hours"])
        j["waste_charge"] = waste_of.get((j["pool"], j["job_id"]), 0.0)
    jobs.sort(key=lambda j: (-j["wasted"], j["job_id"], j["pool"]))
    if not jobs:
        return "<h2>Jobs that wasted most</h2><p>No GPU jobs in the selected range.</p>"
    top = jobs[:TOP_JOBS]
    table_rows = [
        [
            j["job_id"],
            j["user"] or "—",
            j["tenant"],
            j["pool"],
            _num(j["allocated_unit_hours"]),
            _num(j["busy_unit_hours"]),
            _pct(j["efficiency"]),
            _num(j["wasted"]),
            _money(j["waste_charge"], currency),
        ]
        for j in top
    ]
    headers = [
        "job",
        "user",
        "tenant",
        "pool",
        "GPU-hours allocated",
        "busy",
        "efficiency",
        "idle GPU-hours",
        "waste charge",
    ]
    scatter = go.Figure(
        go.Scatter(
            x=[j["allocated_unit_hours"] for j in jobs],
            y=[j["efficiency"] for j in jobs],
            mode="markers",
            text=[_label(f"job {j['job_id']} ({j['tenant']})") for j in jobs],
            marker={
                "size": 8,
                "color": [j["wasted"] for j in jobs],
                "colorscale": "Reds",
                "colorbar": {"title": {"text": "idle GPU-h"}},
            },
            hovertemplate="%{text}<br>%{x:.2f} GPU-hours, efficiency %{y:.0%}<extra></extra>",
        )
    )
    scatter.update_layout(title="Every GPU job: allocated GPU-hours against efficiency")
    scatter.update_xaxes(title="allocated GPU-hours", type="log")
    scatter.update_yaxes(title="busy / allocated", tickformat=".0%", rangemode="tozero")
    total = sum(j["waste_charge"] for j in jobs)
    return (
        f"<h2>Jobs that wasted most</h2>"
        f'<p class="note">The {len(top)} GPU jobs with the most allocated-but-idle GPU-hours '
        f"(allocated − busy), of {len(jobs)} GPU jobs; together the GPU jobs paid "
        f'<span class="bad" id="jobs-waste">{html.escape(_money(total, currency))}</span> for '
        "idle allocations.</p>"
        + _table(headers, table_rows, text_columns=4)
        + charts(scatter, height=420)
    )


def _health_section(data: ReportData, charts: _Charts) -> str:
    """Power and temperature over time per node; the GPUs with errors or throttling."""
    health = data.health
    parts = ["<h2>GPU health</h2>"]
    if health is None or not health.gpus:
        return parts[0] + "<p>No GPU samples in the selected range.</p>"
    nodes = sorted({n for n, _ in health.nodes})
    power = go.Figure()
    heat = go.Figure()
    for node in nodes:
        cells = sorted((w, v) for (n, w), v in health.nodes.items() if n == node)
        x = [_iso(w * data.window_s * NS) for w, _ in cells]
        watts = [v[0] / v[1] if v[1] else None for _, v in cells]
        hottest = [None if v[2] != v[2] else v[2] for _, v in cells]  # NaN: no reading
        power.add_trace(go.Scatter(x=x, y=watts, name=_label(node), mode="lines"))
        heat.add_trace(go.Scatter(x=x, y=hottest, name=_label(node), mode="lines"))
    power.update_layout(title="Mean GPU board power per node (W per GPU)")
    power.update_yaxes(rangemode="tozero", title="W", tickformat=",.0f")
    heat.update_layout(title="Hottest GPU per node (°C)")
    heat.update_yaxes(rangemode="tozero", title="°C", tickformat=",.0f")
    index = {label: d.get("index") for label, d in zip(data.gpu.labels, data.gpu.details,
                                                          strict=True)}  # fmt: skip
    flagged = []
    for gpu in sorted(
        health.gpus.values(), key=lambda g: (g.node, index.get((g.node, g.uuid)) or 0)
    ):
        throttled = _ratio(gpu.throttled, gpu.samples) or 0.0
        ecc_c = gpu.increase("ecc_corrected_errors")
        ecc_u = gpu.increase("ecc_uncorrected_errors")
        xid = gpu.increase("xid_errors")
        if ecc_u or xid or ecc_c or throttled >= THROTTLED_AT_LEAST:
            shown = index.get((gpu.node, gpu.uuid))
            flagged.append([
                f"{gpu.node} · GPU {'?' if shown is None else shown}", gpu.uuid,
                _num(gpu.temperature_max, 0),
                _num(_ratio(gpu.power_sum, gpu.power_samples), 0), _pct(throttled),
                str(ecc_c), str(ecc_u), str(xid),
            ])  # fmt: skip
    summary = (
        f'<p class="note"><span id="health-flagged">{len(flagged)}</span> of {len(health.gpus)} '
        f"GPUs need attention: ECC or XID errors in the range, or held back by power or "
        f"thermal limits at least {THROTTLED_AT_LEAST:.0%} of the time (NVML clock events).</p>"
    )
    parts.append(summary)
    if flagged:
        headers = ["GPU", "UUID", "max °C", "mean W", "throttled", "ECC corrected",
                   "ECC uncorrected", "XID errors"]  # fmt: skip
        parts.append(_table(headers, flagged, text_columns=2))
    parts.append(charts(power, height=360))
    parts.append(charts(heat, height=360))
    return "".join(parts)


def _coverage_section(data: ReportData, charts: _Charts) -> str:
    inputs = data.bill.input
    summary = _table(
        ["files read", "rows read", "duplicate rows skipped", "files quarantined"],
        [
            [
                f"{inputs.get('files', 0):,}",
                f"{inputs.get('rows', 0):,}",
                f"{inputs.get('rows_skipped', 0):,}",
                f"{inputs.get('files_quarantined', 0):,}",
            ]
        ],
        text_columns=0,
    )
    parts = ["<h2>Data coverage</h2>", summary]
    gaps: dict[str, dict[str, float]] = {}
    for kind, grid in (("gpu", data.gpu), ("cpu", data.cpu)):
        for d, gap, seen in zip(
            grid.details,
            grid.sums["gap_us"].sum(axis=1),
            grid.sums["seen_us"].sum(axis=1),
            strict=True,
        ):
            node = gaps.setdefault(d["node"], {"gpu_gap": 0.0, "cpu_gap": 0.0, "cpu_seen": 0.0})
            node[f"{kind}_gap"] += int(gap) / 3.6e9
            if kind == "cpu":
                node["cpu_seen"] += int(seen) / 3.6e9
    with_gaps = sorted(
        ((n, g) for n, g in gaps.items() if g["gpu_gap"] or g["cpu_gap"]),
        key=lambda item: (-item[1]["cpu_gap"] - item[1]["gpu_gap"], item[0]),
    )
    parts.append(
        f"<p>Nodes with gaps (intervals longer than max_gap, which count nowhere): "
        f'<span id="gap-nodes">{len(with_gaps)}</span> of {len(gaps)}.</p>'
    )
    if with_gaps:
        parts.append(
            _table(
                ["node", "node gap hours", "GPU gap GPU-hours", "node hours covered"],
                [
                    [n, _num(g["cpu_gap"]), _num(g["gpu_gap"]), _num(g["cpu_seen"])]
                    for n, g in with_gaps
                ],
            )
        )
    cpu = data.cpu
    if cpu.labels:
        sums, starts = coarsen(cpu.sums, cpu.window_starts_ns, HEATMAP_MAX_COLUMNS)
        span_us = (int(starts[1] - starts[0]) if starts.size > 1 else data.window_s * NS) / 1000
        covered = np.clip(sums["seen_us"] / span_us, 0, 1)
        scale = [[0, "#b3261e"], [0.5, "#f2c14e"], [1, "#2e7d32"]]
        title = "Share of each window covered by a node's samples"
        parts.append(_node_heatmap(charts, data, covered, starts, "covered", title, scale))
    if data.quarantined:
        parts.append(
            f'<p class="bad">{len(data.quarantined)} files in quarantine (unreadable or not '
            "sample files; the log says why each was moved):</p>"
            + _table(
                ["file", "bytes"],
                [[q.path, f"{q.size_bytes:,}"] for q in data.quarantined],
            )
        )
    else:
        parts.append("<p>No files in quarantine.</p>")
    return "".join(parts)


def _plan_section(data: ReportData, charts: _Charts, currency: str) -> str:
    """SPEC §10: own vs leased, tenant demand profiles, the placement what-if and the capacity
    plan; per kind a chart of hourly demand with C* and today's owned capacity, and the tenants
    on a mean-vs-CV scatter, stable ones marked."""
    plan = data.plan
    if plan is None:
        return ""
    own = [
        [r["kind"], r["ownership"], _num(r["capacity_unit_hours"], 1),
         _num(r["allocated_unit_hours"], 1), _pct(r["allocation_ratio"]),
         _money(r["revenue"], currency), _pct(r["revenue_share"]), _money(r["cost"], currency),
         _money(r["unit_cost"], currency), _pct(r["gross_margin_ratio"])]
        for r in plan.ownership.iter_rows(named=True)
    ]  # fmt: skip
    tenants = [
        [r["kind"], r["tenant"], _num(r["mean_units"]), _num(r["p10_units"]),
         _num(r["p90_units"]), _num(r["cv"]), "yes" if r["stable"] else "no"]
        for r in plan.tenants.iter_rows(named=True)
    ]  # fmt: skip
    placement = [
        [r["kind"], _pct(r["own_allocation_ratio_actual"]),
         _pct(r["own_allocation_ratio_planned"]), _num(r["leased_unit_hours_actual"], 1),
         _num(r["leased_unit_hours_planned"], 1), _money(r["cost_actual"], currency),
         _money(r["cost_planned"], currency)]
        for r in plan.placement.iter_rows(named=True)
    ]  # fmt: skip
    capacity = [
        [r["kind"], _num(r["owned_units_now"]), _num(r["owned_units_optimal"]),
         _money(r["cost_now"], currency), _money(r["cost_optimal"], currency),
         _money(r["saving"], currency)]
        for r in plan.capacity.iter_rows(named=True)
    ]  # fmt: skip
    notes = "".join(f'<p class="note bad">{html.escape(n)}</p>' for n in plan.notes)
    figures = []
    optimal = {r["kind"]: r for r in plan.capacity.iter_rows(named=True)}
    for kind in dict.fromkeys(plan.hourly["kind"].to_list()):
        figures.append(_demand_chart(plan, kind, optimal.get(kind), charts))
    for kind in dict.fromkeys(plan.tenants["kind"].to_list()):
        figures.append(_stability_chart(plan, kind, charts))
    return (
        '<h2 id="plan">Plan: where tenants should run, and how much to own</h2>'
        '<p class="note">From hourly bills of the same samples: a tenant\'s demand in an hour '
        "is its allocated units (a missing hour is 0). Tenants whose hourly demand varies by at "
        f"most {plan.stable_cv:g} of its mean (CV) are stable; owned capacity is filled with "
        "them first. C* is the owned capacity that minimises c_o·C·T + c_l·Σ max(D_t − C, 0) "
        "for the hours seen, assuming leased capacity is there on demand at its cost, with no "
        "minimum term.</p>"
        + notes
        + "<h3>Own vs leased</h3>"
        + _table(
            [
                "kind",
                "ownership",
                "capacity h",
                "allocated h",
                "allocation",
                "revenue",
                "revenue share",
                "cost",
                "unit cost",
                "margin",
            ],
            own,
            2,
        )
        + "<h3>Tenant demand (units per hour)</h3>"
        + _table(["kind", "tenant", "mean", "p10", "p90", "CV", "stable"], tenants, 2)
        + "<h3>Placement: stable tenants first into owned capacity</h3>"
        + _table(
            [
                "kind",
                "own allocation now",
                "planned",
                "leased h now",
                "leased h planned",
                "cost now",
                "cost planned",
            ],
            placement,
        )
        + "<h3>Capacity plan</h3>"
        + _table(
            ["kind", "owned units now", "optimal (C*)", "cost now", "cost at C*", "saving"],
            capacity,
        )
        + "".join(figures)
    )


def _demand_chart(plan: Any, kind: str, capacity: dict[str, Any] | None, charts: _Charts) -> str:
    """Hourly total demand of ``kind`` with C* and today's owned capacity as lines."""
    import polars as pl

    hours = plan.hourly.filter(pl.col("kind") == kind)
    # UTC, as the report's other time axes (plotly.js reads no UTC offsets)
    x = [datetime.fromisoformat(w).astimezone(UTC).replace(tzinfo=None)
         for w in hours["window_start"].to_list()]  # fmt: skip
    x.append(x[-1] + timedelta(hours=1))  # each hour drawn as a step of its own width
    unit = "GPUs" if kind == "gpu" else "cores"

    def steps(column: str) -> list[float]:
        values: list[float] = hours[column].to_list()
        return [*values, values[-1]]

    figure = go.Figure()
    figure.add_trace(
        go.Scatter(x=x, y=steps("demand_units"), name="demand (allocated)",
                   mode="lines", line={"shape": "hv", "color": _PALETTE[0]})
    )  # fmt: skip
    figure.add_trace(
        go.Scatter(x=x, y=steps("owned_units"), name="owned capacity today",
                   mode="lines", line={"shape": "hv", "color": _PALETTE[1], "dash": "dot"})
    )  # fmt: skip
    if capacity is not None and capacity["owned_units_optimal"] is not None:
        c_star = capacity["owned_units_optimal"]
        figure.add_trace(
            go.Scatter(x=[x[0], x[-1]], y=[c_star, c_star], name=f"C* = {c_star:,.2f}",
                       mode="lines", line={"color": _PALETTE[3], "dash": "dash"})
        )  # fmt: skip
    figure.update_yaxes(rangemode="tozero", title=unit)
    figure.update_layout(title=f"Hourly {kind} demand, owned capacity and C* ({unit})")
    return charts(figure)


def _stability_chart(plan: Any, kind: str, charts: _Charts) -> str:
    """Tenants of ``kind``: mean hourly units against CV; stable ones marked."""
    import polars as pl

    tenants = plan.tenants.filter(pl.col("kind") == kind)
    figure = go.Figure()
    for stable, name, color, symbol in (
        (True, "stable", _PALETTE[1], "circle"),
        (False, "variable", _PALETTE[3], "x"),
    ):
        part = tenants.filter(pl.col("stable") == stable)
        if not part.height:
            continue
        figure.add_trace(
            go.Scatter(
                x=part["mean_units"].to_list(),
                y=part["cv"].to_list(),
                text=[_label(t) for t in part["tenant"].to_list()],
                mode="markers+text",
                textposition="middle right",
                cliponaxis=False,
                name=name,
                marker={"color": color, "symbol": symbol, "size": 11},
                hovertemplate="%{text}<br>mean %{x:,.2f}<br>CV %{y:.2f}<extra></extra>",
            )
        )
    figure.add_hline(y=plan.stable_cv, line={"dash": "dot", "color": "#5a6478"})
    widest = max(float(tenants["mean_units"].max() or 0.0), 1e-9)
    # room on the right for the names of the largest tenants
    figure.update_xaxes(range=[-0.03 * widest, 1.25 * widest], title="mean units per hour")
    figure.update_yaxes(rangemode="tozero", title="CV (std / mean)")
    figure.update_layout(title=f"{kind} tenants: size against variability")
    return charts(figure)
