"""glibc's heap, tuned for long-lived processes and handed back after big jobs (no-ops where
glibc is absent).

The node daemon's live-state arrays are rebuilt as rounds come in and glibc keeps the freed
pages: untrimmed, an hour of rows held 11 to 17 MiB of heap for a few MiB of arrays; trimmed
every 15 s (0.6 ms) at most 4.4 MiB. One arena for all threads: scrape threads would each get an
arena of their own that holds memory between scrapes (1 MiB on the benchmark node).
"""

from __future__ import annotations

import contextlib
import ctypes

M_ARENA_MAX = -8  # malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018 - glibc, or not
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def one_arena() -> None:
    """All threads allocate from one arena (call before they start)."""
    if _LIBC is not None:
        with contextlib.suppress(AttributeError):
            _LIBC.mallopt(M_ARENA_MAX, 1)


def trim() -> None:
    """Hand the heap's free pages back to the OS."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
