"""The exporter's own ``process_*`` families, as prometheus-client's ``ProcessCollector`` names
them (dashboards and alerts key on these names), rendered from columns like every other family.

Why not the client's collector: importing prometheus-client costs the node daemon 2 MiB of its
resident memory and each of its scrapes one object per sample; these six values are three small
reads. The process is the exporter itself, so the files are its own ``/proc/self`` in its own PID
namespace, never the ``--path.procfs`` of the host it watches.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from exporters.exposition import ColumnFamily

SELF = Path("/proc/self")


def _read(path: str) -> str:
    """A small /proc file's text, by plain ``os`` calls (read at every scrape: a text stream and
    pathlib's joins cost more than the read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def parse_stat(text: str, ticks: float, page_size: int, boot_time: float) -> dict[str, float]:
    """``process_*`` values from ``/proc/<pid>/stat``: CPU seconds (user + system), virtual and
    resident memory in bytes, start time in seconds since the epoch. Raises ``ValueError`` for a
    malformed line."""
    fields = text.rsplit(")", 1)[1].split()
    if len(fields) < 22:
        raise ValueError(f"stat has {len(fields)} fields after the command, expected 22 or more")
    return {
        "cpu_seconds": int(fields[11]) / ticks + int(fields[12]) / ticks,  # as the client adds
        "virtual_memory_bytes": float(fields[20]),
        "resident_memory_bytes": float(int(fields[21]) * page_size),
        "start_time_seconds": int(fields[19]) / ticks + boot_time,
    }


def fd_dir_sized(fd_dir: str) -> bool:
    """Whether ``fd_dir``, this process's ``/proc/self/fd``, tells its entries by its size (Linux
    6.2 and later): one ``stat`` instead of a listing of a daemon's hundreds of kept files (a
    tenth of a millisecond a scrape). Asked once; an ordinary directory's size tells nothing."""
    try:
        size = os.stat(fd_dir).st_size
        listed = len(os.listdir(fd_dir))
    except OSError:
        return False
    return size > 0 and size == listed - 1  # the listing's own descriptor, which stat has not


def open_fds(fd_dir: str, sized: bool) -> int:
    """Entries of ``fd_dir`` as a listing counts them (the client's ``process_open_fds``, the
    listing's own descriptor included); by its size where ``sized`` (:func:`fd_dir_sized`).
    Raises ``OSError`` where it cannot be read."""
    return os.stat(fd_dir).st_size + 1 if sized else len(os.listdir(fd_dir))


def parse_max_fds(limits: str) -> float | None:
    """The soft ``Max open files`` limit of ``/proc/<pid>/limits``; None when unlimited or
    absent."""
    for line in limits.splitlines():
        if line.startswith("Max open files"):
            value = line.split()[3]
            return float(value) if value.isdigit() else None
    return None


def parse_boot_time(stat: str) -> float:
    """``btime`` of ``/proc/stat`` (seconds since the epoch); raises ``ValueError`` if absent."""
    for line in stat.splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ValueError("/proc/stat has no btime line")


# name → (kind, help), in prometheus-client's order.
FAMILIES: dict[str, tuple[str, str]] = {
    "process_virtual_memory_bytes": ("gauge", "Virtual memory size in bytes."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_start_time_seconds": (
        "gauge",
        "Start time of the process since unix epoch in seconds.",
    ),
    "process_cpu_seconds": ("counter", "Total user and system CPU time spent in seconds."),
    "process_open_fds": ("gauge", "Number of open file descriptors."),
    "process_max_fds": ("gauge", "Maximum number of open file descriptors."),
}


class ProcessFamilies:
    """The ``process_*`` families of this process at each call; none where ``/proc`` cannot be
    read (not Linux, or hidden)."""

    def __init__(self, proc_self: Path = SELF) -> None:
        self._stat, self._limits, self._fd = (str(proc_self / n) for n in ("stat", "limits", "fd"))
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._page_size = os.sysconf("SC_PAGESIZE")
        self._fd_sized = fd_dir_sized(self._fd)
        try:
            self._boot_time: float | None = parse_boot_time((proc_self.parent / "stat").read_text())
        except (OSError, ValueError):
            self._boot_time = None

    def __call__(self) -> list[ColumnFamily]:
        if self._boot_time is None:
            return []
        values: dict[str, float] = {}
        try:
            stat = parse_stat(_read(self._stat), self._ticks, self._page_size, self._boot_time)
            values.update({f"process_{k}": v for k, v in stat.items()})
        except (OSError, ValueError, IndexError):
            pass
        try:
            max_fds = parse_max_fds(_read(self._limits))
            values["process_open_fds"] = float(open_fds(self._fd, self._fd_sized))
            if max_fds is not None:
                values["process_max_fds"] = max_fds
        except OSError:
            pass
        families = []
        for name, (kind, doc) in FAMILIES.items():
            if name in values:
                family = ColumnFamily(name, kind, doc, ())
                family.add([], np.array([values[name]]))
                families.append(family)
        return families
