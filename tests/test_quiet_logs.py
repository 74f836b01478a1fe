"""Log lines at ``info`` are about changes: an idle cluster says nothing.

With automatic failover on, the etcd client polls the leader key (followers, every 0.2 s) and
renews the lease (the leader, every TTL/3); httpx logged each of those requests at info, ~5
lines a second from an idle follower. Checked on real processes and a real etcd: once the
cluster has settled, a few seconds of nothing happening add no line to either node's log.
And a follower whose leader is gone says so once, not at every reconnect attempt.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import health, replication, replication_address, wait_until
from tests.etcd_server import EtcdServer, free_port, running_etcd
from tests.failover_cluster import FailoverCluster
from walship.testing.process import NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

IDLE_S = 3.0


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FailoverCluster]:
    with FailoverCluster(tmp_path / "cluster") as c:
        yield c


def log_lines(node: NodeProcess) -> list[str]:
    return node.log_path.read_text(errors="replace").splitlines()


def in_sync_members(node: NodeProcess) -> list[str] | None:
    record = replication(node)["in_sync_set"]["record"]
    return None if record is None else list(record["members"])


def test_an_idle_cluster_on_etcd_logs_nothing_at_info(
    etcd: EtcdServer, cluster: FailoverCluster
) -> None:
    election = ["--etcd", etcd.url, "--cluster", "quiet", "--etcd-ttl-s", "2"]
    election += ["--log-level", "info"]
    leader = cluster.start_leader(args=election)
    wait_until(lambda: health(leader)["election"]["holding"], 10, "the leader to hold the key")
    follower = cluster.start_follower("f1", replication_address(leader), args=election)
    wait_until(lambda: replication(follower)["state"] == "streaming", 20, "f1 to stream")
    wait_until(lambda: health(follower)["election"]["state"], 10, "f1's election to run")
    # f1 joining the in-sync set is a change worth its info line: let it land before the window
    wait_until(lambda: in_sync_members(leader) == ["f1"], 20, "the in-sync set naming f1")

    before = {node.node_id: len(log_lines(node)) for node in (leader, follower)}
    time.sleep(IDLE_S)  # the observation window: what an idle node logs in it
    added = {node.node_id: log_lines(node)[before[node.node_id] :] for node in (leader, follower)}
    assert all(not lines for lines in added.values()), f"an idle node logged in {IDLE_S} s: {added}"


def test_a_follower_whose_leader_is_gone_says_so_once(cluster: FailoverCluster) -> None:
    """Nothing listens at the leader's address: every attempt fails the same way; the log
    says it once (the attempts are counted in /health and the metrics)."""
    follower = cluster.start_follower("f1", f"127.0.0.1:{free_port()}")
    wait_until(lambda: replication(follower)["reconnects"] >= 4, 30, "a few reconnect attempts")
    failures = [line for line in log_lines(follower) if "connection to 127.0.0.1:" in line]
    assert len(failures) == 1, failures
    assert "ConnectionRefusedError" in replication(follower)["last_error"]
