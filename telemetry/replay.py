"""``tally replay``: feed a stored dataset through the daemon's aggregation and exporter.

As fast as possible the whole dataset is ingested at once; with a speed factor the rows are fed
in time order, paced at that multiple of real time, and the snapshot is republished as it goes.
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
from telemetry.schema import SCHEMAS
from telemetry.state import Snapshot, State
from telemetry.store.dataset import ReadStats, discover, read_table

log = logging.getLogger("tally.replay")

# Below this much wall time between steps, paced replay ingests rows together.
_MIN_SLEEP_SECONDS = 0.01


def load_dataset(
    root: Path, progress: Callable[[int, int, int], None] | None = None
) -> tuple[dict[str, pa.Table], ReadStats]:
    """Every table of the dataset at ``root``, read and validated; raises ``TallyError``.

    ``progress(files_done, files_total, rows)`` is called as files are read.
    """
    stats = ReadStats()
    files = discover(root)
    total = sum(len(found) for found in files.values())
    done = [0]

    def on_file() -> None:
        if progress is not None:
            progress(done[0], total, stats.rows)
        done[0] += 1

    tables = {
        table: read_table(root, table, files.get(table, []), stats, on_file) for table in SCHEMAS
    }
    if progress is not None:
        progress(total, total, stats.rows)
    for problem in stats.problems:
        log.debug("%s", problem)
    return tables, stats


def replay(
    tables: dict[str, pa.Table],
    max_gap_seconds: float,
    speed: float | None = None,
    publish: Callable[[Snapshot], None] = lambda _: None,
    stop: threading.Event | None = None,
    inventory: Inventory | None = None,
) -> Snapshot:
    """Ingest ``tables`` into a fresh state and return the final snapshot.

    With ``speed`` the rows are fed in time order at ``speed`` × real time, calling ``publish``
    after each step; ``stop`` ends a paced replay early. With ``inventory`` the pool and tenant
    counters are computed too.
    """
    state = State(max_gap_seconds, inventory)
    if speed is None:
        for name, table in tables.items():
            state.ingest(name, table)
        snapshot = state.snapshot()
        publish(snapshot)
        return snapshot
    stop = stop or threading.Event()
    times = {n: t.column("time").cast(pa.int64()).to_numpy() for n, t in tables.items()}
    ordered = {n: np.argsort(ts, kind="stable") for n, ts in times.items()}
    sorted_times = {n: times[n][ordered[n]] for n in tables}
    stamps = np.unique(
        np.concatenate([ts for ts in sorted_times.values()] or [np.zeros(0, np.int64)])
    )
    if stamps.size == 0:
        return state.snapshot()
    done = {n: 0 for n in tables}
    t0, wall0 = int(stamps[0]), time.monotonic()
    for i, stamp in enumerate(stamps.tolist()):
        last = i == stamps.size - 1
        next_wall = wall0 + (int(stamps[i + 1]) - t0) / 1e9 / speed if not last else 0.0
        if not last and next_wall - time.monotonic() < _MIN_SLEEP_SECONDS:
            continue
        for name, table in tables.items():
            upto = int(np.searchsorted(sorted_times[name], stamp, side="right"))
            if upto > done[name]:
                state.ingest(name, table.take(pa.array(ordered[name][done[name] : upto])))
                done[name] = upto
        publish(state.snapshot())
        if last or stop.wait(max(0.0, next_wall - time.monotonic())):
            break
    return state.snapshot()
