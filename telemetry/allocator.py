"""Memory allocation tuned for batch commands that stream millions of rows through big arrays.

A bill allocates and frees arrays of tens of megabytes per chunk. By default glibc gives every
such block back to the kernel on free and Arrow's mimalloc purges freed pages soon after, so each
chunk pays page faults to get the same memory again: a third of a 10M-row bill's time was spent
in the kernel. Batch commands (bill, report, replay) keep freed memory for reuse instead; the
long-running daemon and aggregator keep the defaults, which return memory to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import pyarrow as pa

log = logging.getLogger("tally.allocator")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit: blocks above it are always mapped afresh.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB of free heap kept
_TOP_PAD = 256 * 1024 * 1024

_applied = False


def keep_freed_memory() -> bool:
    """Make freed memory reusable without a round trip through the kernel (process-wide, once).

    Arrow allocates from the system allocator, and glibc serves blocks up to 32 MiB from its heap,
    never trimming it. Returns True when glibc accepted the settings; elsewhere (musl, macOS)
    only Arrow's pool changes. Costs resident memory: the heap stays at its peak until exit.
    """
    global _applied
    if _applied:
        return True
    _applied = True
    try:
        pa.set_memory_pool(pa.system_memory_pool())
    except (pa.ArrowException, NotImplementedError) as exc:  # pragma: no cover - build-specific
        log.debug("arrow system memory pool unavailable: %s", exc)
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    accepted = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, _TOP_PAD),
        )
    )
    return accepted
