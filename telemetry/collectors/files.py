"""Small kernel files read every round: cgroup, procfs and sysfs attributes.

A node daemon reads a few hundred of them a second, so they are read with plain ``os.read``
calls (no text stream per file) and, where a file is read again and again, kept open and read
with one ``pread`` (:class:`KeptFiles`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
import weakref
from pathlib import Path
from typing import Any

# How long after a directory's last change a look at it must come for its timestamps to tell
# every later change: file systems stamp times from a coarse clock (a jiffy, or a second).
SETTLED_NS = 2_000_000_000


def read_text(path: Path) -> str:
    """Read a small kernel file (module-level so tests can make a job vanish mid-read).

    Plain ``os.read`` calls: a few hundred small files a round cost less without a text stream
    per file. Newlines are translated as a text-mode read would.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:
            chunks = [data]
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return _decode(data)


def _decode(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


class KeptFiles:
    """Small cgroup files kept open between rounds and read again with one ``pread``.

    Opening a cgroup file costs the kernel far more than reading it (an open file, a seq_file
    buffer), and a node reads three per job every round. A file is read through
    :func:`read_text` the first time (the patchable seam), then kept open under its owner (a
    job's key) while that owner is listed in each round (:meth:`keep_only`). A kept file that
    cannot be read, or whose name was unlinked (a removed or recreated cgroup: ENODEV on
    cgroupfs, a link count of 0 on an ordinary file system), is closed and read afresh through
    :func:`read_text`, so a job that ends or is requeued reads exactly as without this cache.
    At most ``limit`` files are kept; past that, files are opened each round as before.

    Asking each kept file whether its name was unlinked is one ``fstat`` a file and round. In
    rounds (:meth:`begin_round`), one ``stat`` of the file's directory a round answers for all
    of its files instead: a directory whose identity, mtime and ctime are what they were when
    it was last looked at, which was more than :data:`SETTLED_NS` after its mtime, had no entry
    added, removed or renamed since (a change would carry a later timestamp however coarse the
    file system's clock), so its kept files are still the files their names name.
    """

    def __init__(self, limit: int = 512) -> None:
        self._limit = limit
        self._fds: dict[object, dict[str, tuple[int, str]]] = {}
        self._count = 0
        self._round = 0  # 0: not in rounds, every kept file is asked itself
        # directory -> (its identity and times, when they were taken: ns) at the last look
        self._seen: dict[str, tuple[tuple[int, int, int, int], int]] = {}
        self._settled: dict[str, bool] = {}  # this round's answers, by directory
        # Closes the descriptors of a collector dropped without close() (tests make many).
        self._finalizer = weakref.finalize(self, _close_all, self._fds)

    def __len__(self) -> int:
        return self._count

    def begin_round(self) -> None:
        """A new round: directories are looked at again, once each."""
        self._round += 1
        self._settled.clear()

    def read(self, owner: object, path: Path) -> str:
        """The text of ``path``. Raises ``OSError`` (gone, not readable) as :func:`read_text`."""
        files = self._fds.get(owner)
        key = str(path)
        kept = files.get(key) if files is not None else None
        if kept is not None:
            assert files is not None
            fd, directory = kept
            try:
                if self._is_settled(directory) or os.fstat(fd).st_nlink:
                    data = os.pread(fd, 65536, 0)
                    if len(data) < 65536:
                        return _decode(data)
            except OSError:
                pass  # removed, or the cgroup went away: read afresh below
            del files[key]
            self._count -= 1
            os.close(fd)
        text = read_text(path)
        if self._count < self._limit:
            try:
                fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return text
            self._fds.setdefault(owner, {})[key] = (fd, key.rpartition("/")[0] or "/")
            self._count += 1
        return text

    def _is_settled(self, directory: str) -> bool:
        """Whether ``directory`` had no entry changed since it was last looked at (once a
        round; never outside rounds)."""
        if not self._round:
            return False
        settled = self._settled.get(directory)
        if settled is not None:
            return settled
        try:
            st = os.stat(directory)
        except OSError:
            self._seen.pop(directory, None)
            self._settled[directory] = False
            return False
        now = time.time_ns()
        identity = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        last = self._seen.get(directory)
        settled = (
            last is not None
            and last[0] == identity
            and last[1] - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_NS
        )
        self._seen[directory] = (identity, now)
        self._settled[directory] = settled
        return settled

    def keep_only(self, owners: set[Any]) -> None:
        """Close the files of every owner not in ``owners`` (jobs that ended)."""
        for owner in self._fds.keys() - owners:
            files = self._fds.pop(owner)
            self._count -= len(files)
            for fd, directory in files.values():
                os.close(fd)
                self._seen.pop(directory, None)

    def close(self) -> None:
        self.keep_only(set())


def kept_files_limit() -> int:
    """Files a collector may keep open: 512, or a quarter of the soft ``RLIMIT_NOFILE``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 512 if soft == resource.RLIM_INFINITY else max(0, min(512, soft // 4))


def _close_all(fds: dict[object, dict[str, tuple[int, str]]]) -> None:
    for files in fds.values():
        for fd, _ in files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
    fds.clear()
