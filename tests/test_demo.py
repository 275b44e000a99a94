"""``tally demo``: a realistic dataset whose bill shows what the trace shapes imply."""

from __future__ import annotations

import csv
import json
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
