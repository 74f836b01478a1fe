"""Reads: queries over the parts and memtables, the live tail, entity state, positions.

Readers see what the WAL has written (``visible_lsn``), never an event still being written.
A query takes the parts, the memtables and the checkpointed lsn under the store lock, then
reads the parts outside it (Parquet with predicate pushdown, several parts in parallel for
one entity) and the memtables for what the parts do not hold.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import orjson

from walship.errors import InvalidInput, NotFound
from walship.events import StoredEvent, format_timestamp
from walship.limits import LSN_MAX
from walship.position import Lsn, Position, Term
from walship.storage.consumers import ConsumerPosition
from walship.storage.entity_reads import ReadView
from walship.storage.query import QueryFilter, entity_key
from walship.store.core import StoreCore
from walship.wire import EntityState

_READERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="walship-parquet")


class QueryResult(msgspec.Struct):
    events: list[StoredEvent]
    next_cursor: str | None


class Reads:
    """The store's read entrance; never waits for an append longer than its lock is held."""

    def __init__(self, core: StoreCore) -> None:
        self.core = core

    @property
    def visible(self) -> Lsn:
        """The highest lsn readers may see: what the WAL has written."""
        return self.core.visible

    @property
    def last_position(self) -> Position:
        return self.core.wal.last_position

    def term_at(self, lsn: Lsn) -> Term:
        """The term that wrote ``lsn`` by this node's term history (``Term(0)`` for lsn 0);
        meaningful for an lsn this node holds (at most ``last_position``)."""
        return self.core.wal.terms.term_at(lsn)

    def read_view(self) -> ReadView:
        """What a read may see now: parts, memtables, checkpointed and visible lsn."""
        with self.core.lock:
            memtables = [m for m in (self.core.frozen, self.core.active) if m is not None]
            # read under the lock, after the parts: every part listed was written (synced)
            # before it was added, so it holds nothing past this
            visible = self.core.visible_lsn
            return ReadView(
                list(self.core.parts),
                memtables,
                self.core.manifest.last_lsn,
                visible,
                self.core.lock,
                self.core.versions,
            )

    def recent_events(
        self, after: int, to_lsn: int, limit: int, *, wait: bool = True
    ) -> list[StoredEvent] | None:
        """The visible events after lsn ``after`` through ``to_lsn``, at most ``limit``, when
        the memtables hold them all (the live tail's read). None when some may be only in a
        Parquet part (``query`` reads those), or when ``wait`` is False and an append holds
        the store lock: the event loop reads here only when it need not wait, since handing
        the read to a worker thread costs two GIL hand-offs (each up to the switch interval
        on a busy loop, ``runtime.py``)."""
        if not self.core.lock.acquire(blocking=wait):
            return None
        try:
            if after < self.core.manifest.last_lsn:
                return None
            to_lsn = min(to_lsn, self.core.visible_lsn)
            flt = QueryFilter(from_lsn=after + 1, to_lsn=to_lsn)
            out: list[StoredEvent] = []
            for mem in (self.core.frozen, self.core.active):
                if mem is not None and len(out) < limit:
                    out.extend(mem.select(flt, to_lsn, limit - len(out)))
            return out
        finally:
            self.core.lock.release()

    def query(
        self, flt: QueryFilter, limit: int | None = None, cursor: str | None = None
    ) -> QueryResult:
        """Matching events in lsn order, at most ``limit``; ``next_cursor`` when more may follow.

        The cursor is the last lsn returned; pass it back to continue after it.
        """
        lim = self.core.limits.query_limit_default if limit is None else limit
        if not 1 <= lim <= self.core.limits.query_limit_max:
            raise InvalidInput(
                f"limit must be 1..{self.core.limits.query_limit_max}", field="limit"
            )
        if flt.entity_id is not None and flt.tenant_id is None:
            flt = dataclasses.replace(flt, tenant_id="default")
        for name, lsn in (("from_lsn", flt.from_lsn), ("to_lsn", flt.to_lsn)):
            # the Parquet lsn column is int64: pyarrow cannot even compare it with a larger int
            if lsn is not None and not 0 <= lsn <= LSN_MAX:
                raise InvalidInput(f"{name} must be 0..{LSN_MAX}", field=name)
        if cursor is not None:
            try:
                after = int(cursor)
            except ValueError as exc:
                raise InvalidInput(f"invalid cursor {cursor!r}", field="cursor") from exc
            if not 0 <= after < LSN_MAX:
                raise InvalidInput(f"invalid cursor {cursor!r}", field="cursor")
            flt = dataclasses.replace(flt, from_lsn=max(flt.from_lsn, after + 1))
        if flt.by_position:
            flt = self._narrow_by_position(flt)
        visible = self.core.visible_lsn
        with self.core.lock:
            parts = list(self.core.parts)
            memtables = [m for m in (self.core.frozen, self.core.active) if m is not None]
            checkpointed = self.core.manifest.last_lsn
        want = lim + 1
        out: list[StoredEvent] = []
        candidates = [p for p in parts if p.could_match(flt, visible)]
        if flt.entity_id is not None and len(candidates) > 1:
            # an entity touches one row group per part: read the parts in parallel (pyarrow
            # releases the GIL while decoding), then keep lsn order
            for found in _READERS.map(lambda p: p.select(flt, want), candidates):
                out.extend(found[: want - len(out)])
        else:
            for part in candidates:
                out.extend(part.select(flt, want - len(out)))
                if len(out) >= want:
                    break
        if len(out) < want:
            for mem in memtables:
                with self.core.lock:
                    got = mem.select(flt, visible, want - len(out))
                # a memtable being checkpointed may already be in a part: skip what parts hold
                out.extend(ev for ev in got if ev.lsn > checkpointed)
                if len(out) >= want:
                    break
        more = len(out) > lim
        out = out[:lim]
        return QueryResult(out, str(out[-1].lsn) if more and out else None)

    def _narrow_by_position(self, flt: QueryFilter) -> QueryFilter:
        """``flt`` with its lsn bounds narrowed to the window the position index gives for
        its tenant positions (the position predicates stay: they are exact)."""
        if flt.tenant_id is None:
            raise InvalidInput(
                "from_position/to_position count within one tenant: name tenant_id",
                field="tenant_id",
            )
        for name, pos in (("from_position", flt.from_position), ("to_position", flt.to_position)):
            if pos is not None and not 0 <= pos <= LSN_MAX:
                raise InvalidInput(f"{name} must be 0..{LSN_MAX}", field=name)
        with self.core.lock:
            lo, hi = self.core.positions.lsn_window(
                flt.tenant_id, flt.from_position or 0, flt.to_position
            )
        to_lsn = flt.to_lsn if hi is None or (flt.to_lsn is not None and flt.to_lsn < hi) else hi
        return dataclasses.replace(flt, from_lsn=max(flt.from_lsn, lo), to_lsn=to_lsn)

    def tenant_position(self, tenant_id: str) -> tuple[int, int]:
        """``(position, lsn)`` of the tenant's last event visible here; ``(0, 0)`` for none.

        The last one assigned may not be written yet: then the last visible one is read
        through the position index (a few of the tenant's events at most)."""
        with self.core.lock:
            position, lsn = self.core.positions.last(tenant_id)
        if position == 0 or (lsn != 0 and lsn <= self.core.visible_lsn):
            return position, lsn
        visible = self.core.visible_lsn
        lo = max(1, position - self.core.limits.tenant_position_index_stride)
        found = self._last_event(QueryFilter(tenant_id=tenant_id, from_position=lo, to_lsn=visible))
        if found is None and lo > 1:
            # none visible in the last stride: older writes still in flight (rare)
            found = self._last_event(
                QueryFilter(tenant_id=tenant_id, from_position=1, to_position=lo, to_lsn=visible)
            )
        return (0, 0) if found is None else (found.tenant_position, found.lsn)

    def consumer_position(self, tenant_id: str, consumer: str) -> ConsumerPosition | None:
        """The consumer's last tracked position visible here; None when it has none."""
        with self.core.lock:
            # under the lock: the undo log is trimmed (under it) only below what the WAL had
            # written then, so an entry past this visible lsn still has its undo record; read
            # before the lock, a tracking written and trimmed meanwhile hid the consumer (404)
            return self.core.consumers.visible(tenant_id, consumer, self.core.visible_lsn)

    def _last_event(self, flt: QueryFilter) -> StoredEvent | None:
        """The last event ``flt`` matches, read page by page; None when none does."""
        last: StoredEvent | None = None
        cursor: str | None = None
        while True:
            page = self.query(flt, self.core.limits.query_limit_max, cursor)
            if page.events:
                last = page.events[-1]
            if page.next_cursor is None:
                return last
            cursor = page.next_cursor

    def entity_state(
        self,
        entity_id: str,
        tenant_id: str = "default",
        as_of_us: int | None = None,
        as_of_lsn: int | None = None,
    ) -> EntityState:
        """Payloads of the entity's events merged in order (objects merge, others replace).

        ``as_of_us``/``as_of_lsn`` stop at that time or lsn. Raises NotFound for an entity
        with no events in range.
        """
        flt = QueryFilter(tenant_id=tenant_id, entity_id=entity_id, until_us=None, to_lsn=as_of_lsn)
        if as_of_us is not None:
            flt = dataclasses.replace(flt, until_us=as_of_us + 1)
        state: Any = None
        version = 0
        last_lsn = 0
        count = 0
        updated: str | None = None
        cursor: str | None = None
        while True:
            page = self.query(flt, self.core.limits.query_limit_max, cursor)
            for ev in page.events:
                value = ev.payload if ev.payload_binary else orjson.loads(ev.payload)
                if isinstance(value, dict) and isinstance(state, dict):
                    state = {**state, **value}
                else:
                    state = value
                version, last_lsn, count = ev.version, ev.lsn, count + 1
                updated = format_timestamp(ev.timestamp_us)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        if count == 0:
            raise NotFound(f"entity {entity_id!r} has no events", entity_id=entity_id)
        encoding = "base64" if isinstance(state, bytes) else None
        return EntityState(tenant_id, entity_id, version, state, last_lsn, updated, count, encoding)

    def entity_version(self, entity_id: str, tenant_id: str = "default") -> int:
        with self.core.lock:
            return self.core.versions.get(entity_key(tenant_id, entity_id), 0)

    def manifest_position(self) -> Position:
        """The position the checkpoint manifest covers up to."""
        with self.core.lock:
            m = self.core.manifest
        return Position(Term(m.last_term), Lsn(m.last_lsn))
