"""What each ``tally`` command does once its arguments are parsed: replay, demo, bill, report,
aggregate and plan (the daemon and doctor have modules of their own).

Every function takes the parsed ``argparse.Namespace`` and returns the exit code; bad input is
a ``TallyError`` (one line on stderr, exit 2, written by the CLI).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from telemetry.config import max_gap_of, parse_window
from telemetry.errors import TallyError
from telemetry.logs import say

if TYPE_CHECKING:
    from telemetry.billing.accounting import Record

log = logging.getLogger("tally.cli")


def warner(quiet: bool) -> Callable[[str], None]:
    """Warnings as ``tally: warning: …`` lines on stderr, none with ``--quiet``."""

    def warn(message: str) -> None:
        if not quiet:
            say(message, "warning")

    return warn


def stop_on_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set: long-running commands stop cleanly and exit 0."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def backend(name: str) -> ModuleType:
    """The array module for ``--backend``; one-line error (exit 2) when cupy cannot run."""
    from kernels import get_namespace
    from kernels.backend import BackendError

    try:
        return get_namespace(name)
    except BackendError as exc:
        raise TallyError(str(exc)) from None


def replay(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from exporters.http import serve
    from exporters.prometheus import TallyCollector
    from telemetry.billing.inventory import load_inventory
    from telemetry.progress import Progress
    from telemetry.replay import replay
    from telemetry.state import Snapshot

    inventory = load_inventory(args.inventory) if args.inventory is not None else None
    declared = None if inventory is None else inventory.max_gap_seconds
    max_gap = max_gap_of(args.max_gap, declared, args.inventory)
    current: list[Snapshot] = [Snapshot()]
    registry = CollectorRegistry()
    collector = TallyCollector(lambda: current[0], dcgm_compat=args.dcgm_compat)
    registry.register(collector)
    server = None
    if args.listen is not None and not args.once:
        # bound and serving before the dataset is read: a bad address fails at once, and a
        # paced replay is watched as it goes
        server = serve(
            registry,
            args.listen,
            args.web_config,
            collector.render_text,
            openmetrics=collector.render_openmetrics,
        )
        banner = f"tally replay: serving {server.url}"
        say(banner)
    stop = stop_on_signals()

    def publish(snapshot: Snapshot) -> None:
        current[0] = snapshot

    with Progress("replay", quiet=args.quiet or args.speed is not None) as bar:
        _, stats = replay(args.dataset, max_gap, args.speed, publish, stop, inventory, progress=bar)
    if stats.files_quarantined or stats.files_skipped:
        summary = (
            f"tally replay: {stats.files} files read, {stats.files_quarantined} quarantined, "
            f"{stats.files_skipped} skipped"
        )
        say(summary, "warning", plain=summary)
    if server is None:
        sys.stdout.buffer.write(collector.render_text())
        sys.stdout.flush()
        return 0
    stop.wait()
    server.stop()
    return 0


def demo(args: argparse.Namespace) -> int:
    from telemetry.demo import generate_demo

    if args.out.exists():
        raise TallyError(f"{args.out} already exists; give a new directory")
    if not 1 <= args.nodes <= 1000:
        raise TallyError("--nodes must be between 1 and 1000")
    rows = generate_demo(args.out, args.nodes, args.hours, seed=args.seed)
    done = f"wrote {rows:,} rows and {args.out / 'inventory.toml'}"
    say(done, stream=sys.stdout)
    return 0


def accounting(paths: list[Path]) -> list[Record] | None:
    """The records of every ``--accounting`` file, or None without any."""
    from telemetry.billing.accounting import load_accounting

    return load_accounting(paths) if paths else None


def cluster(spec: str | None) -> str | None:
    """``--cluster`` checked (exit 2 for a malformed one, or without the ``cluster`` extra)."""
    if spec is None:
        return None
    import importlib.util

    from telemetry.executors import check_cluster

    check_cluster(spec)
    if importlib.util.find_spec("distributed") is None:
        raise TallyError("--cluster needs Dask distributed: pip install 'tally[cluster]'")
    return spec


def bill(args: argparse.Namespace) -> int:
    from telemetry.allocator import keep_freed_memory
    from telemetry.billing.bill import compute_bill
    from telemetry.billing.inventory import load_inventory
    from telemetry.billing.windows import CALENDAR
    from telemetry.billing.writers import write
    from telemetry.progress import silent

    window = args.window if args.window in CALENDAR else parse_window(args.window)
    if args.format in ("csv", "parquet") and args.out is None:
        raise TallyError(f"--format {args.format} writes three files: give --out PREFIX")
    if args.out is not None and not args.out.parent.is_dir():
        raise TallyError(f"--out {args.out}: directory {args.out.parent} does not exist")
    xp = backend(args.backend)
    inventory = load_inventory(args.inventory)
    keep_freed_memory()
    result = compute_bill(
        args.dataset,
        inventory,
        window,
        args.start,
        args.end,
        warn=warner(args.quiet),
        progress=silent if args.quiet else None,
        xp=xp,
        accounting=accounting(args.accounting),
        timezone=args.timezone,
        workers=args.workers,
        cluster=cluster(args.cluster),
    )
    try:
        write(result, args.format, args.out, inventory.currency_decimals)
    except OSError as exc:
        raise TallyError(f"--out {args.out}: {exc.strerror or exc}") from None
    return 0


def aggregate(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from exporters.http import serve
    from exporters.prometheus import AggregateCollector
    from telemetry.billing.aggregate import AggregateSnapshot, Aggregator
    from telemetry.billing.inventory import load_inventory
    from telemetry.progress import Progress
    from telemetry.store.dataset import discover

    inventory = load_inventory(args.inventory)
    if not args.dataset.is_dir():
        discover(args.dataset)  # the one-line error for a missing or non-directory dataset
    checkpoint = args.checkpoint or args.dataset / ".tally" / "aggregate-checkpoint.json"
    aggregator = Aggregator(
        args.dataset, inventory, xp=backend(args.backend), checkpoint=checkpoint
    )
    current = [AggregateSnapshot()]
    collector = AggregateCollector(lambda: current[0])
    registry = CollectorRegistry()
    registry.register(collector)
    server = serve(
        registry,
        args.listen,
        args.web_config,
        text=collector.render_text,
        start=False,
        openmetrics=collector.render_openmetrics,
    )
    stop = stop_on_signals()
    # Catch up with everything already stored before serving: counters start at the dataset's
    # totals, so a restart neither resets nor doubles them.
    with Progress("aggregate", step="file", quiet=args.quiet) as bar:
        read = aggregator.poll(progress=bar)
    current[0] = AggregateSnapshot.of(aggregator)
    server.start()
    if not args.quiet:
        banner = (
            f"tally aggregate: {read:,} rows from {aggregator.stats.files:,} files; serving "
            f"{server.url}, polling every {args.poll:g}s"
        )
        say(banner)
    while not stop.wait(args.poll):
        try:
            aggregator.poll()
        except TallyError as exc:
            log.warning("poll failed: %s", exc)
            continue
        current[0] = AggregateSnapshot.of(aggregator)
    server.stop()
    return 0


def report(args: argparse.Namespace) -> int:
    from telemetry.allocator import keep_freed_memory
    from telemetry.billing.inventory import load_inventory
    from telemetry.billing.report import collect_report
    from telemetry.billing.report_html import render_report
    from telemetry.progress import Progress

    window = None if args.window == "auto" else parse_window(args.window)
    if args.out.is_dir():
        raise TallyError(f"--out {args.out} is a directory; give a file name")
    if not args.out.parent.is_dir():
        raise TallyError(f"--out {args.out}: directory {args.out.parent} does not exist")
    xp = backend(args.backend)
    inventory = load_inventory(args.inventory)
    keep_freed_memory()
    with Progress("report", quiet=args.quiet) as bar:
        data = collect_report(
            args.dataset,
            inventory,
            window,
            args.start,
            args.end,
            progress=bar,
            warn=warner(args.quiet),
            xp=xp,
            accounting=accounting(args.accounting),
            timezone=args.timezone,
            stable_cv=args.stable_cv,
            workers=args.workers,
            cluster=cluster(args.cluster),
        )
    document = render_report(data)
    partial = args.out.with_name(f".{args.out.name}.tmp")
    try:
        partial.write_text(document, encoding="utf-8")
        partial.replace(args.out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise TallyError(f"--out {args.out}: {exc.strerror or exc}") from None
    if not args.quiet:
        done = f"wrote {args.out} ({len(document.encode()) / 1e6:.1f} MB)"
        say(done)
    return 0


def plan(args: argparse.Namespace) -> int:
    from telemetry.billing.inventory import load_inventory
    from telemetry.billing.plan import compute_plan, to_json, to_table
    from telemetry.progress import silent

    if args.out is not None and not args.out.parent.is_dir():
        raise TallyError(f"--out {args.out}: directory {args.out.parent} does not exist")
    inventory = load_inventory(args.inventory)
    result = compute_plan(
        args.dataset,
        inventory,
        args.start,
        args.end,
        stable_cv=args.stable_cv,
        accounting=accounting(args.accounting),
        timezone=args.timezone,
        progress=silent if args.quiet else None,
        warn=warner(args.quiet),
        workers=args.workers,
        cluster=cluster(args.cluster),
    )
    body = to_json(result) if args.format == "json" else to_table(result).encode()
    if args.out is None:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
        return 0
    try:
        args.out.write_bytes(body)
    except OSError as exc:
        raise TallyError(f"--out {args.out}: {exc.strerror or exc}") from None
    return 0
