"""walship.Client and walship.AsyncClient against a real uvicorn server on a free local port."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

import walship
from walship.client import AsyncClient, Client
from walship.errors import (
    IdConflict,
    InvalidParameter,
    LimitExceeded,
    NotFound,
    Unavailable,
    ValidationError,
    VersionConflict,
    WalFailed,
)
from walship.http import create_app
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.wal import FsyncPolicy

LIMITS = Limits(batch_events_max=20, query_limit_default=10, query_limit_max=100)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a port the OS picks; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    data = tmp_path_factory.mktemp("client") / "data"
    config = NodeConfig(data, fsync=FsyncPolicy.parse("never"), limits=LIMITS, checkpoints=False)
    with Node.open(config) as n:
        yield n


@pytest.fixture(scope="module")
def base_url(node: Node) -> Iterator[str]:
    with serving(create_app(node)) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[Client]:
    with Client(base_url, timeout=10) as c:
        yield c


def fresh(prefix: str) -> str:
    """An entity id no other test in this module uses (the server is shared)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_package_exports_clients_and_store() -> None:
    assert walship.Client is Client and walship.AsyncClient is AsyncClient
    from walship.store import Store, StoreConfig

    assert walship.Store is Store and walship.StoreConfig is StoreConfig
    assert walship.EventIn.__name__ == "EventIn"


def test_append_and_read_back(client: Client) -> None:
    entity = fresh("cart")
    r1 = client.append(entity, "cart.opened", {"items": 0}, metadata={"via": "test"})
    r2 = client.append(entity, "cart.changed", {"items": 2}, expected_version=1)
    assert (r1.version, r2.version) == (1, 2)
    assert r2.lsn == r1.lsn + 1 and r1.durability == "buffered" and not r1.duplicate
    page = client.query(entity_id=entity)
    assert [e.lsn for e in page.events] == [r1.lsn, r2.lsn]
    assert page.events[0].metadata == {"via": "test"} and page.events[1].payload == {"items": 2}
    state = client.entity_state(entity)
    assert (state.state, state.version, state.last_lsn) == ({"items": 2}, 2, r2.lsn)
    assert client.entity_state(entity, as_of_lsn=r1.lsn).state == {"items": 0}
    assert client.stats()["last_lsn"] >= r2.lsn
    health = client.health()
    assert health["status"] == "healthy" and health["role"] == "leader"


def test_resending_an_append_returns_the_original_receipt(client: Client) -> None:
    event_id = uuid.uuid4()
    entity = fresh("pay")
    first = client.append(entity, "payment.made", {"cents": 100}, event_id=event_id)
    again = client.append(entity, "payment.made", {"cents": 100}, event_id=str(event_id))
    assert again.duplicate and (again.lsn, again.event_id) == (first.lsn, str(event_id))
    # the id of a stored event reused for another one is refused, naming what is stored
    with pytest.raises(IdConflict) as info:
        client.append("whatever", "payment.made", {"cents": 100}, event_id=str(event_id))
    assert info.value.status == 409 and info.value.details["stored"]["lsn"] == first.lsn
    # without an explicit id every call still carries a fresh one
    a = client.append(fresh("x"), "t", 1)
    b = client.append(fresh("x"), "t", 1)
    assert a.event_id != b.event_id


def test_append_batch(client: Client) -> None:
    entity = fresh("b")
    given = str(uuid.uuid4())
    result = client.append_batch(
        [
            {"entity_id": entity, "event_type": "a.b", "payload": 1, "event_id": given},
            {"entity_id": entity, "event_type": "a.c", "payload": {"x": 1}, "tenant_id": "t1"},
        ]
    )
    assert result.count == 2 and result.receipts[0].event_id == given
    assert result.last_lsn == result.first_lsn + 1


def test_iter_query_follows_cursors(client: Client) -> None:
    entity = fresh("many")
    client.append_batch([{"entity_id": entity, "event_type": "n", "payload": i} for i in range(17)])
    events = list(client.iter_query(entity_id=entity, limit=5))
    assert [e.payload for e in events] == list(range(17))
    assert len({e.lsn for e in events}) == 17
    start = datetime.now(UTC) - timedelta(minutes=1)
    assert len(list(client.iter_query(entity_id=entity, since=start))) == 17
    assert client.query(entity_id=entity, until=start).events == []


def test_errors_raise_matching_exceptions_with_status_and_details(client: Client) -> None:
    entity = fresh("acct")
    client.append(entity, "acct.opened", {})
    with pytest.raises(VersionConflict) as conflict:
        client.append(entity, "acct.closed", {}, expected_version=0)
    assert conflict.value.status == 409
    assert conflict.value.details["current_version"] == 1
    assert conflict.value.details["expected_version"] == 0
    with pytest.raises(ValidationError) as invalid:
        client.append(entity, "Bad..Type", {})
    assert invalid.value.status == 422 and invalid.value.details["field"] == "event_type"
    with pytest.raises(NotFound) as missing:
        client.entity_state(fresh("ghost"))
    assert missing.value.status == 404 and missing.value.code == "not_found"
    with pytest.raises(LimitExceeded):
        client.append_batch([{"entity_id": "e", "event_type": "t", "payload": 1}] * 21)
    with pytest.raises(InvalidParameter) as bad_param:
        client.query(limit=0)
    assert bad_param.value.details["field"] == "limit"
    with pytest.raises(TypeError):
        client.query(entity=entity)


def test_unreachable_server_raises_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the client connects
    with Client(f"http://127.0.0.1:{port}", timeout=2) as c, pytest.raises(Unavailable) as err:
        c.health()
    assert err.value.retriable


def test_health_of_failed_wal_is_returned_not_raised(
    client: Client, node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node.store.wal, "_failed", WalFailed("disk gone"))
    health = client.health()
    assert health["status"] == "unhealthy" and health["wal_failed"] == "disk gone"
    with pytest.raises(WalFailed) as err:
        client.append("e", "t", 1)
    assert err.value.status == 503


def test_async_client_against_real_server(base_url: str) -> None:
    entity = fresh("async")

    async def run() -> list[int]:
        async with AsyncClient(base_url, timeout=10) as c:
            receipts = await asyncio.gather(*(c.append(entity, "t", i) for i in range(20)))
            batch = await c.append_batch([{"entity_id": entity, "event_type": "t", "payload": 20}])
            assert batch.count == 1
            seen = [e.lsn async for e in c.iter_query(entity_id=entity, limit=6)]
            assert (await c.entity_state(entity)).version == 21
            assert (await c.health())["status"] == "healthy"
            assert (await c.stats())["events"] >= 21
            with pytest.raises(VersionConflict):
                await c.append(entity, "t", 0, expected_version=3)
            assert [*sorted(r.lsn for r in receipts), batch.first_lsn] == seen
            return seen

    assert len(asyncio.run(run())) == 21


def test_async_client_in_process(tmp_path: Path) -> None:
    """AsyncClient over ASGITransport: the embedded app without a socket."""
    config = NodeConfig(tmp_path / "d", fsync=FsyncPolicy.parse("never"), checkpoints=False)
    with Node.open(config) as n:

        async def run() -> None:
            transport = httpx.ASGITransport(app=create_app(n))
            async with AsyncClient("http://node", transport=transport) as c:
                receipt = await c.append("e/1", "t", {"a": 1})
                assert receipt.lsn == 1
                assert (await c.entity_state("e/1")).state == {"a": 1}

        asyncio.run(run())


def test_the_client_sends_its_api_key_and_trusts_the_ca_it_is_given(tmp_path: Path) -> None:
    """``api_key`` travels as ``Authorization: Bearer``; ``ca_file`` that is not a CA file is
    a clear error, not a silent fallback to the system's CAs."""
    from walship.client import Client
    from walship.errors import InvalidInput

    seen: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"events": [], "next_cursor": None, "count": 0})

    transport = httpx.MockTransport(handle)
    with Client("http://n1:3900", api_key="wsk_0123456789ab_secret", transport=transport) as c:
        c.query(tenant_id="acme", min_lsn=0)
        assert "secret" not in repr(c)
    assert seen == ["Bearer wsk_0123456789ab_secret"]
    bogus = tmp_path / "not-a-ca.pem"
    bogus.write_text("nope")
    with pytest.raises(InvalidInput, match=r"not-a-ca\.pem"):
        Client("https://n1:3900", ca_file=bogus)
