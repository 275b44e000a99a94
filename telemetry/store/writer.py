"""The daemon's Parquet store: an Arrow IPC journal per table and hour, compacted to Parquet.

Layout (SPEC §2): ``<root>/<table>/date=YYYY-MM-DD/node=<node>/<stem>.{arrows,parquet}``.

Why a journal: a Parquet file is unreadable until its footer is written, so appending each
round to an open Parquet writer would leave a useless file after ``kill -9``. Instead each round's
batch is appended to an Arrow IPC *stream* and flushed to the OS; a stream read stops cleanly at
the last complete batch, so a crash loses at most the batch being written. At each hour boundary
and at shutdown the journal is compacted into a zstd Parquet file of the same stem (written under
a temporary name, fsynced, atomically renamed) and only then deleted. On start the store
compacts journals a crash left behind; a journal whose Parquet twin already exists was compacted
just before the crash and is only deleted, so no sample is stored twice. Files that cannot be
read at all are moved to ``<root>/quarantine/``.

Why a child process: the daemon never loads pyarrow (45 MiB of its resident memory). It writes
the journal with :mod:`telemetry.store.ipc`; compaction and start-up recovery run in a
short-lived ``python -m telemetry.store.compactor`` that dies with the daemon. The hourly one
runs beside the collection loop and is reaped later; SIGHUP (:meth:`Store.rotate`), shutdown
(:meth:`Store.close`) and start (:meth:`Store.recover`) wait for theirs. A journal the child could
not compact stays where it is, readable, and is tried again (and at the latest on the next start).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO
from urllib.parse import quote

from telemetry import heap
from telemetry.blas import one_thread
from telemetry.errors import TallyError
from telemetry.frame import Frame, RoundBatch
from telemetry.store.ipc import StreamWriter
from telemetry.store.layout import (
    JOURNAL_SUFFIX,
    PARQUET_SUFFIX,
    TMP_SUFFIX,
    node_dir_name,
    partition_dir,
    quarantine,
    read_journal,
)
from telemetry.tables import TABLES

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("tally.store")

HOUR_NS = 3600 * 1_000_000_000
COMPACTOR = "telemetry.store.compactor"
# After a failed compaction the journals wait this long (doubling up to an hour) before the
# next try, so a full disk does not cost a pyarrow start-up every round.
RETRY_FIRST_S = 30.0
RETRY_MAX_S = 3600.0


def release_memory() -> None:
    """Hand freed memory back to the OS (Arrow's pool and glibc's heap), after big jobs."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    heap.trim()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_parquet_atomic(table: pa.Table, target: Path) -> None:
    """Write ``table`` to ``target`` so that ``target`` either does not exist or is complete."""
    import pyarrow.parquet as pq

    tmp = target.with_name(target.name + TMP_SUFFIX)
    pq.write_table(table, tmp, compression="zstd", row_group_size=1 << 20)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def compact(journal: Path, root: Path, table: str) -> Path | None:
    """Turn a journal into its Parquet twin and delete it; returns the Parquet path or None.

    A journal with no complete batch is removed (it holds no sample); one whose schema cannot be
    read or does not match the table is quarantined. Imports pyarrow: the daemon runs this in
    its compactor child.
    """
    from telemetry.schema import SchemaError, validate

    target = journal.with_suffix(PARQUET_SUFFIX)
    if target.exists():
        journal.unlink(missing_ok=True)  # compacted just before a crash
        return target
    try:
        data, clean = read_journal(journal)
        if data is not None:
            data = validate(data, table)
    except SchemaError as exc:
        quarantine(root, journal, str(exc))
        return None
    except UnicodeDecodeError:  # Arrow decodes column names as it joins the batches
        quarantine(root, journal, "a column name is not valid UTF-8")
        return None
    if data is None:
        if journal.stat().st_size == 0:
            journal.unlink(missing_ok=True)
        else:
            quarantine(root, journal, "journal header unreadable")
        return None
    if not clean:
        log.warning(
            "%s: journal ends in a partial batch (crash) or holds a damaged one; kept %d "
            "complete rows",
            journal,
            data.num_rows,
        )
    if data.num_rows == 0:
        journal.unlink(missing_ok=True)
        return None
    # One contiguous table keeps the Parquet row groups large; handing the freed memory back
    # keeps a child compacting several journals at the size of one.
    write_parquet_atomic(data.combine_chunks(), target)
    del data
    release_memory()
    journal.unlink(missing_ok=True)
    return target


def recover_node(root: Path, node: str) -> None:
    """Compact ``node``'s leftover journals, drop temporary files, quarantine unreadable Parquet
    files. Imports pyarrow; raises ``OSError`` when the disk refuses a compaction."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for table in TABLES:
        base = root / table
        if not base.is_dir():
            continue
        for node_dir in base.glob(f"date=*/{node_dir_name(node)}"):
            for path in sorted(node_dir.iterdir()):
                if path.name.endswith(TMP_SUFFIX):
                    path.unlink(missing_ok=True)
                elif path.suffix == JOURNAL_SUFFIX:
                    compact(path, root, table)
                elif path.suffix == PARQUET_SUFFIX:
                    try:
                        pq.read_metadata(path)
                    # a column name that is not UTF-8 fails decoding when the footer is read
                    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
                        quarantine(root, path, f"unreadable Parquet: {exc}")


def _package_root() -> str:
    import telemetry

    return str(Path(telemetry.__file__).resolve().parent.parent)


@dataclass
class _Child:
    """A compactor process under way, the journals it was given, where it logs."""

    process: subprocess.Popen[bytes]
    journals: list[Path]
    output: IO[bytes]
    what: str


@dataclass
class _Journal:
    path: Path
    hour: int
    file: BinaryIO
    writer: StreamWriter
    rows: int = 0  # rows of complete batches in it
    name: str = field(init=False)  # the path, stat'ed every append without pathlib's work

    def __post_init__(self) -> None:
        self.name = str(self.path)

    def exists(self) -> bool:
        """Whether the journal's name is still there; other errors raise, as ``Path.exists``."""
        try:
            os.stat(self.name)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True


def _as_frame(batch: Frame | RoundBatch | pa.Table, table: str) -> Frame | RoundBatch:
    """``batch`` as a Frame (or the daemon's RoundBatch) of ``table``; a pa.Table (tests,
    tools) is validated first."""
    if isinstance(batch, Frame | RoundBatch):
        if batch.table != table:
            raise ValueError(f"rows of table {batch.table!r} appended to {table!r}")
        return batch
    from telemetry.schema import validate

    return Frame.from_arrow(validate(batch, table), table)


class Store:
    """Appends sample batches of one node to a dataset directory. Not thread-safe.

    Call it from one thread: the compactor child is tied to the thread that starts it (it is
    killed when that thread ends, so that it never outlives a killed daemon).
    """

    def __init__(self, root: Path, node: str, rotate_seconds: float = 3600) -> None:
        self.root = root
        self.node = node
        # Journals are compacted when a sample falls into a new slot of this length (an hour by
        # default; shorter in crash tests, which need many rotations to kill one mid-way).
        self.rotate_ns = max(1, int(rotate_seconds * 1_000_000_000))
        self._journals: dict[str, _Journal] = {}
        self._lock_file: BinaryIO | None = None
        self.rows_written = 0
        self.lost_journals = 0  # journals deleted under us while open
        self.compaction_failures = 0  # compactor runs that left journals behind
        self._to_compact: list[Path] = []  # closed journals waiting for a compactor
        self._child: _Child | None = None
        self._retry_at = 0.0  # monotonic time before which a failed compaction is not retried
        self._retry_delay = RETRY_FIRST_S
        self._failing = False  # the last compaction failed (and was said)

    def open(self) -> None:
        """Create the directory, take the node's lock, recover what a crash left behind.

        Raises ``TallyError`` when the directory cannot be written or another daemon holds it.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock_path = self.root / f".tally-{quote(self.node, safe='')}.lock"
            self._lock_file = open(lock_path, "wb")  # noqa: SIM115 - held for the daemon's life
        except OSError as exc:
            raise TallyError(f"data dir {self.root}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TallyError(
                f"data dir {self.root}: another tally daemon is writing node {self.node!r}"
            ) from None
        self.recover()

    def recover(self) -> None:
        """Compact leftover journals, drop temporary files, quarantine unreadable Parquet files
        (in a compactor child, waited for). A failure is logged, not raised: what could not be
        compacted stays readable and is tried again on the next start."""
        self._wait()
        try:
            child = self._spawn(["recover", str(self.root), self.node], [], "recovery")
        except OSError as exc:  # no memory or processes left: the next start tries again
            self._failed(f"cannot start the compactor for recovery ({exc})")
            return
        child.process.wait()
        self._reap(child)

    def append(self, table: str, batch: Frame | RoundBatch | pa.Table) -> None:
        """Append one round's rows of ``table`` (all with the same time) to its journal.

        ``batch`` is a :class:`RoundBatch` (the daemon's) or a :class:`Frame` (no pyarrow is
        loaded for either), or a ``pa.Table``.
        Raises ``OSError`` when the disk refuses, ``ValueError`` for rows the table cannot hold.
        """
        frame = _as_frame(batch, table)
        if frame.num_rows == 0:
            self._poll()
            return
        first_ns = int(frame.times()[0])
        hour = first_ns // self.rotate_ns
        journal = self._journals.get(table)
        if journal is not None and not journal.exists():
            # The data dir (or the journal) was deleted under us: rows written on would go into
            # an unlinked file and vanish. Give it up and open a new one where the dir is now.
            self._abandon(table)
            self.lost_journals += 1
            log.warning(
                "%s: the journal was deleted while open (data dir removed?); what it held is "
                "gone, writing a new one",
                journal.path,
            )
            journal = None
        if journal is not None and journal.hour != hour:
            self._close_journal(table)
            journal = None
            # The other tables' journals of an ended slot are complete too: one compactor
            # takes them all now rather than one each whenever their next row comes.
            for other in [t for t, j in self._journals.items() if j.hour < hour]:
                self._close_journal(other)
        try:
            if journal is None:
                journal = self._open_journal(table, first_ns, hour)
            journal.writer.write_table(frame)
            journal.file.flush()
        except OSError:
            # Disk full or gone read-only: give this journal up (what it holds stays readable
            # and is compacted on the next start) and open a fresh one on the next append.
            self._abandon(table)
            raise
        journal.rows += frame.num_rows
        self.rows_written += frame.num_rows
        self._poll()

    def _abandon(self, table: str) -> None:
        journal = self._journals.pop(table, None)
        if journal is not None:
            with contextlib.suppress(Exception):
                journal.file.close()
            # a journal whose first batch never made it holds no sample: leave no empty file
            if journal.rows == 0:
                with contextlib.suppress(OSError):
                    journal.path.unlink()

    def _open_journal(self, table: str, time_ns: int, hour: int) -> _Journal:
        directory = partition_dir(self.root, table, time_ns, self.node)
        directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.fromtimestamp(time_ns / 1e9, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
        path = directory / f"part-{stamp}-{os.urandom(4).hex()}{JOURNAL_SUFFIX}"
        # Unbuffered: each message goes to the OS in the one write that StreamWriter makes, with
        # no copy into a buffer and no flush after it.
        file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in _close_journal
        try:
            writer = StreamWriter(file, table)
            file.flush()
        except OSError:
            file.close()
            path.unlink(missing_ok=True)
            raise
        journal = _Journal(path=path, hour=hour, file=file, writer=writer)
        self._journals[table] = journal
        return journal

    def _close_journal(self, table: str) -> None:
        """End the journal's stream and queue it for the compactor."""
        journal = self._journals.pop(table)
        try:
            journal.writer.close()
        finally:
            journal.file.close()
        if journal.path.exists():  # gone with a deleted data dir: nothing to compact
            self._to_compact.append(journal.path)

    # -- the compactor child ----------------------------------------------------------------

    def _spawn(self, args: list[str], journals: list[Path], what: str) -> _Child:
        """Start ``python -m telemetry.store.compactor ARGS`` logging into a temporary file."""
        output = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _reap
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_root(), env.get("PYTHONPATH", "")) if p
        )
        one_thread(env)  # an hourly NumPy import without a BLAS thread per core
        argv = [sys.executable, "-m", COMPACTOR, "--parent", str(os.getpid()), *args]
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=output, env=env
            )
        except OSError:
            output.close()
            raise
        child = _Child(process=process, journals=journals, output=output, what=what)
        self._child = child
        return child

    def _start_compaction(self) -> None:
        journals, self._to_compact = self._to_compact, []
        try:
            self._spawn(["compact", str(self.root), *map(str, journals)], journals, "compaction")
        except OSError as exc:  # no memory or processes left: keep them for later
            self._to_compact = journals + self._to_compact
            self._failed(f"cannot start the compactor ({exc})")

    def _poll(self) -> None:
        """Reap a finished compactor without waiting; start one for queued journals when none
        runs (and a failed one is due for a retry)."""
        child = self._child
        if child is not None:
            if child.process.poll() is None:
                return
            self._reap(child)
        if self._to_compact and time.monotonic() >= self._retry_at:
            self._start_compaction()

    def _wait(self) -> None:
        """Wait for the compactor under way, if any."""
        child = self._child
        if child is not None:
            child.process.wait()
            self._reap(child)

    def finish_compaction(self) -> bool:
        """Wait for the compactor under way, then compact every queued journal now and wait;
        True when none is left behind."""
        self._wait()
        if self._to_compact:
            self._start_compaction()
            self._wait()
        return not self._to_compact

    def _reap(self, child: _Child) -> None:
        """Relay the finished child's log; journals it left behind go back in the queue."""
        self._child = None
        code = child.process.returncode
        left = [path for path in child.journals if path.exists()]
        ok = code == 0 and not left
        child.output.seek(0)
        lines = child.output.read().decode("utf-8", "replace").splitlines()
        child.output.close()
        for line in lines:
            name, tab, message = line.partition("\t")
            level = logging.getLevelName(name)
            if not tab or not isinstance(level, int):  # a traceback's line, not a log record
                level, message = logging.ERROR, line
            # while failing, each retry would say the same again: said once
            log.log(logging.DEBUG if self._failing and not ok else level, "%s", message)
        if ok:
            if self._failing:
                log.info("%s works again", child.what)
            self._failing = False
            self._retry_delay = RETRY_FIRST_S
            self._retry_at = 0.0
            return
        reason = f"exit status {code}" if code else "journals left behind"
        self._to_compact = left + [p for p in self._to_compact if p not in left]
        self._failed(f"{child.what} failed ({reason})")

    def _failed(self, what: str) -> None:
        self.compaction_failures += 1
        if not self._failing:
            log.warning(
                "%s; the journals it could not compact stay readable and are tried again (at "
                "the latest on the next start)",
                what,
            )
        self._failing = True
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(2 * self._retry_delay, RETRY_MAX_S)

    def rotate(self) -> None:
        """Compact every open journal now and wait (the next append opens new ones); raises
        ``OSError`` when they could not all be compacted (those stay readable)."""
        for table in list(self._journals):
            self._close_journal(table)
        if not self.finish_compaction():
            raise OSError(
                f"{len(self._to_compact)} journal(s) could not be compacted (see the log); "
                "they stay readable"
            )

    def close(self) -> None:
        """Compact open journals and release the lock. A disk that refuses the compaction (full,
        read-only) leaves the journals as they are, readable, compacted on the next start: said,
        not raised."""
        try:
            self.rotate()
        except OSError as exc:
            log.warning(
                "cannot compact the journals at shutdown (%s); they stay readable and are "
                "compacted on the next start",
                exc.strerror or exc,
            )
        finally:
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
