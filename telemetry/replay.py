"""``tally replay``: feed a stored dataset through the daemon's aggregation and exporter.

The dataset is read by the one dataset reader in time-ordered chunks of bounded size (as
``tally bill`` reads it), so a replay of a month holds a chunk and the live state, never the
whole dataset. As fast as possible each chunk is ingested at once; with a speed factor its rows
are fed in time order, paced at that multiple of real time, and the snapshot is republished as
it goes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from telemetry.billing.inventory import Inventory
from telemetry.state import Snapshot, State
from telemetry.store.dataset import DEFAULT_BUDGET_ROWS, ReadStats, scan

log = logging.getLogger("tally.replay")

# Below this much wall time between steps, paced replay ingests rows together.
_MIN_SLEEP_SECONDS = 0.01


class _Feed:
    """One replay's state, fed chunk by chunk (a fresh one if the reader starts over)."""

    def __init__(
        self,
        max_gap_seconds: float,
        inventory: Inventory | None,
        speed: float | None,
        publish: Callable[[Snapshot], None],
        stop: threading.Event,
    ) -> None:
        self.state = State(max_gap_seconds, inventory)
        self.speed, self.publish, self.stop = speed, publish, stop
        self.origin: tuple[int, float] | None = None  # (first sample time, its wall time)

    def add(self, chunk: dict[str, pa.Table]) -> None:
        tables = {name: table for name, table in chunk.items() if table.num_rows}
        if self.stop.is_set() or not tables:
            return
        if self.speed is None:
            for name, table in tables.items():
                self.state.ingest(name, table)
            return
        self._paced(tables, self.speed)

    def _paced(self, tables: dict[str, pa.Table], speed: float) -> None:
        times = {n: t.column("time").cast(pa.int64()).to_numpy() for n, t in tables.items()}
        ordered = {n: np.argsort(ts, kind="stable") for n, ts in times.items()}
        sorted_times = {n: times[n][ordered[n]] for n in tables}
        stamps = np.unique(np.concatenate(list(sorted_times.values())))
        if self.origin is None:
            self.origin = (int(stamps[0]), time.monotonic())
        t0, wall0 = self.origin
        done = dict.fromkeys(tables, 0)
        for i, stamp in enumerate(stamps.tolist()):
            last = i == stamps.size - 1
            if not last:
                next_wall = wall0 + (int(stamps[i + 1]) - t0) / 1e9 / speed
                if next_wall - time.monotonic() < _MIN_SLEEP_SECONDS:
                    continue
            for name, table in tables.items():
                upto = int(np.searchsorted(sorted_times[name], stamp, side="right"))
                if upto > done[name]:
                    rows = pa.array(ordered[name][done[name] : upto])
                    self.state.ingest(name, table.take(rows))
                    done[name] = upto
            self.publish(self.state.snapshot())
            if not last and self.stop.wait(max(0.0, next_wall - time.monotonic())):
                return


def replay(
    root: Path,
    max_gap_seconds: float,
    speed: float | None = None,
    publish: Callable[[Snapshot], None] = lambda _: None,
    stop: threading.Event | None = None,
    inventory: Inventory | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    budget_rows: int = DEFAULT_BUDGET_ROWS,
) -> tuple[Snapshot, ReadStats]:
    """Replay the dataset at ``root`` into a fresh state; the final snapshot and what reading
    met. Raises ``TallyError`` for an unusable dataset.

    With ``speed`` the rows are fed in time order at ``speed`` × real time, calling ``publish``
    after each step; ``stop`` ends it early. With ``inventory`` the pool and tenant counters are
    computed too. ``progress(chunk, chunks, rows)`` follows the reading.
    """
    stop = stop or threading.Event()
    consumers, stats = scan(
        root,
        lambda: [_Feed(max_gap_seconds, inventory, speed, publish, stop)],
        budget_rows,
        progress,
    )
    feed = consumers[0]
    assert isinstance(feed, _Feed)
    snapshot = feed.state.snapshot()
    publish(snapshot)
    for problem in stats.problems:
        log.debug("%s", problem)
    return snapshot, stats
