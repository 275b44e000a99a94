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
    pq.write_table(table.drop_columns(["gpu_uuid"]), part / "lacks-a-column.parquet")
    pq.write_table(pa.table({"a": [1, 2, 3]}), part / "someone-elses.parquet")
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
        "lacks-a-column.parquet",
        "someone-elses.parquet",
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


# ------------------------------------------------------------ values outside their valid range
RANGE_INVENTORY = (
    INVENTORY
    + """
[[pool]]
name = "cores"
kind = "cpu"
ownership = "own"
nodes = ["n*"]
cost_per_unit_hour = 0.01
price_per_unit_hour = 0.03
"""
)
# The numeric columns a bill reads (the rest never reaches it).
NUMERIC = {
    "gpu": ["utilization_ratio", "power_watts", "energy_joules"],
    "cpu": ["cpus", "user_seconds", "system_seconds", "softirq_seconds", "energy_joules"],
    "job": ["cpus_allocated", "gpus_allocated", "cpu_seconds"],
}
HOSTILE_FLOATS = st.one_of(
    st.sampled_from([3e38, 1e20, -1.0, -1e-9, 18.5, 1.5, float("inf"), float("-inf")]),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
)


def _three_tables(times: list[float]) -> dict[str, pa.Table]:
    return {
        "gpu": gpu_table("n1", "GPU-1", 0, times, util=0.7, job_id="9"),
        "cpu": cpu_table("n1", times),
        "job": job_table("n1", "9", times),
    }


def _put(table: pa.Table, column: str, row: int, value: float) -> pa.Table:
    field = table.schema.field(column)
    values = table.column(column).to_pylist()
    if pa.types.is_integer(field.type):
        if not math.isfinite(value) or abs(value) >= 2**31:
            value = -1  # an int column cannot hold it; a negative count is the hostile case
        values[row] = int(value)
    else:
        values[row] = value
    return table.set_column(
        table.schema.get_field_index(column), field, pa.array(values, field.type)
    )


def _figures(bill: dict[str, object]) -> list[tuple[str, float]]:
    out = []
    for kind in ("pools", "tenants", "jobs"):
        for row in bill[kind]:  # type: ignore[attr-defined]
            for key, value in row.items():
                if isinstance(value, float) and key != "gross_margin_ratio":
                    out.append((f"{kind}.{key}", value))
    return out


@settings(max_examples=30, deadline=None)
@given(
    table=st.sampled_from(sorted(NUMERIC)),
    data=st.data(),
    value=HOSTILE_FLOATS,
)
def test_no_value_in_any_numeric_column_makes_a_bill_figure_negative_or_infinite(
    table: str, data: st.DataObject, value: float
) -> None:
    import tempfile

    from telemetry.billing.bill import compute_bill
    from telemetry.billing.writers import to_json

    column = data.draw(st.sampled_from(NUMERIC[table]))
    row = data.draw(st.integers(0, 19))
    times = [float(t) for t in range(0, 600, 30)]
    tables = _three_tables(times)
    tables[table] = _put(tables[table], column, row, value)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, t in tables.items():
            write_dataset(root, name, t)
        bill = compute_bill(root, parse_inventory(RANGE_INVENTORY), 3600, warn=lambda _: None)
    doc = json.loads(to_json(bill))
    for name, figure in _figures(doc):
        assert math.isfinite(figure) and figure >= 0, (name, figure, table, column, value)
    stored = tables[table].column(column)[row].as_py()  # as the column's type holds it
    high = UPPER.get(column, 1e12)
    outside = not (math.isfinite(stored) and 0 <= stored <= high)
    assert (doc["input"]["rows_out_of_range"].get(f"{table}.{column}") == 1) == outside


# The valid ranges, restated from SPEC §2's units (ratios 0–1 with a small tolerance,
# non-negative finite counters and allocations, bounded so int64 sums cannot overflow).
UPPER = {
    "utilization_ratio": 1.01,
    "sm_active_ratio": 1.01,
    "power_watts": 1e5,
    "energy_joules": 1e15,
    "cpus": 1e6,
    "cpus_allocated": 1e6,
    "gpus_allocated": 1e6,
}


def _bill_json(root: Path, **kw: object) -> dict[str, object]:
    from telemetry.billing.bill import compute_bill
    from telemetry.billing.writers import to_json

    bill = compute_bill(root, parse_inventory(RANGE_INVENTORY), 3600, warn=lambda _: None, **kw)  # type: ignore[arg-type]
    return json.loads(to_json(bill))  # type: ignore[no-any-return]


def _without_input(bill: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in bill.items() if k != "input"}


def test_the_reported_hostile_values_are_left_out_counted_and_said(tmp_path: Path) -> None:
    """Each of these exited 0 with a wrong bill (busy −2.56e9 h, negative revenue …)."""
    times = [float(t) for t in range(0, 1800, 30)]
    clean, hostile = tmp_path / "clean", tmp_path / "hostile"
    for name, table in _three_tables(times).items():
        write_dataset(clean, name, table)
        write_dataset(hostile, name, table)
    extra = [float(t) + 1 for t in range(30, 240, 30)]  # 7 rows between the good ones
    gpu = gpu_table("n1", "GPU-1", 0, extra, util=0.7, job_id="9")
    for row, (column, value) in enumerate(
        [("utilization_ratio", 3e38), ("energy_joules", 1e20), ("power_watts", -5.0),
         ("utilization_ratio", 18.5), ("energy_joules", float("inf"))]
    ):  # fmt: skip
        gpu = _put(gpu, column, row, value)
    write_dataset(hostile, "gpu", gpu.slice(0, 5), name="bad-values")
    job = _put(job_table("n1", "9", extra[:2]), "gpus_allocated", 0, float("inf"))
    job = _put(job, "cpus_allocated", 1, -4.0)
    write_dataset(hostile, "job", job, name="bad-alloc")
    write_dataset(hostile, "cpu", _put(cpu_table("n1", extra[:1]), "cpus", 0, -8), name="bad-cpus")
    ancient = gpu_table("n1", "GPU-1", 0, [0.0], util=0.7, job_id="9")
    stamp = pa.array([-(2**63) + 10], pa.timestamp("ns", tz="UTC"))  # a wrapped Δt before
    ancient = ancient.set_column(0, ancient.schema.field("time"), stamp)
    write_dataset(hostile, "gpu", ancient, name="bad-time")
    expected = _bill_json(clean)
    got = _bill_json(hostile)
    assert _without_input(got) == _without_input(expected), "the same bill as without those rows"
    assert got["input"]["rows_out_of_range"] == {  # type: ignore[index]
        "cpu.cpus": 1,
        "gpu.energy_joules": 2,
        "gpu.power_watts": 1,
        "gpu.time": 1,
        "gpu.utilization_ratio": 2,
        "job.cpus_allocated": 1,
        "job.gpus_allocated": 1,
    }
    inventory = tmp_path / "inv.toml"
    inventory.write_text(RANGE_INVENTORY)
    said = tally("bill", str(hostile), "--inventory", str(inventory))
    assert said.returncode == 0 and "outside its valid range" in said.stderr
    assert "gpu.utilization_ratio 2" in said.stderr


def test_an_outlier_timestamp_changes_nothing_but_its_count(tmp_path: Path) -> None:
    """A row dated 1970 or 2200 in a good file: no window in 1970 or 2200, no gap hours from it,
    and the chunks are not stretched over the centuries (it took 2.67 GiB instead of 1.13)."""
    times = [float(t) for t in range(0, 3600, 30)]
    clean, stray = tmp_path / "clean", tmp_path / "stray"
    for name, table in _three_tables(times).items():
        write_dataset(clean, name, table)
        write_dataset(stray, name, table)
    odd = gpu_table("n1", "GPU-1", 0, [0.0, 1.0], util=0.7, job_id="9")
    odd = odd.set_column(
        0, "time", pa.array([0, 7_258_118_400 * 10**9], pa.timestamp("ns", tz="UTC"))
    )
    good = gpu_table("n1", "GPU-1", 0, times, util=0.7, job_id="9")
    odd = odd.cast(good.schema)
    pq.write_table(pa.concat_tables([odd.slice(0, 1), good, odd.slice(1, 1)]),  # one file, in it
                   next((stray / "gpu").rglob("*.parquet")))  # fmt: skip
    seen: list[int] = []  # rows read so far, after each chunk
    got = _bill_json(stray, budget_rows=50, progress=lambda i, n, rows: seen.append(rows))
    assert _without_input(got) == _without_input(_bill_json(clean))
    assert got["input"]["rows_out_of_range"] == {"gpu.time": 2}  # type: ignore[index]
    assert {p["window_start"][:4] for p in got["pools"]} == {"2026"}  # type: ignore[attr-defined]
    per_chunk = [b - a for a, b in zip([0, *seen], seen, strict=False)]
    assert max(per_chunk) <= 150, f"chunks span the real hour, not 230 years: {per_chunk}"


def test_times_past_2262_and_at_int64_max_are_set_aside_not_a_traceback(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    table = cpu_table("n1", [0.0, 30.0, 60.0])
    path = write_dataset(root, "cpu", table)
    ms = pa.timestamp("ms", tz="UTC")
    far = table.set_column(
        0, pa.field("time", ms), pa.array([10**16, 2**63 - 1, 1_788_220_800_000], ms)
    )  # year 318857 and beyond in milliseconds: nanoseconds cannot hold them
    pq.write_table(far, path.with_name("ms.parquet"))
    edge = table.set_column(
        0,
        table.schema.field("time"),
        pa.array([2**63 - 1], pa.timestamp("ns", tz="UTC")).take(pa.array([0, 0, 0])),
    )
    pq.write_table(edge.slice(0, 1), path.with_name("max.parquet"))
    inventory = tmp_path / "inv.toml"
    inventory.write_text(RANGE_INVENTORY)
    result = tally("bill", str(root), "--inventory", str(inventory))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    bill = json.loads(result.stdout)
    assert bill["input"]["files_quarantined"] == 1  # the ms file: out of bounds as nanoseconds
    assert bill["input"]["rows_out_of_range"] == {"cpu.time": 1}  # INT64_MAX
