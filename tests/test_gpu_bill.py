"""CuPy bills are byte-identical to NumPy bills (``pytest -m gpu`` on a GPU machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bill_scale import INVENTORY, generate
from kernels.backend import BackendError, get_namespace
from telemetry.billing.bill import compute_bill
from telemetry.billing.inventory import parse_inventory
from telemetry.billing.writers import write

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy() -> object:
    try:
        return get_namespace("cupy")
    except BackendError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gpu-bill")
    data = root / "data"
    generate(data, nodes=12, hours=30)  # two days, restarts of the energy counter at midnight
    inventory = root / "inventory.toml"
    inventory.write_text("max_gap_seconds = 60\n" + INVENTORY)
    return data, inventory


@pytest.mark.parametrize(("window", "budget"), [(3600, 4_000_000), (86400, 50_000), (900, 7_919)])
def test_cupy_bill_bytes_equal_numpy(
    cupy: object, dataset: tuple[Path, Path], tmp_path: Path, window: int, budget: int
) -> None:
    import numpy as np

    root, inventory_path = dataset
    inventory = parse_inventory(inventory_path.read_text())
    outputs = []
    for xp in (np, cupy):
        bill = compute_bill(root, inventory, window, budget_rows=budget, xp=xp)  # type: ignore[arg-type]
        out = tmp_path / f"{getattr(xp, '__name__', 'x')}-{window}.json"
        write(bill, "json", out)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) > 10_000


def test_cli_backends_agree(cupy: object, dataset: tuple[Path, Path]) -> None:
    root, inventory = dataset
    texts = [
        subprocess.run(
            [sys.executable, "-m", "telemetry.cli", "bill", str(root), "--inventory",
             str(inventory), "--window", "1d", "--backend", backend],
            capture_output=True, check=True, timeout=600,
        ).stdout
        for backend in ("numpy", "cupy", "auto")
    ]  # fmt: skip
    assert texts[0] == texts[1] == texts[2]
