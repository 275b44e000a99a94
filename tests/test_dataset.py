from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from telemetry.errors import TallyError
from telemetry.store.dataset import ReadStats, discover, read_table
from telemetry.store.writer import Store
from tests.support.tables import cpu_table, write_dataset


def test_missing_and_empty_datasets_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TallyError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(TallyError, match="not a directory"):
        discover(tmp_path / "f")
    (tmp_path / "empty" / "cpu").mkdir(parents=True)
    with pytest.raises(TallyError, match="holds no sample files"):
        discover(tmp_path / "empty")


def test_any_split_into_files_and_row_groups_reads_the_same(tmp_path: Path) -> None:
    whole = cpu_table("n1", [float(t) for t in range(0, 300, 5)])
    write_dataset(tmp_path / "a", "cpu", whole)
    for i, start in enumerate(range(0, whole.num_rows, 7)):
        write_dataset(tmp_path / "b", "cpu", whole.slice(start, 7), name=f"p{i}")
    path = write_dataset(tmp_path / "c", "cpu", whole)
    pq.write_table(whole, path, row_group_size=3)
    tables = []
    for d in "abc":
        root = tmp_path / d
        tables.append(read_table(root, "cpu", discover(root)["cpu"], ReadStats()).sort_by("time"))
    assert tables[0].equals(whole) and tables[1].equals(whole) and tables[2].equals(whole)


def test_bad_files_are_quarantined_or_skipped_and_counted(tmp_path: Path) -> None:
    good = cpu_table("n1", [0, 5, 10])
    good_path = write_dataset(tmp_path, "cpu", good)
    part = good_path.parent
    (part / "truncated.parquet").write_bytes(good_path.read_bytes()[:-100])
    (part / "zero.parquet").write_bytes(b"")
    (part / "foreign.parquet").write_bytes(b"%PDF-1.7 not parquet at all")
    pq.write_table(good.drop_columns(["cpus"]), part / "old-schema.parquet")
    stats = ReadStats()
    table = read_table(tmp_path, "cpu", discover(tmp_path)["cpu"], stats)
    assert table.equals(good)
    assert (stats.files, stats.rows) == (1, 3)
    assert stats.files_quarantined == 4 and stats.files_skipped == 0
    assert any("old-schema.parquet" in p and "'cpus'" in p for p in stats.problems)
    moved = sorted(p.name for p in (tmp_path / "quarantine").rglob("*.parquet"))
    assert moved == ["foreign.parquet", "old-schema.parquet", "truncated.parquet", "zero.parquet"]
    # A second read does not see the quarantined files again.
    again = ReadStats()
    read_table(tmp_path, "cpu", discover(tmp_path)["cpu"], again)
    assert again.files_quarantined == 0 and again.files == 1


def test_live_journal_is_read_up_to_its_last_complete_batch(tmp_path: Path) -> None:
    store = Store(tmp_path, "n1")
    store.open()
    whole = cpu_table("n1", [0, 5, 10])
    for i in range(3):
        store.append("cpu", whole.slice(i, 1))
    (journal,) = tmp_path.rglob("*.arrows")
    with open(journal, "ab") as f:
        f.write(b"\x01\x02")  # a batch being written right now
    stats = ReadStats()
    table = read_table(tmp_path, "cpu", discover(tmp_path)["cpu"], stats)
    assert table.equals(whole)
    assert journal.exists(), "a reader never moves a journal a daemon may be writing"
    store.close()


def test_extra_columns_are_fine(tmp_path: Path) -> None:
    table = cpu_table("n1", [0, 5]).append_column("rack", pa.array(["r1", "r1"]))
    write_dataset(tmp_path, "cpu", table)
    stats = ReadStats()
    out = read_table(tmp_path, "cpu", discover(tmp_path)["cpu"], stats)
    assert out.num_rows == 2 and stats.files_skipped == 0


def test_symlinked_node_and_date_directories_are_read_and_loops_end(tmp_path: Path) -> None:
    """A node's directory on another disk, linked in, is half a pool's capacity: read it; a
    link back up the tree must not loop."""
    import os

    whole = cpu_table("n1", [0, 5, 10])
    write_dataset(tmp_path / "ds", "cpu", whole)
    elsewhere = write_dataset(tmp_path / "other-disk", "cpu", cpu_table("n2", [0, 5, 10, 15]))
    date_dir = next((tmp_path / "ds" / "cpu").iterdir())
    os.symlink(elsewhere.parent, date_dir / "node=n2")
    linked_date = tmp_path / "more-dates" / "date=2026-09-02"
    write_dataset(tmp_path / "more-dates-src", "cpu", cpu_table("n3", [0, 5]))
    linked_date.parent.mkdir()
    os.symlink(next((tmp_path / "more-dates-src" / "cpu").iterdir()), linked_date)
    os.symlink(linked_date, tmp_path / "ds" / "cpu" / "date=2026-09-02")
    os.symlink(tmp_path / "ds" / "cpu", date_dir / "loop")  # back up the tree
    stats = ReadStats()
    table = read_table(tmp_path / "ds", "cpu", discover(tmp_path / "ds")["cpu"], stats)
    assert sorted(set(table.column("node").to_pylist())) == ["n1", "n2", "n3"]
    assert table.num_rows == 3 + 4 + 2 and stats.files == 3
