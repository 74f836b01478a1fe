"""The HTTP API of a node (AllSource-compatible paths) on FastAPI, with msgspec on the hot paths.

Write routes take the raw ``Request`` and hand the body to ``writes.py`` (msgspec decoding,
then the node's ``write_path``: ``Store.submit``, WAL future, acknowledgement); by default
``WriteFastLane`` answers those two paths before FastAPI's routing. Because the write routes
declare no body parameter, their request and response schemas are generated from the msgspec
types (``wire.py``) and placed under ``#/components/schemas`` by an ``app.openapi`` override.

Reads that can take long (query, entity state, stats) run in the thread pool so the event loop
keeps accepting writes meanwhile.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures at run
# time, and their ``Query`` bounds refer to the node's limits in the enclosing function.
import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from fastapi import Depends, FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from walship import __version__
from walship.apikeys import Role
from walship.errors import Forbidden, InvalidParameter, NotReady, ValidationError
from walship.events import (
    BatchIn,
    EventIn,
    parse_timestamp,
    to_out,
    to_plain,
)
from walship.http.auth import (
    Authenticator,
    AuthSettings,
    check_tenant,
    install_auth,
    principal_of,
    require_classified,
    scoped_tenants,
)
from walship.http.consumers import add_consumer_routes, check_position_params
from walship.http.errors import ErrorBody, install_error_handlers
from walship.http.media import Media, response_media
from walship.http.openapi_security import describe_security
from walship.http.params import reject_unknown_params
from walship.http.stream import add_stream_routes
from walship.http.ui import add_ui_routes
from walship.http.websocket import add_websocket_route
from walship.http.writes import (
    BATCH_PATH,
    EVENTS_PATH,
    BodyFormat,
    WriteFastLane,
    answer_batch,
    answer_event,
    receive_body,
    requested_ack_mode,
)
from walship.limits import LSN_MAX, Limits
from walship.node import HealthStatus, Node
from walship.peers import split_urls
from walship.readiness import readiness
from walship.replication.lostfound import SummaryCache
from walship.storage.query import QueryFilter
from walship.storage.tenant_stats import tenant_counts
from walship.wire import BatchReceipts, EntityState, QueryPage, Receipt

_SCHEMA_TYPES = (EventIn, BatchIn, Receipt, BatchReceipts, QueryPage, EntityState, ErrorBody)
_REF_TEMPLATE = "#/components/schemas/{name}"
_JSON = "application/json"
_encoder = msgspec.json.Encoder()


def _ref(name: str) -> dict[str, Any]:
    return {"schema": {"$ref": _REF_TEMPLATE.format(name=name)}}


def _request_body(name: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {_JSON: _ref(name)}}}


def _responses(name: str | None, description: str = "OK") -> dict[int | str, dict[str, Any]]:
    ok: dict[str, Any] = {"description": description}
    if name is not None:
        ok["content"] = {_JSON: _ref(name)}
    error = {
        "description": "Error: `error` code, `message`, details",
        "content": {_JSON: _ref("ErrorBody")},
    }
    return {200: ok, "default": error}


def _json(content: bytes, status: int = 200) -> Response:
    return Response(content, status_code=status, media_type=_JSON)


def _time_param(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_timestamp(text, name)
    except ValidationError as exc:
        raise InvalidParameter(exc.message, field=name) from exc


def create_app(
    node: Node, *, write_fast_lane: bool = True, auth: AuthSettings | None = None
) -> FastAPI:
    """The FastAPI application serving ``node``; it does not close the node.

    ``write_fast_lane`` serves the append paths ahead of FastAPI's routing (same answers).
    ``auth``: how requests authenticate (default: ``--auth none``, admin routes behind the
    node's admin token); see ``http/auth.py``.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await node.start()  # replication runs on the server's event loop
        try:
            yield
        finally:
            await node.stop()

    app = FastAPI(
        title="walship",
        version=__version__,
        summary="A replicated event store: durable WAL, shipped to followers, Parquet history.",
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_params)],
        # Swagger UI and ReDoc load their scripts from a CDN: blank without internet. /docs is
        # walship's own page (http/ui.py); the schema stays at /openapi.json
        docs_url=None,
        redoc_url=None,
    )
    app.state.node = node
    if write_fast_lane:
        app.add_middleware(WriteFastLane, node=node)
    # after the fast lane (middleware added later runs first): every request is authorized
    install_auth(app, Authenticator(auth or AuthSettings(), node.config.admin_token))
    install_error_handlers(app)  # after: its catch-all must wrap the fast lane too
    _add_write_routes(app, node)
    _add_read_routes(app, node)
    # after the query route: /events/{id} must not shadow it
    add_websocket_route(app, add_stream_routes(app, node))
    add_consumer_routes(app, node)
    _add_ops_routes(app, node)
    _add_admin_routes(app, node)
    add_ui_routes(app)
    require_classified(app.routes)
    _install_openapi(app, node.limits)
    return app


def _add_write_routes(app: FastAPI, node: Node) -> None:
    bytes_max = node.limits.request_bytes_max

    async def body_of(request: Request) -> bytes:
        data = await receive_body(request.scope, request.receive, bytes_max)
        if data is None:
            raise ClientDisconnect
        return data

    @app.post(
        EVENTS_PATH,
        summary="Append one event",
        description="Answers with a durability receipt once the WAL holds the event. An event "
        "whose `id` is already stored is answered with its original receipt (`duplicate`).",
        openapi_extra={**_request_body("EventIn"), **_ACK_PARAMETERS},
        responses=_responses("Receipt"),
    )
    async def append_event(request: Request) -> Response:
        ack = requested_ack_mode(request.scope)
        body_format = BodyFormat.of(request.scope)
        principal = principal_of(request.scope)
        content = await answer_event(node, await body_of(request), principal, ack, body_format)
        return Response(content, media_type=body_format.response.value)

    @app.post(
        BATCH_PATH,
        summary="Append a batch of events, all or nothing",
        description="A bad event anywhere stores nothing; the error names its `index`.",
        openapi_extra={**_request_body("BatchIn"), **_ACK_PARAMETERS},
        responses=_responses("BatchReceipts"),
    )
    async def append_batch(request: Request) -> Response:
        ack = requested_ack_mode(request.scope)
        body_format = BodyFormat.of(request.scope)
        principal = principal_of(request.scope)
        content = await answer_batch(node, await body_of(request), principal, ack, body_format)
        return Response(content, media_type=body_format.response.value)


_MinLsn = Annotated[
    int | None,
    Query(
        ge=0,
        le=LSN_MAX,
        description="Wait until this node has applied this lsn before reading "
        "(read-your-writes on a follower)",
    ),
]
_MinLsnWait = Annotated[
    int, Query(ge=0, description="How long to wait for `min_lsn`, in ms (504 when it expires)")
]
_FromPosition = Annotated[
    int | None,
    Query(ge=0, le=LSN_MAX, description="Lowest tenant position, inclusive (needs tenant_id)"),
]
_ToPosition = Annotated[
    int | None,
    Query(ge=0, le=LSN_MAX, description="Highest tenant position, inclusive (needs tenant_id)"),
]
_ACK_PARAMETERS: dict[str, Any] = {
    "parameters": [
        {
            "name": "ack_mode",
            "in": "query",
            "required": False,
            "description": "A stricter acknowledgement mode for this write: semi-sync, "
            "quorum:N or sync (also the X-Walship-Ack-Mode header). A weaker one is ignored.",
            "schema": {"type": "string"},
        }
    ]
}


def _add_read_routes(app: FastAPI, node: Node) -> None:
    store = node.store
    limits = node.limits

    @app.get(
        "/api/v1/events/query",
        summary="Query events in lsn order",
        responses=_responses("QueryPage"),
    )
    async def query_events(
        request: Request,
        entity_id: Annotated[str | None, Query(description="Only this entity")] = None,
        event_type: Annotated[str | None, Query(description="Only this event type")] = None,
        event_type_prefix: Annotated[
            str | None, Query(description="Only event types that start with this")
        ] = None,
        tenant_id: Annotated[
            str | None, Query(description="Only this tenant (default when entity_id is given)")
        ] = None,
        since: Annotated[str | None, Query(description="ISO 8601 time, inclusive")] = None,
        until: Annotated[str | None, Query(description="ISO 8601 time, exclusive")] = None,
        from_lsn: Annotated[int, Query(ge=0, le=LSN_MAX, description="Lowest lsn, inclusive")] = 1,
        to_lsn: Annotated[
            int | None, Query(ge=0, le=LSN_MAX, description="Highest lsn, inclusive")
        ] = None,
        limit: Annotated[
            int, Query(ge=1, le=limits.query_limit_max, description="Events per page")
        ] = limits.query_limit_default,
        cursor: Annotated[
            str | None, Query(max_length=32, description="`next_cursor` of the previous page")
        ] = None,
        from_position: _FromPosition = None,
        to_position: _ToPosition = None,
        min_lsn: _MinLsn = None,
        min_lsn_wait_ms: _MinLsnWait = 5_000,
    ) -> Response:
        check_position_params(tenant_id, from_position, to_position)
        principal = principal_of(request.scope)
        tenants = scoped_tenants(principal, tenant_id)
        if tenant_id is None and tenants is not None and (len(tenants) == 1 or entity_id):
            # a key of one tenant reads that one; an entity lives in one tenant ("default"
            # unless named), which the key must cover
            tenant_id = next(iter(tenants)) if len(tenants) == 1 else "default"
            check_tenant(principal, tenant_id)
        if min_lsn is not None:
            await node.wait_visible(min_lsn, min_lsn_wait_ms)
        flt = QueryFilter(
            tenant_id=tenant_id,
            tenant_ids=tenants if tenant_id is None else None,
            entity_id=entity_id,
            event_type=event_type,
            event_type_prefix=event_type_prefix,
            since_us=_time_param(since, "since"),
            until_us=_time_param(until, "until"),
            from_lsn=max(from_lsn, 1),
            to_lsn=to_lsn,
            from_position=from_position,
            to_position=to_position,
        )

        media = response_media(request.scope["headers"])

        def run() -> bytes:
            result = store.query(flt, limit, cursor)
            if media is Media.MSGPACK:
                plain = [to_plain(ev) for ev in result.events]
                return media.encode(
                    {"events": plain, "next_cursor": result.next_cursor, "count": len(plain)}
                )
            events = [to_out(ev) for ev in result.events]
            return _encoder.encode(QueryPage(events, result.next_cursor, len(events)))

        return Response(await run_in_threadpool(run), media_type=media.value)

    @app.get(
        "/api/v1/entities/{entity_id:path}/state",
        summary="An entity's state: its payloads merged in lsn order",
        description="JSON objects merge key by key; any other payload replaces the state. "
        "404 when the entity has no events (up to `as_of`/`as_of_lsn`).",
        responses=_responses("EntityState"),
    )
    async def entity_state(
        request: Request,
        entity_id: str,
        tenant_id: Annotated[str, Query(description="The entity's tenant")] = "default",
        as_of: Annotated[
            str | None, Query(description="ISO 8601 time: state as of then (inclusive)")
        ] = None,
        as_of_lsn: Annotated[
            int | None, Query(ge=0, le=LSN_MAX, description="State as of this lsn (inclusive)")
        ] = None,
        min_lsn: _MinLsn = None,
        min_lsn_wait_ms: _MinLsnWait = 5_000,
    ) -> Response:
        scoped_tenants(principal_of(request.scope), tenant_id)
        if min_lsn is not None:
            await node.wait_visible(min_lsn, min_lsn_wait_ms)
        as_of_us = _time_param(as_of, "as_of")
        state = await run_in_threadpool(
            store.entity_state, entity_id, tenant_id, as_of_us, as_of_lsn
        )
        media = response_media(request.scope["headers"])
        if media is Media.MSGPACK:  # bytes are msgpack's own bin: no encoding to name
            state = msgspec.structs.replace(state, state_encoding=None)
        return Response(media.encode(state), media_type=media.value)

    @app.get(
        "/api/v1/stats",
        summary="Store statistics: the node's, or some tenants'",
        description="An admin key of every tenant (or `--auth none`) gets the node's figures. "
        "Any other key, or `tenant_id`, gets `tenants`: the events and entities of each of the "
        "key's tenants (or of `tenant_id`), beside the node's id, term and lsns; never another "
        "tenant's figures or name. A key of every tenant without the admin role must name one.",
        responses=_responses(None),
    )
    async def stats(
        request: Request,
        tenant_id: Annotated[
            str | None,
            Query(
                max_length=limits.tenant_id_chars_max,
                description="Only this tenant's figures (it must be one of the key's)",
            ),
        ] = None,
    ) -> Response:
        principal = principal_of(request.scope)
        if tenant_id is None and principal.tenants is None:
            if not principal.may(Role.ADMIN):
                raise Forbidden(
                    f"{principal.name} has role {principal.role}: the node's figures need "
                    "an admin key of every tenant; name tenant_id=T for one tenant's",
                    needs=str(Role.ADMIN),
                )
            body = await run_in_threadpool(store.stats)
            subscriptions = app.state.subscriptions
            body["subscriptions"] = subscriptions.open  # open event streams (SSE)
            # how many follow the live tail, and how often one fell behind it
            body["subscriptions_live"] = subscriptions.tail.live
            body["subscriptions_fell_behind"] = subscriptions.tail.fell_behind
            return _json(_encoder.encode(body))
        tenants = scoped_tenants(principal, tenant_id)
        assert tenants is not None  # a tenant named, or the key's own
        counts = await run_in_threadpool(tenant_counts, store.read_view(), sorted(tenants))
        # lsns and the term are in every receipt and event too: nothing of another tenant's
        body = {
            "node_id": node.node_id,
            "term": store.log.current_term.value,
            "last_lsn": store.last_position.lsn.value,
            "visible_lsn": store.visible_lsn,
            "tenants": counts,
        }
        return _json(_encoder.encode(body))


def _add_ops_routes(app: FastAPI, node: Node) -> None:
    registry = node.store.metrics.registry

    @app.get(
        "/health",
        summary="Health, role and log position",
        description="`status`: `healthy`, `not_ready` (still 200; `not_ready` lists why) or "
        "`unhealthy` (503: the WAL cannot be written). The detail for people and tools, not a "
        "readiness check: a load balancer asks `/health/ready` (503 while not ready).",
        responses=_responses(None),
    )
    async def health() -> Response:
        body = node.health()
        status = 503 if body["status"] == HealthStatus.UNHEALTHY else 200
        return _json(_encoder.encode(body), status)

    @app.get(
        "/health/live",
        summary="Liveness: 200 whenever the process serves HTTP",
        responses=_responses(None),
    )
    async def live() -> Response:
        return _json(_encoder.encode({"live": True, "node_id": node.node_id, "role": node.role}))

    @app.get(
        "/health/ready",
        summary="Readiness for a load balancer: 200 only when this node can do its job",
        description="A leader: not fenced, holding its etcd lease (if any), with the followers "
        "in sync its ack mode needs. A follower: connected, within --max-lag-ms. Otherwise 503 "
        "`not_ready` with the `reasons`.",
        responses=_responses(None),
    )
    async def ready() -> Response:
        reasons = readiness(node)
        term = node.store.log.current_term.value
        about = {"node_id": node.node_id, "role": node.role, "term": term}
        if not reasons:
            return _json(_encoder.encode({"ready": True, **about, "reasons": []}))
        error = NotReady(f"{node.node_id} is not ready: " + "; ".join(reasons))
        body = {**error.to_dict(), "ready": False, **about, "reasons": reasons}
        return _json(_encoder.encode(body), error.http_status)

    @app.get(
        "/api/v1/replication/degraded",
        summary="The degradation ledger: writes at risk",
        description="Lsn ranges committed without the acknowledgements their mode required "
        "(answered `degraded`) that are still *at risk*: fewer followers than the leader's "
        "ack mode asks for hold them, so they are lost with the leader. With `all=true`, "
        "every range, each with its `state` (`at_risk` or `since_replicated`) and, once "
        "replicated, when (`replicated_ts_us`) and to whom (`replicated_to`). `writes` counts "
        "the listed ranges' writes; `at_risk` and `total` count the whole ledger. Empty on a "
        "follower.",
        responses=_responses(None),
    )
    async def degraded(
        all_ranges: Annotated[
            bool,
            Query(alias="all", description="Every range, the since-replicated ones too"),
        ] = False,
    ) -> Response:
        ranges = node.degraded_ranges(at_risk_only=not all_ranges)
        every = ranges if all_ranges else node.degraded_ranges()
        risky = [r for r in every if r["state"] == "at_risk"]

        def writes(rs: list[dict[str, object]]) -> int:
            return sum(int(str(r["writes"])) for r in rs)

        body = {
            "ranges": ranges,
            "writes": writes(ranges),
            "at_risk": {"writes": writes(risky), "ranges": len(risky)},
            "total": {"writes": writes(every), "ranges": len(every)},
        }
        return _json(_encoder.encode(body))

    lost_found = SummaryCache(node.config.data_dir)
    lost_found_lock = asyncio.Lock()  # one reader of the files at a time, the cache with it

    @app.get(
        "/api/v1/replication/lost-found",
        summary="Lost-and-found files",
        description="The newest files of records divergence repair cut from this node's log "
        "(`lost_found_files_listed_max` of them): name, size, records, lsn range, terms and how "
        "the records were acknowledged. `walship lost-found export` reads the records.",
        responses=_responses(None),
    )
    async def lost_and_found() -> Response:
        count_max = node.limits.lost_found_files_listed_max
        async with lost_found_lock:
            files, total = await run_in_threadpool(lost_found.newest, count_max)
        return _json(_encoder.encode({"files": files, "total_files": total}))

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
    )
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _add_admin_routes(app: FastAPI, node: Node) -> None:
    @app.post(
        "/internal/promote",
        summary="Promote this follower to leader of a new term (admin token)",
        description="Stops following, starts a new term, listens for followers, then accepts "
        "writes. 409 when the node is still connected to its leader, or a peer is a live "
        "leader or further ahead, unless `force`; 409 when it cannot prove it holds every "
        "write answered `replicated` (a member of the last in-sync set does not answer, or "
        "it lacks that set's lsn), unless `unclean` or `force`. The answer's `unclean` says "
        "what such a promotion may have lost.",
        responses=_responses(None),
    )
    async def promote(
        force: Annotated[bool, Query(description="Skip the safety checks")] = False,
        unclean: Annotated[
            bool,
            Query(description="Promote although writes answered `replicated` may be lost"),
        ] = False,
        peers: Annotated[
            str | None,
            Query(description="Comma-separated URLs of the other nodes (default: --peers)"),
        ] = None,
    ) -> Response:
        answer = await node.promote(
            force=force, unclean=unclean, peers=None if peers is None else split_urls(peers)
        )
        return _json(_encoder.encode(answer))

    @app.post(
        "/internal/forget-follower",
        summary="Forget a departed follower and release the WAL kept for it (admin token)",
        description="On the leader: drop the retention slot of `node_id`, so the WAL it still "
        "needed is removed at the next checkpoint. 409 while that follower is connected or on "
        "a node that does not lead, 404 when the leader knows no such follower.",
        responses=_responses(None),
    )
    async def forget_follower(
        node_id: Annotated[str | None, Query(description="The follower's node id")] = None,
    ) -> Response:
        if not node_id:
            raise InvalidParameter("forget-follower needs ?node_id=NAME", field="node_id")
        return _json(_encoder.encode(node.forget_follower(node_id)))

    @app.post(
        "/internal/checkpoint",
        summary="Write the memtable to a Parquet part now (admin token)",
        description="On any node: every event visible when the request arrived is in the "
        "Parquet history (readable through `walship sql` and `walship.history`) when it is "
        "answered. `part` is null when there was nothing new to write.",
        responses=_responses(None),
    )
    async def checkpoint() -> Response:
        return _json(_encoder.encode(await run_in_threadpool(node.checkpoint)))

    @app.post(
        "/internal/repoint",
        summary="Follow another leader (admin token)",
        description="On a follower: switch to the leader at `leader`. On a leader: stop taking "
        "writes and follow `leader`; a tail it does not have goes to lost-and-found.",
        responses=_responses(None),
    )
    async def repoint(
        leader: Annotated[
            str | None, Query(description="The new leader's replication HOST:PORT")
        ] = None,
    ) -> Response:
        if not leader:
            raise InvalidParameter("repoint needs ?leader=HOST:PORT", field="leader")
        return _json(_encoder.encode(await node.repoint(leader)))


def _describe_event_rules(event_in: dict[str, Any], limits: Limits) -> None:
    """Add the event model's rules (checked in ``events.prepare``) to the EventIn schema."""
    props = event_in["properties"]
    props["tenant_id"].update(
        pattern=f"^[A-Za-z0-9_-]{{1,{limits.tenant_id_chars_max}}}$",
    )
    props["entity_id"].update(
        minLength=1,
        maxLength=limits.entity_id_chars_max,
        description="Not blank, no control characters.",
    )
    props["event_type"].update(
        pattern=r"^(?!_system\.)[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$",
        maxLength=limits.event_type_chars_max,
        description="Topic names such as `bank.domain:Account.Opened`. No leading or trailing "
        "'.', no '..'; the `_system.` prefix is reserved.",
    )
    props["payload"]["description"] = (
        f"Any JSON value, at most {limits.payload_bytes_max} bytes as sent; with "
        '`payload_encoding: "base64"` a string of the base64 of binary bytes (at most '
        f"{limits.payload_bytes_max} of them). A msgpack body (`Content-Type: "
        "application/msgpack`) may send those bytes as a `bin` value instead."
    )
    props["payload_encoding"].update(
        enum=["json", "base64"],
        description="How `payload` is given: a JSON value, or the base64 of bytes.",
    )
    props["metadata"] = {
        "anyOf": [{"type": "object"}, {"type": "null"}],
        "default": None,
        "description": f"A JSON object of at most {limits.metadata_bytes_max} bytes, or null.",
    }
    props["id"]["description"] = "Client-chosen UUID; repeating it returns the original receipt."
    props["expected_version"]["anyOf"][0]["minimum"] = 0
    props["expected_version"]["description"] = "Refuse (409) unless the entity is at this version."


def _install_openapi(app: FastAPI, limits: Limits) -> None:
    """Serve an OpenAPI schema that also holds the msgspec types the raw handlers use."""
    _, components = msgspec.json.schema_components(_SCHEMA_TYPES, ref_template=_REF_TEMPLATE)
    _describe_event_rules(components["EventIn"], limits)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            describe_security(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
