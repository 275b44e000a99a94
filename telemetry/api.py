"""The notebook API (``import tally``): samples, bills and plans as polars frames.

- ``scan(dataset, table)``: a ``pl.LazyFrame`` over one table of a dataset, every file's
  columns checked against the SPEC §2 schema from its footer (a foreign or damaged file is
  quarantined, as ``tally bill`` does; files under ``quarantine/`` are never read) and cast to
  the schema's types.
- ``bill(dataset, inventory, window=…)``: ``{"pools", "tenants", "jobs"}`` → ``pl.DataFrame``,
  row for row and field for field the JSON of ``tally bill``.
- ``plan(dataset, inventory, …)``: ``{"ownership", "tenants", "placement", "capacity"}`` →
  ``pl.DataFrame``, the JSON tables of ``tally plan``.

Bad input raises ``TallyError`` (or ``SchemaError``) with the CLI's one-line message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from telemetry.billing.accounting import Record, load_accounting
from telemetry.billing.inventory import Inventory, load_inventory
from telemetry.billing.plan import DEFAULT_STABLE_CV, compute_plan
from telemetry.billing.windows import CALENDAR
from telemetry.billing.writers import SCHEMAS as BILL_SCHEMAS
from telemetry.config import parse_window
from telemetry.errors import TallyError
from telemetry.schema import SCHEMAS
from telemetry.store.dataset import ReadStats, discover, read_file
from telemetry.store.dataset import plan as plan_pieces
from telemetry.store.layout import JOURNAL_SUFFIX

log = logging.getLogger("tally.api")

__all__ = ["bill", "plan", "scan"]

InventoryLike = Inventory | str | Path
AccountingLike = Sequence[Record] | Sequence[str | Path] | None


def scan(
    dataset: str | Path, table: str, warn: Callable[[str], None] = log.warning
) -> pl.LazyFrame:
    """A lazy frame of every row of ``table`` (``gpu``, ``cpu``, ``job``, ``gpu_job``) in the
    dataset at ``dataset``, with the table's SPEC §2 columns and types.

    Files are planned as the bill plans them: each file's schema is checked from its footer,
    files that do not fit are quarantined (``warn`` says which) and files under ``quarantine/``
    are skipped; so is a file lacking a required column. Rows are not de-duplicated or
    range-checked (the bill does that). Raises ``TallyError`` for a missing dataset or an
    unknown table.
    """
    if table not in SCHEMAS:
        raise TallyError(f"unknown table {table!r}; expected one of {', '.join(SCHEMAS)}")
    root = Path(dataset)
    found = discover(root)
    stats = ReadStats()
    pieces = plan_pieces(root, {table: found.get(table, [])}, stats)
    for problem in stats.problems:
        warn(f"set aside {problem}")
    target = pl.DataFrame(SCHEMAS[table].empty_table()).schema
    frames: list[pl.LazyFrame] = []
    for path in dict.fromkeys(piece.path for piece in pieces):
        if path.suffix == JOURNAL_SUFFIX:  # Arrow IPC, read whole (it is one hour at most)
            frames.append(pl.DataFrame(read_file(path, table)).lazy())
            continue
        present = set(pq.read_schema(path).names)
        frames.append(
            pl.scan_parquet(path, hive_partitioning=False).select(
                pl.col(name).cast(dtype) if name in present else pl.lit(None, dtype).alias(name)
                for name, dtype in target.items()
            )
        )
    if not frames:
        return pl.LazyFrame(schema=target)
    return pl.concat(frames, how="vertical")


def bill(
    dataset: str | Path,
    inventory: InventoryLike,
    window: int | str = "1h",
    *,
    start: str | None = None,
    end: str | None = None,
    accounting: AccountingLike = None,
    timezone: str | None = None,
    warn: Callable[[str], None] = log.warning,
) -> dict[str, pl.DataFrame]:
    """The ``tally bill`` JSON's ``pools``, ``tenants`` and ``jobs`` as DataFrames.

    ``window`` is seconds, a length (``"1h"``) or ``"day"``/``"week"``/``"month"``; ``start`` and
    ``end`` are ``--from``/``--to``; ``accounting`` is records or files of ``sacct`` output.
    """
    from telemetry.billing.bill import compute_bill
    from telemetry.progress import silent

    if isinstance(window, str):
        window = window if window in CALENDAR else parse_window(window)
    result = compute_bill(
        Path(dataset),
        _inventory(inventory),
        window,
        start,
        end,
        progress=silent,
        warn=warn,
        accounting=_accounting(accounting),
        timezone=timezone,
    )
    return {kind: _bill_frame(getattr(result, kind), kind) for kind in BILL_SCHEMAS}


def plan(
    dataset: str | Path,
    inventory: InventoryLike,
    *,
    start: str | None = None,
    end: str | None = None,
    stable_cv: float = DEFAULT_STABLE_CV,
    accounting: AccountingLike = None,
    timezone: str | None = None,
    warn: Callable[[str], None] = log.warning,
) -> dict[str, pl.DataFrame]:
    """The ``tally plan`` JSON's ``ownership``, ``tenants``, ``placement`` and ``capacity``."""
    from telemetry.progress import silent

    result = compute_plan(
        Path(dataset),
        _inventory(inventory),
        start,
        end,
        stable_cv=stable_cv,
        accounting=_accounting(accounting),
        timezone=timezone,
        progress=silent,
        warn=warn,
    )
    return result.frames()


def _inventory(inventory: InventoryLike) -> Inventory:
    return inventory if isinstance(inventory, Inventory) else load_inventory(Path(inventory))


def _accounting(accounting: AccountingLike) -> list[Record] | None:
    if accounting is None:
        return None
    items = list(accounting)
    if all(isinstance(item, str | Path) for item in items):
        return load_accounting(Path(item) for item in items)  # type: ignore[arg-type]
    return [item for item in items if isinstance(item, Record)]


def _bill_frame(rows: list[dict[str, Any]], kind: str) -> pl.DataFrame:
    """Bill rows with the types of the bill's Parquet schema, windows as the JSON's strings."""
    schema: dict[str, Any] = {}
    for f in BILL_SCHEMAS[kind]:
        if f.name == "currency":
            continue
        if f.name.startswith("window_"):
            schema[f.name] = pl.String
        else:
            schema[f.name] = pl.DataFrame(pa.schema([f]).empty_table()).schema[f.name]
    return pl.DataFrame(rows, schema=schema)
