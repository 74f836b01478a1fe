"""The subscription as a WebSocket, on the same path as the SSE stream.

Same loop, same pages (``Subscriptions.pages``), same pacing: each event is one text message
(the event JSON, with its ``lsn``), sent with ``await``, so a client that stops reading stops
the reads behind it. Resume with ``last_event_id=<lsn>:<term>`` in the query (browsers cannot
set headers on a WebSocket; the ``Last-Event-ID`` header is taken too when a client can), or
start at ``from_lsn``. Idle connections are kept alive by the server's WebSocket pings. Bad
input (and a resume position a repair cut away, 409 ``log_cut``) is refused before the
upgrade, as a 4xx JSON answer where the server can send one (else a close with code 1008 and
the message). When a repair cuts the log below what was sent, the server closes with code
4409 and the reason ``log_cut kept_lsn=<lsn>``.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from fastapi import FastAPI
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from walship.errors import InvalidParameter, LogCut, WalshipError
from walship.events import to_out
from walship.http.auth import principal_of, scope_filter
from walship.http.consumers import check_position_params
from walship.http.errors import encode_error
from walship.http.stream import (
    STREAM_PATH,
    CutNotice,
    SharedPage,
    Subscriptions,
    check_resume,
)
from walship.limits import LSN_MAX
from walship.node import Node
from walship.sse import ResumePoint, parse_last_event_id
from walship.storage.query import QueryFilter

CLOSE_GOING_AWAY = 1001  # the server drains
CLOSE_POLICY = 1008  # refused input, where no HTTP answer can be sent
CLOSE_LOG_CUT = 4409  # a repair cut the log below what was sent (409 ``log_cut`` over HTTP)
CLOSE_REASON_BYTES_MAX = 123  # RFC 6455: a close frame's reason fits in 123 bytes
_FILTERS = ("tenant_id", "entity_id", "event_type", "event_type_prefix")
_encoder = msgspec.json.Encoder()


def parse_subscription(websocket: WebSocket, node: Node) -> tuple[QueryFilter, ResumePoint]:
    """The filter and the position to resume after; InvalidParameter for anything off,
    LogCut for a resume position this node's log does not hold."""
    limits = node.limits
    params = websocket.query_params
    unknown = sorted(set(params.keys()) - {"from_lsn", "from_position", "last_event_id", *_FILTERS})
    if unknown:
        raise InvalidParameter(
            f"unknown query parameters {', '.join(unknown)} for {STREAM_PATH}",
            field=unknown[0],
            unknown=unknown,
        )
    text = params.get("from_lsn", "1")
    if not (text.isascii() and text.isdigit()) or int(text) > LSN_MAX:
        raise InvalidParameter(f"from_lsn must be an lsn 0..{LSN_MAX}", field="from_lsn")
    point = ResumePoint(max(int(text), 1) - 1)
    header = websocket.headers.get("last-event-id", params.get("last_event_id"))
    if header is not None:
        point = parse_last_event_id(header.strip())
        check_resume(node, point)  # ``from_lsn`` is where to start, not what was had
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
    return flt, point


def cut_reason(error: LogCut) -> str:
    """The close reason of a cut stream: ``log_cut kept_lsn=K`` (what fits in a close frame)."""
    kept = error.details.get("kept_lsn")
    reason = f"log_cut kept_lsn={kept}" if kept is not None else f"log_cut {error.message}"
    return reason.encode()[:CLOSE_REASON_BYTES_MAX].decode(errors="ignore")


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
        cuts_seen = node.store.cuts.seq  # before the check: a cut from here on is seen
        try:
            flt, point = parse_subscription(websocket, node)
            flt = scope_filter(principal_of(websocket.scope), flt)
            subscriptions.admit()
        except WalshipError as exc:
            await _refuse(websocket, exc)
            return
        await websocket.accept()

        async def send_events() -> CutNotice | None:
            async with contextlib.aclosing(subscriptions.pages(flt, point, cuts_seen)) as pages:
                async for events in pages:
                    if isinstance(events, CutNotice):
                        return events
                    if isinstance(events, SharedPage):  # the live tail: JSON encoded once
                        for data in events.jsons():
                            await websocket.send_text(data.decode())
                        continue
                    assert isinstance(events, list)  # frame pages are for SSE streams only
                    for ev in events:  # an empty page: the server's pings keep it alive
                        await websocket.send_text(_encoder.encode(to_out(ev)).decode())
            return None

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
                cut = sender.result()  # a send to a client that left: nothing more to do
                if cut is None:
                    await websocket.close(CLOSE_GOING_AWAY)
                else:
                    await websocket.close(CLOSE_LOG_CUT, cut_reason(cut.error))
