"""The inventory (SPEC §4): pools of nodes with their kind, ownership, cost and price.

Read with the standard library's TOML parser and validated strictly: every problem is a
``TallyError`` naming the file and the key, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, tzinfo
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from telemetry.billing.windows import parse_instant, to_ns, zone, zone_name
from telemetry.errors import TallyError, read_text_file

KINDS = ("gpu", "cpu")
OWNERSHIPS = ("own", "leased")
UNASSIGNED = "unassigned"

_TOP_KEYS = {"max_gap_seconds", "currency", "currency_decimals", "timezone", "pool", "contract"}
_POOL_KEYS = {"name", "kind", "ownership", "nodes", "cost_per_unit_hour", "price_per_unit_hour"}
_POOL_OPTIONAL = {"capacity_units", "capacity", "energy_price_per_kwh", "pue", "grid_gco2_per_kwh"}
_STEP_KEYS = {"from", "units"}
_CONTRACT_KEYS = {"tenant", "pool", "price_per_unit_hour", "discount_ratio"}
DEFAULT_CURRENCY_DECIMALS = 2


def exact(value: float) -> Fraction:
    """The decimal number a person wrote (``12.1``, not the binary float nearest to it)."""
    return Fraction(Decimal(repr(value))) if isinstance(value, float) else Fraction(value)


@dataclass(frozen=True)
class Pool:
    """One pool: unit is a GPU (kind gpu) or a core (kind cpu); money per unit-hour."""

    name: str
    kind: str
    ownership: str | None
    nodes: tuple[str, ...]
    cost_per_unit_hour: float
    price_per_unit_hour: float
    # Declared capacity: (from ns, units) steps, the first from the beginning of time; empty
    # when the pool declares none (its capacity is then what was monitored).
    capacity_steps: tuple[tuple[int, float], ...] = ()
    energy_price_per_kwh: float | None = None
    pue: float | None = None
    grid_gco2_per_kwh: float | None = None

    @property
    def declared(self) -> bool:
        return bool(self.capacity_steps)

    def declared_us(self, start_ns: int, end_ns: int) -> int:
        """Declared unit-µs over [start, end): each step's units × its overlap, rounded
        half-to-even once per step piece."""
        total = 0
        for i, (begin, units) in enumerate(self.capacity_steps):
            until = self.capacity_steps[i + 1][0] if i + 1 < len(self.capacity_steps) else end_ns
            a, b = max(begin, start_ns), min(until, end_ns)
            if b > a:
                total += round(exact(units) * (b - a) / 1000)
        return total


@dataclass(frozen=True)
class Contract:
    """A tenant's negotiated price in the pools ``pool`` (a glob) matches: a price, or a
    discount off the list price."""

    tenant: str
    pool: str
    price_per_unit_hour: float | None
    discount_ratio: float | None


@dataclass(frozen=True)
class Inventory:
    max_gap_seconds: float
    currency: str
    pools: tuple[Pool, ...]
    source: str = "<inventory>"
    currency_decimals: int = DEFAULT_CURRENCY_DECIMALS
    timezone: tzinfo = UTC
    contracts: tuple[Contract, ...] = ()
    _prices: dict[tuple[str, str], Fraction] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def timezone_name(self) -> str:
        return zone_name(self.timezone)

    def pools_of(self, kind: str) -> list[Pool]:
        """Pools of ``kind`` in file order, followed by that kind's ``unassigned`` pool."""
        own = [p for p in self.pools if p.kind == kind]
        return [*own, Pool(UNASSIGNED, kind, None, (), 0.0, 0.0)]

    def price(self, pool: Pool, tenant: str) -> Fraction:
        """What ``tenant`` pays per allocated unit-hour in ``pool``: the first contract that
        matches, else the list price (exact decimal)."""
        if pool.name == UNASSIGNED:
            return Fraction(0)  # SPEC §4: nodes no pool matches cost and earn nothing
        key = (pool.name, tenant)
        found = self._prices.get(key)
        if found is None:
            found = exact(pool.price_per_unit_hour)
            for contract in self.contracts:
                if contract.tenant == tenant and fnmatch.fnmatchcase(pool.name, contract.pool):
                    if contract.price_per_unit_hour is not None:
                        found = exact(contract.price_per_unit_hour)
                    else:
                        found = found * (1 - exact(contract.discount_ratio or 0.0))
                    break
            self._prices[key] = found
        return found

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
    if not isinstance(currency, str) or (currency and not re.fullmatch(r"[A-Z]{3}", currency)):
        raise TallyError(
            f"inventory {source}: currency must be an ISO 4217 code like EUR or CNY, "
            f"got {currency!r}"
        )
    decimals = data.get("currency_decimals", DEFAULT_CURRENCY_DECIMALS)
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 6:
        raise TallyError(
            f"inventory {source}: currency_decimals must be a whole number 0-6, got {decimals!r}"
        )
    tz_name = data.get("timezone", "UTC")
    if not isinstance(tz_name, str):
        raise TallyError(f"inventory {source}: timezone must be a string like 'Asia/Shanghai'")
    tz = zone(tz_name, f"inventory {source}: timezone")
    raw_pools = data.get("pool", [])
    if not isinstance(raw_pools, list) or not all(isinstance(p, dict) for p in raw_pools):
        raise TallyError(f"inventory {source}: pool must be an array of tables ([[pool]])")
    pools: list[Pool] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_pools):
        where = f"inventory {source}: pool[{i}]"
        for key in raw:
            if key not in _POOL_KEYS | _POOL_OPTIONAL:
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
                capacity_steps=_capacity_steps(raw, where, tz),
                energy_price_per_kwh=_optional(raw, "energy_price_per_kwh", where),
                pue=_optional(raw, "pue", where, least=1.0, most=10.0),
                grid_gco2_per_kwh=_optional(raw, "grid_gco2_per_kwh", where, most=10_000.0),
            )
        )
    contracts = _contracts(data.get("contract", []), f"inventory {source}", seen)
    return Inventory(
        max_gap_seconds=max_gap,
        currency=currency,
        pools=tuple(pools),
        source=source,
        currency_decimals=decimals,
        timezone=tz,
        contracts=contracts,
    )


def _optional(
    raw: dict[str, Any], key: str, where: str, least: float = 0.0, most: float = 1e9
) -> float | None:
    if key not in raw:
        return None
    value = _number(raw[key], f"{where}.{key}", most=most)
    if value < least:
        raise TallyError(f"{where}.{key}: must be at least {least:g}, got {raw[key]!r}")
    return value


def _instant(value: Any, where: str, tz: tzinfo) -> int:
    """A TOML date, date-time (local ones in ``tz``) or ISO string → ns."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return parse_instant(value.isoformat(), where, tz)
        return to_ns(value)
    if isinstance(value, date):
        return parse_instant(value.isoformat(), where, tz)
    if isinstance(value, str):
        return parse_instant(value, where, tz)
    raise TallyError(f"{where}: must be a date or date-time, got {value!r}")


def _capacity_steps(raw: dict[str, Any], where: str, tz: tzinfo) -> tuple[tuple[int, float], ...]:
    """(from ns, units) steps: ``capacity_units`` from the beginning of time, then each
    ``[[pool.capacity]]`` step from its instant on (strictly increasing)."""
    steps = raw.get("capacity", [])
    if "capacity_units" not in raw:
        if steps:
            raise TallyError(f"{where}.capacity: steps need capacity_units (the units before them)")
        return ()
    out = [(-(2**62), _number(raw["capacity_units"], f"{where}.capacity_units"))]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise TallyError(f"{where}.capacity: must be an array of tables ([[pool.capacity]])")
    for i, step in enumerate(steps):
        at = f"{where}.capacity[{i}]"
        for key in step:
            if key not in _STEP_KEYS:
                raise TallyError(f"{at}: unknown key {key!r}")
        for key in sorted(_STEP_KEYS - set(step)):
            raise TallyError(f"{at}: missing key {key!r}")
        begin = _instant(step["from"], f"{at}.from", tz)
        if begin <= out[-1][0]:
            raise TallyError(f"{at}.from: steps must be in time order, each after the one before")
        out.append((begin, _number(step["units"], f"{at}.units")))
    return tuple(out)


def _contracts(raw: Any, where: str, pools: set[str]) -> tuple[Contract, ...]:
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise TallyError(f"{where}: contract must be an array of tables ([[contract]])")
    out = []
    for i, entry in enumerate(raw):
        at = f"{where}: contract[{i}]"
        for key in entry:
            if key not in _CONTRACT_KEYS:
                raise TallyError(f"{at}: unknown key {key!r}")
        tenant = entry.get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise TallyError(f"{at}.tenant: must be a non-empty string")
        glob = entry.get("pool", "*")
        if not isinstance(glob, str) or not glob:
            raise TallyError(f"{at}.pool: must be a glob on pool names, like 'gpu-*'")
        if not any(fnmatch.fnmatchcase(p, glob) for p in pools):
            raise TallyError(f"{at}.pool: {glob!r} matches no pool")
        has_price, has_discount = "price_per_unit_hour" in entry, "discount_ratio" in entry
        if has_price == has_discount:
            raise TallyError(f"{at}: give exactly one of price_per_unit_hour and discount_ratio")
        price = discount = None
        if has_price:
            price = _number(entry["price_per_unit_hour"], f"{at}.price_per_unit_hour")
        else:
            discount = _number(entry["discount_ratio"], f"{at}.discount_ratio", most=1.0)
        out.append(Contract(tenant, glob, price, discount))
    return tuple(out)


def load_inventory(path: Path) -> Inventory:
    """Read and validate the inventory file at ``path``; raises ``TallyError``."""
    return parse_inventory(read_text_file(path, "inventory"), str(path))
