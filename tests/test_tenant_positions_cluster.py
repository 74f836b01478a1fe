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
from walship.cli.process import NodeProcess

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
