"""A pipe that wakes a thread asleep in ``poll()`` or ``select()`` on it.

The daemon's loop and the HTTP server's serving thread sleep in the kernel until there is
something to do, instead of waking on a timer to look for a stop request.
"""

from __future__ import annotations

import contextlib
import os
import threading


class WakePipe:
    """Wait for :attr:`fd` to become readable; :meth:`wake` makes it so.

    :meth:`wake` may be called from any thread or a signal handler, also after :meth:`close`
    (then it does nothing): it never writes to a descriptor closed, and perhaps reused, meanwhile.
    """

    def __init__(self) -> None:
        self.fd, write = os.pipe()
        os.set_blocking(write, False)  # a full pipe already wakes: never block a signal handler
        self._write: int | None = write
        # Reentrant: a signal handler may wake on the thread that is closing.
        self._lock = threading.RLock()

    def wake(self) -> None:
        with self._lock:
            if self._write is not None:
                with contextlib.suppress(OSError):
                    os.write(self._write, b"x")

    def close(self) -> None:
        with self._lock:
            write, self._write = self._write, None  # a handler running after this sees None
            if write is not None:
                os.close(write)
                os.close(self.fd)
