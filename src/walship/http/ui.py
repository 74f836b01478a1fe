"""The pages a person opens in a browser: the status page at ``/ui`` (``/`` redirects there) and
the API reference at ``/docs``.

Both are single HTML files under ``pages/`` with their CSS and JavaScript inline, so a node on a
host without internet serves them whole: FastAPI's own ``/docs`` (Swagger UI) and ``/redoc``
load their scripts from a CDN and are turned off in ``create_app``. A Content-Security-Policy
lets the pages load nothing but themselves and talk to nothing but this node.

The routes are GET only and read nothing but the packaged files; the data comes from the
node's own read-only JSON endpoints, which the pages poll (``/health``,
``/api/v1/replication/degraded``, ``/api/v1/stats``, ``/metrics``, ``/openapi.json``).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from starlette.responses import HTMLResponse, RedirectResponse, Response

UI_PATH = "/ui"
DOCS_PATH = "/docs"
UI_ROUTES = ("/", UI_PATH, DOCS_PATH)
"""Every path this module serves (all GET, all read-only)."""

# inline <script>/<style> only; fetch() to this node only; no frames, forms or plugins
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def _page(name: str) -> bytes:
    return resources.files("walship.http").joinpath("pages", name).read_bytes()


def _html(body: bytes) -> Response:
    return HTMLResponse(
        body,
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


def add_ui_routes(app: FastAPI) -> None:
    """``GET /`` (307 to ``/ui``), ``GET /ui`` and ``GET /docs``; kept out of the OpenAPI
    schema, which describes the JSON API."""
    status_page, docs_page = _page("status.html"), _page("docs.html")

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse(UI_PATH, status_code=307)

    @app.get(UI_PATH, include_in_schema=False)
    async def ui() -> Response:
        return _html(status_page)

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs() -> Response:
        return _html(docs_page)
