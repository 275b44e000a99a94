"""``cpu`` collector: /proc/stat CPU time per mode, CPUs online, /proc/meminfo totals.

Parsers are pure functions of the file text. The collector keeps the counters monotonic: the
aggregate iowait can step backwards on NO_HZ kernels and CPU hotplug can move other modes back;
such a step is held at the previous value rather than reported as a restart, which SPEC §3 would
turn into a huge increase.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from telemetry.collectors.base import Collector, CollectorContext, Row, register
from telemetry.collectors.files import KeptFiles
from telemetry.errors import ParseError
from telemetry.tables import CPU_MODES

# Line starts are found as "\n" in "\n" + text: a literal the regex engine searches for in C,
# where a multi-line "^" is tried at every character (five times slower on a 6 KB /proc/stat).
_CPU_HEADS = re.compile(r"\ncpu([^ \n]*)")
_AGGREGATE = re.compile(r"\ncpu ([^\n]*)")


@dataclass(frozen=True)
class ProcStat:
    """CPU seconds per mode summed over all CPUs, and the number of CPUs online."""

    seconds: dict[str, float]
    cpus_online: int


def parse_proc_stat(text: str, user_hz: int, source: str = "/proc/stat") -> ProcStat:
    """Parse /proc/stat: the aggregate ``cpu`` line (USER_HZ ticks → seconds) and ``cpuN`` lines.

    Kernels older than 2.6.11 print fewer than eight modes; missing trailing modes count as 0.
    Raises ``ParseError`` when the aggregate line is missing or not numeric, or no CPU is listed.
    """
    if user_hz <= 0:
        raise ValueError(f"user_hz must be positive, got {user_hz}")
    # A line's head is what precedes its first space: "cpu" (the aggregate; the last one
    # counts), "cpuN" (one online CPU). The regular expressions find them without a Python
    # step per line: a large host lists hundreds of CPUs and thousands of interrupts.
    lined = "\n" + text
    # The kernel writes every cpu line before "intr", whose line alone is thousands of numbers
    # on a large host: the expressions scan the cpu lines only, where no cpu line follows.
    cut = lined.find("\nintr ")
    if cut >= 0 and lined.find("\ncpu", cut) < 0:
        lined = lined[:cut]
    heads = _CPU_HEADS.findall(lined)
    online = sum(map(str.isdigit, heads))
    lines = _AGGREGATE.findall(lined)
    if not lines:
        raise ParseError(f"{source}: no aggregate 'cpu' line")
    rest = lines[-1]
    line = "cpu " + rest
    fields = rest.split()
    if len(fields) < 4:
        raise ParseError(f"{source}: aggregate cpu line has {len(fields)} fields, need >= 4")
    try:
        aggregate = [int(v) for v in fields[: len(CPU_MODES)]]
    except ValueError:
        raise ParseError(f"{source}: aggregate cpu line is not numeric: {line[:80]!r}") from None
    if any(v < 0 for v in aggregate):
        raise ParseError(f"{source}: negative CPU time in {line[:80]!r}")
    if online == 0:
        raise ParseError(f"{source}: no per-CPU 'cpuN' lines")
    aggregate += [0] * (len(CPU_MODES) - len(aggregate))
    try:
        seconds = {mode: ticks / user_hz for mode, ticks in zip(CPU_MODES, aggregate, strict=True)}
    except OverflowError:
        raise ParseError(f"{source}: CPU time out of range in the aggregate cpu line") from None
    return ProcStat(seconds=seconds, cpus_online=online)


_INT64_MAX = 2**63 - 1
_MEMINFO_LINES = re.compile(r"\n(MemTotal|MemAvailable|MemFree|Buffers|Cached):([^\n]*)")


@dataclass(frozen=True)
class MemInfo:
    """Memory totals in bytes."""

    total_bytes: int
    available_bytes: int


def parse_meminfo(text: str, source: str = "/proc/meminfo") -> MemInfo:
    """Parse /proc/meminfo ``MemTotal`` and ``MemAvailable`` (kB → bytes).

    Before Linux 3.14 there is no ``MemAvailable``; it is estimated as MemFree + Buffers + Cached.
    Lines tally does not use are not checked (2.4 kernels open with a table, newer ones may add
    anything). Raises ``ParseError`` when MemTotal is missing, a used value is not a number, or a
    result does not fit the int64 columns.
    """
    values: dict[str, int] = {}
    for key, rest in _MEMINFO_LINES.findall("\n" + text):  # five of fifty-odd lines, in C
        parts = rest.split()
        if not parts:
            continue
        try:
            number = int(parts[0])
        except ValueError:
            raise ParseError(f"{source}: {key} is not a number: {rest.strip()[:40]!r}") from None
        unit = parts[1] if len(parts) > 1 else ""
        values[key] = number * 1024 if unit == "kB" else number
    if "MemTotal" not in values:
        raise ParseError(f"{source}: no MemTotal line")
    available = values.get("MemAvailable")
    if available is None:
        available = sum(values.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    for name, value in (("MemTotal", values["MemTotal"]), ("MemAvailable", available)):
        if not 0 <= value <= _INT64_MAX:  # the columns are int64
            raise ParseError(f"{source}: {name} does not fit in int64 bytes")
    return MemInfo(total_bytes=values["MemTotal"], available_bytes=available)


class MonotonicCounters:
    """Turns readings that may step backwards into counters that never do.

    The first reading is taken as is; afterwards each counter advances by the reading's increase
    and holds still when the reading goes back.
    """

    def __init__(self) -> None:
        self._last_raw: dict[str, float] = {}
        self._value: dict[str, float] = {}

    def update(self, raw: dict[str, float]) -> dict[str, float]:
        out = {}
        for key, reading in raw.items():
            if key not in self._value:
                self._value[key] = reading
            else:
                step = reading - self._last_raw[key]
                if step > 0:
                    self._value[key] += step
            self._last_raw[key] = reading
            out[key] = self._value[key]
        return out


@register
class CpuCollector(Collector):
    name = "cpu"
    help = "CPU time per mode and CPUs online from /proc/stat, memory from /proc/meminfo"

    def __init__(self, ctx: CollectorContext) -> None:
        super().__init__(ctx)
        self._counters = MonotonicCounters()
        self._stat_path = str(ctx.procfs / "stat")
        self._mem_path = str(ctx.procfs / "meminfo")
        self._files = KeptFiles(limit=2)  # both files: no open a round

    def collect(self) -> dict[str, list[Row]]:
        stat_path, mem_path = self._stat_path, self._mem_path
        self._files.begin_round()
        stat_text = self._files.read("proc", stat_path)
        stat = parse_proc_stat(stat_text, self.ctx.user_hz, stat_path)
        mem = parse_meminfo(self._files.read("proc", mem_path), mem_path)
        seconds = self._counters.update(stat.seconds)
        row: Row = {f"{mode}_seconds": seconds[mode] for mode in CPU_MODES}
        row.update(
            cpus=stat.cpus_online,
            memory_total_bytes=mem.total_bytes,
            memory_available_bytes=mem.available_bytes,
        )
        return {"cpu": [row]}

    def close(self) -> None:
        self._files.close()
