"""Small kernel files read every round: cgroup, procfs and sysfs attributes.

A node daemon reads a few hundred of them a second, so they are read with plain ``os.read``
calls (no text stream per file) and, where a file is read again and again, kept open and read
with one ``pread`` (:class:`KeptFiles`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import weakref
from pathlib import Path
from typing import Any

from telemetry.collectors.watch import DirectoryWatch


def read_text(path: Path | str) -> str:
    """Read a small kernel file (module-level so tests can make a job vanish mid-read).

    Plain ``os.read`` calls: a few hundred small files a round cost less without a text stream
    per file. Newlines are translated as a text-mode read would.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _decode(_read_whole(fd))
    finally:
        os.close(fd)


def _read_whole(fd: int, first: bytes | None = None) -> bytes:
    """An open file whole, in one ``pread`` from its start (``first``: what a 64 KiB one gave).

    A proc file read in pieces is made afresh for each piece (a large host's ``/proc/stat``
    passes 64 KiB), so the pieces could come from two moments and tear a line where they meet:
    a buffer twice as large is tried until the whole file fits one read.
    """
    size = 65536
    data = os.pread(fd, size, 0) if first is None else first
    while len(data) >= size:
        size *= 2
        data = os.pread(fd, size, 0)
    return data


def _decode(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return _newlines(text) if "\r" in text else text


def _newlines(text: str) -> str:
    """Newlines as a text-mode read translates them."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


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
    rounds (:meth:`begin_round`), a :class:`~telemetry.collectors.watch.DirectoryWatch` on the
    kept files' directories answers for all of them with one read of its queue: a directory
    watched since before its files were opened, with no entry added, removed or renamed since,
    still names them. In the round after a directory changed its files are asked themselves; the
    files of a directory moved away, and all of them when the queue overflowed, are closed and
    opened again by name. Without inotify every file is asked, every round.
    """

    def __init__(self, limit: int = 512) -> None:
        self._limit = limit
        self._fds: dict[object, dict[str, tuple[int, str]]] = {}
        self._count = 0
        self._round = 0  # 0: not in rounds, every kept file is asked itself
        self._watch: DirectoryWatch | None = None
        # directory -> the round its watch began (-1: it cannot be watched)
        self._watched: dict[str, int] = {}
        self._changed: set[str] = set()  # directories changed since the round before
        self._in_dir: dict[str, int] = {}  # kept files per directory
        self._opened: dict[object, int] = {}  # owner -> the round a file of it was last opened
        # Changes whenever a file is kept or dropped, or a watched directory changed: the same
        # number says every kept file is the one it was, and settled as it was.
        self.generation = 0
        # Closes the descriptors of a collector dropped without close() (tests make many).
        self._finalizer = weakref.finalize(self, _close_all, self._fds)

    def __len__(self) -> int:
        return self._count

    def begin_round(self) -> None:
        """A new round: what changed in the watched directories since the last is read."""
        self._round += 1
        self._changed = set()
        watch = self._watch
        if watch is None or not self._watched:
            return
        changed = watch.changed()
        if changed:
            self.generation += 1
        if changed is None:  # events lost: nothing is known, every file is opened again
            self.generation += 1
            self._watched.clear()
            self.keep_only(set())
            return
        for directory in changed:
            if not watch.watching(directory):  # removed or moved away: its files are not ours
                self._close_directory(directory)
        self._changed = changed

    def read(self, owner: object, path: Path | str) -> str:
        """The text of ``path``. Raises ``OSError`` (gone, not readable) as :func:`read_text`.
        A name given as a string saves turning a ``Path`` into one every round."""
        files = self._fds.get(owner)
        key = path if type(path) is str else str(path)
        kept = files.get(key) if files is not None else None
        if kept is not None:
            assert files is not None
            fd, directory = kept
            # Settled: known to have had no entry changed since its files were opened (watched
            # since a round before this one, not changed since; in rounds only), so no fstat.
            began = self._watched.get(directory, -1)
            settled = 0 <= began < self._round and directory not in self._changed
            try:
                if settled or os.fstat(fd).st_nlink:
                    # the one pread of a small file, inline: a node reads hundreds a second
                    data = os.pread(fd, 65536, 0)
                    if len(data) < 65536:
                        text = data.decode("utf-8", errors="replace")
                        return _newlines(text) if "\r" in text else text
                    return _decode(_read_whole(fd, data))
            except OSError:
                pass  # removed, or the cgroup went away: read afresh below
            del files[key]
            self._drop(fd, directory)
        # what the seam takes, made only where a file is opened
        opened = path if isinstance(path, Path) else Path(path)
        if self._count >= self._limit:
            return read_text(opened)  # not kept: opened by name every round, nothing to tell
        self._opened[owner] = self._round
        directory = key.rpartition("/")[0] or "/"
        # Before the file is opened, a change after is told; and a directory made again under
        # its name (cgroupfs tells no watch of a removal) is found here and watched anew.
        self._watch_directory(directory)
        try:
            text = read_text(opened)
        except OSError:
            self._unwatch_unkept(directory)
            raise
        try:
            fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._unwatch_unkept(directory)
            return text  # read, not kept
        self._fds.setdefault(owner, {})[key] = (fd, directory)
        self._count += 1
        self.generation += 1
        self._in_dir[directory] = self._in_dir.get(directory, 0) + 1
        return text

    def settled_fds(self, owner: object, first: str, second: str) -> tuple[int, int] | None:
        """The descriptors of ``first`` and ``second`` where both are kept and settled in one
        directory (watched since a round before this one, no entry of it changed since: the
        names still name these files); else ``None``."""
        files = self._fds.get(owner)
        if files is None:
            return None
        one, two = files.get(first), files.get(second)
        if one is None or two is None:
            return None
        directory = one[1]
        began = self._watched.get(directory, -1)
        if two[1] != directory or not 0 <= began < self._round or directory in self._changed:
            return None
        return one[0], two[0]

    def opened_in_round(self, owner: object) -> bool:
        """Whether a file of ``owner`` was opened by name to be kept this round
        (:meth:`begin_round`): read for the first time, or again because the one kept was gone
        (a cgroup made anew). Files past the limit, opened every round, do not count."""
        return self._opened.get(owner) == self._round

    def _watch_directory(self, directory: str) -> None:
        """Watch ``directory`` where it is not (or where its name now names another one)."""
        began = self._watched.get(directory)
        if began is not None and began < 0:
            return  # it could not be watched: its files are asked themselves
        watch = self._watch
        if watch is None:
            watch = self._watch = DirectoryWatch.open()
            if watch is None:
                self._watched[directory] = -1
                return
        answer = watch.add(directory)
        if answer == "failed":  # gone, or a limit: no longer watched
            self._watched[directory] = -1
        elif answer == "new" or began is None:
            self._watched[directory] = self._round

    def _drop(self, fd: int, directory: str) -> None:
        """Close a kept file, and stop watching its directory with the last of its files."""
        self.generation += 1  # first: a close that fails still ends what was kept
        os.close(fd)
        self._count -= 1
        left = self._in_dir.pop(directory, 1) - 1
        if left:
            self._in_dir[directory] = left
        else:
            self._unwatch(directory)

    def _unwatch_unkept(self, directory: str) -> None:
        if not self._in_dir.get(directory):
            self._unwatch(directory)

    def _close_directory(self, directory: str) -> None:
        for files in self._fds.values():
            for key, (fd, where) in list(files.items()):
                if where == directory:
                    del files[key]
                    self._drop(fd, where)
        self._unwatch(directory)

    def _unwatch(self, directory: str) -> None:
        """Stop watching ``directory``; with the last one, close the watch (opened again when a
        directory is to be watched)."""
        if self._watched.pop(directory, None) is None or self._watch is None:
            return
        self._watch.remove(directory)
        if not self._watched:
            self._watch.close()
            self._watch = None

    def keep_only(self, owners: set[Any]) -> None:
        """Close the files of every owner not in ``owners`` (jobs that ended)."""
        for owner in self._fds.keys() - owners:
            for fd, directory in self._fds.pop(owner).values():
                self._drop(fd, directory)
        for owner in self._opened.keys() - owners:
            del self._opened[owner]

    def close(self) -> None:
        self.keep_only(set())
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._watched.clear()


def kept_files_limit() -> int:
    """Files a collector may keep open: 512, or a quarter of the soft ``RLIMIT_NOFILE``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 512 if soft == resource.RLIM_INFINITY else max(0, min(512, soft // 4))


def _close_all(fds: dict[object, dict[str, tuple[int, str]]]) -> None:
    descriptors = [fd for files in fds.values() for fd, _ in files.values()]
    for fd in descriptors:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
