"""Which directories had an entry added, removed or renamed since the last look (Linux inotify).

:class:`KeptFiles <telemetry.collectors.files.KeptFiles>` keeps a job's cgroup files open between
rounds; a kept file still is the file its name names while nothing in its directory was unlinked,
created or renamed, which one drained inotify queue a round tells for every directory at once.
Where inotify is missing (not Linux, no ``libc``, the instance or watch limit reached)
:meth:`DirectoryWatch.open` gives ``None`` and :meth:`DirectoryWatch.add` ``False``: the caller
then asks each file itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
from typing import Any

# <sys/inotify.h>
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
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows

_libc: Any = None


def _library() -> Any:
    """libc with inotify's three calls typed, or ``None`` (loaded once)."""
    global _libc
    if _libc is None:
        _libc = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.inotify_init1.argtypes = [ctypes.c_int]
            libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
            libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
            _libc = libc
        except (OSError, AttributeError):
            pass
    return _libc or None


class DirectoryWatch:
    """One inotify instance watching directories for entries added, removed or renamed."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._paths: dict[int, set[str]] = {}  # watch descriptor -> the paths it watches
        self._wd: dict[str, int] = {}

    @classmethod
    def open(cls) -> DirectoryWatch | None:
        """A new watch; ``None`` where inotify cannot be had."""
        libc = _library()
        if libc is None:
            return None
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        return None if fd < 0 else cls(fd)

    @property
    def fd(self) -> int:
        return self._fd

    def add(self, directory: str) -> bool:
        """Watch ``directory``; ``False`` when it cannot be (gone, not a directory, a limit)."""
        if directory in self._wd:
            return True
        if self._fd < 0:
            return False
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(directory), _CHANGES | IN_ONLYDIR)
        if wd < 0:
            return False
        self._wd[directory] = wd
        self._paths.setdefault(wd, set()).add(directory)  # two names of one directory: one wd
        return True

    def watching(self, directory: str) -> bool:
        return directory in self._wd

    def remove(self, directory: str) -> None:
        """Stop watching ``directory`` (nothing if it is not watched)."""
        wd = self._wd.pop(directory, None)
        if wd is None:
            return
        paths = self._paths[wd]
        paths.discard(directory)
        if not paths:
            del self._paths[wd]
            if self._fd >= 0:
                _libc.inotify_rm_watch(self._fd, wd)  # fails harmlessly for a watch gone already

    def changed(self) -> set[str] | None:
        """The watched directories changed since the last call; one that was removed or moved
        away is no longer watched (:meth:`watching`). ``None`` when that cannot be told (the
        kernel's queue overflowed, or the instance failed): then nothing is watched any more,
        and every directory must be asked afresh and added again."""
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
                    self._paths.pop(wd)
                    for path in paths:
                        del self._wd[path]
                    if not mask & IN_IGNORED:
                        _libc.inotify_rm_watch(self._fd, wd)

    def _restart(self) -> None:
        """A new instance with no watch: what the old one's lost events said is unknown."""
        fd = self._fd
        self._fd = -1
        self.close()
        with contextlib.suppress(OSError):
            os.close(fd)
        new = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        self._fd = new if new >= 0 else -1

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self._paths.clear()
        self._wd.clear()
