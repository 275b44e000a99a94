"""Which job holds each GPU (SPEC §2 ``gpu.job_id``), from what the collectors saw this round,
and the ``gpu_job`` rows of GPUs held by several jobs at once.

A claim by UUID (side output ``_gpu_job`` of the ``pod`` collector: the GPU or MIG instance the
kubelet gave a pod) names exactly the GPU it holds. Then the job whose ``SLURM_JOB_GPUS`` names
the GPU's index (side output ``_gpu_job`` of the ``job`` collector); where no job claims it, the
Slurm job of a process NVML lists on the GPU (side output ``_gpu_pids`` of the ``gpu``
collector), found through ``<procfs>/<pid>/cgroup`` (a cgroup named by SLUID is mapped to its
job id by the ``job`` collector's ``_job_alias``). MIG instances are matched by their processes
first: a claim by ``gpu_index`` names the whole GPU.

Shared GPUs (SPEC §2 ``gpu_job``): a GPU (or MIG instance) whose claims and processes name more
than one job gets one ``gpu_job`` row per job. ``share`` is the claim's own ``share`` where every
holder's claim carries one (the hook for Slurm shards and MPS: shards held / shards of the GPU,
or the active thread percentage / 100; Kubernetes replicas likewise), else 1 / number of
holders. ``sm_utilization_ratio`` sums the job's PIDs' mean SM utilisation over the NVML samples
of the past round (null where NVML gave none); ``memory_used_bytes`` sums their framebuffer use.
A GPU a collector already wrote ``gpu_job`` rows for (the ``pod`` collector's time-slicing
replicas) keeps those, with each pod's SM utilisation and framebuffer use filled in from the
processes NVML lists on it (a process's pod from its kubepods cgroup, named by the ``pod``
collector's ``_job_alias`` rows); its gpu row's ``job_id`` stays empty.

MIG allocation: a job row's ``gpus_allocated`` counts a MIG instance as the instance is counted
in capacity (``capacity_units``, e.g. 1/7), not as a whole GPU: where a job holds any MIG
instance this round, its ``gpus_allocated`` is the sum of ``capacity_units`` of the GPU rows it
holds, each at the job's ``share`` where the row has ``gpu_job`` rows (Kubernetes time-slicing
replicas of a MIG instance: 1 of 2 replicas of a 1g instance of 7 is 1/14 of a GPU).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from telemetry.collectors import files
from telemetry.collectors.kubepods import POD_CGROUP, pod_uid_from_cgroup

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


class _PidJobs:
    """PID → job of this round, each ``/proc/<pid>/cgroup`` read once, through ``kept`` (files
    kept open between rounds) where given."""

    def __init__(
        self, procfs: Path, aliases: dict[str, str], kept: files.KeptFiles | None = None
    ) -> None:
        self.procfs = procfs
        self.aliases = aliases  # SLUID → job id
        self.kept = kept
        self.seen: dict[int, str | None] = {}

    def __call__(self, pid: int) -> str | None:
        if pid not in self.seen:
            path = f"{self.procfs}/{pid}/cgroup"
            kept = self.kept
            try:  # read_text: the tests' seam
                text = kept.read(pid, path) if kept is not None else files.read_text(path)
            except OSError:
                text = ""  # the process ended, or is not ours to read
            job = _job_of_text(text)
            if job is not None:
                self.seen[pid] = self.aliases.get(job, job)
            else:  # a pod's process: its pod, where this round's pods include it
                uid = _pod_of_text(text)
                self.seen[pid] = None if uid is None else self.aliases.get(POD_CGROUP + uid)
        return self.seen[pid]


@functools.lru_cache(maxsize=1024)
def _job_of_text(text: str) -> str | None:
    """:func:`job_id_from_cgroup`, once per text: a job's processes read the same few."""
    return job_id_from_cgroup(text)


@functools.lru_cache(maxsize=1024)
def _pod_of_text(text: str) -> str | None:
    """:func:`pod_uid_from_cgroup`, once per text."""
    return pod_uid_from_cgroup(text)


def _first(values: Iterable[str | None]) -> str | None:
    return next((v for v in values if v is not None), None)


#: The columns :func:`attribute_gpus` may change in rows it is given, by table (it adds the
#: ``gpu_job`` rows besides).
ATTRIBUTION_WRITES: dict[str, tuple[str, ...]] = {"gpu": ("job_id",), "job": ("gpus_allocated",)}


def attribute_gpus(
    partial: dict[str, list[dict[str, Any]]], procfs: Path, kept: files.KeptFiles | None = None
) -> None:
    """Fill ``job_id`` of this round's gpu rows in place, add ``gpu_job`` rows for GPUs held
    by several jobs, count MIG instances in the holders' ``gpus_allocated`` at their fraction,
    and drop the side outputs. ``kept``: the processes' cgroup files, kept open from round to
    round (a file of a process that ended reads ESRCH, so a PID used again is opened anew)."""
    claim_rows = partial.pop("_gpu_job", [])
    by_index: dict[int, list[dict[str, Any]]] = {}
    by_uuid: dict[str, list[dict[str, Any]]] = {}
    for claim in claim_rows:
        if claim.get("gpu_uuid") is not None:
            by_uuid.setdefault(str(claim["gpu_uuid"]), []).append(claim)
        elif claim.get("gpu_index") is not None:
            by_index.setdefault(int(claim["gpu_index"]), []).append(claim)
    processes = {str(r["gpu_uuid"]): r for r in partial.pop("_gpu_pids", [])}
    aliases = {str(r["cgroup"]): str(r["job_id"]) for r in partial.pop("_job_alias", [])}
    job_of = _PidJobs(procfs, aliases, kept)
    if kept is not None:
        kept.begin_round()
    written = {str(r["gpu_uuid"]) for r in partial.get("gpu_job", [])}
    shared: list[dict[str, Any]] = []
    parents: set[str] = set()
    for row in partial.get("gpu", []):
        uuid = str(row.get("gpu_uuid"))
        mig = row.get("mig_profile") is not None
        seen = processes.get(uuid, {})
        pid_jobs = {pid: job_of(pid) for pid in map(int, seen.get("pids", ()))}
        # A claim by index names the whole GPU, never one of its MIG instances.
        held = by_uuid.get(uuid, []) + ([] if mig else by_index.get(int(row["gpu_index"]), []))
        if uuid in written:  # held through replicas: the pods' own gpu_job rows say who
            _fill_usage(partial["gpu_job"], uuid, pid_jobs, seen)
        elif row.get("job_id") is None:
            by_process = _first(pid_jobs.values())
            by_claim = str(held[0]["job_id"]) if held else None
            row["job_id"] = (by_process or by_claim) if mig else (by_claim or by_process)
        if seen.get("mig_parent"):
            parents.add(uuid)
            continue  # its instances are the GPUs jobs hold; the parent's list repeats them
        if uuid not in written:
            shared.extend(_shared_rows(uuid, held, pid_jobs, seen))
    if shared:
        partial.setdefault("gpu_job", []).extend(shared)
    if kept is not None:
        kept.keep_only(set(job_of.seen))
    _mig_allocation(partial, parents)


def _shared_rows(
    uuid: str,
    claims: list[dict[str, Any]],
    pid_jobs: dict[int, str | None],
    seen: dict[str, Any],
) -> list[dict[str, Any]]:
    """The ``gpu_job`` rows of one GPU: none unless more than one job holds it."""
    holders: dict[str, float | None] = {}  # job → share its claim states (None: not stated)
    for claim in claims:
        share = claim.get("share")
        holders.setdefault(str(claim["job_id"]), None if share is None else float(share))
    for job in pid_jobs.values():
        if job is not None:
            holders.setdefault(job, None)
    if len(holders) < 2:
        return []
    stated = all(share is not None for share in holders.values())
    rows = []
    for job, share in holders.items():
        utilization, used = _usage(job, pid_jobs, seen)
        rows.append(
            {
                "gpu_uuid": uuid,
                "job_id": job,
                "share": share if stated and share is not None else 1.0 / len(holders),
                "sm_utilization_ratio": utilization,
                "memory_used_bytes": used,
            }
        )
    return rows


def _usage(
    job: str, pid_jobs: dict[int, str | None], seen: dict[str, Any]
) -> tuple[float | None, int | None]:
    """The SM utilisation (summed over the job's PIDs, at most 1; None where NVML gave no
    samples) and framebuffer bytes (None where NVML tells none for a process it lists) of one
    job's processes on one GPU."""
    sm = seen.get("sm")
    if callable(sm):  # the gpu collector's ProcessSm: NVML is asked for GPUs jobs share only
        sm = seen["sm"] = sm()
    memory: dict[int, int | None] = seen.get("memory", {})
    pids = [pid for pid, owner in pid_jobs.items() if owner == job]
    used = [m for m in (memory.get(pid) for pid in pids) if m is not None]
    utilization = None if sm is None else min(sum(sm.get(pid, 0.0) for pid in pids), 1.0)
    # no process: nothing used; processes NVML gives no figure for: unknown
    return utilization, sum(used) if used or not pids else None


def _fill_usage(
    rows: list[dict[str, Any]], uuid: str, pid_jobs: dict[int, str | None], seen: dict[str, Any]
) -> None:
    """Each holder's SM utilisation and framebuffer use in the ``gpu_job`` rows a collector
    wrote for GPU ``uuid`` (the pods of time-slicing replicas), from the processes NVML lists
    on it, where it lists them."""
    if not seen:
        return  # NVML said nothing of this GPU: the rows stay as written
    for row in rows:
        if str(row["gpu_uuid"]) == uuid:
            row["sm_utilization_ratio"], row["memory_used_bytes"] = _usage(
                str(row["job_id"]), pid_jobs, seen
            )


def _mig_allocation(partial: dict[str, list[dict[str, Any]]], parents: set[str]) -> None:
    """``gpus_allocated`` of jobs holding MIG instances: the capacity units of what they hold
    (``parents``: UUIDs of MIG-enabled GPUs, whose instances are what jobs hold). A GPU or
    instance with ``gpu_job`` rows (time-slicing replicas of a MIG instance, or several jobs'
    processes on one) counts for each holder at its share of the capacity units, not whole for
    the job in its row."""
    holders_of: dict[str, list[tuple[str, float]]] = {}
    for claim in partial.get("gpu_job", []):
        share = claim.get("share")
        holders_of.setdefault(str(claim["gpu_uuid"]), []).append(
            (str(claim["job_id"]), 1.0 if share is None else float(share))
        )
    units: dict[str, float] = {}
    on_mig: set[str] = set()
    for row in partial.get("gpu", []):
        uuid = str(row.get("gpu_uuid"))
        if uuid in parents:
            continue
        holders = holders_of.get(uuid)
        if holders is None:
            job = row.get("job_id")
            if job is None:
                continue
            holders = [(str(job), 1.0)]
        fraction = row.get("capacity_units")
        fraction = 1.0 if fraction is None else fraction
        for job, share in holders:
            if row.get("mig_profile") is not None:
                on_mig.add(job)
            units[job] = units.get(job, 0.0) + share * fraction
    if not on_mig:
        return  # no job holds a MIG instance: every job's GPUs count as they came
    for row in partial.get("job", []):
        job = str(row.get("job_id"))
        if job in on_mig and "gpus_allocated" in row:
            row["gpus_allocated"] = units[job]
