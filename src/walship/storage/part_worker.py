"""Parquet parts written by a worker process, off the serving process's GIL (issue 15, item 4).

Building a part is Python-to-Arrow conversion and Parquet encoding (a checkpoint: 4-5 us per
event) or Arrow glue around Parquet reads and writes (a merge); run in the node's own process,
it takes turns for the GIL with the event loop that ships WAL records and answers
acknowledgements, which showed as stalls of 50-300 ms (docs/benchmarks.md, "Where the time
goes"). Here a
worker process, started on first use with ``spawn`` (never ``fork``: the node's threads hold
locks a forked child would inherit held), writes the part file -- tmp, fsync, rename, fsync
dir, as ``parquet.write_part`` and ``compaction.write_merged`` always did -- and returns its
manifest entry; the store then builds the id index and swaps the manifest itself, so a part is
installed atomically or not at all. A checkpoint's rows go to the worker as one Arrow stream
(the memtable's batches, copied once into the pipe).

Checkpoints and merges have a worker each (two lanes), as they have a thread each in the
node: with one worker a checkpoint waited behind a merge of 16 parts, and with the merges'
lower priority, on a loaded machine, for 9-20 s; meanwhile the memtable reached twice its
budget and writes were held back (stalls of that length in the sustained benchmark's A/B).
A checkpoint is on the write path's critical path (it frees the memtable), so its worker runs
at the node's own priority; merges can lag, so theirs runs lower (``MERGE_NICENESS``).

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

MERGE_NICENESS = 10  # under the serving process: shipping and acks first, merges when idle
CHECKPOINT_NICENESS = 0  # a checkpoint frees the memtable that writes wait on
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


class _Lane:
    """One worker process at one priority; started lazily, restarted after a death."""

    def __init__(self, niceness: int) -> None:
        self.niceness = niceness
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(self.niceness, os.getpid()),
                )
            return self._pool

    @property
    def running(self) -> bool:
        return self._pool is not None

    def broken(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class PartWorker:
    """The worker processes that write checkpoint and merged parts: one lane each."""

    def __init__(
        self, merge_niceness: int = MERGE_NICENESS, checkpoint_niceness: int = CHECKPOINT_NICENESS
    ) -> None:
        self._lanes = {"checkpoint": _Lane(checkpoint_niceness), "merge": _Lane(merge_niceness)}
        self._stopping = False

    def stopping(self) -> None:
        """The store is closing: a checkpoint from now on is written in this process unless its
        worker runs already -- a clean stop need not start a process (~1.5 s of CPU to import
        pyarrow) for its last part."""
        self._stopping = True

    def checkpoint(
        self, directory: Path, table: pa.Table, first: int, last: int, rows: int
    ) -> PartInfo:
        """``parquet.write_part_rows`` in the worker: the new part's entry. StorageError when
        the worker died; nothing of the part is left."""
        if self._stopping and not self._lanes["checkpoint"].running:
            return write_part_rows(directory, table, first, last, rows)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        body = sink.getvalue().to_pybytes()
        return self._run("checkpoint", directory, first, last, _checkpoint_file,
                         str(directory), body, first, last, rows)  # fmt: skip

    def merge(
        self, directory: Path, readers: list[PartReader], rows: int
    ) -> tuple[PartInfo, np.ndarray]:
        """``compaction.merge_parts`` with the file written by the worker: the merged part's
        entry and id index. StorageError when the worker died; nothing of the merge is left."""
        inputs = [r.info for r in readers]
        first, last = inputs[0].first_lsn, inputs[-1].last_lsn
        info = self._run("merge", directory, first, last, merge_files, str(directory), inputs,
                         rows)  # fmt: skip
        return info, merged_id_hashes(readers)

    def _run(
        self, lane: str, directory: Path, first: int, last: int, fn: Any, *args: Any
    ) -> PartInfo:
        try:
            info: PartInfo = self._lanes[lane].executor().submit(fn, *args).result()
        except BrokenProcessPool as exc:
            self._lanes[lane].broken()
            _remove_leftovers(directory, part_name(first, last))
            raise StorageError(
                "the Parquet worker process died; the part will be written again by a new one"
            ) from exc
        except BaseException:
            # an error the worker raised (a full disk): what it left would hold the space
            # until the next start, while the checkpoint is retried
            _remove_leftovers(directory, part_name(first, last))
            raise
        return info

    def pid(self, lane: str = "merge") -> int:
        """The process id of the ``checkpoint`` or ``merge`` worker (starts it when none runs)."""
        return int(self._lanes[lane].executor().submit(os.getpid).result())

    def close(self) -> None:
        """Stop the workers, after the part each may be writing."""
        for lane in self._lanes.values():
            lane.close()


def _checkpoint_file(directory: str, body: bytes, first: int, last: int, rows: int) -> PartInfo:
    """In the worker: the checkpoint part of the memtable rows in ``body`` (an Arrow stream)."""
    table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    return write_part_rows(Path(directory), table, first, last, rows)


def _remove_leftovers(directory: Path, name: str) -> None:
    for path in (directory / name, directory / (name + ".tmp")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
