from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from telemetry.errors import TallyError
from telemetry.frame import Frame
from telemetry.schema import validate
from telemetry.store.layout import read_journal
from telemetry.store.writer import HOUR_NS, Store, compact
from telemetry.tables import CPU_MODES
from tests.support.tables import T0, cpu_table
from tests.support.units import NS


def _rounds(times_s: list[float]) -> list[pa.Table]:
    whole = cpu_table("n1", times_s)
    return [whole.slice(i, 1) for i in range(whole.num_rows)]


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if "quarantine" not in p.parts)


def _read_all(root: Path) -> pa.Table:
    parts = [pq.read_table(p) for p in _files(root, "*.parquet")]
    return pa.concat_tables(parts).sort_by("time")


def test_append_then_close_writes_valid_zstd_parquet_in_layout(tmp_path: Path) -> None:
    store = Store(tmp_path, "n1")
    store.open()
    rounds = _rounds([0, 5, 10, 15])
    for batch in rounds:
        store.append("cpu", batch)
    assert _files(tmp_path, "*.arrows"), "rows go to a journal while the hour is open"
    store.close()
    assert not _files(tmp_path, "*.arrows")
    files = _files(tmp_path, "*.parquet")
    assert len(files) == 1
    assert files[0].parent.relative_to(tmp_path).as_posix() == "cpu/date=2026-09-01/node=n1"
    meta = pq.read_metadata(files[0])
    assert meta.row_group(0).column(0).compression == "ZSTD"
    table = validate(pq.read_table(files[0]), "cpu")
    assert table.equals(pa.concat_tables(rounds))
    assert store.rows_written == 4


def test_rotates_at_each_hour_boundary(tmp_path: Path) -> None:
    store = Store(tmp_path, "n1")
    store.open()
    start = 3600 - 10  # 10 s before the first hour boundary after T0
    for batch in _rounds([start, start + 5, start + 10, start + 15, start + 3615]):
        store.append("cpu", batch)
    # Hours 0 and 1 ended when the first row of the following hour arrived; their journals are
    # compacted by a child process beside the appends, done once it is waited for.
    assert store.finish_compaction()
    assert len(_files(tmp_path, "*.parquet")) == 2
    assert len(_files(tmp_path, "*.arrows")) == 1
    store.close()
    files = _files(tmp_path, "*.parquet")
    assert len(files) == 3
    hours = [
        {int(t) // HOUR_NS for t in pq.read_table(f).column("time").cast(pa.int64()).to_pylist()}
        for f in files
    ]
    assert all(len(h) == 1 for h in hours)
    assert _read_all(tmp_path).num_rows == 5


def test_day_change_goes_to_a_new_date_partition(tmp_path: Path) -> None:
    store = Store(tmp_path, "n1")
    store.open()
    for batch in _rounds([86400 - 5, 86400]):
        store.append("cpu", batch)
    store.close()
    dates = sorted(p.parent.parent.name for p in _files(tmp_path, "*.parquet"))
    assert dates == ["date=2026-09-01", "date=2026-09-02"]


def test_node_names_are_escaped_in_the_partition(tmp_path: Path) -> None:
    store = Store(tmp_path, "odd/node name")
    store.open()
    store.append("cpu", cpu_table("odd/node name", [0]))
    store.close()
    (path,) = _files(tmp_path, "*.parquet")
    assert path.parent.name == "node=odd%2Fnode%20name"


def test_crash_leaves_journal_that_recovery_compacts_without_loss(tmp_path: Path) -> None:
    store = Store(tmp_path, "n1")
    store.open()
    rounds = _rounds([0, 5, 10])
    for batch in rounds:
        store.append("cpu", batch)
    # Simulate kill -9: the process vanishes without closing anything.
    (journal,) = _files(tmp_path, "*.arrows")
    store._lock_file.close()  # type: ignore[union-attr]  # the kernel drops the lock with the process
    recovered = Store(tmp_path, "n1")
    recovered.open()
    assert not journal.exists()
    assert _read_all(tmp_path).equals(pa.concat_tables(rounds))
    recovered.close()


def test_truncated_journal_keeps_every_complete_batch(tmp_path: Path) -> None:
    store = Store(tmp_path, "n1")
    store.open()
    rounds = _rounds([0, 5, 10, 15])
    for batch in rounds:
        store.append("cpu", batch)
    (journal,) = _files(tmp_path, "*.arrows")
    size = journal.stat().st_size
    with open(journal, "r+b") as f:  # cut into the last batch: a write in flight at the crash
        f.truncate(size - 40)
    data, clean = read_journal(journal)
    assert not clean and data is not None and data.num_rows == 3
    compact(journal, tmp_path, "cpu")
    assert _read_all(tmp_path).equals(pa.concat_tables(rounds[:3]))


def test_journal_already_compacted_before_crash_is_not_stored_twice(tmp_path: Path) -> None:
    store = Store(tmp_path, "n1")
    store.open()
    for batch in _rounds([0, 5]):
        store.append("cpu", batch)
    (journal,) = _files(tmp_path, "*.arrows")
    copy = journal.read_bytes()
    store.close()  # compacts and deletes the journal
    journal.write_bytes(copy)  # as if the crash came between rename and unlink
    again = Store(tmp_path, "n1")
    again.open()
    again.close()
    assert not _files(tmp_path, "*.arrows")
    assert _read_all(tmp_path).num_rows == 2


def test_recovery_removes_temporary_and_quarantines_unreadable_files(tmp_path: Path) -> None:
    part = tmp_path / "cpu" / "date=2026-09-01" / "node=n1"
    part.mkdir(parents=True)
    (part / "part-x.parquet.tmp").write_bytes(b"PAR1 half written")
    (part / "part-y.parquet").write_bytes(b"PAR1 no footer")
    (part / "part-z.arrows").write_bytes(b"\xff\xff\xff\xff garbage")
    (part / "part-empty.arrows").write_bytes(b"")
    other = tmp_path / "cpu" / "date=2026-09-01" / "node=n2"
    other.mkdir(parents=True)
    (other / "part-live.arrows").write_bytes(b"another node's journal")
    store = Store(tmp_path, "n1")
    store.open()
    store.close()
    assert sorted(p.name for p in part.iterdir()) == []
    quarantined = sorted(p.name for p in (tmp_path / "quarantine").rglob("*") if p.is_file())
    assert quarantined == ["part-y.parquet", "part-z.arrows"]
    assert (other / "part-live.arrows").exists(), "another node's files are not ours to touch"


def test_second_daemon_on_the_same_node_is_refused(tmp_path: Path) -> None:
    first = Store(tmp_path, "n1")
    first.open()
    with pytest.raises(TallyError, match="another tally daemon"):
        Store(tmp_path, "n1").open()
    Store(tmp_path, "n2").open()  # other nodes may share the directory
    first.close()


def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TallyError, match=r"data dir .*file"):
        Store(blocker / "data", "n1").open()


def test_write_failure_abandons_the_journal_and_the_next_append_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path, "n1")
    store.open()
    rounds = _rounds([0, 5, 10])
    store.append("cpu", rounds[0])
    journal = store._journals["cpu"]

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal.writer, "write_table", full, raising=False)
    with pytest.raises(OSError, match="No space"):
        store.append("cpu", rounds[1])
    monkeypatch.undo()
    store.append("cpu", rounds[2])
    store.close()
    # The abandoned journal holds round 0 and is compacted by the next start.
    Store(tmp_path, "n1").open()
    times = _read_all(tmp_path).column("time").cast(pa.int64()).to_pylist()
    assert times == [T0, T0 + 10 * NS]


_NO_ARROW_SCRIPT = """
import json, sys
from pathlib import Path
from telemetry.frame import Frame
from telemetry.store.writer import Store

root, rounds = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
store = Store(root, "n1", rotate_seconds=60)
store.open()
for i, (table, rows) in enumerate(rounds):
    store.append(table, Frame.from_rows(table, rows))
    if i == 3:
        store.rotate()  # SIGHUP
assert store.finish_compaction()
store.close()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "pyarrow")))
"""


def _round_rows(t_s: int) -> list[tuple[str, list[dict[str, object]]]]:
    time_ns = T0 + t_s * NS
    cpu = {"time": time_ns, "node": "n1", "cpus": 8, "memory_total_bytes": 2**40}
    cpu |= {f"{mode}_seconds": t_s * 0.1 + 1 / 3 for mode in CPU_MODES}
    cpu |= {"memory_available_bytes": 2**39, "energy_joules": None if t_s % 2 else 1.5e9}
    gpus: list[dict[str, object]] = [
        {
            "time": time_ns,
            "node": "n1",
            "gpu_uuid": f"GPU-{i}",
            "gpu_index": i,
            "gpu_model": "NVIDIA H100 80GB HBM3 — ü",
            "utilization_ratio": 0.1 * i,
            "memory_used_bytes": 2**33,
            "memory_total_bytes": 2**36,
            "power_watts": None,
            "job_id": "" if i else None,
            "xid_last": -(2**31),
        }
        for i in range(3)
    ]
    return [("cpu", [cpu]), ("gpu", gpus)]


def test_a_fresh_interpreter_stores_frames_without_ever_loading_pyarrow(tmp_path: Path) -> None:
    """The daemon's store path: open, append Frames over several slots, SIGHUP, close. The
    process itself never imports pyarrow; the Parquet twins appear and hold the same rows."""
    rounds = [r for t in range(0, 200, 20) for r in _round_rows(t)]
    spec = tmp_path / "rounds.json"
    spec.write_text(json.dumps(rounds))
    data = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-c", _NO_ARROW_SCRIPT, str(data), str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [], "the daemon's process loaded pyarrow"
    assert not _files(data, "*.arrows") and not list(data.rglob("*.tmp"))
    for table in ("cpu", "gpu"):
        frames = [Frame.from_rows(t, rows) for t, rows in rounds if t == table]
        want = pa.concat_tables([f.to_arrow() for f in frames])
        files = _files(data / table, "*.parquet")
        assert len(files) >= 4, "one file per 60 s slot, and one cut by the SIGHUP"
        got = pa.concat_tables([validate(pq.read_table(f), table) for f in files])
        key = "gpu_uuid" if table == "gpu" else "node"
        assert got.sort_by([("time", "ascending"), (key, "ascending")]).equals(want)


def _ignores_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_a_service_stop_signalling_the_compactor_child_costs_nothing(tmp_path: Path) -> None:
    """systemd signals the daemon's whole cgroup on stop: the hourly child it catches mid-way
    finishes its files (the daemon waits for it) instead of dying and being counted a failure."""
    store = Store(tmp_path, "n1")
    store.open()
    start = 3600 - 10
    for batch in _rounds([start, start + 5, start + 3605]):  # hour 0's journal goes to a child
        store.append("cpu", batch)
    child = store._child
    assert child is not None
    deadline = time.monotonic() + 10
    while not _ignores_sigterm(child.process.pid):
        # it loads pyarrow (a third of a second) after setting the signals aside
        assert child.process.poll() is None, "the child ended without setting SIGTERM aside"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(child.process.pid, signal.SIGTERM)
    assert store.finish_compaction()
    assert store.compaction_failures == 0
    store.close()
    assert _read_all(tmp_path).num_rows == 3


def test_the_compactor_child_is_asked_for_one_blas_thread_unless_the_operator_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hourly child imports NumPy (through pyarrow): without one BLAS thread asked for,
    OpenBLAS would start a spinning thread per core every hour."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")  # the operator's, kept
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    store = Store(tmp_path, "n1")
    store.open()
    start = 3600 - 10
    for batch in _rounds([start, start + 3605]):  # hour 0's journal goes to a child
        store.append("cpu", batch)
    child = store._child
    assert child is not None
    # as the child was started; empty for a moment while the kernel still sets up its exec
    deadline = time.monotonic() + 10
    while not (environ := Path(f"/proc/{child.process.pid}/environ").read_bytes()):
        assert child.process.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    variables = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
    assert store.finish_compaction()
    store.close()
    names = (b"OPENBLAS_NUM_THREADS", b"MKL_NUM_THREADS", b"OMP_NUM_THREADS")
    assert [variables.get(name) for name in names] == [b"4", b"1", b"1"]
    assert "MKL_NUM_THREADS" not in os.environ  # the daemon's own environment is left alone


def test_recovery_that_cannot_start_a_child_is_said_and_the_daemon_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from telemetry.store import writer

    def refuse(*args: object, **kwargs: object) -> None:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    said: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = said.append  # type: ignore[method-assign]
    monkeypatch.setattr(writer.log, "disabled", False)
    level = writer.log.level
    writer.log.setLevel(logging.WARNING)  # whatever an earlier test made of the tally loggers
    writer.log.addHandler(handler)
    monkeypatch.setattr(writer.subprocess, "Popen", refuse)
    store = Store(tmp_path, "n1")
    try:
        store.open()  # no raise: what a crash left stays readable until the next start
    finally:
        writer.log.removeHandler(handler)
        writer.log.setLevel(level)
    assert store.compaction_failures == 1
    assert any("cannot start the compactor for recovery" in r.getMessage() for r in said)
    store.append("cpu", _rounds([0])[0])
    monkeypatch.undo()
    store.close()
    assert _read_all(tmp_path).num_rows == 1


def test_recovery_quarantines_a_parquet_file_whose_column_name_is_not_utf8(tmp_path: Path) -> None:
    from telemetry.store.layout import partition_dir
    from telemetry.store.writer import recover_node
    from tests.support.tables import write_undecodable_column_name

    table = cpu_table("n1", [0.0, 30.0])
    bad = partition_dir(tmp_path, "cpu", T0, "n1") / "part-0.parquet"
    write_undecodable_column_name(bad, table, "node")
    recover_node(tmp_path, "n1")  # no raise: the daemon starts
    assert not bad.exists()
    assert len(list((tmp_path / "quarantine").rglob("*.parquet"))) == 1


def test_a_compactor_traceback_is_relayed_line_by_line_never_as_blank_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from telemetry.store import writer

    output = (tmp_path / "child.log").open("w+b")
    child_code = (
        "import sys\n"
        "print('INFO\\tcompacted one journal', file=sys.stderr, flush=True)\n"
        "raise ValueError('boom')\n"
    )
    process = subprocess.Popen([sys.executable, "-c", child_code], stdout=output, stderr=output)
    process.wait()
    said: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = said.append  # type: ignore[method-assign]
    monkeypatch.setattr(writer.log, "disabled", False)
    level = writer.log.level
    writer.log.setLevel(logging.DEBUG)
    writer.log.addHandler(handler)
    store = Store(tmp_path, "n1")
    try:
        store._reap(writer._Child(process, [], output, "the compactor"))
    finally:
        writer.log.removeHandler(handler)
        writer.log.setLevel(level)
    relayed = [(r.levelno, r.getMessage()) for r in said]
    assert (logging.INFO, "compacted one journal") in relayed
    errors = [message for levelno, message in relayed if levelno == logging.ERROR]
    assert errors[0] == "Traceback (most recent call last):"
    assert "ValueError: boom" in errors and all(message.strip() for message in errors)
    assert store.compaction_failures == 1


def test_recovery_quarantines_a_journal_whose_column_name_is_not_utf8(tmp_path: Path) -> None:
    from telemetry.store.layout import partition_dir
    from telemetry.store.writer import recover_node

    table = cpu_table("n1", [0.0, 30.0]).rename_columns(
        ["nod\x7f" if n == "node" else n for n in cpu_table("n1", [0.0]).column_names]
    )
    journal = partition_dir(tmp_path, "cpu", T0, "n1") / "part-0.arrows"
    journal.parent.mkdir(parents=True)
    with pa.OSFile(str(journal), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    journal.write_bytes(journal.read_bytes().replace(b"nod\x7f", b"nod\xff"))
    later = partition_dir(tmp_path, "cpu", T0, "n1") / "part-1.arrows"
    rows = cpu_table("n1", [60.0])
    with pa.OSFile(str(later), "wb") as sink, pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    recover_node(tmp_path, "n1")  # no raise: the journal after it is compacted too
    assert not journal.exists() and not later.exists()
    assert len(list((tmp_path / "quarantine").rglob("*.arrows"))) == 1
    assert later.with_suffix(".parquet").exists()
