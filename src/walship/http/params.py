"""Query parameters a route does not know are refused (400), never silently ignored.

A misspelt or unsupported parameter used to change nothing and answer as if it were absent:
``/api/v1/events/query?as_of=...`` returned the whole log, and ``?ackmode=sync`` on a write
would have given the server's weaker mode. Every FastAPI route checks its query string against
the parameters it declares (an app-wide dependency); the write fast lane, which bypasses
routing, checks against the one parameter the write routes take.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import HTTPConnection

from walship.errors import InvalidParameter

_allowed_by_route: dict[int, frozenset[str]] = {}


def _declared(route: APIRoute) -> frozenset[str]:
    """The query parameters ``route`` takes: its signature's and its OpenAPI extras'."""
    names: set[str] = set()
    todo: list[Dependant] = [route.dependant]
    while todo:  # the route's own parameters and its dependencies'
        dependant = todo.pop()
        names.update(p.alias for p in dependant.query_params)
        todo.extend(dependant.dependencies)
    extra = (route.openapi_extra or {}).get("parameters", [])
    names.update(p["name"] for p in extra if p.get("in") == "query")
    return frozenset(names)


def check_names(given: Iterable[str], allowed: frozenset[str], path: str) -> None:
    """InvalidParameter (400) naming every parameter in ``given`` that is not ``allowed``."""
    unknown = sorted(set(given) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise InvalidParameter(
            f"unknown query parameter{'s' * (len(unknown) > 1)} {', '.join(unknown)} for "
            f"{path} (it takes: {known})",
            field=unknown[0],
            unknown=unknown,
        )


async def reject_unknown_params(request: HTTPConnection) -> None:
    """App-wide dependency: 400 for a query parameter the matched route does not declare.

    Typed ``HTTPConnection`` so FastAPI can also run it for WebSocket routes (which check
    their own parameters before the upgrade: only HTTP routes are looked at here).
    """
    if not request.scope.get("query_string"):
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    allowed = _allowed_by_route.get(id(route))
    if allowed is None:
        allowed = _allowed_by_route[id(route)] = _declared(route)
    check_names(request.query_params.keys(), allowed, route.path)
