"""The benchmarks' stand-in driver (benchmarks/nvml_stub.c) shows the GPU collector, through the
real pynvml, the same 8 loaded H100s as the tests' Python stand-in: the daemon benchmarks measure
tally on the devices the tests describe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import node_tree
from telemetry.collectors.base import CollectorContext
from telemetry.collectors.gpu import GpuCollector
from tests.support.gpu_side import asked
from tests.support.nvml.library import FakeNVML
from tests.support.nvml.profiles import H100_LOADED

REPO = Path(__file__).resolve().parent.parent

# The second round's rows of a GPU collector on whatever libnvidia-ml.so.1 is loaded: run apart,
# so that no other test's process holds the stand-in library.
_COLLECT = """
import json, sys, time
from pathlib import Path
from benchmarks import node_tree
node_tree.load_driver_stub(Path(sys.argv[1]))
from telemetry.collectors.base import CollectorContext
from telemetry.collectors.gpu import GpuCollector
collector = GpuCollector(CollectorContext(Path("/proc"), Path("/sys"), "n"))
first = collector.collect()["gpu"][0]["energy_joules"]
time.sleep(0.5)
from tests.support.gpu_side import asked
out = asked(collector.collect())
out["first_energy"] = first
print(json.dumps(out, default=str))
"""


def _second_round(collector: GpuCollector) -> dict[str, Any]:
    collector.collect()
    time.sleep(0.5)
    return asked(collector.collect())


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for the stand-in driver")
    built = node_tree.build_driver_stub(tmp_path_factory.mktemp("driver"))
    assert built is not None, "the stand-in driver did not build (its errors are above)"
    return built


def test_stub_driver_answers_as_the_python_stand_in(driver: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", _COLLECT, str(driver)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    stub = json.loads(done.stdout)
    fake = FakeNVML([H100_LOADED] * 8, clock=node_tree.MonotonicClock())
    python = _second_round(
        GpuCollector(CollectorContext(Path("/proc"), Path("/sys"), "n", nvml_module=fake))
    )
    assert len(stub["gpu"]) == len(python["gpu"]) == 8
    # the loaded GPU's 629.45 W go into its energy counter between the rounds, half a second apart
    grown = stub["gpu"][0]["energy_joules"] - stub["first_energy"]
    assert 629.45 * 0.45 < grown < 629.45 * 5
    assert stub["gpu"][0]["sm_active_ratio"] == 1.0
    for mine, theirs in zip(stub["gpu"], python["gpu"], strict=True):
        for column in ("energy_joules", "sm_active_ratio"):  # both follow their own clocks
            assert mine.pop(column) is not None
            theirs.pop(column)
        assert mine == theirs
    for mine, theirs in zip(stub["_gpu_pids"], python["_gpu_pids"], strict=True):
        assert {int(pid): used for pid, used in mine["memory"].items()} == theirs["memory"]
        assert mine["pids"] == theirs["pids"] == [11327, 11328, 11345]
        assert {int(pid): sm for pid, sm in mine["sm"].items()} == theirs["sm"] == {11345: 1.0}
