"""The bill engine's device path, run on any machine through a CuPy stand-in (``fake_cupy``).

On a GPU ``pytest -m gpu`` (tests/test_gpu_bill.py) compares real CuPy bills with NumPy ones.
Here the same code path runs with arrays of another type: every kernel that would get a host
array where a device one belongs raises, so these tests show the merge, the contributions and
the sums stay on the device, copies happen a fixed number of times per chunk, the pool is
released, and the bytes equal the NumPy bill's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from kernels.backend import get_namespace
from kernels.grouped_sums import group_sums
from telemetry.billing.aggregate import Aggregator
from telemetry.billing.bill import compute_bill
from telemetry.billing.engine import Biller
from telemetry.billing.inventory import parse_inventory
from telemetry.billing.writers import to_json
from telemetry.cli import main
from telemetry.demo import generate_demo
from telemetry.store.dataset import scan
from tests.support import fake_cupy
from tests.support.cli import tally


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The Alibaba-shaped sample (3 nodes, 2 h, one node's outage), plus a second copy of one
    GPU file whose utilisation differs: conflicting duplicates, so the canonical choice runs."""
    root = tmp_path_factory.mktemp("device") / "data"
    generate_demo(root, nodes=3, hours=2)
    first = sorted((root / "gpu").rglob("*.parquet"))[0]
    table = pq.read_table(first)
    util = table.column("utilization_ratio").to_numpy(zero_copy_only=False)
    changed = pa.array(np.nan_to_num(util) * 0.5, pa.float32())
    index = table.schema.get_field_index("utilization_ratio")
    pq.write_table(
        table.set_column(index, "utilization_ratio", changed), first.with_name("dup.parquet")
    )
    # Values a float→int64 cast turns into INT64_MIN on x86 and saturates on a GPU: both
    # backends must leave out the same rows (they are screened on the host, before either).
    bad = table.slice(10, 5)
    hostile = pa.array([3e38, float("nan"), -1.0, 18.5, float("inf")], pa.float32())
    bad = bad.set_column(index, "utilization_ratio", hostile)
    bad = bad.set_column(0, "time", pc.add(bad.column("time"), pa.scalar(1, pa.duration("ns"))))
    pq.write_table(bad, first.with_name("bad.parquet"))
    return root, root / "inventory.toml"


@pytest.fixture
def cupy() -> Iterator[object]:
    with fake_cupy.installed():
        yield get_namespace("cupy")


def test_the_stand_in_refuses_to_mix_host_and_device_arrays(cupy: object) -> None:
    device = cupy.asarray(np.arange(4))  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="mix"):
        group_sums([device], [np.arange(4)])
    with pytest.raises(TypeError, match="host array"):
        _ = device + np.arange(4)
    assert isinstance(device.get(), np.ndarray) and not isinstance(device.get(), type(device))


@pytest.mark.parametrize(("window", "budget"), [(3600, 4_000_000), (900, 5_000), (60, 777)])
def test_device_bill_bytes_equal_numpy(
    cupy: object, dataset: tuple[Path, Path], window: int, budget: int
) -> None:
    root, inventory_path = dataset
    inventory = parse_inventory(inventory_path.read_text())
    host = to_json(compute_bill(root, inventory, window, budget_rows=budget))
    fake_cupy.state.transfers = fake_cupy.state.released = 0
    device = to_json(compute_bill(root, inventory, window, budget_rows=budget, xp=cupy))  # type: ignore[arg-type]
    assert device == host
    assert b'"rows_skipped": 0' not in host  # the conflicting duplicates were met
    assert b'"gpu.utilization_ratio": 5' in host  # the hostile values were met, and left out
    assert fake_cupy.state.released == 2  # device and pinned pools, once, after the run


def test_sums_live_on_the_device_and_copies_are_per_chunk_not_per_row(
    cupy: object, dataset: tuple[Path, Path]
) -> None:
    root, inventory_path = dataset
    inventory = parse_inventory(inventory_path.read_text())
    fake_cupy.state.transfers = 0
    chunks = []

    def progress(done: int, total: int, rows: int) -> None:
        chunks.append(done)

    consumers, stats = scan(
        root, lambda: [Biller(inventory, 3600, xp=cupy)], budget_rows=500, progress=progress
    )
    biller = consumers[0]
    assert isinstance(biller, Biller)
    for parts in (biller.pool_parts, biller.job_parts):
        assert all(isinstance(k, fake_cupy.ndarray) for keys in parts.keys for k in keys)
        assert all(isinstance(v, fake_cupy.ndarray) for sums in parts.sums for v in sums)
    # Per chunk and table: the carried last rows, the duplicates' order (when there are any),
    # the job owners and the counted time range come back, and once per chunk the shared GPUs'
    # intervals (the demo writes gpu_job rows); never one copy per series or per row.
    assert len(chunks) >= 10 and stats.rows > 100 * len(chunks)  # hundreds of rows a chunk
    assert fake_cupy.state.transfers <= 16 * len(chunks)


def test_cli_report_and_aggregator_take_the_backend(
    cupy: object, dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    root, inventory = dataset
    for command, suffix in (("bill", "json"), ("report", "html")):
        outputs = []
        for backend in ("numpy", "cupy"):
            out = tmp_path / f"{backend}.{suffix}"
            args = ["--quiet", command, str(root), "--inventory", str(inventory), "--out", str(out)]
            assert main([*args, "--backend", backend]) == 0
            outputs.append(out.read_bytes())
        assert outputs[0] == outputs[1], command

    parsed = parse_inventory(inventory.read_text())
    results = []
    for xp in (np, cupy):
        aggregator = Aggregator(root, parsed, xp=xp)  # type: ignore[arg-type]
        assert aggregator.poll() > 0
        results.append((aggregator.live_totals(), aggregator.ratios()))
    assert results[0] == results[1]
    assert results[0][0].pools and results[0][1].rows


# ``cupy`` for the worker processes: the stand-in, which notes (a file per process, named by
# its pid and holding its parent's pid) each process that copied data to the "device".
_WORKER_CUPY = """\
import os, sys
from tests.support import fake_cupy
module = fake_cupy._module()
def asarray(values, dtype=None):
    mark = os.path.join(os.environ["TALLY_TEST_CUPY_MARKS"], str(os.getpid()))
    if not os.path.exists(mark):
        with open(mark, "w") as f:
            f.write(str(os.getppid()))
    return fake_cupy.asarray(values, dtype)
module.asarray = asarray
sys.modules[__name__] = module
"""


@pytest.mark.parametrize("where", [["--workers", "2"], ["--cluster", "local:2"]])
def test_each_worker_bills_on_its_own_device_and_the_bytes_equal_numpy(
    dataset: tuple[Path, Path], tmp_path: Path, where: list[str]
) -> None:
    """SPEC §9 with ``--backend cupy``: every worker process imports CuPy (here the stand-in,
    found on the workers' path as ``cupy``) and bills its partitions on the device; the merged
    bill's bytes equal one NumPy process's."""
    root, inventory = dataset
    shim, marks = tmp_path / "shim", tmp_path / "marks"
    shim.mkdir()
    marks.mkdir()
    (shim / "cupy.py").write_text(_WORKER_CUPY)
    repo = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(shim), str(repo)]),
        TALLY_TEST_CUPY_MARKS=str(marks),
    )
    outputs = []
    for backend, placement in (("numpy", ["--workers", "1"]), ("cupy", where)):
        out = tmp_path / f"{backend}.json"
        args = ["bill", str(root), "--inventory", str(inventory), "--window", "1h"]
        result = tally(*args, "--backend", backend, *placement, "--out", str(out), env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    # the command (a child of this test) merges; its workers (children of it, of a fork server
    # or of a Dask nanny) bill on the device
    workers = [p for p in marks.iterdir() if p.read_text() != str(os.getpid())]
    assert workers, "no worker process computed on the device"
