"""``tally aggregate``: following a growing dataset gives exactly the bill of the final dataset.

The node side is the real store (journals flushed round by round, hourly compaction to
Parquet); the expected totals come from the bill engine run once over the finished dataset,
and the trailing ratios from ``tally bill --window 1m`` over the same minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from telemetry.billing.aggregate import AggregateSnapshot, Aggregator
from telemetry.billing.bill import compute_bill
from telemetry.billing.engine import LIVE_WINDOW_SECONDS, Biller
from telemetry.billing.inventory import parse_inventory
from telemetry.demo import generate_demo
from telemetry.store.dataset import scan
from telemetry.store.layout import partition_dir
from telemetry.store.writer import Store
from tests.support.net import free_port
from tests.support.promtool import promtool_check
from tests.support.units import NS


def _sample(tmp_path: Path, hours: float = 2.0, declared: bool = True) -> tuple[Path, Path]:
    """The demo dataset; without ``declared`` its inventory's pools declare no capacity."""
    source = tmp_path / "source"
    generate_demo(source, nodes=3, hours=hours)
    inventory = source / "inventory.toml"
    if not declared:
        lines = inventory.read_text().splitlines()
        inventory.write_text("\n".join(x for x in lines if not x.startswith("capacity_units")))
    return source, inventory


def _rounds(source: Path) -> list[tuple[int, str, str, pa.Table]]:
    """Every (time, node, table) round of the sample, in time order, as a daemon writes them."""
    out = []
    for table in ("gpu", "cpu", "job"):
        for path in sorted((source / table).rglob("*.parquet")):
            data = pq.read_table(path)
            times = data.column("time").cast(pa.int64()).to_numpy()
            for t in np.unique(times):
                rows = data.filter(pa.array(times == t))
                out.append((int(t), str(rows.column("node")[0]), table, rows))
    out.sort(key=lambda r: (r[0], r[1], r[2]))
    return out


def _expected(root: Path, inventory_text: str) -> object:
    """All-time totals of the finished dataset, as ``tally bill`` reads it (chunked, once)."""
    consumers, _ = scan(
        root, lambda: [Biller(parse_inventory(inventory_text), LIVE_WINDOW_SECONDS)]
    )
    biller = consumers[0]
    assert isinstance(biller, Biller)
    return biller.live_totals()


def test_following_journals_and_compaction_equals_the_bill_of_the_end_state(
    tmp_path: Path,
) -> None:
    source, inventory_path = _sample(tmp_path)
    inventory_text = inventory_path.read_text()
    root = tmp_path / "cluster"
    stores: dict[str, Store] = {}
    aggregator = Aggregator(root, parse_inventory(inventory_text))
    rounds = _rounds(source)
    polls = 0
    for i, (_, node, table, rows) in enumerate(rounds):
        store = stores.get(node)
        if store is None:
            # 20-minute "hours": compaction happens many times while the aggregator follows.
            store = stores[node] = Store(root, node, rotate_seconds=1200)
            store.open()
        store.append(table, rows)
        if i % 61 == 0:
            aggregator.poll()
            polls += 1
    for store in stores.values():
        store.close()
    aggregator.poll()
    assert polls > 10
    assert not list(root.rglob("*.arrows")), "every journal was compacted"
    assert aggregator.live_totals() == _expected(root, inventory_text)
    assert aggregator.totals.late == 0 and aggregator.totals.duplicates == 0
    # Nothing new: a further poll reads nothing and changes nothing.
    assert aggregator.poll() == 0
    assert aggregator.live_totals() == _expected(root, inventory_text)


def test_trailing_ratios_match_minute_bills(tmp_path: Path) -> None:
    source, inventory_path = _sample(tmp_path, hours=2.0)
    aggregator = Aggregator(source, parse_inventory(inventory_path.read_text()))
    aggregator.poll()
    ratios = {(r[0], r[2]): r[3:] for r in aggregator.ratios().rows}
    bill = compute_bill(source, parse_inventory(inventory_path.read_text()), 60)
    newest = aggregator.stats.newest_ns
    assert newest is not None
    current = newest // (60 * NS)
    for label, minutes in (("1m", 1), ("5m", 5), ("1h", 60)):
        first = (current - minutes) * 60
        for pool in ("h100-own", "h100-leased", "cpu"):
            rows = [
                p for p in bill.pools
                if p["pool"] == pool
                and first <= _epoch(p["window_start"]) < current * 60
            ]  # fmt: skip
            capacity = sum(p["capacity_unit_hours"] for p in rows)
            allocated = sum(p["allocated_unit_hours"] for p in rows)
            busy = sum(p["busy_unit_hours"] for p in rows)
            got_allocation, got_busy = ratios[(pool, label)]
            assert got_allocation == pytest.approx(allocated / capacity, rel=1e-9)
            assert got_busy == pytest.approx(busy / capacity, rel=1e-9)


def test_a_file_caught_mid_copy_is_read_once_whole_not_quarantined(tmp_path: Path) -> None:
    source, inventory_path = _sample(tmp_path, hours=1.0)
    aggregator = Aggregator(source, parse_inventory(inventory_path.read_text()))
    aggregator.poll()
    whole = next((source / "cpu").rglob("*.parquet"))
    later = pq.read_table(whole)
    later = later.set_column(
        0, "time", pc.add(later.column("time"), pa.scalar(3600 * NS, pa.duration("ns")))
    )
    copy = tmp_path / "copy.parquet"
    pq.write_table(later, copy)
    target = whole.parent / "part-copied.parquet"
    data = copy.read_bytes()
    target.write_bytes(data[: len(data) // 3])  # the copy has written a third so far
    aggregator.poll()
    assert aggregator.stats.files_quarantined == 0 and target.exists()
    target.write_bytes(data)  # the copy finished
    rows = aggregator.poll()
    assert rows == later.num_rows and aggregator.stats.files_quarantined == 0
    assert not (source / "quarantine").exists()


def test_files_that_cannot_be_moved_and_garbage_journals_are_counted(tmp_path: Path) -> None:
    """SPEC §7: set aside and counted, whether moved to quarantine/ or not."""
    source, inventory_path = _sample(tmp_path, hours=0.5)
    part = next((source / "gpu").rglob("*.parquet")).parent
    (part / "torn.parquet").write_bytes(b"PAR1" + os.urandom(64))
    (part / "garbage.arrows").write_bytes(b"\x00garbage, not an Arrow stream")
    (source / "quarantine").write_text("a file where the quarantine directory would go")
    result = subprocess.run(
        [sys.executable, "-m", "telemetry.cli", "bill", str(source), "--inventory",
         str(inventory_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["input"]["files_quarantined"] == 2
    assert "garbage.arrows" in result.stderr and "torn.parquet" in result.stderr
    assert (part / "torn.parquet").exists()  # could not be moved: left, but counted


def _epoch(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def test_late_rows_are_dropped_and_counted_and_a_torn_file_quarantined(tmp_path: Path) -> None:
    source, inventory_path = _sample(tmp_path, hours=1.0)
    aggregator = Aggregator(source, parse_inventory(inventory_path.read_text()))
    aggregator.poll()
    before = aggregator.live_totals()
    # An old hour of node gpu-a01 turns up after newer rows were billed.
    old = pq.read_table(next((source / "gpu").rglob("*.parquet"))).slice(0, 40)
    directory = partition_dir(source, "gpu", 0, "gpu-a01")
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(old, directory / "part-19700101T000000Z-late.parquet")
    (directory / "part-19700101T000000Z-torn.parquet").write_bytes(b"PAR1" + os.urandom(64))
    aggregator.poll()
    assert aggregator.totals.late + aggregator.totals.duplicates == 40
    assert aggregator.stats.files_quarantined == 0, "it may still be being copied in"
    aggregator.poll()  # unchanged and still unreadable a poll later: set aside
    assert aggregator.stats.files_quarantined == 1
    assert list((source / "quarantine").rglob("*torn.parquet"))
    assert aggregator.live_totals() == before
    snapshot = AggregateSnapshot.of(aggregator)
    assert snapshot.rows_dropped["late"] + snapshot.rows_dropped["duplicate"] == 40


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read()
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _start(root: Path, inventory: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "telemetry.cli", "aggregate", str(root), "--inventory",
         str(inventory), "--listen", f"127.0.0.1:{port}", "--poll", "0.2"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            _scrape(port)
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("aggregator did not serve")


@pytest.mark.e2e
def test_restart_after_kill_neither_doubles_nor_resets(tmp_path: Path, promtool: str) -> None:
    source, inventory = _sample(tmp_path, hours=1.0)
    bill = compute_bill(source, parse_inventory(inventory.read_text()), 86400)
    port = free_port()
    proc = _start(source, inventory, port)
    try:
        first = _scrape(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            checked = promtool_check(promtool, response.read())
        assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    proc = _start(source, inventory, port)
    try:
        second = _scrape(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    counters = {k: v for k, v in first.items() if k[0].startswith(("tally_pool_", "tally_tenant"))}
    assert counters and all(second[k] == v for k, v in counters.items())
    for pool in bill.pools:
        key = ("tally_pool_capacity_unit_seconds_total",
               (("kind", pool["kind"]), ("pool", pool["pool"])))  # fmt: skip
        assert second[key] == pytest.approx(pool["capacity_unit_hours"] * 3600, rel=1e-12)
    assert json.dumps(sorted(second)) == json.dumps(sorted(first))


def test_errors_are_one_line(tmp_path: Path) -> None:
    source, inventory = _sample(tmp_path, hours=0.2)
    for args, message in (
        ([str(tmp_path / "none"), "--inventory", str(inventory)], "does not exist"),
        ([str(source), "--inventory", str(tmp_path / "x.toml")], "x.toml"),
        ([str(source), "--inventory", str(inventory), "--listen", "nowhere"], "ADDR:PORT"),
        ([str(source), "--inventory", str(inventory), "--poll", "soon"], "poll"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "telemetry.cli", "aggregate", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_row_from_the_future_leaves_the_ratios_and_counters_alone(tmp_path: Path) -> None:
    """A row dated 2200 made the newest sample 2200, which emptied every trailing ratio
    cluster-wide; an energy of 1e20 J turned counters backwards. Both are left out, counted."""
    source, inventory_path = _sample(tmp_path, hours=1.0)
    aggregator = Aggregator(source, parse_inventory(inventory_path.read_text()))
    aggregator.poll()
    newest, ratios = aggregator.stats.newest_ns, aggregator.ratios().rows
    before = aggregator.live_totals()
    assert ratios
    odd = pq.read_table(next((source / "gpu").rglob("*.parquet"))).slice(0, 2)
    future = pa.array([7_258_118_400 * NS, int(newest or 0) + 1], pa.timestamp("ns", tz="UTC"))
    odd = odd.set_column(0, odd.schema.field("time"), future)
    energy = odd.schema.get_field_index("energy_joules")
    odd = odd.set_column(energy, odd.schema.field(energy), pa.array([1.0, 1e20]))
    pq.write_table(odd, next((source / "gpu").rglob("*.parquet")).with_name("odd.parquet"))
    aggregator.poll()
    assert aggregator.stats.newest_ns == newest and aggregator.ratios().rows == ratios
    assert aggregator.live_totals() == before
    assert AggregateSnapshot.of(aggregator).rows_dropped["out_of_range"] == 2


def test_counters_never_go_down_when_old_files_are_removed(tmp_path: Path) -> None:
    """Retention deleted old partitions, the aggregator restarted, and the charge went from
    425.21 to 342.27: Prometheus read a reset and increase() counted 342 again."""
    source, inventory_path = _sample(tmp_path, hours=1.0)
    inventory = parse_inventory(inventory_path.read_text())
    checkpoint = tmp_path / "state" / "checkpoint.json"
    first = Aggregator(source, inventory, checkpoint=checkpoint)
    first.poll()
    before = first.live_totals()
    assert checkpoint.is_file()
    for path in (source / "gpu").rglob("*.parquet"):  # retention takes one node's files
        if "gpu-a01" in str(path):
            path.unlink()
    bare = Aggregator(source, inventory)
    bare.poll()
    assert bare.live_totals().pools < before.pools, "without the checkpoint they go down"
    restarted = Aggregator(source, inventory, checkpoint=checkpoint)
    restarted.poll()
    after = restarted.live_totals()
    assert after == before, "the same totals, not a reset"
    # and the counters go on growing from there as new rows arrive
    newer = pq.read_table(next((source / "cpu").rglob("*.parquet")))
    hour = pa.scalar(3600 * NS, pa.duration("ns"))
    newer = newer.set_column(0, newer.schema.field("time"), pc.add(newer.column("time"), hour))
    pq.write_table(newer, next((source / "cpu").rglob("*.parquet")).with_name("later.parquet"))
    restarted.poll()
    grown = restarted.live_totals()
    assert all(g[2] >= b[2] for g, b in zip(grown.pools, before.pools, strict=True))
    assert any(g[2] > b[2] for g, b in zip(grown.pools, before.pools, strict=True))


def test_rows_that_arrive_while_down_are_not_absorbed_by_the_checkpoint(tmp_path: Path) -> None:
    """Retention removed old files and new rows arrived while the aggregator was down: the
    carried amount is what the checkpoint's own files lost, so the new rows still count."""
    # monitored capacity: what the remaining files hold is what they show
    source, inventory_path = _sample(tmp_path, hours=1.0, declared=False)
    inventory = parse_inventory(inventory_path.read_text())
    checkpoint = tmp_path / "checkpoint.json"
    first = Aggregator(source, inventory, checkpoint=checkpoint)
    first.poll()
    before = {p[:2]: p[2] for p in first.live_totals().pools}
    hour = pa.scalar(3600 * NS, pa.duration("ns"))
    for path in sorted((source / "cpu").rglob("*.parquet")):
        newer = pq.read_table(path)
        newer = newer.set_column(0, newer.schema.field("time"), pc.add(newer.column("time"), hour))
        pq.write_table(newer, path.with_name("next-hour.parquet"))
    for path in (source / "cpu").rglob("*.parquet"):  # retention: one node's first hour goes
        if "gpu-a01" in str(path) and path.name != "next-hour.parquet":
            path.unlink()
    truth = Aggregator(source, inventory)  # what the remaining files hold
    truth.poll()
    restarted = Aggregator(source, inventory, checkpoint=checkpoint)
    restarted.poll()
    after = {p[:2]: p[2] for p in restarted.live_totals().pools}
    cpu = ("cpu", "cpu")
    grown = after[cpu] - before[cpu]
    new_hour = sum(p[2] for p in truth.live_totals().pools if p[:2] == cpu) - (before[cpu] * 2 / 3)
    assert grown > 0.9 * new_hour, (grown, new_hour)  # the new hour counts (it was absorbed)
    assert all(after[k] >= before[k] for k in before)
