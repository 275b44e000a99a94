"""Bad stored data: every kind of damaged or foreign file is set aside, counted and reported, and
the bill and the replay of the remaining files do not change. Fuzzed inventory and windows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.billing.inventory import parse_inventory
from telemetry.config import parse_window
from telemetry.errors import TallyError
from tests.support.cli import tally
from tests.support.promtool import promtool_check
from tests.support.tables import cpu_table, gpu_table, job_table, write_dataset

INVENTORY = """
currency = "EUR"
[[pool]]
name = "gpus"
kind = "gpu"
ownership = "leased"
nodes = ["n*"]
cost_per_unit_hour = 2.0
price_per_unit_hour = 3.0
"""


def _damage(part: Path, good: Path) -> list[str]:
    """Write one file of each bad kind next to ``good``; returns their names."""
    data = good.read_bytes()
    (part / "zero.parquet").write_bytes(b"")
    (part / "truncated.parquet").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    for i in range(len(flipped) // 3, len(flipped) // 3 + 64):
        flipped[i] ^= 0xFF
    (part / "bitflip.parquet").write_bytes(bytes(flipped))
    (part / "foreign.parquet").write_bytes(b"<html>not a parquet file</html>")
    table = pq.read_table(good)
    retyped = table.set_column(
        table.schema.get_field_index("gpu_index"), "gpu_index", pa.array(["zero"] * table.num_rows)
    )
    pq.write_table(retyped, part / "wrong-type.parquet")
    node = table.column("node").combine_chunks()
    invalid = pa.Array.from_buffers(pa.string(), len(node), node.buffers())  # same bytes...
    raw = bytearray(invalid.buffers()[2].to_pybytes())
    raw[0] = 0xFF  # ...with the first byte made invalid UTF-8
    broken = pa.Array.from_buffers(
        pa.string(), len(node), [None, node.buffers()[1], pa.py_buffer(bytes(raw))]
    )
    pq.write_table(
        table.set_column(table.schema.get_field_index("node"), "node", broken),
        part / "bad-utf8.parquet",
    )
    return [
        "bad-utf8.parquet",
        "bitflip.parquet",
        "foreign.parquet",
        "truncated.parquet",
        "wrong-type.parquet",
        "zero.parquet",
    ]


def test_bill_of_the_remaining_files_is_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    times = [float(t) for t in range(0, 7200, 30)]
    good = write_dataset(root, "gpu", gpu_table("n1", "GPU-1", 0, times, util=0.7, job_id="9"))
    write_dataset(root, "job", job_table("n1", "9", times))
    write_dataset(root, "cpu", cpu_table("n1", times))
    inv = tmp_path / "inv.toml"
    inv.write_text(INVENTORY)
    before = tally("bill", str(root), "--inventory", str(inv))
    assert before.returncode == 0, before.stderr
    bad = _damage(good.parent, good)
    after = tally("bill", str(root), "--inventory", str(inv))
    assert after.returncode == 0, after.stderr
    a, b = json.loads(before.stdout), json.loads(after.stdout)
    assert {k: v for k, v in a.items() if k != "input"} == {
        k: v for k, v in b.items() if k != "input"
    }
    moved = sorted(p.name for p in (root / "quarantine").rglob("*.parquet"))
    # Every damaged file is set aside, except a bit flip that happens to leave the file readable
    # (then its rows are exact duplicates of the good file's and count once).
    assert set(moved) >= set(bad) - {"bitflip.parquet"}
    assert b["input"]["files_quarantined"] == len(moved)
    assert b["input"]["files"] == a["input"]["files"] + (len(bad) - len(moved))


def test_replay_skips_and_reports_bad_files(tmp_path: Path, promtool: str) -> None:
    root = tmp_path / "ds"
    times = [float(t) for t in range(0, 600, 30)]
    good = write_dataset(root, "gpu", gpu_table("n1", "GPU-1", 0, times, util=0.7, job_id="9"))
    clean = tally("replay", str(root), "--once")
    _damage(good.parent, good)
    result = tally("replay", str(root), "--once")
    assert result.returncode == 0, result.stderr
    assert "quarantined" in result.stderr and "skipped" in result.stderr
    assert promtool_check(promtool, result.stdout.encode()).returncode == 0
    strip = lambda text: [line for line in text.splitlines() if "tally_samples_" not in line]  # noqa: E731
    assert strip(result.stdout) == strip(clean.stdout)


def test_hostile_labels_through_replay(tmp_path: Path, promtool: str) -> None:
    hostile = 'x"}\n# HELP tally_cpus fake\ntally_cpus{node="evil"} 1\\'
    times = [0.0, 30.0, 60.0]
    write_dataset(
        tmp_path,
        "job",
        job_table(
            "n1",
            hostile,
            times,
            user=hostile,
            account=hostile + "\udcff".encode("utf-8", "replace").decode(),
        ),
    )
    write_dataset(
        tmp_path, "gpu", gpu_table("n1", "GPU-" + hostile, 0, times, job_id=hostile, model=hostile)
    )
    result = tally("replay", str(tmp_path), "--once")
    assert result.returncode == 0, result.stderr
    assert promtool_check(promtool, result.stdout.encode()).returncode == 0
    assert 'tally_cpus{node="evil"}' not in result.stdout.replace("\\n", "")
    series = [line for line in result.stdout.splitlines() if line.startswith("tally_job_info")]
    assert len(series) == 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_fuzzed_inventory_text_raises_only_tally_error(text: str) -> None:
    try:
        parse_inventory(text, "fuzz.toml")
    except TallyError as exc:
        assert str(exc).startswith("inventory fuzz.toml")


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "name": st.one_of(st.text(max_size=8), st.integers(), st.none()),
            "kind": st.sampled_from(["gpu", "cpu", "tpu", 1]),
            "ownership": st.sampled_from(["own", "leased", "x"]),
            "nodes": st.one_of(
                st.lists(st.text(max_size=5), max_size=3), st.text(max_size=5), st.integers()
            ),
            "cost_per_unit_hour": st.one_of(
                st.floats(allow_nan=True), st.integers(-5, 5), st.text(max_size=3)
            ),
            "price_per_unit_hour": st.one_of(
                st.floats(allow_nan=True), st.integers(-5, 5), st.booleans()
            ),
        }
    )
)
def test_fuzzed_inventory_pools_raise_only_tally_error(pool: dict[str, object]) -> None:
    def toml(value: object) -> str:
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        if isinstance(value, list):
            return "[" + ", ".join(toml(v) for v in value) + "]"
        return repr(value)

    body = "".join(f"{k} = {toml(v)}\n" for k, v in pool.items() if v is not None)
    try:
        inv = parse_inventory("[[pool]]\n" + body, "fuzz.toml")
    except TallyError:
        return
    (only,) = inv.pools
    assert only.cost_per_unit_hour >= 0 and only.price_per_unit_hour >= 0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_fuzzed_windows_raise_only_tally_error(text: str) -> None:
    try:
        seconds = parse_window(text)
    except TallyError:
        return
    assert seconds >= 60 and isinstance(seconds, int)


@pytest.mark.parametrize("text", ["15m", "1h", "1d", "7d", "60", "90s", "2w"])
def test_windows_people_write(text: str) -> None:
    assert parse_window(text) in {900, 3600, 86400, 604800, 60, 90, 1209600}


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(
            st.sampled_from(
                [
                    "usage_usec",
                    "user_usec 5",
                    "usage_usec 12",
                    "usage_usec -1",
                    "usage_usec 1e9",
                    " ",
                    "nr_periods 0",
                ]
            ),
            max_size=6,
        ).map("\n".join),
    )
)
def test_fuzzed_cgroup_counter_files_raise_only_parse_error(text: str) -> None:
    from telemetry.collectors.slurm import parse_counter, parse_cpu_stat_usage_usec
    from telemetry.errors import ParseError

    for parse in (
        lambda t: parse_cpu_stat_usage_usec(t, "cpu.stat"),
        lambda t: parse_counter(t, "memory.current"),
    ):
        try:
            value = parse(text)
        except ParseError:
            continue
        assert isinstance(value, int) and value >= 0
