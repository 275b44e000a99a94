"""Leak check (about 2 minutes, as CI runs it): the daemon's RSS must level off under scraping.

The daemon collects every 0.2 s on this machine's real /proc while 4 threads scrape it without
pause; its VmRSS is sampled every 5 s. After a 30 s warm-up, the growth from the warm-up level
(median of the first 3 samples after it) to the end (median of the last 3) must stay under 5 MiB.
``TALLY_LEAK_SECONDS`` shortens the run locally (default 120; the warm-up and the sampling period
shrink with it). The series goes to test-artifacts/leak.txt.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.load import INTERVAL, ROUND_SHARE, Scrapes, scrape_loop

pytestmark = pytest.mark.e2e

LEAK_SECONDS = float(os.environ.get("TALLY_LEAK_SECONDS", "120"))
WARMUP_SECONDS = min(30.0, LEAK_SECONDS / 4)
SAMPLE_SECONDS = min(5.0, (LEAK_SECONDS - WARMUP_SECONDS) / 6)
SCRAPERS = 4
GROWTH_LIMIT_MIB = 5.0


def test_rss_levels_off_under_continuous_scraping(tmp_path: Path, artifacts: Path) -> None:
    daemon = DaemonProcess(tmp_path / "data", tmp_path, node="load", interval=INTERVAL)
    stop = threading.Event()
    out = Scrapes()
    threads: list[threading.Thread] = []
    samples: list[tuple[float, int, float]] = []  # (seconds since start, VmRSS KiB, rows)
    try:
        daemon.wait_rows(3)
        start = time.monotonic()
        deadline = start + LEAK_SECONDS + 10
        for i in range(SCRAPERS):
            t = threading.Thread(
                target=scrape_loop,
                args=(daemon.port, 10_000_000, deadline, out, stop),
                name=f"leak-scraper-{i}",
                daemon=True,
            )
            t.start()
            threads.append(t)
        slots = round(LEAK_SECONDS / SAMPLE_SECONDS)
        for k in range(slots + 1):
            pause = start + k * SAMPLE_SECONDS - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            rss = daemon.status_field("VmRSS")
            rows, _ = daemon.rows()
            samples.append((time.monotonic() - start, rss, rows))
        stop.set()
        for t in threads:
            t.join(timeout=15)
        elapsed = time.monotonic() - start
        code, took = daemon.terminate(timeout=15)
    finally:
        stop.set()
        daemon.kill()

    after = [s for s in samples if s[0] >= WARMUP_SECONDS - 0.5]
    base = statistics.median(s[1] for s in after[:3]) / 1024
    end = statistics.median(s[1] for s in after[-3:]) / 1024
    growth = end - base
    rows = samples[-1][2] - samples[0][2]
    due = (samples[-1][0] - samples[0][0]) / INTERVAL
    lines = [
        f"leak check: {LEAK_SECONDS:g} s, warm-up {WARMUP_SECONDS:g} s, sample every "
        f"{SAMPLE_SECONDS:g} s, {SCRAPERS} scrapers, interval {INTERVAL:g} s",
        f"scrapes {len(out.latencies)} ({len(out.latencies) / elapsed:.0f}/s), "
        f"errors {len(out.errors)}",
        f"rows written {rows:.0f} of {due:.0f} rounds due",
        f"RSS after warm-up {base:.2f} MiB, at the end {end:.2f} MiB, "
        f"growth {growth:+.2f} MiB (limit {GROWTH_LIMIT_MIB:g})",
        f"peak RSS {max(s[1] for s in samples) / 1024:.2f} MiB; "
        f"SIGTERM: exit {code} in {took:.2f} s",
        "seconds  rss_kib  rows",
        *(f"{t:7.1f}  {rss:7d}  {r:.0f}" for t, rss, r in samples),
    ]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    (artifacts / "leak.txt").write_text(report)

    assert len(after) >= 6, "too few samples after the warm-up"
    assert not out.errors, f"{len(out.errors)} errors, first: {out.errors[:5]}"
    assert not any(t.is_alive() for t in threads)
    assert rows >= ROUND_SHARE * due, report
    assert code == 0, daemon.stderr()
    assert growth < GROWTH_LIMIT_MIB, report
