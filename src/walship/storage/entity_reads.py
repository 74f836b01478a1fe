"""Reads of one entity's stream by version, and of one event by id, from memtables and parts.

An entity's versions run 1, 2, 3 … in lsn order, so within one part (one lsn range, rows sorted
by tenant, entity, lsn) an entity's rows are one contiguous run whose versions are consecutive:
version ``v`` sits at row ``start + v - vmin``. ``PartEntityIndex`` keeps, per part, each
entity's run (start row, row count, first and last version), built once from three columns and
looked up by bisection; a read then touches only the row groups that hold the wanted versions.
Memtables keep each entity's lsns and versions in lists in lsn (so version) order, bisected by
version. A read by version range therefore costs O(parts · log entities + k) plus at most two
row groups per part, never a scan of the entity's whole stream.

Everything a read sees is fixed by one ``ReadView`` (taken by the store under its lock): the
parts, the memtables, the checkpointed lsn and the visible lsn. Events past the visible lsn
(appended, not yet written by the WAL) are never returned, and an entity's current version is
the version of its last *visible* event.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from walship.events import StoredEvent
from walship.storage.memtable import Memtable
from walship.storage.parquet import PartReader, to_events
from walship.storage.query import entity_key


@dataclass(frozen=True)
class ReadView:
    """What one read may see: taken at once under the store lock."""

    parts: list[PartReader]  # lsn order
    memtables: list[Memtable]  # oldest first
    checkpointed: int  # parts hold every event up to here: skip these in memtables
    visible: int  # the WAL's written end: nothing after it is returned
    lock: threading.RLock  # the store lock, around every memtable access
    versions: dict[str, int]  # entity key -> last assigned version (maybe not yet visible)


@dataclass(frozen=True, slots=True)
class EntityRun:
    """One entity's rows in one part."""

    start_row: int
    rows: int
    first_version: int
    last_version: int

    @property
    def consecutive(self) -> bool:
        return self.rows == self.last_version - self.first_version + 1

    def rows_for(self, lo: int, hi: int) -> tuple[int, int]:
        """The first and last row (inclusive) that can hold versions ``lo..hi``."""
        if not self.consecutive:  # never written by walship, but read correctly anyway
            return self.start_row, self.start_row + self.rows - 1
        return (
            self.start_row + lo - self.first_version,
            self.start_row + hi - self.first_version,
        )


class PartEntityIndex:
    """Each entity's run of rows in one part; built from its tenant, entity and version
    columns (a few bytes per entity, not per event, stay in memory)."""

    def __init__(self, part: PartReader) -> None:
        table = part.read_columns(["tenant_id", "entity_id", "version"])
        n = table.num_rows
        self.group_starts = part.row_group_starts()
        if n == 0:
            self.keys: list[str] = []
            self._runs = np.empty((0, 3), np.int64)
            return
        keys = pc.binary_join_element_wise(
            table.column("tenant_id"), table.column("entity_id"), "\x00"
        ).combine_chunks()
        change = pc.not_equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        starts = np.concatenate(([0], np.flatnonzero(change) + 1)).astype(np.int64)
        ends = np.concatenate((starts[1:], [n])).astype(np.int64)
        versions = table.column("version").to_numpy()
        self.keys = keys.take(pa.array(starts)).to_pylist()
        self._runs = np.stack([starts, versions[starts], versions[ends - 1]], axis=1)
        self._rows = ends - starts

    def run(self, key: str) -> EntityRun | None:
        i = bisect.bisect_left(self.keys, key)
        if i >= len(self.keys) or self.keys[i] != key:
            return None
        start, first, last = (int(x) for x in self._runs[i])
        return EntityRun(start, int(self._rows[i]), first, last)

    def groups_for(self, first_row: int, last_row: int) -> tuple[int, int]:
        """The first and last row group holding rows ``first_row..last_row``."""
        starts = self.group_starts
        g0 = int(np.searchsorted(starts, first_row, side="right")) - 1
        g1 = int(np.searchsorted(starts, last_row, side="right")) - 1
        return g0, g1


class EntityReader:
    """Version-range reads of entity streams and reads by id, over a store's ``ReadView``."""

    def __init__(self, view: Callable[[], ReadView]) -> None:
        self._view = view
        self._indexes: weakref.WeakKeyDictionary[PartReader, PartEntityIndex] = (
            weakref.WeakKeyDictionary()
        )
        self._indexes_lock = threading.Lock()

    def _index(self, part: PartReader) -> PartEntityIndex:
        with self._indexes_lock:
            found = self._indexes.get(part)
        if found is None:
            # built outside the lock: two threads may both build it, and one copy wins
            found = PartEntityIndex(part)
            with self._indexes_lock:
                self._indexes.setdefault(part, found)
        return found

    def current_version(self, entity_id: str, tenant_id: str = "default") -> int:
        """The version of the entity's last visible event (0: none), in constant time."""
        return self._visible_version(self._view(), entity_key(tenant_id, entity_id))

    @staticmethod
    def _visible_version(view: ReadView, key: str) -> int:
        with view.lock:
            version = view.versions.get(key, 0)
            # appended but not yet written by the WAL: only the tails of the memtables, a
            # group commit's worth at most
            for mem in reversed(view.memtables):
                found = mem.entity_lsns(key)
                if not found:
                    continue
                lsns, versions = found
                i = len(lsns) - 1
                while i >= 0 and lsns[i] > view.visible:
                    version = versions[i] - 1
                    i -= 1
                if i >= 0:
                    break
        return version

    def read(
        self,
        entity_id: str,
        tenant_id: str = "default",
        *,
        from_version: int = 1,
        to_version: int | None = None,
        backward: bool = False,
        limit: int,
    ) -> tuple[list[StoredEvent], int]:
        """Up to ``limit`` of the entity's visible events with ``from_version <= version <=
        to_version``, ascending, or descending from the top when ``backward``; and the entity's
        current (visible) version. An empty list when none is in range."""
        view = self._view()
        key = entity_key(tenant_id, entity_id)
        current = self._visible_version(view, key)
        lo = max(from_version, 1)
        hi = current if to_version is None else min(to_version, current)
        if lo > hi or limit <= 0:
            return [], current
        # the versions wanted, once ``limit`` is applied (versions are gapless, 1..current)
        if backward:
            lo = max(lo, hi - limit + 1)
        else:
            hi = min(hi, lo + limit - 1)
        found: list[StoredEvent] = []
        for part in view.parts:
            if part.info.first_lsn > view.visible:
                break
            found.extend(self._from_part(part, key, tenant_id, entity_id, lo, hi))
        found.extend(self._from_memtables(view, key, lo, hi))
        # a part and the memtable being checkpointed into it may both hold an event
        unique = {ev.version: ev for ev in found if ev.lsn <= view.visible}
        out = [unique[v] for v in sorted(unique)]
        if backward:
            out.reverse()
        return out[:limit], current

    def _from_part(
        self, part: PartReader, key: str, tenant_id: str, entity_id: str, lo: int, hi: int
    ) -> list[StoredEvent]:
        index = self._index(part)
        run = index.run(key)
        if run is None or run.last_version < lo or run.first_version > hi:
            return []
        first_row, last_row = run.rows_for(max(lo, run.first_version), min(hi, run.last_version))
        g0, g1 = index.groups_for(first_row, last_row)
        table = part.read_row_groups(list(range(g0, g1 + 1)))
        base = int(index.group_starts[g0])
        table = table.slice(first_row - base, last_row - first_row + 1)
        # checked again, so a run that is not as expected can only cost time, never rows
        mask = pc.and_(
            pc.and_(
                pc.equal(table.column("tenant_id"), tenant_id),
                pc.equal(table.column("entity_id"), entity_id),
            ),
            pc.and_(
                pc.greater_equal(table.column("version"), lo),
                pc.less_equal(table.column("version"), hi),
            ),
        )
        table = table.filter(mask)
        return to_events(table, table.num_rows)

    @staticmethod
    def _from_memtables(view: ReadView, key: str, lo: int, hi: int) -> list[StoredEvent]:
        out: list[StoredEvent] = []
        with view.lock:
            for mem in view.memtables:
                found = mem.entity_lsns(key)
                if not found:
                    continue
                lsns, versions = found
                a = bisect.bisect_left(versions, lo)
                b = bisect.bisect_right(versions, hi)
                wanted = [lsn for lsn in lsns[a:b] if lsn > view.checkpointed]
                out.extend(mem.events_at(wanted))
        return out

    def find(self, event_id: bytes) -> StoredEvent | None:
        """The visible event with this id, or None."""
        view = self._view()
        with view.lock:
            for mem in reversed(view.memtables):
                ev = mem.find_id(event_id)
                if ev is not None:
                    return ev if ev.lsn <= view.visible else None
        for part in reversed(view.parts):
            ev = part.find_id(event_id)
            if ev is not None:
                return ev if ev.lsn <= view.visible else None
        return None
