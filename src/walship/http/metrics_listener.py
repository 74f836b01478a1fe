"""The app of ``--metrics-listen``: ``GET /metrics`` alone, without credentials, on a port of
its own.

Prometheus scrapes without credentials as a rule, and opening ``/metrics`` on the API port
(``--metrics-auth none``) opens it wherever the API is reachable. A listener of its own lets an
operator put the scrape port on an internal address (or behind a firewall rule of its own)
while ``/metrics`` on the API port keeps needing its role. It serves nothing but the metrics,
which carry no tenant, key or event data (DESIGN §2.13): every other path is a 404, every
other method a 405, both with the API's JSON error body. A bare ASGI callable, no routing or
middleware: the scrape path costs what ``generate_latest`` costs.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from walship.errors import MethodNotAllowed, NotFound, WalshipError
from walship.http.errors import encode_error

METRICS_PATH = "/metrics"


def metrics_app(registry: CollectorRegistry) -> ASGIApp:
    """An ASGI app answering ``GET``/``HEAD /metrics`` from ``registry``, and nothing else."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan, no WebSocket
            return
        status, media_type, body = 200, CONTENT_TYPE_LATEST, b""
        error: WalshipError | None = None
        if scope["path"] != METRICS_PATH:
            error = NotFound(f"this is the metrics listener: only GET {METRICS_PATH} is here")
        elif scope["method"] not in ("GET", "HEAD"):
            error = MethodNotAllowed(f"{METRICS_PATH} answers GET only")
        if error is not None:
            status, media_type, body = error.http_status, "application/json", encode_error(error)
        else:
            body = generate_latest(registry)
        headers = [
            (b"content-type", media_type.encode()),
            (b"content-length", b"%d" % len(body)),
        ]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    return app
