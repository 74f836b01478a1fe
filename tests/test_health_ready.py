"""``/health/live`` and ``/health/ready`` on real processes, in the states a load balancer must
tell apart: a follower that lost its leader, a semi-sync leader without a follower in sync, a
leader fenced by a newer term, and a leader fenced because etcd went away.

Each not-ready state answers 503 ``not_ready`` with the reasons; ``/health`` keeps answering
200 with ``status: not_ready`` and the same reasons; ``/health/live`` stays 200.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import event, health, http, post_event, replication_address, wait_until
from tests.etcd_server import EtcdServer, running_etcd
from tests.failover_cluster import FailoverCluster, promote, repoint
from walship.replication.config import parse_address
from walship.testing.process import NodeProcess
from walship.testing.proxy import FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FAST_ACKS = ["--ack-timeout-ms", "1000", "--max-lag-ms", "1000"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FailoverCluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")  # shown when a test fails
    with FailoverCluster(root) as c:
        yield c


def ready(node: NodeProcess) -> tuple[int, dict[str, Any]]:
    response = http().get(f"{node.url}/health/ready")
    body: dict[str, Any] = response.json()
    return response.status_code, body


def wait_ready(node: NodeProcess, timeout_s: float = 20.0) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        status, body = ready(node)
        return body if status == 200 else None

    body = wait_until(probe, timeout_s, f"{node.node_id} to be ready")
    assert body["ready"] is True and body["reasons"] == []
    assert health(node)["status"] == "healthy" and health(node)["not_ready"] == []
    return body


def wait_not_ready(node: NodeProcess, words: str, timeout_s: float = 20.0) -> list[str]:
    """Wait for 503 not_ready with a reason containing ``words``; the reasons. Also checks
    that ``/health`` (200) and ``/health/live`` agree."""

    def probe() -> list[str] | None:
        status, body = ready(node)
        if status != 503:
            return None
        assert body["error"] == "not_ready" and body["ready"] is False, body
        reasons: list[str] = body["reasons"]
        return reasons if any(words in r for r in reasons) else None

    reasons = wait_until(probe, timeout_s, f"{node.node_id} not ready because {words!r}")
    detail = http().get(f"{node.url}/health")
    assert detail.status_code == 200
    assert detail.json()["status"] == "not_ready" and detail.json()["ready"] is False
    assert any(words in r for r in detail.json()["not_ready"])
    live = http().get(f"{node.url}/health/live")
    assert live.status_code == 200 and live.json()["live"] is True
    return reasons


def test_follower_is_ready_only_while_connected_to_its_leader(cluster: FailoverCluster) -> None:
    leader = cluster.start_leader()
    follower = cluster.start_follower("f1", replication_address(leader))
    wait_ready(leader)
    assert wait_ready(follower)["role"] == "follower"

    address = replication_address(leader)
    leader.stop()
    reasons = wait_not_ready(follower, "not connected to its leader")
    assert "backoff" in " ".join(reasons) or "connecting" in " ".join(reasons)
    cluster.restart(leader, replication_port=parse_address(address)[1])
    wait_ready(follower, timeout_s=30)


def test_follower_behind_a_silent_link_is_not_ready_before_its_read_deadline(
    cluster: FailoverCluster,
) -> None:
    """A partition that drops packets without closing the connection (a proxy that stops
    forwarding): the follower stays connected until its read deadline (10 s) and, hearing
    nothing, counts 0 records of lag while the leader writes on. Readiness must not wait for
    the deadline: past --max-lag-ms (and two heartbeats) of silence the lag is unknown."""
    leader = cluster.start_leader()
    with FaultProxy(parse_address(replication_address(leader))) as proxy:
        follower = cluster.start_follower(
            "f1", f"127.0.0.1:{proxy.port}", args=["--max-lag-ms", "1000"]
        )
        wait_ready(follower)
        proxy.set_paused(True)
        assert post_event(leader, event(1)).status_code == 200  # the follower cannot know
        wait_not_ready(follower, "nothing heard from its leader", timeout_s=30)
        proxy.set_paused(False)
        wait_ready(follower, timeout_s=30)


def test_semi_sync_leader_is_ready_only_with_a_follower_in_sync(
    cluster: FailoverCluster,
) -> None:
    leader = cluster.start_leader(args=["--ack-mode", "semi-sync", *FAST_ACKS])
    reasons = wait_not_ready(leader, "in sync")
    assert "semi-sync" in reasons[0]
    follower = cluster.start_follower("f1", replication_address(leader))
    wait_ready(leader)
    assert post_event(leader, event(1)).json()["durability"] == "replicated"

    follower.kill()
    wait_not_ready(leader, "0 of 0 connected followers in sync")


def test_leader_fenced_by_a_newer_term_is_not_ready(cluster: FailoverCluster) -> None:
    """f1 is promoted (forced) beside the running leader; f2, once of term 2, is pointed back
    at the old leader, refuses it and so fences it."""
    leader = cluster.start_leader()
    address = replication_address(leader)
    f1 = cluster.start_follower("f1", address)
    f2 = cluster.start_follower("f2", address)
    wait_ready(leader)
    answer = promote(f1, force=True)
    repoint(f2, answer["replication_address"])
    wait_until(lambda: health(f2)["last_term"] == 2, 15, "f2 to hold term 2")
    wait_ready(f1)

    repoint(f2, address)
    wait_not_ready(leader, "is fenced")
    refused = post_event(leader, event(2))
    assert refused.status_code == 409 and refused.json()["error"] == "fenced"
    assert "leader of term 2" in refused.json()["message"]
    wait_ready(f1)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path / "etcd") as server:
        yield server


def test_leader_cut_off_from_etcd_is_not_ready_and_names_no_new_leader(
    etcd: EtcdServer, cluster: FailoverCluster
) -> None:
    with FaultProxy(("127.0.0.1", etcd.port)) as etcd_link:
        args = ["--etcd", f"http://127.0.0.1:{etcd_link.port}", "--cluster", "c1"]
        leader = cluster.start_leader(args=[*args, "--etcd-ttl-s", "2"])
        wait_until(lambda: health(leader)["election"]["holding"], 15, "the etcd leader key")
        wait_ready(leader)

        etcd_link.set_refuse(True)  # etcd is gone for this leader, and nobody else leads
        wait_not_ready(leader, "etcd")
        wait_until(lambda: health(leader)["fenced"], 15, "the leader to be fenced")
        refused = post_event(leader, event(1))
        assert refused.status_code == 409 and refused.json()["error"] == "fenced"
        message = refused.json()["message"]
        assert "write to the new leader" not in message
        assert "no newer leader is known" in message, message
        assert refused.json()["leader_url"] is None
        wait_not_ready(leader, "is fenced")
