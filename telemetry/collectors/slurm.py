"""``job`` collector: the Slurm jobs running on this node, read from their cgroups.

Slurm puts every job in a cgroup of its own. With cgroup v2 that is
``<cgroup>/system.slice/slurmstepd.scope/job_<id>/`` (``<nodename>_slurmstepd.scope`` when
several slurmd run on one host), with the steps and tasks in sub-directories; with cgroup v1 it
is ``<cgroup>/<controller>/slurm/uid_<uid>/job_<id>/`` in each of the ``cpuset``, ``cpuacct`` and
``memory`` hierarchies. ``<cgroup>`` is ``<sysfs>/fs/cgroup``. The collector reads the job's
allocated CPUs, its cumulative CPU time and its current memory there, and the job's user,
account and GPUs from ``SLURM_JOB_*`` variables in the environment of one of its processes
(``<procfs>/<pid>/environ``, which only root can read for other users' processes); when no
process's environment is readable the user is the owner of the job's cgroup, by name.

Besides ``job`` rows it returns ``_gpu_job`` claims (``gpu_index`` → ``job_id`` from
``SLURM_JOB_GPUS``), a side output with which the GPU collector attributes GPUs to jobs.

Jobs end at any moment: a job whose files vanish while it is being read is left out of the
round, not an error. A cgroup file that is there but malformed fails the round (SPEC §7).
Parsers are pure functions of the file text.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from telemetry.collectors.base import Collector, CollectorContext, Row, register
from telemetry.errors import ParseError
from telemetry.logs import OnceLogger, log

#: Longest user, account or other environment string kept, in characters.
MAX_VALUE_CHARS = 1024

_INT64_MAX = 2**63 - 1
_INT16_MAX = 2**15 - 1
# A CPU number at or above this is garbage, not a big host: Linux's NR_CPUS tops out at 8192.
_CPU_LIMIT = 1 << 20
_ENVIRON_MAX_BYTES = 4 << 20  # a process's environment is at most a few MiB (ARG_MAX)
_MAX_PIDS_PER_JOB = 256  # environments tried per job and round before giving up
_MAX_DEPTH = 8  # job/step/user/task is 3 deep; anything deeper is not Slurm's
# Errors that mean "the job (or process) ended while we read it": the file is gone (ENOENT), the
# process is gone (ESRCH), or the cgroup was removed while a file of it was open (ENODEV).
_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV})

_JOB_DIR = re.compile(r"job_([0-9]+)")
_UID_DIR = re.compile(r"uid_([0-9]+)")


# ---------------------------------------------------------------- pure parsers


def _cpu_number(token: str, source: str) -> int:
    if not (token.isascii() and token.isdigit()) or len(token) > 7:
        raise ParseError(f"{source}: bad CPU number {token[:40]!r}")
    number = int(token)
    if number >= _CPU_LIMIT:
        raise ParseError(f"{source}: CPU number {number} out of range")
    return number


def parse_cpu_list(text: str, source: str = "cpuset") -> int:
    """Number of CPUs in a kernel CPU list such as ``4-7,10-11`` (→ 6).

    Blank text is the empty list (0). Overlapping entries count once. Raises ``ParseError`` on
    anything that is not a comma-separated list of ``N`` or ``N-M`` with ``N <= M``.
    """
    body = text.strip()
    if not body:
        return 0
    spans: list[tuple[int, int]] = []
    for part in body.split(","):
        first, dash, last = part.partition("-")
        low = _cpu_number(first, source)
        high = _cpu_number(last, source) if dash else low
        if high < low:
            raise ParseError(f"{source}: descending CPU range {part[:40]!r}")
        spans.append((low, high))
    spans.sort()
    count = 0
    end = -1  # highest CPU counted so far
    for low, high in spans:
        if high > end:
            count += high - max(low, end + 1) + 1
            end = high
    return count


def _non_negative_int(text: str, source: str) -> int:
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise ParseError(f"{source}: expected a non-negative integer, got {value[:40]!r}")
    number = int(value)
    if number > _INT64_MAX:
        raise ParseError(f"{source}: {number} does not fit in int64")
    return number


def parse_cpu_stat_usage_usec(text: str, source: str = "cpu.stat") -> int:
    """The ``usage_usec`` value of a cgroup v2 ``cpu.stat`` file (µs). Raises ``ParseError``."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return _non_negative_int(value, f"{source} usage_usec")
    raise ParseError(f"{source}: no usage_usec line")


def parse_counter(text: str, source: str) -> int:
    """A cgroup file holding one non-negative integer (``memory.current``, ``cpuacct.usage``)."""
    return _non_negative_int(text, source)


def parse_environ(data: bytes) -> dict[str, str]:
    """``/proc/<pid>/environ`` (``NAME=value`` entries separated by NUL) as a dict.

    Bytes that are not UTF-8 become U+FFFD; names and values are cut to ``MAX_VALUE_CHARS``
    characters; entries without ``=`` or with an empty name are skipped; the first of repeated
    names wins, as for ``getenv``. Never raises for any input.
    """
    env: dict[str, str] = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if not sep or not name:
            continue
        key = name.decode("utf-8", errors="replace")[:MAX_VALUE_CHARS]
        if key not in env:
            env[key] = value.decode("utf-8", errors="replace")[:MAX_VALUE_CHARS]
    return env


def _list_entries(value: str) -> list[str]:
    """Distinct non-blank entries of a comma-separated list, in order."""
    seen: dict[str, None] = {}
    for part in value.split(","):
        entry = part.strip()
        if entry:
            seen.setdefault(entry, None)
    return list(seen)


def _visible_devices(value: str) -> int:
    """Devices ``CUDA_VISIBLE_DEVICES`` makes visible: indices or ``GPU-``/``MIG-`` UUIDs.

    As in CUDA, an invalid entry (``-1``, ``NoDevFiles``) hides itself and everything after it.
    """
    count = 0
    for entry in _list_entries(value):
        if not ((entry.isascii() and entry.isdigit()) or entry.startswith(("GPU-", "MIG-"))):
            break
        count += 1
    return count


def gpus_from_environ(env: dict[str, str]) -> tuple[int, tuple[int, ...]]:
    """GPUs a job holds per its environment: (count, GPU indices claimed).

    The count is the entries of ``SLURM_JOB_GPUS`` (the job's GPU indices on this node), else
    the devices in ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, which may be renumbered per task,
    so they make no claims), else 0. Claims are the ``SLURM_JOB_GPUS`` entries that are valid
    NVML indices.
    """
    slurm = _list_entries(env.get("SLURM_JOB_GPUS", ""))
    if slurm:
        claims = tuple(
            int(entry)
            for entry in slurm
            if entry.isascii() and entry.isdigit() and len(entry) <= 5 and int(entry) <= _INT16_MAX
        )
        return len(slurm), claims
    return _visible_devices(env.get("CUDA_VISIBLE_DEVICES", "")), ()


def user_name_for_uid(uid: int) -> str:
    """The default user resolver: the passwd name of ``uid``; raises ``KeyError`` if none."""
    return pwd.getpwuid(uid).pw_name


# ---------------------------------------------------------------- file access (patchable)


def read_text(path: Path) -> str:
    """Read a cgroup file (module-level so tests can make a job vanish mid-read)."""
    return path.read_text(encoding="utf-8", errors="replace")


def read_environ(path: Path) -> bytes:
    """Read a process's environment, at most a few MiB."""
    with path.open("rb") as handle:
        return handle.read(_ENVIRON_MAX_BYTES)


def _is_gone(exc: OSError) -> bool:
    return isinstance(exc, FileNotFoundError | ProcessLookupError) or exc.errno in _GONE


def _subdirs(path: Path) -> list[Path]:
    """Sub-directories of ``path`` sorted by name; none if it is missing or unreadable."""
    try:
        with os.scandir(path) as entries:
            names = [e.name for e in entries if _is_dir(e)]
    except OSError:
        return []
    return [path / name for name in sorted(names)]


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


# ---------------------------------------------------------------- job cgroups


@dataclass(frozen=True)
class JobCgroup:
    """Where one job's files are. ``procs_dir`` is the tree whose ``cgroup.procs`` list its PIDs."""

    job_id: str
    procs_dir: Path
    cpus_files: tuple[Path, ...]  # the first non-empty one counts
    usage_file: Path  # v2 cpu.stat (µs) or v1 cpuacct.usage (ns)
    memory_file: Path
    uid: int | None  # v1: from the uid_<uid> directory; v2: None, the owner of procs_dir
    version: int  # 2: usage_file is cpu.stat; 1: it is cpuacct.usage


def list_jobs(cgroup_root: Path) -> list[JobCgroup]:
    """Every Slurm job cgroup under ``cgroup_root``: v2 layouts first, then v1; ids unique."""
    jobs: dict[str, JobCgroup] = {}
    for job in [*_v2_jobs(cgroup_root), *_v1_jobs(cgroup_root)]:
        jobs.setdefault(job.job_id, job)
    return list(jobs.values())


def _v2_jobs(root: Path) -> Iterator[JobCgroup]:
    for scope in _subdirs(root / "system.slice"):
        if not scope.name.endswith("slurmstepd.scope"):
            continue
        for job in _subdirs(scope):
            match = _JOB_DIR.fullmatch(job.name)
            if match:
                yield JobCgroup(
                    job_id=match.group(1),
                    procs_dir=job,
                    cpus_files=(job / "cpuset.cpus.effective", job / "cpuset.cpus"),
                    usage_file=job / "cpu.stat",
                    memory_file=job / "memory.current",
                    uid=None,
                    version=2,
                )


def _v1_jobs(root: Path) -> Iterator[JobCgroup]:
    cpuacct = root / "cpuacct"
    for top in _subdirs(cpuacct):
        if top.name != "slurm" and not top.name.startswith("slurm_"):
            continue
        for uid_dir in _subdirs(top):
            uid_match = _UID_DIR.fullmatch(uid_dir.name)
            if not uid_match:
                continue
            for job in _subdirs(uid_dir):
                match = _JOB_DIR.fullmatch(job.name)
                if not match:
                    continue
                rel = job.relative_to(cpuacct)
                cpuset = root / "cpuset" / rel
                yield JobCgroup(
                    job_id=match.group(1),
                    procs_dir=job,
                    cpus_files=(cpuset / "cpuset.effective_cpus", cpuset / "cpuset.cpus"),
                    usage_file=job / "cpuacct.usage",
                    memory_file=root / "memory" / rel / "memory.usage_in_bytes",
                    uid=int(uid_match.group(1)),
                    version=1,
                )


def job_pids(procs_dir: Path) -> Iterator[int]:
    """PIDs in ``cgroup.procs`` of ``procs_dir`` and its sub-directories, top-down, by name."""
    seen: set[int] = set()
    for dirpath, dirnames, _ in os.walk(procs_dir):
        depth = len(Path(dirpath).relative_to(procs_dir).parts)
        dirnames[:] = sorted(dirnames) if depth < _MAX_DEPTH else []
        try:
            text = read_text(Path(dirpath) / "cgroup.procs")
        except OSError:
            continue  # a step or task that ended, or a directory without the file
        for line in text.split():
            if line.isascii() and line.isdigit() and len(line) <= 10:
                pid = int(line)
                if pid > 0 and pid not in seen:
                    seen.add(pid)
                    yield pid


@dataclass(frozen=True)
class _JobInfo:
    user: str | None  # None: not in the environment, resolve the cgroup owner
    account: str
    gpus: int
    gpu_indices: tuple[int, ...]


_NO_INFO = _JobInfo(user=None, account="unknown", gpus=0, gpu_indices=())


def _info_from_environ(env: dict[str, str]) -> _JobInfo:
    gpus, claims = gpus_from_environ(env)
    return _JobInfo(
        user=env.get("SLURM_JOB_USER") or None,
        account=env.get("SLURM_JOB_ACCOUNT") or "unknown",
        gpus=gpus,
        gpu_indices=claims,
    )


@register
class SlurmJobCollector(Collector):
    name = "job"
    help = (
        "Slurm jobs on this node from their cgroups (v1 and v2): CPUs, CPU time, memory, "
        "GPUs, user and account"
    )
    default_enabled = True

    def __init__(
        self, ctx: CollectorContext, resolve_user: Callable[[int], str] | None = None
    ) -> None:
        """``resolve_user`` maps a uid to a user name (default :func:`user_name_for_uid`)."""
        super().__init__(ctx)
        self._resolve_user = resolve_user
        self._info: dict[tuple[str, Path], _JobInfo] = {}
        self._names: dict[int, str] = {}
        self._once = OnceLogger(log)

    def collect(self) -> dict[str, list[Row]]:
        rows: list[Row] = []
        claims: list[Row] = []
        seen: set[tuple[str, Path]] = set()
        for job in list_jobs(self.ctx.sysfs / "fs" / "cgroup"):
            try:
                row, info = self._read_job(job)
            except OSError as exc:
                if not _is_gone(exc):
                    raise
                self._report_missing(job, exc)
                continue
            rows.append(row)
            seen.add((job.job_id, job.procs_dir))
            claims.extend({"gpu_index": i, "job_id": job.job_id} for i in info.gpu_indices)
        for key in self._info.keys() - seen:
            del self._info[key]
        return {"job": rows, "_gpu_job": claims}

    def _read_job(self, job: JobCgroup) -> tuple[Row, _JobInfo]:
        cpus = self._cpus(job)
        usage = read_text(job.usage_file)
        if job.version == 2:
            cpu_seconds = parse_cpu_stat_usage_usec(usage, str(job.usage_file)) / 1e6
        else:
            cpu_seconds = parse_counter(usage, str(job.usage_file)) / 1e9
        memory = parse_counter(read_text(job.memory_file), str(job.memory_file))
        info = self._job_info(job)
        user = info.user
        if user is None:
            uid = job.uid if job.uid is not None else job.procs_dir.stat().st_uid
            user = self._user_name(uid)
        row: Row = {
            "job_id": job.job_id,
            "user": user,
            "account": info.account,
            "cpus_allocated": float(cpus),
            "gpus_allocated": float(info.gpus),
            "cpu_seconds": cpu_seconds,
            "memory_bytes": memory,
        }
        return row, info

    @staticmethod
    def _cpus(job: JobCgroup) -> int:
        """CPUs in the first non-empty cpuset file; 0 if all are empty, gone if all are missing."""
        missing: list[FileNotFoundError] = []
        for path in job.cpus_files:
            try:
                text = read_text(path)
            except FileNotFoundError as exc:
                missing.append(exc)
                continue
            if text.strip():
                return parse_cpu_list(text, str(path))
        if len(missing) == len(job.cpus_files):
            raise missing[0]
        return 0

    def _job_info(self, job: JobCgroup) -> _JobInfo:
        """User, account and GPUs from the first process environment that names the job.

        Found once per job and kept; while none is readable the job has ``_NO_INFO`` and the
        search is repeated next round.
        """
        key = (job.job_id, job.procs_dir)
        cached = self._info.get(key)
        if cached is not None:
            return cached
        for tried, pid in enumerate(job_pids(job.procs_dir)):
            if tried >= _MAX_PIDS_PER_JOB:
                break
            try:
                data = read_environ(self.ctx.procfs / str(pid) / "environ")
            except OSError:
                continue  # gone, or not ours to read: try the next process
            env = parse_environ(data)
            if "SLURM_JOB_USER" in env or "SLURM_JOB_ID" in env:
                info = _info_from_environ(env)
                self._info[key] = info
                return info
        return _NO_INFO

    def _user_name(self, uid: int) -> str:
        name = self._names.get(uid)
        if name is not None:
            return name
        resolve = self._resolve_user or user_name_for_uid
        try:
            name = resolve(uid)[:MAX_VALUE_CHARS]
        except (KeyError, ValueError, OverflowError, OSError):
            return str(uid)  # not cached: a directory service may answer next time
        if len(self._names) >= 4096:
            self._names.clear()
        self._names[uid] = name
        return name

    def _report_missing(self, job: JobCgroup, exc: OSError) -> None:
        """A job whose file is missing while its cgroup is still there: a controller is off."""
        if not job.procs_dir.is_dir() or exc.filename is None:
            return  # the job ended while we read it
        self._once.warning(
            f"missing:{Path(exc.filename).name}",
            f"job: {Path(exc.filename).name} missing in Slurm job cgroups (controller not "
            f"enabled?), e.g. {exc.filename}; such jobs are left out",
        )
