"""The HTTP answers are defined once (``walship.wire``) and their JSON does not move.

The server encodes the wire types and the client decodes them into subclasses of the same
types; the pinned bytes below are the JSON the routes sent before the types were shared, so a
field renamed, reordered, added or dropped on either side fails here.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from walship import client, wire
from walship.http import create_app
from walship.node import Node, NodeConfig
from walship.wal import FsyncPolicy

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette suggests httpx2; TestClient works the same
    from fastapi.testclient import TestClient

RECEIPT = wire.Receipt("e1", 5, 2, 1, "2026-12-03T10:00:00.000001Z", "replicated", 2, ["f1"])
TRACKING = wire.TrackingReceipt("projector", "default", 7, 6, 2, "local", 0, [], True)
EVENT = wire.EventOut(
    "e1",
    "default",
    "order-1",
    "order.placed",
    msgspec.Raw(b'{"total":42}'),
    msgspec.Raw(b'{"by":"me"}'),
    "2026-12-03T10:00:00.000001Z",
    1,
    5,
    2,
    3,
)
BINARY_EVENT = wire.EventOut(
    "e2", "t1", "blob-1", "blob.put", msgspec.Raw(b'"AAE="'), None, "t", 1, 6, 2, 0, "base64"
)

EVENT_JSON = (
    b'{"id":"e1","tenant_id":"default","entity_id":"order-1","event_type":"order.placed",'
    b'"payload":{"total":42},"metadata":{"by":"me"},"timestamp":"2026-12-03T10:00:00.000001Z",'
    b'"version":1,"lsn":5,"term":2,"position":3}'
)
BINARY_EVENT_JSON = (
    b'{"id":"e2","tenant_id":"t1","entity_id":"blob-1","event_type":"blob.put","payload":"AAE=",'
    b'"metadata":null,"timestamp":"t","version":1,"lsn":6,"term":2,"position":0,'
    b'"payload_encoding":"base64"}'
)
RECEIPT_JSON = (
    b'{"event_id":"e1","lsn":5,"term":2,"version":1,"timestamp":"2026-12-03T10:00:00.000001Z",'
    b'"durability":"replicated","required":2,"acked_by":["f1"],"duplicate":false,"position":0}'
)
TRACKING_JSON = (
    b'{"consumer":"projector","tenant_id":"default","position":7,"lsn":6,"term":2,'
    b'"durability":"local","required":0,"acked_by":[],"duplicate":true}'
)

# (value the server builds, the JSON it sends, the client type that reads it)
PINNED: list[tuple[msgspec.Struct, bytes, type[msgspec.Struct] | None]] = [
    (RECEIPT, RECEIPT_JSON, client.AppendReceipt),
    (TRACKING, TRACKING_JSON, None),
    (
        wire.BatchReceipts([RECEIPT], 1, 5, 5),
        b'{"receipts":[' + RECEIPT_JSON + b'],"count":1,"first_lsn":5,"last_lsn":5}',
        client.BatchReceipt,
    ),
    (
        wire.BatchReceipts([], 0, 6, 6, TRACKING),
        b'{"receipts":[],"count":0,"first_lsn":6,"last_lsn":6,"tracking":' + TRACKING_JSON + b"}",
        client.BatchReceipt,
    ),
    (EVENT, EVENT_JSON, client.Event),
    (BINARY_EVENT, BINARY_EVENT_JSON, client.Event),
    (
        wire.QueryPage([EVENT, BINARY_EVENT], "c2", 2),
        b'{"events":[' + EVENT_JSON + b"," + BINARY_EVENT_JSON + b'],"next_cursor":"c2","count":2}',
        client.QueryPage,
    ),
    (
        wire.QueryPage([], None, 0),
        b'{"events":[],"next_cursor":null,"count":0}',
        client.QueryPage,
    ),
    (
        wire.EntityEvents("default", "order-1", 3, "backward", [EVENT], 1, None),
        b'{"tenant_id":"default","entity_id":"order-1","version":3,"direction":"backward",'
        b'"events":[' + EVENT_JSON + b'],"count":1,"next_version":null}',
        client.EntityEventsPage,
    ),
    (
        wire.EntityVersion("default", "order-1", 0),
        b'{"tenant_id":"default","entity_id":"order-1","version":0}',
        None,
    ),
    (
        wire.EntityState("default", "order-1", 2, {"total": 42}, 5, "t", 2),
        b'{"tenant_id":"default","entity_id":"order-1","version":2,"state":{"total":42},'
        b'"last_lsn":5,"updated":"t","events":2}',
        client.EntityStateResult,
    ),
    (
        wire.EntityState("t1", "blob-1", 1, "AAE=", 6, None, 1, "base64"),
        b'{"tenant_id":"t1","entity_id":"blob-1","version":1,"state":"AAE=","last_lsn":6,'
        b'"updated":null,"events":1,"state_encoding":"base64"}',
        client.EntityStateResult,
    ),
    (
        wire.TenantPosition("t1", 0, 0),
        b'{"tenant_id":"t1","position":0,"lsn":0}',
        client.TenantPositionResult,
    ),
    (
        wire.ConsumerAnswer("projector", "default", 7, 6),
        b'{"consumer":"projector","tenant_id":"default","position":7,"lsn":6}',
        client.ConsumerPositionResult,
    ),
]


@pytest.mark.parametrize(("value", "expected", "reader"), PINNED)
def test_wire_json_is_pinned_and_the_client_reads_it(
    value: msgspec.Struct, expected: bytes, reader: type[msgspec.Struct] | None
) -> None:
    assert msgspec.json.encode(value) == expected
    if reader is not None:
        decoded = msgspec.json.decode(expected, type=reader)
        assert isinstance(decoded, type(value)), "the client type is a subclass of the wire type"


def test_client_types_are_the_wire_types() -> None:
    """Every client answer type inherits its fields from the wire type and adds none."""
    pairs = {
        client.AppendReceipt: wire.Receipt,
        client.BatchReceipt: wire.BatchReceipts,
        client.Event: wire.EventOut,
        client.QueryPage: wire.QueryPage,
        client.EntityEventsPage: wire.EntityEvents,
        client.EntityStateResult: wire.EntityState,
        client.TenantPositionResult: wire.TenantPosition,
        client.ConsumerPositionResult: wire.ConsumerAnswer,
    }
    for mine, theirs in pairs.items():
        assert issubclass(mine, theirs)
        assert mine.__struct_fields__ == theirs.__struct_fields__, mine
        assert mine.__struct_config__.frozen, f"{mine.__name__}: the client's answers are frozen"


def test_client_reads_values_as_before() -> None:
    """What the client's subclasses change: decoded payloads, bytes back from base64, a dict
    for a batch's tracking, 0 for a position an older server did not send."""
    page = msgspec.json.decode(
        b'{"events":[' + EVENT_JSON + b"," + BINARY_EVENT_JSON + b'],"next_cursor":"c2","count":2}',
        type=client.QueryPage,
    )
    first, binary = page.events
    assert isinstance(first, client.Event)
    assert (first.payload, first.metadata, first.position) == ({"total": 42}, {"by": "me"}, 3)
    assert binary.payload == b"\x00\x01"
    old = msgspec.json.decode(EVENT_JSON.replace(b',"position":3', b""), type=client.Event)
    assert old.position == 0
    batch = msgspec.json.decode(
        b'{"receipts":[],"count":0,"first_lsn":6,"last_lsn":6,"tracking":' + TRACKING_JSON + b"}",
        type=client.BatchReceipt,
    )
    assert batch.tracking == msgspec.json.decode(TRACKING_JSON)
    receipt = msgspec.json.decode(RECEIPT_JSON, type=client.AppendReceipt)
    assert (receipt.durability, receipt.acked_by, receipt.required) == ("replicated", ["f1"], 2)
    state = msgspec.json.decode(
        b'{"tenant_id":"t1","entity_id":"b","version":1,"state":"AAE=","last_lsn":6,'
        b'"updated":null,"events":1,"state_encoding":"base64"}',
        type=client.EntityStateResult,
    )
    assert state.state == b"\x00\x01"
    # the client's values keep every field when turned back into builtins, as they did
    assert msgspec.to_builtins(old)["payload_encoding"] is None
    with pytest.raises(AttributeError):
        receipt.lsn = 1  # type: ignore[misc]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    node = Node.open(
        NodeConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never"), checkpoints=False)
    )
    try:
        with TestClient(create_app(node)) as http:
            yield http
    finally:
        node.close()


def test_routes_answer_exactly_the_wire_encoding(api: TestClient) -> None:
    """Each route's JSON is the wire type's encoding of itself: same keys, same order, the same
    fields left out."""
    event_id = str(uuid.uuid4())
    bodies: list[tuple[bytes, type[msgspec.Struct]]] = []

    def answer(response: Any, kind: type[msgspec.Struct]) -> Any:
        assert response.status_code == 200, response.text
        bodies.append((response.content, kind))
        return msgspec.json.decode(response.content)

    answer(
        api.post(
            "/api/v1/events",
            json={"id": event_id, "entity_id": "o-1", "event_type": "o.placed", "payload": {}},
        ),
        wire.Receipt,
    )
    answer(
        api.post(
            "/api/v1/events/batch",
            json={
                "events": [{"entity_id": "o-1", "event_type": "o.paid", "payload": [1]}],
                "tracking": {"consumer": "c1", "position": 1},
            },
        ),
        wire.BatchReceipts,
    )
    answer(api.get("/api/v1/events/query"), wire.QueryPage)
    answer(api.get(f"/api/v1/events/{event_id}"), wire.EventOut)
    answer(api.get("/api/v1/entities/o-1/events"), wire.EntityEvents)
    answer(api.get("/api/v1/entities/o-1/version"), wire.EntityVersion)
    answer(api.get("/api/v1/entities/o-1/state"), wire.EntityState)
    answer(api.get("/api/v1/tenants/default/position"), wire.TenantPosition)
    answer(api.get("/api/v1/consumers/c1"), wire.ConsumerAnswer)
    for content, kind in bodies:
        # the wire type, not a dict, round-trips the body: order and omissions are the type's
        # (a Raw payload keeps the stored JSON text as it was sent)
        raw_kind: Any = kind
        assert msgspec.json.encode(msgspec.json.decode(content, type=raw_kind)) == content, kind
