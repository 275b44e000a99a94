"""Two Slurm job collectors on one tree, round after round while its jobs change: one that may
read settled jobs as its plan says (``SlurmJobCollector._planned_rows``) and one that reads
every job its own way each round; what each round gives must be the same."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from telemetry.collectors.slurm import SlurmJobCollector


def planned_rounds_read_as_job_by_job(
    make: Callable[[], SlurmJobCollector], rounds: int = 50, info_file: Path | None = None
) -> tuple[int, int]:
    """Run both collectors ``rounds`` rounds, 1 s apart, while each job's CPU time and memory
    grow every round, and: at round 12 a job's cpu.stat takes another shape (CRLF, two
    spaces); at 15 a job's cpuset changes (CPU hotplug, told at its next recheck, up to 10 s
    later, with nothing else changing meanwhile); at 27 a job's memory file is replaced by
    another file under its name; at 30 a memory file holds no number; at 33 ``info_file`` (a
    job-info file, if given) is rewritten with another account; at 36 a job's CPU time goes
    back and its cpuset changes (its cgroup made anew under the same name); at 42 the last job
    ends. Asserts every round's output (rows, GPU claims, aliases) and the jobs failing are the
    same; returns how many job rows the planned collector read as planned, all rounds
    together, and in how many rounds it read every job so (the round as a whole as planned)."""
    now = [100.0]
    planned, each = make(), make()
    each._planned_rows = lambda jobs, info_dir_ok: {}  # type: ignore[method-assign]
    as_planned = 0
    real = planned._planned_rows

    whole = 0

    def counted(jobs: Any, info_dir_ok: bool) -> Any:
        nonlocal as_planned, whole
        out = real(jobs, info_dir_ok)
        as_planned += len(out)
        whole += len(out) == len(jobs)
        return out

    planned._planned_rows = counted  # type: ignore[method-assign]
    for c in (planned, each):
        c._clock = lambda: now[0]  # type: ignore[method-assign]
    assert planned.collect() == each.collect()
    jobs = list(planned._listing.jobs())
    replaced = None  # the job whose memory file is replaced: one the plan holds then
    for k in range(rounds):
        now[0] += 1.0
        if k == 27:
            held = planned._plan.keys if planned._plan is not None else [jobs[-1].key]
            replaced = next(job for job in jobs if job.key == held[-1])
        for n, job in enumerate(jobs):
            if not job.procs_dir.exists():
                continue
            usage = 1_000_000 * (k + 1) + 7 * n
            if (k, n) == (36, 2):
                usage = 5  # less than before: a cgroup made anew under the same name
            if job.version == 2:
                text = f"usage_usec {usage}\nuser_usec {usage // 2}\nsystem_usec 0\n"
                if (k, n) == (12, 0):
                    text = f"usage_usec  {usage}\r\n"
                job.usage_file.write_text(text)
            else:
                job.usage_file.write_text(f"{usage * 1000}\n")
            memory = f"{4096 * (k + n)}\n"
            if job is replaced:  # another file under the name: the kept one is not it
                other = job.memory_file.with_name("memory.new")
                other.write_text(f"{777 + k}\n")
                os.replace(other, job.memory_file)
                replaced = None
                continue
            job.memory_file.write_text("max\n" if (k, n) == (30, 1) else memory)
        if k == 15:
            jobs[0].cpus_files[0].write_text("0-7\n")
        if k == 33 and info_file is not None:
            text = info_file.read_text()
            info_file.write_text(text.replace("research-lab", "research-lab-2"))
        if k == 36:
            jobs[2].cpus_files[0].write_text("0-5\n")  # the new cgroup's CPUs
        if k == 42:
            shutil.rmtree(jobs[-1].procs_dir, ignore_errors=True)
        got, want = planned.collect(), each.collect()
        assert got == want, k
        assert planned._bad == each._bad, k
    return as_planned, whole
