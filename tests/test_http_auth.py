"""Every route of the HTTP API against every kind of credential (``--auth required``).

``CASES`` names each route's expected role and a request for tenant A's data, independently
of ``walship.http.auth.ROUTE_ACCESS``: a route that is missing here, or classified there more
loosely than here, fails. For each route: no credentials and unknown ones → 401; a key of
another tenant → 403 or an answer without a byte of tenant A's data; a role too low → 403;
the right key → the route's own answer.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from walship.apikeys import ApiKeyFile, ApiKeyRing, Role
from walship.http import create_app
from walship.http.auth import ROUTE_ACCESS, AuthSettings, access_keys
from walship.node import Node, NodeConfig
from walship.wal import FsyncPolicy

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

A, B = "acme", "globex"
SECRET_A = f"A-SECRET-{uuid.uuid4().hex}"  # in every event of tenant A: must never leak
ADMIN_TOKEN = "admin-token-for-auth-tests"
EVENT_ID_A = str(uuid.uuid4())  # the id of tenant A's first event
STREAM = "/api/v1/events/stream"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None


def _event(tenant: str, entity: str = "acct-1") -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "entity_id": entity,
        "event_type": "acct.credited",
        "payload": {"who": SECRET_A if tenant == A else "b-data"},
    }


@dataclass(frozen=True)
class RouteCase:
    """What a route needs and how to ask it for tenant A's data."""

    role: Role | None  # None: open to anyone
    requests: tuple[Request, ...]  # each one touches tenant A (or everything)
    ok: frozenset[int] = frozenset({200})  # the route's own answers with the right key
    streams: bool = False  # its 200 never ends: only the refusals are sent here


def _case(
    role: Role | None, *requests: Request, ok: tuple[int, ...] = (200,), streams: bool = False
) -> RouteCase:
    return RouteCase(role, requests, frozenset(ok), streams)


def _get(path: str, **params: Any) -> Request:
    return Request("GET", path, params)


def _post(path: str, body: Any = None, **params: Any) -> Request:
    return Request("POST", path, params, body)


CASES: dict[str, RouteCase] = {
    "POST /api/v1/events": _case(Role.WRITE, _post("/api/v1/events", _event(A))),
    "POST /api/v1/events/batch": _case(
        Role.WRITE,
        _post("/api/v1/events/batch", {"events": [_event(A, "acct-9"), _event(A, "acct-8")]}),
    ),
    "GET /api/v1/events/query": _case(
        Role.READ,
        _get("/api/v1/events/query"),  # unscoped: filtered to the key's tenants
        _get("/api/v1/events/query", tenant_id=A),
        _get("/api/v1/events/query", entity_id="acct-1", tenant_id=A),
        _get("/api/v1/events/query", event_type="acct.credited"),
    ),
    "GET /api/v1/entities/{entity_id:path}/state": _case(
        Role.READ, _get("/api/v1/entities/acct-1/state", tenant_id=A)
    ),
    "GET /api/v1/entities/{entity_id:path}/events": _case(
        Role.READ, _get("/api/v1/entities/acct-1/events", tenant_id=A)
    ),
    "GET /api/v1/entities/{entity_id:path}/version": _case(
        Role.READ, _get("/api/v1/entities/acct-1/version", tenant_id=A)
    ),
    "GET /api/v1/events/{event_id}": _case(Role.READ, _get(f"/api/v1/events/{EVENT_ID_A}")),
    # SSE (and the WebSocket on the same path): its answers are checked on a real server in
    # test_subscriptions_see_only_their_tenants
    "GET /api/v1/events/stream": _case(Role.READ, _get(STREAM, tenant_id=A), streams=True),
    "GET /api/v1/tenants/{tenant_id}/position": _case(
        Role.READ, _get(f"/api/v1/tenants/{A}/position")
    ),
    "GET /api/v1/consumers/{name}": _case(Role.READ, _get("/api/v1/consumers/proj", tenant_id=A)),
    # a key of other tenants gets its own tenants' figures (test_stats_of_a_scoped_key_...)
    "GET /api/v1/stats": _case(
        Role.READ, _get("/api/v1/stats"), _get("/api/v1/stats", tenant_id=A)
    ),
    "GET /api/v1/replication/degraded": _case(Role.ADMIN, _get("/api/v1/replication/degraded")),
    "GET /api/v1/replication/lost-found": _case(Role.ADMIN, _get("/api/v1/replication/lost-found")),
    "GET /metrics": _case(Role.ADMIN, _get("/metrics")),
    "GET /health": _case(None, _get("/health")),
    "GET /health/live": _case(None, _get("/health/live")),
    "GET /health/ready": _case(None, _get("/health/ready"), ok=(200, 503)),
    "GET /openapi.json": _case(None, _get("/openapi.json")),
    "GET /docs": _case(None, _get("/docs")),
    "GET /": _case(None, Request("GET", "/", {}), ok=(200, 307)),
    "GET /ui": _case(None, _get("/ui")),
    "POST /internal/checkpoint": _case(Role.ADMIN, _post("/internal/checkpoint")),
    "POST /internal/promote": _case(Role.ADMIN, _post("/internal/promote")),
    # the handler ran: it names the missing/unknown follower or the missing leader address
    "POST /internal/forget-follower": _case(
        Role.ADMIN, _post("/internal/forget-follower", node_id="nobody"), ok=(404, 409)
    ),
    "POST /internal/repoint": _case(Role.ADMIN, _post("/internal/repoint"), ok=(400,)),
}
"""Every route, by ``"METHOD path"``. A new route must be added here (and to ROUTE_ACCESS)."""


@dataclass
class Keys:
    read_a: str
    write_a: str
    admin_a: str  # admin role, but only tenant A: node-wide routes refuse it
    read_b: str
    write_b: str
    admin_b: str
    admin_all: str


def _make_keys(path: Path) -> Keys:
    f = ApiKeyFile(path)

    def make(role: Role, tenants: frozenset[str] | None) -> str:
        return f.create(role, tenants)[1]

    return Keys(
        read_a=make(Role.READ, frozenset({A})),
        write_a=make(Role.WRITE, frozenset({A})),
        admin_a=make(Role.ADMIN, frozenset({A})),
        read_b=make(Role.READ, frozenset({B})),
        write_b=make(Role.WRITE, frozenset({B, "initech"})),
        admin_b=make(Role.ADMIN, frozenset({B})),
        admin_all=make(Role.ADMIN, None),
    )


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return _make_keys(tmp_path / "keys.json")


@pytest.fixture(params=["fast-lane", "routed"])
def api(tmp_path: Path, keys: Keys, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    node = Node.open(
        NodeConfig(
            tmp_path / "data",
            fsync=FsyncPolicy.parse("never"),
            checkpoints=False,
            admin_token=ADMIN_TOKEN,
        )
    )
    auth = AuthSettings(required=True, keys=ApiKeyRing(tmp_path / "keys.json"))
    app = create_app(node, write_fast_lane=request.param == "fast-lane", auth=auth)
    try:
        with TestClient(app) as client:
            seed = [
                {**_event(A), "id": EVENT_ID_A},
                _event(A, "acct-2"),
                _event(B),
                _event(B, "b-2"),
            ]
            for ev in seed:
                r = client.post("/api/v1/events", json=ev, headers=_bearer(keys.admin_all))
                assert r.status_code == 200, r.text
            tracking = {"consumer": "proj", "position": 1, "tenant_id": A}
            r = client.post(
                "/api/v1/events/batch", json={"tracking": tracking}, headers=_bearer(keys.admin_all)
            )
            assert r.status_code == 200, r.text
            yield client
    finally:
        node.close()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _send(api: TestClient, req: Request, headers: dict[str, str]) -> httpx.Response:
    return api.request(req.method, req.path, params=req.params, json=req.json, headers=headers)


def _events_of(api: TestClient, tenant: str) -> int:
    r = api.get("/api/v1/events/query", params={"tenant_id": tenant}, headers=_bearer(ADMIN_TOKEN))
    assert r.status_code == 200, r.text
    return int(r.json()["count"])


def _right_key(keys: Keys, role: Role) -> str:
    return {Role.READ: keys.read_a, Role.WRITE: keys.write_a, Role.ADMIN: keys.admin_all}[role]


def _other_tenant_key(keys: Keys, role: Role) -> str:
    return {Role.READ: keys.read_b, Role.WRITE: keys.write_b, Role.ADMIN: keys.admin_b}[role]


def _assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"] == code, r.text
    assert SECRET_A not in r.text
    body: dict[str, Any] = r.json()
    return body


def test_every_route_has_a_case_and_an_access_rule(tmp_path: Path) -> None:
    """The app's routes and the OpenAPI schema's operations are all in CASES and in
    ROUTE_ACCESS, with the same role: a route added without a decision fails here."""
    node = Node.open(NodeConfig(tmp_path / "data", checkpoints=False))
    try:
        app = create_app(node)
        routes = set(access_keys(app.routes))
        schema = app.openapi()
    finally:
        node.close()
    assert routes == set(CASES), f"routes without a case: {routes - set(CASES)}"
    assert routes == set(ROUTE_ACCESS), f"stale or missing rules: {routes ^ set(ROUTE_ACCESS)}"
    in_schema = {
        f"{method.upper()} {path}" for path, ops in schema["paths"].items() for method in ops
    }
    schema_keys = {k.replace("{entity_id:path}", "{entity_id}") for k in CASES}
    assert in_schema <= schema_keys, in_schema - schema_keys
    for key, case in CASES.items():
        assert ROUTE_ACCESS[key].role == case.role, key


def test_an_app_with_an_unclassified_route_is_not_built(tmp_path: Path) -> None:
    """What happens when a branch adds a route without a rule: create_app refuses."""
    from fastapi import APIRouter

    from walship.http import app as app_module

    node = Node.open(NodeConfig(tmp_path / "data", checkpoints=False))
    original = app_module._add_admin_routes

    def with_extra(app: Any, node: Node) -> None:
        original(app, node)
        router = APIRouter()
        router.add_api_route("/api/v1/secret-export", lambda: {"all": "data"}, methods=["GET"])
        app.include_router(router)

    try:
        app_module._add_admin_routes = with_extra  # type: ignore[assignment]
        with pytest.raises(ValueError, match="GET /api/v1/secret-export"):
            create_app(node)
    finally:
        app_module._add_admin_routes = original  # type: ignore[assignment]
        node.close()


@pytest.mark.parametrize("route", sorted(CASES))
def test_route_answers_each_credential_as_its_role_and_tenants_say(
    api: TestClient, keys: Keys, route: str
) -> None:
    case = CASES[route]
    before = (_events_of(api, A), _events_of(api, B))
    for req in case.requests:
        if case.role is None:
            for headers in ({}, _bearer(keys.read_b)):
                r = _send(api, req, headers)
                assert r.status_code in case.ok, r.text
                assert SECRET_A not in r.text
            continue
        # no credentials, unknown ones, a revoked-looking id, a wrong scheme: 401
        _assert_error(_send(api, req, {}), 401, "unauthorized")
        for bad in ("wsk_000000000000_nothing", keys.read_a[:-2] + "xx", "not-a-key"):
            _assert_error(_send(api, req, _bearer(bad)), 401, "unauthorized")
            _assert_error(_send(api, req, {"X-API-Key": bad}), 401, "unauthorized")
        _assert_error(
            _send(api, req, {"Authorization": f"Basic {keys.admin_all}"}), 401, "unauthorized"
        )
        # a role below the route's: 403
        if case.role > Role.READ:
            _assert_error(_send(api, req, _bearer(keys.read_a)), 403, "forbidden")
        if case.role == Role.ADMIN:
            _assert_error(_send(api, req, _bearer(keys.write_a)), 403, "forbidden")
            # admin of one tenant only: node-wide routes refuse it
            _assert_error(_send(api, req, _bearer(keys.admin_a)), 403, "forbidden")
        # a key of another tenant: refused, or answered without tenant A's data
        if case.streams:
            other = _send(api, req, {"X-API-Key": _other_tenant_key(keys, case.role)})
            _assert_error(other, 403, "forbidden")  # it names tenant A
            continue
        other = _send(api, req, {"X-API-Key": _other_tenant_key(keys, case.role)})
        assert other.status_code in (200, 403, 404), other.text
        assert SECRET_A not in other.text
        if other.status_code == 200:
            assert A not in other.text, "an answer to another tenant's key names tenant A"
        if other.status_code == 404:  # as if it did not exist
            assert other.json()["error"] == "not_found" and A not in other.text
        if other.status_code == 403:
            assert other.json()["error"] == "forbidden"
        # the right key, in either header
        right = _right_key(keys, case.role)
        for headers in (_bearer(right), {"X-API-Key": right}):
            r = _send(api, req, headers)
            assert r.status_code in case.ok, r.text
    after = (_events_of(api, A), _events_of(api, B))
    # each write request was sent twice with the right key (two headers), never otherwise
    writes = 0
    if case.role == Role.WRITE:
        writes = 2 * sum(len(r.json.get("events", [r.json])) for r in case.requests)
    assert after[1] == before[1], "a refused write for another tenant stored something"
    assert after[0] - before[0] == writes, "only the right key's writes are stored"


def test_a_tracking_needs_write_on_its_tenant(api: TestClient, keys: Keys) -> None:
    """A key may commit a consumer position only in a tenant it writes: events of its own
    tenant with another tenant's tracking store nothing."""
    mine = [_event(B, "b-9")]
    for key, tenant in ((keys.write_b, A), (keys.read_a, A)):
        body = {"events": mine, "tracking": {"consumer": "c", "position": 5, "tenant_id": tenant}}
        r = api.post("/api/v1/events/batch", json=body, headers=_bearer(key))
        _assert_error(r, 403, "forbidden")
    assert _events_of(api, B) == 2
    r = api.get("/api/v1/consumers/c", params={"tenant_id": A}, headers=_bearer(keys.read_a))
    _assert_error(r, 404, "not_found")
    body = {"events": mine, "tracking": {"consumer": "c", "position": 5, "tenant_id": B}}
    assert api.post("/api/v1/events/batch", json=body, headers=_bearer(keys.write_b)).is_success


def test_scoped_reads_see_only_their_tenants(api: TestClient, keys: Keys) -> None:
    r = api.get("/api/v1/events/query", headers=_bearer(keys.read_b))
    assert r.status_code == 200, r.text
    assert {e["tenant_id"] for e in r.json()["events"]} == {B}
    r = api.get("/api/v1/events/query", headers=_bearer(keys.read_a))
    assert {e["tenant_id"] for e in r.json()["events"]} == {A}
    # a key of two tenants: both, nothing else; naming a third is refused
    api.post("/api/v1/events", json=_event("initech"), headers=_bearer(keys.write_b))
    r = api.get("/api/v1/events/query", headers=_bearer(keys.write_b))
    assert {e["tenant_id"] for e in r.json()["events"]} == {B, "initech"}
    r = api.get("/api/v1/events/query", params={"tenant_id": A}, headers=_bearer(keys.write_b))
    _assert_error(r, 403, "forbidden")
    # an entity of tenant A read with B's key, with or without naming the tenant
    r = api.get("/api/v1/entities/acct-1/state", headers=_bearer(keys.read_b))
    _assert_error(r, 403, "forbidden")
    r = api.get(
        "/api/v1/entities/acct-1/state", params={"tenant_id": B}, headers=_bearer(keys.read_b)
    )
    assert r.status_code == 200 and r.json()["tenant_id"] == B
    # a key of every tenant sees all
    r = api.get("/api/v1/events/query", headers=_bearer(keys.admin_all))
    assert {e["tenant_id"] for e in r.json()["events"]} == {A, B, "initech"}


def test_stats_of_a_scoped_key_are_its_tenants_figures_only(api: TestClient, keys: Keys) -> None:
    """A key of some tenants sees the events and entities of each of them, and neither the
    node's storage figures nor another tenant's name or numbers."""
    for _ in range(3):  # B: 2 seeded events of 2 entities, 3 more of one; initech: one
        api.post("/api/v1/events", json=_event(B, "b-3"), headers=_bearer(keys.write_b))
    api.post("/api/v1/events", json=_event("initech"), headers=_bearer(keys.write_b))
    r = api.get("/api/v1/stats", headers=_bearer(keys.write_b))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenants"] == {
        B: {"events": 5, "entities": 3},
        "initech": {"events": 1, "entities": 1},
    }
    assert body["last_lsn"] == body["visible_lsn"] >= 8  # and the seeded tracking record
    assert A not in r.text and "wal_bytes" not in body and "subscriptions" not in body
    # one of its tenants by name; another tenant's by name: refused
    r = api.get("/api/v1/stats", params={"tenant_id": B}, headers=_bearer(keys.read_b))
    assert r.json()["tenants"] == {B: {"events": 5, "entities": 3}}
    r = api.get("/api/v1/stats", params={"tenant_id": A}, headers=_bearer(keys.read_b))
    _assert_error(r, 403, "forbidden")
    # an admin key of one tenant is still one tenant's
    r = api.get("/api/v1/stats", headers=_bearer(keys.admin_a))
    assert r.json()["tenants"] == {A: {"events": 2, "entities": 2}}
    # the admin of every tenant: the node's figures, or one tenant's when it names it
    whole = api.get("/api/v1/stats", headers=_bearer(keys.admin_all)).json()
    assert whole["events"] == 8 and "wal_bytes" in whole
    r = api.get("/api/v1/stats", params={"tenant_id": A}, headers=_bearer(keys.admin_all))
    assert r.json()["tenants"] == {A: {"events": 2, "entities": 2}}
    r = api.get("/api/v1/stats", params={"tenant_id": "nobody"}, headers=_bearer(keys.admin_all))
    assert r.json()["tenants"] == {"nobody": {"events": 0, "entities": 0}}


def test_another_tenants_event_by_id_is_not_found(api: TestClient, keys: Keys) -> None:
    """A 403 would confirm the id exists, and the error named the tenant it is in."""
    r = api.get(f"/api/v1/events/{EVENT_ID_A}", headers=_bearer(keys.read_b))
    error = _assert_error(r, 404, "not_found")
    unknown = _assert_error(
        api.get(f"/api/v1/events/{uuid.uuid4()}", headers=_bearer(keys.read_b)), 404, "not_found"
    )
    assert set(error) == set(unknown) and A not in r.text
    r = api.get(f"/api/v1/events/{EVENT_ID_A}", headers=_bearer(keys.read_a))
    assert r.status_code == 200 and r.json()["tenant_id"] == A


def test_an_id_taken_by_another_tenant_is_refused_without_describing_its_event(
    api: TestClient, keys: Keys
) -> None:
    """The conflict names the stored event (tenant, entity, type, lsn) to its own tenant
    only: to another it says the id is taken, nothing more."""
    mine = {**_event(B, "b-9"), "id": EVENT_ID_A}
    for body, path in (
        (mine, "/api/v1/events"),
        ({"events": [_event(B, "b-8"), mine]}, "/api/v1/events/batch"),
    ):
        r = api.post(path, json=body, headers=_bearer(keys.write_b))
        error = _assert_error(r, 409, "id_conflict")
        assert error["event_id"] == EVENT_ID_A and "stored" not in error
        for told in (A, "acct-1", "acct.credited"):
            assert told not in r.text, told
    assert _events_of(api, B) == 2
    # the event's own tenant is told what is stored
    r = api.post(
        "/api/v1/events",
        json={**_event(A, "acct-5"), "id": EVENT_ID_A},
        headers=_bearer(keys.write_a),
    )
    error = _assert_error(r, 409, "id_conflict")
    assert error["stored"]["entity_id"] == "acct-1"


def test_the_admin_token_counts_as_admin(api: TestClient) -> None:
    for path in ("/api/v1/stats", "/metrics", "/api/v1/events/query"):
        assert api.get(path, headers=_bearer(ADMIN_TOKEN)).status_code == 200
    assert "wal_bytes" in api.get("/api/v1/stats", headers=_bearer(ADMIN_TOKEN)).json()
    assert api.post("/internal/checkpoint", headers=_bearer(ADMIN_TOKEN)).status_code == 200
    # but not through X-API-Key's sibling header with a different value
    r = api.get("/api/v1/stats", headers={**_bearer(ADMIN_TOKEN), "X-API-Key": "other"})
    _assert_error(r, 401, "unauthorized")


def test_errors_never_repeat_the_credential(api: TestClient, keys: Keys) -> None:
    wrong = keys.admin_all[:-4] + "abcd"
    for headers in (_bearer(wrong), {"X-API-Key": wrong}, _bearer("s3cr3t-token-guess")):
        r = api.get("/api/v1/stats", headers=headers)
        assert r.status_code == 401
        assert wrong not in r.text and wrong.split("_")[-1] not in r.text
        assert "s3cr3t" not in r.text
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_unknown_paths_need_credentials_too(api: TestClient, keys: Keys) -> None:
    _assert_error(api.get("/api/v1/nothing-here"), 401, "unauthorized")
    _assert_error(api.get("/api/v1/nothing-here", headers=_bearer(keys.read_a)), 404, "not_found")


def test_without_auth_data_routes_stay_open_and_admin_needs_credentials(tmp_path: Path) -> None:
    """``--auth none`` (the default): as before this change."""
    keys_file = tmp_path / "keys.json"
    keys = _make_keys(keys_file)
    node = Node.open(NodeConfig(tmp_path / "data", checkpoints=False, admin_token=ADMIN_TOKEN))
    auth = AuthSettings(required=False, keys=ApiKeyRing(keys_file))
    try:
        with TestClient(create_app(node, auth=auth)) as api:
            assert api.post("/api/v1/events", json=_event(A)).status_code == 200
            assert api.get("/api/v1/stats").status_code == 200
            _assert_error(api.post("/internal/checkpoint"), 401, "unauthorized")
            assert (
                api.post("/internal/checkpoint", headers=_bearer(keys.admin_all)).status_code == 200
            )
            # credentials that are given are checked, and scope what they may do
            _assert_error(
                api.get("/api/v1/stats", headers=_bearer("wsk_000000000000_x")), 401, "unauthorized"
            )
            r = api.post("/api/v1/events", json=_event(A), headers=_bearer(keys.write_b))
            _assert_error(r, 403, "forbidden")
    finally:
        node.close()


def test_credentials_are_checked_before_parameters(api: TestClient, keys: Keys) -> None:
    """Nothing about a route's parameters is told to a caller without credentials."""
    params = {"forse": "true"}
    _assert_error(api.post("/internal/promote", params=params), 401, "unauthorized")
    r = api.post("/internal/promote", params=params, headers=_bearer(ADMIN_TOKEN))
    _assert_error(r, 400, "invalid_parameter")
    assert r.json()["unknown"] == ["forse"]
    r = api.get("/api/v1/events/query", params={"as_of": "x"})
    _assert_error(r, 401, "unauthorized")
    r = api.get("/api/v1/events/query", params={"as_of": "x"}, headers=_bearer(keys.read_a))
    _assert_error(r, 400, "invalid_parameter")


def test_openapi_documents_the_security_schemes(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    query = schema["paths"]["/api/v1/events/query"]["get"]
    assert query["security"] and "401" in query["responses"] and "403" in query["responses"]
    assert schema["paths"]["/health"]["get"]["security"] == []


def test_a_batch_with_one_event_of_another_tenant_stores_nothing(
    api: TestClient, keys: Keys
) -> None:
    before = (_events_of(api, A), _events_of(api, B))
    batch = {"events": [_event(A, "acct-7"), _event(B, "b-7"), _event(A, "acct-6")]}
    r = api.post("/api/v1/events/batch", json=batch, headers=_bearer(keys.write_a))
    _assert_error(r, 403, "forbidden")
    assert r.json()["tenant_id"] == B
    assert (_events_of(api, A), _events_of(api, B)) == before


@pytest.mark.parametrize("metrics_role", [None, Role.READ])
def test_metrics_can_be_opened_to_a_scraper_or_a_read_key(
    tmp_path: Path, keys: Keys, metrics_role: Role | None
) -> None:
    """``--metrics-auth none|read``: the operator's choice for /metrics, nothing else."""
    read_all = ApiKeyFile(tmp_path / "keys.json").create(Role.READ, None)[1]
    node = Node.open(NodeConfig(tmp_path / "data", checkpoints=False))
    auth = AuthSettings(
        required=True, keys=ApiKeyRing(tmp_path / "keys.json"), metrics_role=metrics_role
    )
    try:
        with TestClient(create_app(node, auth=auth)) as api:
            bare = api.get("/metrics")
            if metrics_role is None:
                assert bare.status_code == 200 and "walship" in bare.text
            else:
                _assert_error(bare, 401, "unauthorized")
                _assert_error(api.get("/metrics", headers=_bearer(keys.read_a)), 403, "forbidden")
                assert api.get("/metrics", headers=_bearer(read_all)).status_code == 200
            _assert_error(api.get("/api/v1/stats"), 401, "unauthorized")
            # the node's figures need an admin key; one tenant's it may ask for
            r = api.get("/api/v1/stats", headers=_bearer(read_all))
            _assert_error(r, 403, "forbidden")
            r = api.get("/api/v1/stats", params={"tenant_id": B}, headers=_bearer(read_all))
            assert r.status_code == 200 and set(r.json()["tenants"]) == {B}
    finally:
        node.close()


def test_subscriptions_see_only_their_tenants(tmp_path: Path, keys: Keys) -> None:
    """SSE and WebSocket on a real server: no credentials refused, a tenant-scoped key's
    unscoped subscription gets its own tenant's events only, naming another tenant is 403."""
    import socket
    import threading

    import uvicorn

    from tests.sse_reader import SseReader
    from walship.http.server import NodeServer

    node = Node.open(NodeConfig(tmp_path / "data", checkpoints=False, admin_token=ADMIN_TOKEN))
    auth = AuthSettings(required=True, keys=ApiKeyRing(tmp_path / "keys.json"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(create_app(node, auth=auth), log_level="warning")
    server = NodeServer(config, lambda: None, node.end_subscriptions)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        batch = {"events": [_event(A), _event(B), _event(A, "acct-2"), _event(B, "b-2")]}
        r = httpx.post(f"{url}/api/v1/events/batch", json=batch, headers=_bearer(keys.admin_all))
        assert r.status_code == 200, r.text
        assert httpx.get(f"{url}{STREAM}").status_code == 401
        r = httpx.get(f"{url}{STREAM}", params={"tenant_id": A}, headers=_bearer(keys.read_b))
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        # a subscription of B's key: B's events only, tenant A's never
        reader = SseReader(f"{url}{STREAM}?from_lsn=1", headers={"X-API-Key": keys.read_b})
        try:
            got = reader.take(2, 15)
            assert {e["tenant_id"] for e in got} == {B}
            r = httpx.post(f"{url}/api/v1/events", json=_event(A), headers=_bearer(keys.write_a))
            assert r.status_code == 200
            r = httpx.post(f"{url}/api/v1/events", json=_event(B), headers=_bearer(keys.write_b))
            assert r.status_code == 200
            assert reader.take(1, 15)[0]["tenant_id"] == B  # the live A event was skipped
            assert reader.drain() == []
        finally:
            reader.close()
        # the WebSocket on the same path refuses the upgrade without credentials
        ws = httpx.get(
            f"{url}{STREAM}",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        assert ws.status_code == 401 and ws.json()["error"] == "unauthorized", ws.text
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        node.close()
