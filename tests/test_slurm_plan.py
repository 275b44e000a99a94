"""The job collector's plan of settled jobs against reading every job its own way, round after
round of random changes (tests/support/job_rounds.py): every round's rows, GPU claims, aliases
and failing jobs the same, on cgroup v2, v1 and a node with job-info files, SLUIDs and two
slurmd scopes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from telemetry.collectors import CollectorContext
from telemetry.collectors.slurm import SlurmJobCollector
from tests.support.job_rounds import FIXTURES, random_rounds

# Jobs whose search of their processes never ends are never planned: the trees without them
# plan every job, and so whole rounds.
NEVER_SETTLED = {
    "slurm_v2": ["slurmstepd.scope/job_1003", "slurmstepd.scope/job_1005"],
    "slurm_trust": ["node1_slurmstepd.scope/job_1009248", "node1_slurmstepd.scope/job_1009249"],
}


def node(tmp_path: Path, name: str, settled: bool) -> tuple[Path, CollectorContext]:
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    info = root / "run" / "tally" / "jobs"
    if info.is_dir():  # the modes a prolog gives (git keeps none)
        info.chmod(0o755)
        for path in info.iterdir():
            path.chmod(0o644)
    if settled:
        for job in NEVER_SETTLED[name]:
            shutil.rmtree(root / "sys" / "fs" / "cgroup" / "system.slice" / job)
    ctx = CollectorContext(
        procfs=root / "proc", sysfs=root / "sys", node="n1", rootfs=root, slurm_job_info_dir=info
    )
    return root, ctx


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(
    ("name", "settled"),
    [("slurm_v2", False), ("slurm_v2", True), ("slurm_trust", False), ("slurm_trust", True),
     ("slurm_v1", False)],
)  # fmt: skip
def test_random_rounds_read_as_planned_read_as_job_by_job(
    tmp_path: Path, name: str, settled: bool, seed: int
) -> None:
    root, ctx = node(tmp_path, name, settled)

    def make() -> SlurmJobCollector:
        return SlurmJobCollector(
            ctx, resolve_user=lambda uid: f"user-{uid}", job_info_owner=os.getuid()
        )

    planned = random_rounds(make, root, seed, rounds=120)
    if name == "slurm_v1":
        assert planned == 0
    else:
        assert planned > 30, planned  # the plan met the changes
