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
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from telemetry.errors import TallyError
from telemetry.frame import Frame
from telemetry.schema import SCHEMAS, SchemaError, validate
from telemetry.store.layout import (
    JOURNAL_SUFFIX,
    PARQUET_SUFFIX,
    TMP_SUFFIX,
    node_dir_name,
    partition_dir,
    quarantine,
    read_journal,
)

log = logging.getLogger("tally.store")

HOUR_NS = 3600 * 1_000_000_000


def release_memory() -> None:
    """Hand freed memory back to the OS (Arrow's pool and glibc's heap), after big jobs."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_parquet_atomic(table: pa.Table, target: Path) -> None:
    """Write ``table`` to ``target`` so that ``target`` either does not exist or is complete."""
    tmp = target.with_name(target.name + TMP_SUFFIX)
    pq.write_table(table, tmp, compression="zstd", row_group_size=1 << 20)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def compact(journal: Path, root: Path, table: str) -> Path | None:
    """Turn a journal into its Parquet twin and delete it; returns the Parquet path or None.

    A journal with no complete batch is removed (it holds no sample); one whose schema cannot be
    read or does not match the table is quarantined.
    """
    target = journal.with_suffix(PARQUET_SUFFIX)
    if target.exists():
        journal.unlink(missing_ok=True)  # compacted just before a crash
        return target
    data, clean = read_journal(journal)
    if data is None:
        if journal.stat().st_size == 0:
            journal.unlink(missing_ok=True)
        else:
            quarantine(root, journal, "journal header unreadable")
        return None
    try:
        data = validate(data, table)
    except SchemaError as exc:
        quarantine(root, journal, str(exc))
        return None
    if not clean:
        log.warning(
            "%s: journal ends in a partial batch (crash); kept %d complete rows",
            journal,
            data.num_rows,
        )
    if data.num_rows == 0:
        journal.unlink(missing_ok=True)
        return None
    # One contiguous table keeps the Parquet row groups large; handing the freed memory back
    # keeps the daemon's RSS flat across hourly rotations.
    write_parquet_atomic(data.combine_chunks(), target)
    del data
    release_memory()
    journal.unlink(missing_ok=True)
    return target


@dataclass
class _Journal:
    path: Path
    hour: int
    file: BinaryIO
    writer: pa.ipc.RecordBatchStreamWriter


class Store:
    """Appends sample batches of one node to a dataset directory. Not thread-safe."""

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
        """Compact leftover journals, drop temporary files, quarantine unreadable Parquet files."""
        for table in SCHEMAS:
            base = self.root / table
            if not base.is_dir():
                continue
            for node_dir in base.glob(f"date=*/{node_dir_name(self.node)}"):
                for path in sorted(node_dir.iterdir()):
                    if path.name.endswith(TMP_SUFFIX):
                        path.unlink(missing_ok=True)
                    elif path.suffix == JOURNAL_SUFFIX:
                        compact(path, self.root, table)
                    elif path.suffix == PARQUET_SUFFIX:
                        try:
                            pq.read_metadata(path)
                        except (pa.ArrowInvalid, OSError) as exc:
                            quarantine(self.root, path, f"unreadable Parquet: {exc}")

    def append(self, table: str, batch: pa.Table | Frame) -> None:
        """Append one round's rows of ``table`` (all with the same time) to its journal."""
        if isinstance(batch, Frame):
            batch = batch.to_arrow()
        if batch.num_rows == 0:
            return
        first_ns = int(batch.column("time").cast(pa.int64())[0].as_py())
        hour = first_ns // self.rotate_ns
        journal = self._journals.get(table)
        if journal is not None and not journal.path.exists():
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
        try:
            if journal is None:
                journal = self._open_journal(table, first_ns, hour)
            journal.writer.write_table(batch.cast(SCHEMAS[table]))
            journal.file.flush()
        except OSError:
            # Disk full or gone read-only: give this journal up (what it holds stays readable
            # and is compacted on the next start) and open a fresh one on the next append.
            self._abandon(table)
            raise
        self.rows_written += batch.num_rows

    def _abandon(self, table: str) -> None:
        journal = self._journals.pop(table, None)
        if journal is not None:
            with contextlib.suppress(Exception):
                journal.file.close()
            # a journal whose first batch never made it holds no sample: leave no empty file
            with contextlib.suppress(OSError):
                data, _ = read_journal(journal.path)
                if data is None or data.num_rows == 0:
                    journal.path.unlink()

    def _open_journal(self, table: str, time_ns: int, hour: int) -> _Journal:
        directory = partition_dir(self.root, table, time_ns, self.node)
        directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.fromtimestamp(time_ns / 1e9, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
        path = directory / f"part-{stamp}-{secrets.token_hex(4)}{JOURNAL_SUFFIX}"
        file = open(path, "wb")  # noqa: SIM115 - closed in _close_journal
        writer = pa.ipc.new_stream(file, SCHEMAS[table])
        file.flush()
        journal = _Journal(path=path, hour=hour, file=file, writer=writer)
        self._journals[table] = journal
        return journal

    def _close_journal(self, table: str) -> None:
        journal = self._journals.pop(table)
        try:
            journal.writer.close()
        finally:
            journal.file.close()
        if journal.path.exists():  # gone with a deleted data dir: nothing to compact
            compact(journal.path, self.root, table)

    def rotate(self) -> None:
        """Compact every open journal now (the next append opens new ones); raises ``OSError``
        when the disk refuses (the journals that could not be compacted stay readable)."""
        failed: OSError | None = None
        for table in list(self._journals):
            try:
                self._close_journal(table)
            except OSError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

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
