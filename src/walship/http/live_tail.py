"""The live tail shared by every subscription that is caught up.

Each subscription used to wake at every commit and ask a shared window for the events after
its own lsn. Streams that a busy consumer had left a few commits apart each asked for another
window (another read and another encoding of the same events), and once one fell further
behind than the tail it read the store by itself: with 100 live streams of 1 KB events, the
node's CPU per ingested event went from ~34 to ~87 µs (a third of it in those private
reads), and a thousand idle streams all woke at every commit to find nothing for them.

So the tail is one ring of **segments** read by one task, the hub: at each commit it reads
what became visible once (``store.query``, in a worker thread, never under the WAL writer
or the store lock past that read), cuts it into segments of at most a page of events and
appends them. Streams that caught up take segments from the ring; what a segment holds for
a filter (its events, their SSE frames) is computed once and the bytes are shared by every
stream with that filter. A stream with nothing left to take waits in its filter's group, and
the hub wakes a group only when a segment has an event its filter matches (one selection a
group, from an index by tenant and entity): a thousand idle streams cost the hub one lookup
per commit, not a thousand wake-ups. A group the hub skips learns how far nothing matched,
so its streams move past those segments without reading them.

Memory: the ring holds at most ``events_max`` events with their encoded forms; a stream
takes at most a page of segments at a time, and segments it still sends stay alive until
sent. A stream further behind than the ring reads through the store's query path (history,
paced by TCP) and rejoins the tail when that read reaches the end.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import logging
from typing import TYPE_CHECKING

import msgspec
from starlette.concurrency import run_in_threadpool

from walship.events import StoredEvent, to_out
from walship.sse import encode_event
from walship.storage.query import QueryFilter

if TYPE_CHECKING:
    from walship.node import Node

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
HUB_TICK_S = 1.0  # the hub's wait for a commit is bounded (a missed pulse costs a tick)
CUT_POLL_S = 0.05  # while a repair cuts the log, the hub reads nothing


def _hi(segment: Segment) -> int:
    return segment.hi


class Segment:
    """The events after lsn ``lo`` through ``hi`` (consecutive lsns, some maybe not events),
    read once for every caught-up stream."""

    def __init__(self, lo: int, hi: int, events: list[StoredEvent]) -> None:
        self.lo = lo
        self.hi = hi
        self.events = events
        self._by_tenant: dict[str, list[StoredEvent]] | None = None
        self._by_entity: dict[tuple[str, str], list[StoredEvent]] | None = None
        self._json: dict[int, bytes] = {}  # lsn -> the event's JSON
        self._selected: dict[QueryFilter, list[StoredEvent]] = {}
        self._sse: dict[QueryFilter, bytes] = {}

    def __repr__(self) -> str:
        return f"Segment({self.lo}, {self.hi}, {len(self.events)} events)"

    def _index(self) -> None:
        by_tenant: dict[str, list[StoredEvent]] = {}
        by_entity: dict[tuple[str, str], list[StoredEvent]] = {}
        for ev in self.events:
            by_tenant.setdefault(ev.tenant_id, []).append(ev)
            by_entity.setdefault((ev.tenant_id, ev.entity_id), []).append(ev)
        self._by_tenant, self._by_entity = by_tenant, by_entity

    def select(self, flt: QueryFilter) -> list[StoredEvent]:
        """The segment's events ``flt`` matches, in lsn order (cached per filter)."""
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

    def select_after(self, flt: QueryFilter, after: int) -> list[StoredEvent]:
        """``select(flt)`` without the events at or before ``after``."""
        found = self.select(flt)
        if after <= self.lo or not found:
            return found
        return found[bisect.bisect_right(found, after, key=_lsn) :]

    def json_of(self, ev: StoredEvent) -> bytes:
        """The event's JSON (encoded once for all subscribers)."""
        data = self._json.get(ev.lsn)
        if data is None:
            data = self._json[ev.lsn] = _encoder.encode(to_out(ev))
        return data

    def sse(self, flt: QueryFilter, after: int = 0) -> bytes:
        """The SSE frames of ``select_after(flt, after)``, joined (cached per filter for a
        stream that takes the whole segment, as every stream but one entering it does)."""
        if after > self.lo:
            events = self.select_after(flt, after)
            return b"".join(encode_event(ev.lsn, ev.term, self.json_of(ev)) for ev in events)
        data = self._sse.get(flt)
        if data is None:
            frames = (encode_event(ev.lsn, ev.term, self.json_of(ev)) for ev in self.select(flt))
            data = self._sse[flt] = b"".join(frames)
        return data


def _lsn(ev: StoredEvent) -> int:
    return ev.lsn


@dataclasses.dataclass(frozen=True)
class TailPage:
    """What one stream takes from the ring at once: ``segments`` after lsn ``after``, each
    holding at least one event ``flt`` matches."""

    segments: list[Segment]
    flt: QueryFilter
    after: int

    @property
    def events(self) -> list[StoredEvent]:
        return [ev for seg in self.segments for ev in seg.select_after(self.flt, self.after)]

    def jsons(self) -> list[bytes]:
        """Each event's JSON, in lsn order (encoded once, by the segment that holds it)."""
        return [
            seg.json_of(ev)
            for seg in self.segments
            for ev in seg.select_after(self.flt, self.after)
        ]

    def frames(self) -> list[bytes]:
        """The page's SSE frames, a shared piece of bytes per segment."""
        return [seg.sse(self.flt, self.after) for seg in self.segments]


@dataclasses.dataclass(eq=False)
class _Group:
    """Caught-up streams of one filter waiting for an event it matches; ``skipped_to``: no
    segment the hub appended since the group formed matched it up to this lsn."""

    waiters: set[asyncio.Future[None]]
    skipped_to: int


class LiveTail:
    """The ring of recent segments, its hub, and the groups of streams waiting on it."""

    def __init__(self, node: Node, events_max: int, segment_events: int) -> None:
        self.node = node
        self.store = node.store
        self.events_max = events_max
        self.segment_events = segment_events
        self.segments: collections.deque[Segment] = collections.deque()
        self.base = 0  # the segments cover (base, head]
        self.head = 0
        self.seq = self.store.cuts.seq  # the cut seq the ring was read at
        self.live = 0  # streams following the tail
        self.reads = 0  # the hub's reads of the store (a test counts them)
        self.fell_behind = 0  # streams that had to read the store again (``/api/v1/stats``)
        self._events = 0
        self._groups: dict[QueryFilter, _Group] = {}
        self._hub: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None

    def __repr__(self) -> str:
        return (
            f"LiveTail(({self.base}, {self.head}], {len(self.segments)} segments, "
            f"{self.live} live, {len(self._groups)} waiting groups)"
        )

    # ------------------------------------------------------------------ streams

    def join(self, after: int, seq: int) -> bool:
        """Follow the tail from ``after``, where a stream's read of the store ended at what
        was visible (at cut ``seq``); False when the ring cannot serve it: it was read at
        another cut seq, or streams that use it hold no more than what follows ``after``."""
        if self.live == 0 and (seq != self.seq or not self.base <= after <= self.head):
            self._reset(after, seq)  # nobody uses the ring: start it where this stream stands
        elif seq != self.seq or after < self.base:
            return False
        self.live += 1
        if self._hub is None:
            self._failed = None
            self._hub = asyncio.ensure_future(self._run())
        return True

    def leave(self) -> None:
        """A stream stops following the tail (it ended, or fell behind the ring)."""
        self.live -= 1

    def take(
        self, after: int, flt: QueryFilter, seq: int, events_max: int
    ) -> tuple[int, TailPage | None] | None:
        """What the ring holds after ``after`` for ``flt``: the lsn the stream stands at once
        it has it, and the segments with events it matches (None if there is none), about
        ``events_max`` events at most. None when the ring no longer holds the segments that
        follow ``after`` (or was read at another cut seq than the stream checked)."""
        if self._failed is not None:
            raise self._failed
        if seq != self.seq:
            return None
        if after < self.base:
            self.fell_behind += 1
            return None
        segments = self.segments
        at = bisect.bisect_right(segments, after, key=_hi)
        taken: list[Segment] = []
        count = 0
        stands = after
        for i in range(at, len(segments)):
            seg = segments[i]
            found = seg.select_after(flt, after) if seg.lo < after else seg.select(flt)
            stands = seg.hi
            if found:
                taken.append(seg)
                count += len(found)
                if count >= events_max:
                    break
        return stands, (TailPage(taken, flt, after) if taken else None)

    async def wait(self, after: int, flt: QueryFilter, timeout_s: float) -> int:
        """Wait until the ring holds an event after ``after`` that ``flt`` matches (or the
        tail is reset, or the node ends its subscriptions), at most ``timeout_s``. Returns
        the lsn up to which nothing matched: where the stream stands now."""
        if after < self.head or self.node.subscriptions_ended or self._hub is None:
            return after  # more to take first, or nobody would wake it
        group = self._groups.get(flt)
        if group is None:
            group = self._groups[flt] = _Group(set(), after)
        waiter = asyncio.get_running_loop().create_future()
        group.waiters.add(waiter)
        timer = asyncio.get_running_loop().call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            group.waiters.discard(waiter)
            if not group.waiters and self._groups.get(flt) is group:
                del self._groups[flt]
        return max(after, group.skipped_to)

    # ------------------------------------------------------------------ the hub

    async def _run(self) -> None:
        node = self.node
        store = self.store
        cuts = store.cuts
        try:
            while self.live > 0 and not node.subscriptions_ended:
                seq = cuts.seq
                if seq != self.seq:
                    if seq % 2:  # a cut runs: read nothing until it is done
                        await asyncio.sleep(CUT_POLL_S)
                        continue
                    kept = cuts.lowest_since(self.seq)
                    self._reset(self.head if kept is None else min(self.head, kept), seq)
                    continue
                visible = store.visible_lsn
                if visible <= self.head:
                    await node.wait_past(self.head, HUB_TICK_S)
                    continue
                head = self.head
                limit = self.events_max
                self.reads += 1
                # on the loop when the memtables have it and no append holds the store lock
                events = store.recent_events(head, visible, limit, wait=False)
                if events is None:
                    window = QueryFilter(from_lsn=head + 1, to_lsn=visible)
                    result = await run_in_threadpool(store.query, window, limit)
                    events = result.events
                if cuts.seq != seq or self.seq != seq or self.head != head:
                    continue  # read across a cut (or the ring was started again meanwhile)
                self._append(events, events[-1].lsn if len(events) >= limit else visible)
                # a read on the loop does not wait: let the streams just woken take their
                # segments before the next read, or a burst would push them out of the ring
                await asyncio.sleep(0)
        except Exception as exc:  # every stream on the tail ends with it, as its own read would
            log.warning("the live tail stopped: %r", exc)
            self._failed = exc
        finally:
            self._hub = None
            self._wake_all()

    def _append(self, events: list[StoredEvent], hi: int) -> None:
        """Append what was read after ``head`` through ``hi`` as segments; wake the groups
        whose filter an event matches; drop the oldest segments past the budget."""
        step = max(1, self.segment_events)
        lo = self.head
        added: list[Segment] = []
        for start in range(0, max(1, len(events)), step):
            chunk = events[start : start + step]
            top = chunk[-1].lsn if start + step < len(events) else hi
            added.append(Segment(lo, top, chunk))
            lo = top
        for seg in added:
            self.segments.append(seg)
            self._events += max(1, len(seg.events))
        self.head = hi
        while self._events > self.events_max and len(self.segments) > 1:
            gone = self.segments.popleft()
            self._events -= max(1, len(gone.events))
            self.base = gone.hi
        for flt, group in list(self._groups.items()):
            for seg in added:
                if seg.select(flt):
                    del self._groups[flt]
                    _wake(group)
                    break
                group.skipped_to = seg.hi

    def _reset(self, at: int, seq: int) -> None:
        """Empty the ring and start it at ``at`` (cut ``seq``); waiting streams look again."""
        self.segments.clear()
        self._events = 0
        self.base = self.head = at
        self.seq = seq
        self._wake_all()

    def _wake_all(self) -> None:
        groups, self._groups = self._groups, {}
        for group in groups.values():
            _wake(group)


def _wake(group: _Group) -> None:
    for waiter in group.waiters:
        if not waiter.done():
            waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
