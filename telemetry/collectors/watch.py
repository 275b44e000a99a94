"""Which directories had an entry added, removed or renamed (or, watching contents, a file
changed) since the last look (Linux inotify).

:class:`KeptFiles <telemetry.collectors.files.KeptFiles>` keeps a job's cgroup files open between
rounds, and :class:`JobListing <telemetry.collectors.slurm.JobListing>` the list of job cgroups:
both hold while nothing in the directories they came from was created, unlinked or renamed, which
one drained inotify queue a round tells for every directory at once. :class:`JobInfoFiles
<telemetry.collectors.jobinfo.JobInfoFiles>` watches the job-info directory's files' contents
too (``contents``). Where inotify is missing (not Linux, no libc, the instance or watch limit
reached) :meth:`DirectoryWatch.open` gives ``None`` and :meth:`DirectoryWatch.add` ``"failed"``:
the caller then looks itself.

A directory removed on cgroupfs (kernfs) sends its own watch nothing, unlike tmpfs or ext4: a
name whose directory was removed and made again is found out only by :meth:`DirectoryWatch.add`
of that name, which then names another inode and answers ``"new"``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import threading
import weakref
from typing import Any, Literal

# <sys/inotify.h>
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# An entry added, removed or renamed, or the directory itself removed or moved.
_CHANGES = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
# ... or, watching contents too, a file in it written, or its mode, owner or link count changed.
_CONTENT_CHANGES = _CHANGES | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows

_loaded: list[Any] = []  # [libc or None], once loaded
_loading = threading.Lock()


def _library() -> Any:
    """The C library's inotify calls, typed; ``None`` where there are none (loaded once)."""
    if not _loaded:
        with _loading:
            if not _loaded:
                _loaded.append(_load())
    return _loaded[0]


def _load() -> Any:
    try:  # the process' own symbols: libc's, whichever libc it is (no ldconfig run)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class DirectoryWatch:
    """One inotify instance watching directories for entries added, removed or renamed (and,
    ``contents``: for their files written, or their mode, owner or link count changed)."""

    def __init__(self, libc: Any, fd: int, contents: bool = False) -> None:
        self._libc = libc
        self._mask = (_CONTENT_CHANGES if contents else _CHANGES) | IN_ONLYDIR
        self._fd = -1
        self._closer: weakref.finalize[Any, DirectoryWatch] | None = None
        self._paths: dict[int, set[str]] = {}  # watch descriptor -> the paths it watches
        self._wd: dict[str, int] = {}
        self._take(fd)

    @classmethod
    def open(cls, contents: bool = False) -> DirectoryWatch | None:
        """A new watch; ``None`` where inotify cannot be had."""
        libc = _library()
        if libc is None:
            return None
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        return None if fd < 0 else cls(libc, fd, contents)

    def _take(self, fd: int) -> None:
        """Own ``fd`` (closed by :meth:`close`, or when this watch is dropped unclosed)."""
        if self._closer is not None:
            self._closer.detach()
        self._fd = fd
        self._closer = weakref.finalize(self, _close, fd) if fd >= 0 else None

    @property
    def fd(self) -> int:
        return self._fd

    def add(self, directory: str) -> Literal["kept", "new", "failed"]:
        """Watch ``directory``: ``"kept"`` when the same directory was watched already (what
        changed in it since is in the queue), ``"new"`` when it was not, or its name now names
        another directory (changes before now are not), ``"failed"`` when it cannot be (gone,
        not a directory, a limit)."""
        if self._fd < 0:
            return "failed"
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), self._mask)
        old = self._wd.get(directory)
        if wd == old:
            return "kept"
        if old is not None:
            self._forget(directory, old)
        if wd < 0:
            return "failed"
        self._wd[directory] = wd
        self._paths.setdefault(wd, set()).add(directory)  # two names of one directory: one wd
        return "new"

    def watching(self, directory: str) -> bool:
        return directory in self._wd

    def remove(self, directory: str) -> None:
        """Stop watching ``directory`` (nothing if it is not watched)."""
        wd = self._wd.get(directory)
        if wd is not None:
            self._forget(directory, wd)

    def _forget(self, directory: str, wd: int) -> None:
        del self._wd[directory]
        paths = self._paths.get(wd, set())
        paths.discard(directory)
        if not paths:
            self._paths.pop(wd, None)
            if self._fd >= 0:
                self._libc.inotify_rm_watch(self._fd, wd)  # fails harmlessly if gone already

    def changed(self) -> set[str] | None:
        """The watched directories changed since the last call; one that was removed or moved
        away is no longer watched (:meth:`watching`). ``None`` when that cannot be told (the
        kernel's queue overflowed, or the instance failed): then nothing is watched any more,
        and every directory must be looked at afresh and added again."""
        if self._fd < 0:
            return None
        changed: set[str] = set()
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return changed
            except OSError:
                self._restart()
                return None
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    self._restart()
                    return None
                paths = self._paths.get(wd)
                if paths is None:
                    continue  # a watch removed meanwhile
                changed |= paths
                if mask & (IN_IGNORED | IN_MOVE_SELF):  # the name no longer is this directory
                    for path in list(paths):
                        self._forget(path, wd)

    def _restart(self) -> None:
        """A new instance with no watch: what the old one's lost events said is unknown."""
        self.close()
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        self._take(fd if fd >= 0 else -1)

    def close(self) -> None:
        self._paths.clear()
        self._wd.clear()
        if self._closer is not None:
            self._closer()  # closes the descriptor once
            self._closer = None
        self._fd = -1
