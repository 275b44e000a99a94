"""Pure parsers of the ``cpu`` and ``rapl`` collectors, on the fixture trees and on fuzzed text.

Expected numbers are read off the fixture files by hand (the literals below) or by the small
independent splitters in this file, never by running the parsers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from telemetry.collectors.cpu import parse_meminfo, parse_proc_stat
from telemetry.collectors.rapl import package_zones, parse_microjoules, wrap_delta
from telemetry.errors import ParseError
from telemetry.schema import CPU_MODES

FIXTURES = Path(__file__).resolve().parent / "fixtures"
INT64_MAX = 2**63 - 1


def read(tree: str, name: str) -> str:
    return (FIXTURES / tree / "proc" / name).read_text()


def aggregate_ticks(text: str) -> list[int]:
    """The aggregate ``cpu`` line's first eight fields, padded with zeros (independent split)."""
    line = next(ln for ln in text.splitlines() if ln.split()[0] == "cpu")
    ticks = [int(v) for v in line.split()[1:9]]
    return ticks + [0] * (8 - len(ticks))


def per_cpu_lines(text: str) -> list[list[int]]:
    rows = []
    for line in text.splitlines():
        head, *fields = line.split()
        if head.startswith("cpu") and head != "cpu":
            rows.append([int(v) for v in fields])
    return rows


def meminfo_kb(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, value = line.split(":")
        out[key] = int(value.split()[0])
    return out


# ---------------------------------------------------------------- parse_proc_stat


def test_normal_host_all_eight_modes_at_user_hz_100() -> None:
    # Aggregate line of tests/fixtures/normal_host/proc/stat, copied by hand:
    # cpu  4036549921 5803454 563239494 7974395120 26066404 18802292 94047382 0 0 0
    stat = parse_proc_stat(read("normal_host", "stat"), 100)
    assert stat.seconds == {
        "user": 40365499.21,
        "nice": 58034.54,
        "system": 5632394.94,
        "idle": 79743951.20,
        "iowait": 260664.04,
        "irq": 188022.92,
        "softirq": 940473.82,
        "steal": 0.0,
    }
    assert stat.cpus_online == 64


def test_normal_host_fixture_is_self_consistent() -> None:
    # A real kernel's aggregate line is the sum of the per-CPU lines; the fixture keeps that.
    text = read("normal_host", "stat")
    rows = per_cpu_lines(text)
    assert len(rows) == 64
    sums = [sum(r[m] for r in rows) for m in range(8)]
    assert sums == aggregate_ticks(text)


@pytest.mark.parametrize("user_hz", [100, 250, 300, 1000])
def test_user_hz_conversion(user_hz: int) -> None:
    text = read("normal_host", "stat")
    ticks = aggregate_ticks(text)
    stat = parse_proc_stat(text, user_hz)
    for mode, t in zip(CPU_MODES, ticks, strict=True):
        assert stat.seconds[mode] == pytest.approx(t / user_hz, rel=1e-15)
    # user at 250 Hz, by hand: 4036549921 / 250
    if user_hz == 250:
        assert stat.seconds["user"] == pytest.approx(16146199.684)


def test_modes_map_in_kernel_order_and_guest_is_not_added() -> None:
    # guest and guest_nice (fields 9 and 10) are already included in user and nice.
    text = "cpu  100 200 300 400 500 600 700 800 900 1000\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
    stat = parse_proc_stat(text, 100)
    assert stat.seconds == {
        "user": 1.0,
        "nice": 2.0,
        "system": 3.0,
        "idle": 4.0,
        "iowait": 5.0,
        "irq": 6.0,
        "softirq": 7.0,
        "steal": 8.0,
    }
    assert stat.cpus_online == 1


def test_vm_host_real_copy() -> None:
    text = read("vm_host", "stat")
    stat = parse_proc_stat(text, 100)
    ticks = aggregate_ticks(text)
    assert [stat.seconds[m] for m in CPU_MODES] == [t / 100 for t in ticks]
    assert stat.cpus_online == len(per_cpu_lines(text))
    assert stat.cpus_online >= 1


def test_old_kernel_four_modes() -> None:
    # cpu  21357406 13622 5237611 306432870 (Linux 2.4: user nice system idle only)
    stat = parse_proc_stat(read("old_kernel", "stat"), 100)
    assert stat.seconds == {
        "user": 213574.06,
        "nice": 136.22,
        "system": 52376.11,
        "idle": 3064328.70,
        "iowait": 0.0,
        "irq": 0.0,
        "softirq": 0.0,
        "steal": 0.0,
    }
    assert stat.cpus_online == 2


def test_seven_mode_kernel_has_no_steal() -> None:
    # 2.6.0 .. 2.6.10 print seven modes (no steal).
    text = "cpu  10 20 30 40 50 60 70\ncpu0 5 10 15 20 25 30 35\ncpu1 5 10 15 20 25 30 35\n"
    stat = parse_proc_stat(text, 10)
    assert [stat.seconds[m] for m in CPU_MODES] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0]
    assert stat.cpus_online == 2


def test_hotplug_fixture_counts_online_cpus_only() -> None:
    text = read("hotplug", "stat")
    stat = parse_proc_stat(text, 100)
    assert stat.cpus_online == 32
    assert stat.seconds["iowait"] == 25436934 / 100


def test_malformed_names_the_file() -> None:
    path = FIXTURES / "malformed_stat" / "proc" / "stat"
    with pytest.raises(ParseError, match="malformed_stat/proc/stat"):
        parse_proc_stat(path.read_text(), 100, str(path))


def test_default_source_is_proc_stat() -> None:
    with pytest.raises(ParseError, match="/proc/stat"):
        parse_proc_stat(read("malformed_stat", "stat"), 100)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "   ",
        "intr 0\nctxt 1\n",  # no cpu lines at all
        "cpu0 1 2 3 4\n",  # no aggregate line
        "cpu  1 2 3 4\n",  # no per-CPU line
        "cpu  1 2 3\ncpu0 1 2 3\n",  # too few fields
        "cpu\ncpu0 1 2 3 4\n",
        "cpu  1 -2 3 4\ncpu0 1 0 3 4\n",  # negative
        "cpu  1 2 x 4\ncpu0 1 2 3 4\n",  # non-numeric
        "cpu  1.5 2 3 4\ncpu0 1 2 3 4\n",
        "cpu  1 2 3 4 5 6 7 0x8\ncpu0 1 2 3 4\n",
        "cpu  " + "9" * 400 + " 1 1 1\ncpu0 1 1 1 1\n",  # too big for a float
        "cpu  " + "9" * 5000 + " 1 1 1\ncpu0 1 1 1 1\n",  # too long for int()
    ],
)
def test_bad_stat_raises_parse_error(text: str) -> None:
    with pytest.raises(ParseError, match="/x/stat"):
        parse_proc_stat(text, 100, "/x/stat")


@pytest.mark.parametrize("user_hz", [0, -100])
def test_non_positive_user_hz(user_hz: int) -> None:
    with pytest.raises(ValueError, match="user_hz"):
        parse_proc_stat(read("normal_host", "stat"), user_hz)


_STAT_LINES = st.sampled_from(
    [
        "cpu  10 20 30 40 50 60 70 80 0 0",
        "cpu  1 2 3 4",
        "cpu0 1 2 3 4 5 6 7 8 0 0",
        "cpu17 9 9 9 9 9 9 9 9 0 0",
        "cpufreq 1 2 3",
        "cpu",
        " cpu1 1 2 3 4",
        "intr 123 0 0 1",
        "ctxt 99",
        "",
    ]
)


def _stat_by_lines(text: str, user_hz: int) -> tuple[list[float], int] | None:
    """What /proc/stat says, line by line: the last aggregate ``cpu`` line's first eight modes
    in seconds and the ``cpuN`` lines; None where the parser must refuse it."""
    lines = text.split("\n")
    heads = [line[3:].split(" ")[0] for line in lines if line.startswith("cpu")]
    online = sum(1 for head in heads if head.isdigit())
    aggregates = [line[4:] for line in lines if line.startswith("cpu ")]
    if not aggregates or online == 0:
        return None
    fields = aggregates[-1].split()[: len(CPU_MODES)]
    if len(fields) < 4:
        return None
    fields += ["0"] * (len(CPU_MODES) - len(fields))
    return [int(f) / user_hz for f in fields], online


@given(st.lists(_STAT_LINES, max_size=12))
@settings(max_examples=300, deadline=None)
def test_proc_stat_parse_agrees_with_reading_line_by_line(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    expected = _stat_by_lines(text, 100)
    if expected is None:
        with pytest.raises(ParseError):
            parse_proc_stat(text, 100)
        return
    stat = parse_proc_stat(text, 100)
    assert ([stat.seconds[m] for m in CPU_MODES], stat.cpus_online) == expected


# ---------------------------------------------------------------- parse_meminfo


def test_meminfo_normal_host_kb_to_bytes() -> None:
    # MemTotal: 527957964 kB, MemAvailable: 401285540 kB
    mem = parse_meminfo(read("normal_host", "meminfo"))
    assert mem.total_bytes == 527957964 * 1024
    assert mem.available_bytes == 401285540 * 1024


def test_meminfo_vm_host_real_copy() -> None:
    text = read("vm_host", "meminfo")
    kb = meminfo_kb(text)
    mem = parse_meminfo(text)
    assert mem.total_bytes == kb["MemTotal"] * 1024
    assert mem.available_bytes == kb["MemAvailable"] * 1024
    assert 0 < mem.available_bytes <= mem.total_bytes


def test_meminfo_old_kernel_estimates_available() -> None:
    # No MemAvailable (before 3.14): MemFree 412376 + Buffers 284732 + Cached 5832440 kB.
    text = read("old_kernel", "meminfo")
    assert "MemAvailable" not in text
    mem = parse_meminfo(text)
    assert mem.total_bytes == 8174508 * 1024
    assert mem.available_bytes == (412376 + 284732 + 5832440) * 1024


def test_meminfo_estimate_with_missing_parts_counts_them_as_zero() -> None:
    mem = parse_meminfo("MemTotal: 1000 kB\nMemFree: 300 kB\n")
    assert (mem.total_bytes, mem.available_bytes) == (1024000, 307200)


def test_meminfo_unitless_lines_do_not_disturb() -> None:
    text = "MemTotal: 2048 kB\nHugePages_Total:       7\nMemAvailable: 1024 kB\n"
    mem = parse_meminfo(text)
    assert (mem.total_bytes, mem.available_bytes) == (2048 * 1024, 1024 * 1024)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "MemFree: 100 kB\nMemAvailable: 50 kB\n",  # no MemTotal
        "MemTotal: lots kB\n",
        "MemTotal: 100 kB\nMemAvailable: 1e3 kB\n",
        f"MemTotal: {2**60} kB\n",  # bytes overflow the int64 column
        "MemTotal: 100 kB\nMemAvailable: -5 kB\n",
    ],
)
def test_bad_meminfo_raises_parse_error(text: str) -> None:
    with pytest.raises(ParseError, match="/x/meminfo"):
        parse_meminfo(text, "/x/meminfo")


def test_meminfo_lines_tally_does_not_use_are_not_checked() -> None:
    # Linux 2.4 opens /proc/meminfo with a byte table; other keys may hold anything.
    text = (
        "        total:    used:    free:  shared: buffers:  cached:\n"
        "Mem:  1055760384 1041887232 13873152 0 100417536 711233536\n"
        "MemTotal:      1031016 kB\nMemFree:         13548 kB\nBuffers:         98064 kB\n"
        "Cached:         694564 kB\nWeird: n/a\n"
    )
    mem = parse_meminfo(text)
    assert mem.total_bytes == 1031016 * 1024
    assert mem.available_bytes == (13548 + 98064 + 694564) * 1024


def test_meminfo_default_source() -> None:
    with pytest.raises(ParseError, match="/proc/meminfo"):
        parse_meminfo("MemFree: 1 kB\n")


# ---------------------------------------------------------------- RAPL helpers


def test_parse_microjoules_fixture() -> None:
    path = FIXTURES / "normal_host/sys/class/powercap/intel-rapl:0/energy_uj"
    assert parse_microjoules(path.read_text(), str(path)) == 143857630215
    assert parse_microjoules(" 0 \n", "z") == 0


@pytest.mark.parametrize("text", ["", "\n", "-1", "12.5", "0x10", "1e6", "12 34", "²", "9" * 5000])
def test_parse_microjoules_rejects(text: str) -> None:
    with pytest.raises(ParseError, match="/x/energy_uj"):
        parse_microjoules(text, "/x/energy_uj")


MAX_RANGE = 262143328850


@pytest.mark.parametrize(
    ("previous", "current", "max_range", "expected"),
    [
        (100, 250, 1000, 150),
        (250, 250, 1000, 0),
        (100, 250, 0, 150),
        (900, 100, 1000, 200),  # wrapped: 100 to the top, 100 after
        (MAX_RANGE - 1_000_000, 5_000_000, MAX_RANGE, 6_000_000),
        (900, 100, 0, 100),  # no range known: count from zero
        (900, 100, 900, 100),  # range not above the old reading: unusable
        (900, 100, 500, 100),
    ],
)
def test_wrap_delta(previous: int, current: int, max_range: int, expected: int) -> None:
    assert wrap_delta(previous, current, max_range) == expected


def test_package_zones_fixture_excludes_core_and_psys() -> None:
    zones = package_zones(FIXTURES / "normal_host" / "sys")
    assert [z.name for z in zones] == ["intel-rapl:0", "intel-rapl:1"]
    assert [(z / "name").read_text().strip() for z in zones] == ["package-0", "package-1"]


def test_package_zones_sorted_and_filtered(tmp_path: Path) -> None:
    root = tmp_path / "class" / "powercap"
    # created out of order on purpose
    for zone, name in [
        ("intel-rapl:1", "package-1"),
        ("intel-rapl:1:0", "package-1"),  # a sub-zone is never a package, whatever its name
        ("intel-rapl-mmio:0", "package-0"),  # MMIO duplicate of package-0 on client parts
        ("intel-rapl:0", "package-0"),
        ("intel-rapl:2", "psys"),
        ("intel-rapl:0:1", "dram"),
    ]:
        (root / zone).mkdir(parents=True)
        (root / zone / "name").write_text(name + "\n")
    (root / "intel-rapl:3").mkdir()  # no name file: skipped
    (root / "intel-rapl").mkdir()  # the control type itself
    zones = package_zones(tmp_path)
    assert zones == [root / "intel-rapl:0", root / "intel-rapl:1"]


def test_package_zones_absent(tmp_path: Path) -> None:
    assert package_zones(tmp_path) == []
    assert package_zones(tmp_path / "does-not-exist") == []


# ---------------------------------------------------------------- fuzz

_token = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**400).map(str),
    st.sampled_from(["", "x", "-", "²", "٣", "1_0", "+5", "0x1", "nan", "\t", "9" * 5000]),
    st.text(max_size=8),
)
_stat_line = st.builds(
    lambda head, toks: head + " " + " ".join(toks),
    st.sampled_from(["cpu", "cpu ", "cpu0", "cpu12", "cpu²", "cpux", "intr", "ctxt", ""]),
    st.lists(_token, max_size=11),
)
_stat_text = st.one_of(
    st.text(), st.lists(st.one_of(_stat_line, st.text()), max_size=8).map("\n".join)
)

_mem_line = st.builds(
    lambda key, tok, unit: f"{key}:{tok}{unit}",
    st.sampled_from(["MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "X", ""]),
    st.one_of(st.just(" "), _token.map(lambda t: " " + t)),
    st.sampled_from(["", " kB", " MB", " kB kB"]),
)
_mem_text = st.one_of(
    st.text(), st.lists(st.one_of(_mem_line, st.text()), max_size=8).map("\n".join)
)


@settings(max_examples=300, deadline=None)
@given(text=_stat_text, user_hz=st.integers(min_value=1, max_value=10**6))
@example(text="cpu  " + "9" * 400 + " 1 1 1\ncpu0 1", user_hz=100)
@example(text="cpu  1 2 3 4\ncpu٣ 1", user_hz=100)
def test_fuzz_proc_stat(text: str, user_hz: int) -> None:
    try:
        stat = parse_proc_stat(text, user_hz)
    except ParseError:
        return
    assert stat.cpus_online >= 1
    assert set(stat.seconds) == set(CPU_MODES)
    assert all(math.isfinite(v) and v >= 0 for v in stat.seconds.values())


@settings(max_examples=300, deadline=None)
@given(text=_mem_text)
@example(text=f"MemTotal: {2**70} kB")
@example(text="MemTotal: 1 kB\nMemAvailable: -1 kB")
def test_fuzz_meminfo(text: str) -> None:
    try:
        mem = parse_meminfo(text)
    except ParseError:
        return
    assert 0 <= mem.total_bytes <= INT64_MAX
    assert 0 <= mem.available_bytes <= INT64_MAX


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), _token, st.integers(min_value=0).map(lambda n: f" {n}\n")))
@example(text="²")
@example(text="9" * 5000)
def test_fuzz_microjoules(text: str) -> None:
    try:
        value = parse_microjoules(text, "/x/energy_uj")
    except ParseError:
        return
    assert value >= 0
    assert value == int(text.strip())
