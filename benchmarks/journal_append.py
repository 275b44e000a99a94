"""CPU µs per ``Store.append`` of one daemon round's three Frames (cpu, gpu, job).

``python -m benchmarks.journal_append [--rounds 30] [--loop 2000] [--jobs 50] [--profile]``

The Frames are those of real daemon rounds on :mod:`benchmarks.node_tree` (8 fake H100s,
``--jobs`` Slurm jobs), collected first; then their appends are timed alone: ``--rounds`` rounds at
the daemon's 1 s cadence (caches as cold as a daemon's) and ``--loop`` rounds back to back (a
tight loop reads lower). ``--profile`` prints cProfile's top functions of the tight loop. Run it
from another checkout's root (``PYTHONPATH=.``) to time that checkout's store.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import node_tree
from telemetry.frame import Frame


def _rounds(scratch: Path, count: int, jobs: int) -> list[dict[str, Frame]]:
    """``count`` rounds of the daemon's Frames on a loaded node tree."""
    from telemetry.config import DaemonConfig
    from telemetry.daemon import Daemon

    tree = scratch / "node"
    node_tree.write_node(tree, jobs)
    config = DaemonConfig(
        listen="127.0.0.1:0", data_dir=scratch / "unused", procfs=tree / "proc",
        sysfs=tree / "sys", node="bench", nvml_module="benchmarks.node_tree:NVML",
    )  # fmt: skip
    daemon = Daemon(config)
    rounds = [dict(daemon.runner.run().tables) for _ in range(count)]
    daemon.runner.close()
    return rounds


def _time_appends(
    store: object, rounds: list[dict[str, Frame]], sleep_s: float, repeat: int
) -> list[float]:
    """CPU µs of each round's appends."""
    from telemetry.store.writer import Store

    assert isinstance(store, Store)
    spent = []
    for k in range(repeat):
        frames = rounds[k % len(rounds)]
        if sleep_s:
            time.sleep(sleep_s)
        t0 = time.process_time()
        for table, frame in frames.items():
            store.append(table, frame)
        spent.append((time.process_time() - t0) * 1e6)
    return spent


def main(argv: list[str] | None = None) -> None:
    from telemetry.store.writer import Store

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30, help="rounds at a 1 s cadence")
    parser.add_argument("--loop", type=int, default=2000, help="rounds back to back")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as name:
        scratch = Path(name)
        rounds = _rounds(scratch, 10, args.jobs)
        sizes = {t: f.num_rows for t, f in rounds[0].items()}
        store = Store(scratch / "data", "bench")
        store.open()
        _time_appends(store, rounds, 0.0, 20)  # journals opened, code warm
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(_time_appends, store, rounds, 0.0, args.loop)
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        loop = _time_appends(store, rounds, 0.0, args.loop)
        cadence = _time_appends(store, rounds, 1.0, args.rounds)
        store.close()
    print(f"rows per table: {sizes}")
    for what, spent in (("1 s cadence", cadence), ("tight loop", loop)):
        print(
            f"{what:12} µs/round: median {statistics.median(spent):7.1f}  "
            f"mean {statistics.fmean(spent):7.1f}  ({len(spent)} rounds)"
        )


if __name__ == "__main__":
    main()
