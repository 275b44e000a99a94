"""``tally sample``: a realistic dataset whose bill shows what the trace shapes imply."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from telemetry.demo import SHAPES


def _tally(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telemetry.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_sample_bills_with_fractional_gpus_and_every_pool(tmp_path: Path) -> None:
    out = tmp_path / "sample"
    made = _tally("sample", str(out), "--nodes", "2", "--hours", "2")
    assert made.returncode == 0, made.stderr
    bill = json.loads(
        _tally(
            "bill", str(out), "--inventory", str(out / "inventory.toml"), "--window", "1d"
        ).stdout
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
    replay = _tally("replay", str(out), "--once", "--inventory", str(out / "inventory.toml"))
    assert replay.returncode == 0 and "tally_tenant_charge_total" in replay.stdout
    assert _tally("sample", str(out)).returncode == 2  # never overwrites
