"""Routes for consumers: catch-up subscriptions (SSE), entity stream reads, reads by id.

A subscription is one loop, the way a follower is served (DESIGN §2.5: live tailing is just
catch-up that reached the end): read the next page of matching events after the last lsn
delivered, up to what is visible on this node, through the store's query path (Parquet parts
and memtables); send it; when nothing is left, wait on the node's one "visible lsn advanced"
event and go on from the same lsn. So the switch from history to live has no seam to lose or
repeat an event at, a follower only ever sends what it has applied, and a slow consumer holds
one page in memory: the next page is read only after the last was handed to the socket, which
waits for the peer (TCP pacing), never an in-memory queue of events per subscriber.
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures at run time.
import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Annotated, Literal

import msgspec
from fastapi import FastAPI, Header, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from walship.errors import InvalidParameter, LogCut, NotFound, Unavailable, WalshipError
from walship.events import StoredEvent, to_out, to_plain
from walship.http.auth import check_tenant, principal_of, scope_filter
from walship.http.consumers import check_position_params
from walship.http.live_tail import LiveTail, TailPage
from walship.http.media import Media, response_media
from walship.limits import LSN_MAX
from walship.node import Node
from walship.position import Lsn
from walship.sse import (
    KEEPALIVE,
    MEDIA_TYPE,
    RETRY_MS,
    ResumePoint,
    encode_cut,
    encode_event,
    parse_last_event_id,
)
from walship.storage.frame_scan import FramePage, frame_page
from walship.storage.query import QueryFilter
from walship.store import Store
from walship.wire import EntityEvents, EntityVersion

STREAM_PATH = "/api/v1/events/stream"
CHUNK_BYTES = 64 * 1024  # frames go to the socket in pieces of about this, so TCP paces us

_encoder = msgspec.json.Encoder()
_JSON = "application/json"
_MinLsn = Annotated[
    int | None,
    Query(
        ge=0, le=LSN_MAX, description="Wait until this node has applied this lsn (read-your-writes)"
    ),
]
_MinLsnWait = Annotated[int, Query(ge=0, description="How long to wait for `min_lsn`, in ms")]


def _json(body: bytes) -> Response:
    return Response(body, media_type=_JSON)


@dataclasses.dataclass(frozen=True)
class CutNotice:
    """The stream's last item: a repair cut the log behind what the stream had sent (or
    the resume position's term is not this log's); the consumer's position is gone."""

    error: LogCut


def check_resume(node: Node, point: ResumePoint) -> None:
    """LogCut (409) when a resume position names an event this node's log cannot hold: a
    term that differs from this log's at that lsn, or (on a leader that takes writes, whose
    log is the cluster's) an lsn past its end. A node that has not seen the position's term
    is behind, not the consumer: a leader answers Unavailable (503, try another node), a
    follower's stream waits and checks the term once it has the lsn, as it does for an lsn
    it has not applied yet."""
    store = node.store
    if point.lsn == 0:
        return
    visible = store.visible_lsn
    if point.term is not None and point.term > store.last_position.term.value:
        if node.leader is not None and _takes_writes(node):
            raise Unavailable(
                f"Last-Event-ID names term {point.term}, which {node.node_id} has not seen: "
                "it is not the cluster's leader any more; subscribe to another node",
                retry_after_ms=1_000,
            )
        return
    if point.lsn <= visible:
        if (
            point.term is not None
            and (term := store.reads.term_at(Lsn(point.lsn)).value) != point.term
        ):
            raise _term_differs(node, point, term)
    elif node.leader is not None and _takes_writes(node):
        raise LogCut(
            f"Last-Event-ID names lsn {point.lsn}, past the end of the log on the leader "
            f"{node.node_id} (lsn {visible}): a failover repair cut the events it had; "
            "rebuild from a position you trust",
            last_event_lsn=point.lsn,
            log_end_lsn=visible,
        )


def _holds(store: Store, point: ResumePoint) -> bool:
    """Whether this node's log reaches ``point`` and has seen its term (so it can judge it)."""
    term = point.term or 0
    return store.visible_lsn >= point.lsn and store.last_position.term.value >= term


def _takes_writes(node: Node) -> bool:
    """Whether this leader's log is the cluster's now (not fenced, not waiting for a lease)."""
    try:
        node.check_writable()
    except WalshipError:
        return False
    return True


def _term_differs(node: Node, point: ResumePoint, term: int) -> LogCut:
    details: dict[str, int] = {}
    kept = _end_of_term_before(node.store, point)
    if kept is not None:
        details["kept_lsn"] = kept
    return LogCut(
        f"lsn {point.lsn} was written in term {term} on {node.node_id}, not in term "
        f"{point.term} as the consumer had it: a failover repair cut the events it had; "
        "rebuild from a position you trust",
        last_event_lsn=point.lsn,
        last_event_term=point.term,
        log_term=term,
        **details,
    )


def _end_of_term_before(store: Store, point: ResumePoint) -> int | None:
    """Where this log still agrees with a consumer whose event ``point.lsn`` has term
    ``point.term`` (which this log's record there has not): the last lsn this log holds of
    that term, when it holds any. A term's records start at one lsn on every node that has
    them, and two logs with a record of one term at one lsn agree up to it, so the consumer
    had every event up to there as this log has them. None when this log never held that
    term (no point of agreement is known)."""
    history = store.log.term_history()
    for i, (term, first) in enumerate(history):
        if term == point.term:
            end = history[i + 1][1] - 1 if i + 1 < len(history) else store.visible_lsn
            return end if first <= end < point.lsn else None
    return None


def _cut_under(node: Node, kept: int, after: int) -> CutNotice:
    return CutNotice(
        LogCut(
            f"a failover repair cut the log of {node.node_id} after lsn {kept}; this stream "
            f"had sent up to lsn {after}, events the log does not hold any more",
            kept_lsn=kept,
            last_event_lsn=after,
        )
    )


# the page a caught-up stream takes from the live tail (its events and frames are shared)
SharedPage = TailPage

Page = list[StoredEvent] | SharedPage | FramePage | CutNotice
_EVERYTHING = QueryFilter()


class Subscriptions:
    """Counts a node's open subscriptions against ``subscriptions_max``; the live tail
    they share once caught up."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.open = 0
        limits = node.limits
        window = min(limits.subscription_tail_events_max, limits.query_limit_max)
        self.tail = LiveTail(node, window, min(limits.subscription_page_events, window))

    def admit(self) -> None:
        """Unavailable (503) when the node serves as many as it may."""
        if self.open >= self.node.limits.subscriptions_max:
            raise Unavailable(
                f"{self.open} subscriptions are open on {self.node.node_id}, the most it serves; "
                "try another node or later",
                retry_after_ms=1_000,
            )

    async def pages(
        self, flt: QueryFilter, point: ResumePoint, cuts_seen: int, *, sse: bool = False
    ) -> AsyncGenerator[Page, None]:
        """Pages of events after ``point`` matching ``flt``, in lsn order, until the node
        ends its subscriptions; an empty page means nothing was sent for a heartbeat interval
        (time for a keepalive). The next page is read only when the caller asks for it.

        ``cuts_seen`` is the store's cut ``seq`` when ``point`` was checked: a repair cut
        after it that falls below what the stream stands at ends the stream with a
        ``CutNotice``; a page read while a cut ran is never sent. ``sse``: history of a
        stream of every event may come as a ``FramePage`` (its SSE frames, built in bulk).
        """
        node = self.node
        store = node.store
        cuts = store.cuts
        limits = node.limits
        after = point.lsn
        # a follower may not have the resume lsn or its term yet: checked once it has them
        term_due = None
        if point.term is not None and not _holds(store, point):
            term_due = point.term
        # the query path refuses pages over query_limit_max, which a deployment may set lower
        page = min(limits.subscription_page_events, limits.query_limit_max)
        heartbeat_s = limits.subscription_heartbeat_ms / 1000
        # a stream of every event reads its history as frames built a slab at a time
        every_event = sse and dataclasses.replace(flt, from_lsn=1, to_lsn=None) == _EVERYTHING
        # counted here, not in ``admit``: a response whose body never starts (the client left
        # first) never runs this generator, so its ``finally`` could not give the count back
        self.open += 1
        # history is read page by page from the store; once a read reached what was visible,
        # the stream follows the live tail it shares with the others (``live``)
        caught_up = False
        live = False
        tail = self.tail
        try:
            sent_at = time.monotonic()
            while not node.subscriptions_ended:
                seq = cuts.seq
                if seq != cuts_seen:
                    kept = cuts.lowest_since(cuts_seen)
                    if kept is not None and after > kept:
                        yield _cut_under(node, kept, after)
                        return
                    if seq % 2:  # a cut runs: read nothing until it is done
                        await asyncio.sleep(0.05)
                        continue
                    cuts_seen = seq
                visible = store.visible_lsn
                if term_due is not None:
                    if not _holds(store, point):  # send nothing before it has: wait for more
                        idle_s = max(0.0, heartbeat_s - (time.monotonic() - sent_at))
                        if not await node.wait_past(visible, idle_s):
                            yield []
                            sent_at = time.monotonic()
                        continue
                    if (term := store.reads.term_at(Lsn(point.lsn)).value) != term_due:
                        if cuts.seq == seq:
                            yield CutNotice(_term_differs(node, point, term))
                            return
                        continue
                    term_due = None
                if live:
                    taken = tail.take(after, flt, seq, page)
                    if taken is None:  # behind what the ring holds: read the store again
                        tail.leave()
                        live = caught_up = False
                    else:
                        after, shared = taken
                        if shared is not None:
                            yield shared
                            sent_at = time.monotonic()
                            continue
                        idle_s = heartbeat_s - (time.monotonic() - sent_at)
                        if idle_s <= 0:
                            # writes run but none matches: still show the proxy a live stream
                            yield []
                            sent_at = time.monotonic()
                            continue
                        after = await tail.wait(after, flt, idle_s)
                        continue
                if caught_up and tail.join(after, seq):
                    live = True
                    continue
                if visible > after and every_event:
                    frames = await run_in_threadpool(_frame_page, store, after + 1, visible, page)
                    if cuts.seq != seq:
                        continue  # read across a cut: maybe records that are gone now
                    after = frames.last_lsn if frames.full else visible
                    caught_up = not frames.full
                    if frames.count:
                        yield frames
                        sent_at = time.monotonic()
                    elif time.monotonic() - sent_at >= heartbeat_s:
                        yield []
                        sent_at = time.monotonic()
                    continue
                if visible > after:
                    window = dataclasses.replace(flt, from_lsn=after + 1, to_lsn=visible)
                    result = await run_in_threadpool(store.query, window, page)
                    if cuts.seq != seq:
                        continue  # read across a cut: maybe records that are gone now
                    # a full page says where it stopped; a short one covered all up to visible
                    after = result.events[-1].lsn if result.next_cursor else visible
                    caught_up = not result.next_cursor
                    if result.events:
                        yield result.events
                        sent_at = time.monotonic()
                    elif time.monotonic() - sent_at >= heartbeat_s:
                        # writes run but none matches: still show the proxy a live stream
                        yield []
                        sent_at = time.monotonic()
                    continue
                if not caught_up:
                    caught_up = True  # nothing past ``after`` is visible: follow the tail
                    continue
                idle_s = max(0.0, heartbeat_s - (time.monotonic() - sent_at))
                if not await node.wait_past(after, idle_s) and not node.subscriptions_ended:
                    yield []
                    sent_at = time.monotonic()
        finally:
            if live:
                tail.leave()
            self.open -= 1

    async def frames(
        self, flt: QueryFilter, point: ResumePoint, cuts_seen: int
    ) -> AsyncIterator[bytes]:
        """The subscription as Server-Sent Events."""
        yield b"retry: %d\n: subscribed after lsn %d\n\n" % (RETRY_MS, point.lsn)
        # closed with this generator, wherever it stops: the count must come back at once
        async with contextlib.aclosing(self.pages(flt, point, cuts_seen, sse=True)) as pages:
            async for events in pages:
                if isinstance(events, CutNotice):
                    yield encode_cut(_encoder.encode(events.error.to_dict()))
                elif isinstance(events, TailPage):
                    for piece in _joined(events.frames()):
                        yield piece
                elif isinstance(events, FramePage):
                    for span in events.spans:
                        for piece in span.pieces(CHUNK_BYTES):
                            yield piece
                elif events:
                    for chunk in _chunks(events):
                        yield chunk
                else:
                    yield KEEPALIVE


def _frame_page(store: Store, from_lsn: int, to_lsn: int, limit: int) -> FramePage:
    # looked up at call time: a test counts the pages read through the module's name
    return frame_page(store.read_view(), from_lsn, to_lsn, limit)


def _joined(pieces: list[bytes]) -> list[bytes]:
    """Small pieces joined up to about ``CHUNK_BYTES`` (one write to the socket each); a
    large one is sent as it is, shared with the other streams, not copied."""
    if len(pieces) < 2:
        return pieces
    out: list[bytes] = []
    run: list[bytes] = []
    size = 0
    for piece in pieces:
        if size and size + len(piece) > CHUNK_BYTES:
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run, size = [], 0
        run.append(piece)
        size += len(piece)
    out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


def _chunks(events: list[StoredEvent]) -> Iterable[bytes]:
    parts: list[bytes] = []
    size = 0
    for ev in events:
        frame = encode_event(ev.lsn, ev.term, _encoder.encode(to_out(ev)))
        parts.append(frame)
        size += len(frame)
        if size >= CHUNK_BYTES:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)


def add_stream_routes(app: FastAPI, node: Node) -> Subscriptions:
    """Subscriptions and entity stream reads; after the query route, whose path is fixed.
    Returns the node's subscription counter (the WebSocket route shares it)."""
    store = node.store
    limits = node.limits
    subscriptions = Subscriptions(node)
    app.state.subscriptions = subscriptions
    _Text = Annotated[str | None, Query(min_length=1, max_length=limits.entity_id_chars_max)]
    _Type = Annotated[str | None, Query(min_length=1, max_length=limits.event_type_chars_max)]

    @app.get(
        STREAM_PATH,
        summary="Subscribe: matching events from a position, history then live (SSE)",
        description="Server-Sent Events: each event is `id: <lsn>:<term>` and `data: <event "
        "JSON>`, in lsn order, every matching event exactly once: first the stored history, "
        "then live as events become visible on this node (a follower sends only what it has "
        "applied). Reconnect with `Last-Event-ID` (it wins over `from_lsn`; a plain `<lsn>` is "
        "taken too) to resume after that event. "
        f"Idle streams get a `: keepalive` comment every {limits.subscription_heartbeat_ms} ms. "
        "When a failover repair cuts this node's log below what the stream sent, the stream "
        "ends with an `event: cut` frame (data: a `log_cut` error with `kept_lsn`); a resume "
        "whose event this log does not hold (another term at that lsn, or past the leader's "
        "end) is answered 409 `log_cut`.",
        responses={
            200: {"description": "An event stream", "content": {MEDIA_TYPE: {}}},
            "default": {"description": "Error", "content": {_JSON: {}}},
        },
    )
    async def subscribe(
        request: Request,
        from_lsn: Annotated[int, Query(ge=0, le=LSN_MAX, description="First lsn, inclusive")] = 1,
        from_position: Annotated[
            int | None,
            Query(ge=0, le=LSN_MAX, description="First tenant position (needs tenant_id)"),
        ] = None,
        tenant_id: _Text = None,
        entity_id: _Text = None,
        event_type: _Type = None,
        event_type_prefix: _Type = None,
        last_event_id: Annotated[
            str | None, Header(description="The lsn of the last event received: resume after it")
        ] = None,
    ) -> Response:
        check_position_params(tenant_id, from_position, None)
        cuts_seen = store.cuts.seq  # before the check: a cut from here on is seen by the stream
        point = ResumePoint(max(from_lsn, 1) - 1)
        if last_event_id is not None:
            point = parse_last_event_id(last_event_id.strip())
            check_resume(node, point)  # ``from_lsn`` is where to start, not what was had
        flt = QueryFilter(
            tenant_id=tenant_id if tenant_id or not entity_id else "default",
            entity_id=entity_id,
            event_type=event_type,
            event_type_prefix=event_type_prefix,
            from_position=from_position,
        )
        flt = scope_filter(principal_of(request.scope), flt)
        subscriptions.admit()
        return StreamingResponse(
            subscriptions.frames(flt, point, cuts_seen),
            media_type=MEDIA_TYPE,
            # proxies (nginx) must pass each piece on at once, not buffer the stream
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/api/v1/entities/{entity_id:path}/events",
        summary="One entity's events by version range, forward or backward",
        description="Reads only the versions asked for (memtable indexes and the Parquet row "
        "groups that hold them), never the whole stream. Versions run 1, 2, 3 … per entity. "
        "`next_version` is where the next page starts (`from_version` going forward, "
        "`to_version` going backward), null when the range is done.",
    )
    async def entity_events(
        request: Request,
        entity_id: str,
        tenant_id: Annotated[str, Query(max_length=limits.tenant_id_chars_max)] = "default",
        from_version: Annotated[
            int, Query(ge=0, le=LSN_MAX, description="Lowest version, inclusive")
        ] = 1,
        to_version: Annotated[
            int | None,
            Query(ge=0, le=LSN_MAX, description="Highest version, inclusive"),
        ] = None,
        direction: Annotated[Literal["forward", "backward"], Query()] = "forward",
        limit: Annotated[
            int, Query(ge=1, le=limits.query_limit_max, description="Events per page")
        ] = limits.query_limit_default,
        min_lsn: _MinLsn = None,
        min_lsn_wait_ms: _MinLsnWait = 5_000,
    ) -> Response:
        check_tenant(principal_of(request.scope), tenant_id)
        if min_lsn is not None:
            await node.wait_visible(min_lsn, min_lsn_wait_ms)
        backward = direction == "backward"
        events, current = await run_in_threadpool(
            lambda: store.entities.read(
                entity_id,
                tenant_id,
                from_version=from_version,
                to_version=to_version,
                backward=backward,
                limit=limit,
            )
        )
        next_version = None
        if len(events) == limit:
            if backward and events[-1].version - 1 >= max(from_version, 1):
                next_version = events[-1].version - 1
            top = current if to_version is None else min(to_version, current)
            if not backward and events[-1].version + 1 <= top:
                next_version = events[-1].version + 1
        media = response_media(request.scope["headers"])
        if media is Media.MSGPACK:
            plain = msgspec.structs.asdict(
                EntityEvents(tenant_id, entity_id, current, direction, [], 0, next_version)
            )
            plain["events"] = [to_plain(ev) for ev in events]
            plain["count"] = len(events)
            return Response(media.encode(plain), media_type=media.value)
        body = EntityEvents(
            tenant_id,
            entity_id,
            current,
            direction,
            [to_out(ev) for ev in events],
            len(events),
            next_version,
        )
        return _json(_encoder.encode(body))

    @app.get(
        "/api/v1/entities/{entity_id:path}/version",
        summary="An entity's current version (0 when it has no event), in constant time",
    )
    async def entity_version(
        request: Request,
        entity_id: str,
        tenant_id: Annotated[str, Query(max_length=limits.tenant_id_chars_max)] = "default",
        min_lsn: _MinLsn = None,
        min_lsn_wait_ms: _MinLsnWait = 5_000,
    ) -> Response:
        check_tenant(principal_of(request.scope), tenant_id)
        if min_lsn is not None:
            await node.wait_visible(min_lsn, min_lsn_wait_ms)
        version = store.entities.current_version(entity_id, tenant_id)
        return _json(_encoder.encode(EntityVersion(tenant_id, entity_id, version)))

    @app.get(
        "/api/v1/events/{event_id}",
        summary="One event by its id",
        description="404 when no visible event here has this id, or when it is in a "
        "tenant the key does not cover (the same answer: a 403 would confirm the id).",
    )
    async def event_by_id(
        request: Request,
        event_id: str,
        min_lsn: _MinLsn = None,
        min_lsn_wait_ms: _MinLsnWait = 5_000,
    ) -> Response:
        if min_lsn is not None:
            await node.wait_visible(min_lsn, min_lsn_wait_ms)
        try:
            raw = uuid.UUID(event_id).bytes
        except ValueError as exc:
            raise InvalidParameter(f"not a UUID: {event_id[:64]!r}", field="event_id") from exc
        found = await run_in_threadpool(store.entities.find, raw)
        # another tenant's event is answered as if it did not exist: a 403 would tell the
        # caller the id is taken, and in which tenant
        if found is None or not principal_of(request.scope).may_use(found.tenant_id):
            raise NotFound(f"no event with id {event_id} on {node.node_id}", event_id=event_id)
        media = response_media(request.scope["headers"])
        if media is Media.MSGPACK:
            return Response(media.encode(to_plain(found)), media_type=media.value)
        return _json(_encoder.encode(to_out(found)))

    return subscriptions
