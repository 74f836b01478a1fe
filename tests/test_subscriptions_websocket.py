"""The subscription as a WebSocket on the same path: the same events, once, in lsn order,
from history into live; resume by ``from_lsn``; paced by the socket; bad input refused before
the upgrade as a 4xx JSON answer."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.cluster import wait_until
from tests.sse_reader import SseReader
from tests.test_subscriptions import STREAM, all_events, node, url, write
from walship.node import Node

__all__ = ["node", "url"]  # fixtures


def ws(url: str, query: str = "", **kw: Any) -> Any:
    return connect(f"ws://{url.removeprefix('http://')}{STREAM}{query}", **kw)


def receive(conn: Any, count: int) -> list[dict[str, Any]]:
    return [json.loads(conn.recv(timeout=30)) for _ in range(count)]


def test_websocket_delivers_history_then_live_and_resumes(node: Node, url: str) -> None:
    write(url, 0, 120)
    node.store.checkpoint()
    write(url, 120, 30)
    with ws(url, "?from_lsn=0") as conn:
        got = receive(conn, 150)
        write(url, 150, 20)
        got += receive(conn, 10)
    # the client left after 160 events: it resumes after the last one it has
    with ws(url, f"?from_lsn={got[-1]['lsn'] + 1}") as conn:
        got += receive(conn, 10)
        with pytest.raises(TimeoutError):
            conn.recv(timeout=0.5)  # nothing more, nothing twice
    assert got == all_events(url)


def test_websocket_filters(url: str) -> None:
    write(url, 0, 20)
    with ws(url, "?entity_id=e-1&event_type=t.a") as conn:
        want = all_events(url, entity_id="e-1", event_type="t.a")
        assert receive(conn, len(want)) == want


def test_websocket_from_a_tenant_position(url: str) -> None:
    write(url, 0, 10, tenant_id="t1")
    write(url, 10, 10, tenant_id="t2")
    write(url, 20, 10, tenant_id="t1")
    want = [e for e in all_events(url, tenant_id="t1") if e["position"] >= 8]
    assert [e["position"] for e in want] == list(range(8, 21))
    with ws(url, "?tenant_id=t1&from_position=8") as conn:
        assert receive(conn, len(want)) == want


@pytest.mark.parametrize(
    "query",
    [
        "?from_lsn=-1",
        "?from_lsn=abc",
        f"?from_lsn={2**63}",
        "?form_lsn=1",
        "?entity_id=",
        "?from_position=1",
        "?tenant_id=t1&from_position=-1",
        f"?tenant_id=t1&from_position={2**63}",
    ],
)
def test_bad_websocket_input_is_a_4xx_json_answer(url: str, query: str) -> None:
    with pytest.raises(InvalidStatus) as caught:
        ws(url, query).close()
    response = caught.value.response
    assert 400 <= response.status_code < 500
    assert json.loads(response.body)["error"] == "invalid_parameter"


def test_websocket_consumer_that_does_not_read_is_paced(
    node: Node, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pages: list[int] = []
    query = node.store.query

    def counting(flt: Any, limit: Any = None, cursor: Any = None) -> Any:
        pages.append(flt.from_lsn)
        return query(flt, limit, cursor)

    monkeypatch.setattr(node.store, "query", counting)
    blob = "x" * 16_000
    for _ in range(20):
        events = [{"entity_id": f"e{i}", "event_type": "big", "payload": blob} for i in range(100)]
        response = httpx.post(f"{url}/api/v1/events/batch", json={"events": events}, timeout=60)
        assert response.status_code == 200
    # a raw client that completes the upgrade and then reads nothing (a library client
    # would read on in a background thread)
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect((host, int(port)))
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET {STREAM} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        wait_until(lambda: len(pages) >= 2, 10, "the stream to start")
        time.sleep(1.5)  # unpaced, it would read all 40 pages of 50 events meanwhile
        assert len(pages) <= 15, pages
        sock.settimeout(30)
        total = 0
        while total < 2_000 * 16_000:
            chunk = sock.recv(1 << 20)
            assert chunk, "the stream ended"
            total += len(chunk)
        assert len(pages) >= 40
    finally:
        sock.close()
    wait_until(lambda: httpx.get(f"{url}/api/v1/stats").json()["subscriptions"] == 0, 10, "release")


def test_topic_event_types_longer_than_an_entity_id_filter_both_streams(url: str) -> None:
    """Event types are topic names up to ``event_type_chars_max`` (256), longer than entity
    ids (128): the stream filters take them (they were capped at 128), and bytes stay bytes."""
    topic = "bank.domain:" + "A" * 200 + ".Opened-v2"
    events = [
        {"entity_id": "acct", "event_type": topic, "payload": "AAH/", "payload_encoding": "base64"},
        {"entity_id": "acct", "event_type": "bank.other", "payload": 1},
    ]
    r = httpx.post(f"{url}/api/v1/events/batch", json={"events": events})
    assert r.status_code == 200, r.text
    with ws(url, f"?event_type={topic}") as conn:
        (got,) = receive(conn, 1)
    assert got["event_type"] == topic and base64.b64decode(got["payload"]) == b"\x00\x01\xff"
    prefix = "bank.domain:" + "A" * 150
    with SseReader(f"{url}{STREAM}?event_type_prefix={prefix}") as reader:
        assert [e["lsn"] for e in reader.take(1)] == [got["lsn"]]
