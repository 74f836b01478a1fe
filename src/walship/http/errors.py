"""Every HTTP error as JSON ``{"error": code, "message": ..., ...details}``.

WalshipError answers with its own class's status; FastAPI's parameter validation answers 400
``invalid_parameter``; Starlette's routing errors (404, 405) get error codes of the same tree;
anything else is logged and answered 500 ``internal`` by a middleware, so nothing escapes as
an HTML page or a dropped connection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from walship.errors import (
    InvalidInput,
    InvalidParameter,
    MethodNotAllowed,
    NotFound,
    WalshipError,
)

log = logging.getLogger(__name__)

_STATUS_ERRORS: dict[int, type[WalshipError]] = {
    404: NotFound,
    405: MethodNotAllowed,
}


class ErrorBody(msgspec.Struct):
    """Body of every error answer; details of the error appear as further fields."""

    error: str
    message: str


def _encode_fallback(value: object) -> object:
    # details are meant to be JSON values; anything else is shown, not allowed to crash
    return str(value)


def error_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        msgspec.json.encode(body, enc_hook=_encode_fallback),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def encode_error(exc: WalshipError) -> bytes:
    """The JSON body of an error answer; server-side failures (5xx) are also logged."""
    if exc.http_status >= 500:
        log.warning("answering %d: %s", exc.http_status, exc)
    return msgspec.json.encode(exc.to_dict(), enc_hook=_encode_fallback)


async def _on_walship_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WalshipError)
    return Response(encode_error(exc), status_code=exc.http_status, media_type="application/json")


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {
            "loc": [str(part) for part in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in exc.errors()
    ]
    first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
    field = first["loc"][-1] if first["loc"] else None
    message = f"{field}: {first['msg']}" if field else str(first["msg"])
    err = InvalidParameter(message, field=field, problems=problems)
    return error_response(err.http_status, err.to_dict())


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    cls = _STATUS_ERRORS.get(exc.status_code)
    if cls is not None:
        code = cls.code
        message = f"{request.method} {request.url.path}: {exc.detail}"
    else:
        code = InvalidInput.code if exc.status_code < 500 else WalshipError.code
        message = str(exc.detail)
    return error_response(exc.status_code, {"error": code, "message": message}, headers=exc.headers)


class CatchAllMiddleware:
    """Answer 500 ``internal`` (and log the traceback) for any exception no handler took."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except ClientDisconnect:
            return  # nobody is left to answer
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # too late for an error body; let the server drop the connection
            body = {"error": WalshipError.code, "message": "internal error; see the server log"}
            await error_response(500, body)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(WalshipError, _on_walship_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_middleware(CatchAllMiddleware)
