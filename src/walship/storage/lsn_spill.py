"""An lsn-ordered copy of a big part, spilled to a file with no name, for reading it in lsn
order (a subscription catching up, an unfiltered query).

A part's rows are sorted by (tenant, entity, lsn): that is what lets a stream read touch one or
two row groups (``entity_reads``), and it spreads any run of consecutive lsns over every row
group of the part. Read straight from the Parquet file, each slab of lsns decoded the whole
part: at 1,000,000 events, with merged parts of up to 500,000 events, a catch-up decoded each
big part ~30 times and the node spent ~73 µs of CPU an event. A spill decodes the part once,
a chunk of row groups at a time, and writes each chunk's rows grouped by slab (and in lsn
order within it) to an Arrow IPC file; a slab is then its chunks' record batches, read from
the file without decoding or decompressing (uncompressed IPC), merged into lsn order.

Bounds. The file is made with ``O_TMPFILE`` in the part's directory (it never has a name, so
nothing that lists the directory sees it, and a crash leaves nothing behind); it goes away
when its spill is dropped and no read still uses it. At most ``SPILLS_KEPT``
spills exist in a process at once, the least recently used dropped first, so the disk they
take is at most that many parts' decoded size (about 1.1 KB an event for ~1 KB events, ~4
times the part's Parquet file). A build holds one chunk of ``SPILL_CHUNK_ROWS`` rows in memory
(twice: as decoded and as grouped), and builds run one at a time per process
(``SPILL_BUILDS``).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Generic, TypeVar

import numpy as np
import pyarrow as pa

SPILL_CHUNK_ROWS = 32_768  # rows decoded per step of a build (~35 MB for ~1 KB events)
SPILLS_KEPT = 2  # spills per process (a catch-up reads parts in order: the one it is in, next)
SPILL_BUILDS = threading.BoundedSemaphore(1)  # builds at once per process (memory, not CPU)

V = TypeVar("V")


class Recent(Generic[V]):
    """The values most recently used, by key, at most ``kept`` of them; thread-safe. A value
    dropped here lives on for whoever still holds it."""

    def __init__(self, kept: int) -> None:
        self.kept = kept
        self._values: OrderedDict[object, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> V | None:
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
            return value

    def put(self, key: object, value: V) -> V:
        """Keep ``value`` (the newest); returns the value kept for ``key`` (one put before
        wins, so two threads that made the same value end up sharing one)."""
        with self._lock:
            value = self._values.setdefault(key, value)
            self._values.move_to_end(key)
            while len(self._values) > self.kept:
                self._values.popitem(last=False)
            return value

    def get_or_make(self, key: object, make: Callable[[], V]) -> V:
        found = self.get(key)
        return found if found is not None else self.put(key, make())

    def __len__(self) -> int:
        return len(self._values)


class LsnSpill:
    """A part's rows grouped by slab of lsns, in an Arrow IPC file with no name.

    ``slab(i)`` is slab ``i``'s rows in lsn order; safe from any number of threads."""

    def __init__(self, file: IO[bytes], slabs: list[list[int]], rows: int) -> None:
        # read, not memory-mapped: mapped pages would count in the node's RSS for as long as
        # the spill is kept, where read batches are freed once their slab is built
        self._fd = file  # the file lives as long as this spill: it has no name to reopen
        self._file = pa.ipc.open_file(pa.PythonFile(file, mode="r"))
        self._slabs = slabs  # slab -> its record batches in the file
        self._lock = threading.Lock()
        self.rows = rows
        self.bytes = os.fstat(file.fileno()).st_size

    @property
    def slab_count(self) -> int:
        return len(self._slabs)

    def slab(self, i: int) -> pa.Table:
        """The rows of slab ``i``, in lsn order."""
        with self._lock:  # one file position (seek, read): reads one at a time
            batches = [self._file.get_batch(b) for b in self._slabs[i]]
        table = pa.Table.from_batches(batches, schema=self._file.schema)
        # each batch is in lsn order already: one sort merges the chunks' runs
        return table.combine_chunks().sort_by("lsn")

    @classmethod
    def build(
        cls,
        directory: Path,
        schema: pa.Schema,
        groups: int,
        read_group: Callable[[int], pa.Table],
        starts: np.ndarray,
    ) -> LsnSpill:
        """Spill a part of ``groups`` row groups (``read_group(i)`` decodes row group ``i``,
        in ``schema``) into slabs that begin at the lsns ``starts`` (ascending; the first is
        at most the part's lowest lsn). Holds one chunk of rows in memory at a time."""
        slabs: list[list[int]] = [[] for _ in starts]
        # no context manager: the spill owns the file once built (closing it removes it)
        tmp = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115
        try:
            with SPILL_BUILDS:
                rows = cls._write(tmp, schema, groups, read_group, starts, slabs)
            tmp.flush()
            return cls(tmp, slabs, rows)
        except BaseException:
            tmp.close()
            raise

    @staticmethod
    def _write(
        tmp: IO[bytes],
        schema: pa.Schema,
        groups: int,
        read_group: Callable[[int], pa.Table],
        starts: np.ndarray,
        slabs: list[list[int]],
    ) -> int:
        """Write the spill's IPC file; returns its rows, fills ``slabs``."""
        rows = 0
        sink = pa.PythonFile(tmp, mode="w")
        with pa.ipc.new_file(sink, schema) as writer:
            batch = 0
            group = 0
            while group < groups:
                tables = []
                held = 0
                while group < groups and held < SPILL_CHUNK_ROWS:
                    tables.append(read_group(group))
                    held += tables[-1].num_rows
                    group += 1
                chunk = pa.concat_tables(tables).combine_chunks()
                del tables
                lsns = chunk.column("lsn").to_numpy()
                slab_of = np.searchsorted(starts, lsns, side="right") - 1
                order = np.lexsort((lsns, slab_of))
                grouped = chunk.take(pa.array(order)).combine_chunks()
                del chunk
                counts = np.bincount(slab_of, minlength=len(starts))
                at = 0
                for slab, count in enumerate(counts.tolist()):
                    if count:
                        for piece in grouped.slice(at, count).to_batches():
                            writer.write_batch(piece)
                            slabs[slab].append(batch)
                            batch += 1
                        at += count
                rows += grouped.num_rows
                del grouped
        return rows
