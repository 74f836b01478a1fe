"""Process-wide tuning for ``walship serve``: allocator, GIL hand-off, garbage collector.

A node is one Python process whose event loop ships and acknowledges WAL while other threads
write it, checkpoint it to Parquet and compact parts. Three CPython defaults cost it latency:

- **glibc's allocator** hands freed heap back to the kernel as soon as 128 KiB sit free at the
  top and serves blocks over 128 KiB (up to 32 MiB, its threshold moves) with fresh ``mmap``s.
  A node frees a memtable's worth of events at every checkpoint and allocates the next batch
  right after, so the kernel zero-fills and faults in the same pages again and again (~1.9 µs
  a page on a small VM, see ``PERFORMANCE.md``): record verification went from 1.8 to 2.9 µs
  a record, and every replication frame was a fresh ``mmap``. ``mallopt`` raises both
  thresholds for the running process (the environment variables ``MALLOC_TRIM_THRESHOLD_``
  and ``MALLOC_MMAP_THRESHOLD_`` only work at exec time), and checkpoints hand the free heap
  back with ``malloc_trim``.
- **The GIL switch interval** (5 ms): while a checkpoint builds Arrow columns, the event loop
  and the WAL writer wait up to that long for the GIL after every system call. 1 ms cut the
  replication lag p99 under load by about a third here.
- **The cyclic garbage collector**: a full collection walks every tracked object, including
  the modules imported at start and the memtable's indexes, and took ~60 ms a time here — a
  pause in which nothing is shipped or acknowledged. Objects alive once the node has started
  are frozen out of collections, and young collections run less often (cycles are rare: most
  memory is freed by reference counting).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 64 << 20
MMAP_THRESHOLD_BYTES = 16 << 20
SWITCH_INTERVAL_S = 0.001
GC_THRESHOLDS = (50_000, 20, 20)


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def tune_allocator() -> bool:
    """Keep up to 64 MiB of freed heap for reuse and ``mmap`` only blocks over 16 MiB.

    The second covers every buffer a replication link allocates (frames of up to 4 MiB, the
    WAL groups joined from them), which otherwise each came from a fresh ``mmap`` and were
    faulted in page by page: an empty follower catching up through the WAL took 1.2 page
    faults a record, and ~65k records/s became ~80k once they came from the heap. The heap
    this keeps is handed back after each checkpoint (``release_free_heap``): peak RSS while
    ingesting 1M events stayed at 475 to 487 MB (491 with a 1 MiB threshold and no trim, 510
    with 16 MiB and no trim).

    True when applied; False on a C library without ``mallopt`` (musl, macOS), where it does
    nothing.
    """
    mallopt = getattr(_c_library(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    )
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok


def release_free_heap() -> None:
    """Hand the free pages of every heap arena back to the kernel (glibc ``malloc_trim``).

    A checkpoint calls it after dropping a memtable, so a node at rest does not keep tens of
    MB of freed events; does nothing on a C library without it.
    """
    trim = getattr(_c_library(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def tune_process() -> None:
    """Before the node opens: allocator, GIL switch interval, collector thresholds."""
    tune_allocator()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.set_threshold(*GC_THRESHOLDS)


def settle() -> None:
    """Once the node has opened: collect, then freeze what is alive (modules, the recovered
    memtable) so later collections do not walk it again."""
    gc.collect()
    gc.freeze()
