"""Time-ordered chunks: every row read once into the chunk that holds its time, each piece
decoded once however many chunks it spans, and reading ahead on another thread changes nothing."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from telemetry import chunks
from telemetry.chunks import ValidatedChunk, chunk_bounds, plan, read_ahead, read_chunks
from telemetry.dataset import ReadStats, discover
from tests.samples import NS, T0, cpu_table, write_dataset


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
    decoded: list[chunks.Piece] = []
    real = chunks._read_piece

    def counting(piece: chunks.Piece, columns: object) -> pa.Table:
        decoded.append(piece)
        return real(piece, columns)  # type: ignore[arg-type]

    monkeypatch.setattr(chunks, "_read_piece", counting)
    stats = ReadStats()
    pieces = plan(tmp_path, discover(tmp_path), stats)
    first, last = min(p.min_ns for p in pieces), max(p.max_ns for p in pieces)
    bounds = chunk_bounds(pieces, first, last, budget_rows=40)
    assert len(bounds) >= 4  # the 120-row file spans every chunk
    seen = []
    for (a, b), chunk in zip(bounds, read_chunks(tmp_path, pieces, bounds, stats), strict=True):
        times = chunk["cpu"].column("time").cast(pa.int64()).to_pylist()
        assert all(a <= t < b for t in times)
        seen.append(chunk["cpu"])
    assert sorted(decoded, key=repr) == sorted(pieces, key=repr)  # once each, none skipped
    got = pa.concat_tables(seen).sort_by([("node", "ascending"), ("time", "ascending")])
    assert got.equals(whole.sort_by([("node", "ascending"), ("time", "ascending")]))
    assert stats.rows == whole.num_rows


def _numbered(count: int, fail_at: int | None = None) -> Iterator[ValidatedChunk]:
    for i in range(count):
        if i == fail_at:
            raise chunks.DamagedFile(Path(f"f{i}"), "torn", quarantined=True)
        yield ValidatedChunk({"n": pa.table({"i": [i]})})


def test_read_ahead_keeps_order_and_raises_where_the_reader_failed() -> None:
    assert [c["n"]["i"][0].as_py() for c in read_ahead(_numbered(6))] == list(range(6))
    got = []
    with pytest.raises(chunks.DamagedFile, match="f3: torn"):
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
    pieces = [chunks.Piece("cpu", Path("x"), 0, T0, T0 + 99 * NS, 1000)]
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
