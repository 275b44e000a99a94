"""Sample times under wall-clock jumps (a clock set a year ahead for three seconds stopped
collection: every later sample was "late" until wall time passed the false time)."""

from __future__ import annotations

from telemetry.clock import SteadyClock
from tests.support.units import NS

YEAR = 365 * 86400 * NS
T0 = 1_788_220_800 * NS


class Clocks:
    """A wall clock and a monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall_ns, self.mono_ns = T0, 5 * NS

    def tick(self, seconds: float, wall_jump_ns: int = 0) -> None:
        self.mono_ns += int(seconds * NS)
        self.wall_ns += int(seconds * NS) + wall_jump_ns


def test_a_brief_jump_forward_and_back_changes_no_sample_time() -> None:
    clocks = Clocks()
    clock = SteadyClock(lambda: clocks.wall_ns, lambda: clocks.mono_ns)
    times = [clock()]
    clocks.tick(1, wall_jump_ns=YEAR)  # the wall clock is set a year ahead...
    times += [clock()]
    for _ in range(2):
        clocks.tick(1)
        times.append(clock())
    clocks.tick(1, wall_jump_ns=-YEAR)  # ...and back three seconds later
    for _ in range(3):
        times.append(clock())
        clocks.tick(1)
    assert times == [T0 + i * NS for i in range(7)], "one second apart, none in next year"
    assert clock.steps == 1  # the way back is onto the monotonic course: no second jump


def test_slewing_is_followed_and_a_lasting_correction_is_taken_over() -> None:
    clocks = Clocks()
    clock = SteadyClock(lambda: clocks.wall_ns, lambda: clocks.mono_ns, accept_after_s=60)
    clock()
    clocks.tick(10, wall_jump_ns=NS // 2)  # NTP slews half a second: followed
    assert clock() == clocks.wall_ns and clock.steps == 0
    clocks.tick(10, wall_jump_ns=3600 * NS)  # corrected by an hour, for good
    first = clock()
    assert first == clocks.wall_ns - 3600 * NS  # not yet: it may be a glitch
    for _ in range(6):
        clocks.tick(10)
        latest = clock()
    assert latest == clocks.wall_ns, "after a minute the corrected clock is taken over"
    assert clock.steps == 1


def test_a_second_jump_is_waited_out_afresh() -> None:
    """A different jump inside the first one's minute was taken over at once (found in review)."""
    clocks = Clocks()
    clock = SteadyClock(lambda: clocks.wall_ns, lambda: clocks.mono_ns, accept_after_s=60)
    clock()
    clocks.tick(1, wall_jump_ns=86400 * NS)  # a day ahead
    clock()
    clocks.tick(59, wall_jump_ns=2 * YEAR)  # then two years more, 59 s later
    assert clock() == T0 + 60 * NS
    clocks.tick(1)
    assert clock() == T0 + 61 * NS, "the new jump waits its own minute"
    assert clock.steps == 2
