"""The ``tally`` command line: daemon, doctor, replay, bill, report, aggregate, sample.

Exit codes: 0 ok, 2 bad usage, configuration or input (one line on stderr), 1 unexpected.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from telemetry import __version__
from telemetry.collectors import REGISTRY
from telemetry.config import (
    DEFAULT_AGGREGATE_LISTEN,
    DEFAULT_DATA_DIR,
    DEFAULT_INTERVAL_SECONDS,
    DEFAULT_LISTEN,
    DEFAULT_MAX_GAP_SECONDS,
    DaemonConfig,
    load_config_file,
    parse_duration,
    parse_listen,
    parse_window,
)
from telemetry.errors import TallyError
from telemetry.logs import setup as setup_logging
from telemetry.schema import SchemaError

log = logging.getLogger("tally.cli")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        raise TallyError(f"{self.prog}: {message} (see --help)")


def _duration(what: str) -> Any:
    def parse(text: str) -> float:
        try:
            return parse_duration(text, what)
        except TallyError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _node_arguments(d: argparse.ArgumentParser) -> None:
    """The flags of ``daemon``, shared with ``doctor`` so it checks the same settings."""
    d.add_argument("--config", type=Path, help="TOML file of flag values (command line wins)")
    d.add_argument("--listen", help=f"ADDR:PORT to serve /metrics on (default {DEFAULT_LISTEN})")
    d.add_argument(
        "--data-dir", type=Path, help=f"dataset directory to write (default {DEFAULT_DATA_DIR})"
    )
    d.add_argument(
        "--interval",
        type=_duration("interval"),
        help=f"seconds between rounds (default {DEFAULT_INTERVAL_SECONDS:g})",
    )
    d.add_argument(
        "--max-gap",
        type=_duration("max-gap"),
        help=f"longest interval that still counts (default {DEFAULT_MAX_GAP_SECONDS:g}s)",
    )
    d.add_argument(
        "--path.procfs", dest="path_procfs", type=Path, help="procfs mount point (default /proc)"
    )
    d.add_argument(
        "--path.sysfs", dest="path_sysfs", type=Path, help="sysfs mount point (default /sys)"
    )
    d.add_argument("--node", help="node name to record (default: the host name)")
    d.add_argument("--inventory", type=Path, help="TOML inventory: export pool and tenant counters")
    d.add_argument(
        "--web.config.file",
        dest="web_config",
        type=Path,
        help="YAML: TLS and basic auth for /metrics (exporter-toolkit format)",
    )
    d.add_argument(
        "--dcgm-compat",
        action="store_true",
        default=None,
        help="also export dcgm-exporter's GPU metric names",
    )
    # Testing hook: MODULE:ATTR names an object that stands in for the pynvml module.
    d.add_argument("--nvml.module", dest="nvml_module", help=argparse.SUPPRESS)
    # Testing hook: compact journals this often instead of hourly (crash tests).
    d.add_argument(
        "--store.rotate",
        dest="store_rotate",
        type=_duration("store.rotate"),
        help=argparse.SUPPRESS,
    )
    for name, cls in REGISTRY.items():
        state = "on" if cls.default_enabled else "off"
        d.add_argument(
            f"--collector.{name}",
            dest=f"collector_{name}",
            action="store_true",
            default=None,
            help=f"enable the {name} collector: {cls.help} (default {state})",
        )
        d.add_argument(
            f"--no-collector.{name}",
            dest=f"collector_{name}",
            action="store_false",
            default=None,
            help=f"disable the {name} collector",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tally", description="Utilisation telemetry: collect, store, aggregate, export."
    )
    parser.add_argument("--version", action="version", version=f"tally {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument(
        "--quiet", action="store_true", help="errors only: no progress, no warnings"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("daemon", help="collect this node's telemetry, store it, serve /metrics")
    _node_arguments(d)
    doc = sub.add_parser("doctor", help="check what works on this node and what does not, and why")
    _node_arguments(doc)

    r = sub.add_parser("replay", help="feed a stored dataset through aggregation and the exporter")
    r.add_argument("dataset", type=Path)
    r.add_argument("--listen", help="ADDR:PORT to keep serving the final state on")
    r.add_argument("--speed", type=_positive, help="pace the replay at X times real time")
    r.add_argument("--inventory", type=Path, help="TOML inventory: export pool and tenant counters")
    r.add_argument(
        "--web.config.file",
        dest="web_config",
        type=Path,
        help="YAML: TLS and basic auth for --listen",
    )
    r.add_argument(
        "--dcgm-compat", action="store_true", help="also export dcgm-exporter's GPU metric names"
    )
    r.add_argument(
        "--once", action="store_true", help="print the final exposition to stdout and exit"
    )
    r.add_argument(
        "--max-gap",
        type=_duration("max-gap"),
        default=DEFAULT_MAX_GAP_SECONDS,
        help=f"longest interval that still counts (default {DEFAULT_MAX_GAP_SECONDS:g}s)",
    )

    s = sub.add_parser("sample", help="write a small realistic sample dataset and inventory")
    s.add_argument("out", type=Path, help="directory to create (must not exist)")
    s.add_argument("--nodes", type=int, default=4, help="GPU nodes of 8 GPUs (default 4)")
    s.add_argument("--hours", type=_positive, default=6.0, help="hours of samples (default 6)")
    s.add_argument("--seed", type=int, default=1)

    b = sub.add_parser("bill", help="bill a stored dataset per window, pool, tenant and job")
    b.add_argument("dataset", type=Path)
    b.add_argument("--inventory", type=Path, required=True, help="TOML inventory of pools")
    b.add_argument(
        "--window", default="1h", help="window length, whole seconds >= 60 (15m, 1h, 1d, 7d)"
    )
    b.add_argument("--from", dest="start", help="first window: ISO-8601 date or time (UTC)")
    b.add_argument("--to", dest="end", help="end of the last window: ISO-8601 date or time (UTC)")
    b.add_argument("--format", choices=["json", "csv", "parquet", "table"], default="json")
    b.add_argument("--out", type=Path, help="output file (json, table) or prefix (csv, parquet)")
    _backend_argument(b)

    agg = sub.add_parser(
        "aggregate", help="follow a dataset many node daemons write into; export pool counters"
    )
    agg.add_argument("dataset", type=Path)
    agg.add_argument("--inventory", type=Path, required=True, help="TOML inventory of pools")
    agg.add_argument(
        "--listen", default=DEFAULT_AGGREGATE_LISTEN, help="ADDR:PORT to serve /metrics on"
    )
    agg.add_argument(
        "--poll",
        type=_duration("poll"),
        default=15.0,
        help="how often to look for new samples (default 15s)",
    )
    agg.add_argument(
        "--web.config.file",
        dest="web_config",
        type=Path,
        help="YAML: TLS and basic auth for --listen",
    )
    # A service that may be started on any host: it takes a GPU only when told to.
    _backend_argument(agg, default="numpy")

    rep = sub.add_parser(
        "report", help="write a self-contained HTML utilisation and billing report"
    )
    rep.add_argument("dataset", type=Path)
    rep.add_argument("--inventory", type=Path, required=True, help="TOML inventory of pools")
    rep.add_argument("--out", type=Path, required=True, help="HTML file to write")
    rep.add_argument(
        "--window",
        default="auto",
        help="window of the charts, whole seconds >= 60 (default auto: at most 240 windows)",
    )
    rep.add_argument("--from", dest="start", help="first window: ISO-8601 date or time (UTC)")
    rep.add_argument("--to", dest="end", help="end of the last window: ISO-8601 date or time (UTC)")
    _backend_argument(rep)
    return parser


def _backend_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument(
        "--backend",
        choices=["auto", "numpy", "cupy"],
        default=default,
        help="array backend of the bill engine: auto = cupy when a CUDA GPU is usable, else "
        f"numpy (default {default})",
    )


def _backend(name: str) -> ModuleType:
    """The array module for ``--backend``; one-line error (exit 2) when cupy cannot run."""
    from kernels import get_namespace
    from kernels.backend import BackendError

    try:
        return get_namespace(name)
    except BackendError as exc:
        raise TallyError(str(exc)) from None


# Config-file keys and the argparse destination each one sets.
_CONFIG_KEYS = {
    "listen": "listen",
    "data-dir": "data_dir",
    "interval": "interval",
    "max-gap": "max_gap",
    "path.procfs": "path_procfs",
    "path.sysfs": "path_sysfs",
    "node": "node",
    "inventory": "inventory",
    "dcgm-compat": "dcgm_compat",
    "web.config.file": "web_config",
    **{f"collector.{name}": f"collector_{name}" for name in REGISTRY},
}


def daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """Resolve daemon settings: command line, then ``--config`` file, then defaults."""
    file_values: dict[str, Any] = {}
    if args.config is not None:
        raw = load_config_file(args.config, set(_CONFIG_KEYS))
        for key, raw_value in raw.items():
            dest = _CONFIG_KEYS[key]
            value = raw_value
            if dest in ("interval", "max_gap"):
                value = parse_duration(str(raw_value), f"config {args.config}: {key}")
            elif key.startswith("collector.") and not isinstance(raw_value, bool):
                raise TallyError(f"config {args.config}: {key} must be true or false")
            elif dest in ("data_dir", "path_procfs", "path_sysfs", "inventory", "web_config"):
                value = Path(str(raw_value))
            file_values[dest] = value

    def pick(dest: str, default: Any) -> Any:
        value = getattr(args, dest)
        if value is not None:
            return value
        return file_values.get(dest, default)

    return DaemonConfig(
        listen=pick("listen", DEFAULT_LISTEN),
        data_dir=pick("data_dir", Path(DEFAULT_DATA_DIR)),
        interval_seconds=pick("interval", DEFAULT_INTERVAL_SECONDS),
        max_gap_seconds=pick("max_gap", DEFAULT_MAX_GAP_SECONDS),
        procfs=pick("path_procfs", Path("/proc")),
        sysfs=pick("path_sysfs", Path("/sys")),
        node=pick("node", ""),
        collectors={
            name: pick(f"collector_{name}", cls.default_enabled) for name, cls in REGISTRY.items()
        },
        log_level=args.log_level,
        inventory=pick("inventory", None),
        dcgm_compat=bool(pick("dcgm_compat", False)),
        nvml_module=args.nvml_module,
        rotate_seconds=args.store_rotate or 3600.0,
        web_config=pick("web_config", None),
    )


def _warner(quiet: bool) -> Callable[[str], None]:
    """Warnings as ``tally: warning: …`` lines on stderr, none with ``--quiet``."""

    def warn(message: str) -> None:
        if not quiet:
            print(f"tally: warning: {message}", file=sys.stderr)

    return warn


def _stop_on_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set: long-running commands stop cleanly and exit 0."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def cmd_daemon(args: argparse.Namespace) -> int:
    from telemetry.daemon import run_daemon

    return run_daemon(daemon_config(args))


def cmd_replay(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from exporters.http import MetricsServer
    from exporters.prometheus import TallyCollector
    from exporters.webconfig import load_web_config
    from telemetry.billing.inventory import load_inventory
    from telemetry.progress import Progress
    from telemetry.replay import load_dataset, replay
    from telemetry.state import Snapshot

    listen = parse_listen(args.listen) if args.listen and not args.once else None
    inventory = load_inventory(args.inventory) if args.inventory is not None else None
    with Progress("replay", step="file", quiet=args.quiet) as bar:
        tables, stats = load_dataset(args.dataset, bar)
    current: list[Snapshot] = [Snapshot()]
    registry = CollectorRegistry()
    collector = TallyCollector(lambda: current[0], dcgm_compat=args.dcgm_compat)
    registry.register(collector)
    server = None
    if listen is not None:
        web = load_web_config(args.web_config) if args.web_config is not None else None
        server = MetricsServer(registry, *listen, web=web, text=collector.render_text)
        server.start()
        print(f"tally replay: serving http://{args.listen}/metrics", file=sys.stderr, flush=True)
    stop = _stop_on_signals()

    def publish(snapshot: Snapshot) -> None:
        current[0] = snapshot

    replay(tables, args.max_gap, args.speed, publish, stop, inventory)
    if stats.files_quarantined or stats.files_skipped:
        print(
            f"tally replay: {stats.files} files read, {stats.files_quarantined} quarantined, "
            f"{stats.files_skipped} skipped",
            file=sys.stderr,
        )
    if server is None:
        sys.stdout.buffer.write(collector.render_text())
        sys.stdout.flush()
        return 0
    stop.wait()
    server.stop()
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from telemetry.demo import generate_sample

    if args.out.exists():
        raise TallyError(f"{args.out} already exists; give a new directory")
    if not 1 <= args.nodes <= 1000:
        raise TallyError("--nodes must be between 1 and 1000")
    rows = generate_sample(args.out, args.nodes, args.hours, seed=args.seed)
    print(f"wrote {rows:,} rows and {args.out / 'inventory.toml'}")
    return 0


def cmd_bill(args: argparse.Namespace) -> int:
    from telemetry.allocator import keep_freed_memory
    from telemetry.billing.bill import compute_bill
    from telemetry.billing.inventory import load_inventory
    from telemetry.billing.writers import write
    from telemetry.progress import silent

    window = parse_window(args.window)
    if args.format in ("csv", "parquet") and args.out is None:
        raise TallyError(f"--format {args.format} writes three files: give --out PREFIX")
    if args.out is not None and not args.out.parent.is_dir():
        raise TallyError(f"--out {args.out}: directory {args.out.parent} does not exist")
    xp = _backend(args.backend)
    inventory = load_inventory(args.inventory)
    keep_freed_memory()
    bill = compute_bill(
        args.dataset,
        inventory,
        window,
        args.start,
        args.end,
        warn=_warner(args.quiet),
        progress=silent if args.quiet else None,
        xp=xp,
    )
    try:
        write(bill, args.format, args.out)
    except OSError as exc:
        raise TallyError(f"--out {args.out}: {exc.strerror or exc}") from None
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from exporters.http import MetricsServer
    from exporters.prometheus import AggregateCollector
    from exporters.webconfig import load_web_config
    from telemetry.billing.aggregate import AggregateSnapshot, Aggregator
    from telemetry.billing.inventory import load_inventory
    from telemetry.progress import Progress
    from telemetry.store.dataset import discover

    host, port = parse_listen(args.listen)
    inventory = load_inventory(args.inventory)
    if not args.dataset.is_dir():
        discover(args.dataset)  # the one-line error for a missing or non-directory dataset
    web = load_web_config(args.web_config) if args.web_config is not None else None
    aggregator = Aggregator(args.dataset, inventory, xp=_backend(args.backend))
    current = [AggregateSnapshot()]
    collector = AggregateCollector(lambda: current[0])
    registry = CollectorRegistry()
    registry.register(collector)
    server = MetricsServer(registry, host, port, web=web, text=collector.render_text)
    stop = _stop_on_signals()
    # Catch up with everything already stored before serving: counters start at the dataset's
    # totals, so a restart neither resets nor doubles them.
    with Progress("aggregate", step="file", quiet=args.quiet) as bar:
        read = aggregator.poll(progress=bar)
    current[0] = AggregateSnapshot.of(aggregator)
    server.start()
    if not args.quiet:
        print(
            f"tally aggregate: {read:,} rows from {aggregator.stats.files:,} files; serving "
            f"http://{args.listen}/metrics, polling every {args.poll:g}s",
            file=sys.stderr,
            flush=True,
        )
    while not stop.wait(args.poll):
        try:
            aggregator.poll()
        except TallyError as exc:
            log.warning("poll failed: %s", exc)
            continue
        current[0] = AggregateSnapshot.of(aggregator)
    server.stop()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
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
    xp = _backend(args.backend)
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
            warn=_warner(args.quiet),
            xp=xp,
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
        print(f"wrote {args.out} ({len(document.encode()) / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tally`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        setup_logging("error" if args.quiet else args.log_level, args.log_format)
        if args.command == "daemon":
            return cmd_daemon(args)
        if args.command == "bill":
            return cmd_bill(args)
        if args.command == "sample":
            return cmd_sample(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "aggregate":
            return cmd_aggregate(args)
        if args.command == "doctor":
            from telemetry.doctor import run_doctor

            return run_doctor(daemon_config(args))
        return cmd_replay(args)
    except (TallyError, SchemaError) as exc:
        print(f"tally: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except Exception:
        traceback.print_exc()
        print(
            "tally: unexpected error (a bug); please report it with the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
