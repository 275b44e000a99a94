"""Who a Slurm job belongs to, from sources the job cannot change.

The tree ``fixtures/slurm_trust`` (see its README) is a cgroup v2 host with two slurmd; expected
values are worked out by hand from its files. Every test here failed on the collector that took
user, account and GPUs from the first environment with any ``SLURM_JOB_*`` variable.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from telemetry.collectors import CollectorContext, Runner, jobinfo, slurm, watch
from telemetry.collectors.attribution import attribute_gpus, job_id_from_cgroup
from telemetry.collectors.jobinfo import parse_job_info
from telemetry.collectors.slurm import (
    SlurmJobCollector,
    cgroup_version,
    gpu_evidence,
    list_jobs,
    parse_passwd,
    parse_status_uid,
)
from telemetry.errors import ParseError
from telemetry.logs import OnceLogger
from telemetry.schema import JOB_SCHEMA
from tests.support.cli import tally
from tests.support.job_rounds import planned_rounds_read_as_job_by_job
from tests.support.tables import cpu_table, write_dataset

TREE = Path(__file__).resolve().parent / "fixtures" / "slurm_trust"
SCOPE0 = Path("sys/fs/cgroup/system.slice/node0_slurmstepd.scope")
SCOPE1 = Path("sys/fs/cgroup/system.slice/node1_slurmstepd.scope")
INFO = Path("run/tally/jobs")
T0 = 1_788_220_800_000_000_000
ME = os.getuid()


def row(user: str, account: str, source: str | None, cpus: float, gpus: float, seconds: float,
        memory: int) -> dict[str, Any]:  # fmt: skip
    return {
        "user": user,
        "account": account,
        "account_source": source,
        "cpus_allocated": cpus,
        "gpus_allocated": gpus,
        "cpu_seconds": seconds,
        "memory_bytes": memory,
    }


EXPECTED = {
    # node0 cpuset 0-1 + node1 cpuset 2-3; 3600 s + 1800 s; 1 GiB + 512 MiB
    "1009248": row("testusr", "testacc", "environment", 4.0, 0.0, 5400.0, 1_610_612_736),
    # PID 4301's environment is job 1009248's: not this job's; PID 4302's is
    "1009250": row("testusr2", "testacc2", "environment", 2.0, 1.0, 120.0, 268_435_456),
    # only SLURM_STEP_GPUS=0
    "1009249": row("testusr", "testacc", "environment", 2.0, 1.0, 60.0, 134_217_728),
    # SLURM_JOB_ACCOUNT=bank-y in its environment; the prolog's file says research-lab
    "1009251": row("mallory", "research-lab", "job-info", 1.0, 0.0, 30.0, 67_108_864),
    # cgroup named by the SLUID sEKNKTV3WPV500
    "1009252": row("testusr", "testacc", "environment", 1.0, 0.0, 5.0, 33_554_432),
}
CLAIMS = [(0, "1009249"), (1, "1009250")]


def copy_tree(tmp_path: Path) -> Path:
    """A copy of the tree with the modes a prolog gives (git keeps no modes)."""
    root = tmp_path / "node"
    shutil.copytree(TREE, root)
    (root / INFO).chmod(0o755)
    for path in (root / INFO).iterdir():
        path.chmod(0o644)
    return root


def ctx(root: Path, rootfs: Path | None = None) -> CollectorContext:
    return CollectorContext(
        procfs=root / "proc",
        sysfs=root / "sys",
        node="n1",
        rootfs=rootfs or root,
        slurm_job_info_dir=root / INFO,
    )


def collector(root: Path, **kwargs: Any) -> SlurmJobCollector:
    kwargs.setdefault("job_info_owner", ME)
    return SlurmJobCollector(ctx(root), **kwargs)


def by_job(out: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    rows = {r["job_id"]: {k: v for k, v in r.items() if k != "job_id"} for r in out["job"]}
    assert len(rows) == len(out["job"]), "a job id appears twice"
    return rows


def claims_of(out: dict[str, list[dict[str, Any]]]) -> list[tuple[int, str]]:
    return sorted((c["gpu_index"], c["job_id"]) for c in out["_gpu_job"])


def set_environ(root: Path, pid: int, **changes: str | None) -> None:
    """Rewrite a fixture process's environment: set or (None) remove variables."""
    path = root / "proc" / str(pid) / "environ"
    env = slurm.parse_environ(path.read_bytes())
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    path.write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))


def set_uid(root: Path, pid: int, uid: int) -> None:
    path = root / "proc" / str(pid) / "status"
    lines = [
        f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" if line.startswith("Uid:") else line
        for line in path.read_text().splitlines()
    ]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- the whole tree


def test_the_tree(tmp_path: Path) -> None:
    out = collector(copy_tree(tmp_path)).collect()
    assert by_job(out) == EXPECTED
    assert claims_of(out) == CLAIMS
    assert out["_job_alias"] == [{"cgroup": "sEKNKTV3WPV500", "job_id": "1009252"}]


def test_rows_fit_the_job_table(tmp_path: Path) -> None:
    runner = Runner([collector(copy_tree(tmp_path))], clock_ns=lambda: T0)
    rnd = runner.run()
    assert rnd.status["job"].success, rnd.status["job"].error
    table = rnd.tables["job"].to_arrow()
    assert table.schema == JOB_SCHEMA
    sources = dict(
        zip(
            table.column("job_id").to_pylist(),
            table.column("account_source").to_pylist(),
            strict=True,
        )
    )
    assert sources["1009251"] == "job-info" and sources["1009248"] == "environment"


# ---------------------------------------------------------------- identity from the right job


def test_another_jobs_environment_is_not_taken(tmp_path: Path) -> None:
    out = collector(copy_tree(tmp_path)).collect()
    got = by_job(out)["1009250"]
    assert (got["user"], got["account"], got["gpus_allocated"]) == ("testusr2", "testacc2", 1.0)
    assert all(index not in (2, 3) for index, _ in claims_of(out))


def test_two_slurmd_on_one_host_add_up(tmp_path: Path) -> None:
    got = by_job(collector(copy_tree(tmp_path)).collect())["1009248"]
    assert got["cpus_allocated"] == 4.0
    assert got["cpu_seconds"] == 5400.0
    assert got["memory_bytes"] == 1_610_612_736


def test_jobs_are_kept_per_scope(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    jobs = list_jobs(root / "sys/fs/cgroup")
    keys = sorted(job.key for job in jobs)
    assert ("node0_slurmstepd.scope", "1009248") in keys
    assert ("node1_slurmstepd.scope", "1009248") in keys
    assert len(keys) == len(set(keys)) == 6


def test_v1_job_under_two_slurmd(tmp_path: Path) -> None:
    root = tmp_path / "v1"
    shutil.copytree(TREE.parent / "slurm_v1", root)
    for controller in ("cpuset", "cpuacct", "memory"):
        base = root / "sys/fs/cgroup" / controller
        shutil.copytree(base / "slurm_node07", base / "slurm_node08")
    out = SlurmJobCollector(CollectorContext(root / "proc", root / "sys", "n1"),
                            resolve_user=str).collect()  # fmt: skip
    got = by_job(out)["601"]
    assert got["cpus_allocated"] == 8.0  # 12-15 under each slurmd
    assert got["cpu_seconds"] == 120.0
    assert got["user"] == "dave"


def test_step_gpus_when_the_job_has_no_job_gpus(tmp_path: Path) -> None:
    out = collector(copy_tree(tmp_path)).collect()
    assert by_job(out)["1009249"]["gpus_allocated"] == 1.0
    assert (0, "1009249") in claims_of(out)


@pytest.mark.parametrize(
    ("env", "evidence"),
    [
        (
            {"SLURM_JOB_GPUS": "0,1", "SLURM_STEP_GPUS": "1", "CUDA_VISIBLE_DEVICES": "0"},
            (3, 2, (0, 1)),
        ),
        ({"SLURM_STEP_GPUS": "2", "CUDA_VISIBLE_DEVICES": "0"}, (2, 1, (2,))),
        ({"SLURM_JOB_GPUS": "", "SLURM_STEP_GPUS": "3"}, (2, 1, (3,))),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, (1, 2, ())),
        ({}, (0, 0, ())),
    ],
)
def test_gpu_evidence_order(
    env: dict[str, str], evidence: tuple[int, int, tuple[int, ...]]
) -> None:
    assert gpu_evidence(env) == evidence


def test_user_and_account_come_from_one_environment(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    # The batch script's first process dropped SLURM_JOB_USER but kept a forged account; the
    # second is the job's own.
    (root / SCOPE0 / "job_1009250/step_batch/user/task_0/cgroup.procs").write_text(
        "4301\n4303\n4302\n"
    )
    shutil.copytree(root / "proc/4302", root / "proc/4303")
    set_environ(root, 4303, SLURM_JOB_USER=None, SLURM_JOB_ACCOUNT="bank-y")
    got = by_job(collector(root).collect())["1009250"]
    assert (got["user"], got["account"]) == ("testusr2", "testacc2")


def test_search_goes_on_over_rounds_until_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_tree(tmp_path)
    monkeypatch.setattr(slurm, "_MAX_PIDS_PER_JOB", 1)
    read: list[str] = []
    real = slurm.read_environ

    def read_environ(path: Path) -> bytes:
        read.append(path.parent.name)
        return real(path)

    monkeypatch.setattr(slurm, "read_environ", read_environ)
    c = collector(root)
    first = by_job(c.collect())["1009250"]  # only PID 4301 (job 1009248's environment) read
    assert (first["account"], first["account_source"], first["gpus_allocated"]) == (
        "unknown",
        None,
        0.0,
    )
    second = by_job(c.collect())["1009250"]  # PID 4302
    assert (second["user"], second["account"], second["gpus_allocated"]) == (
        "testusr2",
        "testacc2",
        1.0,
    )
    read.clear()
    by_job(c.collect())
    assert "4302" not in read and "4301" not in read  # complete jobs are not searched again


def test_a_forged_user_name_is_not_believed(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    (root / INFO / "1009251").unlink()
    set_environ(root, 4501, SLURM_JOB_USER="root", SLURM_JOB_UID="0")
    got = by_job(collector(root).collect())["1009251"]
    assert got["user"] == "mallory"  # uid 2003 of its process, named by the passwd file
    set_uid(root, 4501, 4321)  # a uid the passwd file does not know
    assert by_job(collector(root).collect())["1009251"]["user"] == "4321"


def test_user_named_by_the_environment_when_the_uid_matches(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    got = by_job(collector(root).collect())
    assert got["1009250"]["user"] == "testusr2"  # SLURM_JOB_UID 2002 is the real uid
    set_uid(root, 4302, 2010)
    set_uid(root, 4301, 2010)
    assert by_job(collector(root).collect())["1009250"]["user"] == "2010"


def test_uid_from_the_job_info_when_no_task_is_readable(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    (root / "proc/4501/status").unlink()
    assert by_job(collector(root).collect())["1009251"]["user"] == "mallory"


def test_slurmstepd_is_not_the_jobs_owner(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    for pid in (4101, 4201):
        (root / "proc" / str(pid) / "environ").unlink()
    got = by_job(collector(root).collect())["1009248"]
    assert got["user"] == "testusr"  # uid 2001 of the task, not slurmstepd's 0
    assert (got["account"], got["account_source"]) == ("unknown", None)


def test_sluid_named_job_without_environment_keeps_its_sluid(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    (root / "proc/4601/environ").unlink()
    out = collector(root).collect()
    assert "sEKNKTV3WPV500" in by_job(out)
    assert out["_job_alias"] == []


def test_sluid_named_job_from_its_job_info(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    (root / "proc/4601/environ").unlink()
    (root / INFO / "sEKNKTV3WPV500").write_text(
        "job_id=1009252\nsluid=sEKNKTV3WPV500\nuid=2001\nuser=testusr\naccount=testacc\ngpus=\n"
    )
    (root / INFO / "sEKNKTV3WPV500").chmod(0o644)
    out = collector(root).collect()
    got = by_job(out)["1009252"]
    assert (got["user"], got["account"], got["account_source"]) == (
        "testusr",
        "testacc",
        "job-info",
    )
    assert out["_job_alias"] == [{"cgroup": "sEKNKTV3WPV500", "job_id": "1009252"}]


# ---------------------------------------------------------------- who pays


def test_spoofed_account_with_and_without_job_info(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    got = by_job(collector(root).collect())["1009251"]
    assert (got["account"], got["account_source"]) == ("research-lab", "job-info")
    (root / INFO / "1009251").unlink()
    got = by_job(collector(root).collect())["1009251"]
    assert (got["account"], got["account_source"]) == ("bank-y", "environment")


def test_environment_answer_is_not_kept_past_the_job_info(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    info = (root / INFO / "1009251").read_text()
    (root / INFO / "1009251").unlink()
    c = collector(root)
    assert by_job(c.collect())["1009251"]["account"] == "bank-y"
    (root / INFO / "1009251").write_text(info)  # the prolog's file appears (or is restored)
    (root / INFO / "1009251").chmod(0o644)
    got = by_job(c.collect())["1009251"]
    assert (got["account"], got["account_source"]) == ("research-lab", "job-info")


def test_spoofing_job_is_billed_to_its_real_account(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    ds = tmp_path / "ds"
    times = [T0 + i * 30 * 10**9 for i in range(121)]  # an hour in 30 s rounds
    clock = iter(times)
    runner = Runner([collector(root)], clock_ns=lambda: next(clock))
    tables = [runner.run().tables["job"].to_arrow() for _ in times]
    write_dataset(ds, "job", pa.concat_tables(tables))
    write_dataset(ds, "cpu", cpu_table("n1", [i * 30.0 for i in range(121)], cpus=16))
    inventory = tmp_path / "inv.toml"
    inventory.write_text(
        '[[pool]]\nname = "cpu"\nkind = "cpu"\nownership = "own"\nnodes = ["n*"]\n'
        "cost_per_unit_hour = 0.01\nprice_per_unit_hour = 0.05\n"
    )
    done = tally("bill", str(ds), "--inventory", str(inventory), "--format", "json")
    assert done.returncode == 0, done.stderr
    bill = json.loads(done.stdout)
    tenants = {(t["tenant"]) for t in bill["tenants"]}
    assert "research-lab" in tenants and "bank-y" not in tenants
    lines = [j for j in bill["jobs"] if j["job_id"] == "1009251"]
    assert {(j["tenant"], j["user"]) for j in lines} == {("research-lab", "mallory")}
    hours = sum(j["allocated_unit_hours"] for j in lines)
    assert hours == pytest.approx(1.0)  # one core for an hour


# ---------------------------------------------------------------- the job-info files


def test_job_info_not_owned_by_root_is_ignored(tmp_path: Path, warnings: list[str]) -> None:
    root = copy_tree(tmp_path)
    got = by_job(collector(root, job_info_owner=ME + 1).collect())["1009251"]
    assert (got["account"], got["account_source"]) == ("bank-y", "environment")
    assert any("owned by uid" in m for m in warnings)


@pytest.mark.parametrize("target", ["file", "directory"])
def test_job_info_writable_by_others_is_ignored(tmp_path: Path, target: str) -> None:
    root = copy_tree(tmp_path)
    (root / INFO / ("1009251" if target == "file" else "")).chmod(
        0o666 if target == "file" else 0o777
    )
    got = by_job(collector(root).collect())["1009251"]
    assert (got["account"], got["account_source"]) == ("bank-y", "environment")


def test_job_info_symlink_is_ignored(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    elsewhere = tmp_path / "forged"
    elsewhere.write_text("job_id=1009251\naccount=bank-z\n")
    (root / INFO / "1009251").unlink()
    (root / INFO / "1009251").symlink_to(elsewhere)
    assert by_job(collector(root).collect())["1009251"]["account"] == "bank-y"


def test_job_info_naming_another_job_is_ignored(tmp_path: Path, warnings: list[str]) -> None:
    root = copy_tree(tmp_path)
    path = root / INFO / "1009251"
    path.write_text(path.read_text().replace("job_id=1009251", "job_id=1009250"))
    assert by_job(collector(root).collect())["1009251"]["account"] == "bank-y"
    assert any("names another job" in m for m in warnings)


def test_malformed_job_info_falls_back_with_one_line(tmp_path: Path, warnings: list[str]) -> None:
    root = copy_tree(tmp_path)
    (root / INFO / "1009251").write_text("account research-lab\n")
    c = collector(root)
    for _ in range(3):
        assert by_job(c.collect())["1009251"]["account_source"] == "environment"
    assert len([m for m in warnings if "1009251" in m]) == 1


def test_job_info_gpus_win(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    (root / INFO / "1009250").write_text(
        "job_id=1009250\nuid=2002\nuser=testusr2\naccount=lab\ngpus=1,3\n"
    )
    (root / INFO / "1009250").chmod(0o644)
    out = collector(root).collect()
    assert by_job(out)["1009250"]["gpus_allocated"] == 2.0
    assert (3, "1009250") in claims_of(out)


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the job-info files read from now on."""
    read: list[str] = []
    real = jobinfo.JobInfoFiles._read

    def counted(self: jobinfo.JobInfoFiles, name: str, by_sluid: bool) -> Any:
        read.append(name)
        return real(self, name, by_sluid)

    monkeypatch.setattr(jobinfo.JobInfoFiles, "_read", counted)
    return read


def _account(c: SlurmJobCollector, job: str = "1009251") -> tuple[str, str | None]:
    got = by_job(c.collect())[job]
    return got["account"], got["account_source"]


def test_job_info_files_are_read_once_while_the_directory_tells_no_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening, checking and parsing every job's file every second cost more than the rest of
    the collector: each is read once, and again after the directory told of a change."""
    root = copy_tree(tmp_path)
    read = _reads(monkeypatch)
    c = collector(root)
    for _ in range(5):
        assert _account(c) == ("research-lab", "job-info")
    jobs = len(EXPECTED)  # each job's name once (1009252's is its SLUID)
    assert len(read) == jobs and len(set(read)) == jobs
    c.close()


@pytest.mark.parametrize("how", ["prolog", "in place"])
def test_a_rewritten_job_info_file_counts_from_the_next_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The prolog's way (a temporary file renamed over the name) and an editor's (written in
    place) both count from the next round."""
    root = copy_tree(tmp_path)
    path = root / INFO / "1009251"
    c = collector(root)
    assert _account(c) == ("research-lab", "job-info")
    text = path.read_text().replace("research-lab", "bank-q")
    if how == "prolog":
        tmp = root / INFO / ".prolog.x"
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.rename(path)
    else:
        path.write_text(text)
    assert _account(c) == ("bank-q", "job-info")
    c.close()


def test_a_job_info_file_made_writable_by_others_is_dropped_the_next_round(
    tmp_path: Path,
) -> None:
    """A change of mode or owner alone (no write) is a change too: the file is checked again."""
    root = copy_tree(tmp_path)
    c = collector(root)
    assert _account(c) == ("research-lab", "job-info")
    (root / INFO / "1009251").chmod(0o666)
    assert _account(c) == ("bank-y", "environment")
    (root / INFO / "1009251").chmod(0o644)
    assert _account(c) == ("research-lab", "job-info")
    c.close()


def test_a_removed_job_info_file_counts_from_the_next_round(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    c = collector(root)
    assert _account(c) == ("research-lab", "job-info")
    (root / INFO / "1009251").unlink()
    assert _account(c) == ("bank-y", "environment")
    c.close()


def test_job_info_files_are_read_again_within_a_minute_whatever_the_watch_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file edited through a hard link outside the directory tells its watch nothing."""
    root = copy_tree(tmp_path)
    c = collector(root)
    now = [1000.0]
    c._clock = lambda: now[0]
    assert _account(c) == ("research-lab", "job-info")
    monkeypatch.setattr(watch.DirectoryWatch, "changed", lambda self: set())  # told nothing
    path = root / INFO / "1009251"
    path.write_text(path.read_text().replace("research-lab", "bank-q"))
    now[0] += jobinfo.REREAD_SECONDS - 1
    assert _account(c) == ("research-lab", "job-info")
    now[0] += 1
    assert _account(c) == ("bank-q", "job-info")
    c.close()


def test_job_info_files_read_again_and_the_same_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read each minute whatever the watch says reads every file again, but one that
    says what it said keeps its answer (the very dict) and the generation: the collector's
    plan, made while the generation stays, is not dropped for nothing once a minute. One that
    changed, or cannot be read, is forgotten and read anew."""
    root = copy_tree(tmp_path)
    read = _reads(monkeypatch)
    now = [1000.0]
    files = jobinfo.JobInfoFiles(root / INFO, ME, OnceLogger(), lambda: now[0])
    names = sorted(p.name for p in (root / INFO).iterdir())
    files.begin_round()
    first = {name: files.read(name, False) for name in names}
    generation, count = files.generation, len(read)
    now[0] += jobinfo.REREAD_SECONDS
    files.begin_round()
    assert len(read) == count + len(names)  # every file read again
    assert files.generation == generation
    assert all(files.known(name) == (True, first[name]) for name in names)
    assert all(files.read(name, False) is first[name] for name in names)

    monkeypatch.setattr(watch.DirectoryWatch, "changed", lambda self: set())  # told nothing
    path = root / INFO / "1009251"
    path.write_text(path.read_text().replace("research-lab", "bank-q"))
    now[0] += jobinfo.REREAD_SECONDS
    files.begin_round()
    assert files.generation != generation
    assert files.known("1009251") == (False, None)
    assert files.read("1009251", False)["account"] == "bank-q"  # type: ignore[index]
    assert all(files.read(name, False) is first[name] for name in names if name != "1009251")
    files.close()


def test_a_job_info_read_that_failed_is_tried_again_the_next_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors for a moment (EMFILE): that round the account comes from the
    environment, but the failure is not kept as "no file" until the directory changes (review
    finding: the job's own environment then set its account for up to a minute)."""
    root = copy_tree(tmp_path)
    c = collector(root)
    assert _account(c) == ("research-lab", "job-info")
    real = os.open
    failed: list[bool] = []

    def flaky(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith("/1009251") and not failed:
            failed.append(True)
            raise OSError(errno.EMFILE, "Too many open files")
        return real(path, flags, *args)

    monkeypatch.setattr(jobinfo.os, "open", flaky)
    (root / INFO / "unrelated").write_text("")  # a change: every file is read again
    assert _account(c) == ("bank-y", "environment")
    assert [_account(c) for _ in range(3)] == [("research-lab", "job-info")] * 3
    c.close()


def test_a_job_info_symlink_is_ignored_with_one_line(tmp_path: Path, warnings: list[str]) -> None:
    root = copy_tree(tmp_path)
    elsewhere = tmp_path / "forged"
    elsewhere.write_text("job_id=1009251\naccount=bank-z\n")
    (root / INFO / "1009251").unlink()
    (root / INFO / "1009251").symlink_to(elsewhere)
    c = collector(root)
    for _ in range(3):
        assert _account(c) == ("bank-y", "environment")
    assert len([m for m in warnings if "symbolic link" in m]) == 1
    c.close()


def test_job_info_watch_that_failed_for_good_is_made_again_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inotify instance that failed and could not be made again (a queue overflow when no
    instance is left) is asked for again each REREAD_SECONDS, not given up on."""
    root = copy_tree(tmp_path)
    read = _reads(monkeypatch)
    c = collector(root)
    now = [1000.0]
    c._clock = lambda: now[0]
    assert _account(c) == ("research-lab", "job-info")
    files = c._job_info_files
    assert files._watch is not None
    files._watch.close()  # what a failed restart leaves: no descriptor
    for _ in range(3):
        now[0] += 1
        assert _account(c) == ("research-lab", "job-info")
    now[0] += jobinfo.REREAD_SECONDS
    for _ in range(3):
        now[0] += 1
        assert _account(c) == ("research-lab", "job-info")
    assert files._watch is not None and files._watch.fd >= 0
    assert read.count("1009251") == 1 + 3 + 1  # read every round only while it had no watch
    c.close()


def test_without_inotify_job_info_files_are_read_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no inotify instance can be had, every file is read every round, and an instance is
    asked for again each REREAD_SECONDS: from then on the files are read once."""
    root = copy_tree(tmp_path)
    real_open = watch.DirectoryWatch.open
    monkeypatch.setattr(watch.DirectoryWatch, "open", classmethod(lambda cls, contents=False: None))
    read = _reads(monkeypatch)
    c = collector(root)
    now = [1000.0]
    c._clock = lambda: now[0]
    for _ in range(3):
        now[0] += 1
        assert _account(c) == ("research-lab", "job-info")
    path = root / INFO / "1009251"
    path.write_text(path.read_text().replace("research-lab", "bank-q"))
    assert _account(c) == ("bank-q", "job-info")
    assert read.count("1009251") == 4
    monkeypatch.setattr(watch.DirectoryWatch, "open", real_open)  # instances to be had again
    now[0] += jobinfo.REREAD_SECONDS
    for _ in range(3):
        now[0] += 1
        assert _account(c) == ("bank-q", "job-info")
    assert read.count("1009251") == 5
    c.close()


def test_parse_job_info() -> None:
    text = (
        "# comment\n\njob_id=12\nsluid=sEKNKTV3WPV500\nuid=1000\nuser=al ice\n"
        "account=a=b\ngpus=0,1\nother=x\n"
    )
    assert parse_job_info(text) == {
        "job_id": "12",
        "sluid": "sEKNKTV3WPV500",
        "uid": "1000",
        "user": "al ice",
        "account": "a=b",
        "gpus": "0,1",
    }
    for bad in [
        "account\n",
        "=x\n",
        "job_id=x\n",
        "uid=-1\n",
        "account=a\naccount=b\n",
        "job_id=٣\n",
    ]:
        with pytest.raises(ParseError):
            parse_job_info(bad, "f")


def test_parse_status_uid() -> None:
    text = (TREE / "proc/4501/status").read_text()
    assert parse_status_uid(text) == 2003
    assert parse_status_uid("Uid:\t1\t0\t0\t0\n") == 1  # the real uid, not the effective one
    for bad in ["", "Uid:\t1\t2\n", "Uid:\tx\t1\t1\t1\n", f"Uid:\t{2**32}\t0\t0\t0\n"]:
        with pytest.raises(ParseError):
            parse_status_uid(bad)


def test_parse_passwd() -> None:
    names = parse_passwd((TREE / "etc/passwd").read_text() + "broken\nx:x:y:1::/:/bin/sh\n")
    assert names[2003] == "mallory" and names[0] == "root" and len(names) == 6


def test_passwd_of_the_rootfs_names_uids(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nzed:x:2003:2003::/:/bin/sh\n"
    )
    (root / INFO / "1009251").unlink()
    set_environ(root, 4501, SLURM_JOB_UID=None)
    assert by_job(collector(root).collect())["1009251"]["user"] == "zed"


# ---------------------------------------------------------------- one bad job


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("cpu.stat", "usage_usec 12abc\n"),
        ("cpuset.cpus.effective", "4-x\n"),
        ("memory.current", "max\n"),
    ],
)
def test_one_malformed_job_leaves_the_others(
    tmp_path: Path, warnings: list[str], name: str, text: str
) -> None:
    root = copy_tree(tmp_path)
    (root / SCOPE0 / "job_1009250" / name).write_text(text)
    c = collector(root)
    runner = Runner([c], clock_ns=lambda: T0)
    for _ in range(2):
        rnd = runner.run()
        assert rnd.status["job"].success
        assert sorted(rnd.tables["job"].to_arrow().column("job_id").to_pylist()) == sorted(
            set(EXPECTED) - {"1009250"}
        )
    assert len([m for m in warnings if "job_1009250" in m]) == 1
    assert name in next(m for m in warnings if "job_1009250" in m)


def test_one_unreadable_environ_leaves_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = slurm.read_environ

    def read_environ(path: Path) -> bytes:
        if path.parent.name == "4301":
            raise OSError(5, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(slurm, "read_environ", read_environ)
    assert by_job(collector(copy_tree(tmp_path)).collect()) == EXPECTED


# ---------------------------------------------------------------- cgroup version, attribution


def test_cgroup_version(tmp_path: Path) -> None:
    assert cgroup_version(TREE / "sys/fs/cgroup") == 2
    assert cgroup_version(TREE.parent / "slurm_v1/sys/fs/cgroup") == 1
    assert cgroup_version(tmp_path) is None
    hybrid = tmp_path / "hybrid"
    (hybrid / "unified").mkdir(parents=True)
    (hybrid / "unified/cgroup.controllers").write_text("")
    (hybrid / "cpuacct/slurm").mkdir(parents=True)
    assert cgroup_version(hybrid) == 1  # Slurm runs cgroup/v1 on a hybrid host


def test_sluid_cgroup_of_a_process() -> None:
    text = (TREE / "proc/4601/cgroup").read_text()
    assert job_id_from_cgroup(text) == "sEKNKTV3WPV500"
    assert job_id_from_cgroup("0::/system.slice/slurmstepd.scope/sEKNKTV3WPV50/step_0") is None
    assert job_id_from_cgroup("0::/system.slice/slurmstepd.scope/sEKNKTV3WPV5OO/step_0") is None


def test_gpu_of_a_sluid_job_goes_to_its_job_id(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    out = collector(root).collect()
    partial: dict[str, list[dict[str, Any]]] = {
        "gpu": [{"gpu_uuid": "GPU-7", "gpu_index": 7}],
        "_gpu_job": out["_gpu_job"],
        "_job_alias": out["_job_alias"],
        "_gpu_pids": [{"gpu_uuid": "GPU-7", "pids": [4601], "mig": False}],
    }
    attribute_gpus(partial, root / "proc")
    assert partial["gpu"][0]["job_id"] == "1009252"
    assert "_job_alias" not in partial


# ---------------------------------------------------------------- flags


def test_flags_and_config_keys(tmp_path: Path) -> None:
    from telemetry.cli import build_parser, daemon_config

    parser = build_parser()
    defaults = daemon_config(parser.parse_args(["daemon"]))
    assert defaults.rootfs == Path("/") and defaults.slurm_job_info_dir == Path("/run/tally/jobs")
    config = tmp_path / "tally.toml"
    config.write_text('[path]\nrootfs = "/host"\n[slurm]\njob-info-dir = "/host/run/tally/jobs"\n')
    cfg = daemon_config(parser.parse_args(["daemon", "--config", str(config)]))
    assert cfg.rootfs == Path("/host")
    assert cfg.slurm_job_info_dir == Path("/host/run/tally/jobs")
    args = ["daemon", "--config", str(config), "--slurm.job-info-dir", "/x", "--path.rootfs", "/r"]
    cfg = daemon_config(parser.parse_args(args))
    assert (cfg.rootfs, cfg.slurm_job_info_dir) == (Path("/r"), Path("/x"))


# ---------------------------------------------------------------- the prolog and epilog

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "slurm"


def run_script(name: str, info: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TALLY_JOB_INFO_DIR": str(info), **env}
    return subprocess.run(
        ["sh", str(DEPLOY / name)], env=full, capture_output=True, text=True, check=False
    )


def test_prolog_writes_what_the_collector_trusts(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    info = root / INFO
    shutil.rmtree(info)
    slurm_env = {
        "SLURM_JOB_ID": "1009251",
        "SLURM_JOB_UID": "2003",
        "SLURM_JOB_USER": "mallory",
        "SLURM_JOB_ACCOUNT": "research-lab",
        "SLURM_JOB_GPUS": "",
    }
    done = run_script("tally-prolog", info, **slurm_env)
    assert done.returncode == 0 and done.stderr == ""
    written = info / "1009251"
    assert info.stat().st_mode & 0o777 == 0o755 and written.stat().st_mode & 0o777 == 0o644
    assert parse_job_info(written.read_text()) == {
        "job_id": "1009251",
        "uid": "2003",
        "user": "mallory",
        "account": "research-lab",
        "gpus": "",
    }
    got = by_job(collector(root).collect())["1009251"]
    assert (got["account"], got["account_source"]) == ("research-lab", "job-info")
    # Slurm 26.05: the SLUID-named cgroup finds the same file under its SLUID.
    (root / "proc/4601/environ").unlink()
    sluid_env = dict(slurm_env, SLURM_JOB_ID="1009252", SLURM_JOB_SLUID="sEKNKTV3WPV500")
    sluid_env.update(SLURM_JOB_UID="2001", SLURM_JOB_USER="testusr", SLURM_JOB_ACCOUNT="lab\nx")
    assert run_script("tally-prolog", info, **sluid_env).returncode == 0
    assert (info / "sEKNKTV3WPV500").samefile(info / "1009252")
    got = by_job(collector(root).collect())["1009252"]
    assert (got["account"], got["account_source"]) == ("labx", "job-info")  # one line
    for env in (slurm_env, sluid_env):
        assert run_script("tally-epilog", info, **env).returncode == 0
    assert sorted(p.name for p in info.iterdir()) == []
    got = by_job(collector(root).collect())["1009251"]
    assert (got["account"], got["account_source"]) == ("bank-y", "environment")


def test_prolog_never_fails(tmp_path: Path) -> None:
    info = tmp_path / "jobs"
    done = run_script("tally-prolog", info, SLURM_JOB_ID="../etc", SLURM_JOB_UID="0")
    assert done.returncode == 0 and "not a job id" in done.stderr
    assert not info.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = run_script("tally-prolog", blocker / "jobs", SLURM_JOB_ID="5", SLURM_JOB_UID="0")
    assert done.returncode == 0 and "cannot create" in done.stderr


# ---------------------------------------------------------------- GPU shards


def test_gres_conf_shards_per_gpu() -> None:
    conf = "# node gres\nName=gpu File=/dev/nvidia[0-3]\nName=shard Count=32  # 8 a GPU\n"
    assert slurm.parse_gres_shards(conf) == {0: 8, 1: 8, 2: 8, 3: 8}
    per_line = (
        "NodeName=n1 Name=shard Count=4 File=/dev/nvidia0\nName=shard Count=6 File=/dev/nvidia1"
    )
    assert slurm.parse_gres_shards(per_line) == {0: 4, 1: 6}
    # AutoDetect without a gpu File list, or a count that does not split evenly: unknown
    assert slurm.parse_gres_shards("AutoDetect=nvml\nName=shard Count=16") == {}
    assert slurm.parse_gres_shards("Name=gpu File=/dev/nvidia[0-2]\nName=shard Count=8") == {}


def test_a_shared_gres_conf_is_read_for_this_node() -> None:
    """One gres.conf for the cluster: NodeName= lines count for their nodes only (by hostlist,
    the short name of an FQDN too); where no line names the node, the file tells only if it
    gives every node the same shards."""
    conf = (
        "NodeName=a[1-2] Name=gpu File=/dev/nvidia[0-3]\n"
        "NodeName=a[1-2] Name=shard Count=32\n"
        "NodeName=b[1-2] Name=gpu File=/dev/nvidia[0-1]\n"
        "NodeName=b[1-2] Name=shard Count=64\n"
    )
    assert slurm.parse_gres_shards(conf, "a2") == {0: 8, 1: 8, 2: 8, 3: 8}
    assert slurm.parse_gres_shards(conf, "b1.cluster.example") == {0: 32, 1: 32}
    assert slurm.parse_gres_shards(conf, "c1") == {}  # unknown here, and the groups differ
    alike = (
        "NodeName=a[1-2] Name=shard Count=8 File=/dev/nvidia0\n"
        "NodeName=b1 Name=shard Count=8 File=/dev/nvidia0\n"
    )
    assert slurm.parse_gres_shards(alike, "c1") == {0: 8}
    common = "Name=gpu File=/dev/nvidia[0-1]\nNodeName=a1 Name=shard Count=4\n"
    assert slurm.parse_gres_shards(common, "a1") == {0: 2, 1: 2}
    assert slurm.parse_gres_shards("NodeName=a[1- Name=shard Count=4", "a1") == {}
    # digits str.isdigit takes but int refuses: not understood, never a crash at start
    assert slurm.parse_gres_shards("Name=gpu File=/dev/nvidia[0-1]\nName=shard Count=\u00b2") == {}
    assert slurm.parse_gres_shards("Name=gpu File=/dev/nvidia[0-\u00b2]\nName=shard Count=2") == {}


def test_a_configless_nodes_gres_conf_is_found_where_slurmd_keeps_it(tmp_path: Path) -> None:
    """In configless mode slurmd fetches gres.conf and keeps it under /run/slurm/conf."""
    root = copy_tree(tmp_path)
    (root / "run" / "slurm" / "conf").mkdir(parents=True)
    (root / "run" / "slurm" / "conf" / "gres.conf").write_text(
        "NodeName=n1 Name=gpu File=/dev/nvidia[0-3]\nNodeName=n1 Name=shard Count=32\n"
    )
    set_environ(root, 4302, SLURM_SHARDS_ON_NODE="2")  # job 1009250 on GPU 1, node "n1"
    assert by_job(collector(root).collect())["1009250"]["gpus_allocated"] == 0.25


def test_two_jobs_on_shards_of_one_gpu_hold_their_shares(tmp_path: Path) -> None:
    """Two jobs on GPU 1 with 2 and 4 of its 8 shards (SLURM_SHARDS_ON_NODE): each is allocated
    its share, the claims carry it, and the GPU gets gpu_job rows with those shares (SPEC §2),
    so the bill splits its busy time 1 : 2 instead of giving both the whole GPU."""
    root = copy_tree(tmp_path)
    (root / "etc" / "slurm").mkdir()
    (root / "etc" / "slurm" / "gres.conf").write_text(
        "Name=gpu File=/dev/nvidia[0-3]\nName=shard Count=32\n"
    )
    set_environ(root, 4302, SLURM_SHARDS_ON_NODE="2")  # job 1009250, SLURM_JOB_GPUS=1
    set_environ(root, 4401, SLURM_STEP_GPUS="1", CUDA_VISIBLE_DEVICES="1",
                SLURM_SHARDS_ON_NODE="4")  # job 1009249  # fmt: skip
    out = collector(root).collect()
    jobs = by_job(out)
    assert jobs["1009250"]["gpus_allocated"] == 0.25
    assert jobs["1009249"]["gpus_allocated"] == 0.5
    shares = sorted((c["gpu_index"], c["job_id"], c.get("share")) for c in out["_gpu_job"])
    assert shares == [(1, "1009249", 0.5), (1, "1009250", 0.25)]
    partial: dict[str, list[dict[str, Any]]] = {
        "gpu": [{"gpu_uuid": "GPU-1", "gpu_index": 1}],
        "_gpu_job": out["_gpu_job"],
        "_job_alias": out["_job_alias"],
        "_gpu_pids": [],
    }
    attribute_gpus(partial, root / "proc")
    held = sorted((r["job_id"], r["share"]) for r in partial["gpu_job"])
    assert held == [("1009249", 0.5), ("1009250", 0.25)]


def test_a_job_info_file_without_shards_counts_the_gpus_whole(tmp_path: Path) -> None:
    """A job-info file names the job's GPUs; without shards= they count whole, whatever the job's
    environment says: Slurm leaves a SLURM_SHARDS_ON_NODE the user exported in place in a job
    on whole GPUs (the GPU plugin protects the environment), so trusting it would let a
    whole-GPU job pay for 2 shards of 8. A file that gives shards= is taken."""
    root = copy_tree(tmp_path)
    (root / "etc" / "slurm").mkdir()
    (root / "etc" / "slurm" / "gres.conf").write_text(
        "Name=gpu File=/dev/nvidia[0-3]\nName=shard Count=32\n"
    )
    set_environ(root, 4302, SLURM_SHARDS_ON_NODE="2")  # job 1009250, SLURM_JOB_GPUS=1
    info = root / INFO / "1009250"
    info.write_text(f"job_id=1009250\nuid={ME}\nuser=testusr2\naccount=lab-a\ngpus=1\n")
    info.chmod(0o644)
    job = by_job(collector(root).collect())["1009250"]
    assert (job["account"], job["account_source"]) == ("lab-a", "job-info")
    assert job["gpus_allocated"] == 1.0
    info.write_text(f"job_id=1009250\nuid={ME}\nuser=testusr2\naccount=lab-a\ngpus=1\nshards=4\n")
    assert by_job(collector(root).collect())["1009250"]["gpus_allocated"] == 0.5


def test_a_step_elsewhere_is_held_to_its_own_gpus_not_the_batch_nodes(tmp_path: Path) -> None:
    """srun carries the batch node's SLURM_JOB_GPUS to the job's steps on other nodes, where
    it names that node's GPUs: a step's environment is read for its SLURM_STEP_GPUS, and two
    steps side by side hold the GPUs of both."""
    root = copy_tree(tmp_path)
    # job 1009249 runs only step_0 here (PID 4401); the batch node held GPUs 6,7
    set_environ(root, 4401, SLURM_JOB_GPUS="6,7", SLURM_STEP_GPUS="0")
    out = collector(root).collect()
    assert by_job(out)["1009249"]["gpus_allocated"] == 1.0
    assert (0, "1009249") in claims_of(out) and (6, "1009249") not in claims_of(out)
    step = root / SCOPE1 / "job_1009249/step_1/user/task_0"
    step.mkdir(parents=True)
    (step / "cgroup.procs").write_text("4402\n")
    shutil.copytree(root / "proc/4401", root / "proc/4402")
    set_environ(root, 4402, SLURM_STEP_GPUS="2,3")
    out = collector(root).collect()
    assert by_job(out)["1009249"]["gpus_allocated"] == 3.0
    assert [c for c in claims_of(out) if c[1] == "1009249"] == [
        (0, "1009249"), (2, "1009249"), (3, "1009249")
    ]  # fmt: skip


def test_an_mps_job_holds_the_share_of_its_gpu_the_prolog_saw(tmp_path: Path) -> None:
    """gres/mps: Slurm gives the prolog CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; the job-info file
    carries it and the job holds that share of its GPU. The same variable in the job's own
    environment is the user's to set, and changes nothing."""
    root = copy_tree(tmp_path)
    info = root / INFO
    env = {
        "SLURM_JOB_ID": "1009250", "SLURM_JOB_UID": str(ME), "SLURM_JOB_USER": "testusr2",
        "SLURM_JOB_ACCOUNT": "lab-a", "SLURM_JOB_GPUS": "1",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
    }  # fmt: skip
    assert run_script("tally-prolog", info, **env).returncode == 0
    assert parse_job_info((info / "1009250").read_text())["mps_percentage"] == "25"
    out = collector(root).collect()
    assert by_job(out)["1009250"]["gpus_allocated"] == 0.25
    assert [c.get("share") for c in out["_gpu_job"] if c["job_id"] == "1009250"] == [0.25]
    set_environ(root, 4302, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE="5")
    (info / "1009250").write_text(f"job_id=1009250\nuid={ME}\naccount=lab-a\ngpus=1\n")
    assert by_job(collector(root).collect())["1009250"]["gpus_allocated"] == 1.0
    for wrong in ("0", "100", "250", "x"):
        (info / "1009250").write_text(f"job_id=1009250\nuid={ME}\ngpus=1\nmps_percentage={wrong}\n")
        assert by_job(collector(root).collect())["1009250"]["gpus_allocated"] == 1.0, wrong


def test_shards_without_a_gres_conf_count_the_gpu_whole(
    tmp_path: Path, warnings: list[str]
) -> None:
    root = copy_tree(tmp_path)
    set_environ(root, 4302, SLURM_SHARDS_ON_NODE="2")
    jobs = by_job(collector(root).collect())
    assert jobs["1009250"]["gpus_allocated"] == 1.0
    assert any("shards" in w and "gres.conf" in w for w in warnings)


def test_rounds_read_as_planned_read_as_job_by_job(tmp_path: Path) -> None:
    """On a node with job-info files, a SLUID-named cgroup and GPU claims, jobs read as the
    plan laid them out give what the jobs read one by one give, round after round while they
    change, the job-info file rewritten included (the new account shows in the same round)."""
    root = copy_tree(tmp_path)
    info_file = root / INFO / "1009251"
    seen = planned_rounds_read_as_job_by_job(
        lambda: collector(root, resolve_user=lambda uid: f"user-{uid}"), info_file=info_file
    )
    assert sum(seen.rows) > 40, seen.rows
