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
        return _decode(_read_whole(fd))
    finally:
        os.close(fd)


def _read_whole(fd: int) -> bytes:
    """All of an open file from its start: one ``pread`` for any small one (a large host's
    ``/proc/stat`` passes 64 KiB and takes more)."""
    data = os.pread(fd, 65536, 0)
    if len(data) < 65536:
        return data
    chunks = [data]
    offset = len(data)
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


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
    rounds (:meth:`begin_round`), one ``fstat`` of the file's directory (a descriptor of it is
    kept too, and counts against ``limit``) answers for all of its files instead: a directory
    still linked whose mtime and ctime are what they were when it was last looked at, which was
    more than :data:`SETTLED_NS` after its last change, had no entry added, removed or renamed
    since (a change would carry a later timestamp however coarse the file system's clock), so
    its kept files are still the files their names name.
    """

    def __init__(self, limit: int = 512) -> None:
        self._limit = limit
        self._fds: dict[object, dict[str, tuple[int, str]]] = {}
        self._count = 0
        self._round = 0  # 0: not in rounds, every kept file is asked itself
        # directory -> [a descriptor of it, its (mtime, ctime) at the last look, when: ns]
        self._dirs: dict[str, list[Any]] = {}
        self._in_dir: dict[str, int] = {}  # kept files per directory
        self._settled: dict[str, bool] = {}  # this round's answers, by directory
        # Closes the descriptors of a collector dropped without close() (tests make many).
        self._finalizer = weakref.finalize(self, _close_all, self._fds, self._dirs)

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
                    return _decode(_read_whole(fd))
            except OSError:
                pass  # removed, or the cgroup went away: read afresh below
            del files[key]
            self._drop(fd, directory)
        text = read_text(path)
        if self._count < self._limit:
            try:
                fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return text
            directory = key.rpartition("/")[0] or "/"
            self._fds.setdefault(owner, {})[key] = (fd, directory)
            self._count += 1
            self._in_dir[directory] = self._in_dir.get(directory, 0) + 1
        return text

    def _drop(self, fd: int, directory: str) -> None:
        """Close a kept file, and its directory's descriptor with the last of its files."""
        os.close(fd)
        self._count -= 1
        left = self._in_dir.pop(directory, 1) - 1
        if left:
            self._in_dir[directory] = left
        else:
            self._forget(directory)

    def _is_settled(self, directory: str) -> bool:
        """Whether ``directory`` had no entry changed since it was last looked at (once a
        round, through a descriptor of it kept with its files; never outside rounds)."""
        if not self._round:
            return False
        settled = self._settled.get(directory)
        if settled is not None:
            return settled
        self._settled[directory] = False
        looked = self._dirs.get(directory)
        if looked is None:
            if self._count >= self._limit:
                return False
            try:
                fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return False
            looked = self._dirs[directory] = [fd, None, 0]
            self._count += 1
        try:
            st = os.fstat(looked[0])
        except OSError:
            return False
        if not st.st_nlink:  # removed: its files are gone too, and are read afresh
            self._forget(directory)
            return False
        now = time.time_ns()
        times = (st.st_mtime_ns, st.st_ctime_ns)
        settled = bool(looked[1] == times and looked[2] - max(times) > SETTLED_NS)
        looked[1], looked[2] = times, now
        self._settled[directory] = settled
        return settled

    def _forget(self, directory: str) -> None:
        looked = self._dirs.pop(directory, None)
        if looked is not None:
            self._count -= 1
            with contextlib.suppress(OSError):
                os.close(looked[0])

    def keep_only(self, owners: set[Any]) -> None:
        """Close the files of every owner not in ``owners`` (jobs that ended)."""
        for owner in self._fds.keys() - owners:
            for fd, directory in self._fds.pop(owner).values():
                self._drop(fd, directory)

    def close(self) -> None:
        self.keep_only(set())
        for directory in list(self._dirs):
            self._forget(directory)


def kept_files_limit() -> int:
    """Files a collector may keep open: 512, or a quarter of the soft ``RLIMIT_NOFILE``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 512 if soft == resource.RLIM_INFINITY else max(0, min(512, soft // 4))


def _close_all(fds: dict[object, dict[str, tuple[int, str]]], dirs: dict[str, list[Any]]) -> None:
    descriptors = [fd for files in fds.values() for fd, _ in files.values()]
    descriptors += [looked[0] for looked in dirs.values()]
    for fd in descriptors:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
    dirs.clear()
