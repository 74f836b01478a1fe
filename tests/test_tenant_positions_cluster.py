"""Tenant positions across a real cluster (``walship serve`` children on 127.0.0.1): the leader
assigns them, followers take them from the records, so after concurrent writes to several
tenants, a follower restart and a follower that joined by snapshot, every node holds the same
gapless positions; reads by position on a follower equal its full scan filtered."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import (
    HTTP_TIMEOUT_S,
    Cluster,
    get_json,
    post_batch,
    query_all,
    replication,
    replication_address,
    stats,
    wait_caught_up,
    wait_until,
)
from tests.sse_reader import SseReader
from walship.testing.process import NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TENANTS = ("alpha", "beta", "gamma")
SMALL = ["--segment-bytes-max", "65536", "--memtable-events-max", "500"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")
    with Cluster(root) as c:
        yield c
    problems = c.log_problems()
    if problems:
        pytest.fail("unhandled errors in the node logs:\n" + "\n".join(problems), pytrace=False)


def write_concurrently(node: NodeProcess, threads: int, batches: int, tag: str) -> list[str]:
    """``threads`` writers, each ``batches`` batches mixing the tenants; errors seen."""
    errors: list[str] = []

    def run(n: int) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
            for b in range(batches):
                events = [
                    {
                        "entity_id": f"{tag}-{n}-{b % 4}",
                        "event_type": "acct.credited",
                        "payload": {"n": n, "b": b, "k": k},
                        "tenant_id": TENANTS[(n + b + k) % len(TENANTS)],
                    }
                    for k in range(1 + (n + b) % 7)
                ]
                try:
                    post_batch(client, node.url, events)
                except (AssertionError, httpx.HTTPError) as exc:
                    errors.append(repr(exc))
                    return

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    return errors


def positions_by_tenant(node: NodeProcess) -> dict[str, list[tuple[int, int, str]]]:
    """Each tenant's events as ``(position, lsn, id)`` in lsn order."""
    return {
        t: [(e["position"], e["lsn"], e["id"]) for e in query_all(node, tenant_id=t)]
        for t in TENANTS
    }


def test_positions_are_gapless_and_identical_on_every_node(cluster: Cluster) -> None:
    leader = cluster.start_leader(args=SMALL)
    f1 = cluster.start_follower("f1", replication_address(leader), args=SMALL)
    assert not write_concurrently(leader, 4, 40, "a")
    f1.stop()  # restarted while the leader keeps taking writes
    assert not write_concurrently(leader, 3, 30, "b")
    cluster.restart(f1)
    assert not write_concurrently(leader, 4, 30, "c")
    wait_until(
        lambda: stats(leader)["wal_first_lsn"] > 500,
        60,
        "checkpoints to remove the leader's early WAL segments",
    )
    f2 = cluster.start_follower("f2", replication_address(leader), args=SMALL)
    wait_until(lambda: replication(f2)["snapshots_received"] >= 1, 60, "f2's snapshot")
    assert not write_concurrently(leader, 2, 20, "d")
    wait_caught_up(leader, f1, f2, timeout_s=60)

    expected = positions_by_tenant(leader)
    for tenant, events in expected.items():
        assert [p for p, _, _ in events] == list(range(1, len(events) + 1)), tenant
        answer = get_json(leader, f"/api/v1/tenants/{tenant}/position")
        assert answer == {"tenant_id": tenant, "position": len(events), "lsn": events[-1][1]}
    for follower in (f1, f2):
        assert positions_by_tenant(follower) == expected, follower.node_id
        for tenant, events in expected.items():
            answer = get_json(follower, f"/api/v1/tenants/{tenant}/position")
            assert answer["position"] == len(events), (follower.node_id, tenant)

    # by position on the follower that installed a snapshot: parts it was sent, then its WAL
    full = query_all(f2)
    for tenant, lo, hi in (("alpha", 1, 50), ("beta", 37, None), ("gamma", 100, 260)):
        want = [
            e
            for e in full
            if e["tenant_id"] == tenant
            and e["position"] >= lo
            and (hi is None or e["position"] <= hi)
        ]
        params: dict[str, Any] = {"tenant_id": tenant, "from_position": lo}
        if hi is not None:
            params["to_position"] = hi
        assert want and query_all(f2, **params) == want, (tenant, lo, hi)

    # a subscription by position: history, then a live event, on a follower
    beta = [e for e in full if e["tenant_id"] == "beta"]
    start = len(beta) - 30
    with SseReader(f"{f1.url}/api/v1/events/stream?tenant_id=beta&from_position={start}") as sub:
        got = sub.take(31)
        assert [e["position"] for e in got] == list(range(start, len(beta) + 1))
        assert got == [e for e in query_all(f1, tenant_id="beta") if e["position"] >= start]
        receipt = post_batch(
            httpx.Client(timeout=HTTP_TIMEOUT_S),
            leader.url,
            [{"entity_id": "live", "event_type": "x.y", "payload": {}, "tenant_id": "beta"}],
        )["receipts"][0]
        assert receipt["position"] == len(beta) + 1
        live = sub.take(1)[0]
        assert (live["position"], live["lsn"]) == (len(beta) + 1, receipt["lsn"])


def consumer(node: NodeProcess, name: str, tenant: str) -> dict[str, Any]:
    body: dict[str, Any] = get_json(node, f"/api/v1/consumers/{name}", tenant_id=tenant)
    return body


def test_consumer_positions_replicate_and_survive_restart_and_snapshot(cluster: Cluster) -> None:
    """Tracking records go to followers in the WAL; one that the leader's WAL no longer
    holds reaches a late follower inside the snapshot's manifest. A refused tracking stores
    nothing on any node."""
    leader = cluster.start_leader(args=SMALL)
    f1 = cluster.start_follower("f1", replication_address(leader), args=SMALL)
    client = httpx.Client(timeout=HTTP_TIMEOUT_S)
    early = {"consumer": "early", "position": 42, "tenant_id": "beta"}
    response = client.post(f"{leader.url}/api/v1/events/batch", json={"tracking": early})
    assert response.status_code == 200, response.text
    early_lsn = response.json()["tracking"]["lsn"]
    for n in range(1, 61):
        events = [
            {"entity_id": f"acct-{n % 5}", "event_type": "acct.credited",
             "payload": {"n": n, "pad": "x" * 300}, "tenant_id": "alpha"}
            for _ in range(10)
        ]  # fmt: skip
        body = {
            "events": events,
            "tracking": {"consumer": "proj", "position": n, "tenant_id": "beta"},
        }
        response = client.post(f"{leader.url}/api/v1/events/batch", json=body)
        assert response.status_code == 200, response.text
    refused = client.post(
        f"{leader.url}/api/v1/events/batch",
        json={
            "events": events,
            "tracking": {"consumer": "proj", "position": 60, "tenant_id": "beta"},
        },
    )
    assert refused.status_code == 409 and refused.json()["stored_position"] == 60
    wait_until(
        lambda: stats(leader)["wal_first_lsn"] > early_lsn,
        60,
        "checkpoints to remove the early tracking record from the leader's WAL",
    )
    f1.stop()
    cluster.restart(f1)
    f2 = cluster.start_follower("f2", replication_address(leader), args=SMALL)
    wait_until(lambda: replication(f2)["snapshots_received"] >= 1, 60, "f2's snapshot")
    wait_caught_up(leader, f1, f2, timeout_s=60)
    want_early = {**early, "lsn": early_lsn}
    want_proj = consumer(leader, "proj", "beta")
    assert want_proj["position"] == 60
    for node in (leader, f1, f2):
        assert consumer(node, "early", "beta") == want_early, node.node_id
        assert consumer(node, "proj", "beta") == want_proj, node.node_id
        # the refused batch took nothing: 600 events, positions 1..600, none from it
        alpha = query_all(node, tenant_id="alpha")
        assert [e["position"] for e in alpha] == list(range(1, 601)), node.node_id
        missing = client.get(f"{node.url}/api/v1/consumers/proj", params={"tenant_id": "alpha"})
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    client.close()
