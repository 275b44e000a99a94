"""Time-ordered chunks: every row read once into the chunk that holds its time, each piece
decoded once however many chunks it spans, and reading ahead on another thread changes nothing."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from telemetry.schema import DICTIONARY_STRING, validate
from telemetry.store import dataset
from telemetry.store.dataset import (
    ReadStats,
    ValidatedChunk,
    chunk_bounds,
    discover,
    plan,
    read_ahead,
    read_chunks,
)
from tests.support.tables import T0, cpu_table, write_dataset
from tests.support.units import NS


def _dataset(root: Path) -> pa.Table:
    """Two nodes, 10 minutes each; one node's file in row groups of 7 rows."""
    a = cpu_table("n1", [float(t) for t in range(0, 600, 5)])
    b = cpu_table("n2", [float(t) + 2 for t in range(0, 600, 10)])
    write_dataset(root, "cpu", a)
    path = write_dataset(root, "cpu", b, name="part-1")
    pq.write_table(b, path, row_group_size=7)
    return pa.concat_tables([a, b])


def test_each_chunk_holds_exactly_its_rows_and_each_piece_is_decoded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _dataset(tmp_path)
    decoded: list[dataset.Piece] = []
    real = dataset._read_piece

    def counting(piece: dataset.Piece, columns: object, *rest: object) -> pa.Table:
        decoded.append(piece)
        return real(piece, columns, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(dataset, "_read_piece", counting)
    stats = ReadStats()
    pieces = plan(tmp_path, discover(tmp_path), stats)
    first, last = min(p.min_ns for p in pieces), max(p.max_ns for p in pieces)
    bounds = chunk_bounds(pieces, first, last, budget_rows=40)
    assert len(bounds) >= 4  # the 120-row file spans every chunk
    seen = []
    for (a, b), chunk in zip(bounds, read_chunks(tmp_path, pieces, bounds, stats), strict=True):
        times = chunk["cpu"].column("time").cast(pa.int64()).to_pylist()
        assert all(a <= t < b for t in times)
        assert chunk["cpu"].schema.field("node").type == DICTIONARY_STRING  # codes as stored
        seen.append(validate(chunk["cpu"], "cpu"))  # decoded back to plain strings
    assert sorted(decoded, key=repr) == sorted(pieces, key=repr)  # once each, none skipped
    got = pa.concat_tables(seen).sort_by([("node", "ascending"), ("time", "ascending")])
    assert got.equals(whole.sort_by([("node", "ascending"), ("time", "ascending")]))
    assert stats.rows == whole.num_rows


def _numbered(count: int, fail_at: int | None = None) -> Iterator[ValidatedChunk]:
    for i in range(count):
        if i == fail_at:
            raise dataset.DamagedFile(Path(f"f{i}"), "torn", quarantined=True)
        yield ValidatedChunk({"n": pa.table({"i": [i]})})


def test_read_ahead_keeps_order_and_raises_where_the_reader_failed() -> None:
    assert [c["n"]["i"][0].as_py() for c in read_ahead(_numbered(6))] == list(range(6))
    got = []
    with pytest.raises(dataset.DamagedFile, match="f3: torn"):
        for c in read_ahead(_numbered(6, fail_at=3)):
            got.append(c["n"]["i"][0].as_py())
    assert got == [0, 1, 2]


def test_read_ahead_stops_its_reader_when_the_consumer_stops() -> None:
    produced = []

    def endless() -> Iterator[ValidatedChunk]:
        i = 0
        while True:
            produced.append(i)
            yield ValidatedChunk({"n": pa.table({"i": [i]})})
            i += 1

    ahead = read_ahead(endless(), depth=2)
    assert next(ahead)["n"]["i"][0].as_py() == 0
    ahead.close()
    deadline = time.monotonic() + 5
    while any(t.name == "tally-read-ahead" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "reader thread still running after close"
        time.sleep(0.01)
    assert len(produced) <= 4  # the one consumed, two queued, one blocked: bounded, not endless


def test_chunk_bounds_cover_the_range_in_order() -> None:
    pieces = [dataset.Piece("cpu", Path("x"), 0, T0, T0 + 99 * NS, 1000)]
    bounds = chunk_bounds(pieces, T0, T0 + 99 * NS, budget_rows=300)
    assert bounds[0][0] == T0 and bounds[-1][1] == T0 + 99 * NS + 1
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(bounds))


def test_batch_commands_keep_freed_memory_for_reuse() -> None:
    """glibc accepts the settings and Arrow allocates from it (a child process: the settings are
    process-wide)."""
    import subprocess
    import sys

    code = (
        "import pyarrow as pa\n"
        "from telemetry.allocator import keep_freed_memory\n"
        "print(keep_freed_memory(), pa.default_memory_pool().backend_name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "system"]


# --- string columns kept dictionary-encoded --------------------------------------------------


def _dictionary(indices: list[int | None], values: list[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), pa.array(values))


def test_dictionary_codes_give_equal_values_one_code_whatever_the_dictionaries() -> None:
    from telemetry.rows import dictionary_codes

    # Two chunks with different dictionaries, one repeating a value (legal in a Parquet
    # dictionary page): equal strings must still share a code, or one GPU would be two series.
    column = pa.chunked_array(
        [_dictionary([0, 1, 0, None], ["b", "a"]), _dictionary([2, 0, 1], ["a", "c", "a"])]
    )
    codes, values = dictionary_codes(column)
    decoded = [None if c < 0 else values[c] for c in codes.tolist()]
    assert decoded == ["b", "a", "b", None, "a", "a", "c"]
    assert len(set(values)) == len(values)
    plain_codes, plain_values = dictionary_codes(column.cast(pa.string()))
    assert [plain_values[c] if c >= 0 else None for c in plain_codes.tolist()] == decoded


def test_dictionary_strings_are_checked_like_plain_ones() -> None:
    from telemetry.schema import SchemaError

    table = cpu_table("n1", [0.0, 5.0, 10.0])
    bad = pa.array([b"n\xff"], pa.binary()).cast(pa.string(), safe=False)
    node = pa.DictionaryArray.from_arrays(pa.array([0, 0, 0], pa.int32()), bad)
    hostile = table.set_column(table.schema.get_field_index("node"), "node", node)
    with pytest.raises(SchemaError, match="'node' holds invalid UTF-8"):
        validate(hostile, "cpu", dictionaries=True)
    with pytest.raises(SchemaError, match="'node' holds invalid UTF-8"):
        validate(hostile, "cpu")
    nulls = pa.DictionaryArray.from_arrays(pa.array([0, None, 0], pa.int32()), pa.array(["n"]))
    with pytest.raises(SchemaError, match="'node' has 1 null values"):
        validate(table.set_column(1, "node", nulls), "cpu", dictionaries=True)


def test_parquet_written_from_dictionary_columns_reads_like_plain(tmp_path: Path) -> None:
    """A file another Arrow tool wrote with dictionary-typed strings (its Arrow schema says so)
    is the same data: it validates, and bills like the plain file."""
    from telemetry.billing.bill import compute_bill
    from telemetry.billing.inventory import parse_inventory

    plain = cpu_table("n1", [float(t) for t in range(0, 600, 5)])
    encoded = plain.set_column(1, "node", pc.dictionary_encode(plain.column("node")))
    assert validate(encoded, "cpu").equals(plain)
    inventory = parse_inventory(
        '[[pool]]\nname = "c"\nkind = "cpu"\nownership = "own"\nnodes = ["n*"]\n'
        "cost_per_unit_hour = 1.0\nprice_per_unit_hour = 2.0\n"
    )
    bills = []
    for name, table in (("plain", plain), ("encoded", encoded)):
        write_dataset(tmp_path / name, "cpu", table)
        bills.append(compute_bill(tmp_path / name, inventory, 3600).pools)
    assert bills[0] == bills[1] and bills[0][0]["capacity_unit_hours"] > 0


def test_a_journal_compacted_between_plan_and_read_is_read_from_its_twin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bill of a live dataset: the daemon compacts its journal after the reader planned it.
    The reader plans again and reads the rows from the Parquet twin (it crashed before)."""
    from telemetry.store.writer import Store

    whole = cpu_table("n1", [float(t) for t in range(0, 600, 5)])
    store = Store(tmp_path, "n1")
    store.open()
    for i in range(whole.num_rows):
        store.append("cpu", whole.slice(i, 1))
    assert list(tmp_path.rglob("*.arrows")) and not list(tmp_path.rglob("*.parquet"))
    real_plan = dataset.plan
    plans = []

    def plan_then_compact(*args: object) -> list[dataset.Piece]:
        pieces = real_plan(*args)  # type: ignore[arg-type]
        plans.append(len(pieces))
        if len(plans) == 1:
            store.rotate()  # the hour ends: the journal becomes its Parquet twin
        return pieces

    monkeypatch.setattr(dataset, "plan", plan_then_compact)
    read: list[pa.Table] = []

    class Collect:
        def add(self, chunk: dict[str, pa.Table]) -> None:
            read.append(chunk["cpu"])

    def fresh() -> list[Collect]:
        read.clear()
        return [Collect()]

    _, stats = dataset.scan(tmp_path, fresh)
    assert len(plans) == 2, "planned again once the journal vanished"
    got = pa.concat_tables(read).combine_chunks()
    assert got.num_rows == whole.num_rows and stats.files == 1
    assert pc.cast(got.column("node"), pa.string()).to_pylist() == ["n1"] * whole.num_rows
    store.close()


def test_a_file_of_thousands_of_row_groups_is_opened_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row group used to open the file again, parsing a footer that grows with the row
    groups: 40k rows in 4,000 row groups took 278 s."""
    whole = cpu_table("n1", [float(t) for t in range(0, 20_000, 5)])
    path = write_dataset(tmp_path, "cpu", whole)
    pq.write_table(whole, path, row_group_size=2)  # 2,000 row groups
    opens: list[object] = []
    real = dataset.pq.ParquetFile

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            opens.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(dataset.pq, "ParquetFile", Counting)
    stats = ReadStats()
    pieces = plan(tmp_path, dataset.discover(tmp_path), stats)
    assert len(pieces) == 2000
    bounds = chunk_bounds(pieces, pieces[0].min_ns, pieces[-1].max_ns, 1500)
    started = time.monotonic()
    rows = sum(c["cpu"].num_rows for c in read_chunks(tmp_path, pieces, bounds, stats))
    assert rows == whole.num_rows
    assert len(opens) <= 2, f"opened {len(opens)} times"
    assert time.monotonic() - started < 30


def test_a_journal_compacted_between_listing_and_planning_is_read_from_its_twin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing named the journal, the plan found it gone: it was set aside as unreadable and
    its rows lost (found in review). Now the reader lists and plans again."""
    from telemetry.store.writer import Store

    whole = cpu_table("n1", [float(t) for t in range(0, 300, 5)])
    store = Store(tmp_path, "n1")
    store.open()
    for i in range(whole.num_rows):
        store.append("cpu", whole.slice(i, 1))
    real_discover = dataset.discover
    listings = []

    def list_then_compact(root: Path) -> dict[str, list[Path]]:
        found = real_discover(root)
        listings.append(found)
        if len(listings) == 1:
            store.rotate()
        return found

    monkeypatch.setattr(dataset, "discover", list_then_compact)
    rows: list[int] = []

    class Count:
        def add(self, chunk: dict[str, pa.Table]) -> None:
            rows.append(chunk["cpu"].num_rows)

    def fresh() -> list[Count]:
        rows.clear()
        return [Count()]

    _, stats = dataset.scan(tmp_path, fresh)
    assert sum(rows) == whole.num_rows and stats.files_quarantined == 0
    assert len(listings) == 2
    store.close()
