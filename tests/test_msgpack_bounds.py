"""A msgpack body is bounded before it is decoded: one byte of msgpack (an empty map) becomes
a ~64-byte Python object, so a 32 MiB body decoded whole took gigabytes before any limit on
payloads or batch sizes was looked at."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from walship.http import create_app
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.wal import FsyncPolicy

MSGPACK = {"content-type": "application/msgpack"}
ELEMENTS = 1_000_000


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    limits = Limits(payload_bytes_max=64 * 1024)
    node = Node.open(NodeConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never"), limits=limits))
    try:
        with TestClient(create_app(node)) as client:
            yield client
    finally:
        node.close()


def _str(text: str) -> bytes:
    data = text.encode()
    return bytes([0xA0 | len(data)]) + data


def _empty_maps(n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n) + b"\x80" * n


def _event(payload: bytes) -> bytes:
    return (
        b"\x83"
        + _str("entity_id")
        + _str("e")
        + _str("event_type")
        + _str("t")
        + _str("payload")
        + payload
    )


BOMBS = {
    # a payload of a million empty maps: far over the payload limit, as msgpack already
    "payload": _event(_empty_maps(ELEMENTS)),
    # a batch of a million (empty) events: over batch_events_max
    "events": b"\x81" + _str("events") + _empty_maps(ELEMENTS),
    # a body map with a million distinct keys
    "fields": b"\xdf"
    + struct.pack(">I", ELEMENTS)
    + b"".join(b"\xa5" + b"%05x" % i + b"\xc0" for i in range(ELEMENTS)),
}


@pytest.mark.parametrize("bomb", sorted(BOMBS))
@pytest.mark.parametrize("path", ["/api/v1/events", "/api/v1/events/batch"])
def test_a_msgpack_bomb_is_refused_before_it_is_decoded(
    api: TestClient, bomb: str, path: str
) -> None:
    body = BOMBS[bomb]
    if path.endswith("batch") and bomb == "payload":
        body = b"\x81" + _str("events") + b"\x91" + body
    tracemalloc.start()
    try:
        r = api.post(path, content=body, headers=MSGPACK)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"] in ("limit_exceeded", "validation_error"), r.text
    # the body and a copy at most; decoded whole it took 80-100 MB for these 1-7 MB bodies
    assert peak < 2 * len(body) + 4 * 1024 * 1024, (bomb, path, peak)
    assert api.get("/api/v1/events/query").json()["count"] == 0


DEEP = b"\x91" * 100_000 + b"\xc0"
BAD = {
    "deep payload": (_event(DEEP), 422),
    "deep metadata": (
        b"\x84"
        + _str("entity_id")
        + _str("e")
        + _str("event_type")
        + _str("t")
        + _str("payload")
        + b"\x01"
        + _str("metadata")
        + b"\x91" * 3000
        + b"\xc0",
        422,
    ),
    "a deep body": (DEEP, 422),
    "not a map": (b"\x92\x01\x02", 422),
    "trailing bytes": (b"\x80\x00", 400),
    "an int key": (b"\x81\x01\x02", 422),
    "truncated": (b"\x83" + _str("entity_id"), 400),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("batch", [False, True])
def test_bad_msgpack_is_a_4xx_json_error(api: TestClient, case: str, batch: bool) -> None:
    body, status = BAD[case]
    if batch and case in ("deep payload", "deep metadata", "an int key"):
        body = b"\x81" + _str("events") + b"\x91" + body
    r = api.post(
        "/api/v1/events/batch" if batch else "/api/v1/events", content=body, headers=MSGPACK
    )
    assert r.status_code == status, r.text
    assert r.json()["error"] in ("validation_error", "malformed_msgpack")
