"""The benchmarks' dataset generators write what tally's reader reads, every row of it.

The bill benchmarks (and the GPU bill test) build their datasets with these generators; a
schema change that one of them misses fails here on CI rather than in a benchmark run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import bill_cluster, bill_scale
from telemetry.store.dataset import ReadStats, discover, read_table


@pytest.mark.parametrize(
    "generate",
    [bill_scale.generate, bill_cluster.generate],
    ids=["bill_scale", "bill_cluster"],
)
def test_generated_dataset_is_read_whole(
    generate: Callable[[Path, int, int], int], tmp_path: Path
) -> None:
    root = tmp_path / "data"
    written = generate(root, 2, 26)  # two nodes, a day and two hours: two files per table
    files = discover(root)
    assert sorted(files) == ["cpu", "gpu", "job"]
    stats = ReadStats()
    read = {table: read_table(root, table, paths, stats).num_rows for table, paths in files.items()}
    assert stats.problems == [] and stats.files_quarantined == 0 and stats.files_skipped == 0
    assert stats.rows_out_of_range == {}
    assert sum(read.values()) == written > 0
    assert all(len(paths) == 4 for paths in files.values())  # 2 nodes x 2 days


def test_dataset_cut_off_while_generated_is_made_again(tmp_path: Path) -> None:
    data = tmp_path / "n2-h26"

    def cut_off(into: Path) -> int:
        bill_scale.generate(into, 1, 1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bill_scale.cached(data, cut_off)
    assert not data.exists()  # nothing a later run would take for the whole dataset
    made = bill_scale.cached(data, lambda into: bill_scale.generate(into, 2, 26))
    assert made is not None and data.is_dir()
    assert not (tmp_path / "n2-h26.partial").exists()
    stats = ReadStats()
    read = sum(read_table(data, t, p, stats).num_rows for t, p in discover(data).items())
    assert read == made
    assert bill_scale.cached(data, lambda into: pytest.fail("made again")) is None
