"""What operators install: the example config covers every flag, the unit runs it, the metric
reference is the code's."""

from __future__ import annotations

from pathlib import Path

from exporters.reference import render
from telemetry.cli import build_parser, daemon_config
from telemetry.collectors import REGISTRY
from telemetry.config import config_keys, load_config_file

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_sets_every_flag_and_loads() -> None:
    example = ROOT / "deploy" / "tally.toml"
    values = load_config_file(example, set(config_keys(REGISTRY)))
    assert set(values) == set(config_keys(REGISTRY)), (
        "every daemon flag is settable and shown in the example"
    )
    assert {f"collector.{name}" for name in REGISTRY} <= set(values)
    config = daemon_config(build_parser().parse_args(["daemon", "--config", str(example)]))
    assert config.listen == "0.0.0.0:8469" and config.interval_seconds == 5.0
    # every collector on, but the pod collector, which only Kubernetes nodes run
    assert str(config.data_dir) == "/var/lib/tally" and config.collectors == {
        name: name != "pod" for name in REGISTRY
    }


def test_systemd_unit_runs_the_daemon_with_that_config() -> None:
    unit = (ROOT / "deploy" / "systemd" / "tally.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "tally" in exec_start and " daemon --config /etc/tally/tally.toml" in exec_start
    assert "KillSignal=SIGTERM" in unit and "ReadWritePaths=/var/lib/tally" in unit


def test_metric_reference_is_generated_from_the_code() -> None:
    assert (ROOT / "docs" / "metrics.md").read_text() == render(), (
        "run: python -m exporters.reference > docs/metrics.md"
    )


def test_the_readme_tour_leaves_nothing_untracked() -> None:
    """Every path the tour's commands write (the daemon's data, the demo, the bill files, the
    report) is ignored by git, so a clone stays clean after the tour."""
    import re
    import shutil
    import subprocess

    import pytest

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("## Five-minute tour")[1].split("```")[1]
    written = ["data/part.parquet"]  # make run: the daemon's default --data-dir
    written += [f"{d}/inventory.toml" for d in re.findall(r"tally demo (\S+)", tour)]
    for out in re.findall(r"--out (\S+)", tour):
        fmt = re.search(rf"--format (\w+) --out {re.escape(out)}", tour)
        written += [f"{out}-pools.csv"] if fmt and fmt.group(1) == "csv" else [out]
    assert len(written) >= 4, written
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True
    )
    assert sorted(ignored.stdout.split()) == sorted(written), ignored.stdout
