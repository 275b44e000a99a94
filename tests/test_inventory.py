from __future__ import annotations

from pathlib import Path

import pytest

from telemetry.billing.inventory import UNASSIGNED, load_inventory, parse_inventory
from telemetry.errors import TallyError

GOOD = """
max_gap_seconds = 90
currency = "CNY"
[[pool]]
name = "gpu-own"
kind = "gpu"
ownership = "own"
nodes = ["gpu-a*", "gpu-b0[1-4]"]
cost_per_unit_hour = 6.5
price_per_unit_hour = 12.0
[[pool]]
name = "gpu-leased"
kind = "gpu"
ownership = "leased"
nodes = ["gpu-*"]
cost_per_unit_hour = 9
price_per_unit_hour = 12
[[pool]]
name = "cpu"
kind = "cpu"
ownership = "own"
nodes = "*"
cost_per_unit_hour = 0.01
price_per_unit_hour = 0.03
"""


def test_good_inventory_and_first_match_wins() -> None:
    inv = parse_inventory(GOOD, "inv.toml")
    assert inv.max_gap_seconds == 90 and inv.currency == "CNY"
    gpu = inv.pools_of("gpu")
    assert [p.name for p in gpu] == ["gpu-own", "gpu-leased", UNASSIGNED]
    names = ["gpu-a17", "gpu-b03", "gpu-b05", "cpu-7"]
    assert [gpu[i].name for i in inv.assign(names, "gpu")] == [
        "gpu-own", "gpu-own", "gpu-leased", UNASSIGNED,
    ]  # fmt: skip
    cpu = inv.pools_of("cpu")
    assert [cpu[i].name for i in inv.assign(names, "cpu")] == ["cpu"] * 4
    assert cpu[-1].cost_per_unit_hour == 0 and cpu[-1].ownership is None


def test_defaults() -> None:
    inv = parse_inventory("", "x")
    assert inv.max_gap_seconds == 60 and inv.pools == ()


def test_unused_globs_are_reported() -> None:
    inv = parse_inventory(GOOD, "inv.toml")
    assert inv.unused_globs({"gpu-a1", "cpu-1"}) == [
        "pool 'gpu-own' nodes glob 'gpu-b0[1-4]'",
    ]


def _pool(**override: object) -> str:
    fields = {
        "name": '"p"', "kind": '"gpu"', "ownership": '"own"', "nodes": '["n*"]',
        "cost_per_unit_hour": "1.0", "price_per_unit_hour": "2.0",
    }  # fmt: skip
    fields.update({k: str(v) for k, v in override.items()})
    body = "\n".join(f"{k} = {v}" for k, v in fields.items() if v != "DROP")
    return f"[[pool]]\n{body}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_gap_seconds = \n", "not valid TOML"),
        ("colour = 1\n" + _pool(), "unknown key 'colour'"),
        (_pool(rack='"r1"'), "pool[0]: unknown key 'rack'"),
        (_pool(kind="DROP"), "pool[0]: missing key 'kind'"),
        (_pool() + _pool(), "pool 'p': duplicate pool name"),
        (_pool(name='"unassigned"'), "reserved"),
        (_pool(name='""'), "pool[0].name: must be a non-empty string"),
        (_pool(kind='"tpu"'), "pool 'p'.kind: must be one of gpu, cpu"),
        (_pool(ownership='"rented"'), "pool 'p'.ownership: must be one of own, leased"),
        (
            _pool(price_per_unit_hour="-1"),
            "pool 'p'.price_per_unit_hour: must be a finite number >= 0",
        ),
        (_pool(cost_per_unit_hour='"cheap"'), "pool 'p'.cost_per_unit_hour: must be a number"),
        (_pool(cost_per_unit_hour="nan"), "cost_per_unit_hour: must be a finite number"),
        (_pool(price_per_unit_hour="true"), "price_per_unit_hour: must be a number"),
        (_pool(nodes="[]"), "pool 'p'.nodes: must be a non-empty list"),
        (_pool(nodes="[1]"), "pool 'p'.nodes: must be a non-empty list"),
        ("max_gap_seconds = 0\n", "max_gap_seconds must be positive"),
        ("max_gap_seconds = -5\n", "max_gap_seconds: must be a finite number >= 0"),
        ("currency = 3\n", "currency must be an ISO 4217 code"),
        ("pool = 3\n", "pool must be an array of tables"),
    ],
)
def test_every_inventory_error_names_file_and_key(text: str, message: str) -> None:
    with pytest.raises(TallyError) as info:
        parse_inventory(text, "/etc/tally/inv.toml")
    assert str(info.value).startswith("inventory /etc/tally/inv.toml")
    assert message in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TallyError, match="No such file"):
        load_inventory(tmp_path / "missing.toml")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TallyError, match="not UTF-8"):
        load_inventory(binary)
