"""Many scrapers against one daemon: the tools the load and leak tests share.

Every request goes to 127.0.0.1; every loop is bounded in count and in time.
"""

from __future__ import annotations

import http.client
import math
import threading
import time

INTERVAL = 0.2
# Collection must keep at least this share of its rounds while the scrapers hammer the daemon.
ROUND_SHARE = 0.7


class Scrapes:
    """Thread-safe tally of scrape results (list.append is atomic)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: list[str] = []


def scrape_loop(
    port: int,
    count: int,
    deadline: float,
    out: Scrapes,
    stop: threading.Event | None = None,
    start: threading.Barrier | None = None,
) -> None:
    """Up to ``count`` GETs of /metrics until ``deadline`` (monotonic) or ``stop``.

    One HTTPConnection per thread: it keeps the connection alive where the server allows (tally
    answers HTTP/1.0 and closes, so http.client reconnects for the next request).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        if start is not None:
            start.wait(timeout=30)
        for _ in range(count):
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                return
            began = time.perf_counter()
            try:
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                out.errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                continue
            out.latencies.append(time.perf_counter() - began)
            if resp.status != 200 or b"tally_build_info" not in body:
                out.errors.append(f"status {resp.status}, {len(body)} bytes")
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
