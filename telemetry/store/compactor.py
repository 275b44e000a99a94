"""``python -m telemetry.store.compactor``: the daemon's compaction and recovery, in a child.

The node daemon never loads pyarrow (``writer.Store``); what needs it — turning journals into
Parquet, checking Parquet footers at start — runs here, in a process that ends when its work
does and that the kernel kills when the daemon dies (so it never outlives a ``kill -9`` and
races the next daemon's recovery).

Usage: ``--parent PID compact ROOT JOURNAL...`` or ``--parent PID recover ROOT NODE``. Log
records go to stderr as ``LEVEL<TAB>message`` lines, which the daemon logs as its own. Exit
status 0 when everything was done, 1 when a journal could not be compacted (it stays readable),
2 for bad arguments, 3 when the parent was gone before the work began.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

from telemetry.store.writer import compact, recover_node
from telemetry.tables import TABLES

log = logging.getLogger("tally.store")
_PR_SET_PDEATHSIG = 1


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " " + self.formatException(record.exc_info)
        return f"{record.levelname}\t{message}".replace("\n", " | ")


def _die_with_parent(parent: int) -> bool:
    """Ask the kernel to kill this process when its parent ends; False if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent


def _table_of(journal: Path, root: Path) -> str:
    """The table a journal belongs to, from its place under ``root``; ``ValueError`` if none."""
    table = journal.relative_to(root).parts[0]
    if table not in TABLES:
        raise ValueError(f"{journal} is not under a table directory of {root}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m telemetry.store.compactor")
    parser.add_argument("--parent", type=int, required=True)
    commands = parser.add_subparsers(dest="command", required=True)
    compact_args = commands.add_parser("compact")
    compact_args.add_argument("root", type=Path)
    compact_args.add_argument("journals", type=Path, nargs="+")
    recover_args = commands.add_parser("recover")
    recover_args.add_argument("root", type=Path)
    recover_args.add_argument("node")
    args = parser.parse_args(argv)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    root_log = logging.getLogger("tally")
    root_log.handlers[:] = [handler]
    root_log.setLevel(logging.INFO)
    root_log.propagate = False

    # A service stop signals the daemon's whole cgroup: the child finishes its files while the
    # daemon, stopping, waits for it; it dies with the daemon all the same (PR_SET_PDEATHSIG).
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(stop, signal.SIG_IGN)
    if not _die_with_parent(args.parent):
        return 3
    if args.command == "recover":
        try:
            recover_node(args.root, args.node)
        except OSError as exc:
            log.error("recovery of %s stopped: %s", args.root, exc)
            return 1
        return 0
    failed = False
    for journal in args.journals:
        try:
            compact(journal, args.root, _table_of(journal, args.root))
        except (OSError, ValueError) as exc:
            log.error("cannot compact %s: %s", journal, exc)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
