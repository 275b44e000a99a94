"""The Arrow IPC *stream* format written by hand, for the daemon's journals, without pyarrow.

A journal (``writer.Store``) is one stream per table and hour: a schema message, one record
batch message per round, and the end-of-stream marker when it is closed. pyarrow writes the
same bytes but costs 45 MiB of libraries in a daemon that otherwise needs none; a round is a
few dozen rows, so one ``struct`` or NumPy call per column does the work.

What is written (Arrow columnar format, "Serialization and Interprocess Communication"):

* each message is ``0xFFFFFFFF``, the int32 length of its metadata, the metadata (a
  ``Message`` flatbuffer of ``Message.fbs`` padded to 8 bytes), then its body;
* the schema has the table's fields (``telemetry.tables``) in order, with their nullability,
  little-endian, no custom metadata;
* a record batch's body holds, per column, a validity bitmap (LSB first; empty when the column
  has no null) and the values: little-endian numbers (``time`` as int64 nanoseconds, typed
  ``timestamp[ns, tz=UTC]``), or int32 offsets and UTF-8 bytes for strings; each buffer starts
  at a multiple of 8 bytes of the body;
* the end of the stream is ``0xFFFFFFFF`` followed by a zero length.

The flatbuffers are built by :class:`_Builder` (front to back: every offset points forward, each
scalar aligned to its size, as the flatbuffers verifier of every Arrow reader checks). A record
batch's metadata differs from the previous batch's of its table only in numbers (rows, null
counts, buffer offsets and lengths, body length), so it is built once per table
(:func:`_layout`) and each batch packs its numbers into a copy: the journal runs every round.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from telemetry.frame import Frame, RoundBatch
from telemetry.tables import TABLES, Column

CONTINUATION = b"\xff\xff\xff\xff"
END_OF_STREAM = CONTINUATION + b"\x00\x00\x00\x00"

# Message.fbs / Schema.fbs enum values.
_METADATA_V5 = 4
_HEADER_SCHEMA = 1
_HEADER_RECORD_BATCH = 3
_TYPE_INT = 2
_TYPE_FLOATING_POINT = 3
_TYPE_UTF8 = 5
_TYPE_TIMESTAMP = 10
_PRECISION = {"float32": 1, "float64": 2}  # SINGLE, DOUBLE
_NANOSECOND = 3
_INT_BITS = {"int16": 16, "int32": 32, "int64": 64}
# Little-endian NumPy dtype of each numeric column kind's values.
_VALUE_DTYPES: dict[str, np.dtype[Any]] = {
    "time": np.dtype("<i8"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
_MAX_STRING_BYTES = 2**31 - 1  # int32 offsets

# Inline scalar kinds of a flatbuffer table: struct format and size (= alignment).
_SCALARS = {
    "bool": ("<B", 1),
    "u8": ("<B", 1),
    "i16": ("<h", 2),
    "i32": ("<i", 4),
    "i64": ("<q", 8),
}


@dataclass
class _Table:
    """A flatbuffer table: ``(slot, kind, value)`` per present field; kind is a ``_SCALARS`` key
    or ``"ref"`` (value: a ``_Table``, ``str``, ``_Structs`` or list of ``_Table``)."""

    fields: list[tuple[int, str, Any]] = field(default_factory=list)


@dataclass
class _Structs:
    """A vector of 8-byte-aligned structs, already packed little-endian; ``hole`` names where
    its data lands in the buffer (:attr:`_Builder.holes`)."""

    count: int
    data: bytes
    hole: str = ""


@dataclass(frozen=True)
class _Hole:
    """A scalar field's value left at zero; :attr:`_Builder.holes` says where it lands."""

    name: str


class _Builder:
    """Lays a flatbuffer out front to back; each child follows the object that refers to it."""

    def __init__(self) -> None:
        self.buf = bytearray(4)  # the root table's offset, set by finish
        self.holes: dict[str, int] = {}  # where each _Hole and named _Structs' data lies

    def _align(self, size: int, phase: int = 0) -> None:
        self.buf += bytes((phase - len(self.buf)) % size)

    def finish(self, root: _Table) -> bytes:
        """The buffer of ``root``, padded to a multiple of 8 bytes."""
        struct.pack_into("<I", self.buf, 0, self._emit(root))
        self._align(8)
        return bytes(self.buf)

    def _emit(self, node: Any) -> int:
        buf = self.buf
        if isinstance(node, str):
            data = node.encode("utf-8")
            self._align(4)
            at = len(buf)
            buf += struct.pack("<I", len(data)) + data + b"\x00"
            return at
        if isinstance(node, _Structs):
            self._align(8, phase=4)  # the length precedes the 8-aligned elements
            at = len(buf)
            buf += struct.pack("<I", node.count) + node.data
            if node.hole:
                self.holes[node.hole] = at + 4
            return at
        if isinstance(node, list):
            self._align(4)
            at = len(buf)
            buf += struct.pack("<I", len(node)) + bytes(4 * len(node))
            for i, child in enumerate(node):
                slot = at + 4 + 4 * i
                struct.pack_into("<I", buf, slot, self._emit(child) - slot)
            return at
        return self._emit_table(node)

    def _emit_table(self, table: _Table) -> int:
        buf = self.buf
        # Widest fields first right after the 4-byte vtable offset, which sits 4 bytes before
        # an 8-byte boundary when there are 8-byte fields: so every field is aligned.
        inline = sorted(table.fields, key=lambda f: -_width(f[1]))
        wide = any(_width(kind) == 8 for _, kind, _ in inline)
        offsets: dict[int, int] = {}
        position = 4
        for slot, kind, _ in inline:
            offsets[slot] = position
            position += _width(kind)
        slots = 1 + max(offsets, default=-1)
        vtable = [4 + 2 * slots, position] + [offsets.get(s, 0) for s in range(slots)]
        self._align(2)
        vtable_at = len(buf)
        buf += struct.pack(f"<{len(vtable)}H", *vtable)
        self._align(8, phase=4) if wide else self._align(4)
        at = len(buf)
        buf += bytes(position)
        struct.pack_into("<i", buf, at, at - vtable_at)
        children: list[tuple[int, Any]] = []
        for slot, kind, value in inline:
            if kind == "ref":
                children.append((at + offsets[slot], value))
            elif isinstance(value, _Hole):
                self.holes[value.name] = at + offsets[slot]
            else:
                struct.pack_into(_SCALARS[kind][0], buf, at + offsets[slot], value)
        for where, child in children:
            struct.pack_into("<I", buf, where, self._emit(child) - where)
        return at


def _width(kind: str) -> int:
    return 4 if kind == "ref" else _SCALARS[kind][1]


def _message(
    header_type: int, header: _Table, body_length: int | _Hole
) -> tuple[bytes, dict[str, int]]:
    """One encapsulated message's metadata part (marker, length, padded ``Message``) and where
    its holes lie in it."""
    message = _Table(
        [
            (0, "i16", _METADATA_V5),
            (1, "u8", header_type),
            (2, "ref", header),
            (3, "i64", body_length),
        ]
    )
    builder = _Builder()
    metadata = builder.finish(message)
    prefix = CONTINUATION + struct.pack("<i", len(metadata))
    return prefix + metadata, {k: len(prefix) + at for k, at in builder.holes.items()}


def _arrow_type(kind: str) -> tuple[int, _Table]:
    if kind == "time":
        return _TYPE_TIMESTAMP, _Table([(0, "i16", _NANOSECOND), (1, "ref", "UTC")])
    if kind == "string":
        return _TYPE_UTF8, _Table()
    if kind in _PRECISION:
        return _TYPE_FLOATING_POINT, _Table([(0, "i16", _PRECISION[kind])])
    return _TYPE_INT, _Table([(0, "i32", _INT_BITS[kind]), (1, "bool", 1)])


@functools.cache
def schema_message(table: str) -> bytes:
    """The stream's first message: the schema of sample table ``table``."""
    fields = []
    for column in TABLES[table]:
        type_id, type_table = _arrow_type(column.kind)
        fields.append(
            _Table(
                [
                    (0, "ref", column.name),
                    (1, "bool", int(column.nullable)),
                    (2, "u8", type_id),
                    (3, "ref", type_table),
                    (5, "ref", []),  # children: none, but readers expect the vector
                ]
            )
        )
    schema = _Table([(0, "i16", 0), (1, "ref", fields)])  # little-endian
    return _message(_HEADER_SCHEMA, schema, 0)[0]


class _Plan(NamedTuple):
    """How one column is written: for numbers the values' dtype."""

    name: str
    string: bool
    dtype: np.dtype[Any] | None
    column: Column


@dataclass(frozen=True)
class _Layout:
    """What every record batch of one table shares: the columns' plans and the message's
    metadata with zeros where the row count, the field nodes (length, null count per column),
    the buffers (offset, length; a validity bitmap and the values, and for strings the offsets
    before them, per column) and the body length go. Only those numbers differ from one batch to
    the next: a batch has every buffer, an absent bitmap being one of length 0."""

    plans: tuple[_Plan, ...]
    template: bytes
    rows_at: int
    nodes_at: int
    nodes: struct.Struct
    buffers_at: int
    buffers: struct.Struct
    body_length_at: int


_I64 = struct.Struct("<q")
_PADDING = [bytes(n) for n in range(8)]


@functools.cache
def _layout(table: str) -> _Layout:
    """The record batch layout of sample table ``table``; ``KeyError`` for an unknown table."""
    columns = TABLES[table]
    buffer_count = sum(3 if c.kind == "string" else 2 for c in columns)
    header = _Table(
        [
            (0, "i64", _Hole("rows")),
            (1, "ref", _Structs(len(columns), bytes(16 * len(columns)), hole="nodes")),
            (2, "ref", _Structs(buffer_count, bytes(16 * buffer_count), hole="buffers")),
        ]
    )
    template, holes = _message(_HEADER_RECORD_BATCH, header, _Hole("body_length"))
    plans = []
    for column in columns:
        dtype = _VALUE_DTYPES.get(column.kind)
        plans.append(_Plan(column.name, dtype is None, dtype, column))
    return _Layout(
        plans=tuple(plans),
        template=template,
        rows_at=holes["rows"],
        nodes_at=holes["nodes"],
        nodes=struct.Struct(f"<{2 * len(columns)}q"),
        buffers_at=holes["buffers"],
        buffers=struct.Struct(f"<{2 * buffer_count}q"),
        body_length_at=holes["body_length"],
    )


# A string column's last values and their buffers, by column name: a node's rounds repeat their
# job ids, users and UUIDs, which need encoding only when they change.
StringBuffers = dict[str, tuple[list[Any], tuple["np.ndarray | None", list[bytes]]]]


def _string_buffers(column: Column, items: list[Any]) -> tuple[np.ndarray | None, list[bytes]]:
    """A validity mask when ``items`` holds None (else None), then the int32 offsets and the
    UTF-8 bytes of a string column. Raises ``ValueError`` beyond 2 GiB of strings."""
    valid = None
    try:
        text = "".join(items)  # TypeError for a None (a null)
    except TypeError:
        text = None
    if text is not None and text.isascii():
        data = text.encode("ascii")
        lengths: Iterable[int] = map(len, items)  # one byte a character
    else:
        if text is None and None in items:
            valid = np.array([v is not None for v in items], dtype=bool)
            encoded = [b"" if v is None else v.encode("utf-8") for v in items]
        else:
            encoded = [v.encode("utf-8") for v in items]
        data = b"".join(encoded)
        lengths = map(len, encoded)
    if len(data) > _MAX_STRING_BYTES:
        raise ValueError(f"column {column.name!r}: more than 2 GiB of strings in one batch")
    offsets = np.fromiter(accumulate(lengths, initial=0), dtype="<i4", count=len(items) + 1)
    return valid, [offsets.tobytes(), data]


def _strings_again(
    column: Column, items: list[Any], last: StringBuffers | None
) -> tuple[np.ndarray | None, list[bytes]]:
    """:func:`_string_buffers` of ``items``, or the batch before's (``last``) where it held the
    same values; ``last`` is updated."""
    kept = None if last is None else last.get(column.name)
    if kept is not None and kept[0] == items:
        return kept[1]
    found = _string_buffers(column, items)
    if last is not None:
        last[column.name] = (items, found)
    return found


def _column_buffers(
    plan: _Plan, values: np.ndarray, valid: np.ndarray | None, last: StringBuffers | None = None
) -> tuple[int, list[bytes]]:
    """Null count, then validity bitmap (empty without nulls) and value buffers of one column;
    ``last``: string buffers of the previous batch, reused for the same values and updated.
    Raises ``ValueError`` for a null in a required column."""
    rows = len(values)
    nulls = 0 if valid is None else rows - int(np.count_nonzero(valid))
    if plan.string:
        if nulls and nulls == rows:
            # all null (a column no row has, as mig_profile mostly): nothing to encode
            data = [bytes(4 * rows + 4), b""]
        else:
            found, data = _strings_again(plan.column, values.tolist(), last)
            if valid is None and found is not None:
                valid = found
                nulls = rows - int(np.count_nonzero(valid))
    else:
        dtype = plan.dtype
        data = [(values if values.dtype == dtype else values.astype(dtype)).tobytes()]
    if not nulls or valid is None:
        return 0, [b"", *data]
    if not plan.column.nullable:
        raise ValueError(f"column {plan.column.name!r} is required but holds nulls")
    if nulls == rows:
        return nulls, [bytes((rows + 7) // 8), *data]
    return nulls, [np.packbits(valid, bitorder="little").tobytes(), *data]


def record_batch_message(frame: Frame, last: StringBuffers | None = None) -> bytes:
    """One record batch message (metadata and body) of ``frame``'s rows. ``last``: the string
    buffers of the batch before (see :data:`StringBuffers`), reused and updated.

    Raises ``ValueError`` when a column is missing, of another length, or null where the table
    requires a value (nothing is written then).
    """
    layout = _layout(frame.table)
    rows = frame.num_rows
    columns = frame.columns
    valid = frame.valid
    buffers: list[tuple[int, Sequence[bytes]]] = []  # null count and buffers of each column
    for plan in layout.plans:
        name, string, dtype, _ = plan
        values = _column(frame.table, columns, name, rows)
        mask = valid.get(name)
        if mask is None and not string:
            # The common case, numbers without a mask: no bitmap, one value buffer.
            data = (values if values.dtype == dtype else values.astype(dtype)).tobytes()
            buffers.append((0, (b"", data)))
        else:
            buffers.append(_column_buffers(plan, values, mask, last))
    return _message_of(layout, rows, buffers)


def _column(table: str, columns: Mapping[str, Any], name: str, rows: int) -> Any:
    """Column ``name`` of ``columns``; ``ValueError`` where it is missing or not ``rows`` long."""
    values = columns.get(name)
    if values is None:
        raise ValueError(f"{table}: column {name!r} missing")
    if len(values) != rows:
        raise ValueError(f"{table}: column {name!r} has {len(values)} rows, not {rows}")
    return values


# struct codes of the numeric column kinds, little-endian as Arrow's buffers are
_STRUCT_CODES = {
    "time": "q",
    "int16": "h",
    "int32": "i",
    "int64": "q",
    "float32": "f",
    "float64": "d",
}
# What struct turns into a float32 as NumPy does: a double, rounded once. An integer struct
# would round to a double first and then again (NumPy rounds a NumPy integer once), and a float32
# it would pass through a double (a signalling NaN comes out quiet).
_FLOAT32_EXACT = frozenset({float, np.float64, type(None)})


def _validity(values: Sequence[Any]) -> tuple[int, bytes]:
    """Null count and validity bitmap (LSB first) of ``values``."""
    bits = 0
    nulls = 0
    for i, value in enumerate(values):
        if value is None:
            nulls += 1
        else:
            bits |= 1 << i
    return nulls, bits.to_bytes((len(values) + 7) // 8, "little")


def round_batch_message(batch: RoundBatch, last: StringBuffers | None = None) -> bytes:
    """:func:`record_batch_message` of a :class:`RoundBatch`, the same bytes as of its Frame:
    the whole body packed from the Python values by one ``struct`` call, no NumPy array made (a
    round of a node is a few dozen rows, and the daemon writes one every interval). The call
    and the metadata are made once for each shape a table's batches take (rows, null counts,
    string lengths): a node's rounds repeat theirs."""
    try:
        return _round_batch_message(batch, last, numpy_floats=False)
    except (OverflowError, struct.error):  # a float beyond float32: NumPy makes it inf
        return _round_batch_message(batch, last, numpy_floats=True)


def _round_batch_message(
    batch: RoundBatch, last: StringBuffers | None, numpy_floats: bool
) -> bytes:
    """:func:`round_batch_message`; ``numpy_floats``: float32 columns converted by NumPy (as
    they are anyway where they hold anything but Python floats), else packed by ``struct``."""
    layout = _layout(batch.table)
    rows = batch.num_rows
    values = batch.values
    nulls = batch.nulls
    shape: list[Any] = [batch.table, rows]  # what fixes the metadata and the body's layout
    parts: list[Any] = []  # what the body's struct packs, in order
    for plan in layout.plans:
        name, string, dtype, column = plan
        items = values.get(name)
        if items is None or len(items) != rows:
            items = _column(batch.table, values, name, rows)  # raises: missing, or not rows long
        if name in nulls:
            count, bitmap = _validity(items)
            if count and not column.nullable:
                raise ValueError(f"{batch.table}: column {name!r} is required but holds nulls")
        else:
            count, bitmap = 0, b""
        if count:
            parts.append(bitmap)
        if not string:
            numbers = [0 if v is None else v for v in items] if count else items
            if column.kind == "float32" and (
                numpy_floats or not _FLOAT32_EXACT.issuperset(map(type, items))
            ):
                with np.errstate(over="ignore"):  # beyond float32: inf, as in Arrow
                    parts.append(np.array(numbers, dtype=dtype).tobytes())
                shape.append((count,))  # (a tuple: bytes NumPy made)
            else:
                parts.extend(numbers)
                shape.append(count)
        elif count == rows:  # all null (a column no row has, as mig_profile mostly)
            parts += (bytes(4 * rows + 4), b"")
            shape.append(count)
        else:
            offsets, data = _strings_again(column, list(items), last)[1]
            parts += (offsets, data)
            shape += (count, len(data))
    key = tuple(shape)
    packing = _PACKINGS.get(key)
    if packing is None:
        packing = _packing(layout, key)
    head, body = packing
    return head + body.pack(*parts)


# struct formats and metadata of the round batches' shapes seen (see round_batch_message)
_PACKINGS: dict[tuple[Any, ...], tuple[bytes, struct.Struct]] = {}
_MAX_PACKINGS = 64  # a few live shapes a table; some 2-3 KB each


def _packing(layout: _Layout, key: tuple[Any, ...]) -> tuple[bytes, struct.Struct]:
    """The metadata and the body's struct of a round batch of shape ``key`` (table, rows, then
    per column its null count, in a tuple for numbers whose bytes NumPy made, and for strings
    their bytes), kept for the batches to come."""
    rows = key[1]
    shape = iter(key[2:])
    sizes: list[tuple[int, list[int]]] = []  # null count and buffer sizes of each column
    body = ["<"]
    for plan in layout.plans:
        count = next(shape)
        made_by_numpy = isinstance(count, tuple)
        if made_by_numpy:
            (count,) = count
        bitmap = (rows + 7) // 8 if count else 0
        if bitmap:
            body.append(f"{bitmap}s{-bitmap & 7}x")
        if not plan.string:
            code = _STRUCT_CODES[plan.column.kind]
            width = rows * struct.calcsize("<" + code)
            made = f"{width}s" if made_by_numpy else f"{rows}{code}"
            body.append(f"{made}{-width & 7}x")
            sizes.append((count, [bitmap, width]))
            continue
        data = 0 if count == rows else next(shape)
        offsets = 4 * rows + 4
        body.append(f"{offsets}s{-offsets & 7}x{data}s{-data & 7}x")
        sizes.append((count, [bitmap, offsets, data]))
    packing = (bytes(_head(layout, rows, sizes)), struct.Struct("".join(body)))
    if len(_PACKINGS) >= _MAX_PACKINGS:  # shapes of long gone rounds
        _PACKINGS.clear()
    _PACKINGS[key] = packing
    return packing


def _message_of(layout: _Layout, rows: int, buffers: list[tuple[int, Sequence[bytes]]]) -> bytes:
    """The message of a batch of ``rows`` rows whose columns hold ``buffers`` (null count and
    buffers, in the layout's order): its metadata (:func:`_head`), then the buffers each
    padded to 8 bytes."""
    sizes = [(nulls, [len(part) for part in parts]) for nulls, parts in buffers]
    message: list[bytes | bytearray] = [_head(layout, rows, sizes)]
    for _, parts in buffers:
        for part in parts:
            message.append(part)
            padding = -len(part) & 7
            if padding:
                message.append(_PADDING[padding])
    return b"".join(message)


def _head(layout: _Layout, rows: int, sizes: Sequence[tuple[int, Sequence[int]]]) -> bytearray:
    """The metadata of a batch of ``rows`` rows whose columns hold buffers of ``sizes`` (null
    count and each buffer's bytes, in the layout's order): the numbers packed into the
    layout's template, each buffer starting at a multiple of 8 bytes of the body."""
    nodes = [rows, 0] * len(layout.plans)
    spans: list[int] = []  # offset and length of each buffer in the body
    at = 0
    for i, (nulls, buffers) in enumerate(sizes):
        if nulls:
            nodes[2 * i + 1] = nulls
        for size in buffers:
            spans += (at, size)
            at += size + (-size & 7)
    head = bytearray(layout.template)
    layout.nodes.pack_into(head, layout.nodes_at, *nodes)
    layout.buffers.pack_into(head, layout.buffers_at, *spans)
    _I64.pack_into(head, layout.rows_at, rows)
    _I64.pack_into(head, layout.body_length_at, at)
    return head


class StreamWriter:
    """Writes one sample table's IPC stream to ``sink``: the schema now, a batch per
    :meth:`write_table`, the end-of-stream marker on :meth:`close` (``sink`` stays open).

    Each message goes to ``sink`` in one ``write`` (more only when an unbuffered ``sink`` takes
    part of it); ``OSError`` from ``sink`` passes through.
    """

    def __init__(self, sink: BinaryIO, table: str) -> None:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        self.sink = sink
        self.table = table
        self._strings: StringBuffers = {}
        self._write(schema_message(table))

    def write_table(self, rows: Frame | RoundBatch) -> None:
        """Append ``rows`` (of this writer's table) as one record batch."""
        if rows.table != self.table:
            raise ValueError(f"rows of table {rows.table!r} in the {self.table!r} journal")
        if isinstance(rows, RoundBatch):
            self._write(round_batch_message(rows, self._strings))
        else:
            self._write(record_batch_message(rows, self._strings))

    def close(self) -> None:
        self._write(END_OF_STREAM)

    def _write(self, message: bytes) -> None:
        # An unbuffered file may take part of a message (a disk filling up): write the rest.
        written = self.sink.write(message) or 0  # None: a non-blocking sink took nothing
        while written < len(message):
            more = self.sink.write(message[written:])
            if not more:
                raise OSError(f"{self.table} journal: a write made no progress")
            written += more
