"""Slurm's hostlist syntax (``gpu-a[01-03,07],cpu-x1``), as accounting records and gres.conf
``NodeName=`` write node names."""

from __future__ import annotations

# a hostlist this long is not a real allocation but a typo or an attack on memory (the largest
# machines have some 10,000 nodes)
MAX_HOSTS = 65_536


def expand_hostlist(text: str) -> list[str]:
    """Slurm hostlist syntax → host names: ``gpu-a[01-03,07],cpu-x1`` → gpu-a01, gpu-a02,
    gpu-a03, gpu-a07, cpu-x1. Several bracket groups in one name expand as a product; a range
    keeps the zero padding of its first number. Raises ``ValueError`` on bad syntax or on more
    than ``MAX_HOSTS`` names, counted before any is built."""
    items = _split_top(text.strip())
    if sum(_count_one(item) for item in items) > MAX_HOSTS:
        raise ValueError(f"more than {MAX_HOSTS:,} hosts")
    hosts: list[str] = []
    for item in items:
        hosts.extend(_expand_one(item))
    return hosts


def _ranges(body: str, item: str) -> list[tuple[str, int, int]]:
    """The parts of one bracket group: (first number as written, first, last)."""
    out = []
    for part in body.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in {item!r}")
        a, b = int(low), int(high) if dash else int(low)
        if b < a:
            raise ValueError(f"range {part!r} runs backwards in {item!r}")
        out.append((low, a, b))
    return out


def _count_one(item: str) -> int:
    """How many names ``item`` expands to, without building them."""
    count, rest = 1, item
    while True:
        _, bracket, rest = rest.partition("[")
        if not bracket:
            return count
        body, _, rest = rest.partition("]")
        count *= sum(b - a + 1 for _, a, b in _ranges(body, item))
        if count > MAX_HOSTS:
            return count


def _split_top(text: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError("nested '['")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("']' without '['")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError("'[' without ']'")
    items.append("".join(current))
    if any(not item.strip() for item in items):
        raise ValueError("an empty host name")
    return [item.strip() for item in items]


def _expand_one(item: str) -> list[str]:
    head, bracket, rest = item.partition("[")
    if not bracket:
        return [item]
    body, _, tail = rest.partition("]")
    numbers = [str(n).zfill(len(low)) for low, a, b in _ranges(body, item) for n in range(a, b + 1)]
    tails = _expand_one(tail)  # once, not once per number
    return [head + n + t for n in numbers for t in tails]
