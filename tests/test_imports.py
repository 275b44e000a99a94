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
