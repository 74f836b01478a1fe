"""The subscription as a WebSocket, on the same path as the SSE stream.

Same loop, same pages (``Subscriptions.pages``), same pacing: each event is one text message
(the event JSON, with its ``lsn``), sent with ``await``, so a client that stops reading stops
the reads behind it. Resume with ``from_lsn`` (browsers cannot set headers on a WebSocket;
``Last-Event-ID`` is taken too when a client can). Idle connections are kept alive by the
server's WebSocket pings. Bad input is refused before the upgrade, as a 4xx JSON answer where
the server can send one (else a close with code 1008 and the message).
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from fastapi import FastAPI
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from walship.errors import InvalidParameter, WalshipError
from walship.events import to_out
from walship.http.auth import principal_of, scope_filter
from walship.http.consumers import check_position_params
from walship.http.errors import encode_error
from walship.http.stream import STREAM_PATH, Subscriptions
from walship.limits import LSN_MAX, Limits
from walship.sse import parse_last_event_id
from walship.storage.query import QueryFilter

CLOSE_GOING_AWAY = 1001  # the server drains
CLOSE_POLICY = 1008  # refused input, where no HTTP answer can be sent
_FILTERS = ("tenant_id", "entity_id", "event_type", "event_type_prefix")
_encoder = msgspec.json.Encoder()


def parse_subscription(websocket: WebSocket, limits: Limits) -> tuple[QueryFilter, int]:
    """The filter and the lsn to resume after; InvalidParameter for anything off."""
    params = websocket.query_params
    unknown = sorted(set(params.keys()) - {"from_lsn", "from_position", *_FILTERS})
    if unknown:
        raise InvalidParameter(
            f"unknown query parameters {', '.join(unknown)} for {STREAM_PATH}",
            field=unknown[0],
            unknown=unknown,
        )
    text = params.get("from_lsn", "1")
    if not (text.isascii() and text.isdigit()) or int(text) > LSN_MAX:
        raise InvalidParameter(f"from_lsn must be an lsn 0..{LSN_MAX}", field="from_lsn")
    after = max(int(text), 1) - 1
    header = websocket.headers.get("last-event-id")
    if header is not None:
        after = parse_last_event_id(header.strip())
    values: dict[str, str | None] = {}
    for name in _FILTERS:
        value = params.get(name)
        # event types (topic names) may be longer than entity ids
        chars_max = (
            limits.event_type_chars_max
            if name.startswith("event_type")
            else limits.entity_id_chars_max
        )
        if value is not None and not 1 <= len(value) <= chars_max:
            raise InvalidParameter(f"{name} must be 1..{chars_max} characters", field=name)
        values[name] = value
    from_position: int | None = None
    position_text = params.get("from_position")
    if position_text is not None:
        if not (position_text.isascii() and position_text.isdigit()) or (
            int(position_text) > LSN_MAX
        ):
            raise InvalidParameter(
                f"from_position must be a position 0..{LSN_MAX}", field="from_position"
            )
        from_position = int(position_text)
        check_position_params(values["tenant_id"], from_position, None)
    entity = values["entity_id"]
    flt = QueryFilter(
        tenant_id=values["tenant_id"] or ("default" if entity else None),
        entity_id=entity,
        event_type=values["event_type"],
        event_type_prefix=values["event_type_prefix"],
        from_position=from_position,
    )
    return flt, after


async def _refuse(websocket: WebSocket, exc: WalshipError) -> None:
    answer = Response(encode_error(exc), status_code=exc.http_status, media_type="application/json")
    try:
        await websocket.send_denial_response(answer)
    except RuntimeError:  # the server cannot answer a WebSocket with HTTP: say it in a close
        await websocket.close(CLOSE_POLICY, exc.message[:120])


def add_websocket_route(app: FastAPI, subscriptions: Subscriptions) -> None:
    node = subscriptions.node

    @app.websocket(STREAM_PATH)
    async def subscribe_websocket(websocket: WebSocket) -> None:
        try:
            flt, after = parse_subscription(websocket, node.limits)
            flt = scope_filter(principal_of(websocket.scope), flt)
            subscriptions.admit()
        except WalshipError as exc:
            await _refuse(websocket, exc)
            return
        await websocket.accept()

        async def send_events() -> None:
            async with contextlib.aclosing(subscriptions.pages(flt, after)) as pages:
                async for events in pages:
                    for ev in events:  # an empty page: the server's pings keep it alive
                        await websocket.send_text(_encoder.encode(to_out(ev)).decode())

        async def until_closed() -> None:
            # what the client sends is not read for anything but its going away
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass

        sender = asyncio.create_task(send_events())
        watcher = asyncio.create_task(until_closed())
        done, pending = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if sender in done:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                sender.result()  # a send to a client that left: nothing more to do
                await websocket.close(CLOSE_GOING_AWAY)
