"""``rapl`` collector: CPU package energy from powercap RAPL zones into ``cpu.energy_joules``.

Reads ``<sysfs>/class/powercap/intel-rapl:N`` (top-level zones whose ``name`` starts with
``package``; sub-zones ``intel-rapl:N:M`` and ``psys`` would count the same joules twice). The
kernel names zones ``<parent>:%x``: N is hexadecimal, so the eleventh package of a large host is
``intel-rapl:a``. AMD processors use the same ``intel-rapl`` control type (the kernel's
``intel_rapl_msr`` driver serves both); ``intel-rapl-mmio`` repeats package 0 and is not read.
The hardware counter wraps at ``max_energy_range_uj`` — every few minutes on a busy server — so
the collector keeps its own accumulator, which starts at 0 when the daemon starts. The zones
are listed once a minute (``ZONES_KEPT_S``) and after any failed read, not every round. Since Linux
5.10 ``energy_uj`` is readable by root only: then the energy is null and one line is logged, not
an error every round.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from telemetry.collectors.base import Collector, CollectorContext, Row, register
from telemetry.collectors.files import KeptFiles, read_text
from telemetry.errors import CollectorUnavailable, ParseError
from telemetry.logs import OnceLogger, log

_ZONE = re.compile(r"intel-rapl:([0-9a-f]+)")
ZONES_KEPT_S = 60.0  # how long a listing of the zones is used before the next


def parse_microjoules(text: str, source: str) -> int:
    """Parse a powercap counter file (one non-negative integer, µJ). Raises ``ParseError``."""
    value = text.strip()
    try:
        if not (value.isascii() and value.isdigit()):
            raise ValueError
        return int(value)
    except ValueError:  # also raised by int() for numbers too long to convert
        raise ParseError(f"{source}: expected a non-negative integer, got {value[:40]!r}") from None


def wrap_delta(previous_uj: int, current_uj: int, max_range_uj: int) -> int:
    """Energy increase in µJ between two readings of a counter that wraps at ``max_range_uj``."""
    if current_uj >= previous_uj:
        return current_uj - previous_uj
    if max_range_uj > previous_uj:
        return max_range_uj - previous_uj + current_uj
    return current_uj  # no usable range: count from zero, as a restart


def package_zones(sysfs: Path) -> list[Path]:
    """Top-level RAPL package zones under ``sysfs``, in zone-number order."""
    root = sysfs / "class" / "powercap"
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    numbered = []
    for entry in entries:
        match = _ZONE.fullmatch(entry.name)
        if match and len(match.group(1)) <= 8:
            numbered.append((int(match.group(1), 16), entry))
    zones = []
    for _, entry in sorted(numbered):
        try:
            name = read_text(entry / "name").strip()
        except OSError:
            continue
        if name.startswith("package"):
            zones.append(entry)
    return zones


@dataclass
class _ZoneState:
    last_uj: int
    max_range_uj: int


@register
class RaplCollector(Collector):
    name = "rapl"
    help = "CPU package energy from powercap RAPL zones (wrap-corrected)"

    def __init__(self, ctx: CollectorContext) -> None:
        super().__init__(ctx)
        self._state: dict[str, _ZoneState] = {}
        self._joules = 0.0
        self._once = OnceLogger(log)
        # Listing the zones cost more than reading them; they change only when a driver is
        # loaded or unloaded, so the list is kept a while, and dropped on any failed read.
        # each zone with its name and its counter's, made once a listing
        self._zones: list[tuple[Path, str, str]] = []
        self._listed_at = -ZONES_KEPT_S
        self._clock = time.monotonic  # seconds; tests may replace it
        # each zone's counter kept open and read with one pread: no open and close a round
        self._files = KeptFiles(limit=64)

    def collect(self) -> dict[str, list[Row]]:
        now = self._clock()
        if not self._zones or now - self._listed_at >= ZONES_KEPT_S:
            zones = package_zones(self.ctx.sysfs)
            self._zones = [(z, z.name, str(z / "energy_uj")) for z in zones]
            self._listed_at = now
            self._files.keep_only({name for _, name, _ in self._zones})
        self._files.begin_round()
        if not self._zones:
            # Failing (success 0, one log line from the runner) says what a 1 would hide: this
            # host reports no CPU energy at all; the cpu rows go on with energy_joules null.
            raise CollectorUnavailable(
                f"no package zones under {self.ctx.sysfs}/class/powercap, so CPU energy stays "
                "null (normal in VMs; on bare metal load intel_rapl_common or AMD's powercap)"
            )
        # Read every zone before touching any state: a round that fails or is null part-way must
        # not advance some zones' last readings, or their increase in that round would be lost.
        readings: list[tuple[Path, str, int]] = []
        for zone, name, counter in self._zones:
            try:
                text = self._files.read(name, counter)
            except PermissionError:
                self._once.warning(
                    f"perm:{name}",
                    f"rapl: {counter} is not readable (root only since Linux 5.10); "
                    "energy_joules is null",
                )
                return {"cpu": [{"energy_joules": None}]}
            except OSError:
                self._zones = []  # a zone went away (driver unloaded): list them again
                raise
            readings.append((zone, name, parse_microjoules(text, counter)))
            self._once.clear(f"perm:{name}")
        increase_uj = 0
        for zone, name, current in readings:
            state = self._state.get(name)
            if state is None:
                self._state[name] = _ZoneState(current, self._max_range(zone))
                continue
            increase_uj += wrap_delta(state.last_uj, current, state.max_range_uj)
            state.last_uj = current
        self._joules += increase_uj / 1e6
        return {"cpu": [{"energy_joules": self._joules}]}

    def close(self) -> None:
        self._files.close()

    @staticmethod
    def _max_range(zone: Path) -> int:
        path = zone / "max_energy_range_uj"
        try:
            return parse_microjoules(read_text(path), str(path))
        except (OSError, ParseError):
            return 0
