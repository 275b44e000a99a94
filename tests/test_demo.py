"""``tally demo``: a realistic dataset whose bill shows what the trace shapes imply."""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime
from pathlib import Path

from telemetry.demo import SHAPES
from tests.support.cli import tally


def test_demo_bills_with_fractional_gpus_and_every_pool(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    made = tally("demo", str(out), "--nodes", "2", "--hours", "2")
    assert made.returncode == 0, made.stderr
    bill = json.loads(
        tally("bill", str(out), "--inventory", str(out / "inventory.toml"), "--window", "1d").stdout
    )
    pools = {p["pool"]: p for p in bill["pools"]}
    assert set(pools) == {"h100-own", "h100-leased", "cpu"}
    for name in ("h100-own", "h100-leased"):
        p = pools[name]
        assert p["capacity_unit_hours"] > 13 and 0 < p["allocation_ratio"] <= 1.0 + 1e-9
        assert 0 < p["busy_ratio"] < p["allocation_ratio"]
    with open(SHAPES) as f:
        fractions = {int(r["gpu_milli"]) for r in csv.DictReader(f) if r["num_gpu"] == "1"}
    assert fractions - {1000}, "the trace shapes include shared GPUs"
    assert {t["tenant"] for t in bill["tenants"]} >= {"inference-co", "research-lab"}
    # The last node's 20-minute outage: 8 GPUs × ~20 min of gap in its pool, none elsewhere.
    assert 8 * 1200 / 3600 <= pools["h100-leased"]["gap_hours"] <= 8 * 1260 / 3600
    assert pools["h100-own"]["gap_hours"] == 0
    replay = tally("replay", str(out), "--once", "--inventory", str(out / "inventory.toml"))
    assert replay.returncode == 0 and "tally_tenant_charge_total" in replay.stdout
    assert tally("demo", str(out)).returncode == 2  # never overwrites


def test_the_earlier_verb_sample_still_writes_the_demo(tmp_path: Path) -> None:
    made = tally("--log-level", "warning", "sample", str(tmp_path / "sample"), "--hours", "1")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "sample" / "inventory.toml").is_file()
    assert "sample" not in tally("--help").stdout.split("positional arguments")[-1]


def test_demo_cpu_side_looks_like_a_cluster(tmp_path: Path) -> None:
    """Tenants differ in CPU efficiency, load follows the day, one node has a noisy neighbour."""
    out = tmp_path / "demo"
    assert tally("demo", str(out), "--nodes", "3", "--hours", "6").returncode == 0
    inventory = str(out / "inventory.toml")
    daily = json.loads(tally("bill", str(out), "--inventory", inventory, "--window", "1d").stdout)
    cpu = [t["efficiency_ratio"] for t in daily["tenants"] if t["pool"] == "cpu"]
    assert len(cpu) >= 3 and max(cpu) - min(cpu) > 0.2, cpu
    hourly = json.loads(tally("bill", str(out), "--inventory", inventory).stdout)
    jobs = [j for j in hourly["jobs"] if j["pool"] == "cpu"]
    # 00:00–06:00 UTC is 08:00–14:00 in Shanghai: a job running through it works harder later
    spans: dict[str, list[tuple[str, float]]] = {}
    for j in jobs:
        spans.setdefault(j["job_id"], []).append((j["window_start"], j["efficiency_ratio"]))
    slopes = []  # per hour: log of a job's efficiency in its last window over its first
    for seen in spans.values():
        (t0, e0), (t1, e1) = min(seen), max(seen)
        hours = (datetime.fromisoformat(t1) - datetime.fromisoformat(t0)).total_seconds() / 3600
        if hours and e0 and e1:
            slopes.append(math.log(e1 / e0) / hours)
    slopes.sort()
    assert len(slopes) > 10 and slopes[len(slopes) // 2] > 0.025, slopes
    # node 0 burns cores outside every job: the pool's busy time exceeds its jobs' used time
    used = sum(j["busy_unit_hours"] for j in jobs)
    assert sum(p["busy_unit_hours"] for p in hourly["pools"] if p["pool"] == "cpu") > used + 20


def test_the_readme_invoice_is_what_the_demo_bills(tmp_path: Path) -> None:
    """The worked monthly invoice in the README is this run's output, line for line; and the
    demo's shared GPUs, accounting and Kubernetes pods are what it says they are."""
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## A monthly invoice")[1].split("## ")[0]
    shown = [line for line in section.split("```")[1].splitlines() if line and line != "..."]
    out = tmp_path / "demo"
    assert tally("demo", str(out)).returncode == 0
    command = re.search(r"tally bill demo ([^\n]*--accounting.*?)# the invoice below", readme, re.S)
    assert command is not None
    args = command.group(1).replace("\\\n", " ").replace("demo/", f"{out}/").split()
    result = tally("bill", str(out), *args)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    for line in shown:
        assert line in printed, line
    holders = list((out / "gpu_job").rglob("*.parquet"))
    assert holders, "fractional GPUs write gpu_job rows"
    assert args[-2:] == ["--format", "table"]
    jobs = json.loads(tally("bill", str(out), *args[:-2]).stdout)["jobs"]
    sources = {j["allocation_source"] for j in jobs}
    assert sources == {"accounting", "samples"}
    pods = {j["job_id"] for j in jobs if j["allocation_source"] == "samples"}
    assert pods and all(re.fullmatch(r"[a-z-]+/[a-z]+-[0-9a-f]+", p) for p in pods)
    gpu_tenants = [t for t in jobs if t["pool"].startswith("h100")]
    assert all(t["efficiency_ratio"] is None or t["efficiency_ratio"] <= 1.0 + 1e-6
               for t in gpu_tenants)  # fmt: skip
