"""Sample times that a wall-clock step cannot throw off.

A sample's time is the wall clock (what Prometheus and every bill line up on), held steady by the
monotonic clock: each reading is checked against where the last one plus the monotonic time
since puts it. A small difference is the wall clock being slewed (NTP) and is followed. A jump is
not: the samples keep the monotonic course, and the jump is only taken over once the wall clock
has stayed there for ``accept_after_s`` (a real correction, e.g. a machine that booted with a
wrong clock). So a clock set a year ahead for three seconds writes no sample dated next year,
and drops none after it comes back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("tally.clock")

NS = 1_000_000_000


class SteadyClock:
    """Callable: nanoseconds since the epoch for the next sample (see the module docstring).

    ``steps`` counts the jumps seen (each logged once).
    """

    def __init__(
        self,
        wall: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], int] = time.monotonic_ns,
        tolerance_s: float = 2.0,
        accept_after_s: float = 60.0,
    ) -> None:
        self.wall, self.monotonic = wall, monotonic
        self.tolerance_ns = int(tolerance_s * NS)
        self.accept_after_ns = int(accept_after_s * NS)
        self._anchor_wall, self._anchor_mono = wall(), monotonic()
        self._off_since: int | None = None
        self._offset = 0  # how far the wall clock stood from the monotonic course
        self.steps = 0

    def __call__(self) -> int:
        wall, mono = self.wall(), self.monotonic()
        expected = self._anchor_wall + (mono - self._anchor_mono)
        if abs(wall - expected) <= self.tolerance_ns:
            self._anchor_wall, self._anchor_mono = wall, mono
            self._off_since = None
            return wall
        offset = wall - expected
        if self._off_since is None or abs(offset - self._offset) > self.tolerance_ns:
            # a jump, or another jump while the last one is waited out: wait this one out
            self._off_since, self._offset = mono, offset
            self.steps += 1
            log.warning(
                "the wall clock jumped by %+.0f s; sample times follow the monotonic clock "
                "unless the jump lasts %.0f s",
                (wall - expected) / NS,
                self.accept_after_ns / NS,
            )
        if mono - self._off_since >= self.accept_after_ns:
            log.warning("the wall clock stayed %+.0f s away: taken over", (wall - expected) / NS)
            self._anchor_wall, self._anchor_mono = wall, mono
            self._off_since = None
            return wall
        return expected
