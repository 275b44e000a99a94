"""Reading a stored dataset (SPEC §2 layout) with every file checked and bad files set aside.

Any split of the same rows into files and row groups reads the same. Parquet files and the
daemon's Arrow IPC journals (the current hour, still being written) are both read; a journal's
incomplete last batch is ignored. A file that is not readable Parquet is moved to
``<dataset>/quarantine/`` (or skipped when it cannot be moved); a readable file whose columns do
not match the schema is skipped; both are counted and logged with the file and the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from telemetry.errors import TallyError
from telemetry.schema import SCHEMAS, SchemaError, validate
from telemetry.store import JOURNAL_SUFFIX, PARQUET_SUFFIX, QUARANTINE, quarantine, read_journal

log = logging.getLogger("tally.dataset")


@dataclass
class ReadStats:
    """What reading a dataset met (the bill's ``input`` object)."""

    files: int = 0
    rows: int = 0
    rows_skipped: int = 0
    files_quarantined: int = 0
    files_skipped: int = 0
    problems: list[str] = field(default_factory=list)


def discover(root: Path) -> dict[str, list[Path]]:
    """Sample files of each table under ``root``, sorted by path.

    Raises ``TallyError`` when ``root`` is not a readable directory or holds no sample file.
    """
    if not root.exists():
        raise TallyError(f"dataset {root} does not exist")
    if not root.is_dir():
        raise TallyError(f"dataset {root} is not a directory")
    found: dict[str, list[Path]] = {}
    try:
        for table in SCHEMAS:
            base = root / table
            if base.is_dir():
                files = [
                    p
                    for p in base.rglob("*")
                    if p.suffix in (PARQUET_SUFFIX, JOURNAL_SUFFIX) and p.is_file()
                ]
                found[table] = sorted(files)
    except PermissionError as exc:
        raise TallyError(f"dataset {root}: cannot read {exc.filename}: permission denied") from None
    if not any(found.values()):
        raise TallyError(
            f"dataset {root} holds no sample files "
            f"(expected {root}/{{cpu,gpu,job}}/date=…/node=…/*.parquet)"
        )
    return found


def read_file(path: Path, table: str) -> pa.Table:
    """Read one file as table ``table`` (validated). Raises ``SchemaError`` or ``OSError``/
    ``pa.ArrowInvalid`` for unreadable files."""
    if path.suffix == JOURNAL_SUFFIX:
        data, _ = read_journal(path)
        if data is None:
            raise pa.ArrowInvalid("not an Arrow IPC stream")
    else:
        data = pq.read_table(path)
    return validate(data, table)


def read_table(
    root: Path,
    table: str,
    files: list[Path],
    stats: ReadStats,
    on_file: Callable[[], None] | None = None,
) -> pa.Table:
    """Read and concatenate ``files`` of one table; bad files are set aside and counted.

    ``on_file`` is called before each file is read (for a progress bar).
    """
    parts: list[pa.Table] = []
    for path in files:
        if on_file is not None:
            on_file()
        if QUARANTINE in path.relative_to(root).parts:
            continue
        try:
            data = read_file(path, table)
        except SchemaError as exc:
            stats.files_skipped += 1
            stats.problems.append(f"{path}: {exc}")
            log.warning("skipping %s: %s", path, exc)
            continue
        except (pa.ArrowException, OSError) as exc:
            if path.suffix == JOURNAL_SUFFIX:
                stats.files_skipped += 1  # may be a live journal: never move it
                log.warning("skipping %s: %s", path, exc)
            elif quarantine(root, path, f"unreadable Parquet: {exc}") is not None:
                stats.files_quarantined += 1
            else:
                stats.files_skipped += 1
            stats.problems.append(f"{path}: {exc}")
            continue
        stats.files += 1
        stats.rows += data.num_rows
        parts.append(data.select(SCHEMAS[table].names))
    if not parts:
        return SCHEMAS[table].empty_table()
    return pa.concat_tables(parts)
