"""Job-info files: what root says of each Slurm job (``deploy/slurm/tally-prolog``), the
source the ``job`` collector trusts over a job's own environment.

The prolog writes one small ``key=value`` file per job into the job-info directory
(``--slurm.job-info-dir``) and the epilog removes it; in between nobody changes it. Opening,
checking and parsing 50 of them every second cost more than the rest of the ``job`` collector,
so :class:`JobInfoFiles` reads a job's file once and again only after the directory told of a
change (one inotify watch: an entry added, removed or renamed, a file written, or a file's mode,
owner or link count changed; any change re-reads every file), and at least every
:data:`REREAD_SECONDS` (a file edited through a hard link outside the directory tells this
watch nothing). Where inotify cannot be had (the instance limit is shared by all of root's
processes), every file is read every round, and inotify asked again each :data:`REREAD_SECONDS`.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

from telemetry.collectors.watch import DirectoryWatch
from telemetry.errors import ParseError
from telemetry.logs import OnceLogger

#: Longest user, account or other environment string kept, in characters.
MAX_VALUE_CHARS = 1024

#: Keys of a job-info file (``deploy/slurm/tally-prolog``); others are ignored.
JOB_INFO_KEYS = frozenset(
    {"job_id", "sluid", "uid", "user", "account", "gpus", "shards", "mps_percentage"}
)
_JOB_INFO_MAX_BYTES = 64 << 10
# A job-info file read is read again at least this often, whatever the watch says.
REREAD_SECONDS = 60.0


def parse_job_info(text: str, source: str = "job-info") -> dict[str, str]:
    """A job-info file: ``key=value`` lines (``job_id``, ``sluid``, ``uid``, ``user``,
    ``account``, ``gpus``, ``shards``, ``mps_percentage``); blank lines and ``#`` comments
    skipped, unknown keys ignored, values cut to ``MAX_VALUE_CHARS``. Raises ``ParseError`` for
    a line without ``=``, a repeated key, or a ``job_id``/``uid`` that is not a number.
    """
    info: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParseError(f"{source} line {number}: expected key=value, got {line[:40]!r}")
        if key not in JOB_INFO_KEYS:
            continue
        if key in info:
            raise ParseError(f"{source} line {number}: {key} given twice")
        value = value.strip()[:MAX_VALUE_CHARS]
        numeric = value.isascii() and value.isdigit() and len(value) <= 10
        if key in ("job_id", "uid") and not numeric:
            raise ParseError(f"{source} line {number}: {key} must be a number, got {value[:40]!r}")
        info[key] = value
    return info


def job_info_dir_problem(directory: Path, owner: int = 0) -> str | None:
    """Why the job-info directory cannot be trusted ("missing", …), or ``None`` when it can: it
    must be a directory owned by ``owner`` (root) that nobody else may write to."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"is not readable ({exc.strerror or exc})"
    if not owned_safely(st, owner, directory=True):
        return f"is not a directory owned by uid {owner} and writable by it alone"
    return None


def owned_safely(st: os.stat_result, owner: int, *, directory: bool) -> bool:
    """A directory (or regular file) owned by ``owner`` that nobody else may write to."""
    kind_ok = (st.st_mode & 0o170000) == (0o040000 if directory else 0o100000)
    return kind_ok and st.st_uid == owner and not st.st_mode & 0o022


class JobInfoFiles:
    """The job-info files of one directory, each read once and again after a change (see the
    module's docstring). Call :meth:`begin_round` each round the directory is trusted, else
    :meth:`forget`."""

    def __init__(
        self,
        directory: Path,
        owner: int,
        once: OnceLogger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``owner``: the uid that must own each file; ``clock``: monotonic seconds."""
        self.directory = directory
        self._name = str(directory)
        self._owner = owner
        self._once = once
        self._clock = clock
        self._watch: DirectoryWatch | None = None
        # where inotify could not be had (the instance limit), when to try again; meanwhile
        # every file is read every round
        self._retry_at = 0.0
        # file name -> what it said (None: no usable file), while the watch vouches for it
        self._known: dict[str, dict[str, str] | None] = {}
        self._by_sluid: set[str] = set()  # the names known that are SLUIDs (see read)
        self._read_at = 0.0  # when the files known were first read
        # Changes whenever what is known does: the same number says every answer is the same.
        self.generation = 0

    def begin_round(self) -> None:
        """Drop what the directory told changed since the last round (all of it: jobs start
        and end a few times an hour), or what is older than :data:`REREAD_SECONDS`."""
        now = self._clock()
        watch = self._watch
        if watch is None:
            if now < self._retry_at:
                return
            watch = self._watch = DirectoryWatch.open(contents=True)
            if watch is None:
                self._retry_at = now + REREAD_SECONDS
                self._forget_known()
                return
        changed = watch.changed()
        if changed is None or changed:
            self._forget_known()
        elif now - self._read_at >= REREAD_SECONDS and self._known:
            self._read_known_again(now)
        if watch.fd < 0:  # the instance failed and could not be made again: try later
            self._watch = None
            self._retry_at = now + REREAD_SECONDS
            return
        if not watch.watching(self._name):
            # before any file is read: a change from now on is in the queue
            self._forget_known()
            if watch.add(self._name) == "failed":
                return  # gone or a limit: nothing is kept this round, the next tries again
        if not self._known:
            self._read_at = now

    def _read_known_again(self, now: float) -> None:
        """Read every known file again (the watch told nothing for :data:`REREAD_SECONDS`):
        one that says what it said is kept as it was, the same answer, and the generation
        stays; one that says otherwise, or could not be read, is forgotten, to be read anew."""
        forgotten = False
        for name, before in list(self._known.items()):
            info, settled = self._read(name, name in self._by_sluid)
            if not settled or info != before:
                del self._known[name]
                forgotten = True
        if forgotten:
            self.generation += 1
        self._read_at = now

    def _forget_known(self) -> None:
        self._by_sluid.clear()
        if self._known:
            self._known.clear()
            self.generation += 1

    def known(self, name: str) -> tuple[bool, dict[str, str] | None]:
        """Whether the file ``name`` is known (read, and vouched for by the watch since), and
        what :meth:`read` answers for it then."""
        return name in self._known, self._known.get(name)

    def read(self, name: str, by_sluid: bool) -> dict[str, str] | None:
        """The file ``name`` (a job id, or a SLUID where ``by_sluid``) if root wrote it and it
        names that job; ``None`` otherwise (logged once where it is unusable)."""
        try:
            return self._known[name]
        except KeyError:
            pass
        info, settled = self._read(name, by_sluid)
        if settled and self._watch is not None and self._watch.watching(self._name):
            self._known[name] = info
            if by_sluid:
                self._by_sluid.add(name)
            else:
                self._by_sluid.discard(name)
            self.generation += 1
        return info

    def _read(self, name: str, by_sluid: bool) -> tuple[dict[str, str] | None, bool]:
        """What the file says (None: nothing usable), and whether that holds until the file
        changes: a file that is not there, not root's or not well formed says so until then; a
        read that failed (out of descriptors, say) is tried again next round."""
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None, True  # no file (yet): the prolog has not run, or is not installed
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                return None, False
            self._once.warning(f"job-info:{name}", f"job: ignoring {path}: a symbolic link")
            return None, True  # as settled as a file not owned by root
        try:
            st = os.fstat(fd)
            if not owned_safely(st, self._owner, directory=False):
                self._once.warning(
                    f"job-info:{name}",
                    f"job: ignoring {path}: not a regular file owned by uid "
                    f"{self._owner} and writable by it alone",
                )
                return None, True
            data = os.read(fd, _JOB_INFO_MAX_BYTES)
        except OSError:
            return None, False
        finally:
            os.close(fd)
        try:
            info = parse_job_info(data.decode("utf-8", errors="replace"), str(path))
        except ParseError as exc:
            self._once.warning(f"job-info:{name}", f"job: ignoring {exc}")
            return None, True
        named = info.get("sluid") if by_sluid else info.get("job_id", name)
        if named != name:
            self._once.warning(f"job-info:{name}", f"job: ignoring {path}: it names another job")
            return None, True
        self._once.clear(f"job-info:{name}")
        return info, True

    def keep_only(self, names: set[str]) -> None:
        """Forget the files of jobs no longer listed."""
        for name in self._known.keys() - names:
            del self._known[name]
            self._by_sluid.discard(name)
            self.generation += 1

    def forget(self) -> None:
        """The directory is not trusted (or not there): nothing is kept, nothing watched."""
        self._forget_known()
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def close(self) -> None:
        self.forget()
