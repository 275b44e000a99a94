"""Rows of one sample table as NumPy columns: what the node daemon collects, journals and
aggregates without loading Arrow.

A round of a node is a few dozen rows; Arrow's per-call cost and its 45 MiB of libraries buy
nothing there. A :class:`Frame` holds every column of its table (``telemetry.tables``): numbers
in arrays of the column's own width (so a float32 reading is rounded once, as the journal and
every bill see it), strings in object arrays, and a validity mask where a nullable column holds
nulls. :meth:`Frame.to_arrow` and :meth:`Frame.from_arrow` cross to Arrow where a reader needs it.
A :class:`RoundBatch` is one round's rows still as Python values: the daemon journals it every
round and makes one Frame of many rounds when it aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

from telemetry.tables import EARLIEST_NS, LATEST_NS, SERIES_KEYS, TABLES, VALID_RANGES

if TYPE_CHECKING:
    import pyarrow as pa

DTYPES: dict[str, Any] = {
    "time": np.int64,
    "string": object,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "float32": np.float32,
    "float64": np.float64,
}
_INT_BOUNDS = {
    "time": (-(2**63), 2**63 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}


_INTEGERS = frozenset({int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32})
_NUMBERS = _INTEGERS | {float, np.float32, np.float64}
_STRINGS: frozenset[type] = frozenset({str})
_NONE = type(None)


def _expected(kind: str) -> str:
    if kind == "string":
        return "a string"
    return "an integer" if kind in _INT_BOUNDS else "a number"


def check_column(kind: str, values: Sequence[Any]) -> None:
    """Raise as :func:`column_array` does for ``values``, without building the arrays."""
    types = set(map(type, values))
    nulls = _NONE in types
    if nulls:
        types.discard(_NONE)
    allowed = _STRINGS if kind == "string" else _INTEGERS if kind in _INT_BOUNDS else _NUMBERS
    if not types <= allowed:
        got = sorted(t.__name__ for t in types - allowed)[0]
        raise TypeError(f"expected {_expected(kind)}, got {got}")
    if kind == "string":
        joined = "".join([v for v in values if v is not None] if nulls else values)
        if not joined.isascii():
            joined.encode("utf-8")  # no lone surrogate
    elif kind in _INT_BOUNDS:
        present = [v for v in values if v is not None] if nulls else values
        low, high = _INT_BOUNDS[kind]
        if present and not (low <= min(present) and max(present) <= high):
            raise OverflowError(f"{max(present, key=abs)} does not fit {kind}")
    elif int in types:
        for v in values:
            if type(v) is int:
                float(v)  # an integer past float's range raises OverflowError, as NumPy does


def row_columns(rows: Sequence[dict[str, Any]]) -> dict[str, Sequence[Any]]:
    """Each key of ``rows`` (in the order keys first appear) with its values down the rows,
    ``None`` where a row lacks it. Rows that all hold the same keys in the same order, as a
    collector's do, are transposed in one pass instead of a lookup a value."""
    if not rows:
        return {}
    names = tuple(rows[0])
    if all(tuple(row) == names for row in rows):
        return dict(
            zip(names, zip(*[tuple(row.values()) for row in rows], strict=True), strict=True)
        )
    everything = dict.fromkeys(name for row in rows for name in row)
    return {name: [row.get(name) for row in rows] for name in everything}


def column_array(kind: str, values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """``values`` (Python, None for null) as a column of ``kind``: the array and its validity
    mask (None when nothing is null). Raises ``TypeError`` for a value of the wrong type (a
    string for a number; a float or a bool for an integer: Arrow's ``from_pylist`` truncates
    1.5 to 1), ``OverflowError`` for an integer the column cannot hold, ``ValueError`` for a
    string that is not valid Unicode."""
    check_column(kind, values)
    return _checked_array(kind, values)


def _checked_array(
    kind: str, values: Sequence[Any], nulls: bool | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`column_array` of values it has accepted before: nulls found (``nulls``: whether
    there are any, where that is known), nothing checked."""
    valid: np.ndarray | None = None
    if (None in values) if nulls is None else nulls:
        valid = np.array([v is not None for v in values], dtype=bool)
        if kind != "string":
            values = [0 if v is None else v for v in values]
    if kind == "string":
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array, valid
    if kind != "float32":
        return np.array(values, dtype=DTYPES[kind]), valid
    with np.errstate(over="ignore"):  # a float beyond float32 becomes inf, as in Arrow
        return np.array(values, dtype=np.float32), valid


class Frame:
    """Rows of sample table ``table``; every declared column, in declared order."""

    __slots__ = ("columns", "num_rows", "table", "valid")

    def __init__(
        self,
        table: str,
        columns: dict[str, np.ndarray],
        valid: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.table = table
        self.columns = columns
        self.valid = valid or {}
        self.num_rows = len(next(iter(columns.values()))) if columns else 0

    @classmethod
    def empty(cls, table: str) -> Frame:
        return cls(table, {c.name: np.zeros(0, DTYPES[c.kind]) for c in TABLES[table]})

    @classmethod
    def from_rows(cls, table: str, rows: Sequence[dict[str, Any]]) -> Frame:
        """One frame from row dicts (a missing column is null). Raises ``ValueError`` naming the
        column for a value its type cannot hold, or a null in a required column."""
        arrays: dict[str, np.ndarray] = {}
        valid: dict[str, np.ndarray] = {}
        given = row_columns(rows)
        absent = [None] * len(rows)
        for column in TABLES[table]:
            name = column.name
            try:
                array, mask = column_array(column.kind, given.get(name, absent))
            except (TypeError, ValueError, OverflowError) as exc:
                raise ValueError(f"{table}.{name}: {exc}") from None
            if mask is not None:
                if not column.nullable:
                    raise ValueError(f"{table}.{name}: null in a required column")
                valid[name] = mask
            arrays[name] = array
        return cls(table, arrays, valid)

    def has(self, name: str) -> bool:
        return name in self.columns

    def times(self) -> np.ndarray:
        """Sample times, int64 ns."""
        return self.columns["time"]

    def floats(self, name: str) -> np.ndarray:
        """A numeric column as float64, null → NaN."""
        values = self.columns[name].astype(np.float64)
        mask = self.valid.get(name)
        if mask is not None:
            values[~mask] = np.nan
        return values

    def is_valid(self, name: str) -> np.ndarray:
        mask = self.valid.get(name)
        return np.ones(self.num_rows, dtype=bool) if mask is None else mask

    def values(self, name: str) -> list[Any]:
        """A column as Python values, None for null."""
        values: list[Any] = self.columns[name].tolist()
        mask = self.valid.get(name)
        if mask is not None:
            values = [v if ok else None for v, ok in zip(values, mask.tolist(), strict=True)]
        return values

    def strings(self, name: str) -> list[str]:
        """A column as label strings: numbers in decimal, null → empty."""
        return ["" if v is None else str(v) for v in self.values(name)]

    def series_codes(self) -> tuple[np.ndarray, list[tuple[str, ...]]]:
        """An integer code per row for its series key, and the key of each code."""
        keys = list(zip(*(self.columns[k].tolist() for k in SERIES_KEYS[self.table]), strict=True))
        first = dict.fromkeys(keys)  # each key once, in the order it first appears
        ids = {key: code for code, key in enumerate(first)}
        codes = np.fromiter(map(ids.__getitem__, keys), dtype=np.int64, count=self.num_rows)
        return codes, list(first)

    def take(self, rows: np.ndarray) -> Frame:
        """The rows at positions ``rows`` (int array), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return Frame(
            self.table,
            {n: c[rows] for n, c in self.columns.items()},
            {n: m[rows] for n, m in self.valid.items()},
        )

    def filter(self, keep: np.ndarray) -> Frame:
        return self.take(np.nonzero(keep)[0])

    @staticmethod
    def concat(frames: Sequence[Frame]) -> Frame:
        """The rows of ``frames`` (one table) one after another."""
        if len(frames) == 1:
            return frames[0]
        first = frames[0]
        columns = {n: np.concatenate([f.columns[n] for f in frames]) for n in first.columns}
        valid: dict[str, np.ndarray] = {}
        for name in {n for f in frames for n in f.valid}:
            masks = [f.valid.get(name) for f in frames]
            present = [m for m in masks if m is not None]
            if len(present) == len(masks):
                valid[name] = np.concatenate(present)
                continue
            # Frames without a mask hold no null there: only the others' slices are copied.
            mask = np.ones(sum(f.num_rows for f in frames), dtype=bool)
            start = 0
            for frame, part in zip(frames, masks, strict=True):
                if part is not None:
                    mask[start : start + frame.num_rows] = part
                start += frame.num_rows
            valid[name] = mask
        return Frame(first.table, columns, valid)

    def equals(self, other: Frame) -> bool:
        """Same table, rows and values (NaN equal to NaN, nulls equal to nulls)."""
        if self.table != other.table or self.num_rows != other.num_rows:
            return False
        for name in self.columns:
            if not np.array_equal(self.is_valid(name), other.is_valid(name)):
                return False
            mine, theirs = self.values(name), other.values(name)
            for a, b in zip(mine, theirs, strict=True):
                if a != b and not (_is_nan(a) and _is_nan(b)):
                    return False
        return True

    def sort_indices(self, keys: Iterable[str]) -> np.ndarray:
        """Row positions ordered by ``keys`` ascending (strings by code point, as Arrow sorts
        UTF-8; nulls last)."""

        names = list(keys)
        if not any(name in self.valid for name in names):  # no nulls: the values themselves
            rows = list(zip(*[self.columns[name].tolist() for name in names], strict=True))
            return np.array(sorted(range(self.num_rows), key=rows.__getitem__), dtype=np.int64)

        def key(name: str) -> list[tuple[bool, Any]]:
            return [(v is None, 0 if v is None else v) for v in self.values(name)]

        columns = [key(name) for name in names]
        order = sorted(range(self.num_rows), key=lambda i: tuple(c[i] for c in columns))
        return np.array(order, dtype=np.int64)

    def screened(self) -> tuple[Frame, int]:
        """The rows whose values all lie in ``VALID_RANGES`` and whose time lies in
        [``EARLIEST_NS``, ``LATEST_NS``] (null passes where a column may be null; NaN and ±inf
        do not), as ``schema.screen`` keeps them from Arrow tables; and how many rows were
        left out."""
        times = self.columns["time"]
        keep = (times >= EARLIEST_NS) & (times <= LATEST_NS)
        kinds = {c.name: c.kind for c in TABLES[self.table]}
        for name, (low, high) in VALID_RANGES[self.table].items():
            values = self.columns[name]
            if kinds[name].startswith("int"):
                inside = (values >= int(low)) & (values <= min(int(high), 2**62))
            else:
                wide = values.astype(np.float64)  # compared as Arrow does, not in float32
                inside = (wide >= low) & (wide <= high)
            mask = self.valid.get(name)
            keep &= inside if mask is None else (inside | ~mask)
        if keep.all():
            return self, 0
        return self.filter(keep), int(self.num_rows - np.count_nonzero(keep))

    def to_arrow(self) -> pa.Table:
        """The same rows as an Arrow table of the table's schema (imports pyarrow)."""
        import pyarrow as pa

        from telemetry.schema import SCHEMAS

        schema = SCHEMAS[self.table]
        arrays = []
        for field in schema:
            values = self.columns[field.name]
            mask = self.valid.get(field.name)
            if field.name == "time":
                arrays.append(pa.array(values, pa.int64()).cast(field.type))
            else:
                arrays.append(pa.array(values, field.type, mask=None if mask is None else ~mask))
        return pa.Table.from_arrays(arrays, schema=schema)

    @classmethod
    def from_arrow(cls, table: pa.Table, name: str) -> Frame:
        """Rows of a table already validated as ``name`` (``schema.validate``); extra columns are
        left out."""
        import pyarrow as pa
        import pyarrow.compute as pc

        columns: dict[str, np.ndarray] = {}
        valid: dict[str, np.ndarray] = {}
        for column in TABLES[name]:
            values = table.column(column.name)
            if column.kind == "time":
                values = values.cast(pa.int64())
            elif pa.types.is_dictionary(values.type):
                values = values.cast(values.type.value_type)
            if values.null_count:
                valid[column.name] = pc.is_valid(values).to_numpy(zero_copy_only=False)
                if column.kind != "string":
                    values = pc.fill_null(values, pa.scalar(0, values.type))
            array = values.to_numpy(zero_copy_only=False)
            columns[column.name] = np.asarray(array, dtype=DTYPES[column.kind])
        return cls(name, columns, valid)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


class RoundBatch:
    """One round's rows of sample table ``table`` as Python values by column, each value
    checked already (:func:`check_column`): what the daemon journals every round without NumPy,
    and turns into one :class:`Frame` for many rounds (:meth:`frame_of`) when it aggregates.

    ``values`` holds every declared column in declared order (None for a null); ``nulls`` names
    the columns that hold a null. No required column holds one (:meth:`from_columns` leaves such
    rows out).
    """

    __slots__ = ("_frame", "nulls", "num_rows", "table", "values")

    def __init__(
        self, table: str, values: dict[str, Sequence[Any]], num_rows: int, nulls: frozenset[str]
    ) -> None:
        self.table = table
        self.values = values
        self.num_rows = num_rows
        self.nulls = nulls
        self._frame: Frame | None = None

    @classmethod
    def from_columns(
        cls,
        table: str,
        columns: dict[str, Sequence[Any]],
        num_rows: int,
        constants: dict[str, Any] | None = None,
    ) -> RoundBatch:
        """The rows whose ``columns`` (checked values down the rows; a column not given is
        null) hold a value in every required column of ``table``, each of the ``constants``
        (a round's time and node) in every row."""
        values: dict[str, Sequence[Any]] = {}
        nulls: set[str] = set()
        incomplete: list[str] = []  # required columns holding a null
        absent = (None,) * num_rows
        for column in TABLES[table]:
            name = column.name
            if constants is not None and name in constants:
                values[name] = (constants[name],) * num_rows
                continue
            got = columns.get(name, absent)
            values[name] = got
            if None in got:
                (nulls.add if column.nullable else incomplete.append)(name)
        if incomplete:
            keep = [i for i in range(num_rows) if all(values[n][i] is not None for n in incomplete)]
            values = {n: [v[i] for i in keep] for n, v in values.items()}
            nulls = {n for n in nulls if None in values[n]}
            num_rows = len(keep)
        return cls(table, values, num_rows, frozenset(nulls))

    def times(self) -> Sequence[int]:
        """Sample times, int64 ns."""
        return self.values["time"]

    def frame(self) -> Frame:
        """The same rows as a :class:`Frame` (made once)."""
        if self._frame is None:
            self._frame = RoundBatch.frame_of([self])
        return self._frame

    def to_arrow(self) -> pa.Table:
        """The same rows as an Arrow table of the table's schema (imports pyarrow)."""
        return self.frame().to_arrow()

    @staticmethod
    def frame_of(batches: Sequence[RoundBatch]) -> Frame:
        """The rows of ``batches`` (one table) one after another, as one Frame: one NumPy
        array a column for all of them."""
        first = batches[0]
        arrays: dict[str, np.ndarray] = {}
        valid: dict[str, np.ndarray] = {}
        with_nulls = first.nulls.union(*[batch.nulls for batch in batches[1:]])
        for column in TABLES[first.table]:
            name = column.name
            if len(batches) == 1:
                values = first.values[name]
            else:
                values = list(chain.from_iterable([batch.values[name] for batch in batches]))
            array, mask = _checked_array(column.kind, values, name in with_nulls)
            arrays[name] = array
            if mask is not None:
                valid[name] = mask
        return Frame(first.table, arrays, valid)
