"""Who may call which route: authentication and the role each route needs, in one place.

``ROUTE_ACCESS`` classifies every route of the app by ``"METHOD path"``; ``install_auth``
refuses to build an app with a route that is missing from it, so a new route cannot ship
without a decision (tests/test_http_auth.py walks the OpenAPI schema against it too).

``AuthMiddleware`` runs ahead of everything else (also ahead of the write fast lane): it finds
the request's route, reads the credentials (``Authorization: Bearer …`` with an API key, a JWT
(``jwtauth.py``) or the admin token, or ``X-API-Key``),
answers 401 (none, or unknown) or 403 (a role below the route's) itself, and leaves the
``Principal`` in the ASGI scope. Handlers then narrow to the principal's tenants
(``principal_of``, ``check_tenant``, ``scoped_tenants``): a write for a tenant the key does not
cover is refused whole, an unscoped query is filtered to the key's tenants, a query or state
read naming another tenant is refused.

With ``--auth none`` requests without credentials act as an anonymous principal with every
tenant and role, except on the routes marked ``credentials_always`` (the admin routes, which
need the admin token or an admin key as before). Credentials that are given are checked in
either mode. Nothing here logs or echoes a presented secret.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from walship.apikeys import ApiKeyRing, Principal, Role, split_key
from walship.errors import Forbidden, RateLimited, Unauthorized, WalshipError
from walship.http.errors import encode_error
from walship.http.ratelimit import RateLimiter, RateLimits
from walship.jwtauth import JwtVerifier
from walship.storage.query import QueryFilter


class TenantScope(enum.Enum):
    """How a route narrows what it touches to the principal's tenants."""

    NONE = "none"  # nothing tenant-specific, or the role already covers every tenant
    BODY = "body"  # every event of the body must be in a tenant of the key
    FILTER = "filter"  # ``tenant_id`` checked; unscoped reads filtered to the key's tenants


@dataclass(frozen=True, slots=True)
class RouteAccess:
    """What a route needs: ``role`` None means open to anyone (health, API docs)."""

    role: Role | None
    tenants: TenantScope = TenantScope.NONE
    credentials_always: bool = False  # even with --auth none (the admin routes)
    tenants_all: bool = False  # a tenant-scoped key is refused (node-wide answers)


OPEN = RouteAccess(None)
_ADMIN = RouteAccess(Role.ADMIN, tenants_all=True)
_INTERNAL = RouteAccess(Role.ADMIN, credentials_always=True, tenants_all=True)
_UNCLASSIFIED = _INTERNAL

ROUTE_ACCESS: dict[str, RouteAccess] = {
    # data
    "POST /api/v1/events": RouteAccess(Role.WRITE, TenantScope.BODY),
    "POST /api/v1/events/batch": RouteAccess(Role.WRITE, TenantScope.BODY),
    "GET /api/v1/events/query": RouteAccess(Role.READ, TenantScope.FILTER),
    "GET /api/v1/entities/{entity_id:path}/state": RouteAccess(Role.READ, TenantScope.FILTER),
    "GET /api/v1/entities/{entity_id:path}/events": RouteAccess(Role.READ, TenantScope.FILTER),
    "GET /api/v1/entities/{entity_id:path}/version": RouteAccess(Role.READ, TenantScope.FILTER),
    "GET /api/v1/events/{event_id}": RouteAccess(Role.READ, TenantScope.FILTER),
    # the SSE stream and the WebSocket on the same path (a WebSocket counts as GET)
    "GET /api/v1/events/stream": RouteAccess(Role.READ, TenantScope.FILTER),
    # the tenant is in the path and checked against the key (a consumer's tenant: its query)
    "GET /api/v1/tenants/{tenant_id}/position": RouteAccess(Role.READ, TenantScope.FILTER),
    "GET /api/v1/consumers/{name}": RouteAccess(Role.READ, TenantScope.FILTER),
    # the node's figures for an admin key of every tenant, else those of the key's tenants
    "GET /api/v1/stats": RouteAccess(Role.READ, TenantScope.FILTER),
    # node-wide numbers: operators only
    "GET /api/v1/replication/degraded": _ADMIN,
    "GET /api/v1/replication/lost-found": _ADMIN,
    "GET /metrics": _ADMIN,
    # load balancers and peers (promotion compares positions) must reach these unauthenticated
    "GET /health": OPEN,
    "GET /health/live": OPEN,
    "GET /health/ready": OPEN,
    # the API's description and the pages (static files; the data they show comes from the
    # routes above, each with its own rule) are public
    "GET /openapi.json": OPEN,
    "GET /docs": OPEN,
    "GET /": OPEN,
    "GET /ui": OPEN,
    # admin
    "POST /internal/promote": _INTERNAL,
    "POST /internal/forget-follower": _INTERNAL,
    "POST /internal/checkpoint": _INTERNAL,
    "POST /internal/repoint": _INTERNAL,
}
"""Every route, by ``"METHOD path"`` as FastAPI declares it. Add a route here when adding it."""

METRICS_KEY = "GET /metrics"
ANONYMOUS = Principal("anonymous", Role.ADMIN, None, anonymous=True)
ADMIN_TOKEN = Principal("admin token", Role.ADMIN, None)
PRINCIPAL_KEY = "walship.principal"
API_KEY_HEADER = b"x-api-key"
_TENANT_SHOWN_CHARS = 80
_WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="walship"')


def route_path(scope: Scope) -> str:
    """The path the app routes on: without the ``root_path`` it is mounted under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def route_methods(route: BaseRoute) -> list[str]:
    """The methods a route answers, HEAD folded into GET."""
    methods = getattr(route, "methods", None) or {"GET"}
    return sorted(m for m in methods if m != "HEAD" or "GET" not in methods)


def flat_routes(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(method, path)`` of every route, routers included with ``include_router`` opened up
    (FastAPI keeps those as one wrapper route); a route whose path cannot be seen yields
    ``<its type>``, which no rule names, so it is refused rather than let through."""
    for route in routes:
        path = getattr(route, "path", None)
        inner = getattr(route, "original_router", None)
        if isinstance(path, str) and not hasattr(route, "routes"):
            for method in route_methods(route):
                yield method, prefix + path
        elif inner is not None and isinstance(getattr(inner, "routes", None), list):
            context = getattr(route, "include_context", None)
            yield from flat_routes(inner.routes, prefix + str(getattr(context, "prefix", "")))
        else:
            yield "*", f"<{type(route).__name__} {path or ''}>"


def access_keys(routes: Iterable[BaseRoute]) -> list[str]:
    """``"METHOD path"`` of every route (the keys ``ROUTE_ACCESS`` must have)."""
    return [f"{method} {path}" for method, path in flat_routes(routes)]


def unclassified(routes: Iterable[BaseRoute]) -> list[str]:
    return [key for key in access_keys(routes) if key not in ROUTE_ACCESS]


@dataclass(frozen=True)
class AuthSettings:
    """How a node authenticates HTTP requests (``--auth``, ``--api-keys-file``)."""

    required: bool = False
    keys: ApiKeyRing | None = None
    jwt: JwtVerifier | None = None
    rate_limits: RateLimits = field(default_factory=RateLimits)
    metrics_role: Role | None = Role.ADMIN  # --metrics-auth: None opens /metrics to scrapers


class Authenticator:
    """Credentials → Principal, against the key ring and the node's admin token."""

    def __init__(self, settings: AuthSettings, admin_token: str | None) -> None:
        self.required = settings.required
        self.keys = settings.keys
        self.jwt = settings.jwt
        self.overrides: dict[str, RouteAccess] = {}
        if settings.metrics_role != Role.ADMIN:
            role = settings.metrics_role
            self.overrides[METRICS_KEY] = (
                OPEN if role is None else RouteAccess(role, tenants_all=True)
            )
        limits = settings.rate_limits
        self.limiter = RateLimiter(limits) if limits.enabled else None
        self._admin_token = admin_token.encode() if admin_token else None

    def _credential(self, scope: Scope) -> str | None:
        bearer = api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, rest = bytes(value).decode("latin-1").partition(" ")
                if scheme.lower() != "bearer":
                    raise Unauthorized("Authorization must use the Bearer scheme")
                bearer = rest.strip()
            elif name == API_KEY_HEADER:
                api_key = bytes(value).decode("latin-1").strip()
        if bearer is not None and api_key is not None and bearer != api_key:
            raise Unauthorized("give one credential: Authorization or X-API-Key, not both")
        return bearer if bearer is not None else api_key

    def authenticate(self, scope: Scope) -> Principal | None:
        """The principal of the request's credentials; None when it has none.

        Unauthorized when credentials are given but match nothing."""
        given = self._credential(scope)
        if given is None:
            return None
        if self.jwt is not None and given.count(".") == 2:
            return self.jwt.verify(given)
        if split_key(given) is not None:
            found = self.keys.verify(given) if self.keys is not None else None
            if found is None:
                raise Unauthorized("unknown or revoked API key")
            return found
        if self._admin_token is not None and hmac.compare_digest(given.encode(), self._admin_token):
            return ADMIN_TOKEN
        if self._admin_token is None and self.keys is None and self.jwt is None:
            raise Unauthorized(
                "this node accepts no credentials: it was started without an admin token "
                "(--admin-token-file or WALSHIP_ADMIN_TOKEN) and without --api-keys-file"
            )
        raise Unauthorized("the credential matches no API key and is not the admin token")

    def authorize(self, scope: Scope, access: RouteAccess) -> Principal:
        """The principal allowed to take this route; Unauthorized or Forbidden otherwise."""
        principal = self.authenticate(scope)
        if access.role is None:
            return principal or ANONYMOUS
        if principal is None:
            if not self.required and not access.credentials_always:
                return ANONYMOUS
            raise Unauthorized(self._missing_message(access))
        if not principal.may(access.role):
            raise Forbidden(
                f"{principal.name} has role {principal.role}; this needs {access.role}",
                role=str(principal.role),
                needs=str(access.role),
            )
        if access.tenants_all and principal.tenants is not None:
            raise Forbidden(
                f"{principal.name} is limited to some tenants; this answers for every tenant",
                needs="tenants *",
            )
        return principal

    def _missing_message(self, access: RouteAccess) -> str:
        if access.credentials_always and self._admin_token is None and self.keys is None:
            return (
                "admin endpoints are disabled on this node: it was started without an admin "
                "token (--admin-token-file or WALSHIP_ADMIN_TOKEN) or API keys"
            )
        return (
            f"this needs credentials with role {access.role}: Authorization: Bearer KEY "
            "or X-API-Key: KEY"
        )


class AuthMiddleware:
    """Authenticate and authorize every HTTP request by its route (see the module)."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], auth: Authenticator) -> None:
        self.app = app
        self.routes = routes  # the router's own list, read at the first request
        self.auth = auth
        self._exact: dict[tuple[str, str], RouteAccess] | None = None
        self._templated: list[tuple[re.Pattern[str], str, RouteAccess]] = []

    def _build(self) -> dict[tuple[str, str], RouteAccess]:
        exact: dict[tuple[str, str], RouteAccess] = {}
        for method, path in flat_routes(self.routes):
            # a route without a rule cannot be built (require_classified); should one appear
            # anyway, it is closed to all but admins rather than open
            key = f"{method} {path}"
            access = self.auth.overrides.get(key) or ROUTE_ACCESS.get(key, _UNCLASSIFIED)
            if "{" in path:
                self._templated.append((compile_path(path)[0], method, access))
            else:
                exact[(method, path)] = access
        return exact

    def _access(self, scope: Scope) -> RouteAccess | None:
        if self._exact is None:
            self._exact = self._build()
        # a WebSocket upgrade is a GET; HEAD is answered by the GET route
        method = scope.get("method", "GET")
        method = "GET" if method == "HEAD" else method
        path = route_path(scope)
        found = self._exact.get((method, path))
        if found is not None:
            return found
        for pattern, route_method, access in self._templated:
            if route_method == method and pattern.match(path):
                return access
        return None  # no such route: routing answers 404/405

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        access = self._access(scope)
        try:
            if access is None:
                principal = self.auth.authenticate(scope) or ANONYMOUS
                if self.auth.required and principal.anonymous:
                    raise Unauthorized("this needs credentials")
            else:
                principal = self.auth.authorize(scope, access)
            limiter = self.auth.limiter
            if access is None or access.role is None or principal.anonymous:
                limiter = None  # health checks, 404s and --auth none callers: not limited
            if limiter is not None:
                limiter.admit(principal.name)  # before the body is read
        except WalshipError as exc:
            if scope["type"] == "websocket":
                await _refuse_websocket(exc, scope, receive, send)
            else:
                await _answer(exc, send)
            return
        scope[PRINCIPAL_KEY] = principal
        if limiter is None:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            limiter.release(principal.name)


async def _refuse_websocket(exc: WalshipError, scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse a WebSocket before it is accepted: the JSON error as an HTTP answer where the
    server can send one, else a close with code 1008 (the server answers the upgrade 403)."""
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        body = encode_error(exc)
        await send(
            {
                "type": "websocket.http.response.start",
                "status": exc.http_status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})


async def _answer(exc: WalshipError, send: Send) -> None:
    body = encode_error(exc)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if isinstance(exc, Unauthorized):
        headers.append(_WWW_AUTHENTICATE)
    if isinstance(exc, RateLimited):
        headers.append((b"retry-after", str(exc.details.get("retry_after_s", 1)).encode()))
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def principal_of(scope: Scope) -> Principal:
    """The principal AuthMiddleware left for this request; refuses when there is none (an
    app built without ``install_auth`` fails closed)."""
    principal = scope.get(PRINCIPAL_KEY)
    if not isinstance(principal, Principal):
        raise Forbidden("no authenticated principal for this request")
    return principal


def check_tenant(principal: Principal, tenant_id: str) -> None:
    """Forbidden unless the principal's tenants include ``tenant_id``."""
    if not principal.may_use(tenant_id):
        shown = tenant_id[:_TENANT_SHOWN_CHARS]  # it comes from the request: bounded
        raise Forbidden(
            f"{principal.name} may not use tenant {shown!r} "
            f"(it may use: {principal.describe_tenants()})",
            tenant_id=shown,
        )


def scoped_tenants(principal: Principal, tenant_id: str | None) -> frozenset[str] | None:
    """The tenants a read may see: ``tenant_id`` alone when given (checked), else the
    principal's (None: every tenant)."""
    if tenant_id is not None:
        check_tenant(principal, tenant_id)
        return frozenset((tenant_id,))
    return principal.tenants


def scope_filter(principal: Principal, flt: QueryFilter) -> QueryFilter:
    """``flt`` narrowed to the principal's tenants: Forbidden when it names another; an
    unscoped filter of a tenant-scoped principal keeps to its tenants."""
    tenants = scoped_tenants(principal, flt.tenant_id)
    if flt.tenant_id is not None or tenants is None:
        return flt
    if len(tenants) == 1:
        return dataclasses.replace(flt, tenant_id=next(iter(tenants)))
    return dataclasses.replace(flt, tenant_ids=tenants)


def install_auth(app: FastAPI, auth: Authenticator) -> None:
    """Put AuthMiddleware in front of the app's routes (it reads the router's list of routes
    when the first request comes, so routes added after this call are covered)."""
    app.add_middleware(AuthMiddleware, routes=app.router.routes, auth=auth)


def require_classified(routes: Iterable[BaseRoute]) -> None:
    """ValueError naming every route that has no entry in ``ROUTE_ACCESS``: an app with one
    is not built at all."""
    missing = unclassified(routes)
    if missing:
        raise ValueError(
            f"routes without an access rule in walship/http/auth.py ROUTE_ACCESS: {missing}"
        )
