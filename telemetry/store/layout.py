"""Where samples lie on disk (SPEC §2) and the rules every reader and the writer share.

Layout: ``<root>/<table>/date=YYYY-MM-DD/node=<node>/<stem>.{arrows,parquet}``; a file that cannot
be used is moved under ``<root>/quarantine/`` keeping its relative path. An Arrow IPC journal
(``.arrows``) is read up to its last complete batch.
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("tally.store")

JOURNAL_SUFFIX = ".arrows"
PARQUET_SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"
QUARANTINE = "quarantine"
_JOIN_BATCHES = 512


def node_dir_name(node: str) -> str:
    """The ``node=`` partition directory for ``node`` (URI-escaped, as hive readers expect)."""
    return "node=" + quote(node, safe="")


def partition_dir(root: Path, table: str, time_ns: int, node: str) -> Path:
    day = datetime.fromtimestamp(time_ns / 1e9, tz=UTC).strftime("%Y-%m-%d")
    return root / table / f"date={day}" / node_dir_name(node)


def quarantine(root: Path, path: Path, reason: str) -> Path | None:
    """Move ``path`` under ``<root>/quarantine/`` keeping its relative path; None if that fails."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        relative = Path(path.name)
    target = root / QUARANTINE / relative
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{target.name}.{os.urandom(3).hex()}")
        shutil.move(str(path), str(target))
    except OSError as exc:
        log.warning("cannot quarantine %s (%s): %s", path, reason, exc)
        return None
    log.warning("quarantined %s: %s", path, reason)
    return target


def read_journal(path: Path) -> tuple[pa.Table | None, bool]:
    """Every complete batch of an IPC stream journal, and whether the stream ended cleanly.

    A journal holds one small batch per round, thousands an hour; they are joined into
    contiguous chunks as they are read, so the many small batch objects never all exist at once
    (they cost far more memory than their rows). A batch whose buffers do not hold together (a
    flipped bit) is left out and reading goes on; damaged framing ends the reading. Returns
    ``(None, False)`` when not even the schema can be read; the flag is False where anything
    was left out. Imports pyarrow (the daemon's store never calls this itself).
    """
    import pyarrow as pa

    try:
        with pa.memory_map(str(path), "r") as source:
            try:
                reader = pa.ipc.open_stream(source)
            except (pa.ArrowException, OSError):
                return None, False
            parts: list[pa.Table] = []
            batches: list[pa.RecordBatch] = []
            clean = True
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except (pa.ArrowException, OSError):  # torn, or its framing damaged: the end
                    clean = False
                    break
                try:
                    batch.validate(full=True)
                except pa.ArrowException:  # its body damaged (a flipped bit): it alone is lost
                    clean = False
                    continue
                batches.append(batch)
                if len(batches) >= _JOIN_BATCHES:
                    parts.append(
                        pa.Table.from_batches(batches, schema=reader.schema).combine_chunks()
                    )
                    batches.clear()
            parts.append(pa.Table.from_batches(batches, schema=reader.schema).combine_chunks())
            return pa.concat_tables(parts), clean
    except OSError:
        return None, False
