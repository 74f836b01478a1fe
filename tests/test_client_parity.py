"""``Client``/``AsyncClient`` parity with the HTTP API (issue 13 item 6): bytes payloads,
per-call ack mode, ``min_lsn`` on every read; and retries that are safe: transport errors and
503s are sent again with the same event ids (stored once), a bounded number of times, and a
4xx never. The server is real (uvicorn in a thread), reached through a TCP proxy that refuses
connections or cuts them after the request was served."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_client import serving
from walship.client import AsyncClient, Client
from walship.client_routing import RetryPolicy
from walship.errors import (
    InvalidInput,
    InvalidParameter,
    NotFound,
    TrackingConflict,
    Unavailable,
    UnmeetableAckMode,
    ValidationError,
    VersionConflict,
    WaitTimeout,
)
from walship.http import create_app
from walship.node import Node, NodeConfig
from walship.testing.proxy import FaultProxy
from walship.wal import FsyncPolicy

BLOB = bytes(range(256)) * 3
QUICK = RetryPolicy(attempts_max=40, deadline_s=20, backoff_min_s=0.02, backoff_max_s=0.2)
ONCE = RetryPolicy(attempts_max=1)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node.open(NodeConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never")))
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def url(node: Node) -> Iterator[str]:
    with serving(create_app(node)) as base:
        yield base


@pytest.fixture
def proxy(url: str) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as p:
        yield p


def via(proxy: FaultProxy) -> str:
    return f"http://127.0.0.1:{proxy.port}"


class Counting(httpx.HTTPTransport):
    """A real transport that counts the requests it sends, and answers a bare 503 (as a
    proxy or load balancer would) to the first ``unavailable`` of them."""

    def __init__(self, unavailable: int = 0) -> None:
        super().__init__()
        self.sent: list[httpx.Request] = []
        self.unavailable = unavailable

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        if self.unavailable > 0:
            self.unavailable -= 1
            return httpx.Response(503, text="upstream unavailable", request=request)
        return super().handle_request(request)


def stored(node: Node, entity: str) -> int:
    return node.store.entity_version(entity)


def test_bytes_payloads_round_trip_through_every_client_read(url: str) -> None:
    with Client(url) as client:
        receipt = client.append("b", "blob:Stored-v1", BLOB)
        batch = client.append_batch([{"entity_id": "b", "event_type": "t", "payload": b"\x00"}])
        assert client.event(receipt.event_id).payload == BLOB
        assert [e.payload for e in client.iter_query(entity_id="b")] == [BLOB, b"\x00"]
        assert [e.payload for e in client.entity_events("b").events] == [BLOB, b"\x00"]
        assert client.entity_state("b").state == b"\x00"
        assert client.event(receipt.event_id).event_type == "blob:Stored-v1"
        stream = client.subscribe(entity_id="b")
        assert [next(stream).payload, next(stream).payload] == [BLOB, b"\x00"]
        stream.close()  # type: ignore[attr-defined]
        json_event = client.append("j", "t", "aGk=")  # a str stays a JSON string
        assert client.event(json_event.event_id).payload == "aGk="
        assert batch.last_lsn == receipt.lsn + 1

    async def run() -> None:
        async with AsyncClient(url) as client:
            r = await client.append("a", "t", BLOB)
            assert (await client.event(r.event_id)).payload == BLOB
            assert [e.payload async for e in client.iter_query(entity_id="a")] == [BLOB]
            assert (await client.entity_state("a")).state == BLOB
            async for event in client.subscribe(entity_id="a"):
                assert event.payload == BLOB
                break

    asyncio.run(run())


def test_every_read_takes_min_lsn_and_a_write_its_ack_mode(url: str, node: Node) -> None:
    with Client(url, retry=ONCE) as client:
        r = client.append("p", "t", 1, ack_mode="async")  # weaker than the node's: accepted
        far = r.lsn + 1_000
        wait = {"min_lsn": far, "min_lsn_wait_ms": 50}
        for call in (
            lambda: client.query(entity_id="p", **wait),
            lambda: client.entity_state("p", **wait),
            lambda: client.entity_events("p", **wait),
            lambda: client.entity_version("p", **wait),
            lambda: client.event(r.event_id, **wait),
        ):
            with pytest.raises(WaitTimeout):
                call()
        assert client.entity_version("p", min_lsn=r.lsn) == 1
    with Client(url) as client:  # retries do not repeat a wait that expired: raised at once
        started = time.monotonic()
        with pytest.raises(WaitTimeout):
            client.event(r.event_id, **wait)
        assert time.monotonic() - started < 5
    with Client(url, retry=ONCE) as client:
        with pytest.raises(UnmeetableAckMode):  # the mode reached the server, nothing stored
            client.append("p", "t", 2, ack_mode="quorum:5")
        with pytest.raises(InvalidInput):
            client.append_batch([{"entity_id": "p", "event_type": "t", "payload": 3}], ack_mode="x")
        assert stored(node, "p") == 1
        with pytest.raises(TypeError):
            client.query(nonsense=1)

    async def run() -> None:
        async with AsyncClient(url, retry=ONCE) as client:
            with pytest.raises(WaitTimeout):
                await client.event(r.event_id, min_lsn=far, min_lsn_wait_ms=50)
            with pytest.raises(UnmeetableAckMode):
                await client.append("p", "t", 2, ack_mode="quorum:5")
            assert (await client.append("p", "t", 2, ack_mode="async")).version == 2

    asyncio.run(run())


def test_a_write_whose_answer_is_lost_is_sent_again_and_stored_once(
    proxy: FaultProxy, node: Node
) -> None:
    with Client(via(proxy), retry=QUICK) as client:
        proxy.cut_next_answers(2)  # stored twice over, both answers lost
        receipt = client.append("lost", "t", BLOB)
        batch_ids = [str(uuid.uuid4()) for _ in range(3)]
        proxy.cut_next_answers(1)
        batch = client.append_batch(
            [{"id": i, "entity_id": "lost", "event_type": "t", "payload": 1} for i in batch_ids]
        )
    assert proxy.state.dropped_connections == 3
    assert receipt.duplicate and batch.receipts[0].duplicate
    assert [r.event_id for r in batch.receipts] == batch_ids
    assert stored(node, "lost") == 4  # one event and a batch of three, each stored once

    async def run() -> None:
        async with AsyncClient(via(proxy), retry=QUICK) as client:
            proxy.cut_next_answers(1)
            assert (await client.append("lost-async", "t", 1)).duplicate

    asyncio.run(run())
    assert stored(node, "lost-async") == 1


def test_calls_wait_out_a_server_that_is_down_with_bounded_backoff(
    proxy: FaultProxy, node: Node
) -> None:
    proxy.set_refuse(True)
    results: dict[str, Any] = {}

    def call(name: str, fn: Any) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.__setitem__(name, fn()))
        thread.start()
        return thread

    with Client(via(proxy), retry=QUICK) as client:
        threads = [
            call("append", lambda: client.append("down", "t", 1)),
            call("query", lambda: client.query(entity_id="down", min_lsn=1)),
        ]
        time.sleep(0.5)  # several refused rounds
        assert not results
        proxy.heal()
        for t in threads:
            t.join(30)
    assert results["append"].lsn == 1 and not results["append"].duplicate
    assert [e.lsn for e in results["query"].events] == [1]
    assert stored(node, "down") == 1

    counting = Counting()
    proxy.set_refuse(True)
    bounded = RetryPolicy(attempts_max=3, deadline_s=20, backoff_min_s=0.01, backoff_max_s=0.02)
    with Client(via(proxy), retry=bounded, transport=counting) as client:
        with pytest.raises(Unavailable):
            client.append("down", "t", 2)
        writes = [r for r in counting.sent if r.method == "POST"]
        assert len(writes) == 3 and len({w.content for w in writes}) == 1
        counting.sent.clear()
        with pytest.raises(Unavailable):
            client.query()
        assert len([r for r in counting.sent if r.url.path == "/api/v1/events/query"]) == 3
    assert stored(node, "down") == 1


def test_a_bare_503_is_retried_and_a_4xx_never(url: str, node: Node) -> None:
    transport = Counting(unavailable=2)
    with Client(url, retry=QUICK, transport=transport) as client:
        assert client.append("503", "t", 1).version == 1
        assert len(transport.sent) == 3
        transport.unavailable = 2
        assert client.entity_version("503") == 1
        transport.sent.clear()
        for bad, raised in (
            (lambda: client.append("503", "t", 2, expected_version=0), VersionConflict),
            (lambda: client.append("503", "Bad Type", 2), ValidationError),
            (lambda: client.query(limit=10**9), InvalidParameter),
        ):
            with pytest.raises(raised):
                bad()
        calls = [r for r in transport.sent if r.url.path != "/health"]
        assert len(calls) == 3  # one request each
    assert stored(node, "503") == 1


def test_tenant_positions_and_tracking_through_the_client(url: str) -> None:
    with Client(url) as client:
        for i in range(5):
            client.append(f"e{i}", "t", i, tenant_id="app")
        assert client.tenant_position("app").position == 5
        assert [e.position for e in client.iter_query(tenant_id="app", from_position=3)] == [
            3,
            4,
            5,
        ]
        page = client.query(tenant_id="app", from_position=2, to_position=3)
        assert [e.payload for e in page.events] == [1, 2]
        stream = client.subscribe(tenant_id="app", from_position=4)
        assert [next(stream).position, next(stream).position] == [4, 5]
        stream.close()  # type: ignore[attr-defined]
        track = {"consumer": "projector", "position": 5, "tenant_id": "app"}
        done = client.append_batch(
            [{"entity_id": "out", "event_type": "t", "payload": 1, "tenant_id": "app"}],
            tracking=track,
        )
        assert done.tracking is not None and done.receipts[0].position == 6
        assert client.consumer_position("projector", tenant_id="app").position == 5
        with pytest.raises(TrackingConflict):
            client.append_batch([], tracking={**track, "position": 4})
        repeat = client.append_batch([], tracking=track)  # a retry: answered as before
        assert repeat.tracking is not None and repeat.tracking["duplicate"]
        assert repeat.tracking["lsn"] == done.tracking["lsn"]
        with pytest.raises(NotFound):
            client.consumer_position("nobody", tenant_id="app")

    async def run() -> None:
        async with AsyncClient(url) as client:
            assert (await client.tenant_position("app")).position == 6
            await client.append_batch([], tracking={**track, "position": 6})
            assert (await client.consumer_position("projector", tenant_id="app")).position == 6

    asyncio.run(run())


def test_async_subscribe_resumes_after_the_connection_is_cut(proxy: FaultProxy, url: str) -> None:
    """The async iterator reconnects after a cut and goes on after the last event it
    yielded: every event once, in lsn order (the sync one is tested in
    test_client_subscribe)."""
    with Client(url) as writer:
        first = writer.append_batch(
            [{"entity_id": "s", "event_type": "t", "payload": i} for i in range(20)]
        )

        async def run() -> list[int]:
            got: list[int] = []
            async with AsyncClient(via(proxy)) as client:
                async for event in client.subscribe(entity_id="s"):
                    got.append(event.lsn)
                    if len(got) == 10:
                        proxy.cut()  # under the reader, in the middle of the history
                    if len(got) == 15:
                        await asyncio.to_thread(
                            writer.append_batch,
                            [{"entity_id": "s", "event_type": "t", "payload": b"x"}] * 5,
                        )
                    if len(got) == 25:
                        return got
            raise AssertionError("the subscription ended")

        got = asyncio.run(asyncio.wait_for(run(), 60))
        assert got == [e.lsn for e in writer.iter_query(entity_id="s")]
    assert proxy.state.connections >= 2  # it did connect again
    assert got[:20] == [r.lsn for r in first.receipts]
