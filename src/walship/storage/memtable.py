"""Recent events in memory, in lsn order, as Arrow record batches, with lazy indexes.

A memtable only grows until a checkpoint freezes it; then it is written to one Parquet part and
dropped. Readers pass the highest lsn they may see (the WAL's durable end), so events appended
but not yet durable are never returned.

The events are held as columns, not as one Python object each (issue 15, item 2): a WAL group
or a replicated frame arrives as Python column lists (the values a decode or the append path
made anyway), which join the open tail of column lists; the store's checkpointer thread seals
the tail into one ``pa.RecordBatch`` of ``MEM_SCHEMA`` whenever it holds ``SEAL_ROWS_MIN`` rows
(``seal_tail``: the rows copied out under the store lock, converted outside it, put in place
under it again). Sealing costs ~0.9 µs an event (mostly copying payloads): measured on the
follower's applying thread, sealing every frame there made applying ~35 % dearer, so it stays
off the write and apply paths, as the per-event conversion of the checkpoint did. A checkpoint
then concatenates the batches and turns them into the part's columns with Arrow kernels
(``parquet.part_table``) instead of converting ~27,000 Python objects attribute by attribute.

The indexes are built when first asked for and kept up to date from then on: ids (``find_id``,
the leader's duplicate check of client-given ids) and entities (``entity_lsns``, entity reads
and queries by entity). A node that never asks (a follower nobody reads an entity or an id
from) never builds them. Event types and other predicates are matched with Arrow kernels over
the batches. Reads hand out ``StoredEvent``s made from the rows they return.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from walship.events import StoredEvent
from walship.storage.query import QueryFilter

MEM_SCHEMA = pa.schema(
    [
        pa.field("lsn", pa.int64(), nullable=False),
        pa.field("term", pa.int64(), nullable=False),
        pa.field("id", pa.binary(16), nullable=False),
        pa.field("tenant_id", pa.string(), nullable=False),
        pa.field("entity_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("timestamp_us", pa.int64(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("payload", pa.binary(), nullable=False),
        pa.field("metadata", pa.binary(), nullable=True),
        pa.field("tenant_position", pa.int64(), nullable=False),
        pa.field("payload_binary", pa.bool_(), nullable=False),
    ]
)
"""A memtable batch: ``StoredEvent``'s fields in its order (a row is ``StoredEvent(*row)``)."""

COLUMNS = len(MEM_SCHEMA)
SEAL_ROWS_MIN = 1024
"""The checkpointer seals the open tail once it holds this many rows (see the module)."""

Columns = list[list[Any]]  # one list per MEM_SCHEMA field, in its order


def event_size(payload: bytes, entity_id: str, event_type: str, metadata: bytes | None) -> int:
    """Approximate memory one event holds (``StoredEvent.size_bytes``)."""
    return 200 + len(payload) + len(entity_id) + len(event_type) + (len(metadata or b""))


def columns_of(events: Iterable[StoredEvent]) -> Columns:
    """The columns of ``events`` (a StoredEvent is its fields in ``MEM_SCHEMA`` order)."""
    cols: Columns = [[] for _ in range(COLUMNS)]
    for ev in events:
        for col, value in zip(cols, ev.__struct_fields__, strict=True):
            col.append(getattr(ev, value))
    return cols


def _events_of(cols: Sequence[Sequence[object]]) -> list[StoredEvent]:
    return list(map(StoredEvent, *cols))


@dataclass(frozen=True, slots=True)
class SealJob:
    """The first ``rows`` rows of a memtable's open tail, copied while it was at
    ``generation``."""

    generation: int
    rows: int
    cols: Columns

    def seal(self) -> _Chunk:
        return _seal(self.cols)


def rows_table(batches: list[pa.RecordBatch], tail: Columns) -> pa.Table:
    """One table of ``MEM_SCHEMA`` from sealed batches and tail columns (``contents``)."""
    if tail[0]:
        batches = [*batches, _seal(tail).batch]
    return pa.Table.from_batches(batches, schema=MEM_SCHEMA)


def seal_tail(lock: AbstractContextManager[Any], current: Callable[[], Memtable]) -> bool:
    """Seal the open tail of the memtable ``current()`` gives (read under ``lock``, the store
    lock) into a batch, converted outside the lock; True when a batch was put in place."""
    with lock:
        mem = current()
        job = mem.tail_job(SEAL_ROWS_MIN)
    if job is None:
        return False
    chunk = job.seal()
    with lock:
        return mem.install(job, chunk)


@dataclass(slots=True)
class _Chunk:
    """One sealed batch and its lsns (int64, ascending)."""

    batch: pa.RecordBatch
    lsns: np.ndarray

    def rows(self, start: int, stop: int) -> list[StoredEvent]:
        part = self.batch.slice(start, stop - start)
        return _events_of([c.to_pylist() for c in part.columns])

    def take(self, rows: np.ndarray) -> list[StoredEvent]:
        part = self.batch.take(pa.array(rows, pa.int64()))
        return _events_of([c.to_pylist() for c in part.columns])


_PAYLOAD = 8
_OFFSET_MAX = 2**31 - 1  # a ``binary`` column's offsets are int32


def _binary_column(values: list[bytes]) -> pa.Array:
    """``pa.array(values, pa.binary())`` from one joined buffer: ``pa.array`` grows its data
    buffer by doubling, and for ~1 KB payloads that copying (and faulting in the new pages)
    took ~1.7-2.1 µs a row while the store ingested, against ~1.0 for one exact join."""
    lengths = np.fromiter(map(len, values), np.int64, len(values))
    total = int(lengths.sum())
    if total > _OFFSET_MAX:
        return pa.array(values, pa.binary())
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = pa.py_buffer(b"".join(values))
    return pa.BinaryArray.from_buffers(
        pa.binary(), len(values), [None, pa.py_buffer(offsets), data]
    )


def _seal(cols: Columns) -> _Chunk:
    arrays = [
        _binary_column(col) if i == _PAYLOAD else pa.array(col, field.type)
        for i, (col, field) in enumerate(zip(cols, MEM_SCHEMA, strict=True))
    ]
    batch = pa.RecordBatch.from_arrays(arrays, schema=MEM_SCHEMA)
    return _Chunk(batch, np.asarray(arrays[0].to_numpy(), np.int64))


class Memtable:
    """Events of one lsn range with their indexes. Not thread-safe: the store locks around it."""

    def __init__(self) -> None:
        self._chunks: list[_Chunk] = []
        self._tail: Columns = [[] for _ in range(COLUMNS)]
        self._rows = 0  # in the chunks and the tail
        self._generation = 0  # changes whenever the tail loses rows (a seal, a truncation)
        self.bytes = 0
        self.created_us = 0
        # lazy indexes: rows ``< _ids_upto`` (``_entities_upto``) are in them
        self._ids: dict[bytes, int] = {}  # id -> lsn
        self._ids_upto = 0
        self._entities: dict[str, tuple[list[int], list[int]]] = {}  # key -> lsns, versions
        self._entities_upto = 0

    def __len__(self) -> int:
        return self._rows

    @property
    def first_lsn(self) -> int | None:
        if self._chunks:
            return int(self._chunks[0].lsns[0])
        return self._tail[0][0] if self._tail[0] else None

    @property
    def last_lsn(self) -> int | None:
        if self._tail[0]:
            return int(self._tail[0][-1])
        return int(self._chunks[-1].lsns[-1]) if self._chunks else None

    # ------------------------------------------------------------------ adding

    def extend(self, cols: Columns, size_bytes: int) -> None:
        """Add rows in lsn order (one list per ``MEM_SCHEMA`` field; the lists are taken, not
        copied); ``size_bytes``: their ``event_size`` summed."""
        n = len(cols[0])
        if n == 0:
            return
        self._rows += n
        self.bytes += size_bytes
        for mine, theirs in zip(self._tail, cols, strict=True):
            mine.extend(theirs)

    def add_all(self, events: Sequence[StoredEvent]) -> None:
        """Add events in lsn order (tests and rebuilds; the write paths use ``extend``)."""
        size = sum(event_size(e.payload, e.entity_id, e.event_type, e.metadata) for e in events)
        self.extend(columns_of(events), size)

    def seal(self) -> None:
        """Turn the open tail into a batch (a checkpoint does before it reads the batches)."""
        if self._tail[0]:
            self._chunks.append(_seal(self._tail))
            self._tail = [[] for _ in range(COLUMNS)]
            self._generation += 1

    def tail_job(self, min_rows: int) -> SealJob | None:
        """The open tail's rows (copied) for sealing outside the store lock, when it holds at
        least ``min_rows``; hand the batch made of them to ``install``."""
        n = len(self._tail[0])
        if n < min_rows:
            return None
        return SealJob(self._generation, n, [col[:] for col in self._tail])

    def install(self, job: SealJob, batch: _Chunk) -> bool:
        """Put the batch sealed from ``job``'s rows in place of them; False (nothing changed)
        when the tail lost rows since the job was taken (a truncation)."""
        if job.generation != self._generation:
            return False
        self._chunks.append(batch)
        for col in self._tail:
            del col[: job.rows]
        self._generation += 1
        return True

    def contents(self) -> tuple[list[pa.RecordBatch], Columns]:
        """The batches and a copy of the open tail, for ``rows_table`` outside the lock."""
        return [c.batch for c in self._chunks], [col[:] for col in self._tail]

    # ------------------------------------------------------------------ the whole table

    def table(self) -> pa.Table:
        """Every row as one table of ``MEM_SCHEMA`` (the batches, not copied, and the tail)."""
        return rows_table(*self.contents())

    def lsn_array(self) -> np.ndarray:
        """Every lsn held, ascending (int64)."""
        parts = [c.lsns for c in self._chunks]
        if self._tail[0]:
            parts.append(np.asarray(self._tail[0], np.int64))
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def id_bytes(self) -> bytes:
        """Every id held, 16 bytes each, in lsn order (for the id-hash index of a part)."""
        out = [fixed_bytes(c.batch.column(2)) for c in self._chunks]
        out.extend(self._tail[2])
        return b"".join(out)

    def split_at(self, lsn: int) -> tuple[Memtable, Memtable]:
        """Two new memtables: the rows up to ``lsn`` and the rows after it. This one is left
        as it is (a reader's view may hold it); batches are shared, the one ``lsn`` falls in
        is sliced (no copy)."""
        head, rest = Memtable(), Memtable()
        head.created_us = rest.created_us = self.created_us
        for chunk in self._chunks:
            cut = int(np.searchsorted(chunk.lsns, lsn, side="right"))
            if cut:
                head._put_chunk(_slice(chunk, 0, cut))
            if cut < len(chunk.lsns):
                rest._put_chunk(_slice(chunk, cut, len(chunk.lsns)))
        tail = self._tail
        cut = bisect.bisect_right(tail[0], lsn)
        for target, lo, hi in ((head, 0, cut), (rest, cut, len(tail[0]))):
            if hi > lo:
                cols = [col[lo:hi] for col in tail]
                target._rows += hi - lo
                target.bytes += size_of(cols)
                target._tail = cols
        return head, rest

    @staticmethod
    def joined(first: Memtable, second: Memtable) -> Memtable:
        """A new memtable of ``first``'s rows and then ``second``'s (neither is changed)."""
        out = Memtable()
        out.created_us = first.created_us
        for mem in (first, second):
            for chunk in mem._chunks:
                out._put_chunk(chunk)
            if mem._tail[0]:
                out._put_chunk(_seal(mem._tail))
        return out

    def _put_chunk(self, chunk: _Chunk) -> None:
        self._chunks.append(chunk)
        self._rows += len(chunk.lsns)
        self.bytes += _chunk_size(chunk)

    # ------------------------------------------------------------------ removing

    def truncate_after(self, lsn: int) -> list[StoredEvent]:
        """Remove the events after ``lsn`` (a WAL group rolled back); returns them in order."""
        removed: list[StoredEvent] = []
        tail = self._tail
        cut = bisect.bisect_right(tail[0], lsn)
        if cut < len(tail[0]):
            removed = _events_of([col[cut:] for col in tail])
            for col in tail:
                del col[cut:]
        kept: list[_Chunk] = []
        early: list[StoredEvent] = []
        for chunk in self._chunks:
            n = len(chunk.lsns)
            cut = int(np.searchsorted(chunk.lsns, lsn, side="right"))
            if cut < n:
                early.extend(chunk.rows(cut, n))
            if cut == n:
                kept.append(chunk)
            elif cut:
                kept.append(_slice(chunk, 0, cut))
        removed = early + removed
        if not removed:
            return removed
        self._generation += 1
        self._chunks = kept
        self._rows -= len(removed)
        self.bytes -= sum(ev.size_bytes() for ev in removed)
        for ev in removed:
            if self._ids.get(ev.id) == ev.lsn:
                del self._ids[ev.id]
        self._ids_upto = min(self._ids_upto, self._rows)
        # rebuilt when next asked for: a rollback is rare, and the lists end with its rows
        self._entities, self._entities_upto = {}, 0
        return removed

    # ------------------------------------------------------------------ indexes

    def _new_rows(self, start: int) -> Iterable[Columns | _Chunk]:
        """The chunks (and then the tail's columns) holding rows ``start`` onwards, each with
        the rows before ``start`` cut off."""
        at = 0
        for chunk in self._chunks:
            n = len(chunk.lsns)
            if at + n > start:
                yield _slice(chunk, start - at, n) if start > at else chunk
            at += n
        if self._tail[0] and at + len(self._tail[0]) > start:
            yield [col[max(start - at, 0) :] for col in self._tail]

    def find_id(self, event_id: bytes) -> StoredEvent | None:
        """The event with this id; None when this memtable has none."""
        if self._ids_upto < self._rows:
            ids = self._ids
            for piece in self._new_rows(self._ids_upto):
                if isinstance(piece, _Chunk):
                    ids.update(
                        zip(piece.batch.column(2).to_pylist(), piece.lsns.tolist(), strict=True)
                    )
                else:
                    ids.update(zip(piece[2], piece[0], strict=True))
            self._ids_upto = self._rows
        lsn = self._ids.get(event_id)
        if lsn is None:
            return None
        found = self.events_at([lsn])
        return found[0] if found else None

    def entity_lsns(self, key: str) -> tuple[list[int], list[int]] | None:
        """The lsns and versions of the entity's events (``entity_key``), in lsn order; None
        when this memtable has none. The lists are the index's own: do not change them."""
        if self._entities_upto < self._rows:
            index = self._entities
            for piece in self._new_rows(self._entities_upto):
                if isinstance(piece, _Chunk):
                    b = piece.batch
                    cols = [b.column(i).to_pylist() for i in (3, 4, 0, 7)]
                else:
                    cols = [piece[i] for i in (3, 4, 0, 7)]
                for tenant, entity, lsn, version in zip(*cols, strict=True):
                    entry = index.get(f"{tenant}\x00{entity}")
                    if entry is None:
                        index[f"{tenant}\x00{entity}"] = ([lsn], [version])
                    else:
                        entry[0].append(lsn)
                        entry[1].append(version)
            self._entities_upto = self._rows
        return self._entities.get(key)

    def events_at(self, lsns: Sequence[int]) -> list[StoredEvent]:
        """The events at these lsns (ascending; lsns not held are left out)."""
        out: list[StoredEvent] = []
        if not lsns:
            return out
        wanted = np.asarray(lsns, np.int64)
        for chunk in self._chunks:
            lo = int(np.searchsorted(wanted, chunk.lsns[0], side="left"))
            hi = int(np.searchsorted(wanted, chunk.lsns[-1], side="right"))
            if lo == hi:
                continue
            mine = wanted[lo:hi]
            rows = np.searchsorted(chunk.lsns, mine)
            rows = rows[chunk.lsns[rows] == mine]
            if len(rows) == len(chunk.lsns):
                out.extend(chunk.rows(0, len(rows)))
            elif len(rows):
                out.extend(chunk.take(rows))
        tail = self._tail
        if tail[0] and int(wanted[-1]) >= tail[0][0]:
            where = {lsn: i for i, lsn in enumerate(tail[0])}
            for lsn in lsns:
                i = where.get(lsn)
                if i is not None:
                    out.append(StoredEvent(*(col[i] for col in tail)))
        return out

    # ------------------------------------------------------------------ reading

    def select(self, flt: QueryFilter, visible_lsn: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` matching events with lsn <= ``visible_lsn``, in lsn order."""
        hi = visible_lsn if flt.to_lsn is None else min(visible_lsn, flt.to_lsn)
        lo = flt.from_lsn
        if hi < lo or limit <= 0:
            return []
        if flt.entity_id is not None:
            # the store always names the tenant with an entity (default "default")
            found = self.entity_lsns(f"{flt.tenant_id or 'default'}\x00{flt.entity_id}")
            if found is None:
                return []
            lsns = found[0]
            a, b = bisect.bisect_left(lsns, lo), bisect.bisect_right(lsns, hi)
            out: list[StoredEvent] = []
            while a < b and len(out) < limit:
                step = min(b, a + limit - len(out))
                out.extend(ev for ev in self.events_at(lsns[a:step]) if flt.matches(ev))
                a = step
            return out
        out = []
        for chunk in self._chunks:
            if len(out) >= limit:
                return out
            a = int(np.searchsorted(chunk.lsns, lo, side="left"))
            b = int(np.searchsorted(chunk.lsns, hi, side="right"))
            if a >= b:
                continue
            mask = _mask(chunk.batch.slice(a, b - a), flt)
            if mask is None:
                got = chunk.rows(a, min(b, a + limit - len(out)))
            else:
                rows = np.flatnonzero(mask)[: limit - len(out)] + a
                if len(rows) == 0:
                    continue
                got = chunk.take(rows)
            out.extend(ev for ev in got if flt.matches(ev))
        tail = self._tail
        if tail[0] and len(out) < limit:
            a, b = bisect.bisect_left(tail[0], lo), bisect.bisect_right(tail[0], hi)
            for ev in _events_of([col[a:b] for col in tail]):
                if flt.matches(ev):
                    out.append(ev)
                    if len(out) >= limit:
                        break
        return out


def _mask(batch: pa.RecordBatch, flt: QueryFilter) -> np.ndarray | None:
    """The rows of ``batch`` the non-lsn predicates of ``flt`` may match (exactly, but the
    caller checks each event again); None when there are none to apply."""
    tests = []
    if flt.tenant_id is not None:
        tests.append(pc.equal(batch.column(3), flt.tenant_id))
    if flt.tenant_ids is not None:
        tests.append(pc.is_in(batch.column(3), pa.array(sorted(flt.tenant_ids), pa.string())))
    if flt.event_type is not None:
        tests.append(pc.equal(batch.column(5), flt.event_type))
    if flt.event_type_prefix is not None:
        tests.append(pc.starts_with(batch.column(5), flt.event_type_prefix))
    if flt.since_us is not None:
        tests.append(pc.greater_equal(batch.column(6), flt.since_us))
    if flt.until_us is not None:
        tests.append(pc.less(batch.column(6), flt.until_us))
    if flt.from_position is not None:
        tests.append(pc.greater_equal(batch.column(10), flt.from_position))
    if flt.to_position is not None:
        tests.append(pc.less_equal(batch.column(10), flt.to_position))
    if not tests:
        return None
    mask = tests[0]
    for test in tests[1:]:
        mask = pc.and_(mask, test)
    return np.asarray(mask.to_numpy(zero_copy_only=False), bool)


def _slice(chunk: _Chunk, start: int, stop: int) -> _Chunk:
    return _Chunk(chunk.batch.slice(start, stop - start), chunk.lsns[start:stop])


def fixed_bytes(ids: pa.Array | pa.ChunkedArray) -> bytes:
    """The 16-byte values of a ``binary(16)`` column, joined."""
    if isinstance(ids, pa.ChunkedArray):
        return b"".join(fixed_bytes(chunk) for chunk in ids.chunks)
    if len(ids) == 0:
        return b""
    data = np.frombuffer(ids.buffers()[1], np.uint8, 16 * len(ids), 16 * ids.offset)
    return data.tobytes()


def size_of(cols: Columns) -> int:
    """``event_size`` summed over the rows of ``cols``."""
    metas = cols[9]
    return (
        200 * len(cols[0])
        + sum(map(len, cols[8]))
        + sum(map(len, cols[4]))
        + sum(map(len, cols[5]))
        + sum(len(m) for m in metas if m)
    )


def _chunk_size(chunk: _Chunk) -> int:
    """``event_size`` summed over a chunk's rows, from its columns' byte lengths."""
    b = chunk.batch
    total = 200 * b.num_rows
    for i in (8, 4, 5, 9):
        col = b.column(i)
        if len(col):
            total += int(pc.sum(pc.binary_length(col)).as_py() or 0)
    return int(total)
