"""Arrow schemas of the four sample tables (SPEC §2, declared in :mod:`telemetry.tables`) and
the one validator for them.

Every table tally writes or reads is checked against these schemas: columns must be present with
the right type, extra columns may follow when they are nullable. Types that convert without loss
(large strings, coarser timestamps, a time zone other than UTC) are cast; anything else is a
``SchemaError`` that names the table and the column.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pyarrow as pa

from telemetry.errors import SchemaError
from telemetry.tables import (
    CPU_BUSY_MODES,
    CPU_MODES,
    EARLIEST_NS,
    LATEST_NS,
    OPTIONAL_COLUMNS,
    RATIO_TOLERANCE,
    SERIES_KEYS,
    TABLES,
    VALID_RANGES,
)

# The declarations are re-exported: readers import the tables' rules from here with the schemas.
__all__ = [
    "ARROW_TYPES",
    "CPU_BUSY_MODES",
    "CPU_MODES",
    "CPU_SCHEMA",
    "DICTIONARY_STRING",
    "EARLIEST_NS",
    "GPU_JOB_SCHEMA",
    "GPU_SCHEMA",
    "JOB_SCHEMA",
    "LATEST_NS",
    "OPTIONAL_COLUMNS",
    "RATIO_TOLERANCE",
    "SCHEMAS",
    "SERIES_KEYS",
    "TIME",
    "VALID_RANGES",
    "SchemaError",
    "empty",
    "screen",
    "validate",
]

TIME = pa.timestamp("ns", tz="UTC")
# The Arrow type of each column kind of telemetry.tables.
ARROW_TYPES: dict[str, pa.DataType] = {
    "time": TIME,
    "string": pa.string(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}


def _schema(name: str) -> pa.Schema:
    return pa.schema(
        [pa.field(c.name, ARROW_TYPES[c.kind], nullable=c.nullable) for c in TABLES[name]]
    )


GPU_SCHEMA = _schema("gpu")
CPU_SCHEMA = _schema("cpu")
JOB_SCHEMA = _schema("job")
GPU_JOB_SCHEMA = _schema("gpu_job")
SCHEMAS: dict[str, pa.Schema] = {
    "gpu": GPU_SCHEMA,
    "cpu": CPU_SCHEMA,
    "job": JOB_SCHEMA,
    "gpu_job": GPU_JOB_SCHEMA,
}


def _castable(actual: pa.DataType, expected: pa.DataType) -> bool:
    """True when ``actual`` converts to ``expected`` without changing any value's meaning."""
    if actual == expected:
        return True
    if pa.types.is_timestamp(expected):
        # A naive timestamp has no instant; any tz-aware one names the same instant in UTC.
        return bool(pa.types.is_timestamp(actual) and actual.tz is not None)
    if pa.types.is_string(expected):
        if pa.types.is_dictionary(actual):  # as Parquet files written from Arrow may hold them
            actual = actual.value_type
            if pa.types.is_string(actual):
                return True
        return bool(pa.types.is_large_string(actual) or pa.types.is_string_view(actual))
    if pa.types.is_integer(expected) and pa.types.is_integer(actual):
        return True  # range is checked by the safe cast itself
    if pa.types.is_floating(expected):
        return bool(pa.types.is_floating(actual) or pa.types.is_integer(actual))
    return False


DICTIONARY_STRING = pa.dictionary(pa.int32(), pa.string())


def _check_utf8(values: pa.Array | pa.ChunkedArray, name: str, field: pa.Field) -> None:
    try:
        values.validate(full=True)
    except pa.ArrowInvalid:
        raise SchemaError(f"{name}: column {field.name!r} holds invalid UTF-8") from None


def _kept_encoded(column: pa.ChunkedArray) -> bool:
    """A dictionary of strings with no null inside its dictionaries: its codes can be kept."""
    return (
        pa.types.is_dictionary(column.type)
        and pa.types.is_string(column.type.value_type)
        and all(chunk.dictionary.null_count == 0 for chunk in column.chunks)
    )


def _conformed(
    column: pa.ChunkedArray, name: str, field: pa.Field, dictionaries: bool
) -> pa.ChunkedArray:
    """One present column checked and converted to ``field``'s type (or, with ``dictionaries``,
    a string column to ``DICTIONARY_STRING``); raises ``SchemaError``."""
    strings = pa.types.is_string(field.type)
    if dictionaries and strings and _kept_encoded(column):
        for chunk in column.chunks:  # only the distinct values need checking
            _check_utf8(chunk.dictionary, name, field)
        if column.type != DICTIONARY_STRING:
            column = column.cast(DICTIONARY_STRING)
    else:
        if not _castable(column.type, field.type):
            raise SchemaError(
                f"{name}: column {field.name!r} has type {column.type}, expected {field.type}"
            )
        if column.type != field.type:
            import pyarrow.compute as pc  # not on the compactor's path: 0.1 s to import

            try:
                column = pc.cast(column, field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(
                    f"{name}: column {field.name!r} does not fit {field.type}: {exc}"
                ) from None
        if strings:
            _check_utf8(column, name, field)
    if not field.nullable and column.null_count:
        raise SchemaError(f"{name}: column {field.name!r} has {column.null_count} null values")
    return column


def validate(
    table: pa.Table, name: str, columns: Sequence[str] | None = None, dictionaries: bool = False
) -> pa.Table:
    """Check ``table`` against the schema of table ``name`` and return it conformed.

    The result has the schema's columns first, in order and with the exact types, followed by any
    extra nullable columns; with ``columns``, only those schema columns are checked and returned
    (in that order). With ``dictionaries`` every string column comes back as
    ``dictionary<int32, string>`` (``DICTIONARY_STRING``; dictionary-encoded input, as Parquet
    stores it, is kept encoded). Raises ``SchemaError`` naming the first wrong column: missing,
    of a type that does not convert, holding values that do not fit, or holding nulls where none
    are allowed.
    """
    try:
        schema = SCHEMAS[name]
    except KeyError:
        raise SchemaError(f"unknown table {name!r}; expected one of {', '.join(SCHEMAS)}") from None
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
        table = table.select([c for c in columns if c in table.column_names])
    names = table.column_names
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SchemaError(f"{name}: column {dup!r} appears more than once")
    conformed: list[pa.ChunkedArray] = []
    for field in schema:
        if field.name in names:
            column = _conformed(table.column(field.name), name, field, dictionaries)
        elif field.name in OPTIONAL_COLUMNS[name]:
            column = pa.chunked_array([pa.nulls(table.num_rows, field.type)])
        else:
            raise SchemaError(f"{name}: missing column {field.name!r} ({field.type})", missing=True)
        if dictionaries and pa.types.is_string(field.type) and column.type != DICTIONARY_STRING:
            column = column.dictionary_encode()  # a chunked column stays chunked
        conformed.append(column)
    fields = [pa.field(f.name, c.type, f.nullable) for f, c in zip(schema, conformed, strict=False)]
    for extra in names:
        if extra not in schema.names:
            column = table.column(extra)
            fields.append(pa.field(extra, column.type))
            conformed.append(column)
    return pa.Table.from_arrays(conformed, schema=pa.schema(fields))


def empty(name: str) -> pa.Table:
    """An empty table of table ``name``'s schema."""
    return SCHEMAS[name].empty_table()


# Compute arguments as Arrow scalars, built once: a Python number or bool passed to a compute
# function makes pyarrow try to import dateutil on every call (costlier than the comparison).
_TIME_BOUNDS = (pa.scalar(EARLIEST_NS, pa.int64()), pa.scalar(LATEST_NS, pa.int64()))
_TRUE, _FALSE = pa.scalar(True), pa.scalar(False)


@functools.cache
def _bounds(low: float, high: float, kind: pa.DataType) -> tuple[pa.Scalar, pa.Scalar]:
    """``VALID_RANGES`` bounds as scalars to compare a column of type ``kind`` with."""
    if pa.types.is_floating(kind):
        return pa.scalar(low, pa.float64()), pa.scalar(high, pa.float64())
    return pa.scalar(int(low), kind), pa.scalar(min(int(high), 2**62), pa.int64())


def screen(table: pa.Table, name: str) -> tuple[pa.Table, dict[str, int]]:
    """``table`` without the rows that hold a value outside ``VALID_RANGES`` or a time outside
    [``EARLIEST_NS``, ``LATEST_NS``]; and how many rows each column ruled out, as
    ``{"gpu.power_watts": n}`` (a row ruled out by two columns counts under both). Null passes
    where a column may be null.
    """
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table, {}
    checks: list[tuple[str, pa.ChunkedArray | pa.Array]] = []
    if "time" in table.column_names:
        ns = table.column("time").cast(pa.int64())
        low, high = _TIME_BOUNDS
        inside = pc.and_(pc.greater_equal(ns, low), pc.less_equal(ns, high))
        checks.append(("time", pc.fill_null(inside, _FALSE)))
    for column, (low_value, high_value) in VALID_RANGES[name].items():
        if column not in table.column_names:
            continue
        values = table.column(column)
        # NaN compares false both ways and ±inf lies outside: both are ruled out
        low, high = _bounds(low_value, high_value, values.type)
        inside = pc.and_(pc.greater_equal(values, low), pc.less_equal(values, high))
        checks.append((column, pc.fill_null(inside, _TRUE)))
    keep = checks[0][1] if checks else None
    for _, ok in checks[1:]:
        keep = pc.and_(keep, ok)
    if keep is None or pc.all(keep).as_py() is not False:
        return table, {}
    counts = {}
    for column, ok in checks:
        bad = len(ok) - pc.sum(ok.cast(pa.int64())).as_py()
        if bad:
            counts[f"{name}.{column}"] = bad
    return table.filter(keep), counts
