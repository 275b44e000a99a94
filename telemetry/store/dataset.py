"""The one dataset reader: every command that reads stored samples reads them here.

A dataset (SPEC §2) is ``<root>/<table>/date=…/node=…/*.{parquet,arrows}``; any split of the same
rows into files and row groups reads the same, and the daemon's Arrow IPC journals (the current
hour, still being written) are read up to their last complete batch. Three ways to read:

- ``read_table``: one table whole (replay);
- ``scan``: time-ordered chunks of about ``budget_rows`` rows fed to consumers in bounded memory
  (bill, report); planning reads only Parquet footers, and the next chunk is read on another
  thread while the consumers work on this one;
- ``Follower``: a growing dataset, polled for the rows not read before (aggregate).

One rule for a file that cannot be used, whoever reads it (``_reject``, SPEC §7): a Parquet file
that cannot be decoded, lacks a required column or has columns of other types (foreign, another
writer's layout, or damaged) is moved to ``<root>/quarantine/`` and counted (skipped and counted
where it cannot be moved), with a warning naming the file and why; a journal is never moved,
since a daemon may be writing it, only skipped. The bill goes on without the file.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from telemetry.errors import TallyError
from telemetry.schema import (
    EARLIEST_NS,
    LATEST_NS,
    SCHEMAS,
    TIME,
    SchemaError,
    screen,
    validate,
)
from telemetry.store.layout import (
    JOURNAL_SUFFIX,
    PARQUET_SUFFIX,
    QUARANTINE,
    quarantine,
    read_journal,
)

log = logging.getLogger("tally.dataset")

DEFAULT_BUDGET_ROWS = 2_000_000
_UNIT_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
_DATE = re.compile(r"date=(\d{4}-\d{2}-\d{2})")


@dataclass
class ReadStats:
    """What reading a dataset met (the bill's ``input`` object)."""

    files: int = 0
    rows: int = 0
    rows_skipped: int = 0
    files_quarantined: int = 0
    files_skipped: int = 0
    problems: list[str] = field(default_factory=list)
    # rows left out for a value outside its column's valid range, per "table.column"
    rows_out_of_range: dict[str, int] = field(default_factory=dict)
    # the dataset's time span as planned (ns; from the files' footers), None before planning
    first_ns: int | None = None
    last_ns: int | None = None

    def ruled_out(self, counts: Mapping[str, int]) -> None:
        for key, n in counts.items():
            self.rows_out_of_range[key] = self.rows_out_of_range.get(key, 0) + n


def discover(root: Path) -> dict[str, list[Path]]:
    """Sample files of each table under ``root``, sorted by path.

    Raises ``TallyError`` when ``root`` is not a readable directory or holds no sample file.
    """
    if not root.exists():
        raise TallyError(f"dataset {root} does not exist")
    if not root.is_dir():
        raise TallyError(f"dataset {root} is not a directory")
    found: dict[str, list[Path]] = {}
    try:
        for table in SCHEMAS:
            base = root / table
            if base.is_dir():
                found[table] = sorted(_sample_files(base))
    except PermissionError as exc:
        raise TallyError(f"dataset {root}: cannot read {exc.filename}: permission denied") from None
    if not any(found.values()):
        raise TallyError(
            f"dataset {root} holds no sample files "
            f"(expected {root}/{{cpu,gpu,job}}/date=…/node=…/*.parquet)"
        )
    return found


def _sample_files(base: Path) -> Iterator[Path]:
    """Every sample file under ``base``, following symlinked directories (a node's or a date's
    directory linked in from another disk is part of the dataset) but never into a loop."""
    seen: set[tuple[int, int]] = set()

    def fail(exc: OSError) -> None:
        if isinstance(exc, PermissionError):
            raise exc

    for directory, subdirectories, names in os.walk(base, followlinks=True, onerror=fail):
        try:
            info = os.stat(directory)
        except FileNotFoundError:  # removed (retention) while the dataset is listed
            subdirectories.clear()
            continue
        if (info.st_dev, info.st_ino) in seen:
            log.warning(
                "%s: already read by another path (a symlink loop or a second link)", directory
            )
            subdirectories.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        for name in names:
            path = Path(directory, name)
            if path.suffix in (PARQUET_SUFFIX, JOURNAL_SUFFIX) and path.is_file():
                yield path


def _usable(root: Path, files: Mapping[str, list[Path]]) -> Iterator[tuple[str, Path]]:
    """(table, path) of every listed file outside ``quarantine/``."""
    for table, paths in files.items():
        for path in paths:
            if QUARANTINE not in path.relative_to(root).parts:
                yield table, path


def _reject(root: Path, path: Path, exc: Exception, stats: ReadStats) -> None:
    """Set aside a file that cannot be used, by the one rule of this module's docstring."""
    if isinstance(exc, SchemaError):
        reason = f"schema does not match: {exc}"
    else:
        reason = f"unreadable: {exc}"
    stats.problems.append(f"{path}: {reason}")
    if path.suffix == JOURNAL_SUFFIX:
        stats.files_skipped += 1
        log.warning("skipping %s: %s", path, reason)
    elif quarantine(root, path, reason) is not None:
        stats.files_quarantined += 1
    else:
        stats.files_skipped += 1


def _check_name(path: Path) -> None:
    """Arrow opens files by UTF-8 names only: a name that is not is set aside like an unreadable
    file (by ``_reject``: quarantined, counted, said), never a traceback."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise pa.ArrowInvalid("the file name is not valid UTF-8") from None


@contextmanager
def _names_decoded() -> Iterator[None]:
    """Arrow decodes a file's column names when it opens the file: a name that is not UTF-8
    (a foreign or damaged footer) makes the file unreadable like any other damage, never a
    traceback."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise pa.ArrowInvalid(
            f"a column name is not valid UTF-8 (byte {exc.object[exc.start : exc.end]!r})"
        ) from None


def read_file(path: Path, table: str) -> pa.Table:
    """One file, whole, as table ``table`` (validated, extra columns dropped).

    Raises ``SchemaError`` for columns that do not match, ``pa.ArrowException`` or ``OSError``
    for a file that cannot be decoded.
    """
    _check_name(path)
    with _names_decoded():
        if path.suffix == JOURNAL_SUFFIX:
            data, _ = read_journal(path)
            if data is None:
                raise pa.ArrowInvalid("not an Arrow IPC stream")
        else:
            data = pq.read_table(path)
        return validate(data, table).select(SCHEMAS[table].names)


def read_table(
    root: Path,
    table: str,
    files: list[Path],
    stats: ReadStats,
    on_file: Callable[[], None] | None = None,
) -> pa.Table:
    """``files`` of one table read whole and concatenated; bad files set aside and counted.

    ``on_file`` is called before each file is read (for a progress bar).
    """
    parts: list[pa.Table] = []
    for path in files:
        if on_file is not None:
            on_file()
        if QUARANTINE in path.relative_to(root).parts:
            continue
        try:
            data = read_file(path, table)
        except (SchemaError, pa.ArrowException, OSError) as exc:
            if not path.exists():
                continue  # removed since it was listed (a compacted journal: read its twin anew)
            _reject(root, path, exc, stats)
            continue
        stats.files += 1
        stats.rows += data.num_rows
        data, ruled_out = screen(data, table)
        stats.ruled_out(ruled_out)
        parts.append(data)
    if not parts:
        return SCHEMAS[table].empty_table()
    return pa.concat_tables(parts)


# ------------------------------------------------------------ time-ordered chunks: bill, report


class Vanished(Exception):
    """A planned file is gone when its rows are read: a live daemon compacted its journal (or
    rotated a file) meanwhile. The dataset is planned again."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} vanished while the dataset was read")
        self.path = path


# A dataset that keeps changing under the reader this many times in a row is an error.
REPLANS = 5


class DamagedFile(Exception):
    """A file whose footer was fine turned out damaged while its rows were read."""

    def __init__(self, path: Path, reason: str, quarantined: bool) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.quarantined = quarantined


@dataclass(frozen=True)
class Piece:
    """One readable unit: a Parquet row group, or a whole journal (``row_group`` -1)."""

    table: str
    path: Path
    row_group: int
    min_ns: int
    max_ns: int
    rows: int
    # Quantiles of the piece's times where its rows are not spread evenly over [min, max] (a
    # stray row years away); empty: spread evenly, as telemetry is.
    quantiles: tuple[int, ...] = ()


# A piece spanning more than this is not one file of one daemon's hour or day: its time column
# is read while planning, so that chunks follow where its rows really are.
WIDE_SPAN_NS = 7 * 86_400 * 1_000_000_000
_QUANTILES = 64


def _time_quantiles(values: pa.ChunkedArray | pa.Array) -> tuple[int, ...]:
    ns = np.sort(pc.cast(values, TIME).cast(pa.int64()).drop_null().to_numpy(zero_copy_only=False))
    if ns.size == 0:
        return ()
    picks = np.linspace(0, ns.size - 1, num=min(_QUANTILES, ns.size)).round().astype(np.int64)
    return tuple(int(t) for t in ns[picks])


def _check_columns(table: str, schema: pa.Schema) -> None:
    """Raises ``SchemaError`` where the columns of ``schema`` do not fit table ``table``."""
    validate(schema.empty_table(), table)


def _time_range(values: pa.ChunkedArray | pa.Array) -> tuple[int, int]:
    ns = pc.cast(values, TIME).cast(pa.int64())
    if len(ns) == 0 or ns.null_count == len(ns):
        return 0, -1
    bounds = pc.min_max(ns)
    return int(bounds["min"].as_py()), int(bounds["max"].as_py())


def _parquet_pieces(path: Path, table: str) -> list[Piece]:
    _check_name(path)
    with _names_decoded():
        meta = pq.read_metadata(path)
        arrow_schema = meta.schema.to_arrow_schema()
        _check_columns(table, arrow_schema)
    time_type = arrow_schema.field("time").type
    scale = _UNIT_NS[time_type.unit]
    column = arrow_schema.get_field_index("time")
    pieces = []
    reader: pq.ParquetFile | None = None
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        if group.num_rows == 0:
            continue
        stats = group.column(column).statistics
        times = None
        if stats is not None and stats.has_min_max:
            low, high = int(stats.min_raw) * scale, int(stats.max_raw) * scale
        else:
            reader = reader or pq.ParquetFile(path)
            times = reader.read_row_group(i, columns=["time"]).column("time")
            low, high = _time_range(times)
        quantiles: tuple[int, ...] = ()
        if high - low > WIDE_SPAN_NS:
            if times is None:
                reader = reader or pq.ParquetFile(path)
                times = reader.read_row_group(i, columns=["time"]).column("time")
            quantiles = _time_quantiles(times)
        pieces.append(Piece(table, path, i, low, high, group.num_rows, quantiles))
    return pieces


def _journal_rows(path: Path, table: str) -> pa.Table:
    """A journal's rows, its name and columns checked; raises ``SchemaError`` or
    ``pa.ArrowException`` where it cannot be used."""
    _check_name(path)
    with _names_decoded():
        data, _ = read_journal(path)
        if data is None:
            raise pa.ArrowInvalid("not an Arrow IPC stream")
        _check_columns(table, data.schema)
    return data


def plan(root: Path, files: dict[str, list[Path]], stats: ReadStats) -> list[Piece]:
    """Every readable piece of the dataset; files that cannot be used are set aside
    (``_reject``)."""
    pieces: list[Piece] = []
    for table, path in _usable(root, files):
        try:
            if path.suffix == JOURNAL_SUFFIX:
                data = _journal_rows(path, table)
                if data.num_rows:
                    low, high = _time_range(data.column("time"))
                    wide = high - low > WIDE_SPAN_NS
                    quantiles = _time_quantiles(data.column("time")) if wide else ()
                    pieces.append(Piece(table, path, -1, low, high, data.num_rows, quantiles))
            else:
                pieces.extend(_parquet_pieces(path, table))
        except (SchemaError, pa.ArrowException, OSError) as exc:
            if not path.exists():
                raise Vanished(path) from None  # compacted or removed since it was listed
            _reject(root, path, exc, stats)
            continue
        stats.files += 1
    return pieces


@dataclass(frozen=True)
class TimeSlice:
    """The rows [start_ns, end_ns) of a partition (None: open), billed as one task of a node
    split by time (SPEC §9). A scan of a slice also reads the ``lookback_ns`` before its start,
    whose rows only open the intervals of the slice's first rows (``SliceConsumer.prime``); of
    the rows and files every slice of a node lists, each is counted by one slice only: a row by
    the slice holding its time, a file by the slice holding its first time (a file without rows
    by the first slice)."""

    start_ns: int | None
    end_ns: int | None
    lookback_ns: int = 0

    def holds(self, ns: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
        """Whether each time lies in the slice (a null time: in the first slice)."""
        inside = pc.is_valid(ns)
        if self.start_ns is not None:
            low = pc.greater_equal(ns, pa.scalar(self.start_ns, pa.int64()))
            inside = pc.and_kleene(inside, low)
        if self.end_ns is not None:
            inside = pc.and_kleene(inside, pc.less(ns, pa.scalar(self.end_ns, pa.int64())))
        return inside if self.start_ns is not None else pc.or_kleene(inside, pc.is_null(ns))

    def owns(self, ns: int) -> bool:
        return (self.start_ns is None or ns >= self.start_ns) and (
            self.end_ns is None or ns < self.end_ns
        )


def time_span(path: Path, table: str) -> tuple[int, int] | None:
    """The first and last time (ns) of a sample file's rows, from a Parquet file's footer (a
    journal: its rows); None for a file without rows. Nothing is set aside: raises
    ``SchemaError``, ``pa.ArrowException`` or ``OSError`` where the file cannot be used."""
    if path.suffix == JOURNAL_SUFFIX:
        data = _journal_rows(path, table)
        low, high = _time_range(data.column("time"))
        return None if high < low else (low, high)
    pieces = _parquet_pieces(path, table)
    if not pieces:
        return None
    return min(p.min_ns for p in pieces), max(p.max_ns for p in pieces)


class ValidatedChunk(dict[str, pa.Table]):
    """A chunk whose tables ``validate(..., dictionaries=True)`` has already checked and conformed
    (consumers may skip checking again; string columns are ``dictionary<int32, string>``)."""


class _OpenFiles:
    """Parquet files opened for reading, the most recent few kept open: a file's footer grows
    with its row groups, so opening it again for each row group is quadratic (40k rows in 4,000
    row groups took 278 s)."""

    KEEP = 32

    def __init__(self) -> None:
        self.files: OrderedDict[tuple[Path, tuple[str, ...]], pq.ParquetFile] = OrderedDict()

    def get(self, path: Path, strings: list[str]) -> pq.ParquetFile:
        key = (path, tuple(strings))
        found = self.files.pop(key, None)
        if found is None:
            found = pq.ParquetFile(path, read_dictionary=strings)
        self.files[key] = found
        while len(self.files) > self.KEEP:
            self.files.popitem(last=False)[1].close()
        return found

    def close(self) -> None:
        for parquet in self.files.values():
            parquet.close()
        self.files.clear()


def _read_piece(piece: Piece, columns: Sequence[str] | None, opened: _OpenFiles) -> pa.Table:
    """One piece's rows, validated, string columns dictionary-encoded (as Parquet stores them:
    decoding skips building a string per row, and series keys come out already encoded)."""
    if piece.row_group < 0:
        data, _ = read_journal(piece.path)
        if data is None:
            # compacted into its twin since the plan, or replaced: a journal is never moved,
            # the dataset is planned again
            raise Vanished(piece.path)
    else:
        wanted = SCHEMAS[piece.table].names if columns is None else list(columns)
        strings = [n for n in wanted if pa.types.is_string(SCHEMAS[piece.table].field(n).type)]
        with _names_decoded():
            parquet = opened.get(piece.path, strings)
            present = set(parquet.schema_arrow.names)
        # only what the consumers read is decoded
        data = parquet.read_row_group(
            piece.row_group,
            columns=None if columns is None else [c for c in wanted if c in present],
        )
    try:
        if columns is not None:
            checked = validate(data, piece.table, columns, dictionaries=True)
        else:
            checked = validate(data, piece.table, dictionaries=True)
            checked = checked.select(SCHEMAS[piece.table].names)
    except SchemaError as exc:
        raise pa.ArrowInvalid(str(exc)) from None
    return checked


def chunk_bounds(
    pieces: list[Piece], low: int, high: int, budget_rows: int
) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges covering [low, high] of about ``budget_rows`` rows each.

    Rows are taken as spread evenly over each piece's time range, which holds for telemetry,
    except in pieces whose quantiles were read: a stray row years away gets a chunk of its own
    instead of stretching every chunk over those years.
    """
    if high < low:
        return []
    inside = [p for p in pieces if p.max_ns >= low and p.min_ns <= high]
    total = sum(p.rows for p in inside)
    parts = max(1, -(-total // max(1, budget_rows)))
    # Even steps over the core where the rows are: ordinary pieces by their range, wide ones by
    # their inner quantiles among the valid times; what lies beyond the core (a wide piece's
    # stray rows) gets a chunk of its own on either side.
    lows: list[int] = []
    highs: list[int] = []
    for p in inside:
        if not p.quantiles:
            lows.append(p.min_ns)
            highs.append(p.max_ns)
            continue
        valid = [t for t in p.quantiles if low <= t <= high]
        if len(valid) >= 3:
            lows.append(valid[1])
            highs.append(valid[-2])
    core_low = max(low, min(lows, default=low))
    core_high = min(high, max(highs, default=high))
    if core_high < core_low:
        core_low, core_high = low, high
    step = max(1_000_000_000, -(-(core_high + 1 - core_low) // parts))
    edges = [*range(core_low, core_high + 1, step), core_high + 1]
    if low < core_low:
        edges.insert(0, low)
    if high > core_high:
        edges.append(high + 1)
    return list(itertools.pairwise(edges))


def read_chunks(
    root: Path,
    pieces: list[Piece],
    bounds: list[tuple[int, int]],
    stats: ReadStats,
    columns: Mapping[str, Sequence[str]] | None = None,
    *,
    valid: tuple[int, int] | None = None,
    owned: TimeSlice | None = None,
) -> Iterator[ValidatedChunk]:
    """For each [a, b) in ``bounds``, every table's rows with a <= time < b, validated.

    ``columns`` limits each table to those columns (in that order); default: the whole schema.
    Rows of a piece outside ``valid`` [low, high) (default: the bounds' span) are impossible
    times, counted in ``stats``; with ``owned`` only those inside the slice are counted, and
    the rows of chunks before its start (its lookback) are not counted at all.
    """
    opened = _OpenFiles()
    if valid is None:
        valid = (bounds[0][0], bounds[-1][1]) if bounds else (0, 0)
    try:
        yield from _chunks(root, pieces, bounds, stats, columns, opened, valid, owned)
    finally:
        opened.close()


def _chunks(
    root: Path,
    pieces: list[Piece],
    bounds: list[tuple[int, int]],
    stats: ReadStats,
    columns: Mapping[str, Sequence[str]] | None,
    opened: _OpenFiles,
    valid: tuple[int, int],
    owned: TimeSlice | None,
) -> Iterator[ValidatedChunk]:
    # A piece that reaches past its chunk keeps its later rows for the next chunks, so each piece
    # is decoded and validated once however many chunks it spans.
    later: dict[Piece, pa.Table] = {}
    first, end = valid
    counted_from = None if owned is None else owned.start_ns
    for a, b in bounds:
        counts = counted_from is None or a >= counted_from
        parts: dict[str, list[pa.Table]] = {name: [] for name in SCHEMAS}
        low, high = pa.scalar(a, pa.int64()), pa.scalar(b, pa.int64())
        for piece in pieces:
            if piece.max_ns < a or piece.min_ns >= b:
                continue
            data = later.pop(piece, None)
            if data is None:
                try:
                    wanted = None if columns is None else columns[piece.table]
                    data = _read_piece(piece, wanted, opened)
                except FileNotFoundError:
                    raise Vanished(piece.path) from None
                except (pa.ArrowException, OSError) as exc:
                    if not piece.path.exists():
                        raise Vanished(piece.path) from None
                    moved = quarantine(root, piece.path, str(exc)) is not None
                    raise DamagedFile(piece.path, str(exc), moved) from None
                if piece.min_ns < first or piece.max_ns >= end:
                    # the bounds span the valid times: what lies beyond them is impossible
                    stats.ruled_out({f"{piece.table}.time": _beyond(data, first, end, owned)})
            if piece.min_ns >= a and piece.max_ns < b:
                parts[piece.table].append(data)
                continue
            times = data.column("time").cast(pa.int64())
            parts[piece.table].append(
                data.filter(pc.and_(pc.greater_equal(times, low), pc.less(times, high)))
            )
            if piece.max_ns >= b:
                later[piece] = data.filter(pc.greater_equal(times, high))
        chunk = ValidatedChunk()
        for name, tables in parts.items():
            if not tables:
                chunk[name] = _empty(name, None if columns is None else columns[name])
                continue
            # one screen per table and chunk, not per piece: its cost is per call as much as
            # per row
            chunk[name], ruled_out = screen(pa.concat_tables(tables), name)
            if counts:
                stats.ruled_out(ruled_out)
                stats.rows += chunk[name].num_rows
        yield chunk


def _beyond(data: pa.Table, first: int, end: int, owned: TimeSlice | None) -> int:
    """Rows of ``data`` outside the valid times [first, end) (and inside ``owned``)."""
    ns = data.column("time").cast(pa.int64())
    inside = pc.and_(
        pc.greater_equal(ns, pa.scalar(first, pa.int64())),
        pc.less(ns, pa.scalar(end, pa.int64())),
    )
    out = pc.invert(pc.fill_null(inside, False))
    if owned is not None:
        out = pc.and_(out, owned.holds(ns))
    return int(pc.sum(pc.cast(out, pa.int64())).as_py() or 0)


def _empty(name: str, columns: Sequence[str] | None) -> pa.Table:
    return validate(SCHEMAS[name].empty_table(), name, columns, dictionaries=True)


_DONE = object()


def read_ahead(
    chunks: Iterator[ValidatedChunk], depth: int = 1
) -> Generator[ValidatedChunk, None, None]:
    """``chunks``, produced in a background thread up to ``depth`` chunks ahead of the consumer.

    Parquet decoding and Arrow compute release the GIL, so the next chunk is read on another core
    while the consumer bills this one. An exception in the reader is raised in the consumer at
    the position it happened; a consumer that stops early stops the reader.
    """
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not put(chunk):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
            return
        put(_DONE)

    reader = threading.Thread(target=produce, name="tally-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, ValidatedChunk)
            yield item
    finally:
        stop.set()
        reader.join()


class ChunkConsumer(Protocol):
    """Anything fed the dataset's time-ordered chunks (the bill engine, the report's grids)."""

    def add(self, chunk: dict[str, pa.Table]) -> None: ...


@runtime_checkable
class SliceConsumer(Protocol):
    """A consumer that carries each series' last row across chunks: fed a time slice's lookback
    (``TimeSlice``) by ``prime`` first, which only sets those rows (nothing counts)."""

    def add(self, chunk: dict[str, pa.Table]) -> None: ...

    def prime(self, chunk: dict[str, pa.Table]) -> None: ...


def scan(
    root: Path,
    start: Callable[[], Sequence[ChunkConsumer]],
    budget_rows: int = DEFAULT_BUDGET_ROWS,
    progress: Callable[[int, int, int], None] | None = None,
    warn: Callable[[str], None] = log.warning,
    columns: Mapping[str, Sequence[str]] | None = None,
    select: Callable[[dict[str, list[Path]]], dict[str, list[Path]]] | None = None,
    time_slice: TimeSlice | None = None,
) -> tuple[Sequence[ChunkConsumer], ReadStats]:
    """Feed every chunk of the dataset at ``root`` to fresh consumers from ``start()``.

    ``select``, where given, picks the files read from those listed (a partition of the dataset,
    ``node_partitions``); it is applied anew whenever the dataset is listed again. With
    ``time_slice`` only the rows of that slice are fed, after its lookback is fed to the
    consumers' ``prime`` (those that have one), and the statistics count what the slice owns.

    A file found damaged only while its rows are read is quarantined and the scan starts over
    with new consumers, so the result is exactly that of the remaining files; a file that
    vanished meanwhile (a live daemon compacted its journal) makes it start over the same way.
    ``columns`` limits what is decoded and validated per table. Raises ``TallyError`` for
    unusable input.
    """
    stats = ReadStats()
    vanished = 0
    while True:
        # Files quarantined by earlier attempts are inside quarantine/ now: carry their count.
        stats = ReadStats(files_quarantined=stats.files_quarantined)
        consumers = start()
        try:
            _scan_once(root, consumers, budget_rows, progress, stats, columns, select, time_slice)
            return consumers, stats
        except Vanished as exc:
            vanished += 1
            if vanished >= REPLANS:
                raise TallyError(f"{exc}, {vanished} times in a row; read again later") from None
            log.info("%s; reading the dataset again", exc)
        except DamagedFile as exc:
            if not exc.quarantined:
                raise TallyError(
                    f"{exc}; it cannot be moved to quarantine, remove it and read again"
                ) from None
            warn(f"{exc.path}: damaged ({exc.reason}); quarantined, reading again without it")
            stats.files_quarantined += 1


def _scan_once(
    root: Path,
    consumers: Sequence[ChunkConsumer],
    budget_rows: int,
    progress: Callable[[int, int, int], None] | None,
    stats: ReadStats,
    columns: Mapping[str, Sequence[str]] | None,
    select: Callable[[dict[str, list[Path]]], dict[str, list[Path]]] | None = None,
    time_slice: TimeSlice | None = None,
) -> None:
    files = discover(root)
    listed = stats.files
    pieces = plan(root, select(files) if select is not None else files, stats)
    if time_slice is not None:
        stats.files = listed + _files_owned(pieces, stats.files - listed, time_slice)
    outside = {p for p in pieces if p.max_ns < EARLIEST_NS or p.min_ns > LATEST_NS}
    for piece in outside:  # every row of it has an impossible time: count them, bill none
        if time_slice is None or time_slice.owns(piece.min_ns):
            stats.ruled_out({f"{piece.table}.time": piece.rows})
    pieces = [p for p in pieces if p not in outside]
    if not pieces:
        return
    # The chunks span the valid times only (a stray row dated 1970 or 2200 inside a good file
    # must not stretch them over centuries); rows beyond are counted as the pieces are read.
    first = max(min(p.min_ns for p in pieces), EARLIEST_NS)
    last = min(max(p.max_ns for p in pieces), LATEST_NS)
    stats.first_ns, stats.last_ns = first, last
    # Every row is read, whatever --from/--to select (the biller counts only the selected
    # windows): the interval ending at a series' first selected row may be a gap opened long
    # before the start, and a job's user and tenant come from its latest row anywhere.
    bounds = chunk_bounds(pieces, first, last, budget_rows)
    primed = 0  # chunks of a slice's lookback
    if time_slice is not None:
        low, high = first, last
        if time_slice.end_ns is not None:
            high = min(high, time_slice.end_ns - 1)
        start = low
        if time_slice.start_ns is not None:
            start = max(low, time_slice.start_ns)
            low = max(low, time_slice.start_ns - time_slice.lookback_ns)
        ahead = chunk_bounds(pieces, low, min(start, high + 1) - 1, budget_rows)
        bounds = ahead + chunk_bounds(pieces, start, high, budget_rows)
        primed = len(ahead)
    chunks = read_chunks(
        root, pieces, bounds, stats, columns, valid=(first, last + 1), owned=time_slice
    )
    with closing(read_ahead(chunks)) as ahead_chunks:
        for i, chunk in enumerate(ahead_chunks, start=1):
            for consumer in consumers:
                if i > primed:
                    consumer.add(chunk)
                elif isinstance(consumer, SliceConsumer):
                    consumer.prime(chunk)
            if progress is not None:
                progress(i, len(bounds), stats.rows)


def _files_owned(pieces: list[Piece], planned: int, time_slice: TimeSlice) -> int:
    """How many of the ``planned`` files a time slice counts: those whose first time it holds,
    and, for the first slice, those without rows."""
    firsts: dict[Path, int] = {}
    for piece in pieces:
        firsts[piece.path] = min(piece.min_ns, firsts.get(piece.path, piece.min_ns))
    owned = sum(1 for ns in firsts.values() if time_slice.owns(ns))
    if time_slice.start_ns is None:
        owned += planned - len(firsts)
    return owned


# ------------------------------------------------------------ partitions: bills on many workers
NO_NODE = ""  # the partition of files outside any node= directory


def node_of(root: Path, path: Path) -> str:
    """The ``node=`` directory name of a sample file (as written, escaped), or ``NO_NODE``."""
    for part in path.relative_to(root).parts[:-1]:
        if part.startswith("node="):
            return part
    return NO_NODE


def node_partitions(root: Path) -> dict[str, dict[str, list[Path]]]:
    """The dataset's files per ``node=`` directory (``NO_NODE``: files outside one), each
    table's files sorted by path; quarantined files left out. A series (SPEC §3) lives in one
    node's directory, so each partition bills on its own. Raises ``TallyError`` like
    ``discover``."""
    parts: dict[str, dict[str, list[Path]]] = {}
    for table, path in _usable(root, discover(root)):
        parts.setdefault(node_of(root, path), {}).setdefault(table, []).append(path)
    return dict(sorted(parts.items()))


# ------------------------------------------------------------ a growing dataset: aggregate
@dataclass
class _Seen:
    """What has been read of one file stem (a journal and, later, its Parquet twin)."""

    size: int = -1
    mtime_ns: int = -1
    journal_rows: int = 0
    until_ns: int = -(2**62)  # newest time read from the journal
    parquet_done: bool = False
    failed_at: tuple[int, int] | None = None  # (size, mtime) when the file last failed to read


def _order_key(root: Path, path: Path) -> tuple[str, str, str]:
    relative = path.relative_to(root)
    date = _DATE.search(str(relative))
    return (date.group(1) if date else "", path.stem, str(relative))


class Follower:
    """Reads a dataset that node daemons keep writing into, returning only rows not read before.

    Files not seen before are read whole, files that grew (a daemon's journal of the current
    hour) from the first row not yet read, and a journal's Parquet twin (written when the hour is
    compacted) only for rows later than those its journal gave. A file that fails to read is set
    aside only when it fails again a poll later with the same size and mtime (a file still being
    copied in is read once it is whole). ``stats`` counts files read and set aside; ``rows`` the
    rows read per table; ``newest_ns`` the newest time read.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: dict[tuple[str, str], _Seen] = {}
        self.stats = ReadStats()
        self.rows: dict[str, int] = dict.fromkeys(SCHEMAS, 0)
        self.newest_ns: int | None = None

    def files(self) -> list[tuple[str, Path]]:
        """(table, path) of every file, by date, then stem: each series comes oldest first.

        Raises ``TallyError`` when the dataset directory is missing or unreadable.
        """
        try:
            found = discover(self.root)
        except TallyError as exc:
            if "holds no sample files" not in str(exc):
                raise
            found = {}
        usable = list(_usable(self.root, found))
        usable.sort(key=lambda item: (_order_key(self.root, item[1]), item[0]))
        return usable

    def key(self, table: str, path: Path) -> tuple[str, str]:
        """Which file ``seen`` remembers: a journal and its Parquet twin share the key."""
        return table, str(path.relative_to(self.root).with_suffix(""))

    def new_rows(self, table: str, path: Path) -> pa.Table | None:
        """The rows of ``path`` not read before (None when there are none)."""
        seen = self.seen.setdefault(self.key(table, path), _Seen())
        try:
            info = path.stat()
        except FileNotFoundError:
            return None  # compacted or removed since the listing
        is_journal = path.suffix == JOURNAL_SUFFIX
        if not is_journal and seen.parquet_done and info.st_mtime_ns == seen.mtime_ns:
            return None
        if is_journal and (info.st_size, info.st_mtime_ns) == (seen.size, seen.mtime_ns):
            return None
        try:
            data = read_file(path, table)
        except FileNotFoundError:
            return None
        except (SchemaError, pa.ArrowException, OSError) as exc:
            if is_journal and not isinstance(exc, SchemaError):
                return None  # being written or torn: read again next poll
            state = (info.st_size, info.st_mtime_ns)
            if seen.failed_at != state:
                # Maybe still being copied in (cp, scp and rsync write in place): set aside only
                # what fails again unchanged, a poll later.
                seen.failed_at = state
                return None
            if not seen.parquet_done:
                _reject(self.root, path, exc, self.stats)
            # read again only once it changes
            seen.parquet_done = True
            seen.size, seen.mtime_ns = info.st_size, info.st_mtime_ns
            return None
        seen.size, seen.mtime_ns = info.st_size, info.st_mtime_ns
        if is_journal:
            new = data.slice(seen.journal_rows)
            seen.journal_rows = data.num_rows
        else:
            first_time = not seen.parquet_done
            seen.parquet_done = True
            new = data
            if seen.journal_rows:  # the compacted twin of a journal already read
                times = data.column("time").cast(pa.int64())
                new = data.filter(pc.greater(times, pa.scalar(seen.until_ns, pa.int64())))
            if first_time:
                self.stats.files += 1
        new, ruled_out = screen(new, table)
        self.stats.ruled_out(ruled_out)
        if new.num_rows:
            self.rows[table] += new.num_rows
            newest = int(pc.max(new.column("time").cast(pa.int64())).as_py())
            if is_journal:
                seen.until_ns = max(seen.until_ns, newest)
            if self.newest_ns is None or newest > self.newest_ns:
                self.newest_ns = newest
        return new
