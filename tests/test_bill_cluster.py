"""Bills larger than one machine (SPEC §9): node partitions, and time slices of a node, billed on
a process pool or Dask distributed give the single-process bill's bytes; the merge is exact; a
failure is never a partial bill; a pool or Dask worker killed mid-run costs a retry, not a wrong
bill."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry.billing import partition_plan, partitioned
from telemetry.billing.accounting import load_accounting
from telemetry.billing.bill import compute_bill
from telemetry.billing.engine import Biller
from telemetry.billing.inventory import parse_inventory
from telemetry.billing.partition_merge import exact_merge, merge_parts
from telemetry.billing.partition_tasks import BillPart, BillTask, PartitionFailed
from telemetry.billing.windows import Windows
from telemetry.billing.writers import to_json
from telemetry.errors import TallyError
from telemetry.store.dataset import ReadStats, node_partitions
from tests.support.bill_partitions import (
    CUTS,
    INVENTORY,
    bill_or_die,
    boundary_tables,
    generate,
    sacct_parsable,
    set_aside_then_die,
    write_hourly,
    write_split,
)
from tests.support.bill_rows import T0, bill_of, iso
from tests.support.cli import tally
from tests.support.net import free_port
from tests.support.units import NS

distributed = pytest.importorskip("distributed")

INV = parse_inventory(INVENTORY, "inv.toml")


@pytest.fixture(scope="module")
def threads() -> Iterator[Any]:
    """A Dask client on a LocalCluster of threads in this process (quick)."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def _dataset(root: Path, seed: int, nodes: int = 5, stray: bool = False) -> Path:
    write_split(root, generate(seed, nodes), seed, stray)
    return root


def _make(root: Path) -> Any:
    def make(node_dirs: tuple[str, ...], files: tuple[str, ...], time_slice: Any = None,
             known: frozenset[str] = frozenset()) -> BillTask:  # fmt: skip
        return BillTask(root, node_dirs, files, INV, 3600, None, None, time_slice=time_slice,
                        known=known)  # fmt: skip

    return make


def _node_bytes(root: Path) -> int:
    return max(sum(f.stat().st_size for f in root.glob(f"*/*/{d}/*")) for d in
               {p.name for p in root.glob("*/*/node=*")})  # fmt: skip


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    seed=st.integers(0, 2**31),
    workers=st.sampled_from([2, 3]),
    window=st.sampled_from([900, 3600, "day"]),
    budget=st.sampled_from([150, 2_000_000]),
    accounted=st.booleans(),
    slices=st.sampled_from([None, 2, 5, 13]),
    ranged=st.booleans(),
)
def test_every_executor_gives_the_single_process_bytes(
    threads: Any,
    seed: int,
    workers: int,
    window: int | str,
    budget: int,
    accounted: bool,
    slices: int | None,
    ranged: bool,
) -> None:
    """Nodes whole, or cut into time slices (``slices`` of the largest node's bytes each: the
    cuts fall anywhere, through files of shuffled rows), give the bytes of one process."""
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        root = _dataset(Path(tmp) / "data", seed)
        records = None
        if accounted:
            sacct = Path(tmp) / "sacct.txt"
            sacct.write_text(sacct_parsable(generate(seed, 5)))
            records = load_accounting([sacct])
        kw: dict[str, Any] = {"accounting": records, "budget_rows": budget}
        if ranged:  # a range that starts and ends inside slices
            kw.update(start=iso(T0 - 1500 * NS), end=iso(T0 + 1700 * NS))
        if slices is not None:
            patch.setattr(partition_plan, "SLICE_BYTES", _node_bytes(root) // slices)
            tasks, _ = partition_plan.plan_tasks(root, 8, _make(root), 60 * NS)
            assert sum(t.time_slice is not None for t in tasks) >= slices
        one = to_json(bill_of(root, INV, window, **kw))  # type: ignore[arg-type]
        assert b'"jobs": [' in one and b"pod-" in one  # shared GPUs were billed
        pool = to_json(bill_of(root, INV, window, workers=workers, **kw))  # type: ignore[arg-type]
        dask = to_json(bill_of(root, INV, window, cluster=threads, **kw))  # type: ignore[arg-type]
        assert pool == one
        assert dask == one


def test_a_gap_a_duplicate_and_restarts_on_slice_cuts_bill_as_one_process(
    threads: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from telemetry.billing.report import collect_report

    rows, duplicates = boundary_tables()
    root = tmp_path / "data"
    write_hourly(root, rows, duplicates)
    monkeypatch.setattr(partition_plan, "SLICE_BYTES", 1)
    monkeypatch.setattr(partition_plan, "slice_cuts", lambda spans, slices: list(CUTS))
    tasks, _ = partition_plan.plan_tasks(root, 8, _make(root), 60 * NS)
    assert [t.time_slice.start_ns if t.time_slice else "whole" for t in tasks] == [None, *CUTS]
    # a slice reads its hour's files and the hour before, where its lookback lies
    stamps = [sorted({Path(f).name[5:20] for f in t.files}) for t in tasks]
    assert stamps == [["20260901T000000"], ["20260901T000000", "20260901T010000"],
                      ["20260901T010000", "20260901T020000"],
                      ["20260901T020000", "20260901T030000", "20260901T040000"]]  # fmt: skip
    one = bill_of(root, INV, 3600)
    assert sum(p["gap_hours"] for p in one.pools) * 3600 == pytest.approx(300 + 4300 + 200)
    assert {j["job_id"] for j in one.jobs} >= {"42", "43", "pod-x", "pod-y"}
    for window in (900, 3600, "day"):
        for span in ({}, {"start": iso(CUTS[0]), "end": iso(CUTS[2])}):
            want = to_json(bill_of(root, INV, window, **span))  # type: ignore[arg-type]
            assert to_json(bill_of(root, INV, window, workers=2, **span)) == want  # type: ignore[arg-type]
            assert to_json(bill_of(root, INV, window, cluster=threads, **span)) == want  # type: ignore[arg-type]
    kw: dict[str, Any] = {"warn": lambda _: None, "progress": lambda *_: None}
    whole = collect_report(root, INV, 300, **kw)
    sliced = collect_report(root, INV, 300, workers=2, **kw)
    assert to_json(sliced.bill) == to_json(whole.bill)
    for mine, theirs in ((sliced.gpu, whole.gpu), (sliced.cpu, whole.cpu)):
        assert mine.labels == theirs.labels and mine.details == theirs.details
        for name, matrix in theirs.sums.items():
            assert np.array_equal(mine.sums[name], matrix), name
    assert whole.gpu.sums["gap_us"].sum() > 0
    assert sliced.health is not None and whole.health is not None
    for key, gpu in whole.health.gpus.items():
        assert sliced.health.gpus[key].samples == gpu.samples


def test_slice_cuts_fall_on_whole_hours_and_follow_the_bytes() -> None:
    hour = 3600 * NS
    hourly = [(T0 + k * hour, T0 + (k + 1) * hour - 10 * NS, 1000) for k in range(8)]
    assert partition_plan.slice_cuts(hourly, 4) == [T0 + 2 * hour, T0 + 4 * hour, T0 + 6 * hour]
    # most bytes in the last hour: the cuts crowd there (not on whole hours, which would merge
    # two slices)
    skewed = [(T0, T0 + 3 * hour - 1, 300), (T0 + 3 * hour, T0 + 4 * hour - 1, 900)]
    cuts = partition_plan.slice_cuts(skewed, 4)
    assert len(cuts) == 3 and cuts[0] == T0 + 3 * hour
    assert [round((c - T0 - 3 * hour) / NS) for c in cuts[1:]] == [1200, 2400]
    assert partition_plan.slice_cuts([(T0, T0, 10**9)], 8) == []  # one instant: nothing to cut
    assert partition_plan.slice_cuts(hourly, 1) == []


def test_every_time_slice_reads_the_journal_of_the_current_hour(tmp_path: Path) -> None:
    """The current hour's journal still grows while a bill runs: rows appended after the plan
    may belong to any later slice, so every slice reads it (each counts the rows it owns)."""
    root = _dataset(tmp_path / "data", 26, nodes=1)
    newest = sorted(root.glob("cpu/*/node=*/*.parquet"))[-1]
    journal = newest.with_suffix(".arrows")
    table = pq.read_table(newest)
    with pa.ipc.new_stream(str(journal), table.schema) as stream:
        stream.write_table(table.slice(0, 1))  # its first row only, so far
    newest.unlink()
    (by_table,) = node_partitions(root).values()
    size = sum(f.stat().st_size for paths in by_table.values() for f in paths)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(partition_plan, "SLICE_BYTES", size // 4)
        slices = partition_plan.time_slices(root, by_table, size, 60 * NS)
    assert len(slices) >= 3
    name = str(journal.relative_to(root))
    assert all(name in files for _, files in slices)


def test_rows_outside_their_node_directory_are_billed_together(
    threads: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A series that crosses partitions (rows written into another node's directory): the
    partitions that share a node are billed again as one, so the bill is still the same."""
    with tempfile.TemporaryDirectory() as tmp:
        root = _dataset(Path(tmp) / "data", 7, stray=True)
        one = to_json(bill_of(root, INV, 3600))
        with caplog.at_level(logging.INFO, logger="tally.bill"):
            assert to_json(bill_of(root, INV, 3600, cluster=threads)) == one
        assert "share a node: billing them together" in caplog.text


def test_a_wide_key_space_and_empty_partitions_merge(threads: Any, tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", 3, nodes=9)
    empty = root / "cpu" / "date=2026-09-01" / "node=idle"
    empty.mkdir(parents=True)
    pq.write_table(pq.read_table(next(root.glob("cpu/*/node=cpu-c1/*.parquet"))).slice(0, 0),
                   empty / "x.parquet")  # fmt: skip
    one = to_json(bill_of(root, INV, 60))
    assert to_json(bill_of(root, INV, 60, cluster=threads)) == one


# --- the exact merge ----------------------------------------------------------------------------


def test_merge_adds_beyond_float_precision_and_refuses_a_wrap() -> None:
    big = 2**62 + 12345
    keys = [np.array([0, 1], np.int64), np.array([3, 3], np.int64)]
    a = (keys, [np.array([big, -5], np.int64)])
    b = (keys, [np.array([2**62 - 7 - 2**62 + 2**61, -(2**62)], np.int64)])
    _, sums = exact_merge([a, b], 2, 1)
    assert sums[0].tolist() == [big + 2**61 - 7, -5 - 2**62]
    with pytest.raises(TallyError, match="does not fit in 64 bits"):
        exact_merge([a, (keys, [np.array([2**62, 0], np.int64)])], 2, 1)
    with pytest.raises(TallyError, match="does not fit in 64 bits"):
        exact_merge([(keys, [np.array([-(2**63), 0], np.int64)])] * 2, 2, 1)
    # many parts of the same key: as Python ints add them
    values = [2**60 - i for i in range(7)]
    parts = [([np.array([5]), np.array([1])], [np.array([v], np.int64)]) for v in values]
    assert exact_merge(parts, 2, 1)[1][0].tolist() == [sum(values)]


def _part(order: int, owner: tuple[int, str, str]) -> BillPart:
    empty = [np.zeros(0, np.int64)] * 2
    return BillPart(
        node_dirs=(f"node=n{order}",), nodes=["n1"], jobs=["j"], names=[owner[1], owner[2]],
        pool_keys=empty, pool_sums=[np.zeros(0, np.int64)] * 6, job_keys=[], job_sums=[],
        owner={(0, 0): (owner[0], 0, 1)}, rows=1, duplicates=0, shared_intervals=0,
        first_ns=owner[0], last_ns=owner[0], stats=ReadStats(),
    )  # fmt: skip


def test_owners_newest_first_and_ties_do_not_depend_on_order() -> None:
    windows = Windows(3600)
    a, b, c = _part(0, (5, "ann", "x")), _part(1, (9, "bob", "y")), _part(2, (9, "cid", "z"))
    seen = set()
    for parts in ([a, b, c], [c, b, a], [b, c, a]):
        biller, _ = merge_parts(INV, windows, None, None, parts)
        ((time, user, tenant),) = biller.owner.values()
        seen.add((time, biller.names.values[user], biller.names.values[tenant]))
    assert seen == {(9, "cid", "z")}


# --- failures -----------------------------------------------------------------------------------


def test_bad_data_in_a_partition_is_exit_2_naming_its_files(tmp_path: Path) -> None:
    """A file found damaged while its rows are read that cannot be set aside (something is in
    the way of quarantine/) fails its partition: exit 2, one line naming the partition's files
    and the file, no partial bill."""
    root = _dataset(tmp_path / "data", 11)
    victim = sorted(root.glob("job/*/node=gpu-a1/*.parquet"))[0]
    column = pq.ParquetFile(victim).metadata.row_group(0).column(0)
    data = bytearray(victim.read_bytes())
    start = column.data_page_offset + 10  # the footer stays whole: found only while reading
    for i in range(start, column.data_page_offset + column.total_compressed_size - 2):
        data[i] ^= 0x5A
    victim.write_bytes(bytes(data))
    (root / "quarantine").write_text("a file where the quarantine directory would be")
    inv = tmp_path / "inv.toml"
    inv.write_text(INVENTORY)
    result = tally("--quiet", "bill", str(root), "--inventory", str(inv), "--workers", "2")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""  # no partial bill
    (line,) = result.stderr.strip().splitlines()
    assert "partition of" in line and "node=gpu-a1" in line and str(victim) in line
    assert "cannot be moved to quarantine" in line


def test_a_bug_in_a_partition_fails_the_bill_naming_its_files(
    threads: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _dataset(tmp_path / "data", 12)
    real = Biller.add

    def broken(self: Biller, chunk: Any) -> None:
        if any(t.num_rows and "gpu-b2" in t.column("node").to_pylist() for t in chunk.values()):
            raise ValueError("boom")
        real(self, chunk)

    monkeypatch.setattr(Biller, "add", broken)
    with pytest.raises(PartitionFailed, match=r"node=gpu-b2.*boom"):
        bill_of(root, INV, 3600, cluster=threads)


def test_bad_cluster_spec_and_workers_are_usage_errors(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", 13, nodes=2)
    inv = tmp_path / "inv.toml"
    inv.write_text(INVENTORY)
    for flags in (["--cluster", "yarn://x"], ["--cluster", "local:0"], ["--workers", "0"]):
        result = tally("bill", str(root), "--inventory", str(inv), *flags)
        assert result.returncode == 2, (flags, result.stderr)
        assert "Traceback" not in result.stderr


def test_cli_bill_on_workers_and_a_local_cluster_matches(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", 14, nodes=4)
    inv = tmp_path / "inv.toml"
    inv.write_text(INVENTORY)
    base = ["--quiet", "bill", str(root), "--inventory", str(inv)]
    outputs = [tally(*base, *flags) for flags in
               (["--workers", "1"], ["--workers", "2"], ["--cluster", "local:2"])]  # fmt: skip
    for result in outputs:
        assert result.returncode == 0, result.stderr
    assert outputs[1].stdout == outputs[0].stdout
    assert outputs[2].stdout == outputs[0].stdout
    html = tmp_path / "report.html"
    report = tally("--quiet", "report", str(root), "--inventory", str(inv), "--out", str(html),
                   "--workers", "2")  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "gpu-own" in html.read_text()
    # tally plan runs on the same executors (SPEC §9): the same plan
    plans = [tally("--quiet", "plan", str(root), "--inventory", str(inv), *flags)
             for flags in (["--workers", "1"], ["--workers", "2"])]  # fmt: skip
    assert plans[0].returncode == plans[1].returncode == 0, plans[1].stderr
    assert plans[1].stdout == plans[0].stdout and '"capacity"' in plans[0].stdout


# --- a pool worker killed mid-run ---------------------------------------------------------------


def test_a_killed_pool_worker_costs_a_retry_not_a_wrong_bill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = _dataset(tmp_path / "data", 22, nodes=6)
    want = to_json(bill_of(root, INV, 3600))
    (tmp_path / "die-once").touch()
    monkeypatch.setattr(partitioned, "bill_partition", bill_or_die)
    with caplog.at_level(logging.WARNING, logger="tally.executors"):
        assert to_json(bill_of(root, INV, 3600, workers=2)) == want
    assert not (tmp_path / "die-once").exists()  # a worker did die
    assert "again on a fresh pool" in caplog.text


@pytest.mark.parametrize("slices", [1, 4])
def test_a_worker_lost_after_setting_a_file_aside_leaves_nothing_of_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slices: int
) -> None:
    """A worker sets a file aside (quarantine) and dies before it reports: its task runs again
    without the file, while the node's other time slices may have read the file's rows. The
    node is billed again whole, and the bill is the bill without the file, saying it was set
    aside."""
    root = _dataset(tmp_path / "data", 25, nodes=3)
    node = sorted(p.name for p in root.glob("gpu/*/node=*"))[0]
    files = sorted(root.glob(f"gpu/*/{node}/*.parquet"))
    victim = files[len(files) // 2]
    name = str(victim.relative_to(root))
    (tmp_path / "set-aside-then-die").write_text(name)
    if slices > 1:
        monkeypatch.setattr(partition_plan, "SLICE_BYTES", _node_bytes(root) // slices)
    monkeypatch.setattr(partitioned, "bill_partition", set_aside_then_die)
    said: list[str] = []
    got = json.loads(to_json(compute_bill(root, INV, 3600, warn=said.append, workers=2)))
    assert (tmp_path / "set-aside-then-die.claimed").exists()  # a worker did set it aside and die
    assert not victim.exists() and (root / "quarantine" / name).exists()
    want = json.loads(to_json(bill_of(root, INV, 3600)))  # the dataset without the file
    assert want["input"]["files_quarantined"] == 0
    assert got["input"]["files_quarantined"] == 1
    got["input"]["files_quarantined"] = 0
    assert got == want
    assert any(name in m and "worker that died" in m for m in said), said


def test_a_pool_worker_killed_every_time_fails_the_bill_naming_a_partition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from telemetry.cli import main

    root = _dataset(tmp_path / "data", 23, nodes=3)
    (tmp_path / "die-always").touch()
    inv = tmp_path / "inv.toml"
    inv.write_text(INVENTORY)
    monkeypatch.setattr(partitioned, "bill_partition", bill_or_die)
    out = tmp_path / "bill.json"
    code = main(["--quiet", "bill", str(root), "--inventory", str(inv), "--workers", "2",
                 "--out", str(out)])  # fmt: skip
    assert code == 1
    assert not out.exists()  # never a partial bill
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "worker process died" in line and "partition of" in line and "node=" in line


# --- a real scheduler and two workers; one killed mid-run ---------------------------------------


def _dask(*args: str) -> list[str]:
    return [sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]]


def test_killed_dask_worker_is_retried_and_the_bill_is_the_same(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", 21, nodes=8)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    started = [subprocess.Popen(
        _dask("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]  # fmt: skip
    try:
        for _ in range(2):
            started.append(subprocess.Popen(
                _dask("worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                      "--host", "127.0.0.1"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            pids = client.run(os.getpid)
            want = to_json(bill_of(root, INV, 3600))
            result: dict[str, Any] = {}

            def run() -> None:
                try:
                    result["bill"] = to_json(bill_of(root, INV, 3600, cluster=address,
                                                     budget_rows=100))  # fmt: skip
                except BaseException as exc:
                    result["error"] = exc

            billing = threading.Thread(target=run)
            billing.start()
            killed = None
            deadline = time.monotonic() + 120
            while killed is None and billing.is_alive() and time.monotonic() < deadline:
                busy = [w for w, keys in client.processing().items() if keys]
                if len(busy) == 2:  # both workers hold a partition: kill one mid-task
                    killed = busy[0]
                    os.kill(pids[killed], signal.SIGKILL)
                time.sleep(0.01)
            billing.join(timeout=240)
            assert killed is not None, "the bill finished before a worker could be killed"
            assert "error" not in result, result.get("error")
            assert result["bill"] == want
            assert killed not in client.scheduler_info()["workers"]
    finally:
        for proc in reversed(started):
            proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- the report ---------------------------------------------------------------------------------


def test_report_on_workers_has_the_single_process_sums(threads: Any, tmp_path: Path) -> None:
    from telemetry.billing.report import collect_report

    root = _dataset(tmp_path / "data", 31)
    kw: dict[str, Any] = {"warn": lambda _: None, "progress": lambda *_: None, "budget_rows": 1500}
    one = collect_report(root, INV, 900, **kw)
    for other in (collect_report(root, INV, 900, cluster=threads, **kw),
                  collect_report(root, INV, 900, workers=2, **kw)):  # fmt: skip
        assert to_json(other.bill) == to_json(one.bill)
        assert other.summary is not None and one.summary is not None
        assert to_json(other.summary) == to_json(one.summary)
        for mine, theirs in ((other.gpu, one.gpu), (other.cpu, one.cpu)):
            assert mine.labels == theirs.labels and mine.details == theirs.details
            assert mine.labels  # something was drawn
            for name, matrix in theirs.sums.items():
                assert np.array_equal(mine.sums[name], matrix), name
        assert other.health is not None and one.health is not None
        assert other.health.gpus.keys() == one.health.gpus.keys()
        assert other.health.nodes.keys() == one.health.nodes.keys()
