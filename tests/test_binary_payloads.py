"""Binary payloads and topic-style event types (issue 13 item 5).

Bytes go in as base64 in a JSON body (``payload_encoding: "base64"``) or as a msgpack ``bin``,
and the same bytes come out of every read (query, entity events, event by id, subscription,
entity state), from the memtable, from Parquet parts (which DuckDB reads as they are) and on
a follower. Bad encodings are a 4xx JSON error and store nothing.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import msgspec
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from tests.cluster import Cluster, query_all, replication_address, stats, wait_until
from tests.sse_reader import SseReader
from walship.errors import ValidationError
from walship.events import StoredEvent
from walship.http import create_app
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.storage.compaction import merge_parts
from walship.storage.parquet import PartReader, write_part
from walship.storage.query import QueryFilter
from walship.wal import FsyncPolicy

LIMITS = Limits(parquet_row_group_rows=4, payload_bytes_max=4096)
MSGPACK = "application/msgpack"
BLOB = bytes(range(256)) + b"\x00\xff\xfe not utf-8 \xc3\x28"  # every byte value, invalid UTF-8


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node.open(
        NodeConfig(
            tmp_path / "data", fsync=FsyncPolicy.parse("never"), limits=LIMITS, checkpoints=False
        )
    )
    try:
        yield n
    finally:
        n.close()


@pytest.fixture(params=["fast-lane", "routes"])
def api(node: Node, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    with TestClient(create_app(node, write_fast_lane=request.param == "fast-lane")) as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def binary_event(entity: str, data: bytes, **fields: Any) -> dict[str, Any]:
    return {
        "entity_id": entity,
        "event_type": "blob.stored",
        "payload": b64(data),
        "payload_encoding": "base64",
        **fields,
    }


def post_msgpack(api: TestClient, path: str, body: Any, **headers: str) -> Any:
    return api.post(
        path, content=msgspec.msgpack.encode(body), headers={"content-type": MSGPACK, **headers}
    )


def reads_json(api: TestClient, entity: str, event_id: str) -> list[dict[str, Any]]:
    """The event as the query, the entity's events and the read by id answer it (JSON)."""
    query = api.get("/api/v1/events/query", params={"entity_id": entity}).json()["events"]
    stream = api.get(f"/api/v1/entities/{entity}/events").json()["events"]
    by_id = api.get(f"/api/v1/events/{event_id}").json()
    return [*query, *stream, by_id]


def reads_msgpack(api: TestClient, entity: str, event_id: str) -> list[dict[str, Any]]:
    accept = {"accept": MSGPACK}
    out = []
    for path, params in (
        ("/api/v1/events/query", {"entity_id": entity}),
        (f"/api/v1/entities/{entity}/events", {}),
        (f"/api/v1/events/{event_id}", {}),
    ):
        response = api.get(path, params=params, headers=accept)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == MSGPACK
        body = msgspec.msgpack.decode(response.content)
        out.extend(body.get("events", [body]))
    return out


def assert_bytes_everywhere(api: TestClient, entity: str, event_id: str, data: bytes) -> None:
    for ev in reads_json(api, entity, event_id):
        assert ev["payload_encoding"] == "base64"
        assert base64.b64decode(ev["payload"]) == data
    for ev in reads_msgpack(api, entity, event_id):
        assert ev["payload"] == data and "payload_encoding" not in ev


def test_bytes_in_json_and_msgpack_come_out_the_same_from_memtable_and_parquet(
    api: TestClient, node: Node
) -> None:
    r = api.post("/api/v1/events", json=binary_event("j", BLOB))
    assert r.status_code == 200, r.text
    from_json = r.json()["event_id"]
    r = post_msgpack(
        api, "/api/v1/events", {"entity_id": "m", "event_type": "blob.stored", "payload": BLOB}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")  # no Accept: JSON answer
    from_msgpack = r.json()["event_id"]
    for checkpointed in (False, True):
        assert_bytes_everywhere(api, "j", from_json, BLOB)
        assert_bytes_everywhere(api, "m", from_msgpack, BLOB)
        if not checkpointed:
            node.store.checkpoint()
            assert node.store.stats()["memtable_events"] == 0


def test_json_payloads_stay_json_in_msgpack_bodies_and_answers(api: TestClient) -> None:
    payload = {"n": 1, "list": [1.5, "x", None, True], "nested": {"k": "v"}}
    r = post_msgpack(
        api,
        "/api/v1/events/batch",
        {"events": [{"entity_id": "v", "event_type": "t.x", "payload": payload}]},
        accept=MSGPACK,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == MSGPACK
    receipts = msgspec.msgpack.decode(r.content)
    assert receipts["count"] == 1
    event_id = receipts["receipts"][0]["event_id"]
    (ev,) = api.get("/api/v1/events/query", params={"entity_id": "v"}).json()["events"]
    assert ev["payload"] == payload and "payload_encoding" not in ev
    assert reads_msgpack(api, "v", event_id)[0]["payload"] == payload


def test_duckdb_reads_binary_and_json_payloads_from_the_parquet_part(
    api: TestClient, node: Node
) -> None:
    api.post("/api/v1/events", json=binary_event("b", BLOB)).raise_for_status()
    api.post(
        "/api/v1/events", json={"entity_id": "j", "event_type": "t.x", "payload": {"total": 42}}
    ).raise_for_status()
    node.store.checkpoint()
    (part,) = node.store.manifest.parts
    path = node.store.parts_dir / part.file
    rows = duckdb.sql(
        "select entity_id, payload_binary, payload_bytes, payload, "
        f"json_extract(payload, '$.total')::int from read_parquet('{path}') order by lsn"
    ).fetchall()
    assert rows == [("b", True, BLOB, None, None), ("j", False, None, '{"total":42}', 42)]


def test_entity_state_of_a_binary_payload_is_its_bytes(api: TestClient) -> None:
    api.post(
        "/api/v1/events", json={"entity_id": "s", "event_type": "t.x", "payload": {"a": 1}}
    ).raise_for_status()
    api.post("/api/v1/events", json=binary_event("s", BLOB)).raise_for_status()
    state = api.get("/api/v1/entities/s/state").json()
    assert state["state_encoding"] == "base64" and base64.b64decode(state["state"]) == BLOB
    packed = msgspec.msgpack.decode(
        api.get("/api/v1/entities/s/state", headers={"accept": MSGPACK}).content
    )
    assert packed["state"] == BLOB and "state_encoding" not in packed
    api.post(  # an object after bytes replaces them
        "/api/v1/events", json={"entity_id": "s", "event_type": "t.x", "payload": {"b": 2}}
    ).raise_for_status()
    state = api.get("/api/v1/entities/s/state").json()
    assert state["state"] == {"b": 2} and "state_encoding" not in state


def test_an_id_sent_again_is_a_duplicate_only_with_the_same_bytes(api: TestClient) -> None:
    event_id = str(uuid.uuid4())
    first = api.post("/api/v1/events", json=binary_event("d", BLOB, id=event_id))
    assert first.status_code == 200, first.text
    again = post_msgpack(  # the same bytes in the other format: the same event
        api,
        "/api/v1/events",
        {"id": event_id, "entity_id": "d", "event_type": "blob.stored", "payload": BLOB},
    )
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["lsn"] == first.json()["lsn"]
    other = api.post("/api/v1/events", json=binary_event("d", BLOB + b"!", id=event_id))
    assert other.status_code == 409 and other.json()["error"] == "id_conflict"
    # the base64 text as a JSON string payload is not the bytes it encodes
    as_text = {"id": event_id, "entity_id": "d", "event_type": "blob.stored", "payload": b64(BLOB)}
    assert api.post("/api/v1/events", json=as_text).status_code == 409
    assert len(api.get("/api/v1/events/query").json()["events"]) == 1


TOPICS = ["bank.domain:Account.Opened", "bank.domain:Account-v2.Closed", "Order_Placed:x-1"]


def test_topic_event_types_round_trip_and_filter_by_prefix(api: TestClient, node: Node) -> None:
    for i, topic in enumerate(TOPICS):
        r = api.post(
            "/api/v1/events", json={"entity_id": f"t{i}", "event_type": topic, "payload": i}
        )
        assert r.status_code == 200, r.text
    long = "a" * LIMITS.event_type_chars_max
    assert (
        api.post("/api/v1/events", json={"entity_id": "l", "event_type": long, "payload": 0})
    ).status_code == 200
    for checkpointed in (False, True):
        got = api.get("/api/v1/events/query", params={"event_type_prefix": "bank.domain:"}).json()
        assert [e["event_type"] for e in got["events"]] == TOPICS[:2]
        exact = api.get("/api/v1/events/query", params={"event_type": TOPICS[2]}).json()
        assert [e["payload"] for e in exact["events"]] == [2]
        if not checkpointed:
            node.store.checkpoint()


def count(api: TestClient) -> int:
    return len(api.get("/api/v1/events/query").json()["events"])


BAD_BINARY: list[tuple[str, dict[str, str], bytes, int, str]] = [
    (
        "bad base64",
        {},
        msgspec.json.encode({**binary_event("x", b"ok"), "payload": "not base64!"}),
        422,
        "validation_error",
    ),
    (
        "base64 of a non-string",
        {},
        msgspec.json.encode({**binary_event("x", b"ok"), "payload": {"a": 1}}),
        422,
        "validation_error",
    ),
    (
        "unknown encoding",
        {},
        msgspec.json.encode({**binary_event("x", b"ok"), "payload_encoding": "hex"}),
        422,
        "validation_error",
    ),
    (
        "binary over the payload limit",
        {},
        msgspec.json.encode(binary_event("x", b"z" * (LIMITS.payload_bytes_max + 1))),
        413,
        "limit_exceeded",
    ),
    ("malformed msgpack", {"content-type": MSGPACK}, b"\xc1\x00", 400, "malformed_msgpack"),
    (
        "truncated msgpack",
        {"content-type": MSGPACK},
        msgspec.msgpack.encode(binary_event("x", b"ok"))[:-3],
        400,
        "malformed_msgpack",
    ),
    (
        "json sent as msgpack",
        {"content-type": MSGPACK},
        msgspec.json.encode({"entity_id": "x", "event_type": "t", "payload": 1}),
        400,
        "malformed_msgpack",
    ),
    (
        "bin inside a payload",
        {"content-type": MSGPACK},
        msgspec.msgpack.encode({"entity_id": "x", "event_type": "t", "payload": {"b": b"\x00"}}),
        422,
        "validation_error",
    ),
    (
        "integer map key",
        {"content-type": MSGPACK},
        msgspec.msgpack.encode({"entity_id": "x", "event_type": "t", "payload": {1: 2}}),
        422,
        "validation_error",
    ),
    (
        "bin payload said to be json",
        {"content-type": MSGPACK},
        msgspec.msgpack.encode(
            {"entity_id": "x", "event_type": "t", "payload": b"\x00", "payload_encoding": "json"}
        ),
        422,
        "validation_error",
    ),
    (
        "wrong content type",
        {"content-type": "application/xml"},
        b"<event/>",
        415,
        "unsupported_media_type",
    ),
    (
        "msgpack body sent as json",
        {"content-type": "application/json"},
        msgspec.msgpack.encode(binary_event("x", b"ok")),
        400,
        "malformed_json",
    ),
]


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [case[1:] for case in BAD_BINARY],
    ids=[case[0] for case in BAD_BINARY],
)
def test_bad_encodings_are_a_4xx_json_error_and_store_nothing(
    api: TestClient, headers: dict[str, str], body: bytes, status: int, code: str
) -> None:
    for path, content in (
        ("/api/v1/events", body),
        ("/api/v1/events/batch", _as_batch(headers, body)),
    ):
        r = api.post(path, content=content, headers=headers)
        assert r.status_code == status, (path, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"] == code, r.text
    assert count(api) == 0


def _as_batch(headers: dict[str, str], body: bytes) -> bytes:
    """The same bad event inside a batch (a body that does not decode stays as it is)."""
    if headers.get("content-type") == MSGPACK:
        try:
            return msgspec.msgpack.encode({"events": [msgspec.msgpack.decode(body)]})
        except msgspec.DecodeError:
            return body
    try:
        return msgspec.json.encode({"events": [msgspec.json.decode(body)]})
    except msgspec.DecodeError:
        return body


def _old_part(path: Path) -> None:
    """Rewrite a part as parts were written before binary payloads (no such columns)."""
    table = pq.read_table(path).drop_columns(["payload_binary", "payload_bytes"])
    json_payload = table.schema.field("payload").with_nullable(False)
    table = table.cast(table.schema.set(table.schema.get_field_index("payload"), json_payload))
    pq.write_table(table, path, row_group_size=LIMITS.parquet_row_group_rows)


def _event(lsn: int, payload: bytes, binary: bool) -> StoredEvent:
    return StoredEvent(
        lsn, 1, uuid.uuid4().bytes, "default", f"e{lsn % 3}", "t.x", lsn, lsn, payload, None,
        payload_binary=binary,
    )  # fmt: skip


def test_parts_from_before_binary_payloads_read_and_merge_with_new_ones(tmp_path: Path) -> None:
    old_events = [_event(lsn, b'{"i":%d}' % lsn, False) for lsn in range(1, 9)]
    new_events = [_event(lsn, os.urandom(20), lsn % 2 == 0) for lsn in range(9, 17)]
    new_events = [
        ev if ev.payload_binary else _event(ev.lsn, b'{"j":%d}' % ev.lsn, False)
        for ev in new_events
    ]
    old_info = write_part(tmp_path, old_events, 1, 8, LIMITS.parquet_row_group_rows)
    _old_part(tmp_path / old_info.file)
    new_info = write_part(tmp_path, new_events, 9, 16, LIMITS.parquet_row_group_rows)
    readers = [
        PartReader(tmp_path / old_info.file, old_info),
        PartReader(tmp_path / new_info.file, new_info),
    ]
    assert readers[0].select(QueryFilter(), 100) == old_events
    out = tmp_path / "merged"
    out.mkdir()
    merged, _ = merge_parts(out, readers, LIMITS.parquet_row_group_rows)
    assert PartReader(out / merged.file, merged).select(QueryFilter(), 100) == [
        *old_events,
        *new_events,
    ]


def test_bytes_reach_a_follower_and_its_subscribers_through_parquet(tmp_path: Path) -> None:
    """A real leader and follower: bytes written in JSON and msgpack read back the same on the
    follower, from its memtable, its subscription and after its own checkpoint."""
    token = tmp_path / "admin.token"
    token.write_text("adm1n-token-for-tests\n")
    admin = {"Authorization": "Bearer adm1n-token-for-tests"}
    with Cluster(tmp_path / "cluster") as cluster:
        args = ["--admin-token-file", str(token)]
        leader = cluster.start_leader(args=args)
        follower = cluster.start_follower("f1", replication_address(leader), args=args)
        with httpx.Client(timeout=15) as http:
            r = http.post(f"{leader.url}/api/v1/events", json=binary_event("j", BLOB))
            assert r.status_code == 200, r.text
            body = msgspec.msgpack.encode(
                {"events": [{"entity_id": "m", "event_type": "x:y-z.w", "payload": BLOB[::-1]}]}
            )
            r = http.post(
                f"{leader.url}/api/v1/events/batch",
                content=body,
                headers={"content-type": MSGPACK, "accept": MSGPACK},
            )
            assert r.status_code == 200, r.text
            last = msgspec.msgpack.decode(r.content)["last_lsn"]
            wait_until(lambda: stats(follower)["visible_lsn"] >= last, 30, "the follower")
            expected = [BLOB, BLOB[::-1]]
            with SseReader(f"{follower.url}/api/v1/events/stream?from_lsn=1") as reader:
                streamed = reader.take(2)
            assert [base64.b64decode(e["payload"]) for e in streamed] == expected
            assert {e["payload_encoding"] for e in streamed} == {"base64"}
            for checkpointed in (False, True):
                events = query_all(follower)
                assert [base64.b64decode(e["payload"]) for e in events] == expected
                assert events == query_all(leader)
                packed = msgspec.msgpack.decode(
                    http.get(
                        f"{follower.url}/api/v1/events/query", headers={"accept": MSGPACK}
                    ).content
                )
                assert [e["payload"] for e in packed["events"]] == expected
                if not checkpointed:
                    r = http.post(f"{follower.url}/internal/checkpoint", headers=admin)
                    assert r.status_code == 200, r.text
                    assert stats(follower)["parquet_events"] == 2


def test_an_embedded_store_keeps_bytes_across_a_restart(tmp_path: Path) -> None:
    """Through ``Store`` (no HTTP): base64 in, bytes stored; after a restart (WAL replay)
    and a checkpoint, the event is still binary with the same bytes."""
    from walship.events import EventIn
    from walship.store import Store, StoreConfig

    config = StoreConfig(tmp_path / "s", fsync=FsyncPolicy.parse("never"))
    event = EventIn(
        entity_id="e",
        event_type="x:y",
        payload=msgspec.Raw(msgspec.json.encode(BLOB)),  # bytes encode as base64 text
        payload_encoding="base64",
    )
    with Store.open(config) as store:
        store.append(event)
        with pytest.raises(ValidationError):
            store.append(msgspec.structs.replace(event, payload=msgspec.Raw(b'"%%%"')))
    for _ in range(2):
        with Store.open(config) as store:
            (ev,) = store.query(QueryFilter(entity_id="e"), limit=10).events
            assert (ev.payload, ev.payload_binary) == (BLOB, True)
            store.checkpoint()
