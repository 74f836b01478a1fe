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
