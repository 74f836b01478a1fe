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

from walship.errors import InvalidParameter, NotFound, Unavailable
from walship.events import EventOut, StoredEvent, to_out, to_plain
from walship.http.auth import check_tenant, principal_of, scope_filter
from walship.http.consumers import check_position_params
from walship.http.media import Media, response_media
from walship.limits import LSN_MAX
from walship.node import Node
from walship.sse import KEEPALIVE, MEDIA_TYPE, RETRY_MS, encode_event, parse_last_event_id
from walship.storage.query import QueryFilter

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


class EntityEvents(msgspec.Struct):
    """A page of one entity's events by version; ``next_version`` continues in its direction."""

    tenant_id: str
    entity_id: str
    version: int  # the entity's current version on this node
    direction: str
    events: list[EventOut]
    count: int
    next_version: int | None


class EntityVersion(msgspec.Struct):
    tenant_id: str
    entity_id: str
    version: int  # 0: no event of this entity is visible here


def _json(body: bytes) -> Response:
    return Response(body, media_type=_JSON)


class Subscriptions:
    """Counts a node's open subscriptions against ``subscriptions_max``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.open = 0

    def admit(self) -> None:
        """Unavailable (503) when the node serves as many as it may."""
        if self.open >= self.node.limits.subscriptions_max:
            raise Unavailable(
                f"{self.open} subscriptions are open on {self.node.node_id}, the most it serves; "
                "try another node or later",
                retry_after_ms=1_000,
            )

    async def pages(self, flt: QueryFilter, after: int) -> AsyncGenerator[list[StoredEvent], None]:
        """Pages of events after lsn ``after`` matching ``flt``, in lsn order, until the node
        ends its subscriptions; an empty page means nothing was sent for a heartbeat interval
        (time for a keepalive). The next page is read only when the caller asks for it."""
        node = self.node
        store = node.store
        limits = node.limits
        # the query path refuses pages over query_limit_max, which a deployment may set lower
        page = min(limits.subscription_page_events, limits.query_limit_max)
        heartbeat_s = limits.subscription_heartbeat_ms / 1000
        # counted here, not in ``admit``: a response whose body never starts (the client left
        # first) never runs this generator, so its ``finally`` could not give the count back
        self.open += 1
        try:
            sent_at = time.monotonic()
            while not node.subscriptions_ended:
                visible = store.visible_lsn
                if visible > after:
                    window = dataclasses.replace(flt, from_lsn=after + 1, to_lsn=visible)
                    result = await run_in_threadpool(store.query, window, page)
                    # a full page says where it stopped; a short one covered all up to visible
                    after = result.events[-1].lsn if result.next_cursor else visible
                    if result.events:
                        yield result.events
                        sent_at = time.monotonic()
                    elif time.monotonic() - sent_at >= heartbeat_s:
                        # writes run but none matches: still show the proxy a live stream
                        yield []
                        sent_at = time.monotonic()
                    continue
                idle_s = max(0.0, heartbeat_s - (time.monotonic() - sent_at))
                if not await node.wait_past(after, idle_s) and not node.subscriptions_ended:
                    yield []
                    sent_at = time.monotonic()
        finally:
            self.open -= 1

    async def frames(self, flt: QueryFilter, after: int) -> AsyncIterator[bytes]:
        """The subscription as Server-Sent Events."""
        yield b"retry: %d\n: subscribed after lsn %d\n\n" % (RETRY_MS, after)
        # closed with this generator, wherever it stops: the count must come back at once
        async with contextlib.aclosing(self.pages(flt, after)) as pages:
            async for events in pages:
                if events:
                    for chunk in _chunks(events):
                        yield chunk
                else:
                    yield KEEPALIVE


def _chunks(events: list[StoredEvent]) -> Iterable[bytes]:
    parts: list[bytes] = []
    size = 0
    for ev in events:
        frame = encode_event(ev.lsn, _encoder.encode(to_out(ev)))
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
        description="Server-Sent Events: each event is `id: <lsn>` and `data: <event JSON>`, in "
        "lsn order, every matching event exactly once: first the stored history, then live "
        "as events become visible on this node (a follower sends only what it has applied). "
        "Reconnect with `Last-Event-ID` (it wins over `from_lsn`) to resume after that lsn. "
        f"Idle streams get a `: keepalive` comment every {limits.subscription_heartbeat_ms} ms.",
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
        after = max(from_lsn, 1) - 1
        if last_event_id is not None:
            after = parse_last_event_id(last_event_id.strip())
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
            subscriptions.frames(flt, after),
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
