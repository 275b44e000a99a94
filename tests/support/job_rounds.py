"""Two Slurm job collectors on one tree, round after round while its jobs change: one that may
read settled jobs as its plan says (``SlurmJobCollector._plan_holds``) and one that reads
every job its own way each round; what each round gives must be the same."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telemetry.collectors.base import CheckedRows, check_rows
from telemetry.collectors.slurm import SlurmJobCollector, list_jobs


@dataclass
class PlannedRounds:
    """What the planned collector read as planned, round by round: job rows, and whether that
    was every job of the round (the round as a whole as planned)."""

    rows: list[int] = field(default_factory=list)
    whole: list[bool] = field(default_factory=list)


def planned_rounds_read_as_job_by_job(
    make: Callable[[], SlurmJobCollector],
    rounds: int = 50,
    info_file: Path | None = None,
    stagger: bool = False,
    quiet: bool = False,
) -> PlannedRounds:
    """Run both collectors ``rounds`` rounds, 1 s apart, while each job's CPU time and memory
    grow every round, and: at round 12 a job's cpu.stat takes another shape (CRLF, two
    spaces); at 15 a job's cpuset changes (CPU hotplug, told at its next recheck, up to 10 s
    later, with nothing else changing meanwhile); at 27 a job's memory file is replaced by
    another file under its name; at 30 a memory file holds no number; at 33 ``info_file`` (a
    job-info file, if given) is rewritten with another account; at 36 a job's CPU time goes
    back and its cpuset changes (its cgroup made anew under the same name); at 42 the last job
    ends; at 46 the clock steps back 40 s and a job's cpuset changes. ``quiet``: none of that,
    only the numbers growing. ``stagger``: cgroup v2 jobs after the first appear one by one,
    at rounds 2, 5, 8, …, so that their cpusets settle and fall due in different rounds.
    Asserts every round's output (rows, GPU claims, aliases) and the jobs failing are the
    same; returns what was read as planned (the first round not counted)."""
    pair = PlanPair(make)
    planned, now = pair.planned, pair.now
    if not quiet:  # each change in its turn with a plan to tell it to
        planned._plan_retry = 0.0
    jobs = list_jobs(planned._listing._root)
    aside: dict[int, tuple[Path, Path]] = {}  # round -> a job's cgroup and where it waits
    if stagger:
        later = [job for job in jobs if job.version == 2][1:]
        for n, job in enumerate(later):
            away = job.procs_dir.parent.parent / f"aside-{n}"
            job.procs_dir.rename(away)
            aside[2 + 3 * n] = (job.procs_dir, away)
    pair.round(grow=False, at=now[0])
    pair.log.clear()
    event = (lambda k, n=-1: False) if quiet else (lambda k, n=-1: (k, n) in _EVENTS)
    replaced = None  # the job whose memory file is replaced: one the plan holds then
    for k in range(rounds):
        now[0] += -40.0 if event(k, 46) else 1.0
        if k in aside:
            back, away = aside.pop(k)
            away.rename(back)
        if event(k, 27):
            plan = planned._plan
            held = [job.key for job in plan.planned] if plan is not None else [jobs[-1].key]
            replaced = next(job for job in jobs if job.key == held[-1])
        for n, job in enumerate(jobs):
            if not job.procs_dir.exists():
                continue
            usage = 1_000_000 * (k + 1) + 7 * n
            if event(k, n) and k == 36:
                usage = 5  # less than before: a cgroup made anew under the same name
            if job.version == 2:
                text = f"usage_usec {usage}\nuser_usec {usage // 2}\nsystem_usec 0\n"
                if event(k, n) and k == 12:
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
            job.memory_file.write_text("max\n" if event(k, n) and k == 30 else memory)
        if event(k, 15):
            jobs[0].cpus_files[0].write_text("0-7\n")
        if event(k, 33) and info_file is not None:
            text = info_file.read_text()
            info_file.write_text(text.replace("research-lab", "research-lab-2"))
        if event(k, 36):
            jobs[2].cpus_files[0].write_text("0-5\n")  # the new cgroup's CPUs
        if event(k, 42):
            shutil.rmtree(jobs[-1].procs_dir, ignore_errors=True)
        if event(k, 46):
            jobs[1].cpus_files[0].write_text("0-2\n")
        pair.round(grow=False, at=now[0])
    return PlannedRounds([n for n, _, _ in pair.log], [whole for _, _, whole in pair.log])


# (round, job): what changes then; (round, round) for a change of no one job's numbers
_EVENTS = {(12, 0), (15, 15), (27, 27), (30, 1), (33, 33), (36, 2), (36, 36), (42, 42), (46, 46)}


def columns_as_checked(out: dict[str, list[Any]]) -> None:
    """Rows a collector gave with their columns (:class:`CheckedRows`) hold the columns
    :func:`check_rows` makes of them, and pass it."""
    for table, rows in out.items():
        if isinstance(rows, CheckedRows):
            want = check_rows({table: list(rows)})[table]
            assert {k: tuple(v) for k, v in rows.columns.items()} == {
                k: tuple(v) for k, v in want.items()
            }, table


class PlanPair:
    """A collector that may read as planned and one that reads job by job, on one tree and
    one clock (seconds, from ``start``), stepped a round at a time: each round's output and
    failing jobs must be the same. ``log``: (rows read as planned, jobs, whole round as
    planned) a round."""

    def __init__(self, make: Callable[[], SlurmJobCollector], start: float = 100.0) -> None:
        self.now = [start]
        self.planned, self.each = make(), make()
        self.root = self.planned.ctx.sysfs.parent  # the tree the collectors read
        self.each._plan_holds = lambda jobs, info_dir_ok: False  # type: ignore[method-assign]
        self.each._make_plan = lambda *args: None  # type: ignore[method-assign]
        for c in (self.planned, self.each):
            c._clock = lambda: self.now[0]  # type: ignore[method-assign]
        self.log: list[tuple[int, int, bool]] = []
        real = self.planned._plan_holds

        def counted(jobs: Any, info_dir_ok: bool) -> bool:
            holds = real(jobs, info_dir_ok)
            plan = self.planned._plan
            read = len(plan.planned) if holds and plan is not None else 0
            self.log.append((read, len(jobs), bool(read) and read == len(jobs)))
            return holds

        self.planned._plan_holds = counted  # type: ignore[method-assign]
        self.made: list[bool] = []  # a plan was looked for: whether one was made
        make_plan = self.planned._make_plan

        def making(*args: Any) -> Any:
            plan = make_plan(*args)
            self.made.append(plan is not None)
            return plan

        self.planned._make_plan = making  # type: ignore[method-assign]
        self.k = 0

    def grow(self) -> None:
        """Every cgroup v2 job's CPU time and memory grow."""
        self.k += 1
        for n, job in enumerate(list_jobs(self.root / "sys" / "fs" / "cgroup")):
            if job.version == 2 and job.procs_dir.exists():
                usage = 1_000_000 * self.k + 7 * n
                job.usage_file.write_text(f"usage_usec {usage}\nuser_usec 1\nsystem_usec 0\n")
                job.memory_file.write_text(f"{4096 * (self.k + n)}\n")

    def round(
        self, seconds: float = 1.0, grow: bool = True, at: float | None = None
    ) -> dict[str, list[Any]]:
        """One round ``seconds`` after the last (at the clock reading ``at`` where given); its
        output."""
        self.now[0] = self.now[0] + seconds if at is None else at
        if grow:
            self.grow()
        got, want = self.planned.collect(), self.each.collect()
        assert got == want, self.k
        assert self.planned._bad == self.each._bad, self.k
        columns_as_checked(got)
        return got


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_CPUSETS = ["0-3", "0-7", "4-7,10-11", "1", "0-1", "2-3"]


def random_rounds(make: Callable[[], SlurmJobCollector], root: Path, seed: int, rounds: int) -> int:
    """:class:`PlanPair` rounds on the tree ``root`` (a copy of a fixture tree of
    ``FIXTURES``), each a random clock step (mostly 1 s; fractions, the recheck time and
    around it, a minute, and back) and, in two rounds of five, one or two random changes: a
    cpuset rewritten, a job's cgroup removed or made again (its CPU time starting anew), a step
    made or removed, ``max`` in a memory file, a cpu.stat in CRLF, job-info files (where the
    tree has ``run/tally/jobs``) rewritten, made, removed, by SLUID too, their directory made
    writable by others and safe again. Returns the job rows read as planned."""
    rng = random.Random(seed)
    src = FIXTURES / root.name
    cgroup = root / "sys" / "fs" / "cgroup"
    info_dir = root / "run" / "tally" / "jobs"
    jobs = list_jobs(cgroup)
    pair = PlanPair(make, 100.0 + rng.random())
    usage = dict.fromkeys((str(j.procs_dir) for j in jobs), 1000)
    removed: set[str] = set()
    steps = 0
    for k in range(rounds):
        draw = rng.random()
        if draw < 0.75:
            pair.now[0] += 1.0
        elif draw < 0.85:
            pair.now[0] += rng.choice([0.25, 0.5, 2.0, 9.0, 10.0, 11.0])
        elif draw < 0.9:
            pair.now[0] += rng.choice([30.0, 60.0])
        elif draw < 0.93:
            pair.now[0] -= rng.choice([0.5, 5.0, 40.0])
        odd: dict[str, str] = {}  # a job's directory -> its files read otherwise this round
        for _ in range(rng.randint(1, 2) if rng.random() < 0.4 else 0):
            job, change = rng.choice(jobs), rng.randrange(12)
            where = job.procs_dir
            there = where.exists()
            if change == 0 and there and job.version == 2:
                job.cpus_files[0].write_text(rng.choice(_CPUSETS) + "\n")
            elif change == 1 and there:
                removed.add(str(where))
                shutil.rmtree(where)
            elif change == 2 and str(where) in removed:
                shutil.copytree(src / where.relative_to(root), where)
                usage[str(where)] = 3  # a new cgroup: its CPU time starts again
                removed.discard(str(where))
            elif change == 3 and there:
                steps += 1
                (where / f"step_{100 + steps}").mkdir()
            elif change == 4 and there:
                made = sorted(where.glob("step_1[0-9][0-9]*"))
                if made:
                    made[0].rmdir()
            elif change in (5, 6) and there:
                odd[str(where)] = "max" if change == 5 else "crlf"
            elif change >= 7 and info_dir.is_dir():
                _change_job_info(info_dir, change, k)
        for job in jobs:
            where = str(job.procs_dir)
            if not job.procs_dir.exists():
                continue
            usage[where] += 1_000_000
            used = usage[where]
            if job.version == 1:
                job.usage_file.write_text(f"{used * 1000}\n")
            elif odd.get(where) == "crlf":
                job.usage_file.write_text(f"usage_usec {used}\r\n")
            else:
                job.usage_file.write_text(f"usage_usec {used}\nuser_usec 1\nsystem_usec 0\n")
            memory = "max" if odd.get(where) == "max" else str(4096 * (k + 1))
            job.memory_file.write_text(memory + "\n")
        pair.round(grow=False, at=pair.now[0])
    pair.planned.close()
    pair.each.close()
    return sum(n for n, _, _ in pair.log)


def _change_job_info(info_dir: Path, change: int, k: int) -> None:
    """One change to the job-info files of the ``slurm_trust`` tree (``change`` 7 to 11)."""
    if change == 7:
        path = info_dir / "1009251"
        if path.exists():
            path.write_text(path.read_text().replace("research-lab", f"lab-{k}") + "#\n")
        return
    if change == 10:  # the directory writable by others (ignored, logged), and safe again
        info_dir.chmod(0o777 if info_dir.stat().st_mode & 0o022 == 0 else 0o755)
        return
    name, text = {
        8: ("1009250", "job_id=1009250\nuid=2002\nuser=u2\naccount=acc\ngpus=1\n"),
        9: ("sEKNKTV3WPV500", "job_id=1009252\nsluid=sEKNKTV3WPV500\nuid=2001\nuser=u1\n"
            "account=acc1\ngpus=0\n"),
        11: ("1009248", "job_id=1009248\nuid=2001\nuser=u1\naccount=acc9\ngpus=\n"),
    }[change]  # fmt: skip
    path = info_dir / name
    if path.exists():
        path.unlink()
    else:
        path.write_text(text)
        path.chmod(0o644)
