"""Time-ordered chunks of a dataset, for bills that must fit in bounded memory.

Planning reads only Parquet footers: each row group's time range and row count (the time column
itself when a file has no statistics). Chunks are consecutive time ranges [a, b) sized so that
each holds about ``budget_rows`` rows; a chunk reads the row groups that overlap it and keeps the
rows inside it. Files that cannot be opened are quarantined and counted; a file whose columns do
not match its table's schema is an error naming the file and the column.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from telemetry.dataset import ReadStats
from telemetry.errors import TallyError
from telemetry.schema import SCHEMAS, TIME, SchemaError, validate
from telemetry.store import JOURNAL_SUFFIX, QUARANTINE, quarantine, read_journal

log = logging.getLogger("tally.chunks")

DEFAULT_BUDGET_ROWS = 2_000_000
_UNIT_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


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


def _check_columns(path: Path, table: str, schema: pa.Schema) -> None:
    """A missing required column is the operator's error to fix (exit 2); a column of another
    type marks a foreign or damaged file, which is quarantined like an unreadable one."""
    try:
        validate(schema.empty_table(), table)
    except SchemaError as exc:
        if exc.missing:
            raise TallyError(f"{path}: {exc}") from None
        raise pa.ArrowInvalid(f"schema does not match: {exc}") from None


def _time_range(values: pa.ChunkedArray | pa.Array) -> tuple[int, int]:
    ns = pc.cast(values, TIME).cast(pa.int64())
    if len(ns) == 0 or ns.null_count == len(ns):
        return 0, -1
    bounds = pc.min_max(ns)
    return int(bounds["min"].as_py()), int(bounds["max"].as_py())


def _parquet_pieces(path: Path, table: str) -> list[Piece]:
    meta = pq.read_metadata(path)
    arrow_schema = meta.schema.to_arrow_schema()
    _check_columns(path, table, arrow_schema)
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
        if stats is not None and stats.has_min_max:
            low, high = int(stats.min_raw) * scale, int(stats.max_raw) * scale
        else:
            reader = reader or pq.ParquetFile(path)
            low, high = _time_range(reader.read_row_group(i, columns=["time"]).column("time"))
        pieces.append(Piece(table, path, i, low, high, group.num_rows))
    return pieces


def plan(root: Path, files: dict[str, list[Path]], stats: ReadStats) -> list[Piece]:
    """Every readable piece of the dataset; unreadable files are quarantined and counted."""
    pieces: list[Piece] = []
    for table, paths in files.items():
        for path in paths:
            if QUARANTINE in path.relative_to(root).parts:
                continue
            try:
                if path.suffix == JOURNAL_SUFFIX:
                    data, _ = read_journal(path)
                    if data is None:
                        raise pa.ArrowInvalid("not an Arrow IPC stream")
                    _check_columns(path, table, data.schema)
                    if data.num_rows:
                        low, high = _time_range(data.column("time"))
                        pieces.append(Piece(table, path, -1, low, high, data.num_rows))
                else:
                    pieces.extend(_parquet_pieces(path, table))
            except (pa.ArrowException, OSError) as exc:
                stats.problems.append(f"{path}: {exc}")
                if path.suffix != JOURNAL_SUFFIX and quarantine(root, path, str(exc)) is not None:
                    stats.files_quarantined += 1
                else:
                    stats.files_skipped += 1
                continue
            stats.files += 1
    return pieces


class ValidatedChunk(dict[str, pa.Table]):
    """A chunk whose tables ``validate(..., dictionaries=True)`` has already checked and conformed
    (consumers may skip checking again; string columns are ``dictionary<int32, string>``)."""


def _read_piece(piece: Piece, columns: Sequence[str] | None) -> pa.Table:
    """One piece's rows, validated, string columns dictionary-encoded (as Parquet stores them:
    decoding skips building a string per row, and series keys come out already encoded)."""
    if piece.row_group < 0:
        data, _ = read_journal(piece.path)
        assert data is not None
    else:
        wanted = SCHEMAS[piece.table].names if columns is None else list(columns)
        strings = [n for n in wanted if pa.types.is_string(SCHEMAS[piece.table].field(n).type)]
        parquet = pq.ParquetFile(piece.path, read_dictionary=strings)
        present = set(parquet.schema_arrow.names)
        # only what the consumers read is decoded
        data = parquet.read_row_group(
            piece.row_group,
            columns=None if columns is None else [c for c in wanted if c in present],
        )
    try:
        if columns is not None:
            return validate(data, piece.table, columns, dictionaries=True)
        return validate(data, piece.table, dictionaries=True).select(SCHEMAS[piece.table].names)
    except SchemaError as exc:
        raise pa.ArrowInvalid(str(exc)) from None


def chunk_bounds(
    pieces: list[Piece], low: int, high: int, budget_rows: int
) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges covering [low, high] of about ``budget_rows`` rows each.

    Rows are assumed spread evenly over each piece's time range, which holds for telemetry.
    """
    if high < low:
        return []
    total = sum(p.rows for p in pieces if p.max_ns >= low and p.min_ns <= high)
    parts = max(1, -(-total // max(1, budget_rows)))
    step = max(1_000_000_000, -(-(high + 1 - low) // parts))
    return [(a, min(a + step, high + 1)) for a in range(low, high + 1, step)]


def read_chunks(
    root: Path,
    pieces: list[Piece],
    bounds: list[tuple[int, int]],
    stats: ReadStats,
    columns: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[ValidatedChunk]:
    """For each [a, b) in ``bounds``, every table's rows with a <= time < b, validated.

    ``columns`` limits each table to those columns (in that order); default: the whole schema.
    """
    # A piece that reaches past its chunk keeps its later rows for the next chunks, so each piece
    # is decoded and validated once however many chunks it spans.
    later: dict[Piece, pa.Table] = {}
    for a, b in bounds:
        parts: dict[str, list[pa.Table]] = {name: [] for name in SCHEMAS}
        low, high = pa.scalar(a, pa.int64()), pa.scalar(b, pa.int64())
        for piece in pieces:
            if piece.max_ns < a or piece.min_ns >= b:
                continue
            data = later.pop(piece, None)
            if data is None:
                try:
                    data = _read_piece(piece, None if columns is None else columns[piece.table])
                except (pa.ArrowException, OSError) as exc:
                    moved = quarantine(root, piece.path, str(exc)) is not None
                    raise DamagedFile(piece.path, str(exc), moved) from None
            if piece.min_ns >= a and piece.max_ns < b:
                parts[piece.table].append(data)
                continue
            times = data.column("time").cast(pa.int64())
            parts[piece.table].append(
                data.filter(pc.and_(pc.greater_equal(times, low), pc.less(times, high)))
            )
            if piece.max_ns >= b:
                later[piece] = data.filter(pc.greater_equal(times, high))
        stats.rows += sum(sum(t.num_rows for t in tables) for tables in parts.values())
        yield ValidatedChunk(
            {
                name: pa.concat_tables(tables)
                if tables
                else _empty(name, None if columns is None else columns[name])
                for name, tables in parts.items()
            }
        )


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
