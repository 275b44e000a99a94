"""Daemon settings: defaults, value parsers (listen address, durations) and the TOML config file.

Precedence is command line > config file > defaults (``daemon_config`` merges them). Every
parser raises ``TallyError`` with a message that names the offending value (and file and key for
the config file).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import ipaddress
import math
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telemetry.errors import TallyError

# Outside 9100-9999, which Prometheus' default port allocation list has filled, and not a port
# other common monitoring software defaults to.
DEFAULT_PORT = 8469
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
# The cluster aggregator runs beside Prometheus, not on a node: the next port, loopback too.
DEFAULT_AGGREGATE_LISTEN = "127.0.0.1:8470"
DEFAULT_DATA_DIR = "./data"
DEFAULT_JOB_INFO_DIR = "/run/tally/jobs"  # where deploy/slurm/prolog writes one file per job
DEFAULT_INTERVAL_SECONDS = 5.0
DEFAULT_MAX_GAP_SECONDS = 60.0

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


# Bounds of the durations tally takes (seconds): what is outside them is a typing error, and
# would overflow int64 nanoseconds or spin a loop.
INTERVAL_RANGE = (0.1, 3600.0)
MAX_GAP_RANGE = (1.0, 7 * 86400.0)
POLL_RANGE = (0.1, 86400.0)
WINDOW_MAX_SECONDS = 3650 * 86400  # ten years


def parse_duration(
    text: str, what: str = "duration", bounds: tuple[float, float] | None = None
) -> float:
    """Seconds in ``text``: a number with an optional unit ms, s, m, h, d or w (``5``, ``15m``),
    within ``bounds`` (inclusive) when given. Raises ``TallyError`` naming ``what``."""
    match = _DURATION.match(str(text))
    if not match:
        raise TallyError(f"{what}: {text!r} is not a duration like 5s, 15m, 1h or 7d")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not math.isfinite(seconds) or seconds > 100 * 365 * 86400:
        raise TallyError(f"{what}: {text!r} is longer than a century")
    if bounds is not None and not bounds[0] <= seconds <= bounds[1]:
        raise TallyError(f"{what}: {text!r} must be between {bounds[0]:g}s and {bounds[1]:g}s")
    return seconds


# ---------------------------------------------------------------- command-line value types
def duration_arg(what: str, bounds: tuple[float, float] | None = None) -> Any:
    """An argparse type: a duration (``parse_duration``) within ``bounds``."""

    def parse(text: str) -> float:
        try:
            return parse_duration(text, what, bounds)
        except TallyError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def number_arg(low: float, high: float) -> Any:
    """An argparse type: a positive number from ``low`` to ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} must be between {low:g} and {high:g}")
        return value

    return parse


def seed_arg(text: str) -> int:
    """An argparse type: a random seed, 0 to 2^63 − 1 (numpy refuses negative ones)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 2^63 - 1")
    return value


def parse_window(text: str) -> int:
    """A window length in whole seconds, at least 60 (``15m``, ``1h``, ``1d``, ``7d``)."""
    if not _DURATION.match(str(text)):
        raise TallyError(
            f"window: {text!r} is not a window like 15m, 1h, 1d or 3600 (seconds, at least 60)"
        )
    seconds = parse_duration(text, "window")
    if seconds > WINDOW_MAX_SECONDS:
        raise TallyError(f"window: {text!r} is longer than ten years")
    if seconds != int(seconds) or seconds < 60:
        raise TallyError(f"window: {text!r} must be a whole number of seconds, at least 60")
    return int(seconds)


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``ADDR:PORT`` (``[v6]:PORT`` for IPv6; empty ADDR means all IPv4 addresses)."""
    text = str(text).strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise TallyError(f"listen address {text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise TallyError(f"listen address {text!r}: expected ADDR:PORT, e.g. {DEFAULT_LISTEN}")
        host = host or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TallyError(f"listen address {text!r}: port must be a number 0-65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise TallyError(f"listen address {text!r}: {host!r} is not an IP address") from None
    return host, int(port)


@dataclass
class DaemonConfig:
    """Resolved settings of ``tally daemon``."""

    listen: str = DEFAULT_LISTEN
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    interval_seconds: float = DEFAULT_INTERVAL_SECONDS
    max_gap_seconds: float = DEFAULT_MAX_GAP_SECONDS
    procfs: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    rootfs: Path = Path("/")
    podresources: Path | None = None  # None: <rootfs>/var/lib/kubelet/pod-resources/kubelet.sock
    k8s_tenant_label: str | None = None
    node: str = ""
    collectors: dict[str, bool] = field(default_factory=dict)
    log_level: str = "info"
    inventory: Path | None = None
    dcgm_compat: bool = False
    # MODULE:ATTR of a stand-in for pynvml (tests); None means the real library.
    nvml_module: str | None = None
    rotate_seconds: float = 3600.0
    web_config: Path | None = None
    slurm_job_info_dir: Path = Path(DEFAULT_JOB_INFO_DIR)
    gpu_energy: str = "counter"  # one of GPU_ENERGY_SOURCES

    def check(self) -> None:
        """Raise ``TallyError`` for settings that cannot work together."""
        parse_listen(self.listen)
        for what, value, (low, high) in (
            ("interval", self.interval_seconds, INTERVAL_RANGE),
            ("max-gap", self.max_gap_seconds, MAX_GAP_RANGE),
        ):
            if not low <= value <= high:
                raise TallyError(f"{what}: {value:g}s must be between {low:g}s and {high:g}s")
        if self.inventory is not None:  # the same gaps as the inventory's pool counters
            resolve_max_gap(self.max_gap_seconds, self.inventory)
        if self.interval_seconds * 2 > self.max_gap_seconds:
            raise TallyError(
                f"interval {self.interval_seconds:g}s is more than half of max-gap "
                f"{self.max_gap_seconds:g}s: every interval would risk counting as a gap; "
                "raise --max-gap or lower --interval"
            )
        for name, path in (
            ("path.procfs", self.procfs),
            ("path.sysfs", self.sysfs),
            ("path.rootfs", self.rootfs),
        ):
            if not path.is_dir():
                raise TallyError(f"--{name} {path}: not a directory")


def load_object(spec: str) -> Any:
    """The object named ``MODULE:ATTR``; raises ``TallyError``."""
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise TallyError(f"cannot load {spec!r}: {exc}") from None


def load_config_file(path: Path, known: set[str]) -> dict[str, Any]:
    """Read a TOML config file into ``{flag-name: value}``; nested tables join with dots.

    ``known`` holds the accepted flag names (``listen``, ``path.procfs``, ``collector.rapl``, …).
    Raises ``TallyError`` naming the file and key for unreadable TOML or an unknown key.
    """
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise TallyError(f"config {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TallyError(f"config {path}: not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}

    def walk(prefix: str, table: dict[str, Any]) -> None:
        for key, value in table.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            elif name not in known:
                raise TallyError(f"config {path}: unknown key {name!r}")
            else:
                flat[name] = value

    walk("", data)
    return flat


# Where GPU energy comes from: the driver's total-energy counter, or power x time (SPEC §3's
# fallback, the counter left null).
GPU_ENERGY_SOURCES = ("counter", "power")

# Config-file keys and the command-line destination each one sets (collectors added per call).
_CONFIG_KEYS = {
    "listen": "listen",
    "data-dir": "data_dir",
    "interval": "interval",
    "max-gap": "max_gap",
    "path.procfs": "path_procfs",
    "path.sysfs": "path_sysfs",
    "path.rootfs": "path_rootfs",
    "path.podresources": "path_podresources",
    "k8s.tenant-label": "k8s_tenant_label",
    "node": "node",
    "inventory": "inventory",
    "dcgm-compat": "dcgm_compat",
    "web.config.file": "web_config",
    "slurm.job-info-dir": "slurm_job_info_dir",
    "gpu.energy": "gpu_energy",
}
_PATH_KEYS = (
    "data_dir",
    "path_procfs",
    "path_sysfs",
    "path_rootfs",
    "path_podresources",
    "inventory",
    "web_config",
    "slurm_job_info_dir",
)


def config_keys(collectors: Iterable[str]) -> dict[str, str]:
    """Every key a daemon config file may hold, and the command-line destination it sets."""
    return {**_CONFIG_KEYS, **{f"collector.{name}": f"collector_{name}" for name in collectors}}


def resolve_max_gap(given: float | None, inventory: Path | None, strict: bool = True) -> float:
    """SPEC §3's ``max_gap_seconds`` (:func:`max_gap_of`) with the inventory at ``inventory``.
    An inventory that does not load is left to the code that loads it (its own error, or
    doctor's line)."""
    declared = None
    if inventory is not None:
        from telemetry.billing.inventory import load_inventory

        with contextlib.suppress(TallyError):
            declared = load_inventory(inventory).max_gap_seconds
    return max_gap_of(given, declared, inventory, strict)


def max_gap_of(
    given: float | None, declared: float | None, inventory: object, strict: bool = True
) -> float:
    """SPEC §3's ``max_gap_seconds``: ``--max-gap`` where given, else the inventory's
    (``declared``; None: no inventory), else 60 s. With an inventory the node series and the
    pool counters must count gaps alike: a ``--max-gap`` other than the inventory's raises
    ``TallyError`` naming ``inventory`` where ``strict`` (else it is returned, for
    :meth:`DaemonConfig.check` to refuse)."""
    if declared is None:
        return DEFAULT_MAX_GAP_SECONDS if given is None else given
    if given is not None and given != declared:
        if not strict:
            return given
        raise TallyError(
            f"max-gap {given:g}s differs from max_gap_seconds = {declared:g} of inventory "
            f"{inventory}: node and pool counters would count gaps differently; set it in one "
            "place"
        )
    return declared


def daemon_config(args: Any, collector_defaults: dict[str, bool]) -> DaemonConfig:
    """Daemon settings from the parsed command line ``args``, then its ``--config`` file, then
    the defaults. ``collector_defaults`` maps each collector name to whether it runs by default.

    Raises ``TallyError`` naming the file and key for a bad config file.
    """
    keys = config_keys(collector_defaults)
    file_values: dict[str, Any] = {}
    if args.config is not None:
        raw = load_config_file(args.config, set(keys))
        for key, raw_value in raw.items():
            dest = keys[key]
            value = raw_value
            where = f"config {args.config}: {key}"
            if dest in ("interval", "max_gap"):
                if isinstance(raw_value, bool) or not isinstance(raw_value, (str, int, float)):
                    raise TallyError(f'{where} must be a duration like "5s", got {raw_value!r}')
                value = parse_duration(str(raw_value), where)
            elif dest == "gpu_energy":
                if raw_value not in GPU_ENERGY_SOURCES:
                    choices = " or ".join(GPU_ENERGY_SOURCES)
                    raise TallyError(f"{where} must be {choices}, got {raw_value!r}")
            elif key.startswith("collector.") or dest == "dcgm_compat":
                # "no" is a true string: only a TOML boolean says what it means
                if not isinstance(raw_value, bool):
                    raise TallyError(f"{where} must be true or false, got {raw_value!r}")
            elif not isinstance(raw_value, str):
                raise TallyError(f"{where} must be a string, got {raw_value!r}")
            elif dest in _PATH_KEYS:
                value = Path(raw_value)
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
        max_gap_seconds=resolve_max_gap(
            pick("max_gap", None), pick("inventory", None), strict=False
        ),
        procfs=pick("path_procfs", Path("/proc")),
        sysfs=pick("path_sysfs", Path("/sys")),
        rootfs=pick("path_rootfs", Path("/")),
        podresources=pick("path_podresources", None),
        k8s_tenant_label=pick("k8s_tenant_label", None) or None,
        node=pick("node", ""),
        collectors={
            name: pick(f"collector_{name}", default) for name, default in collector_defaults.items()
        },
        log_level=args.log_level,
        inventory=pick("inventory", None),
        dcgm_compat=bool(pick("dcgm_compat", False)),
        nvml_module=args.nvml_module,
        rotate_seconds=args.store_rotate or 3600.0,
        web_config=pick("web_config", None),
        slurm_job_info_dir=pick("slurm_job_info_dir", Path(DEFAULT_JOB_INFO_DIR)),
        gpu_energy=pick("gpu_energy", "counter"),
    )
