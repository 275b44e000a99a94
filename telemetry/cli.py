"""The ``tally`` command line: parses arguments and dispatches to the command that runs them.

Commands: daemon, doctor, replay, demo, bill, report, aggregate, plan. Exit codes: 0 ok, 2 bad
usage, configuration or input (one line on stderr), 1 unexpected.
"""

from __future__ import annotations

# ruff: noqa: E402 - the imports below come after NumPy's BLAS is asked for one thread
import os

from telemetry.blas import one_thread

one_thread(os.environ)  # before anything below imports NumPy (telemetry.blas says why)

import argparse
import logging
import sys
import traceback
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import NoReturn

from telemetry import __version__
from telemetry.collectors import REGISTRY
from telemetry.config import (
    DEFAULT_AGGREGATE_LISTEN,
    DEFAULT_DATA_DIR,
    DEFAULT_INTERVAL_SECONDS,
    DEFAULT_JOB_INFO_DIR,
    DEFAULT_LISTEN,
    DEFAULT_MAX_GAP_SECONDS,
    GPU_ENERGY_SOURCES,
    INTERVAL_RANGE,
    MAX_GAP_RANGE,
    POLL_RANGE,
    DaemonConfig,
    duration_arg,
    number_arg,
    seed_arg,
)
from telemetry.config import daemon_config as resolve_daemon_config
from telemetry.errors import RunFailed, SchemaError, TallyError
from telemetry.logs import say
from telemetry.logs import setup as setup_logging

log = logging.getLogger("tally.cli")

# The demo verb's earlier name, still accepted (not listed in --help).
_RENAMED = {"sample": "demo"}


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        raise TallyError(f"{self.prog}: {message} (see --help)")


# ---------------------------------------------------------------- options shared by commands
def _inventory_option(p: argparse.ArgumentParser, required: bool) -> None:
    what = (
        "TOML inventory of pools" if required else "TOML inventory: export pool and tenant counters"
    )
    p.add_argument("--inventory", type=Path, required=required, help=what)


def _web_config_option(p: argparse.ArgumentParser, serves: str) -> None:
    p.add_argument(
        "--web.config.file",
        dest="web_config",
        type=Path,
        help=f"YAML: TLS and basic auth for {serves} (exporter-toolkit format)",
    )


def _dcgm_compat_option(p: argparse.ArgumentParser, default: bool | None) -> None:
    p.add_argument(
        "--dcgm-compat",
        action="store_true",
        default=default,
        help="also export dcgm-exporter's GPU metric names",
    )


def _max_gap_option(p: argparse.ArgumentParser, default: float | None) -> None:
    p.add_argument(
        "--max-gap",
        type=duration_arg("max-gap", MAX_GAP_RANGE),
        default=default,
        help="longest interval that still counts (default: the inventory's max_gap_seconds, "
        f"else {DEFAULT_MAX_GAP_SECONDS:g}s)",
    )


def _range_options(p: argparse.ArgumentParser) -> None:
    instant = "ISO-8601 date or date-time; without an offset, in the bill's time zone"
    p.add_argument("--from", dest="start", help=f"bill from this instant on: {instant}")
    p.add_argument("--to", dest="end", help=f"bill up to this instant: {instant}")
    p.add_argument("--timezone", help="IANA zone of calendar windows (default: the inventory's)")
    what = "sacct --json or --parsable2 output: exact allocation (repeatable)"
    p.add_argument("--accounting", type=Path, action="append", default=[], help=what)


def _dataset_argument(p: argparse.ArgumentParser, what: str = "to read") -> None:
    p.add_argument(
        "dataset", type=Path, help=f"dataset directory {what} (<dir>/<table>/date=…/node=…/)"
    )


def _stable_cv_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stable-cv", type=number_arg(0, 1e6), default=0.25,
                   help="a tenant is stable where its hourly demand's CV is at most this "
                   "(default 0.25)")  # fmt: skip


def _backend_option(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument(
        "--backend",
        choices=["auto", "numpy", "cupy"],
        default=default,
        help="array backend of the bill engine: auto = cupy when a CUDA GPU is usable, else "
        f"numpy (default {default})",
    )


def _workers_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 4096:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, not {text!r}")
    return int(text)


def _parallel_options(p: argparse.ArgumentParser) -> None:
    """SPEC §9: where the dataset's node partitions are billed."""
    p.add_argument(
        "--workers",
        type=_workers_arg,
        help="processes on this machine's cores (default: one per core, one process for a "
        "small dataset; 1 = one process)",
    )
    p.add_argument(
        "--cluster",
        help="bill on Dask distributed: local, local:N (N workers) or tcp://HOST:PORT (a "
        "scheduler whose workers read DATASET by the same path); needs tally[cluster]",
    )


def _node_arguments(d: argparse.ArgumentParser) -> None:
    """The flags of ``daemon``, shared with ``doctor`` so it checks the same settings."""
    d.add_argument("--config", type=Path, help="TOML file of flag values (command line wins)")
    d.add_argument("--listen", help=f"ADDR:PORT to serve /metrics on (default {DEFAULT_LISTEN})")
    d.add_argument(
        "--data-dir", type=Path, help=f"dataset directory to write (default {DEFAULT_DATA_DIR})"
    )
    d.add_argument(
        "--interval",
        type=duration_arg("interval", INTERVAL_RANGE),
        help=f"time between rounds, e.g. 5s, 500ms, 1m (default {DEFAULT_INTERVAL_SECONDS:g}s)",
    )
    _max_gap_option(d, default=None)
    d.add_argument(
        "--path.procfs", dest="path_procfs", type=Path, help="procfs mount point (default /proc)"
    )
    d.add_argument(
        "--path.sysfs", dest="path_sysfs", type=Path, help="sysfs mount point (default /sys)"
    )
    info = "root-owned directory where deploy/slurm/tally-prolog writes each job's account, user"
    d.add_argument("--slurm.job-info-dir", dest="slurm_job_info_dir", type=Path,
                   help=f"{info} and GPUs, trusted before job environments "
                   f"(default {DEFAULT_JOB_INFO_DIR})")  # fmt: skip
    d.add_argument("--gpu.energy", dest="gpu_energy", choices=GPU_ENERGY_SOURCES,
                   help="GPU energy from the driver's total-energy counter (exact; on some "
                   "drivers a read spins ~3 ms of CPU a GPU), or from power x time, the counter "
                   "left null (SPEC §3's fallback) (default counter)")  # fmt: skip
    d.add_argument("--node", help="node name to record (default: the host name)")
    _inventory_option(d, required=False)
    _web_config_option(d, "/metrics")
    _dcgm_compat_option(d, default=None)
    # Testing hook: MODULE:ATTR names an object that stands in for the pynvml module.
    d.add_argument("--nvml.module", dest="nvml_module", help=argparse.SUPPRESS)
    # Testing hook: compact journals this often instead of hourly (crash tests).
    d.add_argument(
        "--store.rotate",
        dest="store_rotate",
        type=duration_arg("store.rotate"),
        help=argparse.SUPPRESS,
    )
    pods = "kubelet pod-resources socket (default ROOTFS/var/lib/kubelet/pod-resources/…)"
    rootfs = "the host's / : var/log/pods, and etc/passwd naming job owners (default /: NSS)"
    for path, what in (("rootfs", rootfs), ("podresources", pods)):
        d.add_argument(f"--path.{path}", dest=f"path_{path}", type=Path, help=what)
    d.add_argument("--k8s.tenant-label", dest="k8s_tenant_label", help="pod label: tenant")
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
    _dataset_argument(r)
    r.add_argument("--listen", help="ADDR:PORT to keep serving the final state on")
    r.add_argument(
        "--speed", type=number_arg(1e-6, 1e9), help="pace the replay at X times real time"
    )
    _inventory_option(r, required=False)
    _web_config_option(r, "--listen")
    _dcgm_compat_option(r, default=False)
    r.add_argument(
        "--once", action="store_true", help="print the final exposition to stdout and exit"
    )
    _max_gap_option(r, default=None)

    s = sub.add_parser("demo", help="write a small realistic demo dataset and its inventory")
    s.add_argument("out", type=Path, help="directory to create (must not exist)")
    s.add_argument("--nodes", type=int, default=4, help="GPU nodes of 8 GPUs (default 4)")
    s.add_argument(
        "--hours", type=number_arg(0.05, 24 * 366), default=6.0, help="hours of samples (default 6)"
    )
    s.add_argument(
        "--seed", type=seed_arg, default=1, help="the same seed writes the same dataset (default 1)"
    )

    b = sub.add_parser("bill", help="bill a stored dataset per window, pool, tenant and job")
    _dataset_argument(b)
    _inventory_option(b, required=True)
    b.add_argument(
        "--window",
        default="1h",
        help="day, week or month (calendar, in --timezone), or a length: 15m, 1h, 1d or "
        "whole seconds >= 60 (default 1h)",
    )
    _range_options(b)
    b.add_argument(
        "--format",
        choices=["json", "csv", "parquet", "table"],
        default="json",
        help="json (default), csv or parquet (three files), table (for people)",
    )
    b.add_argument("--out", type=Path, help="output file (json, table) or prefix (csv, parquet)")
    _backend_option(b)
    _parallel_options(b)

    agg = sub.add_parser(
        "aggregate", help="follow a dataset many node daemons write into; export pool counters"
    )
    _dataset_argument(agg, "to follow as node daemons write into it")
    _inventory_option(agg, required=True)
    agg.add_argument(
        "--listen",
        default=DEFAULT_AGGREGATE_LISTEN,
        help=f"ADDR:PORT to serve /metrics on (default {DEFAULT_AGGREGATE_LISTEN})",
    )
    agg.add_argument(
        "--poll",
        type=duration_arg("poll", POLL_RANGE),
        default=15.0,
        help="how often to look for new samples (default 15s)",
    )
    _web_config_option(agg, "--listen")
    agg.add_argument(
        "--checkpoint",
        type=Path,
        help="JSON file of the exported totals, so counters never go down when old files are "
        "removed (default DATASET/.tally/aggregate-checkpoint.json)",
    )
    # A service that may be started on any host: it takes a GPU only when told to.
    _backend_option(agg, default="numpy")

    rep = sub.add_parser(
        "report", help="write a self-contained HTML utilisation and billing report"
    )
    _dataset_argument(rep)
    _inventory_option(rep, required=True)
    rep.add_argument("--out", type=Path, required=True, help="HTML file to write")
    rep.add_argument(
        "--window",
        default="auto",
        help="window of the charts: 15m, 1h, 1d or whole seconds >= 60 "
        "(default auto: the shortest giving at most 240 windows)",
    )
    _range_options(rep)
    _stable_cv_option(rep)
    _backend_option(rep)
    _parallel_options(rep)

    pl = sub.add_parser("plan", help="which tenants belong on owned capacity; how much to own")
    _dataset_argument(pl)
    _inventory_option(pl, required=True)
    _range_options(pl)
    _stable_cv_option(pl)
    pl.add_argument("--format", choices=["json", "table"], default="json",
                    help="json (default) or table (for people)")  # fmt: skip
    pl.add_argument("--out", type=Path, help="output file (default stdout)")
    _parallel_options(pl)
    return parser


def daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """Daemon settings: command line, then ``--config`` file, then defaults."""
    return resolve_daemon_config(
        args, {name: cls.default_enabled for name, cls in REGISTRY.items()}
    )


def _run(command: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs ``command`` (imported on demand: ``--help`` stays fast)."""
    if command == "daemon":
        from telemetry.daemon import run_daemon

        return lambda args: run_daemon(daemon_config(args))
    if command == "doctor":
        from telemetry.doctor import run_doctor

        return lambda args: run_doctor(daemon_config(args))
    from telemetry import commands

    runner: Callable[[argparse.Namespace], int] = getattr(commands, command)
    return runner


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tally`` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    at = _command_index(argv)
    if at is not None:
        argv[at] = _RENAMED.get(argv[at], argv[at])
    # A file name that is not UTF-8 must not turn a warning or an error into a traceback.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    # Set before parsing, so that even a usage error is a JSON line under --log-format json.
    setup_logging("info", "json" if _wants_json(argv) else "text")
    try:
        args = parser.parse_args(argv)
        setup_logging("error" if args.quiet else args.log_level, args.log_format)
        return _run(args.command)(args)
    except (TallyError, SchemaError) as exc:
        say(str(exc), "error")
        return 2
    except BrokenPipeError:
        return 0
    except RunFailed as exc:
        say(str(exc), "error")
        return 1
    except Exception as exc:
        say(
            f"unexpected error (a bug), please report it with the traceback: {exc!r}",
            "error",
            plain=f"{traceback.format_exc()}tally: unexpected error (a bug); please report it "
            "with the traceback above",
            exception=traceback.format_exc(),
        )
        return 1


def _wants_json(argv: list[str]) -> bool:
    """Whether ``argv`` asks for ``--log-format json`` before the command word."""
    end = _command_index(argv)
    head = argv if end is None else argv[:end]
    return "--log-format=json" in head or ("--log-format", "json") in pairwise(head)


def _command_index(argv: list[str]) -> int | None:
    """Where the command word stands in ``argv``: the first word that is neither an option nor
    the value of a global option."""
    skip = False
    for i, word in enumerate(argv):
        if skip:
            skip = False
        elif word in ("--log-level", "--log-format"):
            skip = True
        elif not word.startswith("-"):
            return i
    return None


if __name__ == "__main__":
    sys.exit(main())
