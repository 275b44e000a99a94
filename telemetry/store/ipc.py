"""The Arrow IPC *stream* format written by hand, for the daemon's journals, without pyarrow.

A journal (``writer.Store``) is one stream per table and hour: a schema message, one record
batch message per round, and the end-of-stream marker when it is closed. pyarrow writes the
same bytes but costs 45 MiB of libraries in a daemon that otherwise needs none; a round is a
few dozen rows, so a few NumPy calls per column do the work.

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
scalar aligned to its size, as the flatbuffers verifier of every Arrow reader checks).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from telemetry.frame import Frame
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
    """A vector of 8-byte-aligned structs, already packed little-endian."""

    count: int
    data: bytes


class _Builder:
    """Lays a flatbuffer out front to back; each child follows the object that refers to it."""

    def __init__(self) -> None:
        self.buf = bytearray(4)  # the root table's offset, set by finish

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
            else:
                struct.pack_into(_SCALARS[kind][0], buf, at + offsets[slot], value)
        for where, child in children:
            struct.pack_into("<I", buf, where, self._emit(child) - where)
        return at


def _width(kind: str) -> int:
    return 4 if kind == "ref" else _SCALARS[kind][1]


def _message(header_type: int, header: _Table, body_length: int) -> bytes:
    """One encapsulated message's metadata part: marker, length, padded ``Message``."""
    message = _Table(
        [
            (0, "i16", _METADATA_V5),
            (1, "u8", header_type),
            (2, "ref", header),
            (3, "i64", body_length),
        ]
    )
    metadata = _Builder().finish(message)
    return CONTINUATION + struct.pack("<i", len(metadata)) + metadata


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
    return _message(_HEADER_SCHEMA, schema, 0)


def _column_buffers(
    column: Column, values: np.ndarray, valid: np.ndarray | None
) -> tuple[int, list[bytes]]:
    """Null count, then validity bitmap (empty without nulls) and value buffers of one column.
    Raises ``ValueError`` for a null in a required column."""
    rows = len(values)
    if column.kind == "string":
        items = values.tolist()
        if valid is None and None in items:
            valid = np.array([v is not None for v in items], dtype=bool)
        if valid is None:
            encoded = [v.encode("utf-8") for v in items]
        else:
            encoded = [b"" if v is None else v.encode("utf-8") for v in items]
        offsets = np.zeros(rows + 1, dtype=np.int64)
        offsets[1:] = np.fromiter(map(len, encoded), dtype=np.int64, count=rows)
        np.cumsum(offsets, out=offsets)
        if offsets[-1] > _MAX_STRING_BYTES:
            raise ValueError(f"column {column.name!r}: more than 2 GiB of strings in one batch")
        data = [offsets.astype("<i4").tobytes(), b"".join(encoded)]
    else:
        dtype = _VALUE_DTYPES[column.kind]
        data = [(values if values.dtype == dtype else values.astype(dtype)).tobytes()]
    nulls = 0 if valid is None else rows - int(np.count_nonzero(valid))
    if valid is None or nulls == 0:
        return 0, [b"", *data]
    if not column.nullable:
        raise ValueError(f"column {column.name!r} is required but holds nulls")
    return nulls, [np.packbits(valid, bitorder="little").tobytes(), *data]


def record_batch_message(frame: Frame) -> bytes:
    """One record batch message (metadata and body) of ``frame``'s rows.

    Raises ``ValueError`` when a column is missing, of another length, or null where the table
    requires a value (nothing is written then).
    """
    rows = frame.num_rows
    nodes: list[int] = []
    buffers: list[int] = []
    body: list[bytes] = []
    body_length = 0
    for column in TABLES[frame.table]:
        try:
            values = frame.columns[column.name]
        except KeyError:
            raise ValueError(f"{frame.table}: column {column.name!r} missing") from None
        if len(values) != rows:
            raise ValueError(f"{frame.table}: column {column.name!r} has {len(values)} rows")
        nulls, parts = _column_buffers(column, values, frame.valid.get(column.name))
        nodes += (rows, nulls)
        for part in parts:
            buffers += (body_length, len(part))
            padded = -len(part) % 8
            body.append(part + bytes(padded) if padded else part)
            body_length += len(part) + padded
    header = _Table(
        [
            (0, "i64", rows),
            (1, "ref", _Structs(len(nodes) // 2, np.array(nodes, dtype="<i8").tobytes())),
            (2, "ref", _Structs(len(buffers) // 2, np.array(buffers, dtype="<i8").tobytes())),
        ]
    )
    return _message(_HEADER_RECORD_BATCH, header, body_length) + b"".join(body)


class StreamWriter:
    """Writes one sample table's IPC stream to ``sink``: the schema now, a batch per
    :meth:`write_table`, the end-of-stream marker on :meth:`close` (``sink`` stays open).

    Each message goes to ``sink`` in one ``write``; ``OSError`` from ``sink`` passes through.
    """

    def __init__(self, sink: BinaryIO, table: str) -> None:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        self.sink = sink
        self.table = table
        sink.write(schema_message(table))

    def write_table(self, frame: Frame) -> None:
        """Append ``frame`` (rows of this writer's table) as one record batch."""
        if frame.table != self.table:
            raise ValueError(f"rows of table {frame.table!r} in the {self.table!r} journal")
        self.sink.write(record_batch_message(frame))

    def close(self) -> None:
        self.sink.write(END_OF_STREAM)
