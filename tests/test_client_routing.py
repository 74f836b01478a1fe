"""How ``Client``/``AsyncClient`` route requests in a cluster, at unit level: nodes are played
by an httpx ``MockTransport`` that answers ``/health`` and the write and read paths the way
walship nodes do (the real failover is in ``test_client_failover.py``)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest

from walship.client import AsyncClient, Client
from walship.client_routing import ReadFrom, RetryPolicy, Router
from walship.errors import AckTimeout, Fenced, ReadOnly, Unavailable, VersionConflict
from walship.peers import PeerView

A, B, C = "http://a:3900", "http://b:3900", "http://c:3900"
FAST = RetryPolicy(attempts_max=6, deadline_s=5.0, backoff_min_s=0.0, backoff_max_s=0.001)


@dataclass
class FakeNode:
    """One node as the client sees it: its health document and how it answers writes."""

    url: str
    role: str = "follower"
    term: int = 1
    fenced: str | None = None
    leader_url: str | None = None
    down: bool = False
    stored: dict[str, int] = field(default_factory=dict)  # event id -> lsn
    next_lsn: int = 1
    write_error: dict[str, Any] | None = None  # an error body every write is answered with

    def health(self) -> dict[str, Any]:
        return {
            "status": "healthy",
            "ready": True,
            "role": self.role,
            "node_id": self.url[7],
            "term": self.term,
            "fenced": self.fenced,
            "replication": {"leader_url": self.leader_url},
        }

    def write(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.write_error is not None:
            return 409 if self.write_error["error"] != "ack_timeout" else 503, self.write_error
        if self.role != "leader":
            return 409, {"error": "read_only", "message": "follower", "leader_url": self.leader_url}
        if self.fenced is not None:
            return 409, {"error": "fenced", "message": "fenced", "leader_url": None}
        event_id = body["id"]
        duplicate = event_id in self.stored
        if not duplicate:
            self.stored[event_id] = self.next_lsn
            self.next_lsn += 1
        return 200, receipt(event_id, self.stored[event_id], self.term, duplicate)


def receipt(event_id: str, lsn: int, term: int, duplicate: bool = False) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "lsn": lsn,
        "term": term,
        "version": 1,
        "timestamp": "2026-01-01T00:00:00Z",
        "durability": "local",
        "duplicate": duplicate,
    }


class FakeCluster:
    """Nodes by URL, and every request the client sent, in order."""

    def __init__(self, *nodes: FakeNode) -> None:
        self.nodes = {n.url: n for n in nodes}
        self.sent: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        node = self.nodes.get(f"{request.url.scheme}://{request.url.host}:{request.url.port}")
        if node is None or node.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path == "/health":
            return httpx.Response(200, json=node.health())
        if path == "/api/v1/events":
            status, body = node.write(msgspec.json.decode(request.content))
            return httpx.Response(status, json=body)
        if path == "/api/v1/events/query":
            min_lsn = request.url.params.get("min_lsn")
            # c is a follower that never catches up in these tests
            if node.url == C and min_lsn is not None and int(min_lsn) > 0:
                return httpx.Response(504, json={"error": "wait_timeout", "message": "late"})
            return httpx.Response(200, json={"events": [], "next_cursor": None, "count": 0})
        return httpx.Response(404, json={"error": "not_found", "message": path})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def writes(self) -> list[httpx.Request]:
        return [r for r in self.sent if r.url.path == "/api/v1/events"]


def test_router_picks_the_unfenced_leader_of_the_highest_term() -> None:
    router = Router([A, B, C])
    assert router.leader is None and router.needs_discovery()
    views = [
        PeerView(A, health={"role": "leader", "term": 1, "fenced": "deposed", "status": "healthy"}),
        PeerView(B, health={"role": "leader", "term": 3, "fenced": None, "status": "healthy"}),
        PeerView(C, error="refused"),
    ]
    assert router.learn(views) == []
    assert router.leader == B
    # a leader whose WAL failed is no leader to write to
    router.learn([PeerView(B, health={"role": "leader", "term": 3, "status": "unhealthy"})])
    assert router.leader == B  # nothing better was seen: the belief stays until a write fails


def test_router_asks_the_leader_a_follower_names_when_none_of_the_urls_leads() -> None:
    router = Router([A, B])
    hinted = router.learn(
        [
            PeerView(A, health={"role": "follower", "replication": {"leader_url": C + "/"}}),
            PeerView(B, error="refused"),
        ]
    )
    assert hinted == [C] and router.leader is None and router.followers == [A]


def test_one_url_is_taken_as_the_leader_without_asking() -> None:
    router = Router("http://a:3900/")
    assert router.urls == [A] and router.leader == A and not router.needs_discovery()
    with pytest.raises(ValueError):
        Router([])


def test_retry_policy_backoff_is_jittered_and_capped() -> None:
    policy = RetryPolicy(backoff_min_s=0.05, backoff_max_s=1.0)
    rng = random.Random(7)
    for waits in range(1, 30):
        assert 0.05 <= policy.backoff_s(waits, rng) <= min(1.0, 0.05 * 2 ** (waits - 1))
    with pytest.raises(ValueError):
        RetryPolicy(attempts_max=0)


def test_client_finds_the_leader_among_several_urls() -> None:
    cluster = FakeCluster(
        FakeNode(A, leader_url=B), FakeNode(B, role="leader", term=2), FakeNode(C, down=True)
    )
    with Client([A, B, C], transport=cluster.transport(), retry=FAST) as client:
        r = client.append("e", "t", 1)
        assert (r.lsn, r.term) == (1, 2) and client.leader_url == B
        assert [str(w.url) for w in cluster.writes()] == [f"{B}/api/v1/events"]
        client.append("e", "t", 2)  # the leader is remembered: no more /health
        assert sum(r.url.path == "/health" for r in cluster.sent) == 3


def test_a_409_leader_url_is_followed_with_the_same_bytes() -> None:
    """One URL, a follower: the write goes on to the leader its 409 names (not in the list)."""
    cluster = FakeCluster(FakeNode(A, leader_url=B), FakeNode(B, role="leader"))
    with Client(A, transport=cluster.transport(), retry=FAST) as client:
        r = client.append("e", "t", {"x": 1})
        assert r.lsn == 1 and client.leader_url == B
    first, second = cluster.writes()
    assert (first.url.host, second.url.host) == ("a", "b")
    assert first.content == second.content  # the same event id, byte for byte
    assert not any(r.url.path == "/health" for r in cluster.sent)


def test_write_retried_through_a_failover_is_stored_once() -> None:
    """The first send is stored, then the leader fails before the client hears of it. The
    client finds the new leader, which already holds the event (replicated): the retry is
    answered duplicate, with the original lsn."""
    old = FakeNode(A, role="leader")
    new = FakeNode(B, leader_url=A)
    cluster = FakeCluster(old, new)
    real_handle = cluster.handle

    def handle(request: httpx.Request) -> httpx.Response:
        response = real_handle(request)
        if request.url.path == "/api/v1/events" and request.url.host == "a":
            # stored on a and replicated to b; then a dies and b is promoted
            new.stored = dict(old.stored)
            new.next_lsn = old.next_lsn
            old.down, new.role, new.term = True, "leader", 2
            raise httpx.ReadError("connection reset", request=request)
        return response

    with Client([A, B], transport=httpx.MockTransport(handle), retry=FAST) as client:
        r = client.append("e", "t", 1)
    assert r.duplicate and r.lsn == 1
    assert len(new.stored) == 1
    assert len({w.content for w in cluster.writes()}) == 1


def test_fenced_leader_without_successor_is_retried_until_a_leader_appears() -> None:
    fenced = FakeNode(A, role="leader", fenced="etcd lease lost")
    later = FakeNode(B)
    cluster = FakeCluster(fenced, later)
    probes = 0
    real_handle = cluster.handle

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal probes
        if request.url.path == "/health":
            probes += 1
            if probes == 5:  # a few rounds later b is elected
                later.role = "leader"
        return real_handle(request)

    with Client([A, B], transport=httpx.MockTransport(handle), retry=FAST) as client:
        assert client.append("e", "t", 1).lsn == 1
    assert client.leader_url == B and fenced.stored == {}


def test_retries_are_bounded() -> None:
    cluster = FakeCluster(FakeNode(A, down=True), FakeNode(B, down=True))
    client = Client([A, B], transport=cluster.transport(), retry=FAST)
    with client, pytest.raises(Unavailable):
        client.append("e", "t", 1)
    assert len(cluster.writes()) == FAST.attempts_max
    client = Client(A, transport=cluster.transport(), retry=RetryPolicy(attempts_max=1))
    with client, pytest.raises(Unavailable):
        client.append("e", "t", 1)
    assert len(cluster.writes()) == FAST.attempts_max + 1


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        ({"error": "version_conflict", "message": "v", "current_version": 2}, VersionConflict),
        ({"error": "ack_timeout", "message": "committed locally", "lsn": 9}, AckTimeout),
    ],
)
def test_answers_about_the_write_itself_are_not_retried(
    error: dict[str, Any], raised: type[Exception]
) -> None:
    cluster = FakeCluster(FakeNode(A, role="leader", write_error=error))
    client = Client(A, transport=cluster.transport(), retry=FAST)
    with client, pytest.raises(raised):
        client.append("e", "t", 1)
    assert len(cluster.writes()) == 1


def test_read_only_without_any_leader_gives_up_with_the_409() -> None:
    cluster = FakeCluster(FakeNode(A), FakeNode(B))
    client = Client([A, B], transport=cluster.transport(), retry=FAST)
    with client, pytest.raises(ReadOnly) as err:
        client.append("e", "t", 1)
    assert not isinstance(err.value, Fenced) and err.value.status == 409


def test_follower_reads_wait_for_the_clients_last_write() -> None:
    cluster = FakeCluster(
        FakeNode(A, role="leader"), FakeNode(B, leader_url=A), FakeNode(C, leader_url=A)
    )
    with Client(
        [A, B, C], transport=cluster.transport(), retry=FAST, read_from=ReadFrom.FOLLOWERS
    ) as client:
        client.query(entity_id="e")  # before any write: no min_lsn anywhere
        client.append("e", "t", 1)
        client.append("e", "t", 2)
        assert client.last_write_lsn == 2
        for _ in range(4):
            client.query(entity_id="e")
    reads = [r for r in cluster.sent if r.url.path == "/api/v1/events/query"]
    assert "min_lsn" not in reads[0].url.params
    later = reads[1:]
    # reads went to followers with min_lsn=2 (the leader, only when tried, without it);
    # c never catches up (504), so those reads went on to the next node
    for r in later:
        if r.url.host == "a":
            assert "min_lsn" not in r.url.params
        else:
            assert r.url.params["min_lsn"] == "2"
    assert {r.url.host for r in later} >= {"b", "c"}
    served_by = [r.url.host for r in later if r.url.host != "c"]
    assert served_by and all(h in ("a", "b") for h in served_by)


def test_read_your_writes_can_be_turned_off() -> None:
    cluster = FakeCluster(FakeNode(A, role="leader"), FakeNode(B, leader_url=A))
    with Client(
        [A, B], transport=cluster.transport(), read_from="followers", read_your_writes=False
    ) as client:
        client.append("e", "t", 1)
        client.query()
    read = next(r for r in cluster.sent if r.url.path == "/api/v1/events/query")
    assert read.url.host == "b" and "min_lsn" not in read.url.params


def test_async_client_finds_the_leader_and_follows_409() -> None:
    cluster = FakeCluster(
        FakeNode(A, leader_url=B), FakeNode(B, role="leader", term=4), FakeNode(C, down=True)
    )

    async def run() -> None:
        async with AsyncClient([C, A, B], transport=cluster.transport(), retry=FAST) as client:
            receipts = await asyncio.gather(*(client.append("e", "t", i) for i in range(5)))
            assert sorted(r.lsn for r in receipts) == [1, 2, 3, 4, 5]
            assert client.leader_url == B
        async with AsyncClient(A, transport=cluster.transport(), retry=FAST) as client:
            r = await client.append("e", "t", 9)
            assert (r.lsn, client.leader_url) == (6, B)

    asyncio.run(run())
