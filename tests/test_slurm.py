"""The Slurm ``job`` collector on cgroup v2 and v1 fixture trees, its parsers, and its faults.

Expected rows are worked out by hand from the fixture files (see the README of each tree) and
cross-checked against the files' text with small independent splitters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from telemetry.collectors import REGISTRY, CollectorContext, Runner, files, slurm, watch
from telemetry.collectors.attribution import job_id_from_cgroup
from telemetry.collectors.base import CheckedRows, assemble, check_rows
from telemetry.collectors.files import KeptFiles
from telemetry.collectors.jobinfo import MAX_VALUE_CHARS
from telemetry.collectors.slurm import (
    SlurmJobCollector,
    gpus_from_environ,
    list_jobs,
    parse_cpu_list,
    parse_cpu_stat_usage_usec,
    parse_environ,
    read_cgroup_usage,
)
from telemetry.errors import ParseError
from telemetry.schema import JOB_SCHEMA
from tests.support.job_rounds import PlanPair, planned_rounds_read_as_job_by_job

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V2 = FIXTURES / "slurm_v2"
V1 = FIXTURES / "slurm_v1"
V2_SCOPE = Path("sys/fs/cgroup/system.slice/slurmstepd.scope")
T0 = 1_788_220_800_000_000_000

# The hostile strings of jobs 1004 (v2) and 504 (v1), as written into their environ files:
# SLURM_JOB_USER=m\xffal"lory'}\n{"user": "root"}\  (one byte that is not UTF-8)
# SLURM_JOB_ACCOUNT=acct},"drop\r\n + 3000 × "A"      (cut to 1024 characters)
HOSTILE_USER = 'm\ufffdal"lory\'}\n{"user": "root"}\\'
HOSTILE_ACCOUNT = ('acct},"drop\r\n' + "A" * 3000)[:1024]


def v2_job_uid(job: str) -> int:
    """Owner of a v2 job directory: whoever checked the fixtures out."""
    return (V2 / V2_SCOPE / f"job_{job}").stat().st_uid


def names(uid: int) -> str:
    """The test's user resolver: a name no real passwd has."""
    return f"user-{uid}"


def row(
    user: str, account: str, cpus: float, gpus: float, seconds: float, memory: int
) -> dict[str, Any]:
    return {
        "user": user,
        "account": account,
        "account_source": None if account == "unknown" else "environment",
        "cpus_allocated": cpus,
        "gpus_allocated": gpus,
        "cpu_seconds": seconds,
        "memory_bytes": memory,
    }


# job_id → row without job_id. cpu_seconds: cpu.stat usage_usec / 1e6.
V2_EXPECTED = {
    # cpuset 0-3; environ of PID 3003 (slurmstepd) has no SLURM_JOB_*, PID 3004 has.
    "1001": row("alice", "physics", 4.0, 0.0, 7212.345678, 2_147_483_648),
    # cpuset 4-7,10-11; SLURM_JOB_GPUS=0,1
    "1002": row("bob", "chemistry", 6.0, 2.0, 45000.0, 68_719_476_736),
    # cpuset 8-9; only CUDA_VISIBLE_DEVICES, two GPU- UUIDs
    "1003": row("carol", "biology", 2.0, 2.0, 1.000001, 536_870_912),
    # cpuset.cpus.effective empty → cpuset.cpus 12-13; SLURM_JOB_GPUS= empty, no CUDA variable
    "1004": row(HOSTILE_USER, HOSTILE_ACCOUNT, 2.0, 0.0, 0.000999, 4096),
    # cpuset 14; no readable environ → owner of the job directory through the resolver
    "1005": row(names(v2_job_uid("1005")), "unknown", 1.0, 0.0, 0.0, 0),
    # node07_slurmstepd.scope; cpuset 16-31; step_0 only: SLURM_STEP_GPUS=3 (CUDA_VISIBLE_DEVICES=0)
    "2001": row("dave", "astro", 16.0, 1.0, 3600.0, 17_179_869_184),
}
V2_CLAIMS = [(0, "1002"), (1, "1002"), (3, "2001")]

# cpu_seconds: cpuacct.usage / 1e9; user of job 505 from its uid_4242 directory.
V1_EXPECTED = {
    "501": row("alice", "physics", 4.0, 0.0, 123.456789012, 1_073_741_824),  # 0-1,8-9
    "502": row("bob", "chemistry", 4.0, 2.0, 7000.0, 34_359_738_368),  # 2-5; GPUS=0,1
    "503": row("carol", "biology", 1.0, 1.0, 5e-9, 65536),  # 6; one MIG- UUID
    "504": row(HOSTILE_USER, HOSTILE_ACCOUNT, 1.0, 0.0, 1.5, 8192),  # effective empty → 7
    "505": row("user-4242", "unknown", 4.0, 0.0, 0.0, 0),  # 20-23; no environ
    "506": row("alice", "physics", 2.0, 0.0, 2.0, 1_048_576),  # no effective_cpus file: 10-11
    "601": row("dave", "astro", 4.0, 1.0, 60.0, 4_294_967_296),  # slurm_node07/; 12-15; STEP_GPUS=2
}
V1_CLAIMS = [(0, "502"), (1, "502"), (2, "601")]


def ctx(root: Path) -> CollectorContext:
    return CollectorContext(procfs=root / "proc", sysfs=root / "sys", node="n1")


def collect(root: Path, **kwargs: Any) -> tuple[dict[str, dict[str, Any]], list[tuple[int, str]]]:
    """Run one collection: rows by job id (without job_id) and sorted (gpu_index, job_id)."""
    out = SlurmJobCollector(ctx(root), **kwargs).collect()
    return by_job(out), claims_of(out)


def by_job(out: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    assert set(out) == {"job", "_gpu_job", "_job_alias"}
    rows = {r["job_id"]: {k: v for k, v in r.items() if k != "job_id"} for r in out["job"]}
    assert len(rows) == len(out["job"]), "a job id appears twice"
    return rows


def claims_of(out: dict[str, list[dict[str, Any]]]) -> list[tuple[int, str]]:
    return sorted((c["gpu_index"], c["job_id"]) for c in out["_gpu_job"])


def copy_tree(src: Path, tmp_path: Path) -> Path:
    root = tmp_path / src.name
    shutil.copytree(src, root)
    return root


# ---------------------------------------------------------------- fixture cross-checks


def cpus_in(text: str) -> int:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        a, _, b = part.partition("-")
        cpus.update(range(int(a), int(b or a) + 1))
    return len(cpus)


def test_expected_values_match_the_fixture_files() -> None:
    for job, want in V2_EXPECTED.items():
        scope = "node07_slurmstepd.scope" if job == "2001" else "slurmstepd.scope"
        d = V2 / "sys/fs/cgroup/system.slice" / scope / f"job_{job}"
        effective = (d / "cpuset.cpus.effective").read_text()
        cpus = effective if effective.strip() else (d / "cpuset.cpus").read_text()
        assert cpus_in(cpus) == want["cpus_allocated"], job
        stat = dict(line.split() for line in (d / "cpu.stat").read_text().splitlines())
        assert int(stat["usage_usec"]) / 1e6 == want["cpu_seconds"], job
        assert int((d / "memory.current").read_text()) == want["memory_bytes"], job
    for job, want in V1_EXPECTED.items():
        [acct] = (V1 / "sys/fs/cgroup/cpuacct").glob(f"slurm*/uid_*/job_{job}")
        rel = acct.relative_to(V1 / "sys/fs/cgroup/cpuacct")
        cpuset = V1 / "sys/fs/cgroup/cpuset" / rel
        eff = cpuset / "cpuset.effective_cpus"
        text = eff.read_text() if eff.exists() else ""
        text = text if text.strip() else (cpuset / "cpuset.cpus").read_text()
        assert cpus_in(text) == want["cpus_allocated"], job
        assert int((acct / "cpuacct.usage").read_text()) / 1e9 == want["cpu_seconds"], job
        mem = V1 / "sys/fs/cgroup/memory" / rel / "memory.usage_in_bytes"
        assert int(mem.read_text()) == want["memory_bytes"], job
    raw = (V2 / "proc/3301/environ").read_bytes()
    assert b"SLURM_JOB_USER=" + HOSTILE_USER.replace("\ufffd", "\xff").encode("latin-1") in raw


# ---------------------------------------------------------------- the collector


def test_registered_as_job() -> None:
    assert REGISTRY["job"] is SlurmJobCollector
    assert SlurmJobCollector.default_enabled is True
    assert SlurmJobCollector.help


def test_cgroup_v2_tree() -> None:
    rows, claims = collect(V2, resolve_user=names)
    assert rows == V2_EXPECTED
    assert claims == V2_CLAIMS


def test_cgroup_v2_jobs_under_another_slice(tmp_path: Path) -> None:
    """cgroup.conf's CgroupSlice puts slurmstepd's scope under a slice of the site's choosing
    (default system.slice): the same jobs are found under slurm.slice, and doctor sees them."""
    from telemetry.config import DaemonConfig
    from telemetry.doctor import check_slurm

    root = tmp_path / "node"
    shutil.copytree(V2, root, symlinks=True)
    cgroup = root / "sys/fs/cgroup"
    (cgroup / "system.slice").rename(cgroup / "slurm.slice")
    (cgroup / "user.slice/user-1000.slice/session-1.scope").mkdir(parents=True)
    rows, claims = collect(root, resolve_user=names)
    assert rows == V2_EXPECTED
    assert claims == V2_CLAIMS
    config = DaemonConfig(procfs=root / "proc", sysfs=root / "sys", node="n1")
    found = check_slurm(config)[0]
    assert found.status == "ok" and f"{len(V2_EXPECTED)} job(s) running" in found.detail


def test_cgroup_v1_tree() -> None:
    rows, claims = collect(V1, resolve_user=names)
    assert rows == V1_EXPECTED
    assert claims == V1_CLAIMS


def _stat(pid: int, ppid: int, user: int, children: int = 0, rss_pages: int = 2560) -> str:
    """A ``/proc/<pid>/stat`` line: ``user`` ticks of user time, 100 of system time, ``children``
    ticks of waited-for children's user time (and 100 of their system time where any)."""
    waited = f"{children} 100" if children else "0 0"
    return (f"{pid} (work) S {ppid} {pid} {pid} 0 -1 4194560 1 0 0 0 {user} 100 {waited} 20 0 1"
            f" 0 9{pid} 1 {rss_pages} 0\n")  # fmt: skip


def test_v1_jobs_without_cpuacct_memory_or_cpuset_cgroups_are_read_from_their_processes(
    tmp_path: Path, warnings: list[str]
) -> None:
    """cgroup v1 Slurm makes a cpuacct cgroup only with jobacct_gather/cgroup, a memory one with
    ConstrainRAMSpace, a cpuset one with ConstrainCores: a job is listed wherever it has a
    cgroup, and what a missing one would tell comes from its processes, said once. CPU time: the
    living processes' own and waited-for children's, plus the last total of a process that
    ended with no parent in the job (a step's slurmstepd), held from going back."""
    root = copy_tree(V1, tmp_path)
    cgroup = root / "sys/fs/cgroup"
    for top in ("slurm", "slurm_node07"):
        shutil.rmtree(cgroup / "cpuacct" / top)  # jobacct_gather/linux: no cpuacct cgroups
    proc = root / "proc"
    (proc / "5102" / "stat").write_text(_stat(5102, 1, 500, children=300))  # 1000 ticks
    c = SlurmJobCollector(ctx(root), resolve_user=names)
    job = by_job(c.collect())["502"]
    want = V1_EXPECTED["502"]
    assert job["cpu_seconds"] == 10.0  # at 100 ticks a second
    assert (job["memory_bytes"], job["cpus_allocated"]) == (want["memory_bytes"], 4.0)
    assert set(by_job(c.collect())) == set(V1_EXPECTED)  # every job still listed
    said = [w for w in warnings if "cgroup v1" in w]
    assert len(said) == 1 and "no cpuacct cgroup" in said[0]  # once, not once a job or round
    # a step starts: its slurmstepd (parent slurmd, outside the job) and a task under it
    task_dir = cgroup / "cpuset/slurm/uid_1001/job_502/step_batch/task_0"
    (task_dir / "cgroup.procs").write_text("5102\n5110\n5111\n")
    for pid in (5110, 5111):
        (proc / str(pid)).mkdir()
        (proc / str(pid) / "environ").write_bytes(b"SLURM_JOB_ID=502\0")
    (proc / "5110" / "stat").write_text(_stat(5110, 900, 10))  # 110 ticks
    (proc / "5111" / "stat").write_text(_stat(5111, 5110, 400))  # 500 ticks
    assert by_job(c.collect())["502"]["cpu_seconds"] == 16.1
    # the task ends and slurmstepd waits for it: its time moves into slurmstepd's
    (task_dir / "cgroup.procs").write_text("5102\n5110\n")
    (proc / "5110" / "stat").write_text(_stat(5110, 900, 10, children=500))  # 110 + 600
    assert by_job(c.collect())["502"]["cpu_seconds"] == 17.1
    # the step ends: slurmstepd goes, nobody in the job waits for it: its total is kept
    (task_dir / "cgroup.procs").write_text("5102\n")
    assert by_job(c.collect())["502"]["cpu_seconds"] == 17.1
    (proc / "5102" / "stat").write_text(_stat(5102, 1, 100))  # its counters went back: held
    assert by_job(c.collect())["502"]["cpu_seconds"] == 17.1
    # a job whose cgroup Slurm has made in cpuset but not yet in memory is not listed yet
    memory_dir = cgroup / "memory/slurm/uid_1001/job_502"
    shutil.move(memory_dir, tmp_path / "job_502_memory")
    assert "502" not in by_job(SlurmJobCollector(ctx(root), resolve_user=names).collect())
    shutil.move(tmp_path / "job_502_memory", memory_dir)
    # no memory and no cpuset cgroups on the node either (ConstrainRAMSpace=no,
    # ConstrainCores=no): the job is listed by its freezer cgroup (proctrack/cgroup); its CPUs
    # are its environment's
    freezer = cgroup / "freezer/slurm/uid_1001/job_502/step_batch"
    shutil.copytree(task_dir.parent, freezer)
    for hierarchy in ("memory", "cpuset"):
        for top in (cgroup / hierarchy).glob("slurm*"):
            shutil.rmtree(top)
    (proc / "5102" / "status").write_text("Name:\tbash\nCpus_allowed_list:\t0-127\n")
    job = by_job(SlurmJobCollector(ctx(root), resolve_user=names).collect())["502"]
    assert job["memory_bytes"] == 2560 * os.sysconf("SC_PAGE_SIZE")
    assert job["cpus_allocated"] == 128.0  # no SLURM_CPUS_ON_NODE: its affinity
    env = (proc / "5102" / "environ").read_bytes()
    (proc / "5102" / "environ").write_bytes(env + b"SLURM_CPUS_ON_NODE=6\0")
    job = by_job(SlurmJobCollector(ctx(root), resolve_user=names).collect())["502"]
    assert job["cpus_allocated"] == 6.0
    assert (job["user"], job["account"]) == (want["user"], want["account"])
    assert any("no cpuacct/memory/cpuset cgroup" in w for w in warnings)
    from telemetry.config import DaemonConfig
    from telemetry.doctor import check_slurm

    said = check_slurm(DaemonConfig(procfs=proc, sysfs=root / "sys", node="n1"))
    assert said[0].status == "ok" and "1 job(s) running" in said[0].detail  # job 502 alone
    assert said[1].status == "warn" and "without a cpuacct/cpuset/memory cgroup" in said[1].detail


def test_rows_fit_the_job_schema_and_survive_parquet() -> None:
    for root in (V2, V1):
        out = SlurmJobCollector(ctx(root), resolve_user=names).collect()
        check_rows({"job": out["job"]})
        frames, dropped = assemble({"job": out["job"]}, T0, "n1")
        assert dropped == 0
        tables = {"job": frames["job"].to_arrow()}
        assert tables["job"].schema == JOB_SCHEMA
        buf = io.BytesIO()
        pq.write_table(tables["job"], buf)
        back = pq.read_table(io.BytesIO(buf.getvalue()))
        users = set(back.column("user").to_pylist())
        accounts = set(back.column("account").to_pylist())
        assert HOSTILE_USER in users
        assert HOSTILE_ACCOUNT in accounts
        assert max(len(a) for a in accounts) == MAX_VALUE_CHARS


def test_through_the_runner() -> None:
    runner = Runner([SlurmJobCollector(ctx(V2), resolve_user=names)], clock_ns=lambda: T0)
    rnd = runner.run()
    assert rnd.status["job"].success, rnd.status["job"].error
    assert set(rnd.tables) == {"job"}  # the _gpu_job side output is no table
    table = rnd.tables["job"].to_arrow()
    assert table.schema == JOB_SCHEMA
    assert set(table.column("node").to_pylist()) == {"n1"}
    assert sorted(table.column("job_id").to_pylist()) == sorted(V2_EXPECTED)


def test_no_cgroup_tree_means_no_jobs(tmp_path: Path) -> None:
    nothing: dict[str, list[Any]] = {"job": [], "_gpu_job": [], "_job_alias": []}
    assert SlurmJobCollector(ctx(tmp_path)).collect() == nothing
    (tmp_path / "sys/fs/cgroup/system.slice/slurmstepd.scope").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cpuacct/slurm/uid_0").mkdir(parents=True)
    assert SlurmJobCollector(ctx(tmp_path)).collect() == nothing
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").write_text("cpuset cpu memory\n")
    assert SlurmJobCollector(ctx(tmp_path)).collect() == nothing


def test_default_resolver_and_module_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    me = os.getuid()
    assert slurm.user_name_for_uid(me) == pwd.getpwuid(me).pw_name
    monkeypatch.setattr(slurm, "user_name_for_uid", names)
    rows, _ = collect(V1)  # no resolver given: the module-level function is used
    assert rows["505"]["user"] == "user-4242"


def test_resolver_without_answer_gives_the_numeric_uid() -> None:
    calls: list[int] = []

    def unknown(uid: int) -> str:
        calls.append(uid)
        raise KeyError(uid)

    collector = SlurmJobCollector(ctx(V1), resolve_user=unknown)
    for _ in range(2):
        assert by_job(collector.collect())["505"]["user"] == "4242"
    assert calls == [4242, 4242]  # failures are asked again, not remembered


def test_a_name_the_resolver_gives_later_is_used_from_then_on() -> None:
    """A job's row is kept between rounds, but not one that carries a bare uid for want of an
    answer: the directory service that failed once (a timeout) is asked again."""
    answers = iter([KeyError(4242), KeyError(4242), "later"])

    def flaky(uid: int) -> str:
        answer = next(answers, "later")
        if isinstance(answer, Exception):
            raise answer
        return answer

    collector = SlurmJobCollector(ctx(V1), resolve_user=flaky)
    collector._clock = lambda: 100.0  # the job is not walked again past the second round
    users = [by_job(collector.collect())["505"]["user"] for _ in range(4)]
    assert users == ["4242", "4242", "later", "later"]


def test_resolver_answers_are_cached() -> None:
    calls: list[int] = []

    def resolve(uid: int) -> str:
        calls.append(uid)
        return names(uid)

    collector = SlurmJobCollector(ctx(V1), resolve_user=resolve)
    for _ in range(3):
        assert by_job(collector.collect())["505"]["user"] == "user-4242"
    assert calls == [4242]


def test_job_info_is_kept_while_the_job_lives(tmp_path: Path) -> None:
    root = copy_tree(V2, tmp_path)
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    assert by_job(collector.collect())["1001"]["user"] == "alice"
    for pid in (3004, 3005):  # the job's processes exit; the job is still there
        (root / f"proc/{pid}/environ").unlink()
    assert by_job(collector.collect())["1001"]["user"] == "alice"
    # The job ends and a new one with the same id starts: its environment is read afresh.
    job = root / V2_SCOPE / "job_1001"
    job.rename(tmp_path / "away")
    assert "1001" not in by_job(collector.collect())
    (tmp_path / "away").rename(job)
    env = parse_environ((V2 / "proc/3004/environ").read_bytes())
    env["SLURM_JOB_USER"] = "zed"
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    (root / "proc/3004/environ").write_bytes(data)
    assert by_job(collector.collect())["1001"]["user"] == "zed"


def _open_fds() -> int:
    """Descriptors open now, once collectors of earlier tests (their kept files closed when they
    are collected) are gone: otherwise a collection mid-test moves the count."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_files_kept_open_between_rounds_see_every_change(tmp_path: Path) -> None:
    """The cgroup files a job's rows come from stay open between rounds (one pread a round):
    a rewrite, a replaced file, a job that ends, one requeued under its old id and a new one
    are all seen in the round they happen, and an ended job's files are closed."""
    root = copy_tree(V2, tmp_path)
    scope = root / V2_SCOPE
    baseline = _open_fds()
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    for _ in range(2):
        assert by_job(collector.collect()) == V2_EXPECTED
    assert _open_fds() > baseline  # kept open, or this test tests nothing
    # Rewritten in place (what the kernel does) and replaced by a new file.
    (scope / "job_1001/cpu.stat").write_text("usage_usec 8000000000\nuser_usec 1\n")
    replacement = scope / "job_1002/memory.new"
    replacement.write_text("1048576\n")
    os.replace(replacement, scope / "job_1002/memory.current")
    rows = by_job(collector.collect())
    assert rows["1001"]["cpu_seconds"] == 8000.0
    assert rows["1002"]["memory_bytes"] == 1_048_576
    # Job 1003 ends; 1004 is requeued (its cgroup removed and made again, same id); 1006 starts.
    shutil.rmtree(scope / "job_1003")
    shutil.rmtree(scope / "job_1004")
    shutil.copytree(V2 / V2_SCOPE / "job_1004", scope / "job_1004")
    (scope / "job_1004/memory.current").write_text("4096\n")
    shutil.copytree(V2 / V2_SCOPE / "job_1001", scope / "job_1006")
    rows = by_job(collector.collect())
    assert "1003" not in rows
    assert rows["1004"]["memory_bytes"] == 4096
    assert rows["1006"]["cpu_seconds"] == V2_EXPECTED["1001"]["cpu_seconds"]
    # Every job ends: nothing stays open; a job's file going away later is an ended job.
    for job in scope.parent.glob("*slurmstepd.scope/*"):
        if job.is_dir() and job.name != "system":
            shutil.rmtree(job)
    assert by_job(collector.collect()) == {}
    assert _open_fds() == baseline + 1  # the watch of the directories jobs are listed from
    collector.close()
    assert _open_fds() == baseline


def test_a_kept_file_unlinked_in_a_live_job_reads_as_missing(
    tmp_path: Path, warnings: list[str]
) -> None:
    root = copy_tree(V2, tmp_path)
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    assert set(by_job(collector.collect())) == set(V2_EXPECTED)
    (root / V2_SCOPE / "job_1003/memory.current").unlink()  # the controller switched off
    for _ in range(2):
        assert set(by_job(collector.collect())) == set(V2_EXPECTED) - {"1003"}
    assert len(warnings) == 1 and "memory.current" in warnings[0]


def test_kept_files_of_a_watched_job_cost_no_fstat_a_round_and_still_see_every_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a job's directory is watched (inotify), a round asks no kept file whether it was
    unlinked: one read of the watch's queue answers for every directory. A file replaced is
    still read in the next round, however its directory's times were dressed; a job directory
    moved away and another put in its place is read from the new one."""
    root = copy_tree(V2, tmp_path)
    job = root / V2_SCOPE / "job_1001"
    calls = {"fstat": 0}
    real_fstat = os.fstat

    def fstat(fd: int) -> os.stat_result:
        calls["fstat"] += 1
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    for _ in range(3):  # read, then kept and watched, then settled
        assert by_job(collector.collect()) == V2_EXPECTED
    calls.update(fstat=0)
    for _ in range(2):
        assert by_job(collector.collect()) == V2_EXPECTED
    assert calls == {"fstat": 0}, "watched: no fstat a round"
    stamp = os.stat(job)
    replacement = job / "cpu.new"
    replacement.write_text("usage_usec 9000000000\nuser_usec 1\n")
    os.replace(replacement, job / "cpu.stat")
    os.utime(job, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # the old mtime
    assert by_job(collector.collect())["1001"]["cpu_seconds"] == 9000.0
    assert calls["fstat"] == 3, "the changed directory's kept files are asked themselves"
    calls.update(fstat=0)
    assert by_job(collector.collect())["1001"]["cpu_seconds"] == 9000.0
    assert calls == {"fstat": 0}, "settled again"
    # The job's directory moved away (its files still linked there) and a new one in its place.
    os.rename(job, job.with_name("moved"))
    shutil.copytree(V2 / V2_SCOPE / "job_1001", job)
    (job / "memory.current").write_text("8192\n")
    row = by_job(collector.collect())["1001"]
    assert row["memory_bytes"] == 8192
    assert row["cpu_seconds"] == V2_EXPECTED["1001"]["cpu_seconds"]
    collector.close()


def _scandir_counter(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"scandir": 0}
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        calls["scandir"] += 1
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return calls


def test_jobs_are_listed_again_only_when_a_listed_directory_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the directories jobs are listed from are watched, a round lists nothing; a job
    started or ended is seen in the next round all the same."""
    root = copy_tree(V2, tmp_path)
    scope = root / V2_SCOPE
    calls = _scandir_counter(monkeypatch)
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    for _ in range(3):  # listed, then listed under a watch, then known
        assert by_job(collector.collect()) == V2_EXPECTED
    calls.update(scandir=0)
    for _ in range(3):
        assert by_job(collector.collect()) == V2_EXPECTED
    assert calls == {"scandir": 0}, "nothing changed: nothing listed"
    shutil.copytree(V2 / V2_SCOPE / "job_1001", scope / "job_1006")
    assert "1006" in by_job(collector.collect())
    shutil.rmtree(scope / "job_1003")
    assert "1003" not in by_job(collector.collect())
    # A new slurmd scope (a second slurmd on the host) is a new entry of system.slice.
    shutil.copytree(V2 / V2_SCOPE, scope.with_name("n2_slurmstepd.scope"))
    rows = by_job(collector.collect())
    assert rows["1002"]["cpus_allocated"] == 2 * V2_EXPECTED["1002"]["cpus_allocated"]
    collector.close()


def test_jobs_are_listed_again_at_least_every_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the kernel ever not tell of a change, the jobs are listed afresh within
    RELIST_SECONDS anyway, whatever the interval."""
    root = copy_tree(V2, tmp_path)
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    now = [1000.0]
    collector._clock = lambda: now[0]
    for _ in range(3):
        collector.collect()
    monkeypatch.setattr(watch.DirectoryWatch, "changed", lambda self: set())  # told nothing
    shutil.copytree(V2 / V2_SCOPE / "job_1001", root / V2_SCOPE / "job_1006")
    now[0] += slurm.JobListing.RELIST_SECONDS - 1
    assert "1006" not in by_job(collector.collect())
    now[0] += 1
    assert "1006" in by_job(collector.collect())
    collector.close()


def test_a_listing_is_not_trusted_before_its_directories_were_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job made while the jobs are first listed, after its directory was read and before the
    watch began, is in the next round's listing."""
    root = copy_tree(V2, tmp_path)
    real = slurm.list_jobs
    made: list[bool] = []

    def listing(cgroup_root: Path, scanned: list[str] | None = None) -> list[Any]:
        jobs = real(cgroup_root, scanned)
        if not made:
            made.append(True)
            shutil.copytree(V2 / V2_SCOPE / "job_1001", root / V2_SCOPE / "job_1006")
        return jobs

    monkeypatch.setattr(slurm, "list_jobs", listing)
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    assert "1006" not in by_job(collector.collect())
    assert "1006" in by_job(collector.collect())
    collector.close()


def _cpus_after(collector: SlurmJobCollector, now: list[float], seconds: float) -> float:
    now[0] += seconds
    return float(by_job(collector.collect())["1001"]["cpus_allocated"])


def test_a_new_jobs_cpuset_is_read_every_round_until_it_settles(tmp_path: Path) -> None:
    """slurmd writes a job's cpuset just after making its cgroup: a first read sees the parent's
    CPUs (all of them), and the next round must already count the job's own."""
    root = copy_tree(V2, tmp_path)
    job = root / V2_SCOPE / "job_1001"
    (job / "cpuset.cpus.effective").write_text("0-31\n")  # the parent's, before slurmd wrote
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    now = [1000.0]
    collector._clock = lambda: now[0]
    assert _cpus_after(collector, now, 0) == 32.0
    (job / "cpuset.cpus.effective").write_text("0-3\n")
    assert _cpus_after(collector, now, 1) == 4.0
    collector.close()


def test_a_settled_cpuset_is_read_again_within_the_recheck_interval(tmp_path: Path) -> None:
    """Once a job's cpuset read the same for CPUSET_RECHECK_SECONDS it is read that often (it
    holds for the job's life); a change, CPU hotplug say, counts from the next read on."""
    root = copy_tree(V2, tmp_path)
    job = root / V2_SCOPE / "job_1001"
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    now = [1000.0]
    collector._clock = lambda: now[0]
    recheck = slurm.CPUSET_RECHECK_SECONDS
    for _ in range(12):  # a round a second: settled after recheck seconds of the same answer
        assert _cpus_after(collector, now, 1) == 4.0
    (job / "cpuset.cpus.effective").write_text("0-1\n")
    assert _cpus_after(collector, now, 1) == 4.0  # not read: the settled count stands
    assert _cpus_after(collector, now, recheck - 1) == 2.0  # read recheck seconds after the last
    (job / "cpuset.cpus.effective").write_text("0-3\n")
    assert _cpus_after(collector, now, 1) == 4.0  # changed lately: read every round again
    collector.close()


def test_a_requeued_jobs_new_cgroup_has_its_cpuset_read_at_once(tmp_path: Path) -> None:
    """A job requeued onto the same node gets a new cgroup under the same name, maybe with other
    CPUs; its CPU time starting again from 0 tells, and its cpuset is read in that round."""
    root = copy_tree(V2, tmp_path)
    job = root / V2_SCOPE / "job_1001"
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    now = [1000.0]
    collector._clock = lambda: now[0]
    for _ in range(12):
        assert _cpus_after(collector, now, 1) == 4.0
    (job / "cpuset.cpus.effective").write_text("0-7\n")
    (job / "cpu.stat").write_text("usage_usec 1000\nuser_usec 1000\nsystem_usec 0\n")
    assert _cpus_after(collector, now, 1) == 8.0
    collector.close()


def test_a_requeued_jobs_cgroup_made_anew_has_its_cpuset_read_at_once(tmp_path: Path) -> None:
    """A job requeued onto this node gets its cgroup made anew under the same name: its files
    are opened anew, and its cpuset is read in that round, whatever its CPU time says (review
    finding: a job that had used little CPU time passed its old reading within a round)."""
    root = copy_tree(V2, tmp_path)
    job = root / V2_SCOPE / "job_1001"
    (job / "cpu.stat").write_text("usage_usec 200000\nuser_usec 200000\nsystem_usec 0\n")
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    now = [1000.0]
    collector._clock = lambda: now[0]
    for _ in range(12):
        assert _cpus_after(collector, now, 1) == 4.0
    made = tmp_path / "made"
    shutil.copytree(job, made)
    shutil.rmtree(job)
    (made / "cpuset.cpus.effective").write_text("0-7\n")
    (made / "cpu.stat").write_text("usage_usec 500000\nuser_usec 500000\nsystem_usec 0\n")
    made.rename(job)
    assert _cpus_after(collector, now, 1) == 8.0
    collector.close()


def test_a_settled_cpuset_holds_for_a_job_whose_files_are_past_the_kept_limit(
    tmp_path: Path,
) -> None:
    """Past the limit of files kept open, a job's files are opened by name every round; that
    is no requeue, so its settled cpuset is not read every round for it (review finding)."""
    root = copy_tree(V2, tmp_path)
    job = root / V2_SCOPE / "job_1001"
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    collector._files.close()
    collector._files = KeptFiles(limit=0)  # nothing kept: every file opened every round
    now = [1000.0]
    collector._clock = lambda: now[0]
    for _ in range(12):
        assert _cpus_after(collector, now, 1) == 4.0
    (job / "cpuset.cpus.effective").write_text("0-1\n")
    assert _cpus_after(collector, now, 1) == 4.0  # settled: not read within the recheck
    assert _cpus_after(collector, now, slurm.CPUSET_RECHECK_SECONDS - 1) == 2.0
    collector.close()


def _cgroup2_mount() -> Path | None:
    """A cgroup v2 file system this process may make directories in (root on a Linux host)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        point = Path(fields[4])
        if fstype == "cgroup2" and os.access(point, os.W_OK):
            return point
    return None


def test_a_job_directory_made_again_on_cgroupfs_is_listed_from(tmp_path: Path) -> None:
    """On cgroupfs a removed directory's own watch hears nothing: slurmd's scope removed and
    made again (or v1's uid directory, when a user's last job ends and the next starts) must
    still have its new jobs listed the round they appear (review finding: they waited for the
    minute's listing)."""
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("no writable cgroup v2 file system here")
    base = Path(tempfile.mkdtemp(prefix="tally-test-", dir=mount))
    root = tmp_path / "root"
    (root / "sys/fs").mkdir(parents=True)
    (root / "sys/fs/cgroup").symlink_to(base)
    scope = base / "system.slice" / "slurmstepd.scope"
    made = [base / "system.slice", scope, scope / "job_1"]
    try:
        for directory in made:
            directory.mkdir()
        listing = slurm.JobListing(root / "sys/fs/cgroup")
        for _ in range(3):
            assert [j.job_id for j in listing.jobs()] == ["1"]
        (scope / "job_1").rmdir()
        scope.rmdir()
        scope.mkdir()
        (scope / "job_2").mkdir()
        made.append(scope / "job_2")
        assert [j.job_id for j in listing.jobs()] == ["2"]
        (scope / "job_3").mkdir()
        made.append(scope / "job_3")
        assert [j.job_id for j in listing.jobs()] == ["2", "3"]
        (scope / "job_2").rmdir()
        assert [j.job_id for j in listing.jobs()] == ["3"]
        listing.close()
    finally:
        for directory in reversed([base, *made]):
            with contextlib.suppress(OSError):
                directory.rmdir()


def test_jobs_are_listed_every_round_without_inotify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch.DirectoryWatch, "open", classmethod(lambda cls: None))
    root = copy_tree(V2, tmp_path)
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    for _ in range(3):
        assert by_job(collector.collect()) == V2_EXPECTED
    shutil.copytree(V2 / V2_SCOPE / "job_1001", root / V2_SCOPE / "job_1006")
    assert "1006" in by_job(collector.collect())
    collector.close()


def test_kept_files_without_inotify_are_each_asked_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where inotify cannot be had, every kept file is asked whether it was unlinked, every
    round, and a replacement is read in the round it happens."""
    monkeypatch.setattr(watch.DirectoryWatch, "open", classmethod(lambda cls: None))
    root = copy_tree(V2, tmp_path)
    job = root / V2_SCOPE / "job_1001"
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    for _ in range(3):
        assert by_job(collector.collect()) == V2_EXPECTED
    replacement = job / "cpu.new"
    replacement.write_text("usage_usec 9000000000\nuser_usec 1\n")
    os.replace(replacement, job / "cpu.stat")
    assert by_job(collector.collect())["1001"]["cpu_seconds"] == 9000.0
    collector.close()


def test_no_files_kept_past_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "kept_files_limit", lambda: 4)
    root = copy_tree(V2, tmp_path)
    baseline = _open_fds()
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    for _ in range(3):
        assert by_job(collector.collect()) == V2_EXPECTED
    # and the watch of their directories, and that of the directories jobs are listed from
    assert _open_fds() == baseline + 4 + 2
    collector.close()
    assert _open_fds() == baseline


# ---------------------------------------------------------------- jobs that vanish


def test_job_vanishing_between_listing_and_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings: list[str]
) -> None:
    root = copy_tree(V2, tmp_path)
    job = root / V2_SCOPE / "job_1002"
    real = files.read_text

    def read_text(path: Path) -> str:
        if path == job / "cpu.stat":
            shutil.rmtree(job)  # the job ends after listing, mid-way through reading it
        return real(path)

    monkeypatch.setattr(files, "read_text", read_text)
    rows, claims = collect(root, resolve_user=names)
    assert rows == {job: r for job, r in V2_EXPECTED.items() if job != "1002"}
    assert claims == [(3, "2001")]
    assert warnings == []  # a job that ended is no fault


def test_job_vanishing_while_its_processes_are_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_tree(V2, tmp_path)
    job = root / V2_SCOPE / "job_1005"
    real = slurm.read_environ

    def read_environ(path: Path) -> bytes:
        if path.parent.name == "3402":
            shutil.rmtree(job)  # gone before its owner can be looked up
        return real(path)

    monkeypatch.setattr(slurm, "read_environ", read_environ)
    rows, _ = collect(root, resolve_user=names)
    assert set(rows) == set(V2_EXPECTED) - {"1005"}


def test_v1_job_vanishing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_tree(V1, tmp_path)
    rel = Path("sys/fs/cgroup/{}/slurm/uid_1001/job_502")
    real = files.read_text

    def read_text(path: Path) -> str:
        if path.name == "cpuacct.usage" and path.parent.name == "job_502":
            for controller in ("cpuset", "cpuacct", "memory"):
                shutil.rmtree(root / str(rel).format(controller))
        return real(path)

    monkeypatch.setattr(files, "read_text", read_text)
    rows, claims = collect(root, resolve_user=names)
    assert set(rows) == set(V1_EXPECTED) - {"502"}
    assert claims == [(2, "601")]


def test_process_lookup_error_skips_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    real = files.read_text

    def read_text(path: Path) -> str:
        if path.name == "memory.current" and path.parent.name == "job_2001":
            raise ProcessLookupError(3, "No such process")
        return real(path)

    monkeypatch.setattr(files, "read_text", read_text)
    rows, claims = collect(V2, resolve_user=names)
    assert set(rows) == set(V2_EXPECTED) - {"2001"}
    assert claims == [(0, "1002"), (1, "1002")]


def test_missing_file_in_a_live_job_is_logged_once(tmp_path: Path, warnings: list[str]) -> None:
    root = copy_tree(V2, tmp_path)
    (root / V2_SCOPE / "job_1003/memory.current").unlink()  # memory controller not enabled
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    for _ in range(3):
        assert set(by_job(collector.collect())) == set(V2_EXPECTED) - {"1003"}
    assert len(warnings) == 1
    assert "memory.current" in warnings[0]


# ---------------------------------------------------------------- unreadable environments


def test_unreadable_environ_tries_the_next_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    real = slurm.read_environ
    tried: list[str] = []

    def read_environ(path: Path) -> bytes:
        tried.append(path.parent.name)
        if path.parent.name == "3102":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(slurm, "read_environ", read_environ)
    rows, claims = collect(V2, resolve_user=names)
    assert rows["1002"] == V2_EXPECTED["1002"]  # from PID 3103
    assert claims == V2_CLAIMS
    assert tried.index("3102") < tried.index("3103")


def test_no_environ_readable_falls_back_to_the_owner(
    monkeypatch: pytest.MonkeyPatch, warnings: list[str]
) -> None:
    def read_environ(path: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(slurm, "read_environ", read_environ)
    rows, claims = collect(V2, resolve_user=names)
    assert claims == []
    said = [w for w in warnings if "permission denied" in w and "environ" in w]
    assert len(said) == 1, warnings  # said once, not once a process
    # The user is still known: the real uid of the job's task (proc/<pid>/status), else (job
    # 1005, no status) the owner of the job's directory.
    task_uids = {"1001": 1000, "1002": 1001, "1003": 1002, "1004": 1003, "2001": 1004}
    for job, got in rows.items():
        want = dict(V2_EXPECTED[job], account="unknown", account_source=None, gpus_allocated=0.0)
        want["user"] = names(task_uids[job] if job in task_uids else v2_job_uid(job))
        assert got == want, job
    rows1, _ = collect(V1, resolve_user=names)
    assert rows1["502"]["user"] == "user-1001"  # from the uid_1001 directory


def test_hostile_cgroup_procs_are_ignored(tmp_path: Path) -> None:
    root = copy_tree(V2, tmp_path)
    procs = root / V2_SCOPE / "job_1001/step_batch/slurm/cgroup.procs"
    procs.write_text("../../etc\n-5\n0\n٣\n99999999999999999999\n3003\n")
    rows, _ = collect(root, resolve_user=names)
    assert rows["1001"] == V2_EXPECTED["1001"]


# ---------------------------------------------------------------- malformed files


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("cpuset.cpus.effective", "0-3,zz\n"),
        ("cpu.stat", "user_usec 5\n"),
        ("cpu.stat", "usage_usec -4\n"),
        ("memory.current", "max\n"),
        ("memory.current", f"{2**64}\n"),
    ],
)
def test_malformed_cgroup_file_fails_that_job_alone(
    tmp_path: Path, name: str, text: str, warnings: list[str]
) -> None:
    root = copy_tree(V2, tmp_path)
    (root / V2_SCOPE / "job_1003" / name).write_text(text)
    rows, _ = collect(root, resolve_user=names)
    assert rows == {job: r for job, r in V2_EXPECTED.items() if job != "1003"}
    runner = Runner([SlurmJobCollector(ctx(root), resolve_user=names)], clock_ns=lambda: T0)
    rnd = runner.run()
    assert rnd.status["job"].success
    assert sorted(rnd.tables["job"].to_arrow().column("job_id").to_pylist()) == sorted(
        set(V2_EXPECTED) - {"1003"}
    )
    assert any(name in m and "job_1003" in m for m in warnings)


# ---------------------------------------------------------------- parsers: examples


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("4-7,10-11", 6),
        ("4-7,10-11\n", 6),
        ("0", 1),
        ("0-0", 1),
        ("", 0),
        ("\n", 0),
        ("0-3,2-5", 6),
        ("5,5,5", 1),
        ("0-63", 64),
        ("8191", 1),
    ],
)
def test_parse_cpu_list(text: str, count: int) -> None:
    assert parse_cpu_list(text) == count


@pytest.mark.parametrize(
    "text",
    [
        "a",
        "3-1",
        "1,,2",
        "-1",
        "1-",
        "1-2-3",
        "٣",
        "1_0",
        " 1, 2",
        "0x1",
        "99999999",
        "1048576",
        ",",
    ],
)
def test_parse_cpu_list_rejects_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_cpu_list(text, "x/cpuset.cpus")


def test_parse_cpu_stat() -> None:
    text = (V2 / V2_SCOPE / "job_1001/cpu.stat").read_text()
    assert parse_cpu_stat_usage_usec(text) == 7_212_345_678
    assert parse_cpu_stat_usage_usec("user_usec 1\nusage_usec 7\n") == 7
    # around the 18 digits that always fit int64, read without a closer look
    for value in [10**18 - 1, 10**18, 2**63 - 1]:
        assert parse_cpu_stat_usage_usec(f"usage_usec {value}\nuser_usec 1\n") == value
    bad_values = ["", "x", "1e3", str(2**63), "9" * 25, "\u0661\u0662"]  # Arabic-Indic digits
    for bad in ["", "usage_usec\n", *[f"usage_usec {value}\n" for value in bad_values]]:
        with pytest.raises(ParseError):
            parse_cpu_stat_usage_usec(bad)


@pytest.mark.parametrize("memory", [str(10**18 - 1), str(10**18), str(2**63 - 1), " 42\n"])
def test_read_cgroup_usage_reads_memory_up_to_int64(tmp_path: Path, memory: str) -> None:
    (tmp_path / "cpu.stat").write_text("usage_usec 5\n")
    (tmp_path / "memory.current").write_text(memory)
    for kept in [None, KeptFiles()]:
        got = read_cgroup_usage(2, tmp_path / "cpu.stat", tmp_path / "memory.current", kept, "j")
        assert got == (5e-6, int(memory))


@pytest.mark.parametrize("memory", [str(2**63), "-1", "\u0661", "1.5", ""])
def test_read_cgroup_usage_rejects_memory_past_int64(tmp_path: Path, memory: str) -> None:
    (tmp_path / "cpu.stat").write_text("usage_usec 5\n")
    (tmp_path / "memory.current").write_text(memory)
    with pytest.raises(ParseError):
        read_cgroup_usage(2, tmp_path / "cpu.stat", tmp_path / "memory.current")


def test_parse_environ() -> None:
    data = b"A=1\0B=x=y\0no-equals\0=anon\0A=2\0EMPTY=\0BAD=\xff\xfe\0LONG=" + b"z" * 5000 + b"\0\0"
    assert parse_environ(data) == {
        "A": "1",
        "B": "x=y",
        "EMPTY": "",
        "BAD": "\ufffd\ufffd",
        "LONG": "z" * MAX_VALUE_CHARS,
    }
    assert parse_environ(b"") == {}
    assert parse_environ(b"\0\0\0") == {}


@pytest.mark.parametrize(
    ("text", "job"),
    [
        (
            "12:memory:/slurm/uid_1000/job_123/step_0/task_0\n"
            "11:cpuset:/slurm/uid_1000/job_123/step_0\n"
            "4:cpu,cpuacct:/slurm/uid_1000/job_123/step_0/task_0\n"
            "1:name=systemd:/system.slice/slurmd.service\n",
            "123",
        ),
        ("4:cpuacct:/slurm/uid_1000/job_123/step_0", "123"),
        ("0::/system.slice/slurmstepd.scope/job_123/step_0/user/task_0\n", "123"),
        ("0::/system.slice/node07_slurmstepd.scope/job_9/step_batch/user/task_0", "9"),
        ("0::/system.slice/slurmstepd.scope/job_77", "77"),
        ("5:memory:/slurm_node07/uid_0/job_5/step_extern", "5"),
        ("1:name=systemd:/user.slice\n0::/system.slice/slurmstepd.scope/job_5/step_0", "5"),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
        ("0::/system.slice/docker-abc.scope/job_5", None),
        ("0::/system.slice/slurmstepd.scope/system", None),
        ("0::/system.slice/slurmstepd.scope/job_12x/step_0", None),
        ("4:cpuacct:/myslurm/uid_1/job_2", None),
        ("0::/slurm/job_4", None),
        ("", None),
        ("garbage without colons /slurm/uid_1/job_2", None),
    ],
)
def test_job_id_from_cgroup(text: str, job: str | None) -> None:
    assert job_id_from_cgroup(text) == job


def test_job_id_from_the_fixture_cgroup_file() -> None:
    assert job_id_from_cgroup((V2 / "proc/3402/cgroup").read_text()) == "1005"


@pytest.mark.parametrize(
    ("env", "gpus", "claims"),
    [
        ({}, 0, ()),
        ({"SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0"}, 2, (0, 1)),
        ({"SLURM_JOB_GPUS": "3"}, 1, (3,)),
        ({"SLURM_JOB_GPUS": "1,1,2"}, 2, (1, 2)),
        ({"SLURM_JOB_GPUS": "", "CUDA_VISIBLE_DEVICES": "0,1,2"}, 3, ()),
        ({"SLURM_JOB_GPUS": "0,99999,x"}, 3, (0,)),
        ({"CUDA_VISIBLE_DEVICES": "GPU-a,MIG-b"}, 2, ()),
        ({"CUDA_VISIBLE_DEVICES": ""}, 0, ()),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 0, ()),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, 0, ()),
        ({"CUDA_VISIBLE_DEVICES": "0,-1,1"}, 1, ()),
    ],
)
def test_gpus_from_environ(env: dict[str, str], gpus: int, claims: tuple[int, ...]) -> None:
    assert gpus_from_environ(env) == (gpus, claims)


# ---------------------------------------------------------------- parsers: properties

_spans = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(spans=_spans)
def test_property_cpu_list_counts_distinct_cpus(spans: list[tuple[int, int]]) -> None:
    text = ",".join(f"{a}" if n == 0 else f"{a}-{a + n}" for a, n in spans)
    assert parse_cpu_list(text) == len({c for a, n in spans for c in range(a, a + n + 1)})


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(st.text(), st.text(alphabet="0123456789-, \n\t٣")))
@example(text="9" * 5000)
@example(text="0-" + "9" * 5000)
@example(text="1048575")
def test_fuzz_cpu_list(text: str) -> None:
    try:
        count = parse_cpu_list(text)
    except ParseError:
        return
    assert 0 <= count <= 1 << 20


# codec="utf-8": no lone surrogates, which no decoded environment can hold.
_names = st.text(st.characters(codec="utf-8", exclude_characters="\0="), min_size=1, max_size=20)
_values = st.text(st.characters(codec="utf-8", exclude_characters="\0"))


@settings(max_examples=300, deadline=None)
@given(env=st.dictionaries(_names, _values))
@example(env={"SLURM_JOB_USER": "ü" * 2000})
def test_property_environ_round_trip(env: dict[str, str]) -> None:
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    assert parse_environ(data) == {k: v[:MAX_VALUE_CHARS] for k, v in env.items()}


@settings(max_examples=500, deadline=None)
@given(data=st.one_of(st.binary(), st.lists(st.binary(max_size=40)).map(b"\0".join)))
@example(data=b"A=" + b"\xff" * 5000)
@example(data=b"=\0=\0==\0")
def test_fuzz_environ(data: bytes) -> None:
    env = parse_environ(data)
    for key, value in env.items():
        assert key and len(key) <= MAX_VALUE_CHARS and len(value) <= MAX_VALUE_CHARS
        key.encode("utf-8")  # no lone surrogates: Arrow and Parquet take it
        value.encode("utf-8")
        assert "\0" not in key + value and "=" not in key
    gpus, claims = gpus_from_environ(env)
    assert gpus >= 0 and all(0 <= i < 2**15 for i in claims)


_component = st.one_of(
    st.sampled_from(
        [
            "slurm",
            "slurm_n1",
            "uid_0",
            "uid_1000",
            "job_1",
            "job_42",
            "step_0",
            "user",
            "task_0",
            "slurmstepd.scope",
            "n7_slurmstepd.scope",
            "system.slice",
            "job_",
            "",
        ]
    ),
    st.text(max_size=8),
)
_cgroup_line = st.builds(
    lambda n, ctl, parts: f"{n}:{ctl}:/" + "/".join(parts),
    st.integers(0, 13),
    st.sampled_from(["", "cpuacct", "memory", "name=systemd", "cpu,cpuacct"]),
    st.lists(_component, max_size=7),
)


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(st.text(), st.lists(st.one_of(_cgroup_line, st.text())).map("\n".join)))
def test_fuzz_job_id_from_cgroup(text: str) -> None:
    job = job_id_from_cgroup(text)
    assert job is None or (job.isascii() and job.isdigit())


@settings(max_examples=200, deadline=None)
@given(
    job=st.integers(0, 10**12),
    scope=st.sampled_from(["slurmstepd.scope", "n7_slurmstepd.scope"]),
    rest=st.lists(st.sampled_from(["step_0", "step_batch", "user", "task_0", "slurm"])),
)
def test_property_job_id_from_v2_path(job: int, scope: str, rest: list[str]) -> None:
    path = "/".join(["", "system.slice", scope, f"job_{job}", *rest])
    assert job_id_from_cgroup(f"0::{path}\n") == str(job)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user=st.binary(max_size=2000), account=st.binary(max_size=2000))
def test_fuzz_hostile_environ_through_the_collector(user: bytes, account: bytes) -> None:
    user = user.replace(b"\0", b"")
    account = account.replace(b"\0", b"")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        job = root / "sys/fs/cgroup/system.slice/slurmstepd.scope/job_7"
        (job / "step_0/user/task_0").mkdir(parents=True)
        (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpuset cpu memory\n")
        (job / "cpuset.cpus.effective").write_text("0\n")
        (job / "cpu.stat").write_text("usage_usec 1\n")
        (job / "memory.current").write_text("1\n")
        (job / "step_0/user/task_0/cgroup.procs").write_text("11\n")
        (root / "proc/11").mkdir(parents=True)
        (root / "proc/11/status").write_text("Name:\tx\nUid:\t4242\t4242\t4242\t4242\n")
        (root / "proc/11/environ").write_bytes(
            b"SLURM_JOB_ID=7\0SLURM_JOB_UID=4242\0SLURM_JOB_USER="
            + user
            + b"\0SLURM_JOB_ACCOUNT="
            + account
            + b"\0"
        )
        out = SlurmJobCollector(ctx(root), resolve_user=names).collect()
    [got] = out["job"]
    want_user = user.decode("utf-8", errors="replace")[:MAX_VALUE_CHARS]
    want_account = account.decode("utf-8", errors="replace")[:MAX_VALUE_CHARS] or "unknown"
    assert got["user"] == (want_user or names(4242))
    # user and account come together from an environment that names the user
    assert got["account"] == (want_account if want_user else "unknown")
    check_rows({"job": out["job"]})
    tables, _ = assemble({"job": out["job"]}, T0, "n1")
    assert tables["job"].num_rows == 1
    assert isinstance(tables["job"].to_arrow(), pa.Table)


def _walked_collector(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[SlurmJobCollector, list[str], list[float]]:
    """A collector on ``root`` whose clock is ``now[0]`` (monotonic seconds), and the job
    directories it walks for their processes, one entry a walk."""
    walks: list[str] = []
    real = slurm.job_processes

    def job_processes(procs_dir: Path) -> list[tuple[int, int]]:
        walks.append(procs_dir.name)
        return real(procs_dir)

    monkeypatch.setattr(slurm, "job_processes", job_processes)
    now = [100.0]
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    collector._clock = lambda: now[0]
    return collector, walks, now


def test_a_search_that_found_nothing_new_waits_before_walking_the_job_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job 1003 has no batch step on this node and only CUDA_VISIBLE_DEVICES tells of its GPUs:
    its search never completes. Walking its cgroup every round for processes already read was
    most of a round's cost; after a fruitless walk the next waits (1 s, doubling), and a process
    that appeared meanwhile is still read then."""
    root = copy_tree(V2, tmp_path)
    c, walks, now = _walked_collector(root, monkeypatch)
    first = by_job(c.collect())["1003"]
    assert (first["user"], first["gpus_allocated"]) == ("carol", 2.0)
    c.collect()  # nothing new: the wait starts
    assert walks.count("job_1003") == 2
    step = root / V2_SCOPE / "job_1003" / "step_1" / "user" / "task_0"
    step.mkdir(parents=True)
    (step / "cgroup.procs").write_text("3206\n")
    (root / "proc" / "3206").mkdir()
    env = (root / "proc" / "3202" / "environ").read_bytes() + b"SLURM_STEP_GPUS=0,1,2\0"
    (root / "proc" / "3206" / "environ").write_bytes(env)
    assert by_job(c.collect())["1003"]["gpus_allocated"] == 2.0  # waiting: not walked
    assert walks.count("job_1003") == 2
    now[0] += 1.0
    assert by_job(c.collect())["1003"]["gpus_allocated"] == 3.0  # walked: PID 3206 read
    assert walks.count("job_1003") == 3


def test_a_batch_child_that_kept_only_cuda_visible_devices_does_not_end_the_search(
    tmp_path: Path,
) -> None:
    """A child of the batch script read first, whose environment lost SLURM_JOB_GPUS but
    kept CUDA_VISIBLE_DEVICES, says too little: the script's own environment is still read
    and names the job's GPUs (review finding: the search ended on the child)."""
    root = copy_tree(V2, tmp_path)
    task = root / V2_SCOPE / "job_1001" / "step_batch" / "user" / "task_0" / "cgroup.procs"
    task.write_text("3006\n3004\n")
    script = (root / "proc" / "3004" / "environ").read_bytes()
    shutil.copytree(root / "proc" / "3004", root / "proc" / "3006")  # its status: the uid
    (root / "proc" / "3006" / "environ").write_bytes(script + b"CUDA_VISIBLE_DEVICES=0\0")
    (root / "proc" / "3004" / "environ").write_bytes(script + b"SLURM_JOB_GPUS=0,1\0")
    rows, claims = collect(root, resolve_user=names)
    assert rows["1001"]["gpus_allocated"] == 2.0
    assert (0, "1001") in claims and (1, "1001") in claims


def test_the_batch_environment_ends_a_cpu_only_jobs_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job 1001 is CPU-only and its batch script runs here: Slurm would have put SLURM_JOB_GPUS
    in that environment had the job any GPUs on this node, so once it is read the job is not
    walked again, however long it runs (a process naming GPUs later is not believed)."""
    root = copy_tree(V2, tmp_path)
    c, walks, now = _walked_collector(root, monkeypatch)
    first = by_job(c.collect())["1001"]
    assert (first["user"], first["account"], first["gpus_allocated"]) == ("alice", "physics", 0.0)
    task = root / V2_SCOPE / "job_1001" / "step_batch" / "user" / "task_0" / "cgroup.procs"
    task.write_text("3004\n3005\n3006\n")
    (root / "proc" / "3006").mkdir()
    env = (root / "proc" / "3004" / "environ").read_bytes() + b"SLURM_JOB_GPUS=0,1\0"
    (root / "proc" / "3006" / "environ").write_bytes(env)
    for _ in range(5):
        now[0] += 60.0
        assert by_job(c.collect())["1001"] == first
    assert walks.count("job_1001") == 1
    assert walks.count("job_1003") > 1  # no batch step here: still searched


@pytest.mark.parametrize(("src", "settled"), [(V2, False), (V2, True), (V1, False)])
def test_rounds_read_as_planned_read_as_job_by_job(
    tmp_path: Path, src: Path, settled: bool
) -> None:
    """Jobs with nothing new to find are read as the plan laid them out (cgroup v2): the same
    rows, claims and failures as read job by job, round after round while the jobs change;
    many job rows are read that way, and none on cgroup v1. ``settled``: without the jobs whose
    search never ends (1003: no batch step here; 1005: no process), so that whole rounds are
    read as planned too."""
    root = copy_tree(src, tmp_path)
    if settled:
        for job in ("1003", "1005"):
            shutil.rmtree(root / V2_SCOPE / f"job_{job}")
    seen = planned_rounds_read_as_job_by_job(
        lambda: SlurmJobCollector(ctx(root), resolve_user=names)
    )
    if src == V1:
        assert (sum(seen.rows), sum(seen.whole)) == (0, 0)
    else:
        assert sum(seen.rows) > 40, seen.rows
        assert (sum(seen.whole) > 10) if settled else not any(seen.whole), seen.whole


def test_jobs_started_apart_are_read_as_planned_every_round_once_settled(tmp_path: Path) -> None:
    """Jobs that started in different rounds have their cpusets fall due in different rounds:
    each is read again within the plan, which holds on, and each job joins the plan once its
    cpuset has read the same for the recheck time. From then on every round is read as a
    whole as planned, with the same output as job by job."""
    root = copy_tree(V2, tmp_path)
    for job in ("1003", "1005"):
        shutil.rmtree(root / V2_SCOPE / f"job_{job}")
    seen = planned_rounds_read_as_job_by_job(
        lambda: SlurmJobCollector(ctx(root), resolve_user=names),
        rounds=60,
        stagger=True,
        quiet=True,
    )
    # the last of the three later jobs appears at round 8, has read the same cpuset for 10 s
    # at round 18 (the plan is made again then, read job by job) and is planned from 19
    settled = 19
    assert all(seen.whole[settled:]), seen.whole
    assert not all(seen.whole[:settled])


@pytest.mark.parametrize("src", [V1, V2])
def test_a_plan_that_cannot_be_made_or_does_not_hold_is_tried_again_only_a_while_later(
    tmp_path: Path, src: Path
) -> None:
    """Looking for a plan costs what a round job by job costs again: where no job can be
    planned (cgroup v1), or a planned job's file always reads otherwise than planned (a
    cpu.stat in CRLF), a plan is looked for once in PLAN_RETRY_SECONDS, not every round; the
    rows are those read job by job all along."""
    root = copy_tree(src, tmp_path)
    if src == V2:
        for job in ("1003", "1005"):
            shutil.rmtree(root / V2_SCOPE / f"job_{job}")
    now = [100.0]
    collector = SlurmJobCollector(ctx(root), resolve_user=names)
    collector._clock = lambda: now[0]  # type: ignore[method-assign]
    made: list[float] = []
    real = collector._make_plan

    def counted(*args: Any) -> Any:
        made.append(now[0])
        return real(*args)

    collector._make_plan = counted  # type: ignore[method-assign]
    for _ in range(12):  # the cpusets settle: a plan, on v2
        collector.collect()
        now[0] += 1.0
    assert (collector._plan is not None) == (src == V2)
    if src == V2:
        stat = root / V2_SCOPE / "job_1001" / "cpu.stat"
        stat.write_text(stat.read_text().replace("\n", "\r\n"))
    made.clear()
    first = collector.collect()
    for _ in range(20):
        now[0] += 1.0
        assert collector.collect() == first  # nothing else changes
    assert 2 <= len(made) <= 1 + 20 / slurm.PLAN_RETRY_SECONDS, made


def settled_pair(tmp_path: Path, start: float = 100.0, rounds: int = 15) -> PlanPair:
    """The v2 tree without the jobs whose search never ends, ``rounds`` rounds on: every job
    planned, whole rounds read as planned."""
    root = copy_tree(V2, tmp_path)
    for job in ("1003", "1005"):
        shutil.rmtree(root / V2_SCOPE / f"job_{job}")
    pair = PlanPair(lambda: SlurmJobCollector(ctx(root), resolve_user=names), start)
    pair.round(0.0)
    for _ in range(rounds):
        pair.round()
    assert pair.log[-1][2], pair.log
    pair.log.clear()
    pair.made.clear()
    return pair


def test_a_planned_cpuset_falls_due_as_job_by_job_tells_it_to_the_last_bit(
    tmp_path: Path,
) -> None:
    """A planned job's cpuset is read again when ``now - read_at`` reaches the recheck time,
    as job by job reads it: ``read_at + 10`` can be a float an ulp away (128.2 - 118.2 <
    10). A cpuset changed then shows in the same round both ways."""
    pair = settled_pair(tmp_path, start=109.2, rounds=14)
    job = next(j for j in list_jobs(pair.root / "sys/fs/cgroup") if j.job_id == "1001")
    read_at = pair.each._cpusets[job.key][1]
    due = read_at + slurm.CPUSET_RECHECK_SECONDS
    assert due - read_at < slurm.CPUSET_RECHECK_SECONDS  # the fixture's clock meets the ulp
    while pair.now[0] + 1.0 < due:
        pair.round()
    pair.round(at=due)  # at read_at + 10 as a float: not due by subtraction, nothing read
    job.cpus_files[0].write_text("0-7\n")  # CPU hotplug
    for _ in range(12):
        pair.round()  # each round the same both ways
    assert by_job(pair.round())["1001"]["cpus_allocated"] == 8.0


def test_a_job_that_starts_or_whose_steps_change_joins_the_plan_again_soon(
    tmp_path: Path,
) -> None:
    """A job that starts joins the plan once its cpuset has read the same for the recheck
    time, not at the listing's next minute; a step starting in a job takes that job alone out
    of the plan (the other jobs stay planned), and it joins again PLAN_RETRY_SECONDS on."""
    pair = settled_pair(tmp_path)
    job, aside = pair.root / V2_SCOPE / "job_1001", pair.root / V2_SCOPE.parent / "aside"
    job.rename(aside)
    for _ in range(70):
        pair.round()
    pair.log.clear()
    aside.rename(job)  # a job starts
    for _ in range(30):
        pair.round()
    whole = [w for _, _, w in pair.log]
    assert whole.index(True) <= slurm.CPUSET_RECHECK_SECONDS + 2, pair.log
    pair.log.clear()
    (job / "step_0").mkdir()  # a step starts
    for _ in range(20):
        pair.round()
    rows = [n for n, _, _ in pair.log]
    whole = [w for _, _, w in pair.log]
    assert min(rows) == 3, pair.log  # the other three jobs, every round
    assert whole.index(True) <= slurm.PLAN_RETRY_SECONDS + 2, pair.log
    assert all(whole[whole.index(True) :]), pair.log


def test_steps_coming_and_going_every_round_keep_only_their_job_out_of_the_plan(
    tmp_path: Path,
) -> None:
    """An srun loop: a step made and the one before removed every round in one job. The other
    jobs are read as planned every round, and a plan is looked for once in PLAN_RETRY_SECONDS
    at most."""
    pair = settled_pair(tmp_path)
    job = pair.root / V2_SCOPE / "job_1001"
    for n in range(30):
        (job / f"step_{n}").mkdir()
        if n:
            (job / f"step_{n - 1}").rmdir()
        pair.round()
    assert [n for n, _, _ in pair.log] == [3] * 30, pair.log
    assert len(pair.made) <= 1 + 30 / slurm.PLAN_RETRY_SECONDS, pair.made


def test_a_counter_too_long_for_the_plan_keeps_its_job_out_of_it(tmp_path: Path) -> None:
    """memory.current of 19 digits (an int64 still, read job by job): the job is not planned
    (the plan reads 18 digits at most), the other jobs are, and the plan is not made again
    round after round."""
    pair = settled_pair(tmp_path)
    memory = pair.root / V2_SCOPE / "job_1001" / "memory.current"
    grow = pair.grow

    def grow_big() -> None:
        grow()
        memory.write_text("1000000000000000000\n")

    pair.grow = grow_big  # type: ignore[method-assign]
    for _ in range(20):
        out = pair.round()
    assert by_job(out)["1001"]["memory_bytes"] == 10**18
    assert sum(pair.made) <= 2, pair.made
    # its file read otherwise than planned: a plan again PLAN_RETRY_SECONDS on, without it
    assert [n for n, _, _ in pair.log[-12:]] == [3] * 12, pair.log


def test_files_misshapen_only_together_are_not_read_as_planned(tmp_path: Path) -> None:
    """The plan reads every job's files in one go, each after a NUL: a memory.current without
    its newline beside one of two lines (which joined would make two good lines), one with
    more after its number's line, a cpu.stat with a NUL of its own ahead of a second usage
    line, alone or beside a cpu.stat without one (the count of lines would match), is seen as
    misshapen as job by job sees it; the round is read job by job, and the files mended, as
    planned again."""
    pair = settled_pair(tmp_path)
    plan = pair.planned._plan
    assert plan is not None
    first, second = plan.planned[:2]  # read one after the other
    grow = pair.grow

    def memory_misshapen() -> None:
        grow()
        first.memory_file.write_text(f"{pair.k}")
        second.memory_file.write_text("3\n4\n")

    def memory_trailing() -> None:
        grow()
        first.memory_file.write_text(f"{pair.k}\nxyz")  # a number, then more than its newline

    def usage_misshapen() -> None:
        grow()
        first.usage_file.write_text(f"usage_usec {10**6 * pair.k}\n\0usage_usec 5\n")

    def usage_lent() -> None:
        grow()  # the second file has no usage line; the first a NUL and another: one each
        lent = 10**17  # ahead of the second job's CPU time: no going back gives it away
        first.usage_file.write_text(f"usage_usec {10**6 * pair.k}\n\0usage_usec {lent}\n")
        second.usage_file.write_text("bogus\n")

    for misshapen in (memory_misshapen, memory_trailing, usage_misshapen, usage_lent):
        pair.grow = misshapen  # type: ignore[method-assign]
        pair.log.clear()
        pair.round()
        assert [n for n, _, _ in pair.log] == [0], pair.log
        pair.grow = grow  # type: ignore[method-assign]
        for _ in range(int(slurm.PLAN_RETRY_SECONDS) + 2):
            pair.round()
        assert pair.log[-1] == (len(plan.planned), len(plan.planned), True), pair.log


def test_whole_rounds_as_planned_give_their_checked_columns_but_never_unchecked_values(
    tmp_path: Path,
) -> None:
    """A round of every job as planned gives the rows with their columns (CheckedRows), which
    check_rows takes as they are; a plan whose rows hold a value check_rows refuses (a user
    name no UTF-8 can hold) never does, so that the collector fails each round as job by job
    rather than passing the value on."""
    pair = settled_pair(tmp_path)
    out = pair.round()
    assert isinstance(out["job"], CheckedRows)
    assert check_rows(out)["job"] is out["job"].columns

    root = copy_tree(V2, tmp_path / "bad")
    for job in ("1003", "1005"):
        shutil.rmtree(root / V2_SCOPE / f"job_{job}")

    def make() -> SlurmJobCollector:
        collector = SlurmJobCollector(ctx(root), resolve_user=names)
        real = collector._job_info

        def job_info(job: Any, info_dir_ok: bool) -> Any:
            info = real(job, info_dir_ok)
            bad = dataclasses.replace(info, user="\udcff")
            search = collector._search[job.key]
            if search.info is info:  # kept as the job's, as a name read would be
                search.info = bad
            return bad

        collector._job_info = job_info  # type: ignore[method-assign]
        return collector

    bad = PlanPair(make)
    for _ in range(20):
        out = bad.round()
        assert not isinstance(out["job"], CheckedRows)
        with pytest.raises(ValueError, match="surrogate"):
            check_rows(out)
    assert any(n for n, _, _ in bad.log)  # planned all the same


def test_the_same_jobs_listed_anew_keep_the_plan_which_holding_every_job_is_not_made_again(
    tmp_path: Path,
) -> None:
    """Jobs listed afresh every round (their directories cannot be watched) but the same keep
    the plan: every round is read as planned. A plan that holds every job leaves none to join
    it, so it is not made again each PLAN_REMAKE_SECONDS (nor are the job-info files, read
    again each minute and the same, a reason to read a round job by job)."""
    pair = settled_pair(tmp_path)
    for collector in (pair.planned, pair.each):
        collector._listing.RELIST_SECONDS = 0.0  # type: ignore[misc]
    for _ in range(130):
        pair.round()
    assert all(whole for _, _, whole in pair.log), pair.log
    assert pair.made == [], pair.made


def test_v2_jobs_without_cpuset_or_memory_controllers_are_read_from_their_processes(
    tmp_path: Path, warnings: list[str]
) -> None:
    """A slurmstepd scope whose cgroup.subtree_control enables no cpuset and no memory
    controller for its jobs (systemd before 244 delegates no cpuset; a container may hold
    controllers back) leaves job cgroups with cpu.stat alone: the jobs are listed all the same,
    CPU time from cpu.stat, CPUs from the job's environment (else its affinity), memory from its
    processes, said once; the doctor says it too. Read as planned, the rounds are the same as
    job by job."""
    root = copy_tree(V2, tmp_path)
    scope = root / V2_SCOPE
    (scope / "cgroup.subtree_control").write_text("cpu io pids\n")
    for pattern in ("cpuset.*", "memory.*"):
        for path in scope.rglob(pattern):
            path.unlink()
    proc = root / "proc"
    for pid, pages in ((3003, 1000), (3004, 3000), (3005, 500)):
        (proc / str(pid) / "stat").write_text(_stat(pid, 3003, 100, rss_pages=pages))
    (proc / "3004" / "status").write_text("Name:\trun.sh\nCpus_allowed_list:\t0-3,8\n")
    c = SlurmJobCollector(ctx(root), resolve_user=names)
    rows = by_job(c.collect())
    # every job listed, but 1005: no process of it tells its CPUs (as on cgroup v1)
    assert set(rows) == set(V2_EXPECTED) - {"1005"}
    job = rows["1001"]
    want = V2_EXPECTED["1001"]
    assert job["cpu_seconds"] == want["cpu_seconds"]  # cpu.stat is there whatever is enabled
    assert job["memory_bytes"] == 4500 * os.sysconf("SC_PAGE_SIZE")  # its processes' RSS
    assert job["cpus_allocated"] == 5.0  # no SLURM_CPUS_ON_NODE: its task's affinity
    assert (job["user"], job["account"]) == (want["user"], want["account"])
    assert rows["2001"] == V2_EXPECTED["2001"]  # the other slurmd's scope enables both
    assert by_job(c.collect())["1001"] == job
    said = [w for w in warnings if "cgroup v2" in w]
    assert len(said) == 1 and "no memory/cpuset controller" in said[0], said  # once
    env = (proc / "3004" / "environ").read_bytes()
    (proc / "3004" / "environ").write_bytes(env + b"SLURM_CPUS_ON_NODE=4\0")
    again = by_job(SlurmJobCollector(ctx(root), resolve_user=names).collect())["1001"]
    assert again["cpus_allocated"] == 4.0
    # only the extern step left (its sleep, or an ssh session pam_slurm_adopt put there): its
    # mask is the whole node's, not the job's CPUs, so nothing tells them: left out
    batch = scope / "job_1001" / "step_batch"
    for procs in batch.rglob("cgroup.procs"):
        procs.write_text("")
    (proc / "3002" / "status").write_text("Name:\tsleep\nCpus_allowed_list:\t0-63\n")
    fresh = by_job(SlurmJobCollector(ctx(root), resolve_user=names).collect())
    assert "1001" not in fresh and "1002" in fresh

    from telemetry.config import DaemonConfig
    from telemetry.doctor import check_slurm

    found = check_slurm(DaemonConfig(procfs=proc, sysfs=root / "sys", node="n1"))
    assert found[0].status == "ok"
    assert found[1].status == "warn"
    assert "without the cpuset/memory controller under slurmstepd.scope" in found[1].detail
    assert not any(
        f.status == "warn"
        for f in check_slurm(DaemonConfig(procfs=V2 / "proc", sysfs=V2 / "sys"))
        if "controller" in f.detail
    )


def test_v2_fallback_is_said_once_for_each_slurmd_scope(
    tmp_path: Path, warnings: list[str]
) -> None:
    """Two slurmd on the node, neither scope given a cpuset controller: one line for each,
    however many rounds."""
    root = copy_tree(V2, tmp_path)
    for scope in (root / "sys/fs/cgroup/system.slice").glob("*slurmstepd.scope"):
        (scope / "cgroup.subtree_control").write_text("cpu io memory pids\n")
        for path in scope.rglob("cpuset.*"):
            path.unlink()
    c = SlurmJobCollector(ctx(root), resolve_user=names)
    for _ in range(5):
        c.collect()
    said = sorted(w for w in warnings if "cgroup v2" in w)
    assert len(said) == 2, said
    assert "node07_slurmstepd.scope" in said[0] and " slurmstepd.scope" in said[1]


def test_v2_jobs_without_a_cpuset_controller_are_read_as_planned(tmp_path: Path) -> None:
    """Jobs whose CPUs come from their environment (no cpuset controller) are still read as
    planned, round after round the same as job by job."""
    root = copy_tree(V2, tmp_path)
    scope = root / V2_SCOPE
    (scope / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    for path in scope.rglob("cpuset.*"):
        path.unlink()
    for job in ("1003", "1005"):
        shutil.rmtree(scope / f"job_{job}")
    seen = planned_rounds_read_as_job_by_job(
        lambda: SlurmJobCollector(ctx(root), resolve_user=names), quiet=True
    )
    assert sum(seen.rows) > 40, seen.rows
    assert max(seen.rows) == 4, seen.rows  # 1001, 1002 and 1004 with 2001 of the other scope
