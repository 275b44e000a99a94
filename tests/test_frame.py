"""telemetry.frame (the daemon's Arrow-free rows) held against pyarrow's own conversions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from telemetry.frame import Frame, RoundBatch, check_column, column_array, row_columns
from telemetry.schema import SCHEMAS, screen, validate
from telemetry.tables import EARLIEST_NS, LATEST_NS, TABLES
from tests.support.units import NS

T0 = 1_788_220_800 * NS

INT_RANGES = {"int16": 2**15, "int32": 2**31, "int64": 2**63}


def _value(kind: str) -> st.SearchStrategy[Any]:
    if kind == "time":
        return st.one_of(
            st.integers(T0, T0 + 3600 * NS),
            st.sampled_from([EARLIEST_NS - 1, EARLIEST_NS, LATEST_NS, LATEST_NS + 1]),
        )
    if kind == "string":
        return st.text(max_size=8)
    if kind in INT_RANGES:
        bound = INT_RANGES[kind]
        return st.one_of(st.integers(-bound, bound - 1), st.sampled_from([0, -1, bound - 1]))
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(0, 2, width=32),
        st.sampled_from([0.0, 1.01, 1.0100001, 1e5, 1e15, 2.0**50, -0.0]),
    )


@st.composite
def rows(draw: st.DrawFn, table: str) -> list[dict[str, Any]]:
    n = draw(st.integers(0, 6))
    out = []
    for _ in range(n):
        row = {}
        for column in TABLES[table]:
            value = draw(_value(column.kind))
            if column.nullable and draw(st.booleans()):
                value = None
            row[column.name] = value
        out.append(row)
    return out


def _arrow(table: str, data: list[dict[str, Any]]) -> pa.Table:
    """What pyarrow makes of the same rows (time given as int64 nanoseconds)."""
    schema = SCHEMAS[table]
    plain = pa.schema([pa.field("time", pa.int64()) if f.name == "time" else f for f in schema])
    return pa.Table.from_pylist(data, schema=plain).cast(schema)


TABLE_NAMES = st.sampled_from(sorted(TABLES))


def _same(a: pa.Table, b: pa.Table) -> bool:
    """Equal schemas and values, NaN equal to NaN (``Table.equals`` holds NaN unequal)."""

    def values(t: pa.Table) -> list[list[Any]]:
        columns = [c.cast(pa.int64()) if pa.types.is_timestamp(c.type) else c for c in t.columns]
        return [[("nan",) if v != v else v for v in c.to_pylist()] for c in columns]  # noqa: PLR0124

    return a.schema == b.schema and values(a) == values(b)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_rows_become_what_pyarrow_makes_of_them(data: st.DataObject) -> None:
    table = data.draw(TABLE_NAMES)
    drawn = data.draw(rows(table))
    frame = Frame.from_rows(table, drawn)
    expected = _arrow(table, drawn)
    assert _same(frame.to_arrow(), expected)
    back = Frame.from_arrow(validate(expected, table, dictionaries=True), table)
    assert back.equals(frame)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_rows_lacking_columns_hold_nulls_there(data: st.DataObject) -> None:
    """Rows need not all have the same columns (a MIG instance's row has fewer than its GPU's):
    what a row lacks is null, as pyarrow makes it."""
    table = data.draw(TABLE_NAMES)
    drawn = data.draw(rows(table))
    nullable = [c.name for c in TABLES[table] if c.nullable]
    for row in drawn:
        for name in nullable:
            if data.draw(st.booleans()):
                row.pop(name)
    frame = Frame.from_rows(table, drawn)
    assert _same(frame.to_arrow(), _arrow(table, drawn))
    batch = RoundBatch.from_columns(table, row_columns(drawn), len(drawn))
    assert _same(batch.to_arrow(), _arrow(table, drawn))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_rows_checked_before_become_the_same_frame_unchecked(data: st.DataObject) -> None:
    """The Runner's batches skip the type checks its collectors' rows passed already: their
    Frames' arrays, dtypes and null masks are those of the checking path."""
    table = data.draw(TABLE_NAMES)
    drawn = data.draw(rows(table))
    checked = RoundBatch.from_columns(table, row_columns(drawn), len(drawn)).frame()
    frame = Frame.from_rows(table, drawn)
    assert checked.equals(frame)
    for name, array in frame.columns.items():
        assert checked.columns[name].dtype == array.dtype, name
    assert checked.valid.keys() == frame.valid.keys()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_rounds_rows_leave_out_the_incomplete_and_take_time_and_node_given(
    data: st.DataObject,
) -> None:
    """How the Runner builds a round's batch: time and node given once, and a row missing a
    required column left out (not the whole table refused) — the same Frame as the rows that
    are complete, built with time and node in each."""
    table = data.draw(TABLE_NAMES)
    drawn = data.draw(rows(table))
    required = [c.name for c in TABLES[table] if not c.nullable and c.name not in ("time", "node")]
    for row in drawn:
        del row["time"], row["node"]
        if required and data.draw(st.booleans()):
            row[data.draw(st.sampled_from(required))] = None
    constants = {"time": T0, "node": "n1"}
    batch = RoundBatch.from_columns(table, row_columns(drawn), len(drawn), constants)
    built = batch.frame()
    complete = [
        {"time": T0, "node": "n1", **row}
        for row in drawn
        if all(row.get(name) is not None for name in required)
    ]
    assert built.equals(Frame.from_rows(table, complete))
    assert batch.num_rows == len(complete)
    assert batch.nulls == {name for name, values in batch.values.items() if None in values}
    if len(complete) < len(drawn):  # by default such rows refuse the whole Frame
        with pytest.raises(ValueError, match="null in a required column"):
            Frame.from_rows(table, [{"time": T0, "node": "n1", **row} for row in drawn])


@pytest.mark.parametrize(
    ("kind", "value", "error"),
    [
        ("float64", 2**1030, OverflowError),  # past float's range: NumPy raises, Arrow too
        ("float32", 2**1030, OverflowError),
        ("int16", 2**15, OverflowError),
        ("int64", 2**63, OverflowError),
        ("int64", 1.5, TypeError),
        ("int32", True, TypeError),
        ("string", "\ud800", UnicodeEncodeError),
        ("float64", "1.5", TypeError),
    ],
)
def test_a_value_the_column_cannot_hold_is_refused_before_any_array_is_built(
    kind: str, value: Any, error: type[Exception]
) -> None:
    """The Runner checks a collector's rows (``check_column``) inside its error boundary and
    builds the round's arrays later without checking again: the check alone must refuse."""
    with pytest.raises(error):
        check_column(kind, [None, value])
    with pytest.raises(error):
        column_array(kind, [value])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_screening_keeps_what_the_arrow_screen_keeps(data: st.DataObject) -> None:
    table = data.draw(TABLE_NAMES)
    drawn = data.draw(rows(table))
    kept, dropped = Frame.from_rows(table, drawn).screened()
    arrow_kept = screen(_arrow(table, drawn), table)[0]
    assert _same(kept.to_arrow(), arrow_kept)
    assert dropped == len(drawn) - arrow_kept.num_rows


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=4), st.one_of(st.none(), st.text(max_size=3))),
                max_size=12))  # fmt: skip
@example([("b", "x"), ("a", "y"), ("a", "x"), ("\u00e9", "z"), ("a", "x")])  # no null: no mask
def test_rows_sort_as_arrow_sorts_them(keys: list[tuple[str, str | None]]) -> None:
    drawn = [
        {"time": T0, "node": node, "gpu_uuid": "u", "gpu_index": i, "gpu_model": "m",
         "memory_used_bytes": 0, "memory_total_bytes": 1, "job_id": job}
        for i, (node, job) in enumerate(keys)
    ]  # fmt: skip
    frame = Frame.from_rows("gpu", drawn)
    order = [("node", "ascending"), ("job_id", "ascending"), ("gpu_index", "ascending")]
    expected = pc.sort_indices(frame.to_arrow(), sort_keys=order).to_pylist()
    assert frame.sort_indices(["node", "job_id", "gpu_index"]).tolist() == expected


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("gpu_index", 2**15),  # int16 overflow
        ("memory_used_bytes", 2**63),
        ("memory_used_bytes", "12"),  # a string for a number
        ("power_watts", "300"),
        ("gpu_model", 7),
        ("gpu_model", "bad \udc80 surrogate"),
        ("gpu_uuid", None),  # null in a required column
    ],
)
def test_values_pyarrow_refuses_are_refused_naming_the_column(column: str, value: Any) -> None:
    row = {"time": T0, "node": "n", "gpu_uuid": "u", "gpu_index": 0, "gpu_model": "m",
           "memory_used_bytes": 0, "memory_total_bytes": 1, column: value}  # fmt: skip
    with pytest.raises((pa.ArrowException, OverflowError, TypeError, ValueError)):
        _arrow("gpu", [row]).validate(full=True)
        validate(_arrow("gpu", [row]), "gpu")
    with pytest.raises(ValueError, match=f"gpu.{column}"):
        Frame.from_rows("gpu", [row])


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_concatenated_frames_are_what_arrow_concatenates(data: st.DataObject) -> None:
    """Frames of one table one after another, some with nulls in a column and some without
    (a round's gpu rows, then one whose MIG instances leave columns null)."""
    table = data.draw(TABLE_NAMES)
    frames = [
        Frame.from_rows(table, data.draw(rows(table))) for _ in range(data.draw(st.integers(1, 4)))
    ]
    both = Frame.concat(frames)
    expected = pa.concat_tables([f.to_arrow() for f in frames])
    assert _same(both.to_arrow(), expected)


def test_concat_take_and_nulls_keep_each_row() -> None:
    a = Frame.from_rows("job", [{"time": T0, "node": "n", "job_id": "1", "user": "u",
                                 "account": "a", "cpus_allocated": 1.0, "gpus_allocated": 0.0,
                                 "cpu_seconds": 1.0, "memory_bytes": 1}])  # fmt: skip
    b = Frame.from_rows("job", [{"time": T0 + NS, "node": "n", "job_id": "2", "user": "v",
                                 "account": "b", "cpus_allocated": 2.0, "gpus_allocated": 1.0,
                                 "cpu_seconds": 2.0, "memory_bytes": 2,
                                 "account_source": "job-info"}])  # fmt: skip
    both = Frame.concat([a, b])
    assert both.values("account_source") == [None, "job-info"]
    assert both.take(np.array([1, 0])).values("job_id") == ["2", "1"]
    assert both.to_arrow().equals(pa.concat_tables([a.to_arrow(), b.to_arrow()]))


def test_a_fraction_in_an_integer_column_is_refused_where_arrow_would_truncate_it() -> None:
    row = {"time": T0, "node": "n", "gpu_uuid": "u", "gpu_index": 0, "gpu_model": "m",
           "memory_used_bytes": 1.5, "memory_total_bytes": 1}  # fmt: skip
    assert _arrow("gpu", [row]).column("memory_used_bytes").to_pylist() == [1]
    with pytest.raises(ValueError, match=r"gpu\.memory_used_bytes: expected an integer"):
        Frame.from_rows("gpu", [row])


def test_row_columns_transposes_rows_whatever_their_keys() -> None:
    same = [{"a": 1, "b": "x"}, {"a": 2, "b": None}]
    assert {k: list(v) for k, v in row_columns(same).items()} == {"a": [1, 2], "b": ["x", None]}
    # keys in another order, or missing: each value under its own key, None where absent
    mixed = [{"a": 1, "b": "x"}, {"b": "y", "a": 2}, {"c": 3.5}]
    assert {k: list(v) for k, v in row_columns(mixed).items()} == {
        "a": [1, 2, None],
        "b": ["x", "y", None],
        "c": [None, None, 3.5],
    }
    assert row_columns([]) == {}
    frame = Frame.from_rows(
        "gpu_job",
        [
            {"time": 5, "node": "n", "gpu_uuid": "g", "job_id": "1", "share": 0.5},
            {"share": 0.25, "job_id": "2", "gpu_uuid": "g", "node": "m", "time": 6},
        ],
    )
    assert frame.values("share") == [0.5, 0.25] and frame.values("node") == ["n", "m"]
