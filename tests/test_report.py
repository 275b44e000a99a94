"""``tally report``: content checked against independent computations, rendered in Chromium.

The dataset is the sample (Alibaba trace shapes, one node with a 20-minute outage) plus a
damaged file (quarantined) and a job whose names are hostile HTML. Expected numbers come from
``tally bill`` over one whole-day window and from a plain-loop reading of the raw Parquet, not
from the report code.
"""

from __future__ import annotations

import html
import itertools
import json
import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from telemetry.demo import generate_demo
from telemetry.schema import validate
from telemetry.store.layout import partition_dir
from tests.support.cli import stderr_on_a_terminal, tally
from tests.support.units import NS

HOSTILE = "<img src=x onerror=\"document.documentElement.setAttribute('data-pwned','1')\">"
HOSTILE_TENANT = "</script><script>document.documentElement.dataset.pwned=2</script>"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report") / "data"
    generate_demo(root, nodes=4, hours=3)
    start = 1_788_220_800 * NS
    times = start + np.arange(0, 3600, 30, dtype=np.int64) * NS
    k = times.size
    job = pa.table(
        {
            "time": pa.array(times).cast(pa.timestamp("ns", tz="UTC")),
            "node": ["gpu-a01"] * k,
            "job_id": [HOSTILE] * k,
            "user": [HOSTILE] * k,
            "account": [HOSTILE_TENANT] * k,
            "cpus_allocated": np.full(k, 2, np.float32),
            "gpus_allocated": np.full(k, 0.5, np.float32),
            "cpu_seconds": np.arange(k, dtype=np.float64) * 10,
            "memory_bytes": np.full(k, 1 << 30, np.int64),
        }
    )
    directory = partition_dir(root, "job", int(times[0]), "gpu-a01")
    pq.write_table(validate(job, "job"), directory / "hostile.parquet")
    (partition_dir(root, "gpu", int(times[0]), "gpu-a02") / "torn.parquet").write_bytes(
        b"PAR1" + os.urandom(300)
    )
    return root, root / "inventory.toml"


@pytest.fixture(scope="module")
def report(dataset: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    root, inventory = dataset
    out = tmp_path_factory.mktemp("out") / "report.html"
    result = tally("report", str(root), "--inventory", str(inventory), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "quarantined" in result.stderr  # the torn file, said once
    return out.read_text(encoding="utf-8")


def _bill(dataset: tuple[Path, Path]) -> dict[str, list[dict[str, object]]]:
    root, inventory = dataset
    result = tally("bill", str(root), "--inventory", str(inventory), "--window", "1d")
    assert result.returncode == 0, result.stderr
    bill: dict[str, list[dict[str, object]]] = json.loads(result.stdout)
    return bill


def _money(value: object) -> str:
    assert isinstance(value, float)
    return f"{value:,.2f} USD"


def test_pool_totals_match_a_one_window_bill(dataset: tuple[Path, Path], report: str) -> None:
    bill = _bill(dataset)
    assert {p["pool"] for p in bill["pools"]} == {"h100-own", "h100-leased", "cpu"}
    for pool in bill["pools"]:
        row = re.search(rf"<tr><td class=\"text\">{pool['pool']}</td>(.*?)</tr>", report)
        assert row is not None, pool["pool"]
        cells = re.findall(r"<td>(.*?)</td>", row.group(1))
        assert _money(pool["cost"]) in cells and _money(pool["revenue"]) in cells
        ratio = pool["allocation_ratio"]
        assert isinstance(ratio, float) and f"{100 * ratio:.1f}%" in cells


def _reference_gpu_cells(root: Path, window_s: int, max_gap_s: float) -> tuple[int, set[str]]:
    """Plain loops over the raw rows: allocated-but-idle (GPU, window) cells and nodes with gaps."""
    rows = []
    for path in sorted((root / "gpu").rglob("*.parquet")):
        if path.name == "torn.parquet":
            continue
        rows.extend(pq.read_table(path).to_pylist())
    rows.sort(key=lambda r: (r["node"], r["gpu_uuid"], r["time"]))
    cap: dict[tuple[str, int], float] = defaultdict(float)
    busy: dict[tuple[str, int], float] = defaultdict(float)
    held: dict[tuple[str, int], float] = defaultdict(float)
    gap_nodes = set()
    for prev, row in itertools.pairwise(rows):
        if (prev["node"], prev["gpu_uuid"]) != (row["node"], row["gpu_uuid"]):
            continue
        dt = (row["time"] - prev["time"]).total_seconds()
        if dt > max_gap_s:
            gap_nodes.add(row["node"])
            continue
        key = (row["gpu_uuid"], int(row["time"].timestamp()) // window_s)
        cap[key] += dt
        busy[key] += dt * (row["utilization_ratio"] or 0.0)
        if row["job_id"] is not None:
            held[key] += dt
    idle = sum(1 for k in cap if held[k] >= 0.5 * cap[k] and busy[k] < 0.10 * cap[k])
    return idle, gap_nodes


def _reference_unallocated_cells(root: Path, window_s: int, max_gap_s: float) -> int:
    """(GPU, window) cells with capacity that no job held at least half of, by plain loops."""
    rows = []
    for path in sorted((root / "gpu").rglob("*.parquet")):
        if path.name != "torn.parquet":
            rows.extend(
                pq.read_table(path, columns=["node", "gpu_uuid", "time", "job_id"]).to_pylist()
            )
    rows.sort(key=lambda r: (r["node"], r["gpu_uuid"], r["time"]))
    cap: dict[tuple[str, int], float] = defaultdict(float)
    held: dict[tuple[str, int], float] = defaultdict(float)
    for prev, row in itertools.pairwise(rows):
        dt = (row["time"] - prev["time"]).total_seconds()
        if (prev["node"], prev["gpu_uuid"]) != (row["node"], row["gpu_uuid"]) or dt > max_gap_s:
            continue
        key = (row["gpu_uuid"], int(row["time"].timestamp()) // window_s)
        cap[key] += dt
        held[key] += dt if row["job_id"] is not None else 0.0
    return sum(1 for k in cap if cap[k] > 0 and held[k] < 0.5 * cap[k])


def test_heatmap_marks_the_allocated_idle_cells_a_plain_loop_finds(
    dataset: tuple[Path, Path], report: str
) -> None:
    root, _ = dataset
    # 3 hours → --window auto picks 1m (180 windows ≤ 240): every cell is one window.
    assert "window 1m" in report
    idle, gap_nodes = _reference_gpu_cells(root, 60, 90)
    found = re.search(r'<span class="bad" id="idle-cells">(\d+)</span>', report)
    assert found is not None and idle > 0
    assert int(found.group(1)) == idle
    assert gap_nodes == {"gpu-b04"}
    assert '<span id="gap-nodes">1</span> of 4' in report
    assert "gpu-b04" in report.split("Nodes with gaps")[1]


def test_tenants_ranked_by_charge_and_the_most_wasteful_job(
    dataset: tuple[Path, Path], report: str
) -> None:
    bill = _bill(dataset)
    charge: dict[str, float] = defaultdict(float)
    for t in bill["tenants"]:
        charge[str(t["tenant"])] += float(t["charge"])  # type: ignore[arg-type]
    expected = [t for t, _ in sorted(charge.items(), key=lambda item: (-item[1], item[0]))]
    section = report.split("<h2>Tenants</h2>")[1].split("</table>", maxsplit=1)[0]
    cells = re.findall(r'<td class="text"(?: title="([^"]*)")?>(.*?)</td>', section)
    shown = [html.unescape(title or text) for title, text in cells][1::2]
    assert shown == expected
    kinds = {p["pool"]: p["kind"] for p in bill["pools"]}
    wasted: dict[str, float] = defaultdict(float)
    for j in bill["jobs"]:
        if kinds[j["pool"]] == "gpu":
            a, b = float(j["allocated_unit_hours"]), float(j["busy_unit_hours"])  # type: ignore[arg-type]
            wasted[str(j["job_id"])] += a - b
    worst = max(wasted.items(), key=lambda item: item[1])[0]
    jobs = report.split("<h2>Jobs that wasted most</h2>")[1]
    first = re.search(r'<tbody><tr><td class="text"[^>]*>(.*?)</td>', jobs)
    assert first is not None and html.unescape(first.group(1)) == worst


def test_heatmap_tells_unallocated_gpus_from_allocated_ones(
    dataset: tuple[Path, Path], report: str
) -> None:
    root, _ = dataset
    found = re.search(r'<span id="unallocated-cells">(\d+)</span>', report)
    expected = _reference_unallocated_cells(root, 60, 90)
    assert found is not None and expected > 0 and int(found.group(1)) == expected
    assert '"name":"unallocated"' in report and '"name":"allocated but idle"' in report


def test_headline_leads_with_the_answer(dataset: tuple[Path, Path], report: str) -> None:
    """The strip comes first and its figures are the bill's, summed here independently: a bill
    of one window over the dataset's day, so money is rounded once as in the report's totals."""
    root, inventory = dataset
    result = tally("bill", str(root), "--inventory", str(inventory), "--window", "1d")
    bill = json.loads(result.stdout)
    headline = report.split('<div class="headline" id="headline">')[1].split("<h2>", maxsplit=1)[0]
    assert report.index('id="headline"') < report.index("<h2>Pools</h2>")

    def card(key: str) -> str:
        found = re.search(rf'id="headline-{key}">.*?<div class="value">(.*?)</div>', headline)
        assert found is not None, key
        return html.unescape(found.group(1))

    gpu = [p for p in bill["pools"] if p["kind"] == "gpu"]
    capacity = sum(p["capacity_unit_hours"] for p in gpu)
    allocated = sum(p["allocated_unit_hours"] for p in gpu)
    busy = sum(p["busy_unit_hours"] for p in gpu)
    monitored = sum(p["monitored_unit_hours"] for p in gpu)
    assert monitored < capacity, "the dataset has an outage: busy of monitored ≠ of capacity"
    assert card("gpu-hours") == f"{capacity:,.1f} GPU-h"
    assert card("allocation") == f"{100 * allocated / capacity:.1f}%"
    assert card("busy") == f"{100 * busy / monitored:.1f}%"  # SPEC §4 busy_ratio
    idle_cost = sum(p["idle_cost"] or 0.0 for p in bill["pools"])
    assert card("idle-cost") == _money(idle_cost)
    wasted = 0.0
    for t in bill["tenants"]:
        efficiency = t["efficiency_ratio"]
        if efficiency is not None:  # charge × (1 − efficiency), both rounded to the cent
            assert t["waste_charge"] == pytest.approx(
                t["charge"] * (1 - min(1.0, efficiency)), abs=0.0101
            )
        wasted += t["waste_charge"]
    assert wasted > 0 and card("waste") == _money(wasted)
    revenue = sum(p["revenue"] for p in bill["pools"])
    cost = sum(p["cost"] for p in bill["pools"])
    assert card("margin") == f"{100 * (revenue - cost) / revenue:.1f}%"


def test_pools_busy_is_of_what_was_monitored(dataset: tuple[Path, Path], report: str) -> None:
    """A pool's busy column is SPEC §4's busy_ratio over the range: busy / monitored, so a
    pool with a node down does not look idle."""
    root, inventory = dataset
    result = tally("bill", str(root), "--inventory", str(inventory), "--window", "1d")
    bill = json.loads(result.stdout)
    pools = report.split("<h2>Pools</h2>")[1].split("</table>", maxsplit=1)[0]
    cells = {
        found[0]: found[1:]
        for found in re.findall(
            r'<tr><td class="text">([^<]*)</td>(?:<td[^>]*>[^<]*</td>){4}'
            r"<td[^>]*>([^<]*)</td>",
            pools,
        )
    }
    for name in {p["pool"] for p in bill["pools"]}:
        rows = [p for p in bill["pools"] if p["pool"] == name]
        busy = sum(p["busy_unit_hours"] for p in rows)
        monitored = sum(p["monitored_unit_hours"] for p in rows)
        if monitored:
            assert cells[name] == (f"{100 * busy / monitored:.1f}%",), name


def test_pools_gpu_first_and_no_amount_without_a_number(report: str) -> None:
    pools = report.split("<h2>Pools</h2>")[1].split("</table>", maxsplit=1)[0]
    order = re.findall(r'<tr><td class="text">([^<]*)</td><td class="text">(gpu|cpu)</td>', pools)
    kinds = [kind for _, kind in order]
    assert kinds == sorted(kinds, key=lambda k: k != "gpu") and "cpu" in kinds
    text = re.sub(r"<script.*?</script>", "", report, flags=re.S)  # what a reader sees
    assert "— USD" not in text and "None" not in text


def _reference_health(root: Path) -> set[tuple[str, int]]:
    """(node, GPU index) of GPUs with ECC or XID increases or throttled ≥ 5 %, by plain loops."""
    readings: dict[tuple[str, int], list[dict[str, object]]] = defaultdict(list)
    for path in sorted((root / "gpu").rglob("*.parquet")):
        if path.name != "torn.parquet":
            for row in pq.read_table(path).to_pylist():
                readings[(row["node"], row["gpu_index"])].append(row)
    flagged = set()
    for key, rows in readings.items():
        grew = False
        for column in ("ecc_corrected_errors", "ecc_uncorrected_errors", "xid_errors"):
            values = [r[column] for r in rows if r[column] is not None]
            grew |= bool(values) and max(values) > min(values)  # type: ignore[type-var]
        throttled = sum(1 for r in rows if (r["clock_event_reasons"] or 0) & 0xEC)
        if grew or throttled >= 0.05 * len(rows):
            flagged.add(key)
    return flagged


def test_gpu_health_flags_the_gpus_a_plain_loop_finds(
    dataset: tuple[Path, Path], report: str
) -> None:
    root, _ = dataset
    expected = _reference_health(root)
    assert expected == {("gpu-a01", 3), ("gpu-a02", 2), ("gpu-b04", 5)}  # what the demo planted
    section = report.split("<h2>GPU health</h2>")[1].split("<h2>", maxsplit=1)[0]
    assert f'<span id="health-flagged">{len(expected)}</span> of 32' in section
    shown = set(re.findall(r'<td class="text">([\w-]+) · GPU (\d+)</td>', section))
    assert {(n, int(i)) for n, i in shown} == expected
    assert "Mean GPU board power per node" in report and "Hottest GPU per node" in report


def test_quarantine_listed_and_hostile_names_escaped(report: str) -> None:
    assert "torn.parquet" in report.split("<h2>Data coverage</h2>")[1]
    assert HOSTILE not in report and HOSTILE_TENANT not in report
    assert html.escape(HOSTILE_TENANT) in report  # shown, as text


def test_self_contained(report: str) -> None:
    # No script, style sheet, image or frame is fetched from anywhere.
    assert not re.search(
        r"<(script|link|img|iframe)[^>]+(src|href)\s*=\s*[\"']?(https?:)?//", report
    )
    assert report.count("<script") >= 3


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium not found: CI must install Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return path


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}",
            # Any request off the machine would fail: the page must not need one.
            "--proxy-server=http://127.0.0.1:9", "--virtual-time-budget=20000", *args,
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_renders_in_headless_chromium(
    report: str, chromium: str, tmp_path: Path, artifacts: Path
) -> None:
    page = tmp_path / "report.html"
    page.write_text(report, encoding="utf-8")
    dom = _chromium(chromium, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    root_tag = re.search(r"<html[^>]*>", dom.stdout)
    assert root_tag is not None
    assert "data-errors" not in root_tag.group(0), "a script failed while the page rendered"
    assert "data-pwned" not in root_tag.group(0), "a hostile name ran as markup"
    charts = re.search(r'data-charts="(\d+)"', dom.stdout)
    assert charts is not None and int(charts.group(1)) >= 7
    for n in range(1, int(charts.group(1)) + 1):
        div = re.search(rf'<div id="chart-{n}" class="([^"]*)"', dom.stdout)
        assert div is not None and "js-plotly-plot" in div.group(1), f"chart {n} not drawn"
    assert dom.stdout.count('class="main-svg"') >= 2 * int(charts.group(1))
    shot = artifacts / "report.png"
    shot.unlink(missing_ok=True)
    taken = _chromium(
        chromium, tmp_path / "profile2", "--window-size=1400,5200", f"--screenshot={shot}",
        page.as_uri(),
    )  # fmt: skip
    assert taken.returncode == 0 and shot.stat().st_size > 50_000


def test_errors_are_one_line(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, inventory = dataset
    cases = [
        (["--out", str(tmp_path / "missing" / "r.html")], "does not exist"),
        (["--out", str(tmp_path)], "is a directory"),
        (["--out", str(tmp_path / "r.html"), "--window", "20s"], "at least 60"),
        (["--out", str(tmp_path / "r.html"), "--from", "soon"], "not an ISO-8601"),
    ]
    for extra, message in cases:
        result = tally("report", str(root), "--inventory", str(inventory), *extra)
        assert result.returncode == 2, extra
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    missing = tally("report", str(tmp_path / "nothing"), "--inventory", str(inventory),
                     "--out", str(tmp_path / "r.html"))  # fmt: skip
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "r.html").exists()


def test_window_and_range_select_what_is_shown(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, inventory = dataset
    out = tmp_path / "r.html"
    result = tally("report", str(root), "--inventory", str(inventory), "--out", str(out),
                    "--window", "15m", "--from", "2026-09-01T01:00:00Z",
                    "--to", "2026-09-01T02:00:00Z")  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "window 15m" in text
    assert "2026-09-01 01:00:00Z to 2026-09-01 01:59:59Z" in text
    # four 15-minute windows, each a point of every pool's ratio line
    assert text.count('"2026-09-01T01:45:00Z"') >= 1 and '"2026-09-01T02:00:00Z"' not in text


def test_progress_bars_on_a_terminal_only(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, inventory = dataset
    out = str(tmp_path / "r.html")
    seen = stderr_on_a_terminal("report", str(root), "--inventory", str(inventory), "--out", out)
    assert re.search(rb"report: chunk 1/1 \[#+\] [\d,]+ rows", seen)
    seen = stderr_on_a_terminal("replay", str(root), "--once")
    assert re.search(rb"replay: chunk (\d+)/\1 \[#+\]", seen)  # it streams chunks now
    piped = tally("report", str(root), "--inventory", str(inventory), "--out", out)
    assert piped.returncode == 0 and "report:" not in piped.stderr
    quiet = stderr_on_a_terminal(
        "--quiet", "report", str(root), "--inventory", str(inventory), "--out", out
    )
    assert b"report:" not in quiet and b"wrote" not in quiet


def test_names_reach_the_charts_escaped(report: str) -> None:
    """plotly draws legend, tick and hover text as HTML (it follows <a href>): a tenant's or a
    job's name must reach a chart as text, not as markup."""
    charts = "".join(re.findall(r"Plotly\.newPlot\((.*?)\)\s*\};?", report, flags=re.S))
    assert charts, "the report's charts"
    decoded = charts.encode().decode("unicode_escape", errors="ignore")
    assert "<img" not in decoded and "</script>" not in decoded
    assert "&lt;img" in decoded  # the hostile job's name is shown, as text
