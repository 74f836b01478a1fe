"""Parquet parts written by a worker process, off the serving process's GIL (issue 15, item 4).

Building a part is Python-to-Arrow conversion and Parquet encoding (a checkpoint: 4-5 us per
event) or Arrow glue around Parquet reads and writes (a merge); run in the node's own process,
it takes turns for the GIL with the event loop that ships WAL records and answers
acknowledgements, which showed as stalls of 50-300 ms (docs/benchmarks.md, "Where the time
goes"). Here a
single worker process, started on first use with ``spawn`` (never ``fork``: the node's threads
hold locks a forked child would inherit held) and at a lower CPU priority, writes the part file
-- tmp, fsync, rename, fsync dir, as ``parquet.write_part`` and ``compaction.write_merged``
always did -- and returns its manifest entry; the store then builds the id index and swaps the
manifest itself, so a part is installed atomically or not at all. A checkpoint's rows go to
the worker as one Arrow stream (the memtable's batches, copied once into the pipe).

If the worker dies (killed, out of memory), that checkpoint or merge fails with a
``StorageError``, the file it may have left (``.tmp`` or renamed, but never in a manifest) is
removed, and the next one starts a new worker: a failed checkpoint keeps its events in the
memtable and is retried with backoff, a failed merge is retried by the compactor. A worker whose
node was killed exits by itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from walship.errors import StorageError
from walship.storage.compaction import merge_files, merged_id_hashes
from walship.storage.parquet import PartInfo, PartReader, part_name, write_part_rows

WORKER_NICENESS = 10  # under the serving process: shipping and acks first, parts when idle
PARENT_POLL_S = 0.5


def _start_worker(increment: int, parent_pid: int) -> None:
    """In the worker: a lower priority, and an exit when the node that started it is gone."""
    with contextlib.suppress(OSError):
        os.nice(increment)
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid,), name="walship-merge-parent", daemon=True
    ).start()


def _exit_with_parent(parent_pid: int) -> None:
    # a node killed with SIGKILL cannot stop its worker, and the worker's own end of the task
    # pipe keeps it from ever seeing EOF: without this it would live on, orphaned
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


class PartWorker:
    """One worker process that writes merged parts; started lazily, restarted after a death."""

    def __init__(self, niceness: int = WORKER_NICENESS) -> None:
        self._niceness = niceness
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(self._niceness, os.getpid()),
                )
            return self._pool

    def checkpoint(
        self, directory: Path, table: pa.Table, first: int, last: int, rows: int
    ) -> PartInfo:
        """``parquet.write_part_rows`` in the worker: the new part's entry. StorageError when
        the worker died; nothing of the part is left."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        body = sink.getvalue().to_pybytes()
        return self._run(directory, first, last, _checkpoint_file, str(directory), body, first,
                         last, rows)  # fmt: skip

    def merge(
        self, directory: Path, readers: list[PartReader], rows: int
    ) -> tuple[PartInfo, np.ndarray]:
        """``compaction.merge_parts`` with the file written by the worker: the merged part's
        entry and id index. StorageError when the worker died; nothing of the merge is left."""
        inputs = [r.info for r in readers]
        first, last = inputs[0].first_lsn, inputs[-1].last_lsn
        info = self._run(directory, first, last, merge_files, str(directory), inputs, rows)
        return info, merged_id_hashes(readers)

    def _run(self, directory: Path, first: int, last: int, fn: Any, *args: Any) -> PartInfo:
        try:
            info: PartInfo = self._executor().submit(fn, *args).result()
        except BrokenProcessPool as exc:
            self._broken()
            _remove_leftovers(directory, part_name(first, last))
            raise StorageError(
                "the Parquet worker process died; the part will be written again by a new one"
            ) from exc
        return info

    def pid(self) -> int:
        """The worker's process id (starts it when none runs)."""
        return int(self._executor().submit(os.getpid).result())

    def _broken(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the worker, after the merge it may be running."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _checkpoint_file(directory: str, body: bytes, first: int, last: int, rows: int) -> PartInfo:
    """In the worker: the checkpoint part of the memtable rows in ``body`` (an Arrow stream)."""
    table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    return write_part_rows(Path(directory), table, first, last, rows)


def _remove_leftovers(directory: Path, name: str) -> None:
    for path in (directory / name, directory / (name + ".tmp")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
