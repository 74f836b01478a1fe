"""Process-wide tuning for ``walship serve``: allocator, GIL hand-off, garbage collector.

A node is one Python process whose event loop ships and acknowledges WAL while other threads
write it, checkpoint it to Parquet and compact parts. Three CPython defaults cost it latency:

- **glibc's allocator** hands freed heap back to the kernel as soon as 128 KiB sit free at the
  top and serves blocks over 128 KiB (up to 32 MiB, its threshold moves) with fresh ``mmap``s.
  A node frees a memtable's worth of events at every checkpoint and allocates the next batch
  right after, so the kernel zero-fills and faults in the same pages again and again (~1.9 µs
  a page on a small VM, see ``PERFORMANCE.md``): record verification went from 1.8 to 2.9 µs
  a record. ``mallopt`` raises both thresholds for the running process (the environment
  variables ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_`` only work at exec time).
- **The GIL switch interval** (5 ms): while a checkpoint builds Arrow columns, the event loop
  and the WAL writer wait up to that long for the GIL after every system call. 1 ms cut the
  replication lag p99 under load by about a third here.
- **The open-file limit**: each subscription holds a socket, and many systems start
  processes with a soft limit of 1,024 descriptors (the hard limit is usually far higher). A
  node meant to hold thousands of streams raises its soft limit to the hard one (capped at
  ``OPEN_FILES_WANTED``) at start, as Go's runtime does for every program.
- **The cyclic garbage collector**: a full collection walks every tracked object, including
  the modules imported at start and the memtable's indexes, and took ~60 ms a time here — a
  pause in which nothing is shipped or acknowledged. Objects alive once the node has started
  are frozen out of collections, and young collections run less often (cycles are rare: most
  memory is freed by reference counting).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import resource
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 64 << 20
MMAP_THRESHOLD_BYTES = 1 << 20
SWITCH_INTERVAL_S = 0.001
GC_THRESHOLDS = (50_000, 20, 20)
OPEN_FILES_WANTED = 1 << 16  # subscriptions are sockets: 10,000 of them and room to spare


def tune_allocator() -> bool:
    """Keep up to 64 MiB of freed heap for reuse and ``mmap`` only blocks over 1 MiB.

    A threshold above a 4 MiB frame would spare a follower the page faults of each frame
    buffer, but kept 70 to 100 MB more at peak (fragmented heap) when ingesting 1M events.

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


def raise_open_files_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (at most ``OPEN_FILES_WANTED``);
    the soft limit now. Never lowers it; an error (a platform without it) leaves it as is."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else hard
        wanted = min(wanted, OPEN_FILES_WANTED)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            log.debug("open-file limit raised from %d to %d", soft, wanted)
            return wanted
        return soft
    except (OSError, ValueError) as exc:
        log.debug("open-file limit left as it is: %s", exc)
        return -1


def tune_process() -> None:
    """Before the node opens: allocator, GIL switch interval, collector thresholds, the
    open-file limit."""
    raise_open_files_limit()
    tune_allocator()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.set_threshold(*GC_THRESHOLDS)


def settle() -> None:
    """Once the node has opened: collect, then freeze what is alive (modules, the recovered
    memtable) so later collections do not walk it again."""
    gc.collect()
    gc.freeze()
