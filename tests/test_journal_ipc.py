"""The hand-written IPC stream (telemetry.store.ipc) against pyarrow's reader and read_journal:
random frames of every table come back equal to ``Frame.to_arrow()``, bit for bit."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from telemetry.frame import DTYPES, Frame, RoundBatch
from telemetry.schema import SCHEMAS
from telemetry.store import ipc
from telemetry.store.layout import read_journal
from telemetry.tables import TABLES, Column

_STRINGS = ["", "n1", "gpu-0", "é", "日本語", "Ω≈ç", "🎉 emoji", "a" * 300, "tab\tnew\nline"]
_INT_EXTREMES = {
    "time": (-(2**63), 2**63 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}
_FLOAT_SPECIALS = [np.inf, -np.inf, np.nan, -0.0, 0.0, 1e-45, 3.4e38, 1e300, 0.1, 2.0 / 3.0]


def _values(rng: np.random.Generator, column: Column, rows: int) -> np.ndarray:
    kind = column.kind
    if kind == "string":
        out = np.empty(rows, dtype=object)
        for i in range(rows):
            pick = int(rng.integers(len(_STRINGS) + 1))
            out[i] = (
                _STRINGS[pick]
                if pick < len(_STRINGS)
                else "".join(chr(int(c)) for c in rng.integers(32, 0x3000, size=5))
            )
        return out
    if kind in _INT_EXTREMES:
        low, high = _INT_EXTREMES[kind]
        values = rng.integers(low, high, size=rows, dtype=np.int64, endpoint=True)
        picks = rng.random(rows) < 0.3
        values[picks] = rng.choice([low, high, 0, -1], size=int(picks.sum()))
        return values.astype(DTYPES[kind])
    floats = rng.normal(0, 1e6, size=rows)  # float64: rounded once when the column is float32
    picks = rng.random(rows) < 0.3
    floats[picks] = rng.choice(_FLOAT_SPECIALS, size=int(picks.sum()))
    with np.errstate(over="ignore"):
        return floats.astype(DTYPES[kind])


def random_frame(rng: np.random.Generator, table: str, rows: int) -> Frame:
    """Rows of ``table`` with nulls in nullable columns (sometimes all, sometimes none, sometimes
    an all-true mask), extreme integers, float specials and non-ASCII strings."""
    columns: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    for column in TABLES[table]:
        values = _values(rng, column, rows)
        if column.nullable and rows:
            mode = int(rng.integers(4))
            mask = [rng.random(rows) < 0.6, np.zeros(rows, bool), np.ones(rows, bool), None][mode]
            if mask is not None:
                valid[column.name] = mask
                if column.kind == "string":
                    values[~mask] = None
                else:
                    values[~mask] = 0
        columns[column.name] = values
    return Frame(table, columns, valid)


def _plain(column: pa.ChunkedArray) -> tuple[list[bool], Any]:
    """A column's validity and its values in a form compared bit for bit (floats as their bits,
    so NaN equals NaN and -0.0 differs from 0.0)."""
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    nulls = column.is_null().to_pylist()
    if pa.types.is_string(column.type):
        return nulls, column.to_pylist()
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.int64())
    filled = pc.fill_null(column, pa.scalar(0, column.type)).to_numpy(zero_copy_only=False)
    if pa.types.is_floating(column.type):
        filled = filled.view(np.int32 if column.type == pa.float32() else np.int64)
    return nulls, filled.tolist()


def assert_same(got: pa.Table, want: pa.Table) -> None:
    assert got.schema.equals(want.schema, check_metadata=True), (got.schema, want.schema)
    assert got.schema.metadata is None
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        got_nulls, got_values = _plain(got.column(name))
        want_nulls, want_values = _plain(want.column(name))
        # Named by the first row that differs, not by pytest's diff of the two lists: on CI
        # pytest does not truncate that diff, and for a few thousand rows it takes minutes.
        pairs = {"nulls": (got_nulls, want_nulls), "values": (got_values, want_values)}
        for what, (mine, theirs) in pairs.items():
            if mine != theirs:
                row = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b)
                raise AssertionError(f"{name}: {what} differ at row {row}")


def _frames(table: str, seed: int) -> list[Frame]:
    rng = np.random.default_rng(seed)
    sizes = [0, 1, 58, 1, 0, *rng.integers(0, 80, size=40).tolist(), 3]
    return [random_frame(rng, table, int(n)) for n in sizes]


def _journal(path: Path, table: str, frames: list[Frame], close: bool = True) -> list[int]:
    """Write ``frames`` to a journal at ``path``; the file size after the schema and each batch."""
    with open(path, "wb") as sink:
        writer = ipc.StreamWriter(sink, table)
        ends = [sink.tell()]
        for frame in frames:
            writer.write_table(frame)
            ends.append(sink.tell())
        if close:
            writer.close()
    return ends


def _expected(table: str, frames: list[Frame]) -> pa.Table:
    return (
        pa.concat_tables([f.to_arrow() for f in frames]) if frames else SCHEMAS[table].empty_table()
    )


@pytest.mark.parametrize("table", list(TABLES))
def test_schema_message_is_the_tables_schema_exactly(table: str) -> None:
    sink = io.BytesIO()
    ipc.StreamWriter(sink, table).close()
    reader = pa.ipc.open_stream(sink.getvalue())
    assert reader.schema.equals(SCHEMAS[table], check_metadata=True)
    assert reader.schema.metadata is None
    assert [f.nullable for f in reader.schema] == [c.nullable for c in TABLES[table]]
    assert reader.read_all().num_rows == 0
    if table == "cpu":
        assert reader.schema.field("time").type == pa.timestamp("ns", tz="UTC")


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("table", list(TABLES))
def test_random_frames_read_back_equal_to_to_arrow(tmp_path: Path, table: str, seed: int) -> None:
    frames = _frames(table, seed)
    path = tmp_path / "part.arrows"
    _journal(path, table, frames)
    want = _expected(table, frames)
    with pa.ipc.open_stream(path.read_bytes()) as reader:
        batches = list(reader)
    assert [b.num_rows for b in batches] == [f.num_rows for f in frames]
    assert_same(pa.Table.from_batches(batches, schema=SCHEMAS[table]), want)
    data, clean = read_journal(path)
    assert clean and data is not None
    assert_same(data, want)


@pytest.mark.parametrize("table", list(TABLES))
def test_a_journal_cut_anywhere_in_its_last_batch_keeps_the_earlier_batches(
    tmp_path: Path, table: str
) -> None:
    rng = np.random.default_rng(7)
    frames = [random_frame(rng, table, n) for n in (3, 0, 5, 4)]
    path = tmp_path / "part.arrows"
    ends = _journal(path, table, frames, close=False)
    earlier = _expected(table, frames[:-1])
    last_start, last_end = ends[-2], ends[-1]
    with open(path, "r+b") as f:
        for cut in range(last_end - 1, last_start, -1):  # every byte inside the last batch
            f.truncate(cut)
            f.flush()
            data, clean = read_journal(path)
            assert data is not None, cut
            assert not clean, f"cut at {cut} read as a clean end"
            assert_same(data, earlier)
        f.truncate(last_start)  # cut between messages: the earlier batches, nothing torn
    data, _ = read_journal(path)
    assert data is not None
    assert_same(data, earlier)


@pytest.mark.parametrize("table", ["gpu", "job"])
def test_a_bit_flipped_anywhere_in_the_last_batch_keeps_the_earlier_batches(
    tmp_path: Path, table: str
) -> None:
    """A disk that flips a bit in the journal's last batch: reading it never raises (whatever the
    bit broke: a length, an offset, a type), and the batches before it read back whole."""
    rng = np.random.default_rng(11)
    frames = [random_frame(rng, table, n) for n in (3, 5, 4)]
    path = tmp_path / "part.arrows"
    ends = _journal(path, table, frames, close=False)
    earlier = _expected(table, frames[:-1])
    whole = path.read_bytes()
    last_start, last_end = ends[-2], ends[-1]
    for at in range(last_start, last_end):
        for bit in (0, 7):
            damaged = bytearray(whole)
            damaged[at] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            data, _ = read_journal(path)  # must not raise
            assert data is not None, (at, bit)
            assert data.num_rows >= earlier.num_rows, (at, bit)
            assert_same(data.slice(0, earlier.num_rows), earlier)
            data.validate(full=True)


def test_the_comparison_sees_one_flipped_validity_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks above can fail: a writer that flips the first bit of each bitmap is caught."""
    real = ipc._column_buffers

    def flipping(*args: Any) -> tuple[int, list[bytes]]:
        nulls, parts = real(*args)
        if parts[0]:
            parts[0] = bytes([parts[0][0] ^ 1]) + parts[0][1:]
        return nulls, parts

    monkeypatch.setattr(ipc, "_column_buffers", flipping)
    frames = _frames("gpu", 1)
    path = tmp_path / "part.arrows"
    _journal(path, "gpu", frames)
    # read as written (read_journal would leave out the batches whose null counts now lie)
    with pa.ipc.open_stream(path.read_bytes()) as reader:
        data = reader.read_all()
    with pytest.raises(AssertionError, match="nulls differ"):
        assert_same(data, _expected("gpu", frames))


def test_a_null_in_a_required_column_is_refused_before_anything_is_written() -> None:
    frame = random_frame(np.random.default_rng(3), "cpu", 4)
    frame.valid["node"] = np.array([True, False, True, True])
    sink = io.BytesIO()
    writer = ipc.StreamWriter(sink, "cpu")
    size = sink.tell()
    with pytest.raises(ValueError, match="'node' is required"):
        writer.write_table(frame)
    assert sink.tell() == size
    with pytest.raises(ValueError, match="'gpu'"):
        writer.write_table(Frame.empty("gpu"))


def test_batches_sharing_one_metadata_template_each_read_back_as_written(tmp_path: Path) -> None:
    """Every batch of a table starts from the same cached metadata, in which only the numbers
    change: batches after one another with other null patterns, string lengths (ASCII, then not),
    all-null columns and zero rows must each keep their own."""
    rows = [
        {"node": "n1", "gpu_uuid": "GPU-a", "gpu_index": 0, "gpu_model": "H100",
         "memory_used_bytes": 1, "memory_total_bytes": 2, "job_id": "17"},
        {"node": "n1", "gpu_uuid": "GPU-b", "gpu_index": 1, "gpu_model": "H100",
         "memory_used_bytes": 3, "memory_total_bytes": 4, "power_watts": 250.5,
         "mig_profile": "1g.10gb", "job_id": None},
    ]  # fmt: skip
    longer = [dict(r, gpu_model="NVIDIA H100 80GB HBM3 ünïcode", job_id="日本語") for r in rows * 3]
    batches = [
        rows,  # power_watts, mig_profile: one null each; job_id: one null
        rows[:1],  # the same columns all null
        longer,  # longer, non-ASCII strings, other nulls
        [],
        [dict(r, power_watts=1.0, mig_profile="2g.20gb", job_id="9") for r in rows],  # no nulls
        rows[1:],
    ]
    frames = []
    for at, batch in enumerate(batches):
        frame = Frame.from_rows("gpu", [dict(r, time=at) for r in batch])
        frames.append(frame)
    path = tmp_path / "part.arrows"
    _journal(path, "gpu", frames)
    with pa.ipc.open_stream(path.read_bytes()) as reader:
        read = list(reader)
    assert [b.num_rows for b in read] == [len(b) for b in batches]
    for got, frame in zip(read, frames, strict=True):
        got.validate(full=True)
        assert_same(pa.Table.from_batches([got], schema=SCHEMAS["gpu"]), frame.to_arrow())
    assert read[1].column("mig_profile").null_count == 1
    assert read[2].column("job_id").to_pylist() == ["日本語"] * 6
    assert read[5].column("power_watts").to_pylist() == [250.5]


def test_an_all_null_string_column_reads_back_null_whatever_its_slots_hold() -> None:
    frame = random_frame(np.random.default_rng(5), "job", 6)
    frame.columns["account_source"] = np.array(["job-info"] * 6, dtype=object)
    frame.valid["account_source"] = np.zeros(6, dtype=bool)
    sink = io.BytesIO()
    writer = ipc.StreamWriter(sink, "job")
    writer.write_table(frame)
    writer.write_table(random_frame(np.random.default_rng(6), "job", 3))
    writer.close()
    batches = list(pa.ipc.open_stream(sink.getvalue()))
    for batch in batches:
        batch.validate(full=True)  # buffers of the sizes the format says
    assert batches[0].column("account_source").to_pylist() == [None] * 6
    assert batches[1].num_rows == 3


class _Trickle(io.BytesIO):
    """An unbuffered file on a filling disk: takes at most ``most`` bytes a write."""

    def __init__(self, most: int) -> None:
        super().__init__()
        self.most = most

    def write(self, data: Any) -> int:
        return super().write(bytes(data[: self.most]))


def test_a_sink_that_takes_part_of_a_message_gets_the_rest() -> None:
    frames = _frames("job", 4)[:6]
    sink = _Trickle(most=13)
    writer = ipc.StreamWriter(sink, "job")
    for frame in frames:
        writer.write_table(frame)
    writer.close()
    assert_same(pa.ipc.open_stream(sink.getvalue()).read_all(), _expected("job", frames))
    stuck = ipc.StreamWriter(_Trickle(most=2**20), "job")
    stuck.sink.most = 0  # type: ignore[attr-defined]
    with pytest.raises(OSError, match="made no progress"):
        stuck.write_table(frames[1])


def test_string_columns_repeating_the_batch_before_read_back_as_written(tmp_path: Path) -> None:
    """A node's rounds repeat their job ids, users and UUIDs, whose buffers the writer keeps
    from the batch before: a value changed, a null where a value was, one row more or fewer,
    and the old values back again must each read back as their own batch."""
    rows = [
        {"node": "n1", "job_id": str(5000 + i), "user": f"user{i}", "account": "p",
         "account_source": "environment", "cpus_allocated": 1.0, "gpus_allocated": 0.0,
         "cpu_seconds": 1.0 * i, "memory_bytes": i}
        for i in range(4)
    ]  # fmt: skip
    changed = [dict(r, user="ü" if i == 2 else r["user"]) for i, r in enumerate(rows)]
    unknown = [dict(r, account_source=None if i == 1 else r["account_source"]) for i, r in
               enumerate(rows)]  # fmt: skip
    batches = [rows, rows, changed, rows, unknown, unknown, rows[:3], rows, rows]
    frames = [
        Frame.from_rows("job", [dict(r, time=at, cpu_seconds=float(at)) for r in batch])
        for at, batch in enumerate(batches)
    ]
    path = tmp_path / "part.arrows"
    _journal(path, "job", frames)
    with pa.ipc.open_stream(path.read_bytes()) as reader:
        read = list(reader)
    for got, frame in zip(read, frames, strict=True):
        got.validate(full=True)
        assert_same(pa.Table.from_batches([got], schema=SCHEMAS["job"]), frame.to_arrow())
    assert read[2].column("user").to_pylist() == ["user0", "user1", "ü", "user3"]
    assert read[3].column("user").to_pylist() == ["user0", "user1", "user2", "user3"]
    assert read[5].column("account_source").null_count == 1
    assert read[7].column("account_source").null_count == 0


# Values for float columns: past float32's range (inf, as NumPy and Arrow make it), just under
# it, halfway between two float32s (rounded to even), subnormal; integers, Python's and NumPy's,
# past float32's range and past 2**53 (which NumPy rounds to float32 its own way: a NumPy
# integer once, a Python one to a double first); for float32 columns a float32 signalling NaN
# too (kept as it is).
_WIDE_FLOATS: list[Any] = [1e300, -1e39, 3.4028235e38, 1.0000000596046448, 1e-45, 1e-46,
                           np.nan, -0.0, np.float32(0.1), np.float64(1e39), 10**39, 7,
                           2**60 + 2**36 + 1, np.int64(2**60 + 2**36 + 1), np.int32(-5),
                           np.uint32(2**32 - 1)]  # fmt: skip
_FLOAT32_VALUES = [*_WIDE_FLOATS, np.frombuffer(b"\x01\x00\x80\x7f", np.float32)[0]]
# NumPy's integer types a collector may hand an integer column in
_NUMPY_INTS = {"time": np.int64, "int64": np.int64, "int32": np.int32, "int16": np.int16}


def _round_batches(table: str, seed: int) -> list[RoundBatch]:
    """Random rounds of ``table`` as the Runner hands them on: Python values (None for null,
    float64 and Python ints as the collectors give them, float32 columns unrounded)."""
    rng = np.random.default_rng(seed)
    batches = []
    for rows in [3, 0, 1, 58, 7, 7, *rng.integers(0, 60, size=12).tolist()]:
        frame = random_frame(rng, table, int(rows))
        columns: dict[str, list[Any]] = {}
        for column in TABLES[table]:
            values = frame.values(column.name)
            if column.kind in _NUMPY_INTS:
                kind = _NUMPY_INTS[column.kind]
                values = [kind(v) if v is not None and rng.random() < 0.3 else v for v in values]
            if column.kind in ("float32", "float64"):
                drawn = _FLOAT32_VALUES if column.kind == "float32" else _WIDE_FLOATS
                values = [
                    None if v is None else drawn[int(rng.integers(len(drawn)))]
                    if rng.random() < 0.4 else float(rng.normal(0, 1e6))
                    for v in values
                ]  # fmt: skip
            columns[column.name] = values
        if rows == 7 and batches and batches[-1].num_rows == 7:
            columns = {**columns, "node": list(batches[-1].values["node"])}  # strings repeated
        batches.append(RoundBatch.from_columns(table, columns, int(rows)))
    return batches


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("table", list(TABLES))
def test_a_round_batch_is_written_as_the_same_bytes_as_its_frame(
    tmp_path: Path, table: str, seed: int
) -> None:
    """The daemon's path (Python values packed with struct, no NumPy array) and the Frame's
    write the same bytes, batch after batch (string buffers reused from the batch before), and
    what they write reads back as the Frames' Arrow tables."""
    batches = _round_batches(table, seed)
    packed, arrays = {}, {}  # type: ignore[var-annotated]
    for batch in batches:
        frame = batch.frame()
        assert frame.num_rows == batch.num_rows
        assert ipc.round_batch_message(batch, packed) == ipc.record_batch_message(frame, arrays)
    path = tmp_path / "part.arrows"
    with open(path, "wb") as sink:
        writer = ipc.StreamWriter(sink, table)
        for batch in batches:
            writer.write_table(batch)
        writer.close()
    frames = [batch.frame() for batch in batches]
    data, clean = read_journal(path)
    assert clean and data is not None
    assert_same(data, _expected(table, frames))
    together = RoundBatch.frame_of([b for b in batches if b.num_rows])
    assert together.equals(Frame.concat([f for f in frames if f.num_rows]))


@pytest.mark.parametrize("table", list(TABLES))
def test_rounds_of_one_shape_are_written_as_the_same_bytes_as_their_frames(table: str) -> None:
    """A node's rounds repeat their shape (rows, nulls, strings) with new numbers: each is
    packed by the struct its shape's first round made, and still writes its Frame's bytes,
    also where a later round of the shape holds what struct cannot pack (a float past
    float32, an integer in a float32 column) or another string of the same length."""
    rng = np.random.default_rng(11)
    base = _round_batches(table, 3)[3]  # 58 rows
    packed, arrays = {}, {}  # type: ignore[var-annotated]
    for round_ in range(6):
        columns: dict[str, list[Any]] = {}
        for column in TABLES[table]:
            values = list(base.values[column.name])
            present = [i for i, v in enumerate(values) if v is not None]
            if column.kind in ("float32", "float64") and present:
                values = [None if v is None else float(rng.normal(0, 1e3)) for v in values]
                if round_ == 3:
                    values[present[0]] = 1e300 if column.kind == "float32" else 2.0
                if round_ == 4 and column.kind == "float32":
                    values[present[0]] = 7  # an integer: NumPy rounds it once
            elif column.kind in ("int16", "int32", "int64") and present:
                values = [None if v is None else int(rng.integers(0, 100)) for v in values]
            elif column.kind == "string" and present and round_ == 5:
                first = values[present[0]]
                values[present[0]] = "z" * len(first.encode()) if first else first
            columns[column.name] = values
        batch = RoundBatch.from_columns(table, columns, base.num_rows)
        assert batch.num_rows == base.num_rows
        message = ipc.round_batch_message(batch, packed)
        assert message == ipc.record_batch_message(batch.frame(), arrays), f"round {round_}"


def test_shapes_past_the_kept_ones_are_made_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """More shapes than are kept (rounds of ever new jobs): the kept ones are dropped and each
    batch still writes its Frame's bytes, an all-null string column among them."""
    monkeypatch.setattr(ipc, "_PACKINGS", {})
    monkeypatch.setattr(ipc, "_MAX_PACKINGS", 2)
    packed, arrays = {}, {}  # type: ignore[var-annotated]
    for round_ in range(7):
        rows = 1 + round_ % 3
        columns = {"gpu_uuid": [f"GPU-{round_}-{i}" for i in range(rows)],
                   "gpu_index": list(range(rows)), "gpu_model": ["H100"] * rows,
                   "memory_used_bytes": [round_] * rows, "memory_total_bytes": [80] * rows,
                   "mig_profile": [None] * rows, "power_watts": [1.5 * round_] * rows}  # fmt: skip
        batch = RoundBatch.from_columns("gpu", columns, rows, {"time": round_, "node": "n1"})
        assert ipc.round_batch_message(batch, packed) == ipc.record_batch_message(
            batch.frame(), arrays
        )
        assert len(ipc._PACKINGS) <= 2


def test_a_float_past_float32_is_written_as_infinity() -> None:
    rows = {"gpu_uuid": ["GPU-a", "GPU-b"], "gpu_index": [0, 1], "gpu_model": ["H100"] * 2,
            "memory_used_bytes": [1, 2], "memory_total_bytes": [3, 4],
            "temperature_celsius": [1e300, -1e39]}  # fmt: skip
    batch = RoundBatch.from_columns("gpu", rows, 2, {"time": 0, "node": "n1"})
    read = pa.ipc.open_stream(
        ipc.schema_message("gpu") + ipc.round_batch_message(batch) + ipc.END_OF_STREAM
    ).read_all()
    assert read.column("temperature_celsius").to_pylist() == [float("inf"), float("-inf")]


def test_rows_without_a_required_value_are_left_out_of_a_round_batch() -> None:
    rows = {"job_id": ["1", None, "3"], "cpus_allocated": [1.0, 2.0, None],
            "cpu_seconds": [5.0, 6.0, 7.0], "memory_bytes": [1, 2, 3], "user": ["a", "b", None],
            "account": ["p", "p", "p"], "gpus_allocated": [0.0, 0.0, 0.0]}  # fmt: skip
    batch = RoundBatch.from_columns("job", rows, 3, {"time": 0, "node": "n1"})
    assert batch.num_rows == 1 and list(batch.values["job_id"]) == ["1"]
    assert batch.nulls == {"account_source"}
