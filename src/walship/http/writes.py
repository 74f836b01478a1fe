"""The HTTP side of writes: body in, decoded events to the node's write path, receipt out.

A body is read with a size cap, decoded by msgspec into ``EventIn``/``BatchIn`` (no pydantic on
the way in or out; a msgpack body is first turned into its JSON, see ``media.py``), checked
against the caller's tenants, handed to ``write_path.append_pending`` (the node's: admission,
``Store.submit``, the WAL wait, the acknowledgement) and its receipts encoded.
``WriteFastLane`` serves the two append paths straight from ASGI; the FastAPI routes in
``app.py`` call the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from starlette.types import ASGIApp, Receive, Scope, Send

from walship.apikeys import Principal
from walship.errors import IdConflict, LimitExceeded, WalshipError
from walship.events import EventIn, TrackingIn, decode_batch_json, decode_event_json
from walship.http.auth import check_tenant, principal_of, route_path
from walship.http.errors import encode_error
from walship.http.media import JSON, Media, msgpack_to_json, request_media, response_media
from walship.http.params import check_names
from walship.limits import Limits
from walship.node import Node
from walship.store import PendingAppend
from walship.wire import BatchReceipts
from walship.write_path import append_pending

EVENTS_PATH = "/api/v1/events"
BATCH_PATH = "/api/v1/events/batch"


async def receive_body(scope: Scope, receive: Receive, bytes_max: int) -> bytes | None:
    """The request body, refusing (413) as soon as it is known to exceed ``bytes_max``.

    Returns None when the client disconnected before sending it all.
    """
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > bytes_max:
            raise LimitExceeded(
                f"request body is {int(value)} bytes; the limit is {bytes_max}", limit=bytes_max
            )
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > bytes_max:
            raise LimitExceeded(
                f"request body exceeds the limit of {bytes_max} bytes", limit=bytes_max
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


ACK_HEADER = "x-walship-ack-mode"
ACK_PARAM = "ack_mode"


async def append_for(
    node: Node,
    principal: Principal,
    events: Sequence[EventIn],
    ack_mode: str | None,
    tracking: TrackingIn | None = None,
) -> PendingAppend:
    """``append_pending`` for ``principal``, whose tenants the events (and the tracked
    consumer's) are checked to be in.

    An id already taken by another tenant's event is refused without a word about that event:
    the store's ``IdConflict`` names what it stored under the id (its tenant, entity, type)."""
    _check_tenants(principal, events)
    if tracking is not None:
        check_tenant(principal, tracking.tenant_id)
    try:
        return await append_pending(node, events, ack_mode, tracking)
    except IdConflict as exc:
        stored = exc.details.get("stored")
        if not isinstance(stored, dict) or principal.may_use(str(stored.get("tenant_id"))):
            raise
        event_id = exc.details.get("event_id")
        raise IdConflict(
            f"event id {event_id} is already taken: a new event needs a new id",
            event_id=event_id,
            **({"index": exc.details["index"]} if "index" in exc.details else {}),
        ) from None


def _check_tenants(principal: Principal, events: Sequence[EventIn]) -> None:
    """Forbidden (nothing stored) when an event is for a tenant the principal may not use."""
    if principal.tenants is None:
        return
    for event in events:
        check_tenant(principal, event.tenant_id)


class BodyFormat(msgspec.Struct, frozen=True):
    """How a write request's body is encoded and how its answer should be."""

    request: Media = Media.JSON
    response: Media = Media.JSON

    @classmethod
    def of(cls, scope: Scope) -> BodyFormat:
        """From ``Content-Type`` and ``Accept``; UnsupportedMediaType (415) for a body type
        that is neither JSON nor msgpack."""
        headers = scope.get("headers", ())
        return cls(request_media(headers), response_media(headers))

    def json_body(self, data: bytes, *, batch: bool, limits: Limits) -> bytes:
        if self.request is Media.MSGPACK:
            return msgpack_to_json(data, batch=batch, limits=limits)
        return data


_AS_SENT = BodyFormat()


async def answer_event(
    node: Node,
    data: bytes,
    principal: Principal,
    ack_mode: str | None = None,
    body_format: BodyFormat = _AS_SENT,
) -> bytes:
    """Append the event in a body for ``principal``; the encoded receipt."""
    event = decode_event_json(body_format.json_body(data, batch=False, limits=node.limits))
    pending = await append_for(node, principal, (event,), ack_mode)
    return body_format.response.encode(pending.receipts[0])


async def answer_batch(
    node: Node,
    data: bytes,
    principal: Principal,
    ack_mode: str | None = None,
    body_format: BodyFormat = _AS_SENT,
) -> bytes:
    """Append the batch in a body for ``principal``, all or nothing; the receipts."""
    batch = decode_batch_json(body_format.json_body(data, batch=True, limits=node.limits))
    pending = await append_for(node, principal, batch.events, ack_mode, batch.tracking)
    receipts = pending.receipts
    lsns = [r.lsn for r in pending.answers]
    return body_format.response.encode(
        BatchReceipts(receipts, len(receipts), min(lsns), max(lsns), pending.tracking)
    )


_WRITE_PARAMS = frozenset({ACK_PARAM})


def requested_ack_mode(scope: Scope) -> str | None:
    """A stricter ack mode asked for by header ``X-Walship-Ack-Mode`` or ``?ack_mode=``;
    InvalidParameter (400) for any other query parameter."""
    query = scope.get("query_string", b"")
    from_query: str | None = None
    if query:
        from urllib.parse import parse_qs

        pairs = parse_qs(bytes(query).decode("latin-1"), keep_blank_values=True)
        check_names(pairs, _WRITE_PARAMS, route_path(scope))
        values = pairs.get(ACK_PARAM)
        if values:
            from_query = str(values[-1])
    for name, value in scope.get("headers", ()):
        if name == ACK_HEADER.encode():
            return bytes(value).decode("latin-1")
    return from_query


_WRITE_HANDLERS = {EVENTS_PATH: answer_event, BATCH_PATH: answer_batch}
_JSON_HEADER = (b"content-type", JSON.encode())


class WriteFastLane:
    """Serve the two append paths straight from ASGI, ahead of FastAPI's routing.

    Why: routing, dependency solving and the Request/Response objects cost about as much CPU
    as the rest of the append (~80 of ~160 µs CPU per request, measured in-process), and
    single-event appends are the hottest path. The FastAPI routes stay registered: they
    document the API and give the same answers when this lane is off
    (``create_app(node, write_fast_lane=False)``).
    """

    def __init__(self, app: ASGIApp, node: Node) -> None:
        self.app = app
        self.node = node
        self.bytes_max = node.limits.request_bytes_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = None
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = _WRITE_HANDLERS.get(route_path(scope))
        if handler is None:
            await self.app(scope, receive, send)
            return
        content_type = _JSON_HEADER
        try:
            ack_mode = requested_ack_mode(scope)  # before the body: a bad parameter stores nothing
            body_format = BodyFormat.of(scope)
            data = await receive_body(scope, receive, self.bytes_max)
            if data is None:
                return  # the client is gone; nothing was appended
            principal = principal_of(scope)
            content = await handler(self.node, data, principal, ack_mode, body_format)
            status = 200
            content_type = (b"content-type", body_format.response.value.encode())
        except WalshipError as exc:
            status, content = exc.http_status, encode_error(exc)
        headers = [content_type, (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
