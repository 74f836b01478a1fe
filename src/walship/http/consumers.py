"""The consumer side of the HTTP API: tenant positions and consumers' tracked positions.

A consumer commits its position with the batch of results it wrote (``tracking`` in the batch
body, see ``writes.py``); ``GET /api/v1/consumers/{name}?tenant_id=`` answers where it is, on
the leader and on followers (from what they applied).

A tenant's position is the gapless count of its events (assigned by the leader, stored in the
record); ``GET /api/v1/tenants/{tenant_id}/position`` answers the last one visible on this
node. Queries and subscriptions by position (``from_position``/``to_position``) count within
one tenant, so they need ``tenant_id``: ``check_position_params`` says so before anything runs.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from fastapi import FastAPI, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from walship.errors import InvalidParameter, NotFound
from walship.events import validate_consumer_name, validate_tenant_id
from walship.http.auth import check_tenant, principal_of
from walship.limits import LSN_MAX
from walship.node import Node
from walship.wire import ConsumerAnswer, TenantPosition

_JSON = "application/json"
_encoder = msgspec.json.Encoder()

TENANT_POSITION_PATH = "/api/v1/tenants/{tenant_id}/position"
CONSUMER_PATH = "/api/v1/consumers/{name}"


# read-your-writes on a follower, as the other read routes take it (a client that wrote on the
# leader sends the lsn of its last write with every read it sends elsewhere)
_MinLsn = Annotated[
    int | None,
    Query(ge=0, le=LSN_MAX, description="Wait until this node has applied this lsn"),
]
_MinLsnWait = Annotated[int, Query(ge=0, description="How long to wait for `min_lsn`, in ms")]


def check_position_params(
    tenant_id: str | None, from_position: int | None, to_position: int | None
) -> None:
    """InvalidParameter (400) for positions without a tenant or out of range."""
    if from_position is None and to_position is None:
        return
    if tenant_id is None:
        raise InvalidParameter(
            "from_position/to_position count within one tenant: name tenant_id too",
            field="tenant_id",
        )
    for name, value in (("from_position", from_position), ("to_position", to_position)):
        if value is not None and not 0 <= value <= LSN_MAX:
            raise InvalidParameter(f"{name} must be 0..{LSN_MAX}", field=name)


def _json(body: bytes) -> Response:
    return Response(body, media_type=_JSON)


def add_consumer_routes(app: FastAPI, node: Node) -> None:
    """The tenant position and consumer routes."""
    store = node.store
    limits = node.limits

    @app.get(
        CONSUMER_PATH,
        summary="A consumer's last tracked position",
        description="The position the consumer last committed with a batch's `tracking` "
        "(stored in the same atomic append as the batch's events), as this node has applied "
        "it; followers answer too (with `min_lsn`, once they have applied that lsn). 404 "
        "when the consumer has tracked nothing in the tenant.",
        responses={200: {"description": "OK"}, 404: {"description": "Unknown consumer"}},
    )
    async def consumer_position(
        request: Request,
        name: str,
        tenant_id: Annotated[str, Query(description="The consumer's tenant")] = "default",
        min_lsn: _MinLsn = None,
        min_lsn_wait_ms: _MinLsnWait = 5_000,
    ) -> Response:
        validate_consumer_name(name, limits, "name")
        validate_tenant_id(tenant_id)
        check_tenant(principal_of(request.scope), tenant_id)
        if min_lsn is not None:
            await node.wait_visible(min_lsn, min_lsn_wait_ms)
        found = store.consumer_position(tenant_id, name)
        if found is None:
            raise NotFound(
                f"consumer {name!r} has tracked no position in tenant {tenant_id!r} here",
                consumer=name,
                tenant_id=tenant_id,
            )
        return _json(
            _encoder.encode(
                ConsumerAnswer(found.consumer, found.tenant_id, found.position, found.lsn)
            )
        )

    @app.get(
        TENANT_POSITION_PATH,
        summary="A tenant's last position visible on this node",
        description="Positions are gapless per tenant (1, 2, 3 ...), assigned by the leader "
        "and the same on every node. `position` 0: no event of the tenant is visible here.",
        responses={200: {"description": "OK"}},
    )
    async def tenant_position(
        request: Request,
        tenant_id: str,
        min_lsn: _MinLsn = None,
        min_lsn_wait_ms: _MinLsnWait = 5_000,
    ) -> Response:
        validate_tenant_id(tenant_id)
        check_tenant(principal_of(request.scope), tenant_id)
        if min_lsn is not None:
            await node.wait_visible(min_lsn, min_lsn_wait_ms)
        position, lsn = await run_in_threadpool(store.tenant_position, tenant_id)
        return _json(_encoder.encode(TenantPosition(tenant_id, position, lsn)))
