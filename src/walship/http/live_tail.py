"""The live tail shared by every subscription that is caught up.

Each commit wakes every open subscription. Read alone, each would run its own query (a
thread hop and a memtable scan) and encode its own copies of the same events: with a
thousand idle subscribers (a tenant nobody writes) or a hundred live ones, that per-commit
work took most of the ingest rate (measured: 100 idle streams cut batch ingest from ~35,000
to ~10,000 events/s). So the new events of a commit are read once, into a ``TailWindow``:
the events after lsn ``lo`` up to ``hi`` (what was visible), indexed by tenant and entity;
each subscription waiting at ``lo`` takes its matching events from it, the selection and its
SSE frames cached per filter, each event's JSON encoded once. A subscription further behind
than ``window_events_max`` reads through the store's query path as before (history from
Parquet and memtables, paced by TCP): the tail is only for the last few commits.

Memory: at most ``WINDOWS_KEPT`` windows of at most ``window_events_max`` events, and their
encoded bytes; a window held by a subscriber still sending it lives until it is sent.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict

import msgspec
from starlette.concurrency import run_in_threadpool

from walship.events import StoredEvent, to_out
from walship.sse import encode_event
from walship.storage.query import QueryFilter
from walship.store import Store

WINDOWS_KEPT = 4  # subscribers a few commits apart still share; older ones read the store
_encoder = msgspec.json.Encoder()


class TailWindow:
    """The events after lsn ``lo`` through ``hi``, read once for every caught-up subscriber."""

    def __init__(self, lo: int, hi: int, events: list[StoredEvent]) -> None:
        self.lo = lo
        self.hi = hi
        self.events = events
        self._by_tenant: dict[str, list[StoredEvent]] | None = None
        self._by_entity: dict[tuple[str, str], list[StoredEvent]] | None = None
        self._json: dict[int, bytes] = {}  # lsn -> the event's JSON
        self._selected: dict[QueryFilter, list[StoredEvent]] = {}
        self._sse: dict[QueryFilter, bytes] = {}

    def _index(self) -> None:
        by_tenant: dict[str, list[StoredEvent]] = {}
        by_entity: dict[tuple[str, str], list[StoredEvent]] = {}
        for ev in self.events:
            by_tenant.setdefault(ev.tenant_id, []).append(ev)
            by_entity.setdefault((ev.tenant_id, ev.entity_id), []).append(ev)
        self._by_tenant, self._by_entity = by_tenant, by_entity

    def select(self, flt: QueryFilter) -> list[StoredEvent]:
        """The window's events ``flt`` matches, in lsn order (cached per filter)."""
        found = self._selected.get(flt)
        if found is not None:
            return found
        candidates = self.events
        if flt.entity_id is not None or flt.tenant_id is not None:
            if self._by_tenant is None:
                self._index()
            assert self._by_tenant is not None and self._by_entity is not None
            if flt.entity_id is not None:
                tenant = flt.tenant_id or "default"
                candidates = self._by_entity.get((tenant, flt.entity_id), [])
            else:
                candidates = self._by_tenant.get(flt.tenant_id or "", [])
        found = [ev for ev in candidates if flt.matches(ev)]
        self._selected[flt] = found
        return found

    def json_of(self, ev: StoredEvent) -> bytes:
        """The event's JSON (encoded once for all subscribers)."""
        data = self._json.get(ev.lsn)
        if data is None:
            data = self._json[ev.lsn] = _encoder.encode(to_out(ev))
        return data

    def sse(self, flt: QueryFilter) -> bytes:
        """The SSE frames of ``select(flt)``, joined (cached per filter)."""
        data = self._sse.get(flt)
        if data is None:
            frames = (encode_event(ev.lsn, ev.term, self.json_of(ev)) for ev in self.select(flt))
            data = self._sse[flt] = b"".join(frames)
        return data


class LiveTail:
    """Hands caught-up subscriptions the window after their lsn, reading it once (on the loop)."""

    def __init__(self, store: Store, window_events_max: int) -> None:
        self.store = store
        self.window_events_max = window_events_max
        self._windows: OrderedDict[tuple[int, int], asyncio.Task[TailWindow]] = OrderedDict()

    async def window(self, after: int, visible: int, cuts_seq: int) -> TailWindow | None:
        """The events after ``after`` (up to ``visible`` or what the first asker saw); None
        when the subscriber is too far behind for the tail (it reads the store instead)."""
        if visible - after > self.window_events_max:
            return None
        key = (cuts_seq, after)
        task = self._windows.get(key)
        if task is None:
            # a task of its own: the subscriber that asked first may leave while it reads
            task = asyncio.ensure_future(self._read(after, visible))
            task.add_done_callback(functools.partial(self._forget_failed, key))
            self._windows[key] = task
            while len(self._windows) > WINDOWS_KEPT:
                self._windows.popitem(last=False)
        return await asyncio.shield(task)

    async def _read(self, after: int, visible: int) -> TailWindow:
        flt = QueryFilter(from_lsn=after + 1, to_lsn=visible)
        result = await run_in_threadpool(self.store.query, flt, self.window_events_max)
        return TailWindow(after, visible, result.events)

    def _forget_failed(self, key: tuple[int, int], task: asyncio.Task[TailWindow]) -> None:
        failed = task.cancelled() or task.exception() is not None
        if failed and self._windows.get(key) is task:
            del self._windows[key]  # the next asker reads again
