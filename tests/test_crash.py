"""Crash safety: SIGKILL the daemon at 20 random moments and restart it on the same data directory.

With ``--interval 0.05 --store.rotate 1`` the daemon appends a round every 50 ms and compacts its
journals every second, so the kills land mid-write, mid-rotation and mid-compaction. Four kinds
of kill moment are mixed (seeded; set ``TALLY_CRASH_SEED`` to replay one): a random delay after
start; a fine random offset around the compaction that follows a rotation boundary; the moment a
compaction is seen under way (a ``.parquet.tmp``, or a journal beside its Parquet twin); and,
before the banner, the moment the restarted daemon's recovery starts compacting what the previous
kill left. After a final clean start and SIGTERM, every file must read, no sample may be stored
twice, and each run may have lost nothing but the round in flight when it was killed.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from telemetry.schema import SCHEMAS, SERIES_KEYS, validate
from telemetry.store.dataset import ReadStats, discover, read_table
from telemetry.store.layout import (
    JOURNAL_SUFFIX,
    PARQUET_SUFFIX,
    QUARANTINE,
    TMP_SUFFIX,
    node_dir_name,
    read_journal,
)
from tests.support.daemon import DaemonProcess
from tests.support.units import NS

pytestmark = pytest.mark.e2e

NODE = "crash"
KILLS = 20
INTERVAL = 0.1  # the shortest interval the daemon takes
ROTATE = 1.5
# Widest allowed gap between consecutive stored rounds of one run, and between a run's last
# stored round and its kill: the round in flight plus scheduling slack on a loaded 2-core box
# (0.3 s seen with both cores busy). A lost journal would leave a hole of about ROTATE.
MAX_HOLE = 7 * INTERVAL
# A kill this soon after a rotation boundary lands in the round that rotates (or just after it).
BOUNDARY_WINDOW = 2 * INTERVAL
STARTUP_TIMEOUT = 30.0

_ROWS = re.compile(rb"^tally_store_rows_written_total (\S+)$", re.MULTILINE)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy


@dataclass
class Run:
    index: int
    strategy: str
    start_ns: int
    log: Path
    banner_ns: int = 0
    end_ns: int = 0
    written: int = 0  # N_k: what the last scrape before the kill said was written
    left: set[str] = field(default_factory=set)  # what the kill left behind


def _tmp_files(data: Path) -> dict[Path, int]:
    found: dict[Path, int] = {}
    for directory in _node_dirs(data):
        for path in directory.glob(f"*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                found[path] = path.stat().st_mtime_ns
    return found


def _kill_in_recovery(proc: DaemonProcess, run: Run, data: Path) -> bool:
    """Kill while the starting daemon compacts what the last kill left (before its banner).

    Returns False when the banner came first (nothing to recover, or the compaction was missed).
    """
    stale = _tmp_files(data)  # a kill mid-compaction leaves a .tmp; recovery rewrites it
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.banner_seen():
            return False
        if any(stale.get(path) != mtime for path, mtime in _tmp_files(data).items()):
            proc.proc.send_signal(signal.SIGKILL)
            run.end_ns = time.time_ns()
            proc.proc.wait(timeout=10)
            run.left = _leftovers(data, run.end_ns) | {"recovery"}
            return True
    return False


def _rows_written(port: int) -> int:
    with _OPENER.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read()
    match = _ROWS.search(body)
    assert match is not None, "no tally_store_rows_written_total in the exposition"
    return int(float(match.group(1)))


def _node_dirs(data: Path) -> Iterator[Path]:
    for table in SCHEMAS:
        base = data / table
        if base.is_dir():
            yield from base.glob(f"date=*/{node_dir_name(NODE)}")


def _compaction_state(data: Path) -> set[str]:
    """What a compaction under way shows: ``tmp`` (the Parquet file is being written) and/or
    ``twin`` (renamed into place, its journal not yet deleted)."""
    seen: set[str] = set()
    for directory in _node_dirs(data):
        try:
            names = set(os.listdir(directory))
        except FileNotFoundError:
            continue
        for name in names:
            stem, suffix = os.path.splitext(name)
            if name.endswith(TMP_SUFFIX):
                seen.add("tmp")
            elif suffix == JOURNAL_SUFFIX and stem + PARQUET_SUFFIX in names:
                seen.add("twin")
    return seen


def _wait_compaction(data: Path, want: set[str], timeout: float) -> bool:
    """Spin until the compaction state shows one of ``want``; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _compaction_state(data) & want:
            return True
    return False


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _kill(proc: DaemonProcess, run: Run, data: Path, rng: random.Random) -> None:
    """Wait for the run's kill moment, scrape N_k, SIGKILL, and note what the kill left."""
    if run.strategy == "random":
        time.sleep(rng.uniform(0.0, 1.6))
        run.written = _rows_written(proc.port)
    elif run.strategy == "boundary":
        # Rounds keep a fixed phase, so each rotation (the first round of a slot closes and
        # compacts the old journal) comes at the same offset after the boundary. Learn it from
        # one rotation, then kill a fine random offset around it at the next boundary: before,
        # in or after the compaction.
        seen = _wait_compaction(data, {"tmp", "twin"}, 1.5 * ROTATE)
        phase = time.time() % ROTATE if seen else rng.uniform(0.0, 0.1)
        now = time.time()
        boundary = math.floor(now / ROTATE + 1) * ROTATE
        target = time.monotonic() + (boundary - now) + phase + rng.uniform(-0.006, 0.003)
        _sleep_until(target - 0.1)
        run.written = _rows_written(proc.port)
        _sleep_until(target - 0.002)
        while time.monotonic() < target:
            pass
    else:  # "watch-tmp", "watch-twin": kill the moment a compaction is seen in that state
        time.sleep(rng.uniform(0.0, 0.8))
        run.written = _rows_written(proc.port)
        _wait_compaction(data, {run.strategy.removeprefix("watch-")}, 1.5 * ROTATE)
    proc.proc.send_signal(signal.SIGKILL)
    run.end_ns = time.time_ns()
    proc.proc.wait(timeout=10)
    run.left = _leftovers(data, run.end_ns)


def _leftovers(data: Path, kill_ns: int) -> set[str]:
    """Classify the state a kill left: ``tmp`` (mid Parquet write), ``twin`` (between rename and
    journal delete), ``stale`` (the previous slot's journal not yet compacted: mid-rotation),
    ``empty`` (a new journal before its first round), ``torn`` (a partly written batch),
    ``unreadable`` (a journal whose header cannot be read), ``boundary`` (kill right after a
    rotation boundary)."""
    left: set[str] = set()
    rotate_ns = int(ROTATE * NS)
    if kill_ns % rotate_ns < BOUNDARY_WINDOW * NS:
        left.add("boundary")
    for directory in _node_dirs(data):
        for path in directory.iterdir():
            if path.name.endswith(TMP_SUFFIX):
                left.add("tmp")
            elif path.suffix == JOURNAL_SUFFIX:
                if path.with_suffix(PARQUET_SUFFIX).exists():
                    left.add("twin")
                table, clean = read_journal(path)
                if table is None:  # killed between creating the journal and its first round
                    left.add("unreadable" if path.stat().st_size else "empty")
                elif not clean:
                    left.add("torn")
                if table is not None and table.num_rows:
                    first = int(table.column("time").cast(pa.int64())[0].as_py())
                    if first // rotate_ns < kill_ns // rotate_ns:
                        left.add("stale")
    return left


def _read_all(data: Path) -> dict[str, pa.Table]:
    """Every Parquet file outside quarantine, opened with pyarrow and validated, per table."""
    parts: dict[str, list[pa.Table]] = {}
    for path in sorted(data.rglob(f"*{PARQUET_SUFFIX}")):
        relative = path.relative_to(data)
        if relative.parts[0] == QUARANTINE:
            continue
        table = relative.parts[0]
        assert table in SCHEMAS, f"stray file {relative}"
        try:
            content = validate(pq.read_table(path), table)
        except Exception as exc:
            pytest.fail(f"{relative} is unreadable: {exc}")
        parts.setdefault(table, []).append(content.select(SCHEMAS[table].names))
    return {table: pa.concat_tables(tables) for table, tables in parts.items()}


def _times(table: pa.Table) -> np.ndarray:
    return table.column("time").cast(pa.int64()).to_numpy()


def _drive(proc: DaemonProcess, run: Run, data: Path, rng: random.Random) -> None:
    """Run one daemon life: kill it as ``run.strategy`` says, or stop the final one cleanly."""
    if run.strategy == "recovery":
        if _kill_in_recovery(proc, run, data):
            return
        run.strategy = "watch-tmp"  # the banner came first: kill the next compaction instead
    proc.wait_banner(STARTUP_TIMEOUT)
    run.banner_ns = time.time_ns()
    if run.strategy != "final":
        _kill(proc, run, data, rng)
        return
    time.sleep(1.2 * ROTATE)  # a clean run that rotates at least once
    run.written = _rows_written(proc.port)
    proc.proc.send_signal(signal.SIGTERM)
    code = proc.proc.wait(timeout=30)
    run.end_ns = time.time_ns()
    assert code == 0, run.log.read_text(errors="replace")


def test_sigkill_at_random_moments_loses_only_the_round_in_flight(tmp_path: Path) -> None:
    seed = int(os.environ.get("TALLY_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\ntest_crash seed {seed} (replay with TALLY_CRASH_SEED={seed})")
    rng = random.Random(seed)
    strategies = ["random"] * 5 + ["boundary"] * 5 + ["watch-tmp", "watch-twin"] * 4
    strategies += ["recovery"] * 2
    assert len(strategies) == KILLS
    rng.shuffle(strategies)
    data = tmp_path / "data"
    began = time.monotonic()
    runs: list[Run] = []
    for k, strategy in enumerate([*strategies, "final"]):
        flags = ("--store.rotate", str(ROTATE))
        with DaemonProcess(data, tmp_path, NODE, INTERVAL, flags, wait=False) as proc:
            run = Run(k, strategy, time.time_ns(), proc.stderr_path)
            runs.append(run)
            _drive(proc, run, data, rng)
    elapsed = time.monotonic() - began
    logs = "".join(run.log.read_text(errors="replace") for run in runs)
    hits = Counter(tag for run in runs for tag in run.left)
    print(
        f"test_crash seed {seed}: {KILLS} kills in {elapsed:.1f}s "
        f"({dict(Counter(r.strategy for r in runs[:-1]))}); "
        f"left behind: {dict(sorted(hits.items()))}; "
        f"mid-compaction (tmp/twin) {sum(1 for r in runs if r.left & {'tmp', 'twin'})}, "
        f"tmp or at a boundary {sum(1 for r in runs if r.left & {'tmp', 'boundary'})}; "
        f"{logs.count('partial batch')} torn batch(es) dropped on recovery"
    )
    for run in runs[:-1]:
        print(f"  kill {run.index:2d} {run.strategy:10s} N={run.written:4d} {sorted(run.left)}")

    # No unreadable file: nothing in quarantine, nothing left uncompacted, every Parquet file reads.
    quarantined = sorted(
        str(p.relative_to(data)) for p in (data / QUARANTINE).rglob("*") if not p.is_dir()
    )
    assert not quarantined, f"seed {seed}: files quarantined: {quarantined}\n{logs}"
    assert "quarantined" not in logs, f"seed {seed}:\n{logs}"
    leftover = sorted(
        str(p.relative_to(data))
        for p in data.rglob("*")
        if p.suffix == JOURNAL_SUFFIX or p.name.endswith(TMP_SUFFIX)
    )
    assert not leftover, f"seed {seed}: the final start and SIGTERM left {leftover}"
    tables = _read_all(data)
    stats = ReadStats()
    cpu = read_table(data, "cpu", discover(data)["cpu"], stats)
    assert stats.files_quarantined == 0 and stats.files_skipped == 0, stats.problems
    assert cpu.num_rows == tables["cpu"].num_rows

    # No sample stored twice.
    for name, table in tables.items():
        keys = [*SERIES_KEYS[name], "time"]
        rows, distinct = table.num_rows, table.group_by(keys).aggregate([]).num_rows
        assert distinct == rows, f"seed {seed}: {name}: {rows - distinct} duplicated {keys}"

    # Nothing lost but the round in flight at each kill.
    cpu_times = np.sort(_times(tables["cpu"]))
    all_times = np.concatenate([_times(table) for table in tables.values()])
    claimed = np.zeros(len(cpu_times), dtype=bool)
    problems: list[str] = []
    worst_hole = worst_tail = 0.0
    for run in runs:
        what = f"run {run.index} ({run.strategy})"
        stored = int(((all_times >= run.start_ns) & (all_times <= run.end_ns)).sum())
        if stored < run.written:
            problems.append(f"{what}: {stored} rows stored < {run.written} scraped")
        mine = (cpu_times >= run.start_ns) & (cpu_times <= run.end_ns)
        claimed |= mine
        times = cpu_times[mine]
        if not run.banner_ns:  # killed while recovering, before its first round
            if len(times):
                problems.append(f"{what}: {len(times)} rows from a run killed before any round")
            continue
        if not len(times) or times[0] > run.banner_ns:
            problems.append(f"{what}: the round before the banner was lost")
            continue
        hole = float(np.diff(times).max(initial=0)) / NS
        worst_hole = max(worst_hole, hole)
        if hole > MAX_HOLE:
            problems.append(f"{what}: hole of {hole:.3f}s between stored rounds")
        if run.strategy != "final":
            tail = (run.end_ns - int(times[-1])) / NS
            worst_tail = max(worst_tail, tail)
            if tail > MAX_HOLE:
                problems.append(f"{what}: last stored round {tail:.3f}s before the kill")
    if not claimed.all():
        problems.append(f"{int((~claimed).sum())} cpu rows outside every run's lifetime")

    print(f"test_crash seed {seed}: widest hole {worst_hole:.3f}s, kill tail {worst_tail:.3f}s")
    assert not problems, f"seed {seed}: " + "; ".join(problems)
