"""Which job holds each GPU (SPEC §2 ``gpu.job_id``), from what the collectors saw this round.

A claim by UUID (side output ``_gpu_job`` of the ``pod`` collector: the GPU or MIG instance the
kubelet gave a pod) is exact and wins. Then the job whose ``SLURM_JOB_GPUS`` names the GPU's
index (side output ``_gpu_job`` of the ``job`` collector); where no job claims it, the Slurm
job of a process NVML lists on the GPU (side output ``_gpu_pids`` of the ``gpu`` collector),
found through ``<procfs>/<pid>/cgroup`` (a cgroup named by SLUID is mapped to its job id by
the ``job`` collector's ``_job_alias``).
MIG instances are matched by their processes first: a Slurm claim names the whole GPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_CGROUP_JOB = re.compile(
    r"(?:^|/)(?:slurm[^/]*/uid_[0-9]+/job_([0-9]+)"
    r"|[^/]*slurmstepd\.scope/(?:job_([0-9]+)|(s[0-9A-HJKMNP-TV-Z]{13})))(?=/|$)"
)


def job_id_from_cgroup(text: str) -> str | None:
    """The Slurm job id in ``/proc/<pid>/cgroup`` text, or ``None`` if the process is in no job.

    Understands cgroup v1 lines (``4:cpuacct:/slurm/uid_1000/job_123/step_0``, also
    ``/slurm_<nodename>/…``) and the v2 line
    (``0::/system.slice/slurmstepd.scope/job_123/step_0/user/task_0``, also
    ``<nodename>_slurmstepd.scope``; since Slurm 26.05 the v2 job directory may be the job's
    SLUID, ``s`` and 13 base-32 digits, which is returned as it is and mapped to the job id by
    the ``job`` collector's ``_job_alias`` rows). The first line naming a job wins.
    """
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        match = _CGROUP_JOB.search(parts[2])
        if match:
            return next(group for group in match.groups() if group is not None)
    return None


def _job_of_pids(procfs: Path, pids: list[int]) -> str | None:
    for pid in pids:
        try:
            text = (procfs / str(pid) / "cgroup").read_text(errors="replace")
        except OSError:
            continue  # the process ended, or is not ours to read
        job = job_id_from_cgroup(text)
        if job is not None:
            return job
    return None


def attribute_gpus(partial: dict[str, list[dict[str, Any]]], procfs: Path) -> None:
    """Fill ``job_id`` of this round's gpu rows in place and drop the side outputs."""
    raw_claims = partial.pop("_gpu_job", [])
    claims = {int(r["gpu_index"]): str(r["job_id"]) for r in raw_claims if "gpu_index" in r}
    by_uuid = {str(r["gpu_uuid"]): str(r["job_id"]) for r in raw_claims if "gpu_uuid" in r}
    processes = {str(r["gpu_uuid"]): r for r in partial.pop("_gpu_pids", [])}
    aliases = {str(r["cgroup"]): str(r["job_id"]) for r in partial.pop("_job_alias", [])}
    for row in partial.get("gpu", []):
        if row.get("job_id") is not None:
            continue
        if str(row.get("gpu_uuid")) in by_uuid:
            row["job_id"] = by_uuid[str(row.get("gpu_uuid"))]
            continue
        seen = processes.get(str(row.get("gpu_uuid")), {})
        by_process = _job_of_pids(procfs, list(seen.get("pids", [])))
        if by_process is not None:
            by_process = aliases.get(by_process, by_process)
        by_claim = claims.get(int(row["gpu_index"]))
        row["job_id"] = (by_process or by_claim) if seen.get("mig") else (by_claim or by_process)
