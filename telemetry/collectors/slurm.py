"""``job`` collector: the Slurm jobs running on this node, read from their cgroups.

Slurm puts every job in a cgroup of its own. With cgroup v2 that is
``<cgroup>/system.slice/slurmstepd.scope/job_<id>/`` (``<nodename>_slurmstepd.scope`` when
several slurmd run on one host; since Slurm 26.05 the job directory is named by the job's SLUID,
``s`` and 13 Crockford base-32 digits, unless cgroup.conf sets ``CgroupJobIdPaths=yes``), with
the steps in ``step_<s>/`` and their processes in ``step_<s>/user/task_<n>/`` (slurmstepd itself
in ``step_<s>/slurm/``); with cgroup v1 it is ``<cgroup>/<controller>/slurm/uid_<uid>/job_<id>/``
(``slurm_<nodename>/`` for several slurmd) in each of the ``cpuacct``, ``freezer``, ``cpuset`` and
``memory`` hierarchies Slurm uses on the node (the cpuacct one only with jobacct_gather/cgroup,
memory with ConstrainRAMSpace, cpuset with ConstrainCores; what one it does not use would tell
comes from the job's processes). ``<cgroup>`` is
``<sysfs>/fs/cgroup``; :func:`cgroup_version` decides which of the two the host runs, for this
collector and ``tally doctor`` alike.

The collector reads the job's allocated CPUs, its cumulative CPU time and its current memory in
the cgroup. Who the job belongs to comes from what the job cannot change:

- the **uid**: v1 from the ``uid_<uid>`` directory, v2 the real uid (``/proc/<pid>/status``) of
  the job's own task processes; it is named by the root-owned job-info file, else by
  ``SLURM_JOB_USER`` of an environment whose ``SLURM_JOB_UID`` is that uid, else by the passwd
  name, else it is the number;
- the **account**: from the job-info file a Slurm prolog writes (``--slurm.job-info-dir``, see
  ``deploy/slurm/``; ``account_source`` "job-info"), else from the job's environment, which the
  job's owner controls (``account_source`` "environment", untrusted), else ``unknown``;
- the **GPUs**: job-info ``gpus=``, else ``SLURM_JOB_GPUS`` of the batch (or interactive)
  step, the ``SLURM_STEP_GPUS`` of the steps taken together (on nodes without the batch step,
  where an inherited ``SLURM_JOB_GPUS`` names the batch node's GPUs), ``CUDA_VISIBLE_DEVICES``
  in that order. A job on GPU **shards** (job-info ``shards=``; without a job-info file
  ``SLURM_SHARDS_ON_NODE``) holds shards / shards-of-the-GPU of the GPUs it names, as the node's
  gres.conf tells (``<rootfs>/etc/slurm/``, else where configless slurmd keeps it, see
  ``GRES_CONF_PATHS``; its lines for this node, ``Name=shard Count=N`` over the GPU files); its
  claims carry that share and its ``gpus_allocated`` is their sum. Where gres.conf does not
  say, the job counts its GPUs whole (one log line). A job on **MPS** (``gres/mps``) holds the
  job-info ``mps_percentage`` of its GPUs the same way (the prolog's alone: users set
  ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` themselves).

An environment (``<procfs>/<pid>/environ``, which only root can read for other users'
processes) counts only if its ``SLURM_JOB_ID`` (or ``SLURM_JOB_SLUID``) is the cgroup's job;
user and account are taken together from one that has ``SLURM_JOB_USER``. The job's step
processes are read first, the batch script's before all; the search goes on over the rounds,
at most ``_MAX_PIDS_PER_JOB`` new processes a job and round, until user, account and GPUs are
known: GPUs are known from ``SLURM_JOB_GPUS``, or from a batch-step environment with no GPU
variable at all (Slurm sets that one there whenever the job holds GPUs on the node), or, where
no batch step runs, once every process was read for its step's ``SLURM_STEP_GPUS``. Jobs
are keyed by (slurmd scope, job): the same job under two slurmd on one host adds up.

Besides ``job`` rows it returns ``_gpu_job`` claims (``gpu_index`` → ``job_id``, ``share`` for
shards), a side output
with which the GPU collector attributes GPUs to jobs, and ``_job_alias`` rows (``cgroup`` name →
``job_id``) for jobs whose cgroup is named by SLUID.

Jobs end at any moment: a job whose files vanish while it is being read is left out of the
round, not an error. A cgroup file that is there but malformed fails that job for the round
(one log line), not the other jobs. Parsers are pure functions of the file text.
"""

from __future__ import annotations

import errno
import functools
import math
import operator
import os
import pwd
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path

from telemetry.collectors.base import (
    CheckedRows,
    Collector,
    CollectorContext,
    Columns,
    Row,
    check_rows,
    register,
)
from telemetry.collectors.files import KeptFiles, kept_files_limit, read_text
from telemetry.collectors.jobinfo import MAX_VALUE_CHARS, JobInfoFiles, job_info_dir_problem
from telemetry.collectors.watch import DirectoryWatch
from telemetry.errors import ParseError
from telemetry.hostlist import expand_hostlist
from telemetry.logs import OnceLogger, log

_INT64_MAX = 2**63 - 1
# Digits of a decimal that always fits int64: a counter this short is read without a closer look.
_INT64_SAFE_DIGITS = 18
# What a counter of that many digits holds at most, and CPU seconds from such microseconds.
_SAFE_NUMBER = 10**_INT64_SAFE_DIGITS
_SAFE_SECONDS = _SAFE_NUMBER / 1e6
_INT16_MAX = 2**15 - 1
# A CPU number at or above this is garbage, not a big host: Linux's NR_CPUS tops out at 8192.
_CPU_LIMIT = 1 << 20
_ENVIRON_MAX_BYTES = 4 << 20  # a process's environment is at most a few MiB (ARG_MAX)
_MAX_PIDS_PER_JOB = 256  # environments tried per job and round before giving up
_MAX_DEPTH = 8  # job/step/user/task is 3 deep; anything deeper is not Slurm's
# An incomplete search (typically a CPU-only job on a node its batch step does not run on: no
# environment there will ever name its GPUs) that
# found no process not already read waits this long before walking the job's cgroup again,
# doubling up to the maximum; most of a round's cost on a node of many jobs was these walks.
_RESEARCH_FIRST_S = 1.0
_RESEARCH_MAX_S = 8.0
# A job's CPUs are its cpuset, which slurmd writes just after it makes the job's cgroup (a read
# in between sees the parent's CPUs) and which then holds for the job's life, CPU hotplug aside.
# So a job's cpuset is read every round until it has read the same for this long, and then once
# this often; a requeued job's new cgroup (whose files had to be opened anew, or whose CPU time
# started again from 0) is read at once.
CPUSET_RECHECK_SECONDS = 10.0
# How long the job collector goes without a plan of settled jobs (SlurmJobCollector._plan) when
# it found none to make, or its files did not read as it said.
PLAN_RETRY_SECONDS = 5.0
# How often the plan is made again whatever happened: a job that became plannable otherwise
# than by its cpuset settling (the search of its processes ended) joins then.
PLAN_REMAKE_SECONDS = 60.0
# Errors that mean "the job (or process) ended while we read it": the file is gone (ENOENT), the
# process is gone (ESRCH), or the cgroup was removed while a file of it was open (ENODEV).
_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV})

_JOB_DIR = re.compile(r"job_([0-9]+)")
JobKey = tuple[str, str]  # (slurmd scope, job id): JobCgroup.key
# The first line of each cgroup v2 cpu.stat (µs) in the planned jobs' files, each after a NUL
# (which no kernel text holds): one match at the start of every file, or the plan does not hold.
_USAGE_LINES = re.compile(rb"\0usage_usec ([0-9]{1,18})\n")
# Each memory.current, after a NUL likewise: the whole file one number and a newline.
_MEMORY_LINES = re.compile(rb"\0([0-9]{1,18})\n(?=\0|\Z)")
# What the plan reads of each file at most, as KeptFiles reads one (a cpu.stat is a few lines).
_PLAN_READ_BYTES = 65536
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


def _non_negative_int(text: str, source: str | Path, what: str = "") -> int:
    """``text`` as an int64 >= 0; ``source`` (and ``what`` of it) name it in the error only."""
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise ParseError(f"{source}{what}: expected a non-negative integer, got {value[:40]!r}")
    number = int(value)
    if number > _INT64_MAX:
        raise ParseError(f"{source}{what}: {number} does not fit in int64")
    return number


def parse_cpu_stat_usage_usec(text: str, source: str | Path = "cpu.stat") -> int:
    """The ``usage_usec`` value of a cgroup v2 ``cpu.stat`` file (µs). Raises ``ParseError``."""
    if text.startswith("usage_usec "):  # the kernel's first line: no need to split them all
        end = text.find("\n")
        value = (text[11:end] if end >= 0 else text[11:]).strip()
        if value.isascii() and value.isdigit():
            if len(value) <= _INT64_SAFE_DIGITS:
                return int(value)
            return _non_negative_int(value, source, " usage_usec")
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return _non_negative_int(value, source, " usage_usec")
    raise ParseError(f"{source}: no usage_usec line")


def parse_counter(text: str, source: str | Path) -> int:
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


def _gpu_claims(entries: list[str]) -> tuple[int, ...]:
    return tuple(
        int(entry)
        for entry in entries
        if entry.isascii() and entry.isdigit() and len(entry) <= 5 and int(entry) <= _INT16_MAX
    )


# How much a GPU answer is worth: the job's own list beats a step's, which beats what CUDA sees.
GPUS_NONE, GPUS_CUDA, GPUS_STEP, GPUS_JOB = 0, 1, 2, 3


def gpu_evidence(env: dict[str, str], batch: bool = True) -> tuple[int, int, tuple[int, ...]]:
    """GPUs a job holds per one environment: (rank, count, GPU indices claimed).

    ``SLURM_JOB_GPUS`` (the job's GPU indices on this node; rank ``GPUS_JOB``), else
    ``SLURM_STEP_GPUS`` (the step's, set for ``srun`` steps outside a batch job; ``GPUS_STEP``),
    else the devices in ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, which may be renumbered per
    task, so they make no claims; ``GPUS_CUDA``), else nothing (``GPUS_NONE``, count 0). Claims
    are the listed entries that are valid NVML indices. Slurm sets ``SLURM_JOB_GPUS`` only in
    the batch (or interactive) step; a step elsewhere inherits it from the batch node through
    ``srun``, where it names that node's GPUs: read from an environment that is not the batch
    step's (``batch`` False) it is passed over.
    """
    names = (("SLURM_JOB_GPUS", GPUS_JOB),) if batch else ()
    for name, rank in (*names, ("SLURM_STEP_GPUS", GPUS_STEP)):
        entries = _list_entries(env.get(name, ""))
        if entries:
            return rank, len(entries), _gpu_claims(entries)
    if "CUDA_VISIBLE_DEVICES" in env:
        return GPUS_CUDA, _visible_devices(env["CUDA_VISIBLE_DEVICES"]), ()
    return GPUS_NONE, 0, ()


def gpus_from_environ(env: dict[str, str]) -> tuple[int, tuple[int, ...]]:
    """GPUs a job holds per its environment: (count, GPU indices claimed).

    See :func:`gpu_evidence`, which also says how good the answer is.
    """
    _, count, claims = gpu_evidence(env)
    return count, claims


_DEVICE_FILE = re.compile(r"^/dev/nvidia(?:\[([0-9,\-]+)\]|([0-9]+))$")


def _ascii_digits(text: str) -> bool:
    """Whether ``text`` is a plain decimal number (``str.isdigit`` takes "²", which ``int``
    refuses)."""
    return text.isascii() and text.isdigit()


def _device_indices(files: str) -> list[int]:
    """``/dev/nvidia[0-3]``, ``/dev/nvidia0,/dev/nvidia1`` → GPU indices (unknown forms: [])."""
    out: list[int] = []
    for item in re.split(r",(?![^\[]*\])", files):
        match = _DEVICE_FILE.match(item.strip())
        if match is None:
            return []
        if match.group(2) is not None:
            out.append(int(match.group(2)))
            continue
        for part in match.group(1).split(","):
            low, _, high = part.partition("-")
            if not _ascii_digits(low) or (high and not _ascii_digits(high)):
                return []
            out.extend(range(int(low), int(high or low) + 1))
    return out


#: Where a node's gres.conf is, below ``--path.rootfs``, first found wins: the packaged place,
#: older Debian packages' place, and where slurmd keeps what it fetched in configless mode.
GRES_CONF_PATHS = (
    "etc/slurm/gres.conf",
    "etc/slurm-llnl/gres.conf",
    "run/slurm/conf/gres.conf",
    "var/spool/slurmd/conf-cache/gres.conf",
)


def parse_gres_shards(text: str, node: str | None = None) -> dict[int, int]:
    """Shards of each GPU index per a node's gres.conf: ``Name=shard Count=N`` lines, their
    count spread evenly over their ``File=`` GPUs, else over every ``Name=gpu`` file.

    A gres.conf is usually shared by the cluster: a line with ``NodeName=`` (a hostlist) counts
    for those nodes only. Lines for ``node`` are read; where no line names it (slurmd may know
    the node by another name), the file must give every node it names the same shards, or it
    does not tell. A shape this does not understand gives {} (shares unknown), never a guess."""
    common: list[dict[str, str]] = []  # lines for every node
    groups: dict[tuple[str, ...], list[dict[str, str]]] = {}  # lines by their NodeName
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key.lower()] = value
        if "nodename" not in fields:
            common.append(fields)
            continue
        try:
            names = tuple(expand_hostlist(fields["nodename"]))
        except ValueError:
            return {}
        groups.setdefault(names, []).append(fields)
    if not groups:
        return _shards_of(common)
    known_as = {node, node.split(".")[0]} if node else set()  # slurmd uses the short name
    mine = [fields for names, lines in groups.items() if known_as & set(names) for fields in lines]
    if mine:
        return _shards_of(common + mine)
    answers = {tuple(sorted(_shards_of(common + lines).items())) for lines in groups.values()}
    return dict(answers.pop()) if len(answers) == 1 else {}


def _shards_of(lines: list[dict[str, str]]) -> dict[int, int]:
    """Shards per GPU index of one node's gres.conf lines (keys lower-cased); {} where unsure."""
    gpus: list[int] = []
    shards: list[tuple[int, list[int]]] = []
    for fields in lines:
        name = fields.get("name", "").split(":")[0].lower()
        files = _device_indices(fields["file"]) if "file" in fields else []
        if name == "gpu":
            gpus.extend(files)
        elif name == "shard":
            text = fields.get("count", "")
            if not _ascii_digits(text):
                return {}
            shards.append((int(text), files))
    out: dict[int, int] = {}
    for count, files in shards:
        over = files or sorted(set(gpus))
        if not over or count % len(over):
            return {}
        for index in over:
            out[index] = out.get(index, 0) + count // len(over)
    return out


def parse_status_uid(text: str, source: str = "status") -> int:
    """The real uid of a process from ``/proc/<pid>/status`` (``Uid:`` real, effective, saved, fs).

    Raises ``ParseError`` when the line is missing or not four numbers.
    """
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == "Uid":
            fields = rest.split()
            if len(fields) != 4 or not all(f.isascii() and f.isdigit() for f in fields):
                raise ParseError(f"{source}: bad Uid line {line[:60]!r}")
            uid = int(fields[0])
            if uid >= 2**32:
                raise ParseError(f"{source}: uid {uid} out of range")
            return uid
    raise ParseError(f"{source}: no Uid line")


def parse_passwd(text: str) -> dict[int, str]:
    """uid → name from ``/etc/passwd`` text; malformed lines are skipped, the first entry wins."""
    names: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or not fields[0] or not (fields[2].isascii() and fields[2].isdigit()):
            continue
        names.setdefault(int(fields[2]), fields[0][:MAX_VALUE_CHARS])
    return names


def user_name_for_uid(uid: int) -> str:
    """The default user resolver: the passwd name of ``uid`` (through NSS, so LDAP and SSSD
    users are found); raises ``KeyError`` if none."""
    return pwd.getpwuid(uid).pw_name


def passwd_file_resolver(path: Path) -> Callable[[int], str]:
    """A resolver reading ``path`` (the host's ``/etc/passwd`` under ``--path.rootfs``).

    The file is read at each call (answers are cached by the collector); raises ``KeyError`` for
    a uid it does not list and ``OSError`` when it cannot be read.
    """

    def resolve(uid: int) -> str:
        return parse_passwd(path.read_text(encoding="utf-8", errors="replace"))[uid]

    return resolve


# ---------------------------------------------------------------- file access (patchable)


def read_cgroup_usage(
    version: int,
    usage_file: Path | str,
    memory_file: Path | str,
    files: KeptFiles | None = None,
    owner: object = None,
) -> tuple[float, int]:
    """CPU seconds and memory bytes of a job's or pod's cgroup: v2 ``cpu.stat`` usage_usec or v1
    ``cpuacct.usage`` (ns), and the memory file's one integer; read through ``files`` (kept
    open for ``owner``) when given. Raises ``OSError`` (gone, not readable) or ``ParseError``."""
    if files is None:
        usage, memory = read_text(Path(usage_file)), read_text(Path(memory_file))
    else:
        usage = files.read(owner, usage_file)
        memory = files.read(owner, memory_file)
    if version == 2:
        cpu_seconds = parse_cpu_stat_usage_usec(usage, usage_file) / 1e6
    else:
        cpu_seconds = _non_negative_int(usage, usage_file) / 1e9
    value = memory.strip()  # parse_counter, inline where the value is plainly an int64
    if value.isascii() and value.isdigit() and len(value) <= _INT64_SAFE_DIGITS:
        return cpu_seconds, int(value)
    return cpu_seconds, _non_negative_int(memory, memory_file)


def read_environ(path: Path) -> bytes:
    """Read a process's environment, at most a few MiB."""
    with path.open("rb") as handle:
        return handle.read(_ENVIRON_MAX_BYTES)


def _is_gone(exc: OSError) -> bool:
    return isinstance(exc, FileNotFoundError | ProcessLookupError) or exc.errno in _GONE


def _subdirs(path: Path, scanned: list[str] | None = None) -> list[Path]:
    """Sub-directories of ``path`` sorted by name; none if it is missing or unreadable."""
    return [path / name for name in _subdir_names(path, scanned)]


def _subdir_names(path: Path | str, scanned: list[str] | None = None) -> list[str]:
    """Names of the sub-directories of ``path``, sorted; none if it is missing or unreadable.
    ``scanned``: gets ``path`` where it could be listed."""
    try:
        with os.scandir(path) as entries:
            names = sorted([e.name for e in entries if _is_dir(e)])
    except OSError:
        return []
    if scanned is not None:
        scanned.append(str(path))
    return names


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


# ---------------------------------------------------------------- job cgroups

_SLUID_DIR = re.compile(r"s[0-9A-HJKMNP-TV-Z]{13}")  # Slurm >= 26.05: "s" + Crockford base 32


def cgroup_version(cgroup_root: Path) -> int | None:
    """Which cgroup layout Slurm uses under ``cgroup_root`` (``<sysfs>/fs/cgroup``).

    2 when the root is the unified hierarchy (it has ``cgroup.controllers``); 1 when it holds v1
    controller hierarchies (``cpuacct`` or ``cpu,cpuacct``; a hybrid host, whose v2 tree is
    mounted at ``unified/``, is this: Slurm runs cgroup/v1 there); ``None`` when neither.
    The one answer for this collector and ``tally doctor``.
    """
    if (cgroup_root / "cgroup.controllers").is_file():
        return 2
    if (cgroup_root / "cpuacct").is_dir() or (cgroup_root / "cpu,cpuacct").is_dir():
        return 1
    return None


@dataclass(frozen=True)
class JobCgroup:
    """Where one job's files are. ``procs_dir`` is the tree whose ``cgroup.procs`` list its PIDs."""

    job_id: str  # numeric id from job_<id>; for a SLUID-named cgroup, the SLUID
    procs_dir: Path
    cpus_files: tuple[Path, ...]  # the first non-empty one counts
    usage_file: Path  # v2 cpu.stat (µs) or v1 cpuacct.usage (ns)
    memory_file: Path
    uid: int | None  # v1: from the uid_<uid> directory; v2: None, from the processes
    version: int  # 2: usage_file is cpu.stat; 1: it is cpuacct.usage
    scope: str = ""  # the slurmd's scope (v2) or top directory (v1): several slurmd per host
    sluid: str | None = None  # the cgroup is named by this SLUID (Slurm >= 26.05)
    # v1 hierarchies Slurm made no cgroup for this job in ("cpu": cpuacct, "memory", "cpus":
    # cpuset), v2 controllers its cgroup lacks ("memory", "cpus"): what they would tell is taken
    # from the job's processes instead
    fallback: tuple[str, ...] = ()

    @functools.cached_property
    def key(self) -> tuple[str, str]:
        """(slurmd scope, job): what keeps two slurmd's copies of one job apart (made once: it
        is asked a dozen times a round)."""
        return self.scope, self.job_id

    @functools.cached_property
    def names(self) -> tuple[tuple[str, ...], str, str]:
        """The cpuset files', the usage file's and the memory file's names as strings, what
        :class:`KeptFiles` keeps them under (made once: read every round)."""
        return tuple(map(str, self.cpus_files)), str(self.usage_file), str(self.memory_file)


def list_jobs(cgroup_root: Path, scanned: list[str] | None = None) -> list[JobCgroup]:
    """Every Slurm job cgroup under ``cgroup_root``, in the layout :func:`cgroup_version` names.
    ``scanned``: gets every directory whose entries the answer depends on that could be listed
    (a new job appears as an entry of one of them)."""
    if scanned is not None:
        scanned.append(str(cgroup_root))  # where cgroup.controllers or a hierarchy appears
    version = cgroup_version(cgroup_root)
    if version == 2:
        return list(_v2_jobs(cgroup_root, scanned))
    if version == 1:
        return list(_v1_jobs(cgroup_root, scanned))
    return []


def slurmstepd_scopes(root: Path, scanned: list[str] | None = None) -> list[Path]:
    """The ``[<node>_]slurmstepd.scope`` directories of a cgroup v2 root: under
    ``system.slice`` by default, under whatever top-level slice cgroup.conf's ``CgroupSlice``
    names otherwise (``slurm.slice``, …)."""
    return [
        scope
        for name in _subdir_names(root, scanned)
        if name.endswith(".slice")
        for scope in _subdirs(root / name, scanned)
        if scope.name.endswith("slurmstepd.scope")
    ]


def _v2_jobs(root: Path, scanned: list[str] | None = None) -> Iterator[JobCgroup]:
    for scope in slurmstepd_scopes(root, scanned):
        where = str(scope)
        fallback = v2_fallback(scope)
        for name in _subdir_names(where, scanned):
            job = _v2_job(where, name, fallback)
            if job is not None:
                yield job


# What each part of JobCgroup.fallback is called, by cgroup version: a v1 hierarchy, a v2
# controller
FALLBACK_NAMES = {
    1: {"cpu": "cpuacct", "memory": "memory", "cpus": "cpuset"},
    2: {"memory": "memory", "cpus": "cpuset"},
}


def v2_fallback(scope: Path) -> tuple[str, ...]:
    """What the jobs under slurmd's ``scope`` have no controller for (``"memory"``,
    ``"cpus"``): those the scope's ``cgroup.subtree_control`` does not enable for its children
    (systemd before 244 delegates no cpuset, a container may hold back controllers). Nothing
    where the file cannot be read (not cgroupfs): the jobs' own files tell."""
    try:
        enabled = set(read_text(scope / "cgroup.subtree_control").split())
    except OSError:
        return ()
    # a job's cgroup has cpu.stat whatever is enabled, memory.current only with the memory
    # controller, cpuset.cpus.effective only with cpuset
    names = FALLBACK_NAMES[2]
    return tuple(part for part, controller in names.items() if controller not in enabled)


@functools.lru_cache(maxsize=1024)
def _v2_job(scope_dir: str, name: str, fallback: tuple[str, ...] = ()) -> JobCgroup | None:
    """The job cgroup ``scope_dir/name`` (None: not a job), built once per job, not every round.
    ``fallback``: as :func:`v2_fallback` says of the scope."""
    match = _JOB_DIR.fullmatch(name)
    sluid = name if _SLUID_DIR.fullmatch(name) else None
    if not (match or sluid):
        return None
    scope = Path(scope_dir)
    job = scope / name
    cpus_files = (job / "cpuset.cpus.effective", job / "cpuset.cpus")
    return JobCgroup(
        job_id=match.group(1) if match else name,
        procs_dir=job,
        cpus_files=() if "cpus" in fallback else cpus_files,
        usage_file=job / "cpu.stat",
        memory_file=job / "memory.current",
        uid=None,
        version=2,
        scope=scope.name,
        sluid=sluid,
        fallback=fallback,
    )


# cgroup v1 hierarchies a Slurm job may have a cgroup in: cpuacct only with
# JobAcctGatherType=jobacct_gather/cgroup, cpuset with ConstrainCores, memory with
# ConstrainRAMSpace, freezer with ProctrackType=proctrack/cgroup
_V1_HIERARCHIES = (("cpuacct", "cpuacct"), ("cpu,cpuacct", "cpuacct"), ("freezer", "freezer"),
                   ("cpuset", "cpuset"), ("memory", "memory"))  # fmt: skip


def _v1_jobs(root: Path, scanned: list[str] | None = None) -> Iterator[JobCgroup]:
    """The jobs of every v1 hierarchy Slurm uses on this node (a job is listed once it has its
    cgroup in each of them); what a hierarchy Slurm does not use here would tell is left to the
    job's processes."""
    found: dict[tuple[str, str, str], dict[str, Path]] = {}  # (top, uid, job id) → its cgroups
    used: set[str] = set()  # the hierarchies Slurm makes cgroups in on this node
    for directory, kind in _V1_HIERARCHIES:
        hierarchy = root / directory
        if kind == "cpuacct" and directory == "cpu,cpuacct" and (root / "cpuacct").is_dir():
            continue  # the same hierarchy (cpuacct is a link to it where both are there)
        for top in _subdirs(hierarchy, scanned):
            if top.name != "slurm" and not top.name.startswith("slurm_"):
                continue
            used.add(kind)
            for uid_dir in _subdirs(top, scanned):
                uid_match = _UID_DIR.fullmatch(uid_dir.name)
                if not uid_match or len(uid_match.group(1)) > 10:
                    continue
                for job in _subdirs(uid_dir, scanned):
                    match = _JOB_DIR.fullmatch(job.name)
                    if match:
                        key = (top.name, uid_match.group(1), match.group(1))
                        found.setdefault(key, {}).setdefault(kind, job)
    for (top_name, uid, job_id), paths in found.items():
        if any(kind in used and kind not in paths for kind in ("cpuacct", "cpuset", "memory")):
            continue  # Slurm is making (or removing) the job's cgroups: listed once all are there
        acct, cpuset, memory = paths.get("cpuacct"), paths.get("cpuset"), paths.get("memory")
        procs_dir = acct or paths.get("freezer") or cpuset or memory
        assert procs_dir is not None
        fallback = tuple(
            name for name, path in (("cpu", acct), ("memory", memory), ("cpus", cpuset)) if not path
        )
        yield JobCgroup(
            job_id=job_id,
            procs_dir=procs_dir,
            cpus_files=(cpuset / "cpuset.effective_cpus", cpuset / "cpuset.cpus") if cpuset else (),
            usage_file=(acct or procs_dir) / "cpuacct.usage",
            memory_file=(memory or procs_dir) / "memory.usage_in_bytes",
            uid=int(uid),
            version=1,
            scope=top_name,
            fallback=fallback,
        )


class JobListing:
    """:func:`list_jobs` of one cgroup root, listed afresh only when a directory the last listing
    read had an entry added, removed or renamed (one inotify watch of them all), and at least
    every :data:`RELIST_SECONDS`; every round where they cannot all be watched. A node's jobs
    start and end a few times an hour: listing ``system.slice`` (every systemd unit) and each
    slurmd scope every second bought nothing in between."""

    RELIST_SECONDS = 60.0

    def __init__(self, cgroup_root: Path, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock``: monotonic seconds."""
        self._root = cgroup_root
        self._clock = clock
        self._watch: DirectoryWatch | None = None
        self._watched: set[str] = set()
        self._jobs: list[JobCgroup] | None = None
        self._listed_at = 0.0

    def jobs(self) -> list[JobCgroup]:
        """This round's job cgroups (as :func:`list_jobs`)."""
        now = self._clock()
        watch = self._watch
        # Drained before listing: a change while the directories are listed stays queued.
        changed = watch.changed() if watch is not None else None
        if (
            self._jobs is not None
            and changed == set()
            and now - self._listed_at < self.RELIST_SECONDS
        ):
            return self._jobs
        scanned: list[str] = []
        jobs = list_jobs(self._root, scanned)
        self._jobs, self._listed_at = None, now
        if watch is None:
            watch = self._watch = DirectoryWatch.open()
            if watch is None:
                return jobs
        for directory in self._watched.difference(scanned):
            watch.remove(directory)
        self._watched = set(scanned)
        # Asked of every directory again: a directory removed and made again under its name
        # is news to no watch on cgroupfs, only its inode tells.
        answers = [watch.add(directory) for directory in scanned]
        if all(answer == "kept" for answer in answers):
            # Each directory was watched since before this listing: a change after it is in
            # the queue. One watched only now may have changed unseen meanwhile, and one that
            # cannot be watched goes unseen: list again next round.
            self._jobs = jobs
        return jobs

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._watched.clear()
        self._jobs = None


# Where in a job's cgroup a process sits, best first for finding the job's identity: the batch
# script (its environment is the job's own, see _Search.batch_read); the job's other steps'
# tasks; anything else; the extern step (sessions adopted over ssh); slurmstepd.
BATCH, TASK, OTHER, EXTERN, STEPD = 0, 1, 2, 3, 4


def _place(parts: tuple[str, ...]) -> int:
    """Rank of a cgroup directory given its path below the job directory."""
    if not parts or not parts[0].startswith("step_"):
        return OTHER
    if len(parts) > 1 and parts[1] == "slurm":
        return STEPD
    if parts[0] in ("step_batch", "step_interactive"):  # both hold the job's own environment
        return BATCH
    return EXTERN if parts[0] == "step_extern" else TASK


def job_processes(procs_dir: Path) -> list[tuple[int, int]]:
    """(place, pid) of the processes in ``cgroup.procs`` of ``procs_dir`` and its
    sub-directories, best place first, then top-down by name; each PID once.

    The directories are walked as ``os.walk`` would walk them (top-down, each one's
    sub-directories by name, symbolic links not followed) on plain strings: a node walks its
    jobs every few seconds, and building path objects was most of a walk's cost."""
    found: list[tuple[int, int, int]] = []
    seen: set[int] = set()
    pending: list[tuple[str, tuple[str, ...]]] = [(str(procs_dir), ())]
    while pending:
        directory, parts = pending.pop()
        if len(parts) < _MAX_DEPTH:
            try:
                with os.scandir(directory) as entries:
                    below = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
            except OSError:
                below = []  # ended meanwhile, or not readable: as os.walk, go on
            pending.extend((f"{directory}/{name}", (*parts, name)) for name in reversed(below))
        try:
            text = read_text(Path(directory, "cgroup.procs"))
        except OSError:
            continue  # a step or task that ended, or a directory without the file
        place = _place(parts)
        for line in text.split():
            if line.isascii() and line.isdigit() and len(line) <= 10:
                pid = int(line)
                if pid > 0 and pid not in seen:
                    seen.add(pid)
                    found.append((place, len(found), pid))
    found.sort()
    return [(place, pid) for place, _, pid in found]


def job_pids(procs_dir: Path) -> Iterator[int]:
    """PIDs of the job, in the order :func:`job_processes` gives."""
    for _, pid in job_processes(procs_dir):
        yield pid


@dataclass(frozen=True)
class _Identity:
    """User and account, taken together from one environment that has ``SLURM_JOB_USER``."""

    user: str
    uid: int | None  # its SLURM_JOB_UID, if a number
    account: str


@dataclass
class _Search:
    """What the environments of one job said so far; kept while the job lives."""

    job_id: str | None = None  # from an environment (SLUID-named cgroups)
    identity: _Identity | None = None
    gpu_rank: int = GPUS_NONE
    gpus: int = 0
    claims: tuple[int, ...] = ()
    step_gpus: list[str] = field(default_factory=list)  # what the steps' SLURM_STEP_GPUS list
    shards: int | None = None  # SLURM_SHARDS_ON_NODE: GPU shards the job holds here
    uid: int | None = None  # real uid of a task process (v2)
    # An environment of the batch step named the job and either had SLURM_JOB_GPUS or no GPU
    # variable at all. Slurm sets SLURM_JOB_GPUS there whenever the job holds GPUs on this node
    # (the batch step's), so no other process can tell more of its GPUs: a CPU-only job's
    # search ends here instead of walking the job for ever.
    batch_read: bool = False
    # Where no batch step runs (a node the job spans besides its first): every process of the
    # job was read once and its steps' SLURM_STEP_GPUS taken together. A step started later
    # adds nothing: the job-info file says the job's GPUs on every node.
    steps_read: bool = False
    tried: set[int] | None = None
    # What these findings and the job-info file ``info_from`` (None: none) make of the job,
    # kept until a walk adds to them or the file reads otherwise: the same every round of a
    # job's life, and a node reads 50 jobs a second.
    info: JobInfo | None = None
    info_from: dict[str, str] | None = None
    # When (monotonic seconds) to walk the job's processes again, and the wait after the next
    # walk that finds nothing new.
    next_walk: float = 0.0
    backoff: float = 0.0

    def complete(self, need_uid: bool) -> bool:
        return (
            self.identity is not None
            and (self.gpu_rank == GPUS_JOB or self.batch_read or self.steps_read)
            and (self.uid is not None or not need_uid)
        )


@dataclass(frozen=True)
class JobInfo:
    """What a job's row says of its owner, and where each part came from."""

    job_id: str
    user: str
    account: str
    account_source: str | None  # "job-info", "environment" or None (unknown)
    gpus: float
    gpu_indices: tuple[int, ...]
    gpu_share: float | None = None  # of each GPU in gpu_indices, for a job on shards


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MAX_TRIED = 65536  # PIDs remembered per job; past this the oldest knowledge is dropped


@dataclass
class _Plan:
    """The jobs with nothing new to find, laid out to be read again as they are: a node's jobs
    stay the same for minutes, and reading each one's files through the collector's every step
    cost most of a round. It holds while the listing and the job-info files are those it was
    made with; a job whose kept files changed (a step started or ended) leaves it, a job's
    cpuset is read again within it when due, as job by job, and one that changed ends it. Then
    it is made again from the round read job by job; so too once a job left out for an unsettled
    cpuset has read the same long enough to join, a while after a job was left out for files
    not settled, and, while it leaves a job out, at least every PLAN_REMAKE_SECONDS, when a job
    that settled otherwise (the search of its processes ended) joins."""

    jobs: list[JobCgroup]  # the listing's last list of the same jobs (looked at first)
    info_dir_ok: bool
    files_generation: int  # KeptFiles.generation when the kept files were last found as planned
    info_generation: int  # JobInfoFiles.generation
    used_at: float  # the collector's clock when it last held: one going back ends the plan
    # The earliest "same since" of the cpusets of jobs left out until theirs settles (inf: none)
    waiting_since: float
    remake_at: float  # when it is made again whatever else (monotonic seconds; inf: never)
    # Of each job planned:
    planned: list[JobCgroup]
    fds: list[tuple[int, int]]  # its CPU (cpu.stat) and memory files
    floors: list[float]  # its CPU seconds when its cpuset was read: less is a new cgroup
    read_at: list[float]  # when its cpuset was read (the collector's clock)
    rows: list[Row]  # its row of the round the plan was made of
    infos: list[JobInfo]
    # Where it holds every job: that round's GPU claims and aliases (each job's alone, so the
    # same while the jobs are what they were), and the rows' columns, checked, but for the
    # numbers read anew.
    whole: tuple[list[Row], list[Row], Columns] | None
    usage_fds: list[int] = field(init=False)  # the CPU files of fds, in its order
    memory_fds: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self._split_fds()

    def _split_fds(self) -> None:
        # each round reads all the CPU files, then all the memory files, in one call each
        self.usage_fds = [usage for usage, _ in self.fds]
        self.memory_fds = [memory for _, memory in self.fds]

    def leave(self, gone: set[int]) -> None:
        """Take the jobs at the indices ``gone`` out (read job by job from now on)."""
        for name in ("planned", "fds", "floors", "read_at", "rows", "infos"):
            kept = [v for i, v in enumerate(getattr(self, name)) if i not in gone]
            setattr(self, name, kept)
        self._split_fds()
        self.whole = None


class _ProcessTicks:
    """CPU time of a job's processes as a counter (clock ticks): each living process's user and
    system time and that of the children it waited for, plus the last such total of each process
    that ended with no parent in the job to wait for it (a step's slurmstepd, whose parent is
    slurmd); a child waited for is counted in its parent. Held from going back."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, int, int]] = {}  # pid → (start time, parent, ticks)
        self.ended = 0
        self.most = 0

    def update(self, procfs: Path, pids: Iterable[int]) -> tuple[int, int]:
        """This round's total ticks and resident bytes of the processes ``pids``."""
        now: dict[int, tuple[str, int, int]] = {}
        resident = 0
        for pid in pids:
            try:
                text = read_text(procfs / str(pid) / "stat")
            except OSError:
                continue  # ended meanwhile
            fields = text.rpartition(")")[2].split()
            numbers = fields[11:15]
            if len(fields) < 22 or not all(map(_ascii_digits, numbers)):
                continue
            parent = int(fields[1]) if _ascii_digits(fields[1]) else 0
            now[pid] = (fields[19], parent, sum(int(f) for f in numbers))
            if _ascii_digits(fields[21]):
                resident += int(fields[21]) * _PAGE_BYTES
        for pid, (start, parent, ticks) in self.seen.items():
            current = now.get(pid)
            if (current is None or current[0] != start) and parent not in self.seen:
                self.ended += ticks
        self.seen = now
        self.most = max(self.most, self.ended + sum(t for _, _, t in now.values()))
        return self.most, resident


@register
class SlurmJobCollector(Collector):
    name = "job"
    help = (
        "Slurm jobs on this node from their cgroups (v1 and v2): CPUs, CPU time, memory, "
        "GPUs, user and account (trusted from the uid and the prolog's job-info files)"
    )
    default_enabled = True

    def __init__(
        self,
        ctx: CollectorContext,
        resolve_user: Callable[[int], str] | None = None,
        job_info_owner: int = 0,
    ) -> None:
        """``resolve_user`` maps a uid to a user name (default: the passwd file under
        ``ctx.rootfs`` when that is not ``/``, else :func:`user_name_for_uid`).
        ``job_info_owner`` is the uid that must own job-info files and their directory (root).
        """
        super().__init__(ctx)
        self._resolve_user = resolve_user
        if resolve_user is None and ctx.rootfs != Path("/"):
            self._resolve_user = passwd_file_resolver(ctx.rootfs / "etc" / "passwd")
        self._job_info_owner = job_info_owner
        self._search: dict[tuple[str, str], _Search] = {}
        self._names: dict[int, str] = {}
        self._once = OnceLogger(log)
        # shards per GPU index, read once: gres.conf changes take a slurmd restart too
        self._gres_path, self._gres_shards = ctx.rootfs / GRES_CONF_PATHS[0], {}
        for relative in GRES_CONF_PATHS:
            path = ctx.rootfs / relative
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            self._gres_path, self._gres_shards = path, parse_gres_shards(text, ctx.node)
            break
        self._clock: Callable[[], float] = time.monotonic  # seconds; tests may replace it
        self._files = KeptFiles(kept_files_limit())
        # the collector's clock as it is when asked: tests replace it
        self._listing = JobListing(ctx.sysfs / "fs" / "cgroup", lambda: self._clock())  # noqa: PLW0108
        self._bad: set[tuple[str, str]] = set()  # jobs whose last round failed (logged once)
        self._cpu_counts: dict[str, int] = {}  # cpuset text -> CPUs: the same few lists recur
        # per job: (CPUs, when read, since when read the same, CPU seconds then)
        self._cpusets: dict[tuple[str, str], tuple[int, float, float, float]] = {}
        # per v1 job without a cpuacct cgroup, its processes' CPU time; without a cpuset
        # cgroup, its CPUs as its environment tells
        self._process_ticks: dict[tuple[str, str], _ProcessTicks] = {}
        self._env_cpus: dict[tuple[str, str], int] = {}
        self._plan: _Plan | None = None  # the last round, where nothing new was to be found
        self._plan_at = 0.0  # no plan is made before (monotonic seconds)
        self._plan_retry = PLAN_RETRY_SECONDS  # tests may shorten it
        self._remake = False  # the plan holds this round, and is made again at its end
        # the planned jobs' CPU seconds and memory bytes of the round, in the plan's order
        self._numbers: tuple[list[float], list[int]] = ([], [])
        self._now = 0.0  # this round's clock
        self._job_info_files = JobInfoFiles(
            ctx.slurm_job_info_dir,
            job_info_owner,
            self._once,
            lambda: self._clock(),  # noqa: PLW0108
        )

    # ------------------------------------------------------------ the round

    def collect(self) -> dict[str, list[Row]]:
        parts: dict[str, list[tuple[Row, JobInfo]]] = {}
        aliases: list[Row] = []
        seen: set[tuple[str, str]] = set()
        info_dir_ok = self._job_info_dir_trusted()
        if info_dir_ok:
            self._job_info_files.begin_round()
        else:
            self._job_info_files.forget()
        self._files.begin_round()
        self._now = self._clock()
        jobs = self._listing.jobs()
        plan = self._plan if self._plan_holds(jobs, info_dir_ok) else None
        if (
            plan is not None
            and plan.whole is not None
            and len(plan.planned) == len(jobs)
            and not self._remake
        ):
            # every job as planned: the round as the one the plan was made of, its numbers new
            # (CPU seconds from at most 18 digits, int64 counters: they fit their columns)
            held, named, columns = plan.whole
            seconds, memory = self._numbers
            return {
                "job": CheckedRows(
                    self._fresh_rows(plan),
                    {**columns, "cpu_seconds": seconds, "memory_bytes": memory},
                ),
                "_gpu_job": [dict(claim) for claim in held],
                "_job_alias": [dict(alias) for alias in named],
            }
        planned = self._planned_rows(plan)
        read: dict[JobKey, tuple[Row, JobInfo]] = {}  # each job read this round
        for job in jobs:
            seen.add(job.key)
            got = planned.get(job.key)
            if got is None:
                try:
                    got = self._read_job(job, info_dir_ok)
                except OSError as exc:
                    if _is_gone(exc):
                        self._report_missing(job, exc)
                    else:
                        self._warn_bad(job, exc)
                    continue
                except (ParseError, ValueError) as exc:
                    # One job's garbage costs that job this round, never the other jobs.
                    self._warn_bad(job, exc)
                    continue
            read[job.key] = got
            row, info = got
            if job.key in self._bad:
                self._bad.discard(job.key)
                self._once.clear(f"bad:{job.scope}/{job.procs_dir.name}")
            parts.setdefault(info.job_id, []).append((row, info))
            if job.sluid is not None and info.job_id != job.sluid:
                aliases.append({"cgroup": job.sluid, "job_id": info.job_id})
        for kept in (self._search, self._cpusets, self._process_ticks, self._env_cpus):
            for key in kept.keys() - seen:
                del kept[key]
        self._job_info_files.keep_only({job_id for _, job_id in seen})
        self._files.keep_only(seen)
        rows: list[Row] = []
        claims: list[Row] = []
        for job_id, pieces in parts.items():
            if len(pieces) == 1:  # a job under one slurmd, as nearly all are
                row, info = pieces[0]
                rows.append(row)
                if not info.gpu_indices:
                    continue  # most jobs of a node hold no GPU
            else:
                rows.append(_combine(job_id, pieces))
                if not any(info.gpu_indices for _, info in pieces):
                    continue
            indices = sorted({i for _, info in pieces for i in info.gpu_indices})
            share = next((info.gpu_share for _, info in pieces if info.gpu_share), None)
            claims.extend(
                {"gpu_index": i, "job_id": job_id}
                if share is None
                else {"gpu_index": i, "job_id": job_id, "share": share}
                for i in indices
            )
        if (self._plan is None or self._remake) and self._now >= self._plan_at:
            self._plan = self._make_plan(jobs, info_dir_ok, read, parts, (claims, aliases))
        return {"job": rows, "_gpu_job": claims, "_job_alias": aliases}

    # ------------------------------------------------------------ rounds with nothing new

    def _make_plan(
        self,
        jobs: list[JobCgroup],
        info_dir_ok: bool,
        read: dict[JobKey, tuple[Row, JobInfo]],
        parts: dict[str, list[tuple[Row, JobInfo]]],
        extras: tuple[list[Row], list[Row]],
    ) -> _Plan | None:
        """This round's settled jobs laid out to be read again as they are (:class:`_Plan`):
        cgroup v2 jobs read whole, alone under their job id, not failing; what each is made
        before from the same job-info file (or none, known to the watch) with nothing left to
        search its processes for; its cpuset settled; its CPU and memory files kept and settled.
        ``None`` where no job is. ``extras``: the round's GPU claims and aliases, what a round
        of the same jobs as planned gives where the plan holds every job."""
        planned: list[JobCgroup] = []
        fds: list[tuple[int, int]] = []
        floors: list[float] = []
        read_ats: list[float] = []
        rows: list[Row] = []
        infos: list[JobInfo] = []
        waiting_since = math.inf
        remake_at = self._now + PLAN_REMAKE_SECONDS  # for jobs whose search ended meanwhile
        for job in jobs:
            key = job.key
            search = self._search.get(key)
            got = read.get(key)
            if job.version != 2 or search is None or got is None or key in self._bad:
                continue
            if "memory" in job.fallback:
                continue  # no memory file to keep: read job by job, from its processes
            row, info = got
            if info is not search.info or len(parts[info.job_id]) != 1:
                continue
            trusted = None
            if info_dir_ok:
                found, trusted = self._job_info_files.known(job.job_id)
                if not found:
                    continue
            if search.info_from is not trusted or self._walk_wanted(job, search, trusted):
                continue
            cpuset = self._cpusets.get(key)
            if cpuset is None:
                continue
            count, read_at, same_since, seconds_then = cpuset
            if self._now - same_since < CPUSET_RECHECK_SECONDS:
                waiting_since = min(waiting_since, same_since)
                continue
            _, usage_name, memory_name = job.names
            kept = self._files.settled_fds(key, usage_name, memory_name)
            if kept is None:  # its directory changed, or its files were opened, this round
                remake_at = self._now + self._plan_retry
                continue
            if row["memory_bytes"] >= _SAFE_NUMBER or row["cpu_seconds"] >= _SAFE_SECONDS:
                continue  # too long for the plan's reading of the files (never on a real node)
            planned.append(job)
            fds.append(kept)
            floors.append(seconds_then)
            read_ats.append(read_at)
            rows.append({**row, "cpus_allocated": float(count)})
            infos.append(info)
        if not planned:  # looked for again a while later, and when a job's cpuset has settled
            settles = waiting_since + CPUSET_RECHECK_SECONDS
            self._plan_at = min(settles, self._now + self._plan_retry)
            return None
        if len(planned) == len(jobs):
            remake_at = math.inf  # no job is left to join while it holds
        return _Plan(
            jobs=jobs,
            info_dir_ok=info_dir_ok,
            files_generation=self._files.generation,
            info_generation=self._job_info_files.generation,
            used_at=self._now,
            waiting_since=waiting_since,
            remake_at=remake_at,
            planned=planned,
            fds=fds,
            floors=floors,
            read_at=read_ats,
            rows=rows,
            infos=infos,
            whole=self._whole(rows, extras) if len(planned) == len(jobs) else None,
        )

    @staticmethod
    def _whole(
        rows: list[Row], extras: tuple[list[Row], list[Row]]
    ) -> tuple[list[Row], list[Row], Columns] | None:
        """What a round of every job as planned gives besides the numbers read anew (see
        :attr:`_Plan.whole`); None where a value would not pass :func:`check_rows` (the round
        job by job fails the collector for it)."""
        try:
            columns = dict(check_rows({"job": rows})["job"])
        except ValueError:
            return None
        del columns["cpu_seconds"], columns["memory_bytes"]
        return [dict(c) for c in extras[0]], [dict(a) for a in extras[1]], columns

    def _plan_holds(self, jobs: list[JobCgroup], info_dir_ok: bool) -> bool:
        """Whether the plan holds this round, its jobs' numbers read (:attr:`_numbers`): the
        same listing, job-info files and kept files as when it was made, each job's files read
        as the kernel writes them, its CPU time not gone back, a cpuset read when due the same
        as before. Else it is dropped (and made again at the end of the round): every job is
        read its own way."""
        plan = self._plan
        now = self._now
        self._remake = False
        if (
            plan is None
            or (jobs is not plan.jobs and jobs != plan.jobs)
            or info_dir_ok != plan.info_dir_ok
            or now < plan.used_at
            or self._job_info_files.generation != plan.info_generation
            or (self._files.generation != plan.files_generation and not self._files_as(plan))
        ):
            self._plan = None
            return False
        # Until this round's reads turn out as planned. A plan its files do not bear out is
        # made again only a while later: a file that always reads otherwise would cost the
        # making of one every round.
        self._plan = None
        self._plan_at = now + self._plan_retry
        plan.jobs = jobs  # the same jobs listed anew: this list is looked at first from now on
        size, start = repeat(_PLAN_READ_BYTES), repeat(0)  # map stops with the descriptors
        try:
            usage = b"\0".join(chain((b"",), map(os.pread, plan.usage_fds, size, start)))
            memory = b"\0".join(chain((b"",), map(os.pread, plan.memory_fds, size, start)))
        except OSError:
            return False  # a cgroup went away: read job by job, each tells
        count = len(plan.fds)
        found = _USAGE_LINES.findall(usage)
        values = _MEMORY_LINES.findall(memory)
        # a match at the start of each file, and no file with a NUL of its own
        if (
            len(found) != count
            or len(values) != count
            or usage.count(b"\0") != count
            or memory.count(b"\0") != count
        ):
            return False
        seconds = [int(micros) / 1e6 for micros in found]
        if not all(map(operator.ge, seconds, plan.floors)):
            return False  # CPU time went back: a cgroup made anew (its cpuset is read at once)
        if now - min(plan.read_at) >= CPUSET_RECHECK_SECONDS:
            for i, read_at in enumerate(plan.read_at):
                if now - read_at < CPUSET_RECHECK_SECONDS:  # as _job_cpus tells it
                    continue
                job = plan.planned[i]
                try:  # as job by job: the same read, the same record of it
                    cpus = self._job_cpus(job, job.names[0], seconds[i])
                except (OSError, ParseError, ValueError):
                    return False  # read job by job, where it tells
                if cpus != plan.rows[i]["cpus_allocated"]:
                    return False  # CPU hotplug: read every round again until it settles
                _, plan.read_at[i], _, plan.floors[i] = self._cpusets[job.key]
        plan.used_at = now
        self._plan, self._plan_at = plan, 0.0
        self._numbers = (seconds, list(map(int, values)))
        # made again at the end of the round, from this one's rows, where a job may join
        self._remake = now >= plan.remake_at or now - plan.waiting_since >= CPUSET_RECHECK_SECONDS
        return True

    def _fresh_rows(self, plan: _Plan) -> list[Row]:
        """The rows of the jobs ``plan`` holds, with this round's numbers (:attr:`_numbers`)."""
        seconds, counts = self._numbers
        return [
            {**row, "cpu_seconds": cpu_seconds, "memory_bytes": count}
            for row, cpu_seconds, count in zip(plan.rows, seconds, counts, strict=True)
        ]

    def _planned_rows(self, plan: _Plan | None) -> dict[JobKey, tuple[Row, JobInfo]]:
        """The rows of the jobs ``plan`` holds this round (:meth:`_plan_holds`), by job."""
        if plan is None:
            return {}
        return {
            job.key: (row, info)
            for job, row, info in zip(plan.planned, self._fresh_rows(plan), plan.infos, strict=True)
        }

    def _files_as(self, plan: _Plan) -> bool:
        """After the kept files changed (:attr:`KeptFiles.generation`): take out of ``plan``
        each job whose CPU and memory files are not the settled ones it holds (its directory
        changed: a step started or ended; its files closed), to be made again a while later;
        False where no job is left."""
        settled = self._files.settled_fds
        gone = {
            i
            for i, (job, fds) in enumerate(zip(plan.planned, plan.fds, strict=True))
            if settled(job.key, job.names[1], job.names[2]) != fds
        }
        plan.files_generation = self._files.generation
        if gone:
            plan.leave(gone)
            plan.remake_at = min(plan.remake_at, self._now + self._plan_retry)
        return bool(plan.planned)

    def _read_job(self, job: JobCgroup, info_dir_ok: bool) -> tuple[Row, JobInfo]:
        cpus_names, usage_name, memory_name = job.names
        if job.fallback:
            cpu_seconds, memory = self._usage_with_fallback(job, usage_name, memory_name)
        else:
            cpu_seconds, memory = read_cgroup_usage(
                job.version, usage_name, memory_name, self._files, job.key
            )
        cpus = self._job_cpus(job, cpus_names, cpu_seconds)
        info = self._job_info(job, info_dir_ok)
        row: Row = {
            "job_id": info.job_id,
            "user": info.user,
            "account": info.account,
            "account_source": info.account_source,
            "cpus_allocated": float(cpus),
            "gpus_allocated": float(info.gpus),  # a share of each GPU for a job on shards
            "cpu_seconds": cpu_seconds,
            "memory_bytes": memory,
        }
        return row, info

    def _usage_with_fallback(
        self, job: JobCgroup, usage_name: str, memory_name: str
    ) -> tuple[float, int]:
        """CPU seconds and memory bytes of a job with a :attr:`JobCgroup.fallback`: from the
        cgroup files there are, else from its processes (:class:`_ProcessTicks`; resident
        memory)."""
        cpu_seconds: float | None = None
        memory: int | None = None
        if "cpu" not in job.fallback:
            text = self._files.read(job.key, usage_name)
            if job.version == 2:
                cpu_seconds = parse_cpu_stat_usage_usec(text, usage_name) / 1e6
            else:
                cpu_seconds = _non_negative_int(text, usage_name) / 1e9
        if "memory" not in job.fallback:
            memory = parse_counter(self._files.read(job.key, memory_name), memory_name)
        self._say_fallback(job)
        if cpu_seconds is None or memory is None:
            ticks = self._process_ticks.get(job.key)
            if ticks is None:
                ticks = self._process_ticks[job.key] = _ProcessTicks()
            total, resident = ticks.update(self.ctx.procfs, job_pids(job.procs_dir))
            if cpu_seconds is None:
                cpu_seconds = total / self.ctx.user_hz
            if memory is None:
                memory = resident
        return cpu_seconds, memory

    def _say_fallback(self, job: JobCgroup) -> None:
        """Say once for each kind of job whose figures come from its processes (on cgroup v2,
        for each slurmd's scope: each is given its controllers), and why."""
        parts = "/".join(FALLBACK_NAMES[job.version][part] for part in job.fallback)
        if job.version == 2:
            message = (
                f"cgroup v2: Slurm's job cgroups under {job.scope} have no {parts} controller "
                "(none given to the scope)"
            )
        else:
            message = (
                f"cgroup v1: Slurm makes no {parts} cgroup for jobs here (JobAcctGatherType="
                "jobacct_gather/cgroup, ConstrainRAMSpace, ConstrainCores)"
            )
        extra = ""
        if "cpu" in job.fallback:
            extra = "; CPU time of a process that lived less than a round and was not waited "
            extra += "for in the job is missed"
        scope = job.scope if job.version == 2 else ""
        self._once.warning(
            f"fallback:{job.version}:{scope}:{parts}",
            f"{message}: those figures come from each job's processes{extra}",
        )

    def _job_cpus(self, job: JobCgroup, names: tuple[str, ...], cpu_seconds: float) -> int:
        """The job's CPUs, its cpuset read as :data:`CPUSET_RECHECK_SECONDS` says."""
        now = self._now
        known = self._cpusets.get(job.key)
        if known is not None:
            count, read_at, same_since, seconds_then = known
            if (
                now - same_since >= CPUSET_RECHECK_SECONDS
                and now - read_at < CPUSET_RECHECK_SECONDS
                and cpu_seconds >= seconds_then
                and not self._files.opened_in_round(job.key)
            ):
                return count
        count = self._cpus(job, names)
        same_since = known[2] if known is not None and known[0] == count else now
        self._cpusets[job.key] = (count, now, same_since, cpu_seconds)
        return count

    def _cpus(self, job: JobCgroup, names: tuple[str, ...]) -> int:
        """CPUs in the first non-empty of the cpuset files ``names``; 0 if all are empty, gone
        if all are missing. A job without cpuset files (v1 ConstrainCores=no, v2 without the
        cpuset controller): :meth:`_cpus_without_cpuset`."""
        if not names:
            return self._cpus_without_cpuset(job)
        missing: list[FileNotFoundError] = []
        for path in names:
            try:
                text = self._files.read(job.key, path)
            except FileNotFoundError as exc:
                missing.append(exc)
                continue
            count = self._cpu_counts.get(text)
            if count is not None:
                return count
            if text.strip():
                count = parse_cpu_list(text, str(path))
                if len(self._cpu_counts) >= 4096:
                    self._cpu_counts.clear()
                self._cpu_counts[text] = count
                return count
        if len(missing) == len(names):
            raise missing[0]
        return 0

    def _cpus_without_cpuset(self, job: JobCgroup) -> int:
        """CPUs of a job without cpuset files: ``SLURM_CPUS_ON_NODE`` of the first
        environment of its own (the batch script's first; slurmstepd's is slurmd's), else the
        ``Cpus_allowed_list`` of its first process but slurmstepd and the extern step's. Raises
        ``FileNotFoundError`` (quietly left out) where no such process tells."""
        known = self._env_cpus.get(job.key)
        if known is not None:
            return known
        affinity: int | None = None
        for place, pid in job_processes(job.procs_dir):
            if place == STEPD:
                continue  # slurmd's environment and its all-CPU mask, not the job's
            if place == EXTERN:
                # its sleep and the ssh sessions pam_slurm_adopt puts there: no job environment,
                # and without a cpuset the whole node's mask, not the job's CPUs
                continue
            try:
                env = parse_environ(read_environ(self.ctx.procfs / str(pid) / "environ"))
            except OSError:
                env = {}
            cpus = env.get("SLURM_CPUS_ON_NODE", "")
            if _names_job(env, job) and _ascii_digits(cpus) and len(cpus) <= 6:
                self._env_cpus[job.key] = int(cpus)
                return int(cpus)
            if affinity is None:
                try:
                    status = read_text(self.ctx.procfs / str(pid) / "status")
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("Cpus_allowed_list:"):
                        text = line.partition(":")[2].strip()
                        affinity = parse_cpu_list(text, "Cpus_allowed_list")
        if affinity is None:
            raise FileNotFoundError(errno.ENOENT, "no process of the job to ask")
        return affinity

    # ------------------------------------------------------------ who the job is

    def _job_info(self, job: JobCgroup, info_dir_ok: bool) -> JobInfo:
        """The job's id, user, account and GPUs, each from the most trusted source there is.

        The job-info file wins from the round it appears in (:class:`JobInfoFiles` reads it
        again after a change); what the environments said is kept for the job's life, and
        searched further while incomplete.
        """
        # named by the cgroup's job_id: the SLUID where the cgroup is named by one (keep_only's)
        trusted = (
            self._job_info_files.read(job.job_id, job.sluid is not None) if info_dir_ok else None
        )
        search = self._search.get(job.key)
        if search is None:
            search = self._search[job.key] = _Search()
        if self._walk_wanted(job, search, trusted) and self._clock() >= search.next_walk:
            self._search_environments(job, search)
        if search.info is not None and search.info_from is trusted:
            return search.info  # the very dict read before: the file did not change
        if trusted is not None and "job_id" in trusted:
            job_id = trusted["job_id"]
        elif job.sluid is not None and search.job_id is not None:
            job_id = search.job_id
        else:
            job_id = job.job_id
        uid = job.uid if job.uid is not None else search.uid
        if uid is None and trusted is not None and trusted.get("uid"):
            uid = int(trusted["uid"])  # written by root from what slurmd told the prolog
        # Kept only where nothing in it is read afresh each round: the cgroup's owner, a name
        # the user database did not give yet.
        keep = uid is not None
        if uid is None:
            uid = job.procs_dir.stat().st_uid  # no task's status readable: the cgroup's owner
        user = self._user(uid, trusted, search.identity)
        keep = keep and (
            uid in self._names
            or user == getattr(search.identity, "user", None)
            or (trusted is not None and user == trusted.get("user"))
        )
        if trusted is not None and "account" in trusted:
            account, source = trusted["account"] or "unknown", "job-info"
        elif search.identity is not None:
            account, source = search.identity.account, "environment"
        else:
            account, source = "unknown", None
        shards = search.shards
        if trusted is not None and "gpus" in trusted:
            entries = _list_entries(trusted["gpus"])
            gpus, claims = len(entries), _gpu_claims(entries)
            # Without shards= the GPUs count whole, whatever the job's environment says: Slurm
            # keeps a SLURM_SHARDS_ON_NODE the user brought along in a job on whole GPUs, so
            # it could lower the bill of one (a prolog never sees the variable, see docs)
            shards = (
                min(int(trusted["shards"]), _INT16_MAX)
                if _ascii_digits(trusted.get("shards", ""))
                else None
            )
        else:
            gpus, claims = search.gpus, search.claims
        share = self._shard_share(job, shards, claims)
        if share is None and trusted is not None and claims:
            share = _mps_share(trusted.get("mps_percentage", ""))
        if share is not None:
            info = JobInfo(job_id, user, account, source, share * len(claims), claims, share)
        else:
            info = JobInfo(job_id, user, account, source, gpus, claims)
        if keep:
            search.info, search.info_from = info, trusted
        return info

    @staticmethod
    def _walk_wanted(job: JobCgroup, search: _Search, trusted: dict[str, str] | None) -> bool:
        """Whether the job's processes are still to be searched: the environments have not told
        all a row needs, nor has the job-info file ``trusted``."""
        need_uid = job.uid is None
        return not search.complete(need_uid) and not (
            trusted is not None
            and "account" in trusted
            and "gpus" in trusted
            and (search.uid is not None or not need_uid)
        )

    def _shard_share(
        self, job: JobCgroup, shards: int | None, claims: tuple[int, ...]
    ) -> float | None:
        """The share of each claimed GPU a job on ``shards`` holds (spread evenly over them),
        or None where the job has no shards or gres.conf does not tell the GPUs' shards."""
        if not shards or not claims:
            return None
        per_gpu = {self._gres_shards.get(i) for i in claims}
        if len(per_gpu) != 1 or None in per_gpu:
            self._once.warning(
                "shards",
                f"job {job.job_id} holds {shards} GPU shards but {self._gres_path} does not "
                "say how many shards each of its GPUs has: its GPUs count whole",
            )
            return None
        (count,) = per_gpu
        assert count is not None
        return min(1.0, shards / len(claims) / count)

    def _user(self, uid: int, trusted: dict[str, str] | None, identity: _Identity | None) -> str:
        """The name of ``uid``: what the job-info file or an environment call it, if they speak
        of the same uid; else its passwd name; else the number."""
        if trusted is not None and trusted.get("user") and trusted.get("uid") == str(uid):
            return trusted["user"]
        if identity is not None and identity.uid == uid and identity.user:
            return identity.user
        return self._user_name(uid)

    def _search_environments(self, job: JobCgroup, search: _Search) -> None:
        """Read up to ``_MAX_PIDS_PER_JOB`` environments of the job not read before."""
        search.info = None
        if search.tried is None or len(search.tried) > _MAX_TRIED:
            search.tried = set()
        read = 0
        capped = False
        for place, pid in job_processes(job.procs_dir):
            if read >= _MAX_PIDS_PER_JOB or search.complete(job.uid is None):
                capped = read >= _MAX_PIDS_PER_JOB
                break
            if pid in search.tried:
                continue
            search.tried.add(pid)
            read += 1
            if job.uid is None and search.uid is None and place in (BATCH, TASK, EXTERN):
                search.uid = self._real_uid(pid)
            if place == STEPD:
                continue  # slurmstepd runs as root with slurmd's environment, not the job's
            environ = self.ctx.procfs / str(pid) / "environ"
            try:
                env = parse_environ(read_environ(environ))
            except PermissionError:
                self._once.warning(
                    "environ",
                    f"cannot read {self.ctx.procfs}/<pid>/environ of jobs' processes "
                    "(permission denied): without root, jobs' users, "
                    "accounts and GPUs come from job-info files and cgroups alone",
                )
                continue
            except OSError:
                continue  # gone meanwhile: try the next process
            if not _names_job(env, job):
                continue  # not this job's environment (a stray process, or a forged one)
            rank, count, claims = gpu_evidence(env, batch=place == BATCH)
            if place == BATCH and rank in (GPUS_JOB, GPUS_NONE):
                # The script's environment, or a child's as it left it: a child that kept
                # only CUDA_VISIBLE_DEVICES says too little to end the search on.
                search.batch_read = True
            job_id = env.get("SLURM_JOB_ID", "")
            if search.job_id is None and job_id.isascii() and job_id.isdigit():
                search.job_id = job_id[:20]
            if search.identity is None and env.get("SLURM_JOB_USER"):
                uid_text = env.get("SLURM_JOB_UID", "")
                search.identity = _Identity(
                    user=env["SLURM_JOB_USER"],
                    uid=int(uid_text) if uid_text.isascii() and uid_text.isdigit() else None,
                    account=env.get("SLURM_JOB_ACCOUNT") or "unknown",
                )
            if rank > search.gpu_rank:
                search.gpu_rank, search.gpus, search.claims = rank, count, claims
                stepped = rank == GPUS_STEP
                search.step_gpus = _list_entries(env["SLURM_STEP_GPUS"]) if stepped else []
            elif rank == search.gpu_rank == GPUS_STEP:
                # steps running side by side hold GPUs of their own: the job holds them all
                entries = _list_entries(",".join((*search.step_gpus, env["SLURM_STEP_GPUS"])))
                search.step_gpus, search.gpus = entries, len(entries)
                search.claims = _gpu_claims(entries)
            shards = env.get("SLURM_SHARDS_ON_NODE", "")
            if search.shards is None and shards.isascii() and shards.isdigit():
                search.shards = min(int(shards), _INT16_MAX)
        if not capped and search.gpu_rank == GPUS_STEP:
            search.steps_read = True
        if read or capped:
            search.backoff, search.next_walk = 0.0, 0.0
        else:
            search.backoff = min(max(2 * search.backoff, _RESEARCH_FIRST_S), _RESEARCH_MAX_S)
            search.next_walk = self._clock() + search.backoff

    def _real_uid(self, pid: int) -> int | None:
        path = self.ctx.procfs / str(pid) / "status"
        try:
            return parse_status_uid(read_text(path), str(path))
        except (OSError, ParseError):
            return None  # the process ended, or its status is not usable: ask the next one

    # ------------------------------------------------------------ the job-info directory

    def _job_info_dir_trusted(self) -> bool:
        """True when the job-info directory exists, is owned by root and not writable by others."""
        directory = self.ctx.slurm_job_info_dir
        problem = job_info_dir_problem(directory, self._job_info_owner)
        if problem == "missing":
            return False  # no prolog installed: accounts come from environments (untrusted)
        if problem is not None:
            self._once.warning(
                "job-info-dir",
                f"job: {directory} {problem}; its job-info files are ignored (accounts come "
                "from job environments)",
            )
            return False
        self._once.clear("job-info-dir")
        return True

    # ------------------------------------------------------------ helpers

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

    def close(self) -> None:
        self._files.close()
        self._listing.close()
        self._job_info_files.close()

    def _warn_bad(self, job: JobCgroup, exc: Exception) -> None:
        where = f"{job.scope}/{job.procs_dir.name}"
        self._bad.add(job.key)
        self._once.warning(f"bad:{where}", f"job {where}: left out this round: {exc}")

    def _report_missing(self, job: JobCgroup, exc: OSError) -> None:
        """A job whose file is missing while its cgroup is still there: a controller is off."""
        if not job.procs_dir.is_dir() or exc.filename is None:
            return  # the job ended while we read it
        self._once.warning(
            f"missing:{Path(exc.filename).name}",
            f"job: {Path(exc.filename).name} missing in Slurm job cgroups (controller not "
            f"enabled?), e.g. {exc.filename}; such jobs are left out",
        )


def _mps_share(percentage: str) -> float | None:
    """A gres/mps job's share of each of its GPUs from the prolog's ``mps_percentage`` (Slurm's
    ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``), or None where it is not 1-99. The job's own
    environment is not asked: users set that variable themselves to limit their own runs."""
    if not (_ascii_digits(percentage) and len(percentage) <= 3):
        return None
    value = int(percentage)
    return value / 100 if 0 < value < 100 else None


def _names_job(env: dict[str, str], job: JobCgroup) -> bool:
    """Whether an environment belongs to ``job``: its SLURM_JOB_SLUID (SLUID-named cgroups) or
    SLURM_JOB_ID is the cgroup's."""
    if job.sluid is not None:
        return env.get("SLURM_JOB_SLUID") == job.sluid
    return env.get("SLURM_JOB_ID") == job.job_id


_SOURCE_RANK = {"job-info": 2, "environment": 1, None: 0}


def _combine(job_id: str, pieces: list[tuple[Row, JobInfo]]) -> Row:
    """One row for a job seen under several slurmd scopes: their CPUs, GPUs, CPU time and memory
    add up; user and account come from the piece with the most trusted account."""
    best = max(pieces, key=lambda piece: _SOURCE_RANK[piece[1].account_source])[0]
    row = dict(best)
    for column in ("cpus_allocated", "gpus_allocated", "cpu_seconds", "memory_bytes"):
        row[column] = sum(piece[0][column] for piece in pieces)
    row["job_id"] = job_id
    return row
