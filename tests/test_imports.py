from __future__ import annotations

import subprocess
import sys


def test_importing_the_packages_touches_neither_cupy_nor_nvml() -> None:
    code = (
        "import sys, telemetry, kernels, exporters, telemetry.cli, telemetry.daemon, "
        "telemetry.replay, exporters.prometheus, exporters.http, kernels.backend\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "bad = sorted(roots & {'cupy', 'pynvml', 'cupy_backends'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_billing_on_workers_imports_dask_only_when_a_cluster_is_asked_for() -> None:
    """The bill's process pool needs no Dask; ``--cluster`` is the optional extra (SPEC §9)."""
    code = (
        "import sys, telemetry.cli, telemetry.commands, telemetry.executors, "
        "telemetry.billing.bill, telemetry.billing.partitioned, telemetry.billing.report\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "print(','.join(sorted(roots & {'dask', 'distributed', 'tornado'})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
