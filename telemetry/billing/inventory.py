"""The inventory (SPEC §4): pools of nodes with their kind, ownership, cost and price.

Read with the standard library's TOML parser and validated strictly: every problem is a
``TallyError`` naming the file and the key, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from telemetry.errors import TallyError

KINDS = ("gpu", "cpu")
OWNERSHIPS = ("own", "leased")
UNASSIGNED = "unassigned"

_TOP_KEYS = {"max_gap_seconds", "currency", "pool"}
_POOL_KEYS = {"name", "kind", "ownership", "nodes", "cost_per_unit_hour", "price_per_unit_hour"}


@dataclass(frozen=True)
class Pool:
    """One pool: unit is a GPU (kind gpu) or a core (kind cpu); money per unit-hour."""

    name: str
    kind: str
    ownership: str | None
    nodes: tuple[str, ...]
    cost_per_unit_hour: float
    price_per_unit_hour: float


@dataclass(frozen=True)
class Inventory:
    max_gap_seconds: float
    currency: str
    pools: tuple[Pool, ...]
    source: str = "<inventory>"

    def pools_of(self, kind: str) -> list[Pool]:
        """Pools of ``kind`` in file order, followed by that kind's ``unassigned`` pool."""
        own = [p for p in self.pools if p.kind == kind]
        return [*own, Pool(UNASSIGNED, kind, None, (), 0.0, 0.0)]

    def assign(self, nodes: list[str], kind: str) -> list[int]:
        """Index into :meth:`pools_of` for each node: the first pool whose glob matches."""
        pools = self.pools_of(kind)
        out = []
        for node in nodes:
            for i, pool in enumerate(pools[:-1]):
                if any(fnmatch.fnmatchcase(node, glob) for glob in pool.nodes):
                    out.append(i)
                    break
            else:
                out.append(len(pools) - 1)
        return out

    def unused_globs(self, nodes: set[str]) -> list[str]:
        """``pool[name].nodes`` globs that match none of ``nodes``."""
        return [
            f"pool {p.name!r} nodes glob {g!r}"
            for p in self.pools
            for g in p.nodes
            if not any(fnmatch.fnmatchcase(n, g) for n in nodes)
        ]


# Larger figures are typing errors, and they would print as infinite JSON once multiplied.
MAX_PRICE_PER_UNIT_HOUR = 1e9
# Longer intervals than this are never one sample period; it bounds Δt, so products of rates and
# Δt stay far inside int64 microseconds.
MAX_GAP_LIMIT_SECONDS = 7 * 86400


def _number(value: Any, where: str, most: float = MAX_PRICE_PER_UNIT_HOUR) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TallyError(f"{where}: must be a number, got {value!r}")
    if not math.isfinite(value) or not 0 <= value <= most:
        raise TallyError(f"{where}: must be a finite number >= 0 and <= {most:g}, got {value!r}")
    return float(value) + 0.0  # -0.0 becomes 0.0: it would print as "-0.00"


def parse_inventory(text: str, source: str = "<inventory>") -> Inventory:
    """Parse and validate inventory TOML; raises ``TallyError`` naming ``source`` and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TallyError(f"inventory {source}: not valid TOML: {exc}") from None
    for key in data:
        if key not in _TOP_KEYS:
            raise TallyError(f"inventory {source}: unknown key {key!r}")
    max_gap = _number(
        data.get("max_gap_seconds", 60),
        f"inventory {source}: max_gap_seconds",
        most=MAX_GAP_LIMIT_SECONDS,
    )
    if max_gap <= 0:
        raise TallyError(f"inventory {source}: max_gap_seconds must be positive")
    currency = data.get("currency", "")
    if not isinstance(currency, str):
        raise TallyError(f"inventory {source}: currency must be a string")
    raw_pools = data.get("pool", [])
    if not isinstance(raw_pools, list) or not all(isinstance(p, dict) for p in raw_pools):
        raise TallyError(f"inventory {source}: pool must be an array of tables ([[pool]])")
    pools: list[Pool] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_pools):
        where = f"inventory {source}: pool[{i}]"
        for key in raw:
            if key not in _POOL_KEYS:
                raise TallyError(f"{where}: unknown key {key!r}")
        for key in sorted(_POOL_KEYS - set(raw)):
            raise TallyError(f"{where}: missing key {key!r}")
        name = raw["name"]
        if not isinstance(name, str) or not name.strip():
            raise TallyError(f"{where}.name: must be a non-empty string")
        where = f"inventory {source}: pool {name!r}"
        if name in seen:
            raise TallyError(f"{where}: duplicate pool name")
        if name.strip().casefold() == UNASSIGNED:
            # "Unassigned " would read as the reserved pool on every invoice
            raise TallyError(f"{where}: the name is reserved for nodes no pool matches")
        seen.add(name)
        if raw["kind"] not in KINDS:
            raise TallyError(
                f"{where}.kind: must be one of {', '.join(KINDS)}, got {raw['kind']!r}"
            )
        if raw["ownership"] not in OWNERSHIPS:
            raise TallyError(
                f"{where}.ownership: must be one of {', '.join(OWNERSHIPS)}, "
                f"got {raw['ownership']!r}"
            )
        nodes = raw["nodes"]
        if isinstance(nodes, str):
            nodes = [nodes]
        if (
            not isinstance(nodes, list)
            or not nodes
            or not all(isinstance(n, str) and n for n in nodes)
        ):
            raise TallyError(f"{where}.nodes: must be a non-empty list of glob strings")
        pools.append(
            Pool(
                name=name,
                kind=raw["kind"],
                ownership=raw["ownership"],
                nodes=tuple(nodes),
                cost_per_unit_hour=_number(
                    raw["cost_per_unit_hour"], f"{where}.cost_per_unit_hour"
                ),
                price_per_unit_hour=_number(
                    raw["price_per_unit_hour"], f"{where}.price_per_unit_hour"
                ),
            )
        )
    return Inventory(max_gap_seconds=max_gap, currency=currency, pools=tuple(pools), source=source)


def load_inventory(path: Path) -> Inventory:
    """Read and validate the inventory file at ``path``; raises ``TallyError``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise TallyError(f"inventory {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TallyError(f"inventory {path}: not UTF-8 text") from None
    return parse_inventory(text, str(path))
