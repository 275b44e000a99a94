"""``tally doctor`` on fixture roots and the NVML stand-in; --quiet and --log-format json."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from telemetry.config import DaemonConfig
from telemetry.doctor import run_doctor
from tests.support.cli import tally
from tests.support.net import free_port
from tests.support.nvml.library import FakeNVML
from tests.support.nvml.profiles import H100_LOADED

FIXTURES = Path(__file__).parent / "fixtures"
HEALTHY = FakeNVML([H100_LOADED, H100_LOADED])
OLD = FakeNVML([H100_LOADED], old_driver=True)
LOSING = FakeNVML([H100_LOADED, H100_LOADED])


def _doctor(tmp_path: Path, **overrides: object) -> tuple[int, list[str]]:
    settings: dict[str, object] = {
        "procfs": FIXTURES / "normal_host" / "proc",
        "sysfs": FIXTURES / "normal_host" / "sys",
        "data_dir": tmp_path / "data",
        "listen": f"127.0.0.1:{free_port()}",
        "nvml_module": "tests.test_doctor:HEALTHY",
    }
    settings.update(overrides)
    lines: list[str] = []
    code = run_doctor(DaemonConfig(**settings), out=lines.append)  # type: ignore[arg-type]
    return code, lines


def _line(lines: list[str], what: str) -> str:
    return next(line for line in lines if f"] {what}:" in line)


def test_a_healthy_gpu_node(tmp_path: Path) -> None:
    code, lines = _doctor(tmp_path)
    assert code == 0, lines
    assert "64 CPUs online" in _line(lines, "procfs")
    assert "2 package zone(s) readable" in _line(lines, "rapl")
    assert f"driver {H100_LOADED.driver_version}, 2 GPU(s)" in _line(lines, "nvml")
    assert _line(lines, "gpm").startswith("[  ok]")
    assert _line(lines, "slurm").startswith("[warn]")  # no cgroup tree in this fixture
    assert not (tmp_path / "data").exists(), "the doctor creates nothing"
    assert lines[-1].endswith("0 failed, 1 warnings")


def test_slurm_v2_and_old_driver(tmp_path: Path) -> None:
    root = tmp_path / "node"
    shutil.copytree(FIXTURES / "slurm_v2", root)
    for name in ("stat", "meminfo"):
        shutil.copy(FIXTURES / "normal_host" / "proc" / name, root / "proc" / name)
    (root / "sys" / "fs" / "cgroup" / "cgroup.controllers").write_text(
        "cpuset cpu io memory pids\n"
    )
    code, lines = _doctor(
        tmp_path, procfs=root / "proc", sysfs=root / "sys", nvml_module="tests.test_doctor:OLD"
    )
    assert code == 0
    assert "cgroup v2, 2 slurmstepd scope(s), 6 job(s) running" in _line(lines, "slurm")
    gpm = _line(lines, "gpm")
    assert gpm.startswith("[warn]") and "Hopper" in gpm


def test_failures_come_with_their_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        LOSING.lose_gpu(1)
        code, lines = _doctor(
            tmp_path,
            procfs=tmp_path / "no-proc",
            data_dir=blocker / "data",
            listen=f"127.0.0.1:{port}",
            nvml_module="tests.test_doctor:LOSING",
        )
    assert code == 1
    assert "--path.procfs" in _line(lines, "procfs")
    assert "not a directory" in _line(lines, "data dir").lower()
    assert "another process holds the port" in _line(lines, "listen")
    assert "XID 79" in _line(lines, "gpu 1")
    real_read = Path.read_text

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", denied)
    code, lines = _doctor(tmp_path)
    rapl = _line(lines, "rapl")
    assert code == 1 and rapl.startswith("[FAIL]") and "root-only since Linux 5.10" in rapl


def test_no_nvml_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    code, lines = _doctor(tmp_path, nvml_module=None)
    assert code == 0 and _line(lines, "nvml").startswith("[warn]")


def test_doctor_on_the_command_line(tmp_path: Path) -> None:
    normal = FIXTURES / "normal_host"
    result = tally(
        "doctor", "--path.procfs", str(normal / "proc"), "--path.sysfs", str(normal / "sys"),
        "--data-dir", str(tmp_path / "d"), "--listen", f"127.0.0.1:{free_port()}",
        "--nvml.module", "tests.test_doctor:HEALTHY",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # settings, procfs, rapl, nvml, gpm, slurm, pods (off), data dir, listen, inventory, web
    assert result.stdout.splitlines()[-1] == "11 checks: 0 failed, 1 warnings"


def test_doctor_checks_what_the_daemon_would_refuse(tmp_path: Path) -> None:
    """The shipped config names an inventory and a web config; where they are missing or bad the
    daemon refuses to start, so the doctor must fail too (it said "0 failed" before)."""
    normal = FIXTURES / "normal_host"
    config = tmp_path / "tally.toml"
    shipped = (Path(__file__).parent.parent / "deploy" / "tally.toml").read_text()
    config.write_text(
        shipped.replace('"0.0.0.0:8469"', f'"127.0.0.1:{free_port()}"')
        .replace('"/var/lib/tally"', f'"{tmp_path / "data"}"')
        .replace('"/etc/tally/inventory.toml"', f'"{tmp_path / "inventory.toml"}"')
        .replace('"/etc/tally/web.yml"', f'"{tmp_path / "web.yml"}"')
        .replace('"/proc"', f'"{normal / "proc"}"')
        .replace('"/sys"', f'"{normal / "sys"}"')
    )
    (tmp_path / "inventory.toml").write_text('[[pool]]\nname = "p"\nkind = "tpu"\n')
    (tmp_path / "web.yml").write_text("nonsense: 1\n")
    flags = ("--config", str(config), "--nvml.module", "tests.test_doctor:HEALTHY")
    doctor = tally("doctor", *flags)
    assert doctor.returncode == 1, doctor.stdout
    lines = doctor.stdout.splitlines()
    assert _line(lines, "inventory").startswith("[FAIL]") and "pool[0]" in _line(lines, "inventory")
    assert _line(lines, "web config").startswith("[FAIL]")
    assert "nonsense: unknown key" in _line(lines, "web config")
    assert lines[-1] == "11 checks: 2 failed, 1 warnings"
    daemon = tally("daemon", *flags, timeout=60)
    assert daemon.returncode == 2, "the daemon refuses what the doctor failed"
    (tmp_path / "inventory.toml").write_text(
        '[[pool]]\nname = "p"\nkind = "gpu"\nownership = "own"\nnodes = ["*"]\n'
        "cost_per_unit_hour = 1\nprice_per_unit_hour = 2\n"
    )
    (tmp_path / "web.yml").write_text("basic_auth_users: {}\n")
    healthy = tally("doctor", *flags)
    assert healthy.returncode == 0, healthy.stdout
    assert "p" in _line(healthy.stdout.splitlines(), "inventory")


def test_doctor_fails_settings_the_daemon_refuses(tmp_path: Path) -> None:
    code, lines = _doctor(tmp_path, interval_seconds=40.0, max_gap_seconds=60.0)
    assert code == 1 and "more than half of max-gap" in _line(lines, "settings")


def test_log_format_json_and_quiet(tmp_path: Path) -> None:
    from tests.support.tables import gpu_table, write_dataset

    result = tally("--log-format", "json", "replay", str(tmp_path / "missing"), "--once")
    assert result.returncode == 2
    (error,) = [json.loads(line) for line in result.stderr.splitlines()]  # one JSON line
    assert error["level"] == "error" and "does not exist" in error["message"]
    usage = tally("--log-format=json", "bill", "--window")
    assert usage.returncode == 2 and json.loads(usage.stderr)["level"] == "error"
    write_dataset(tmp_path / "ds", "gpu", gpu_table("n1", "GPU-1", 0, [0.0, 30.0]))
    part = next((tmp_path / "ds").rglob("*.parquet")).parent
    (part / "junk.parquet").write_text("junk")
    logged = tally("--log-format", "json", "replay", str(tmp_path / "ds"), "--once")
    records = [json.loads(line) for line in logged.stderr.splitlines() if line.startswith("{")]
    assert any(r["level"] == "warning" and "quarantined" in r["message"] for r in records)
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    inv = tmp_path / "inv.toml"
    inv.write_text(
        '[[pool]]\nname = "p"\nkind = "gpu"\nownership = "own"\nnodes = ["nothing-*"]\n'
        "cost_per_unit_hour = 1\nprice_per_unit_hour = 2\n"
    )
    loud = tally("bill", str(tmp_path / "ds"), "--inventory", str(inv))
    quiet = tally("--quiet", "bill", str(tmp_path / "ds"), "--inventory", str(inv))
    assert "tally: warning" in loud.stderr
    shipped = tally("--log-format", "json", "bill", str(tmp_path / "ds"), "--inventory", str(inv))
    # every line a log shipper reads is JSON: the warnings of batch commands too
    warnings = [json.loads(line) for line in shipped.stderr.splitlines()]
    assert warnings and all(w["level"] == "warning" for w in warnings)
    assert shipped.stdout == loud.stdout
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == loud.stdout


def test_disabled_collectors_are_not_checked(tmp_path: Path) -> None:
    # A module that cannot load: checking NVML would fail the doctor.
    off = {"gpu": False, "job": False, "rapl": False}
    code, lines = _doctor(tmp_path, nvml_module="no.such.module:NVML", collectors=off)
    assert code == 0, lines
    for what, name in (("nvml", "gpu"), ("slurm", "job"), ("rapl", "rapl")):
        assert f"not checked: the {name} collector is off" in _line(lines, what)
    assert not any("] gpm:" in line for line in lines)


def test_rapl_zones_past_the_tenth(tmp_path: Path) -> None:
    _, lines = _doctor(tmp_path, sysfs=FIXTURES / "rapl_16_sockets" / "sys")
    assert "16 package zone(s) readable" in _line(lines, "rapl")


def test_slurm_jobs_counted_as_the_collector_finds_them(tmp_path: Path) -> None:
    root = tmp_path / "node"
    shutil.copytree(FIXTURES / "slurm_trust", root)
    # one slurmd's copy of job 1009248 gone: 4 jobs named job_<id>, 1 named by its SLUID
    shutil.rmtree(root / "sys/fs/cgroup/system.slice/node1_slurmstepd.scope/job_1009248")
    info = root / "run/tally/jobs"
    info.chmod(0o755)
    code, lines = _doctor(tmp_path, sysfs=root / "sys", slurm_job_info_dir=info)
    assert "cgroup v2, 2 slurmstepd scope(s), 5 job(s) running" in _line(lines, "slurm")
    job_info = _line(lines, "slurm job-info")
    if os.getuid() == 0:
        assert job_info.startswith("[  ok]") and "1 job file(s)" in job_info
    else:
        assert job_info.startswith("[FAIL]") and "owned by uid 0" in job_info
    info.chmod(0o777)
    code, lines = _doctor(tmp_path, sysfs=root / "sys", slurm_job_info_dir=info)
    assert code == 1 and _line(lines, "slurm job-info").startswith("[FAIL]")
    code, lines = _doctor(tmp_path, sysfs=root / "sys", slurm_job_info_dir=tmp_path / "none")
    assert "deploy/slurm/prolog" in _line(lines, "slurm job-info")
