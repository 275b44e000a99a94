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
