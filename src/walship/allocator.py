"""glibc's allocator, tuned for a server that allocates and frees in large waves.

By default glibc hands freed heap back to the kernel as soon as 128 KiB sit free at the top,
and serves blocks over 128 KiB to 32 MiB (its threshold moves) with fresh ``mmap``s. A node frees a
memtable's worth of events at every checkpoint and allocates the next batch right after, so
the kernel zero-fills and faults in the same pages again and again — ~1.9 µs a page on a small
VM (see ``PERFORMANCE.md``), which cut a follower's record verification from 1.8 to 2.9 µs a
record. ``mallopt`` raises both thresholds for the running process (the environment variables
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` would only work at exec time).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 1 << 30
MMAP_THRESHOLD_BYTES = 64 << 20


def tune_allocator() -> bool:
    """Keep up to 1 GiB of freed heap for reuse and ``mmap`` only blocks over 64 MiB.

    True when applied; False on a C library without ``mallopt`` (musl, macOS), where it does
    nothing. Memory freed stays with the process for reuse, so RSS follows the peak.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    )
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok
