"""``tally doctor``: what works on this node, what does not, why, and the fix — one line each.

It checks everything the daemon would use or refuse with the same flags: its settings, /proc
and /sys, RAPL, NVML and GPM, Slurm cgroups, the data directory, the listen port, the inventory
and the web config. Exit code 0 when nothing failed, 1 when
something did (warnings do not count).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from telemetry.collectors import REGISTRY
from telemetry.collectors.cpu import parse_meminfo, parse_proc_stat
from telemetry.collectors.jobinfo import job_info_dir_problem
from telemetry.collectors.rapl import package_zones
from telemetry.collectors.slurm import (
    FALLBACK_NAMES,
    cgroup_version,
    list_jobs,
    slurmstepd_scopes,
    v2_fallback,
)
from telemetry.config import DaemonConfig, load_object, parse_listen
from telemetry.errors import TallyError
from telemetry.nvml import Gateway, GpuLost, NvmlUnavailable

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Finding:
    status: str
    what: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f"  -> {self.fix}" if self.fix and self.status != OK else ""
        return f"[{self.status:>4}] {self.what}: {self.detail}{fix}"


def check_procfs(config: DaemonConfig) -> list[Finding]:
    stat, meminfo = config.procfs / "stat", config.procfs / "meminfo"
    try:
        parsed = parse_proc_stat(
            stat.read_text(errors="replace"), os.sysconf("SC_CLK_TCK"), str(stat)
        )
        memory = parse_meminfo(meminfo.read_text(errors="replace"), str(meminfo))
    except (OSError, TallyError) as exc:
        return [
            Finding(
                FAIL,
                "procfs",
                str(exc),
                f"mount the host's /proc and pass --path.procfs (now {config.procfs})",
            )
        ]
    return [
        Finding(
            OK,
            "procfs",
            f"{parsed.cpus_online} CPUs online, {memory.total_bytes / 2**30:.1f} GiB memory",
        )
    ]


def check_rapl(config: DaemonConfig) -> list[Finding]:
    zones = package_zones(config.sysfs)
    if not zones:
        return [
            Finding(
                WARN,
                "rapl",
                f"no package zones under {config.sysfs}/class/powercap",
                "CPU energy stays null (normal in VMs; load intel_rapl_common / amd powercap on bare metal)",
            )
        ]
    unreadable = []
    for zone in zones:
        try:
            (zone / "energy_uj").read_text()
        except PermissionError:
            unreadable.append(zone.name)
        except OSError as exc:
            unreadable.append(f"{zone.name} ({exc.strerror})")
    if unreadable:
        return [
            Finding(
                FAIL,
                "rapl",
                f"energy_uj not readable in {', '.join(unreadable)}",
                "run as root or grant read access (energy_uj is root-only since Linux 5.10), e.g. a udev rule or CAP_DAC_READ_SEARCH",
            )
        ]
    return [Finding(OK, "rapl", f"{len(zones)} package zone(s) readable")]


def check_nvml(config: DaemonConfig) -> list[Finding]:
    module = load_object(config.nvml_module) if config.nvml_module else None
    gateway = Gateway(module)
    try:
        _ = gateway.nvml
    except NvmlUnavailable as exc:
        return [
            Finding(
                WARN,
                "nvml",
                str(exc),
                "no GPU metrics on this node; on a GPU node install the NVIDIA driver (libnvidia-ml.so.1)",
            )
        ]
    try:
        count = gateway.call("nvmlDeviceGetCount") or 0
        driver = gateway.call("nvmlSystemGetDriverVersion")
        findings = [Finding(OK, "nvml", f"driver {driver}, {count} GPU(s)")]
        gpm = []
        for index in range(count):
            try:
                handle = gateway.call("nvmlDeviceGetHandleByIndex", index)
                support = gateway.call("nvmlGpmQueryDeviceSupport", handle)
            except GpuLost:
                findings.append(
                    Finding(
                        FAIL,
                        f"gpu {index}",
                        "GPU is lost (fell off the bus)",
                        "check `dmesg` for XID 79; a reset or reboot is needed",
                    )
                )
                continue
            gpm.append(bool(support is not None and support.isSupportedDevice))
        if count:
            if all(gpm):
                findings.append(Finding(OK, "gpm", "SM activity (GPM) supported on every GPU"))
            else:
                findings.append(
                    Finding(
                        WARN,
                        "gpm",
                        f"GPM unsupported on {gpm.count(False)} of {len(gpm)} GPU(s)",
                        "sm_active_ratio stays null there (GPM needs Hopper or later and a recent driver)",
                    )
                )
        return findings
    finally:
        gateway.shutdown()


def check_slurm(config: DaemonConfig) -> list[Finding]:
    """Slurm job cgroups, found as the ``job`` collector finds them, and the job-info files."""
    root = config.sysfs / "fs" / "cgroup"
    if not root.is_dir():
        return [
            Finding(
                WARN,
                "slurm",
                f"no cgroup filesystem at {root}",
                "job attribution needs the host's /sys/fs/cgroup",
            )
        ]
    version = cgroup_version(root)
    jobs = list_jobs(root)
    running = len({job.job_id for job in jobs})
    if version == 2:
        scopes = slurmstepd_scopes(root)
        if not scopes:
            return [
                Finding(
                    WARN,
                    "slurm",
                    "cgroup v2, no slurmstepd.scope",
                    "no Slurm jobs here (or slurmd is not using cgroup/v2 task containment)",
                )
            ]
        found = Finding(
            OK, "slurm", f"cgroup v2, {len(scopes)} slurmstepd scope(s), {running} job(s) running"
        )
        lacking = {scope.name: v2_fallback(scope) for scope in scopes}
        parts = sorted(
            {FALLBACK_NAMES[2][p] for missing_here in lacking.values() for p in missing_here}
        )
        if parts:
            where = ", ".join(name for name, missing_here in lacking.items() if missing_here)
            fallback = Finding(
                WARN,
                "slurm",
                f"cgroup v2 jobs without the {'/'.join(parts)} controller under {where}",
                "their figures come from their processes; Slurm enables for its jobs what its "
                "scope is given: delegate the controller down to it (systemd 244 and later "
                "delegates cpuset; a container runtime must pass it through)",
            )
            return [found, fallback, _check_job_info(config)]
    elif version == 1:
        hierarchies = ("cpuacct", "cpu,cpuacct", "freezer", "cpuset", "memory")
        if not any(any((root / h).glob("slurm*")) for h in hierarchies):
            return [
                Finding(
                    WARN,
                    "slurm",
                    "cgroup v1, no slurm hierarchy",
                    "no Slurm jobs here (TaskPlugin=task/cgroup enables them)",
                )
            ]
        found = Finding(OK, "slurm", f"cgroup v1, {running} job(s) running")
        missing = sorted({FALLBACK_NAMES[1][part] for job in jobs for part in job.fallback})
        if missing:
            fallback = Finding(
                WARN,
                "slurm",
                f"cgroup v1 jobs without a {'/'.join(missing)} cgroup",
                "their figures come from their processes; JobAcctGatherType="
                "jobacct_gather/cgroup, ConstrainRAMSpace=yes and ConstrainCores=yes give them one",
            )
            return [found, fallback, _check_job_info(config)]
    else:
        return [
            Finding(
                WARN,
                "slurm",
                f"neither a cgroup v2 nor a v1 hierarchy at {root}",
                "job attribution needs the host's /sys/fs/cgroup",
            )
        ]
    return [found, _check_job_info(config)]


def check_pods(config: DaemonConfig) -> list[Finding]:
    """The kubelet's pod-resources socket and the pods' cgroups, asked as the ``pod``
    collector asks them (one round of the collector itself)."""
    from telemetry.collectors.base import CollectorContext
    from telemetry.collectors.pod import PodCollector, find_pod_cgroups

    ctx = CollectorContext(
        procfs=config.procfs,
        sysfs=config.sysfs,
        node="doctor",
        rootfs=config.rootfs,
        podresources=config.podresources,
        k8s_tenant_label=config.k8s_tenant_label,
    )
    collector = PodCollector(ctx)
    cgroups = find_pod_cgroups(config.sysfs / "fs" / "cgroup")
    try:
        rows = collector.collect()
    except Exception as exc:  # the collector's own error boundary reports the same
        return [
            Finding(
                FAIL,
                "pods",
                f"{collector.socket}: {exc}",
                "run on a Kubernetes node with the kubelet's pod-resources socket mounted "
                "(--path.podresources), or --no-collector.pod",
            )
        ]
    finally:
        collector.close()
    pods = len(rows.get("job", []))
    shared = len({r["gpu_uuid"] for r in rows.get("gpu_job", [])})
    return [
        Finding(
            OK,
            "pods",
            f"{collector.socket}: {pods} pod(s) running with a cgroup ({len(cgroups)} pod "
            f"cgroup(s)), {shared} time-sliced GPU(s)",
        )
    ]


def _check_job_info(config: DaemonConfig) -> Finding:
    directory = config.slurm_job_info_dir
    problem = job_info_dir_problem(directory)
    if problem == "missing":
        return Finding(
            WARN,
            "slurm job-info",
            f"{directory} missing: accounts come from job environments, which jobs can change",
            "install deploy/slurm/prolog and epilog (docs/operations.md) or pass "
            "--slurm.job-info-dir",
        )
    if problem is not None:
        return Finding(
            FAIL,
            "slurm job-info",
            f"{directory} {problem}: its files are ignored",
            f"chown root {directory} && chmod 755 {directory}",
        )
    count = sum(1 for _ in directory.iterdir())
    return Finding(OK, "slurm job-info", f"{directory}: {count} job file(s)")


def check_data_dir(config: DaemonConfig) -> list[Finding]:
    directory = config.data_dir
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the daemon creates the rest; the doctor creates nothing
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".tally-doctor-") as probe:
            probe.write(b"x")
            probe.flush()
        free = os.statvfs(existing)
    except OSError as exc:
        return [
            Finding(
                FAIL,
                "data dir",
                f"{directory}: {exc.strerror or exc}",
                "create it and make it writable by the daemon's user, or pass --data-dir",
            )
        ]
    free_gib = free.f_bavail * free.f_frsize / 2**30
    status = OK if free_gib >= 1 else WARN
    created = "" if existing == directory else f" (will be created under {existing})"
    return [
        Finding(
            status,
            "data dir",
            f"{directory} writable{created}, {free_gib:.1f} GiB free",
            "free space: the daemon holds samples in memory while the disk is full",
        )
    ]


def check_port(config: DaemonConfig) -> list[Finding]:
    host, port = parse_listen(config.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            return [
                Finding(
                    FAIL,
                    "listen",
                    f"{config.listen}: {exc.strerror or exc}",
                    "another process holds the port (a running tally daemon?); pick another with --listen",
                )
            ]
    return [Finding(OK, "listen", f"{config.listen} is free")]


def check_settings(config: DaemonConfig) -> list[Finding]:
    """What ``DaemonConfig.check`` refuses: the listen address, interval against max-gap, roots."""
    try:
        config.check()
    except TallyError as exc:
        return [Finding(FAIL, "settings", str(exc), "fix the flag or config key it names")]
    return [
        Finding(
            OK,
            "settings",
            f"every {config.interval_seconds:g}s, gaps above {config.max_gap_seconds:g}s",
        )
    ]


def check_inventory(config: DaemonConfig) -> list[Finding]:
    """The inventory the daemon would load for its pool counters (``--inventory``)."""
    from telemetry.billing.inventory import load_inventory

    if config.inventory is None:
        return [Finding(OK, "inventory", "none given: no pool or tenant counters")]
    try:
        inventory = load_inventory(config.inventory)
    except TallyError as exc:
        return [
            Finding(
                FAIL,
                "inventory",
                str(exc),
                "fix the file (see docs/bills.md) or point --inventory at another; without it the daemon runs, with no pool counters",
            )
        ]
    pools = ", ".join(p.name for p in inventory.pools) or "no pools"
    return [Finding(OK, "inventory", f"{config.inventory}: {pools}")]


def check_web_config(config: DaemonConfig) -> list[Finding]:
    """The TLS and basic-auth file the daemon would load (``--web.config.file``)."""
    from exporters.webconfig import load_web_config

    if config.web_config is None:
        return [Finding(OK, "web config", "none given: plain HTTP, no authentication")]
    try:
        web = load_web_config(config.web_config)
    except TallyError as exc:
        return [
            Finding(
                FAIL,
                "web config",
                str(exc),
                "fix the file (see docs/operations.md) or point --web.config.file at another",
            )
        ]
    tls = "TLS" if web.tls is not None else "no TLS"
    users = len(web.users) if web.users else 0
    return [Finding(OK, "web config", f"{config.web_config}: {tls}, {users} basic-auth users")]


CHECKS: list[Callable[[DaemonConfig], list[Finding]]] = [
    check_settings, check_procfs, check_rapl, check_nvml, check_slurm, check_pods,
    check_data_dir, check_port, check_inventory, check_web_config,
]  # fmt: skip


# Checks that only matter while a collector runs: skipped with --no-collector.NAME.
COLLECTOR_OF: dict[Callable[[DaemonConfig], list[Finding]], tuple[str, str]] = {
    check_rapl: ("rapl", "rapl"),
    check_nvml: ("gpu", "nvml"),
    check_slurm: ("job", "slurm"),
    check_pods: ("pod", "pods"),
}


def _skipped(
    config: DaemonConfig, check: Callable[[DaemonConfig], list[Finding]]
) -> Finding | None:
    """A line saying the check is not run when its collector is off, else ``None``."""
    if check not in COLLECTOR_OF:
        return None
    name, what = COLLECTOR_OF[check]
    cls = REGISTRY.get(name)
    if cls is None or config.collectors.get(name, cls.default_enabled):
        return None
    return Finding(OK, what, f"not checked: the {name} collector is off")


def run_doctor(config: DaemonConfig, out: Callable[[str], None] = print) -> int:
    """Print one line per finding; 1 if any check failed, else 0."""
    findings: list[Finding] = []
    for check in CHECKS:
        skipped = _skipped(config, check)
        findings.extend([skipped] if skipped is not None else check(config))
    for finding in findings:
        out(finding.line())
    failed = sum(f.status == FAIL for f in findings)
    out(
        f"{len(findings)} checks: {failed} failed, {sum(f.status == WARN for f in findings)} warnings"
    )
    sys.stdout.flush()
    return 1 if failed else 0
