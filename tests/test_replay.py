"""Replay streams the dataset in bounded chunks (it loaded all of it: 20.2M rows took 5.6 GiB)
and ends in the same state, whatever the chunking."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from exporters.prometheus import TallyCollector
from telemetry.billing.inventory import load_inventory
from telemetry.demo import generate_demo
from telemetry.replay import replay


def _noting(seen: list[int]) -> Callable[[int, int, int], None]:
    return lambda done, total, rows: seen.append(total)


def test_any_chunking_replays_to_the_same_exposition(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    generate_demo(root, nodes=2, hours=1)
    inventory = load_inventory(root / "inventory.toml")
    texts, chunk_counts = [], []
    for budget in (10_000_000, 2_000, 333):
        seen: list[int] = []
        snapshot, stats = replay(
            root,
            90,
            inventory=inventory,
            budget_rows=budget,
            progress=_noting(seen),
        )
        texts.append(TallyCollector(lambda s=snapshot: s).render_text())
        chunk_counts.append(max(seen))
        assert stats.files > 0
    assert texts[0] == texts[1] == texts[2]
    assert chunk_counts[0] == 1 and chunk_counts[2] > chunk_counts[1] > 1, chunk_counts
    assert b"tally_pool_capacity_unit_seconds_total" in texts[0]
