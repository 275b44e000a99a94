"""MIG capacity counted once, per-process NVML utilisation and the gpu_job rows of shared GPUs
(SPEC §2, §3), against the NVML stand-in."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporters.prometheus import TallyCollector
from telemetry.collectors import CollectorContext, Runner, base, files
from telemetry.collectors.base import Collector, Row
from telemetry.collectors.gpu import GpuCollector, profile_slices
from telemetry.nvml import Gateway
from telemetry.schema import SCHEMAS, validate
from telemetry.state import State
from tests.support.nvml.library import FakeClock, FakeNVML
from tests.support.nvml.profiles import H100_IDLE, H100_LOADED, H100_MIG, MiB, ProcessProfile
from tests.support.promtool import promtool_check

FIXTURES = Path(__file__).parent / "fixtures"


def _ctx(fake: Any, procfs: Path | None = None) -> CollectorContext:
    return CollectorContext(
        procfs=procfs or FIXTURES / "normal_host" / "proc",
        sysfs=FIXTURES / "normal_host" / "sys",
        node="gpu-a1",
        nvml_module=fake,
    )


def _capacity_per_round(table: pa.Table) -> float:
    """GPU units one round counts in capacity: SPEC §3 with each row weighted by
    ``capacity_units`` (null → 1, as in files written before the column)."""
    units = validate(table, "gpu").column("capacity_units").to_pylist()
    return sum(1.0 if u is None else u for u in units)


def _pylist(table: pa.Table) -> list[dict[str, Any]]:
    return table.drop_columns(["time"]).to_pylist()  # ns times do not fit datetime


def _units(table: pa.Table) -> dict[str, float | None]:
    t = validate(table, "gpu")
    uuids, units = t.column("gpu_uuid").to_pylist(), t.column("capacity_units").to_pylist()
    return dict(zip(uuids, units, strict=True))


# ------------------------------------------------------------------ MIG capacity


@pytest.mark.parametrize(
    "profiles", [[H100_LOADED, H100_MIG], [H100_MIG, H100_MIG]], ids=["standin", "two-mig"]
)
def test_two_h100s_with_mig_are_two_gpus_of_capacity_not_six(profiles: list[Any]) -> None:
    clock = FakeClock(start=1000.0)
    runner = Runner([GpuCollector(_ctx(FakeNVML(profiles, clock=clock)))])
    rounds = []
    for _ in range(3):
        table = runner.run().tables["gpu"].to_arrow()
        assert table.num_rows == sum(1 + len(p.mig_instances) for p in profiles)
        rounds.append(_capacity_per_round(table))
        clock.advance(10.0)
    assert rounds == pytest.approx([2.0, 2.0, 2.0], abs=1e-6)


def test_each_mig_instance_carries_its_slice_fraction() -> None:
    fake = FakeNVML([H100_MIG])
    units = _units(Runner([GpuCollector(_ctx(fake))]).run().tables["gpu"].to_arrow())
    parent = fake.devices[0]
    expected = {"3g.40gb": 3 / 7, "2g.20gb": 2 / 7, "1g.10gb": 1 / 7}
    for mig in parent.mig_devices:
        assert units[mig.uuid] == pytest.approx(expected[mig.profile.profile], rel=1e-6)
    assert units[parent.uuid] == 0.0  # 3g + 2g + 1g + 1g: every slice is in an instance


def test_a_partly_partitioned_gpu_keeps_its_free_slices_on_the_parent() -> None:
    half = replace(H100_MIG, mig_instances=H100_MIG.mig_instances[:2])  # 3g + 2g of 7
    fake = FakeNVML([half, H100_IDLE])
    table = Runner([GpuCollector(_ctx(fake))]).run().tables["gpu"].to_arrow()
    units = _units(table)
    assert units[fake.devices[0].uuid] == pytest.approx(2 / 7, rel=1e-6)
    assert units[fake.devices[1].uuid] == 1.0
    assert _capacity_per_round(table) == pytest.approx(2.0, abs=1e-6)


def test_slices_fall_back_to_the_profile_name_and_the_max_mig_device_count() -> None:
    fake = FakeNVML([H100_MIG], hidden=["nvmlDeviceGetGpuInstanceProfileInfo"])
    for i in range(len(H100_MIG.mig_instances)):
        fake.set_unsupported(0, "nvmlDeviceGetAttributes", mig_index=i)
    units = _units(Runner([GpuCollector(_ctx(fake))]).run().tables["gpu"].to_arrow())
    assert units[fake.devices[0].mig_devices[0].uuid] == pytest.approx(3 / 7, rel=1e-6)
    assert sum(u for u in units.values() if u is not None) == pytest.approx(1.0, abs=1e-6)
    assert (profile_slices("2g.20gb"), profile_slices("1c.3g.40gb")) == (2, 1)
    assert profile_slices("7g.80gb+gfx") == 7 and profile_slices("unknown") is None


def _cgroup(procfs: Path, pid: int, job: str) -> None:
    (procfs / str(pid)).mkdir(parents=True, exist_ok=True)
    (procfs / str(pid) / "cgroup").write_text(
        f"0::/system.slice/slurmstepd.scope/job_{job}/step_0/user/task_0\n"
    )


class _Jobs(Collector):
    """A stand-in for the Slurm collector: fixed job rows and GPU claims."""

    name = "jobs-test"

    def __init__(self, ctx: CollectorContext, jobs: list[Row], claims: list[Row]) -> None:
        super().__init__(ctx)
        self.jobs, self.claims = jobs, claims

    def collect(self) -> dict[str, list[Row]]:
        return {"job": [dict(j) for j in self.jobs], "_gpu_job": [dict(c) for c in self.claims]}


def _job(job_id: str, gpus: float) -> Row:
    return {
        "job_id": job_id,
        "user": "u",
        "account": "a",
        "cpus_allocated": 1.0,
        "gpus_allocated": gpus,
        "cpu_seconds": 0.0,
        "memory_bytes": 0,
    }


def test_a_job_on_a_mig_instance_is_allocated_its_fraction(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid in (21180, 21181, 21198):  # the capture's processes, all in GPU instance 2 (3g)
        _cgroup(proc, pid, "880")
    fake = FakeNVML([H100_MIG])
    ctx = _ctx(fake, proc)
    # Slurm counts a MIG device as one GPU; the claim names the instance by UUID.
    claim = {"gpu_uuid": fake.devices[0].mig_devices[0].uuid, "job_id": "880"}
    result = Runner([GpuCollector(ctx), _Jobs(ctx, [_job("880", 1.0)], [claim])]).run()
    jobs = _pylist(result.tables["job"].to_arrow())
    assert jobs[0]["gpus_allocated"] == pytest.approx(3 / 7, rel=1e-6)
    gpus = _pylist(result.tables["gpu"].to_arrow())
    held = {r["gpu_uuid"]: r["job_id"] for r in gpus if r["mig_profile"]}
    assert held[fake.devices[0].mig_devices[0].uuid] == "880"
    assert "gpu_job" not in result.tables  # one job per instance: MIG is not a shared GPU


def test_rounds_assemble_from_checked_columns_as_from_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Runner hands assembly the columns it checked, with what attribution changed in place
    (ATTRIBUTION_WRITES) read again: the frames are those the rows make, a MIG job's allocation,
    shared GPUs and attributed GPUs included."""
    proc = tmp_path / "proc"
    for pid in (21180, 21181, 21198):
        _cgroup(proc, pid, "880")
    fake = FakeNVML([H100_MIG, H100_LOADED])
    ctx = _ctx(fake, proc)
    claims = [
        {"gpu_uuid": fake.devices[0].mig_devices[0].uuid, "job_id": "880"},
        {"gpu_index": 1, "job_id": "881"},
        {"gpu_index": 1, "job_id": "882"},
    ]
    jobs = [_job("880", 1.0), _job("881", 1.0), _job("882", 1.0)]
    compared: list[str] = []
    real = base.assemble

    def both(partial: Any, time_ns: int, node: str, checked: bool = False, columns: Any = None):
        given, _ = real(partial, time_ns, node, checked, columns)
        made, _ = real(partial, time_ns, node, checked)
        assert set(given) == set(made)
        for table, frame in given.items():
            assert frame.to_arrow().equals(made[table].to_arrow()), table
            compared.append(table)
        return real(partial, time_ns, node, checked, columns)

    monkeypatch.setattr(base, "assemble", both)
    result = Runner([GpuCollector(ctx), _Jobs(ctx, jobs, claims)]).run()
    assert set(compared) == {"gpu", "job", "gpu_job"}
    allocated = {r["job_id"]: r["gpus_allocated"] for r in _pylist(result.tables["job"].to_arrow())}
    assert allocated["880"] == pytest.approx(3 / 7, rel=1e-6)
    assert {r["job_id"] for r in _pylist(result.tables["gpu_job"].to_arrow())} == {"881", "882"}


# ------------------------------------------------------------------ per-process utilisation


def test_process_utilization_returns_each_sample_once() -> None:
    clock = FakeClock(start=1000.0)
    fake = FakeNVML([H100_LOADED], clock=clock)
    gateway = Gateway(fake)
    handle = gateway.call("nvmlDeviceGetHandleByIndex", 0)
    clock.advance(2.0)
    first = gateway.process_utilization("gpu0", handle)
    assert first and {s.pid for s in first} == {11345}  # gpu_burn; memhog runs no kernels
    assert all(s.sm_ratio == 1.0 for s in first)
    stamps = [s.time_us for s in first]
    assert stamps == sorted(stamps) and stamps[-1] == 1_002_000_000  # µs
    assert gateway.process_utilization("gpu0", handle) == []  # NotFound: nothing new
    clock.advance(1.0)
    again = gateway.process_utilization("gpu0", handle)
    assert again is not None
    assert [s.time_us for s in again] == [1_002_500_000, 1_003_000_000]


def test_process_utilization_unsupported_is_null_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNVML([H100_LOADED], missing_symbols=["nvmlDeviceGetProcessUtilization"])
    gateway = Gateway(fake)
    handle = gateway.call("nvmlDeviceGetHandleByIndex", 0)
    with caplog.at_level(logging.WARNING, logger="tally"):
        for _ in range(3):
            assert gateway.process_utilization("gpu0", handle) is None
    assert sum("nvmlDeviceGetProcessUtilization" in r.message for r in caplog.records) == 1
    fake = FakeNVML([H100_MIG])  # per-process utilisation is not there in MIG mode
    gateway = Gateway(fake)
    handle = gateway.call("nvmlDeviceGetHandleByIndex", 0)
    assert gateway.process_utilization("gpu0", handle) is None


# ------------------------------------------------------------------ gpu_job rows


def _shared_gpu(tmp_path: Path, clock: FakeClock) -> tuple[FakeNVML, Path]:
    """One H100 time-sliced by jobs 501 (pids 100, 101) and 502 (pid 200)."""
    proc = tmp_path / "proc"
    _cgroup(proc, 100, "501")
    _cgroup(proc, 101, "501")
    _cgroup(proc, 200, "502")
    fake = FakeNVML([H100_LOADED, H100_IDLE], clock=clock)
    fake.set_processes(
        0,
        [
            ProcessProfile(100, 4000 * MiB, sm_util_pct=30),
            ProcessProfile(101, 1000 * MiB, sm_util_pct=20),
            ProcessProfile(200, 2000 * MiB, sm_util_pct=40),
        ],
    )
    fake.set_processes(1, [])
    return fake, proc


def _gpu_job(result: Any) -> dict[str, dict[str, Any]]:
    table = validate(result.tables["gpu_job"].to_arrow(), "gpu_job")
    return {r["job_id"]: r for r in _pylist(table)}


def test_a_gpu_held_by_two_jobs_gets_a_gpu_job_row_each(tmp_path: Path) -> None:
    clock = FakeClock(start=1000.0)
    fake, proc = _shared_gpu(tmp_path, clock)
    runner = Runner([GpuCollector(_ctx(fake, proc))])
    clock.advance(5.0)
    rows = _gpu_job(runner.run())
    assert set(rows) == {"501", "502"}
    uuid = fake.devices[0].uuid
    assert {r["gpu_uuid"] for r in rows.values()} == {uuid}  # GPU 1 is idle, GPU 0 shared
    assert rows["501"]["share"] == rows["502"]["share"] == 0.5
    assert rows["501"]["sm_utilization_ratio"] == pytest.approx(0.5)  # 30 % + 20 %
    assert rows["502"]["sm_utilization_ratio"] == pytest.approx(0.4)
    assert rows["501"]["memory_used_bytes"] == 5000 * MiB
    assert rows["502"]["memory_used_bytes"] == 2000 * MiB


def test_gpu_processes_cgroup_files_are_opened_once_and_follow_a_pid_used_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU process's /proc/<pid>/cgroup is kept open between rounds (opening it cost twice the
    read); a process that ended and whose PID another job's process took is read afresh."""
    clock = FakeClock(start=1000.0)
    fake, proc = _shared_gpu(tmp_path, clock)
    opened: list[str] = []
    real = files.read_text

    def counted(path: Any) -> str:
        opened.append(str(path))
        return real(path)

    monkeypatch.setattr(files, "read_text", counted)
    runner = Runner([GpuCollector(_ctx(fake, proc))])
    for _ in range(3):
        clock.advance(1.0)
        assert set(_gpu_job(runner.run())) == {"501", "502"}
    assert sorted(opened) == sorted(f"{proc}/{pid}/cgroup" for pid in (100, 101, 200))
    shutil.rmtree(proc / "200")  # job 502's process ends; its PID goes to one of job 503's
    _cgroup(proc, 200, "503")
    clock.advance(1.0)
    assert set(_gpu_job(runner.run())) == {"501", "503"}
    fake.set_processes(0, [ProcessProfile(100, 4000 * MiB, sm_util_pct=30)])
    clock.advance(1.0)
    runner.run()
    assert len(runner._pid_files) == 1  # the files of processes no longer listed are closed
    runner.close()
    assert len(runner._pid_files) == 0


def test_utilisation_is_the_mean_over_this_rounds_samples_only(tmp_path: Path) -> None:
    clock = FakeClock(start=1000.0)
    fake, proc = _shared_gpu(tmp_path, clock)
    runner = Runner([GpuCollector(_ctx(fake, proc))])
    clock.advance(5.0)
    runner.run()
    # Job 502 works harder for the first half of the next round, then stops running kernels.
    busy = [ProcessProfile(100, 0, sm_util_pct=30), ProcessProfile(200, 0, sm_util_pct=80)]
    fake.set_processes(0, busy)
    clock.advance(5.0)
    fake.set_processes(0, [busy[0], ProcessProfile(200, 0, sm_util_pct=0)])
    clock.advance(5.0)
    rows = _gpu_job(runner.run())
    # 502 was sampled only while busy: its samples say 80 %, none from the first round count.
    assert rows["502"]["sm_utilization_ratio"] == pytest.approx(0.8)
    assert rows["501"]["sm_utilization_ratio"] == pytest.approx(0.3)


def test_no_samples_give_null_utilisation_and_shares_from_claims(tmp_path: Path) -> None:
    clock = FakeClock(start=1000.0)
    fake, proc = _shared_gpu(tmp_path, clock)
    fake.set_processes(0, [ProcessProfile(100, 0), ProcessProfile(200, 0)])  # no kernels
    ctx = _ctx(fake, proc)
    # Slurm shards: job 501 holds 1 of 4 shards of GPU 0, job 502 3 of 4.
    claims = [
        {"gpu_index": 0, "job_id": "501", "share": 0.25},
        {"gpu_index": 0, "job_id": "502", "share": 0.75},
    ]
    runner = Runner([GpuCollector(ctx), _Jobs(ctx, [], claims)])
    clock.advance(5.0)
    rows = _gpu_job(runner.run())
    assert (rows["501"]["share"], rows["502"]["share"]) == (0.25, 0.75)
    assert rows["501"]["sm_utilization_ratio"] is None
    assert rows["502"]["sm_utilization_ratio"] is None


def test_one_job_on_a_gpu_writes_no_gpu_job_rows(tmp_path: Path) -> None:
    clock = FakeClock(start=1000.0)
    fake, proc = _shared_gpu(tmp_path, clock)
    fake.set_processes(0, [ProcessProfile(100, 0, sm_util_pct=50)])
    clock.advance(5.0)
    result = Runner([GpuCollector(_ctx(fake, proc))]).run()
    assert "gpu_job" not in result.tables
    jobs = result.tables["gpu"].to_arrow().column("job_id").to_pylist()
    assert jobs == ["501", None]


# ------------------------------------------------------------------ exposition


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    }


def test_shared_gpu_series_from_the_live_state_pass_promtool(tmp_path: Path, promtool: str) -> None:
    clock = FakeClock(start=1_800_000_000.0)  # sample times are checked to lie past 2000
    fake, proc = _shared_gpu(tmp_path, clock)
    runner = Runner([GpuCollector(_ctx(fake, proc))], clock_ns=lambda: int(clock.now() * 1e9))
    state = State()
    for _ in range(3):
        clock.advance(5.0)
        result = runner.run()
        for name, table in result.tables.items():
            state.ingest(name, table)
    snapshot = state.snapshot(result.status)
    text = TallyCollector(lambda: snapshot).render_text()
    check = promtool_check(promtool, text)
    assert check.returncode == 0, check.stdout + check.stderr
    samples = _samples(text)
    uuid = fake.devices[0].uuid
    for job, utilization in (("501", 0.5), ("502", 0.4)):
        labels = (("gpu", "0"), ("job", job), ("node", "gpu-a1"), ("uuid", uuid))
        assert samples[("tally_gpu_job_utilization_ratio", labels)] == pytest.approx(utilization)
        assert samples[("tally_gpu_job_share", labels)] == 0.5
        # every holder joins the GPU through tally_gpu_job_info (SPEC §6), not only the one
        # its gpu row names
        assert samples[("tally_gpu_job_info", labels)] == 1.0
    assert not any(k[0] == "tally_gpu_job_share" and ("gpu", "1") in k[1] for k in samples)
    info = [k for k in samples if k[0] == "tally_gpu_job_info" and ("uuid", uuid) in k[1]]
    assert len(info) == 2


def test_replay_joins_every_holder_of_a_gpu_no_row_names(tmp_path: Path, promtool: str) -> None:
    """Kubernetes time-slicing replicas: the gpu rows name no job (only gpu_job rows do); each
    pod holding the GPU at its newest row gets its tally_gpu_job_info series, once, from stored
    rows (Arrow, not Frames); a pod that let it go 20 s ago (ns/c) is listed no more."""
    import pyarrow.parquet as pq

    from telemetry.store.layout import partition_dir
    from tests.support.cli import tally
    from tests.support.tables import T0, gpu_table

    root = tmp_path / "ds"
    offsets = [0.0, 10.0, 20.0, 30.0]
    gpu = gpu_table("k1", "GPU-k", 0, offsets, util=0.8)
    directory = partition_dir(root, "gpu", T0, "k1")
    directory.mkdir(parents=True)
    pq.write_table(gpu, directory / "part-0.parquet")
    held = [("ns/a", 0.75, offsets), ("ns/b", 0.25, offsets), ("ns/c", 0.5, offsets[:2])]
    rows = [
        {"time": T0 + int(t * 1e9), "node": "k1", "gpu_uuid": "GPU-k", "job_id": job,
         "share": share, "sm_utilization_ratio": None, "memory_used_bytes": None}
        for job, share, times in held for t in times
    ]  # fmt: skip
    shared = validate(pa.Table.from_pylist(rows, schema=SCHEMAS["gpu_job"]), "gpu_job")
    directory = partition_dir(root, "gpu_job", T0, "k1")
    directory.mkdir(parents=True)
    pq.write_table(shared, directory / "part-0.parquet")
    result = tally("replay", str(root), "--once")
    assert result.returncode == 0, result.stderr
    assert promtool_check(promtool, result.stdout.encode()).returncode == 0
    info = [x for x in result.stdout.splitlines() if x.startswith("tally_gpu_job_info{")]
    assert info == [
        'tally_gpu_job_info{gpu="0",job="ns/a",node="k1",uuid="GPU-k"} 1.0',
        'tally_gpu_job_info{gpu="0",job="ns/b",node="k1",uuid="GPU-k"} 1.0',
    ]


def test_claims_by_uuid_with_replica_shares_name_a_whole_gpu(tmp_path: Path) -> None:
    """Kubernetes time-slicing: pods hold 2 and 1 of a GPU's 4 replicas, named by UUID."""
    clock = FakeClock(start=1000.0)
    fake, proc = _shared_gpu(tmp_path, clock)
    fake.set_processes(0, [])  # allocated, not yet running
    ctx = _ctx(fake, proc)
    uuid = fake.devices[0].uuid
    claims = [
        {"gpu_uuid": uuid, "job_id": "pod-a", "share": 0.5},
        {"gpu_uuid": uuid, "job_id": "pod-b", "share": 0.25},
    ]
    clock.advance(5.0)
    result = Runner([GpuCollector(ctx), _Jobs(ctx, [], claims)]).run()
    rows = _gpu_job(result)
    assert {j: r["share"] for j, r in rows.items()} == {"pod-a": 0.5, "pod-b": 0.25}
    assert all(r["memory_used_bytes"] == 0 for r in rows.values())  # no process yet
    assert result.tables["gpu"].to_arrow().column("job_id").to_pylist() == ["pod-a", None]


def test_process_samples_are_asked_of_shared_gpus_only_and_cover_the_last_round(
    tmp_path: Path,
) -> None:
    """NVML's per-process samples are asked for where several jobs hold a GPU (its gpu_job rows
    need them), not every round of every GPU; a GPU asked again after rounds held by one job
    gives its last round's samples, not all NVML's buffer kept since it was last asked."""
    name = "nvmlDeviceGetProcessUtilization"
    clock = FakeClock(start=1000.0)
    fake, proc = _shared_gpu(tmp_path, clock)
    fake.set_processes(0, [ProcessProfile(100, 0, sm_util_pct=90)])  # job 501 alone

    def asked() -> int:  # calls of NVML's C function (the collector calls no wrapper)
        return fake.c_calls[name]

    runner = Runner([GpuCollector(_ctx(fake, proc))])
    clock.advance(1.0)
    runner.run()  # NVML's time of a previous round unknown yet: asked at once
    first = asked()
    assert first == 2  # both GPUs
    for _ in range(5):
        clock.advance(1.0)
        assert "gpu_job" not in runner.run().tables
    assert asked() == first  # nobody needed them
    # job 502 joins GPU 0 with a light process; job 501's runs lighter from now on
    fake.set_processes(
        0,
        [ProcessProfile(100, 0, sm_util_pct=30), ProcessProfile(200, 0, sm_util_pct=10)],
    )
    clock.advance(1.0)
    rows = _gpu_job(runner.run())
    assert asked() == first + 1  # GPU 0 alone
    assert rows["501"]["sm_utilization_ratio"] == pytest.approx(0.3)  # not 90 % of before
    assert rows["502"]["sm_utilization_ratio"] == pytest.approx(0.1)
    clock.advance(1.0)
    rows = _gpu_job(runner.run())
    assert rows["501"]["sm_utilization_ratio"] == pytest.approx(0.3)
    assert asked() == first + 2
