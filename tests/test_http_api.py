"""The HTTP API against a real store in a temporary directory (in-process ASGI, no sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
import warnings
from collections.abc import Iterator, MutableMapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest

from walship.errors import WalFailed
from walship.http import create_app
from walship.limits import Limits
from walship.node import Node, NodeConfig, Role
from walship.replication.config import ReplicationConfig
from walship.wal import FsyncPolicy
from walship.wal.log import WriteOutcome
from walship.write_path import wait_written

with warnings.catch_warnings():
    # starlette suggests httpx2; TestClient on httpx works the same for these tests
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

LIMITS = Limits(
    payload_bytes_max=1024,
    metadata_bytes_max=256,
    batch_events_max=5,
    request_bytes_max=16 * 1024,
    query_limit_default=20,
    query_limit_max=50,
)


def open_node(path: Path, fsync: str = "never") -> Node:
    return Node.open(
        NodeConfig(path, fsync=FsyncPolicy.parse(fsync), limits=LIMITS, checkpoints=False)
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = open_node(tmp_path / "data")
    try:
        yield n
    finally:
        n.close()


@pytest.fixture(params=["fast-lane", "routed"])
def api(node: Node, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """The app with and without its write fast lane: both must answer the same."""
    app = create_app(node, write_fast_lane=request.param == "fast-lane")
    with TestClient(app) as client:
        yield client


def event(entity: str = "order-1", etype: str = "order.placed", **kw: Any) -> dict[str, Any]:
    return {"entity_id": entity, "event_type": etype, "payload": kw.pop("payload", {"n": 1}), **kw}


def append(api: TestClient, **kw: Any) -> dict[str, Any]:
    response = api.post("/api/v1/events", json=event(**kw))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def store_position(api: TestClient) -> tuple[int, int]:
    stats = api.get("/api/v1/stats").json()
    return stats["last_lsn"], stats["events"]


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    return body


# ---------------------------------------------------------------- writes


def test_append_returns_receipt(api: TestClient) -> None:
    receipt = append(api)
    assert set(receipt) >= {"event_id", "lsn", "term", "version", "timestamp", "durability"}
    assert (receipt["lsn"], receipt["term"], receipt["version"]) == (1, 1, 1)
    uuid.UUID(receipt["event_id"])
    assert receipt["timestamp"].endswith("Z")
    assert receipt["duplicate"] is False
    # fsync "never" must not claim the write reached the disk
    assert receipt["durability"] == "buffered"


def test_receipt_says_local_only_when_fsynced(tmp_path: Path) -> None:
    with open_node(tmp_path / "d", fsync="always") as n, TestClient(create_app(n)) as api:
        assert append(api)["durability"] == "local"


def test_batch_returns_receipts_in_order(api: TestClient) -> None:
    events = [event("a"), event("b"), event("a")]
    body = api.post("/api/v1/events/batch", json={"events": events}).json()
    assert body["count"] == 3
    assert [r["lsn"] for r in body["receipts"]] == [1, 2, 3]
    assert [r["version"] for r in body["receipts"]] == [1, 1, 2]
    assert (body["first_lsn"], body["last_lsn"]) == (1, 3)


def test_metadata_object_or_null_is_stored_and_returned(api: TestClient) -> None:
    append(api, entity="m", metadata={"source": "web", "trace": [1, 2]})
    append(api, entity="m", metadata=None)
    events = api.get("/api/v1/events/query", params={"entity_id": "m"}).json()["events"]
    assert [ev["metadata"] for ev in events] == [{"source": "web", "trace": [1, 2]}, None]


BAD_EVENTS: list[tuple[str, Any, int, str]] = [
    ("tenant pattern", event(tenant_id="bad tenant!"), 422, "validation_error"),
    ("tenant empty", event(tenant_id=""), 422, "validation_error"),
    ("tenant too long", event(tenant_id="t" * 65), 422, "validation_error"),
    ("entity empty", event(entity=""), 422, "validation_error"),
    ("entity blank", event(entity="   "), 422, "validation_error"),
    ("entity too long", event(entity="e" * 129), 422, "validation_error"),
    ("entity NUL", event(entity="a\x00b"), 422, "validation_error"),
    ("entity newline", event(entity="a\nb"), 422, "validation_error"),
    ("type slash", event(etype="order/placed"), 422, "validation_error"),
    ("type space", event(etype="order placed"), 422, "validation_error"),
    ("type empty", event(etype=""), 422, "validation_error"),
    ("type too long", event(etype="t" * 257), 422, "validation_error"),
    ("type leading dot", event(etype=".placed"), 422, "validation_error"),
    ("type trailing dot", event(etype="order."), 422, "validation_error"),
    ("type double dot", event(etype="order..placed"), 422, "validation_error"),
    ("type reserved", event(etype="_system.term"), 422, "validation_error"),
    ("metadata array", event(metadata=[1, 2]), 422, "validation_error"),
    ("metadata string", event(metadata="x"), 422, "validation_error"),
    ("metadata number", event(metadata=5), 422, "validation_error"),
    ("metadata too big", event(metadata={"k": "v" * 300}), 413, "limit_exceeded"),
    ("payload too big", event(payload={"blob": "x" * 2000}), 413, "limit_exceeded"),
    ("payload missing", {"entity_id": "a", "event_type": "t"}, 422, "validation_error"),
    ("entity wrong type", {**event(), "entity_id": 5}, 422, "validation_error"),
    ("version wrong type", event(expected_version="1"), 422, "validation_error"),
    ("version negative", event(expected_version=-1), 422, "validation_error"),
    ("id not a uuid", event(id="not-a-uuid"), 422, "validation_error"),
    ("unknown field", event(colour="red"), 422, "validation_error"),
    ("array body", [event()], 422, "validation_error"),
]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [case[1:] for case in BAD_EVENTS],
    ids=[case[0] for case in BAD_EVENTS],
)
def test_invalid_event_is_refused_and_stores_nothing(
    api: TestClient, body: Any, status: int, code: str
) -> None:
    append(api)
    before = store_position(api)
    error = assert_error(api.post("/api/v1/events", json=body), status, code)
    assert store_position(api) == before
    if "field" in error:
        assert error["field"] in {
            "tenant_id", "entity_id", "event_type", "metadata", "payload", "expected_version"
        }  # fmt: skip
    # the same event inside a batch is refused the same way, naming its index
    if isinstance(body, dict):
        batch = {"events": [event("ok"), body]}
        error = assert_error(api.post("/api/v1/events/batch", json=batch), status, code)
        assert error.get("index") == 1 or "[1]" in error["message"]
        assert store_position(api) == before


_BAD_UTF8 = [
    ("payload value", b'{"entity_id":"a","event_type":"t","payload":{"x":"\xff"}}', "payload"),
    ("payload key", b'{"entity_id":"a","event_type":"t","payload":{"\xc3":1}}', "payload"),
    ("payload string", b'{"entity_id":"a","event_type":"t","payload":"ok \xc0\xaf"}', "payload"),
    (
        "encoded surrogate",
        b'{"entity_id":"a","event_type":"t","payload":["\xed\xa0\x80"]}',
        "payload",
    ),
    (
        "metadata value",
        b'{"entity_id":"a","event_type":"t","payload":1,"metadata":{"k":"\xfe"}}',
        "metadata",
    ),
]


@pytest.mark.parametrize(
    ("raw", "field"), [c[1:] for c in _BAD_UTF8], ids=[c[0] for c in _BAD_UTF8]
)
def test_invalid_utf8_inside_payload_or_metadata_is_refused_naming_the_field(
    api: TestClient, raw: bytes, field: str
) -> None:
    """One such event, once stored, made every checkpoint on every node fail for good."""
    append(api)
    before = store_position(api)
    error = assert_error(api.post("/api/v1/events", content=raw), 422, "validation_error")
    assert error["field"] == field and "UTF-8" in error["message"]
    batch = b'{"events":[' + raw + b"]}"
    error = assert_error(api.post("/api/v1/events/batch", content=batch), 422, "validation_error")
    assert error["field"] == field
    assert store_position(api) == before


_NUMBERS_PAST_A_DOUBLE = [
    ("exponent", b"1e999", "payload"),
    ("negative", b'{"a":[-1.8e308]}', "payload"),
    ("capital E", b'{"a":1E+400}', "payload"),
    ("digits", b'{"a":1' + b"0" * 400 + b"}", "payload"),
    ("digits and exponent", b'{"a":' + b"9" * 300 + b"e9}", "payload"),
    ("metadata", b'{"a":1e309}', "metadata"),
]


@pytest.mark.parametrize(
    ("value", "field"),
    [c[1:] for c in _NUMBERS_PAST_A_DOUBLE],
    ids=[c[0] for c in _NUMBERS_PAST_A_DOUBLE],
)
def test_a_number_past_the_range_of_a_double_is_refused_naming_the_field(
    api: TestClient, value: bytes, field: str
) -> None:
    """``1e999`` is JSON syntax but no reader can hold it: accepted, it made the entity's state
    answer 500 for ever (and an id retry of it compared as 500)."""
    append(api, entity="e")
    before = store_position(api)
    body = {"payload": value, "metadata": None}
    if field == "metadata":
        body = {"payload": b"{}", "metadata": value}
    raw = b'{"entity_id":"e","event_type":"t.a","payload":%s,"metadata":%s}' % (
        body["payload"],
        body["metadata"] or b"null",
    )
    error = assert_error(api.post("/api/v1/events", content=raw), 422, "validation_error")
    assert error["field"] == field and "range" in error["message"]
    error = assert_error(
        api.post("/api/v1/events/batch", content=b'{"events":[' + raw + b"]}"),
        422,
        "validation_error",
    )
    assert error["field"] == field
    assert store_position(api) == before
    assert api.get("/api/v1/entities/e/state").status_code == 200


@pytest.mark.parametrize(
    "value", [b"1e308", b"-1.7976931348623157e308", b"1e-999", b"12345678901234567890123"]
)
def test_numbers_a_double_holds_are_accepted(api: TestClient, value: bytes) -> None:
    raw = b'{"entity_id":"e","event_type":"t.a","payload":{"a":%s,"s":"1e999"}}' % value
    assert api.post("/api/v1/events", content=raw).status_code == 200
    assert api.get("/api/v1/entities/e/state").status_code == 200


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("role", [Role.LEADER, Role.FOLLOWER])
@pytest.mark.parametrize("where", ["payload", "metadata", "batch payload"])
def test_json_nested_thousands_deep_is_a_4xx_on_leaders_and_followers(
    tmp_path: Path, role: Role, where: str
) -> None:
    """msgspec gives up on such a body with a RecursionError, which was answered 500 (on
    followers too: the body is decoded before the role check)."""
    replication = ReplicationConfig(secret=b"s" * 16, leader="127.0.0.1:9")
    config = NodeConfig(
        tmp_path / "d", fsync=FsyncPolicy.parse("never"), limits=LIMITS, checkpoints=False
    )
    if role is Role.FOLLOWER:
        config = dataclasses.replace(config, role=role, replication=replication)
    deep = b"[" * 3_000 + b"]" * 3_000
    if where == "payload":
        path, raw = "/api/v1/events", b'{"entity_id":"a","event_type":"t","payload":' + deep + b"}"
    elif where == "metadata":
        raw = b'{"entity_id":"a","event_type":"t","payload":1,"metadata":' + deep + b"}"
        path = "/api/v1/events"
    else:
        path = "/api/v1/events/batch"
        raw = b'{"events":[{"entity_id":"a","event_type":"t","payload":' + deep + b"}]}"
    with Node.open(config) as n, TestClient(create_app(n)) as api:
        error = assert_error(api.post(path, content=raw), 422, "validation_error")
        assert "nested too deeply" in error["message"]
        assert api.get("/api/v1/stats").json()["last_lsn"] == 0
        # a merely deep one is stored and read back whole
        if role is Role.LEADER:
            fine = b'{"entity_id":"b","event_type":"t","payload":' + _nested(150) + b"}"
            assert api.post("/api/v1/events", content=fine).status_code == 200
            state = api.get("/api/v1/entities/b/state")
            assert state.status_code == 200 and '"a":{"a":' in state.text


def test_lone_surrogate_escapes_are_refused_and_pairs_kept(api: TestClient) -> None:
    lone = b'{"entity_id":"a","event_type":"t","payload":{"x":"\\udc80"}}'
    assert_error(api.post("/api/v1/events", content=lone), 400, "malformed_json")
    pair = b'{"entity_id":"s","event_type":"t","payload":{"x":"\\ud83d\\ude00 \xc3\xa9"}}'
    assert api.post("/api/v1/events", content=pair).status_code == 200
    events = api.get("/api/v1/events/query", params={"entity_id": "s"}).json()["events"]
    assert events[0]["payload"] == {"x": "\U0001f600 \u00e9"}


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b'{"entity_id": "a", "event_type":', 400, "malformed_json"),
        (b"not json at all", 400, "malformed_json"),
        (b"", 400, "malformed_json"),
        (b'{"events": []}', 400, "invalid_request"),
        (b'{"events": {}}', 422, "validation_error"),
        (b'{"evnts": []}', 422, "validation_error"),
        (b"[]", 422, "validation_error"),
    ],
)
def test_malformed_requests_are_refused_and_store_nothing(
    api: TestClient, raw: bytes, status: int, code: str
) -> None:
    append(api)
    before = store_position(api)
    path = "/api/v1/events/batch" if raw.startswith((b'{"ev', b"[")) else "/api/v1/events"
    assert_error(api.post(path, content=raw), status, code)
    assert store_position(api) == before


@pytest.mark.parametrize(
    ("path", "params", "headers"),
    [
        ("/api/v1/events", {"ack_mode": "bogus"}, {}),
        ("/api/v1/events", {}, {"x-walship-ack-mode": "quorum:0"}),
        ("/api/v1/events/batch", {"ack_mode": "quorum:x"}, {}),
    ],
)
def test_invalid_ack_mode_is_refused_before_anything_is_written(
    api: TestClient, path: str, params: dict[str, str], headers: dict[str, str]
) -> None:
    # refused after the write, a client's retry would store the event twice
    body = {"events": [event()]} if path.endswith("batch") else event()
    response = api.post(path, json=body, params=params, headers=headers)
    assert "ack mode" in assert_error(response, 400, "invalid_request")["message"]
    assert store_position(api) == (0, 0)
    # a valid one is taken
    assert api.post(path, json=body, params={"ack_mode": "async"}).status_code == 200
    assert store_position(api) == (1, 1)


@pytest.mark.parametrize("mode", ["semi-sync", "sync", "quorum:1", "quorum:" + "9" * 40])
@pytest.mark.parametrize("path", ["/api/v1/events", "/api/v1/events/batch"])
def test_ack_mode_no_configured_follower_can_meet_is_refused_at_once(
    api: TestClient, node: Node, path: str, mode: str
) -> None:
    """A node with no follower (none known, no --peers) cannot confirm a
    write with any follower: asking for one is refused before the write, not answered
    ``degraded`` after the whole timeout with a ledger entry for ever."""
    body = {"events": [event()]} if path.endswith("batch") else event()
    started = time.monotonic()
    for response in (
        api.post(path, json=body, params={"ack_mode": mode}),
        api.post(path, json=body, headers={"x-walship-ack-mode": mode}),
    ):
        error = response.json()
        assert response.status_code == 400, response.text
        assert error["error"] in ("unmeetable_ack_mode", "invalid_request")
        assert error["field"] == "ack_mode" and "ack mode" in error["message"]
    assert time.monotonic() - started < 5
    assert store_position(api) == (0, 0)
    assert api.get("/api/v1/replication/degraded").json()["ranges"] == []
    if not mode.startswith("quorum:9"):
        assert error["error"] == "unmeetable_ack_mode"
        assert (error["followers_asked"], error["followers_configured"]) == (1, 0)


def test_oversized_batch_and_request_are_refused(api: TestClient) -> None:
    append(api)
    before = store_position(api)
    batch = {"events": [event(f"e{i}") for i in range(LIMITS.batch_events_max + 1)]}
    assert_error(api.post("/api/v1/events/batch", json=batch), 413, "limit_exceeded")
    big = b'{"events": [' + b",".join([b'{"x": 1}'] * 3000) + b"]}"
    assert len(big) > LIMITS.request_bytes_max
    assert_error(api.post("/api/v1/events/batch", content=big), 413, "limit_exceeded")
    assert store_position(api) == before


def test_batch_is_all_or_nothing(api: TestClient) -> None:
    append(api, entity="x")
    before = store_position(api)
    batch = [event("a"), event("b"), event("c", etype="bad..type"), event("d")]
    error = assert_error(
        api.post("/api/v1/events/batch", json={"events": batch}), 422, "validation_error"
    )
    assert error["index"] == 2
    assert error["field"] == "event_type"
    assert store_position(api) == before
    # a version conflict in the last event also stores none of the earlier ones
    batch = [event("a"), event("x", expected_version=7)]
    assert_error(api.post("/api/v1/events/batch", json={"events": batch}), 409, "version_conflict")
    assert store_position(api) == before
    assert api.get("/api/v1/events/query", params={"entity_id": "a"}).json()["count"] == 0


def test_expected_version_conflict_is_409_with_both_versions(api: TestClient) -> None:
    append(api, entity="acct")
    append(api, entity="acct")
    before = store_position(api)
    response = api.post("/api/v1/events", json=event("acct", expected_version=1))
    error = assert_error(response, 409, "version_conflict")
    assert (error["expected_version"], error["current_version"]) == (1, 2)
    assert store_position(api) == before
    assert append(api, entity="acct", expected_version=2)["version"] == 3
    assert append(api, entity="new", expected_version=0)["version"] == 1


def test_repeated_event_id_returns_original_receipt(api: TestClient) -> None:
    event_id = str(uuid.uuid4())
    first = append(api, id=event_id)
    append(api, entity="other")
    before = store_position(api)
    again = append(api, id=event_id)
    assert again["duplicate"] is True
    assert {k: again[k] for k in ("event_id", "lsn", "term", "version", "timestamp")} == {
        k: first[k] for k in ("event_id", "lsn", "term", "version", "timestamp")
    }
    assert store_position(api) == before
    batch = {"events": [event(id=event_id), event("fresh")]}
    receipts = api.post("/api/v1/events/batch", json=batch).json()["receipts"]
    assert receipts[0]["lsn"] == first["lsn"] and receipts[0]["duplicate"] is True
    assert receipts[1]["lsn"] == before[0] + 1


def test_an_id_sent_again_with_another_body_is_a_409_naming_the_stored_event(
    api: TestClient,
) -> None:
    event_id = str(uuid.uuid4())
    first = append(api, entity="cart", id=event_id, payload={"sku": "a"})
    before = store_position(api)
    response = api.post("/api/v1/events", json=event("cart", id=event_id, payload={"sku": "b"}))
    error = assert_error(response, 409, "id_conflict")
    assert error["event_id"] == event_id and str(first["lsn"]) in error["message"]
    stored = error["stored"]
    assert (stored["lsn"], stored["term"], stored["entity_id"], stored["event_type"]) == (
        first["lsn"],
        first["term"],
        "cart",
        "order.placed",
    )
    # inside a batch: the whole batch is refused, naming the event's index
    batch = {"events": [event("x"), event("cart", id=event_id, payload={"sku": "c"})]}
    error = assert_error(api.post("/api/v1/events/batch", json=batch), 409, "id_conflict")
    assert error["index"] == 1 and error["stored"]["lsn"] == first["lsn"]
    # one id twice in a batch with different bodies: nothing is stored
    fresh = str(uuid.uuid4())
    batch = {"events": [event("p", id=fresh), event("p", id=fresh, payload={"n": 2})]}
    error = assert_error(api.post("/api/v1/events/batch", json=batch), 409, "id_conflict")
    assert (error["event_id"], error["first_index"], error["index"]) == (fresh, 0, 1)
    assert store_position(api) == before
    query = api.get("/api/v1/events/query", params={"entity_id": "cart"}).json()
    assert [e["payload"] for e in query["events"]] == [{"sku": "a"}]


def test_concurrent_appends_get_distinct_gapless_lsns(node: Node) -> None:
    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=create_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            responses = await asyncio.gather(
                *(client.post("/api/v1/events", json=event(f"e{i % 7}")) for i in range(64))
            )
        return [r.json()["lsn"] for r in responses]

    assert sorted(asyncio.run(run())) == list(range(1, 65))


def test_cancelled_request_does_not_cancel_the_shared_group_commit() -> None:
    """One WAL future serves a whole group; a client going away must not cancel it."""
    fut: Future[WriteOutcome] = Future()

    async def run() -> None:
        task = asyncio.create_task(wait_written(fut))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert not fut.cancelled()
    fut.set_result(WriteOutcome(1, True))


@pytest.mark.parametrize("fast_lane", [True, False])
def test_client_gone_before_body_stores_nothing_and_answers_nothing(
    node: Node, fast_lane: bool
) -> None:
    app = create_app(node, write_fast_lane=fast_lane)
    sent: list[MutableMapping[str, Any]] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/api/v1/events", "raw_path": b"/api/v1/events",
        "query_string": b"", "root_path": "", "headers": [], "server": ("t", 80),
        "client": ("c", 1),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent == []
    assert node.store.stats()["last_lsn"] == 0


def test_follower_refuses_writes(api: TestClient, node: Node) -> None:
    node.role = Role.FOLLOWER
    assert_error(api.post("/api/v1/events", json=event()), 409, "read_only")
    assert store_position(api) == (0, 0)


# ---------------------------------------------------------------- reads


@pytest.fixture
def history(api: TestClient) -> list[dict[str, Any]]:
    """Twelve events over two entities, two types and two tenants, 2 ms apart."""
    receipts = []
    for i in range(12):
        tenant = "acme" if i % 4 == 3 else "default"
        etype = "order.placed" if i % 2 == 0 else "order.paid"
        receipts.append(append(api, entity=f"o{i % 3}", etype=etype, tenant_id=tenant))
        time.sleep(0.002)
    return receipts


def query(api: TestClient, **params: Any) -> dict[str, Any]:
    response = api.get("/api/v1/events/query", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    lsns = [ev["lsn"] for ev in body["events"]]
    assert lsns == sorted(lsns) and len(set(lsns)) == len(lsns)
    assert body["count"] == len(body["events"])
    return body


def lsns(body: dict[str, Any]) -> list[int]:
    return [ev["lsn"] for ev in body["events"]]


def test_query_returns_every_model_field_in_lsn_order(
    api: TestClient, history: list[dict[str, Any]]
) -> None:
    body = query(api)
    assert lsns(body) == list(range(1, 13))
    assert body["next_cursor"] is None
    first = body["events"][0]
    assert set(first) == {
        "id", "tenant_id", "entity_id", "event_type", "payload", "metadata",
        "timestamp", "version", "lsn", "term", "position",
    }  # fmt: skip
    assert first["id"] == history[0]["event_id"] and first["payload"] == {"n": 1}


def test_query_filters(api: TestClient, history: list[dict[str, Any]]) -> None:
    # entity ids are per tenant; without tenant_id the default tenant is meant
    assert lsns(query(api, entity_id="o1")) == [2, 5, 11]
    assert lsns(query(api, entity_id="o1", tenant_id="acme")) == [8]
    assert lsns(query(api, event_type="order.paid")) == [2, 4, 6, 8, 10, 12]
    assert lsns(query(api, tenant_id="acme")) == [4, 8, 12]
    assert lsns(query(api, from_lsn=10)) == [10, 11, 12]
    assert lsns(query(api, from_lsn=3, to_lsn=5)) == [3, 4, 5]
    assert lsns(query(api, event_type="order.placed", tenant_id="default")) == [1, 3, 5, 7, 9, 11]
    since, until = history[4]["timestamp"], history[7]["timestamp"]
    assert lsns(query(api, since=since, until=until)) == [5, 6, 7]
    assert lsns(query(api, since=since.replace("Z", "+00:00"))) == list(range(5, 13))
    assert query(api, entity_id="nobody")["events"] == []


def test_query_pages_follow_cursor_without_gaps_or_duplicates(
    api: TestClient, history: list[dict[str, Any]]
) -> None:
    for params in ({}, {"tenant_id": "default"}):
        seen: list[int] = []
        cursor = None
        while True:
            page = query(api, limit=5, **params, **({"cursor": cursor} if cursor else {}))
            assert page["count"] <= 5
            seen += lsns(page)
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == lsns(query(api, limit=50, **params))


def test_query_spans_parquet_and_memtable(
    api: TestClient, node: Node, history: list[dict[str, Any]]
) -> None:
    assert node.store.checkpoint() is not None
    for i in range(3):
        append(api, entity=f"o{i}")
    assert lsns(query(api)) == list(range(1, 16))
    assert lsns(query(api, entity_id="o1")) == [2, 5, 11, 14]
    assert lsns(query(api, from_lsn=11, limit=3)) == [11, 12, 13]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": LIMITS.query_limit_max + 1},
        {"limit": "ten"},
        {"from_lsn": "x"},
        {"to_lsn": -1},
        {"since": "yesterday"},
        {"until": "2026-13-45"},
    ],
)
def test_bad_query_parameters_are_400(api: TestClient, params: dict[str, Any]) -> None:
    body = assert_error(api.get("/api/v1/events/query", params=params), 400, "invalid_parameter")
    assert body["field"] == next(iter(params))


def test_entity_state_merges_payloads_in_order(api: TestClient) -> None:
    r1 = append(api, entity="cart", payload={"items": 1, "owner": "ann"})
    time.sleep(0.002)
    append(api, entity="cart", payload={"items": 2})
    append(api, entity="cart", payload={"paid": True})
    append(api, entity="cart", tenant_id="acme", payload={"items": 99})
    state = api.get("/api/v1/entities/cart/state").json()
    assert state == {
        "tenant_id": "default",
        "entity_id": "cart",
        "version": 3,
        "state": {"items": 2, "owner": "ann", "paid": True},
        "last_lsn": 3,
        "updated": state["updated"],
        "events": 3,
    }
    by_lsn = api.get("/api/v1/entities/cart/state", params={"as_of_lsn": 2}).json()
    assert (by_lsn["state"], by_lsn["version"]) == ({"items": 2, "owner": "ann"}, 2)
    by_time = api.get("/api/v1/entities/cart/state", params={"as_of": r1["timestamp"]}).json()
    assert (by_time["state"], by_time["version"]) == ({"items": 1, "owner": "ann"}, 1)
    acme = api.get("/api/v1/entities/cart/state", params={"tenant_id": "acme"}).json()
    assert acme["state"] == {"items": 99}


def test_entity_state_non_object_payload_replaces(api: TestClient) -> None:
    append(api, entity="n", payload={"a": 1})
    append(api, entity="n", payload=[1, 2])
    assert api.get("/api/v1/entities/n/state").json()["state"] == [1, 2]


def test_entity_state_of_id_with_slash(api: TestClient) -> None:
    append(api, entity="users/42", payload={"name": "x"})
    state = api.get("/api/v1/entities/users%2F42/state").json()
    assert state["entity_id"] == "users/42" and state["state"] == {"name": "x"}


def test_entity_state_without_events_is_404(api: TestClient) -> None:
    assert_error(api.get("/api/v1/entities/ghost/state"), 404, "not_found")
    append(api, entity="late")
    params = {"as_of": "2000-01-01T00:00:00Z"}
    assert_error(api.get("/api/v1/entities/late/state", params=params), 404, "not_found")
    assert_error(
        api.get("/api/v1/entities/late/state", params={"as_of": "soon"}), 400, "invalid_parameter"
    )


def test_stats(api: TestClient) -> None:
    append(api)
    stats = api.get("/api/v1/stats").json()
    assert stats["last_lsn"] == 1 and stats["events"] == 1 and stats["entities"] == 1
    assert stats["fsync"] == "never"


# ---------------------------------------------------------------- operations


def test_health_reports_role_and_position(api: TestClient) -> None:
    append(api)
    response = api.get("/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "healthy"
    assert (health["role"], health["node_id"], health["term"]) == ("leader", "walship-1", 1)
    assert health["last_lsn"] == health["visible_lsn"] == 1
    assert health["wal_failed"] is None
    assert set(health) >= {"synced_lsn", "uptime_s", "checkpoint_lsn", "version"}


def test_failed_wal_makes_health_503_and_refuses_writes(
    api: TestClient, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    append(api)
    monkeypatch.setattr(node.store.wal, "_failed", WalFailed("fdatasync failed: EIO"))
    response = api.get("/health")
    assert response.status_code == 503
    health = response.json()
    assert health["status"] != "healthy"
    assert "EIO" in health["wal_failed"]
    assert_error(api.post("/api/v1/events", json=event()), 503, "wal_failed")
    not_ready = assert_error(api.get("/health/ready"), 503, "not_ready")
    assert not_ready["ready"] is False and "EIO" in not_ready["reasons"][0]
    assert api.get("/health/live").status_code == 200


def test_single_async_leader_is_live_and_ready(api: TestClient) -> None:
    live = api.get("/health/live")
    assert live.status_code == 200 and live.json()["live"] is True
    ready = api.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "node_id": "walship-1",
        "role": "leader",
        "term": 1,
        "reasons": [],
    }
    health = api.get("/health").json()
    assert (health["status"], health["ready"], health["not_ready"]) == ("healthy", True, [])


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/events/query", {"to_lsn": 2**63}),
        ("/api/v1/events/query", {"to_lsn": 10**40}),
        ("/api/v1/events/query", {"from_lsn": 2**63}),
        ("/api/v1/events/query", {"min_lsn": 2**64}),
        ("/api/v1/events/query", {"cursor": str(2**63)}),
        ("/api/v1/events/query", {"cursor": "9" * 30}),
        ("/api/v1/entities/order-1/state", {"as_of_lsn": 2**63}),
        ("/api/v1/entities/order-1/state", {"min_lsn": 2**63}),
    ],
)
def test_lsn_parameters_past_int64_are_a_400_on_a_node_with_parquet_parts(
    api: TestClient, node: Node, path: str, params: dict[str, Any]
) -> None:
    """A pyarrow TypeError in the lsn filter used to answer these 500 once parts existed."""
    append(api)
    assert node.store.checkpoint() is not None
    code = "invalid_request" if "cursor" in params else "invalid_parameter"
    error = assert_error(api.get(path, params=params), 400, code)
    assert error.get("field") in (*params, None)
    largest = {name: (2**63 - 1 if name != "cursor" else str(2**63 - 2)) for name in params}
    if "min_lsn" not in params:
        assert api.get(path, params=largest).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "params", "unknown"),
    [
        ("GET", "/api/v1/events/query", {"as_of": "2026-01-01T00:00:00Z"}, ["as_of"]),
        ("GET", "/api/v1/events/query", {"entity_id": "order-1", "entity": "x"}, ["entity"]),
        ("GET", "/api/v1/entities/order-1/state", {"as_of_time": "2026-01-01"}, ["as_of_time"]),
        ("GET", "/api/v1/entities/order-1/state", {"since": "2026-01-01"}, ["since"]),
        ("GET", "/api/v1/stats", {"verbose": "1"}, ["verbose"]),
        ("GET", "/health", {"ready": ""}, ["ready"]),
        ("GET", "/health/ready", {"verbose": "1"}, ["verbose"]),
        ("GET", "/health/live", {"x": "1"}, ["x"]),
        ("GET", "/api/v1/replication/degraded", {"limit": "5"}, ["limit"]),
        ("GET", "/metrics", {"name[]": "x", "b": "2"}, ["b", "name[]"]),
        ("POST", "/api/v1/events", {"ackmode": "sync"}, ["ackmode"]),
        ("POST", "/api/v1/events/batch", {"ack_mode": "async", "sync": "1"}, ["sync"]),
        ("POST", "/internal/promote", {"forse": "true"}, ["forse"]),
    ],
)
def test_unknown_query_parameters_are_a_400_naming_them(
    api: TestClient, method: str, path: str, params: dict[str, str], unknown: list[str]
) -> None:
    """A misspelt parameter used to be ignored: ``?as_of=`` on a query answered the whole
    log, ``?ackmode=sync`` a write in the server's weaker mode."""
    append(api)
    before = store_position(api)
    if path.startswith("/internal/"):
        # credentials come first (this node has no admin token); with them, the parameters
        # are checked: tests/test_http_auth.py
        assert_error(api.request(method, path, params=params), 401, "unauthorized")
        return
    body = {"events": [event()]} if path.endswith("batch") else event()
    response = api.request(method, path, params=params, json=body if method == "POST" else None)
    error = assert_error(response, 400, "invalid_parameter")
    assert error["unknown"] == unknown and all(name in error["message"] for name in unknown)
    assert store_position(api) == before
    if method == "GET":  # the parameters the route takes are still taken
        known = {k: v for k, v in params.items() if k not in unknown}
        assert api.get(path, params=known).status_code == 200


def test_failing_checkpoints_make_the_node_not_ready_and_say_why(
    api: TestClient, node: Node
) -> None:
    """A checkpoint that fails (here: the parts directory is a plain file) is an alarm on
    ``/health/ready``, ``/health`` and in the metrics until one works; writes go on meanwhile
    (the WAL and the memtable hold them)."""
    append(api)
    assert api.get("/health/ready").status_code == 200
    parts = node.store.parts_dir
    parts.rmdir()
    parts.write_text("not a directory\n")
    with pytest.raises(NotADirectoryError):
        node.store.checkpoint()
    ready = api.get("/health/ready")
    assert ready.status_code == 503
    assert any("checkpoints are failing" in r for r in ready.json()["reasons"])
    health = api.get("/health").json()
    assert health["status"] == "not_ready" and health["wal_failed"] is None
    assert any("NotADirectoryError" in r for r in health["not_ready"])
    failing = health["checkpoint_failing"]
    assert "NotADirectoryError" in failing["error"] and failing["failures"] == 1
    assert "walship_checkpoint_failing 1.0" in api.get("/metrics").text
    assert append(api, entity="still-writable")["lsn"] == 2
    parts.unlink()
    parts.mkdir()
    assert node.store.checkpoint() is not None
    health = api.get("/health").json()
    assert health["status"] == "healthy" and health["checkpoint_failing"] is None
    assert health["checkpoint_lsn"] == 2
    assert api.get("/health/ready").status_code == 200


def test_metrics_expose_documented_names(api: TestClient) -> None:
    append(api)
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "walship_appends_total",
        "walship_wal_fsync_seconds",
        "walship_wal_group_commit_records",
        "walship_checkpoint_seconds",
        "walship_memtable_events",
    ):
        assert name in text, name
    assert "walship_appends_total 1.0" in text


def test_openapi_describes_paths_and_request_bodies(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) >= {
        "/api/v1/events",
        "/api/v1/events/batch",
        "/api/v1/events/query",
        "/api/v1/entities/{entity_id}/state",
        "/api/v1/stats",
        "/health",
        "/metrics",
    }
    components = schema["components"]["schemas"]

    def resolve(ref: dict[str, Any]) -> dict[str, Any]:
        name = ref["$ref"].removeprefix("#/components/schemas/")
        found: dict[str, Any] = components[name]
        return found

    single = paths["/api/v1/events"]["post"]["requestBody"]["content"]["application/json"]
    event_in = resolve(single["schema"])
    assert set(event_in["required"]) == {"entity_id", "event_type", "payload"}
    assert "pattern" in event_in["properties"]["tenant_id"]
    assert event_in["properties"]["entity_id"]["maxLength"] == LIMITS.entity_id_chars_max
    batch = paths["/api/v1/events/batch"]["post"]["requestBody"]["content"]["application/json"]
    assert resolve(resolve(batch["schema"])["properties"]["events"]["items"]) is event_in
    ok = paths["/api/v1/events"]["post"]["responses"]["200"]["content"]["application/json"]
    assert "durability" in resolve(ok["schema"])["properties"]
    params = {p["name"] for p in paths["/api/v1/events/query"]["get"]["parameters"]}
    assert params == {
        "entity_id", "event_type", "event_type_prefix", "tenant_id", "since", "until",
        "from_lsn", "to_lsn", "limit", "cursor", "min_lsn", "min_lsn_wait_ms",
        "from_position", "to_position",
    }  # fmt: skip
    ack_params = {p["name"] for p in paths["/api/v1/events"]["post"]["parameters"]}
    assert ack_params == {"ack_mode"}
    assert api.get("/docs").status_code == 200


def test_routing_errors_are_json(api: TestClient) -> None:
    assert_error(api.get("/api/v1/nothing"), 404, "not_found")
    response = api.delete("/api/v1/events")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]


def test_unexpected_exception_is_500_json(
    api: TestClient, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(node.store, "stats", broken)
    body = assert_error(api.get("/api/v1/stats"), 500, "internal")
    assert "boom" not in body["message"]  # internals stay in the log
