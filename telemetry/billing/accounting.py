"""Scheduler accounting (SPEC §4 Allocation): jobs' exact start, end, owner and allocation, read
from ``sacct --json`` (data_parser v0.0.39-v0.0.44) or ``sacct --parsable2`` output.

Every problem is a ``TallyError`` naming the file and the record (line number or JSON index), which
the CLI turns into exit code 2. Times without an offset are UTC; an end of ``Unknown``/``None``/0
means the job still runs (allocated to the end of the bill's range).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from telemetry.billing.windows import NS, parse_instant
from telemetry.errors import TallyError, read_text_file
from telemetry.hostlist import expand_hostlist

_PARSABLE_NEEDS = ("JobIDRaw", "User", "Account", "Start", "End", "AllocTRES", "NodeList")
_NOT_STARTED = {"", "Unknown", "None", "N/A"}
_NO_NODES = {"", "None assigned", "(null)"}
# states whose record holds no allocation
_NOT_RUNNING = {"PENDING", "REQUEUE_HOLD", "REQUEUE_FED"}
# the record of a run that ended in a requeue (``sacct -D`` lists each run of a job): billed
# from its start to its end; without an end it says nothing of when the run stopped
_REQUEUED = "REQUEUED"
_GRES = ("gpu", "shard", "mps")  # gres entries named so (or "<name>:<type>") count GPUs or shares


@dataclass(frozen=True)
class Record:
    """One job's allocation: ``cpus`` and ``gpus`` over all its ``nodes``, [start, end) in ns
    (``end`` None: still running). ``gpus`` is None for a job on GPU shards or MPS: accounting
    counts shards or MPS shares, not what fraction of a GPU they are, so its GPU allocation
    stays the sampled one."""

    job_id: str
    user: str
    account: str
    nodes: tuple[str, ...]
    start_ns: int
    end_ns: int | None
    cpus: float
    gpus: float | None


# ------------------------------------------------------------------------------- reading
def load_accounting(paths: Iterable[Path]) -> list[Record]:
    """Records of every file, JSON or parsable2 by content. A job in several files keeps the
    record that knows most — an end over none (a later sacct run saw it finish), then the later
    end — whatever order the files come in."""
    records: dict[tuple[str, int], Record] = {}  # by job and start: each run of a requeued job
    for path in paths:
        text = read_text_file(path, "accounting")
        parsed = (
            parse_sacct_json(text, str(path))
            if text.lstrip().startswith("{")
            else parse_sacct_parsable(text, str(path))
        )
        for record in parsed:
            key = (record.job_id, record.start_ns)
            seen = records.get(key)
            if seen is None or _knows_more(record, seen):
                records[key] = record
    return sorted(records.values(), key=lambda r: (r.start_ns, r.job_id))


def _state(job: dict[str, Any]) -> set[str]:
    """``state.current``: a string (v0.0.39) or an array of flags (v0.0.40+)."""
    state = job.get("state")
    current = state.get("current") if isinstance(state, dict) else state
    if isinstance(current, str):
        return {current.upper()}
    if isinstance(current, list):
        return {str(c).upper() for c in current}
    return set()


def _knows_more(new: Record, old: Record) -> bool:
    def rank(r: Record) -> tuple[bool, int, int, tuple[str, ...]]:
        return (r.end_ns is not None, r.end_ns or 0, r.start_ns, r.nodes)

    return rank(new) > rank(old)


def _number(value: Any) -> tuple[float | None, bool]:
    """A sacct JSON number, plain or ``{set, infinite, number}``: (value or None, infinite)."""
    if isinstance(value, dict):
        if value.get("infinite"):
            return None, True
        if not value.get("set", True):
            return None, False
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, False
    return float(value), False


def parse_sacct_json(text: str, source: str = "<accounting>") -> list[Record]:
    """``sacct --json`` output → records of the jobs that started (pending ones have none)."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise TallyError(f"accounting {source}: not valid JSON: {exc}") from None
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list):
        raise TallyError(f"accounting {source}: no 'jobs' array (is this sacct --json output?)")
    out = []
    for i, job in enumerate(jobs):
        where = f"accounting {source}: jobs[{i}]"
        if not isinstance(job, dict):
            raise TallyError(f"{where}: not an object")
        try:
            record = _json_record(job)
        except (KeyError, TypeError, ValueError) as exc:
            raise TallyError(f"{where}: {_reason(exc)}") from None
        if record is not None:
            out.append(record)
    return out


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc)


def _json_record(job: dict[str, Any]) -> Record | None:
    job_id, _ = _number(job["job_id"])
    if job_id is None or job_id != int(job_id):
        raise ValueError(f"job_id {job['job_id']!r} is not a whole number")
    time = job["time"]
    if not isinstance(time, dict):
        raise TypeError("time is not an object")
    start, _ = _number(time.get("start"))
    states = _state(job)
    if not start or states & _NOT_RUNNING:
        return None  # pending or never started: no allocation
    end, infinite = _number(time.get("end"))
    if end is not None and end == start:
        return None  # cancelled as it started: nothing allocated
    if _REQUEUED in states and (infinite or not end):
        return None
    allocated = (job.get("tres") or {}).get("allocated") or []
    if not isinstance(allocated, list):
        raise TypeError("tres.allocated is not an array")
    cpus = gpus = typed_gpus = shards = 0.0
    for entry in allocated:
        if not isinstance(entry, dict):
            raise TypeError("tres.allocated holds a non-object")
        kind, name = entry.get("type"), entry.get("name") or ""
        if not isinstance(name, str):
            raise TypeError(f"tres.allocated name {name!r} is not a string")
        if kind != "cpu" and not (kind == "gres" and name.split(":")[0] in _GRES):
            continue  # not billed (energy, memory, licenses: a running job's energy is -2)
        count, _ = _number(entry.get("count"))
        if count is None or count < 0:
            raise ValueError(f"tres.allocated count {entry.get('count')!r} is not a number >= 0")
        if kind == "cpu":
            cpus += count
        elif kind == "gres" and name == "gpu":
            gpus += count
        elif kind == "gres" and name.startswith("gpu:"):
            typed_gpus += count
        elif kind == "gres" and name.split(":")[0] in ("shard", "mps"):
            shards += count
    nodes = job.get("nodes")
    if not isinstance(nodes, str):
        raise TypeError("nodes is not a string")
    if nodes.strip() in _NO_NODES:
        return None
    return _record(
        str(int(job_id)),
        job.get("user"),
        job.get("account"),
        nodes,
        int(start) * NS,
        None if infinite or not end else int(end) * NS,
        cpus,
        _gpus(gpus or typed_gpus, shards),  # typed GPUs repeat the untyped count
    )


def _gpus(gpus: float, shards: float) -> float | None:
    return None if shards and not gpus else gpus


def _record(
    job_id: str,
    user: Any,
    account: Any,
    nodes: str,
    start_ns: int,
    end_ns: int | None,
    cpus: float,
    gpus: float | None,
) -> Record:
    if not isinstance(user, str) or not user:
        raise ValueError("no user")
    if not isinstance(account, str):
        raise ValueError("account is not a string")
    account = account or "unknown"  # a cluster without associations prints none
    try:
        hosts = tuple(dict.fromkeys(expand_hostlist(nodes)))
    except ValueError as exc:
        raise ValueError(f"node list {nodes!r}: {exc}") from None
    if end_ns is not None and end_ns < start_ns:
        raise ValueError("ends before it starts")
    return Record(job_id, user, account, hosts, start_ns, end_ns, cpus, gpus)


def parse_sacct_parsable(text: str, source: str = "<accounting>") -> list[Record]:
    """``sacct --parsable2`` output with a header → records (job steps, ``123.batch``, skipped:
    the allocation line holds the job's whole allocation)."""
    lines = text.splitlines()
    if not lines:
        raise TallyError(f"accounting {source}: empty file")
    header = lines[0].split("|")
    missing = [name for name in _PARSABLE_NEEDS if name not in header]
    if missing:
        raise TallyError(
            f"accounting {source}: line 1: the header lacks {', '.join(missing)} "
            f"(run sacct --parsable2 --format={','.join(_PARSABLE_NEEDS)})"
        )
    at = {name: header.index(name) for name in (*_PARSABLE_NEEDS, "State") if name in header}
    out = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"accounting {source}: line {number}"
        cells = line.split("|")
        if len(cells) != len(header):
            raise TallyError(f"{where}: {len(cells)} fields, the header has {len(header)}")
        job_id = cells[at["JobIDRaw"]].strip()
        if "." in job_id:
            continue
        if not job_id.isdigit():
            raise TallyError(f"{where}: JobIDRaw {job_id!r} is not a job number")
        start = cells[at["Start"]].strip()
        nodes = cells[at["NodeList"]].strip()
        if start in _NOT_STARTED or nodes in _NO_NODES:
            continue
        state = (cells[at["State"]].split() or [""])[0].upper() if "State" in at else ""
        if state in _NOT_RUNNING:
            continue
        end = cells[at["End"]].strip()
        if state == _REQUEUED and end in _NOT_STARTED:
            continue
        try:
            cpus, gpus = _alloc_tres(cells[at["AllocTRES"]])
            record = _record(
                job_id,
                cells[at["User"]].strip(),
                cells[at["Account"]].strip(),
                cells[at["NodeList"]].strip(),
                _instant(start, "Start"),
                None if end in _NOT_STARTED else _instant(end, "End"),
                cpus,
                gpus,
            )
        except (TallyError, ValueError) as exc:
            raise TallyError(f"{where}: {exc}") from None
        if record.end_ns is not None and record.end_ns == record.start_ns:
            continue  # cancelled as it started: nothing allocated
        out.append(record)
    return out


def _instant(text: str, what: str) -> int:
    return parse_instant(text, what, UTC)


_TRES = re.compile(r"^([^=]+)=([0-9.]+)([KMGTP]?)$")


def _alloc_tres(text: str) -> tuple[float, float | None]:
    """``billing=8,cpu=8,gres/gpu=2,mem=64G,node=1`` → (cpus, gpus); gpus None for shards or
    MPS shares."""
    cpus = gpus = typed = shards = 0.0
    for item in filter(None, (t.strip() for t in text.split(","))):
        name = item.partition("=")[0]
        counted = name == "cpu" or name.startswith(("gres/gpu", "gres/shard", "gres/mps"))
        match = _TRES.match(item)
        if match is None:
            if counted or "=" not in item:
                raise ValueError(f"AllocTRES item {item!r} is not name=count")
            continue  # a TRES tally does not bill (licenses, energy, …)
        count = float(match.group(2))
        if name == "cpu":
            cpus = count
        elif name == "gres/gpu":
            gpus = count
        elif name.startswith("gres/gpu:"):
            typed += count
        elif name.split(":")[0] in ("gres/shard", "gres/mps"):
            shards += count
    return cpus, _gpus(gpus or typed, shards)
