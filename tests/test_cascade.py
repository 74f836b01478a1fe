"""Cascading catch-up with real processes: followers fetch snapshots from a serving follower.

A follower started with ``--serve-snapshots`` serves its own checkpoint to followers that need
a snapshot; the leader redirects them there (or they name it, ``--catch-up-from``) and only
vouches for the staged position. What must hold: the leader sends no snapshot bytes at all,
the new follower ends with the leader's records byte for byte, and a source that is down or
not on the leader's history costs a fallback to the leader, never a wrong install.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import (
    Cluster,
    assert_same_query_results,
    assert_same_wal,
    handshake_with_secret,
    health,
    http,
    raw_connection,
    read_until_closed,
    refusal,
    replication,
    replication_address,
    stats,
    wait_caught_up,
    wait_until,
    write_events,
)
from tests.failover_cluster import FailoverCluster, promote
from walship.testing.process import NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# small segments and memtables: checkpoints remove the leader's early WAL after a few
# thousand writes, so a new follower needs a snapshot
SMALL = ["--segment-bytes-max", "65536", "--memtable-events-max", "1000"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")  # shown when a test fails
    with Cluster(root) as c:
        yield c
    problems = c.log_problems()
    if problems:
        pytest.fail("unhandled errors in the node logs:\n" + "\n".join(problems), pytrace=False)


def metric(node: NodeProcess, name: str) -> float:
    """The value of the unlabelled sample ``name`` in the node's /metrics (0 when absent)."""
    text = http().get(f"{node.url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return 0.0


LEADER_SNAPSHOT_BYTES = "walship_replication_snapshot_bytes_total"


def leader_without_early_wal(
    cluster: Cluster, serving: bool
) -> tuple[NodeProcess, NodeProcess | None]:
    """A leader whose checkpoints removed its early WAL; with ``serving``, a follower that
    joined from lsn 1 (it streamed the WAL, no snapshot) and serves snapshots."""
    leader = cluster.start_leader(args=SMALL)
    f1 = None
    if serving:
        f1 = cluster.start_follower(
            "f1",
            replication_address(leader),
            args=[*SMALL, "--serve-snapshots", "--replication-port", "0"],
        )
    write_events(leader, 6_000)
    wait_until(
        lambda: stats(leader)["wal_first_lsn"] > 1001,
        30,
        "checkpoints to remove the leader's early WAL segments",
    )
    if f1 is not None:
        wait_caught_up(leader, f1)
    return leader, f1


def serving_address(node: NodeProcess) -> str:
    address = replication(node)["serving_snapshots"]["address"]
    assert isinstance(address, str)
    return address


def assert_clean_stop(cluster: Cluster) -> None:
    codes = cluster.stop_all()
    assert codes and all(code == 0 for code in codes.values()), codes


def test_new_follower_catches_up_from_a_followers_snapshot_without_the_leader_sending_one(
    cluster: Cluster,
) -> None:
    """f2 needs a snapshot; the leader redirects it to f1 (in sync, serving), vouches for the
    staged position and streams the WAL after it. The leader sends no snapshot byte; f2 ends
    with the leader's records byte for byte and says who served it."""
    leader, f1 = leader_without_early_wal(cluster, serving=True)
    assert f1 is not None
    source = serving_address(f1)
    wait_until(
        lambda: any(
            s.get("serves_snapshots") == source and s["in_sync"]
            for s in replication(leader)["followers"]
        ),
        30,
        "the leader to know f1 serves snapshots",
    )

    f2 = cluster.start_follower("f2", replication_address(leader), args=SMALL)
    wait_until(lambda: replication(f2)["snapshots_received"] >= 1, 60, "f2 to install a snapshot")
    status = replication(f2)
    assert status["snapshot_source"] == source
    assert status["snapshot_fallbacks"] == 0
    assert status["snapshot"] is None

    write_events(leader, 2_000, start=6_000)  # streamed from the leader's WAL
    assert wait_caught_up(leader, f1, f2) == 8_000
    assert metric(leader, LEADER_SNAPSHOT_BYTES) == 0
    assert metric(leader, "walship_replication_snapshots_redirected_total") >= 1
    assert metric(leader, "walship_replication_snapshots_confirmed_total") >= 1
    assert metric(f1, LEADER_SNAPSHOT_BYTES) > 0
    assert replication(f1)["serving_snapshots"]["snapshots_served"] >= 1
    assert metric(f2, "walship_replication_snapshots_from_followers_total") == 1
    assert stats(f2)["checkpoint_lsn"] >= 1_000
    assert assert_same_query_results(leader, f2) == 8_000

    # the serving follower authenticates peers as the leader does: a wrong secret is refused
    with raw_connection(source) as sock:
        handshake_with_secret(sock, b"not-the-secret", "intruder")
        refused = refusal(read_until_closed(sock))
        assert refused is not None and refused.code == "authentication_failed", refused
    assert metric(f1, "walship_replication_auth_failures_total") == 1

    assert_clean_stop(cluster)
    compared = assert_same_wal(cluster.data_dir("leader"), cluster.data_dir("f2"), whole=False)
    assert compared >= 1


def free_port() -> int:
    """A port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_catch_up_from_a_source_that_is_down_falls_back_to_the_leader(cluster: Cluster) -> None:
    """``--catch-up-from`` names a follower that is down: f2 gives it up and the leader sends
    its own snapshot; f2 ends identical all the same and counts the fallback."""
    leader, _ = leader_without_early_wal(cluster, serving=False)
    down = f"127.0.0.1:{free_port()}"
    f2 = cluster.start_follower(
        "f2", replication_address(leader), args=[*SMALL, "--catch-up-from", down]
    )
    wait_until(lambda: replication(f2)["snapshots_received"] >= 1, 60, "f2 to install a snapshot")
    status = replication(f2)
    assert status["snapshot_source"] == "leader"
    assert status["snapshot_fallbacks"] >= 1
    assert metric(f2, "walship_replication_snapshot_fallbacks_total") >= 1
    assert metric(leader, LEADER_SNAPSHOT_BYTES) > 0
    assert health(f2)["role"] == "follower"

    write_events(leader, 1_000, start=6_000)
    assert wait_caught_up(leader, f2) == 7_000
    assert assert_same_query_results(leader, f2) == 7_000
    assert_clean_stop(cluster)
    assert assert_same_wal(cluster.data_dir("leader"), cluster.data_dir("f2"), whole=False) >= 1


def test_a_source_off_the_leaders_history_is_not_installed(cluster: Cluster) -> None:
    """The source named by ``--catch-up-from`` follows another leader (same secret, another
    history): its snapshot stages fine (every sha256 matches) but the leader does not vouch
    for its position, so f2 drops it unused, falls back to the leader's own snapshot and ends
    with the leader's records only."""
    leader, _ = leader_without_early_wal(cluster, serving=False)
    other = cluster.start_leader("other", args=SMALL)
    rogue = cluster.start_follower(
        "rogue",
        replication_address(other),
        args=[*SMALL, "--serve-snapshots", "--replication-port", "0"],
    )
    # as many records as the leader: the source's checkpoint ends at an lsn the leader holds
    # in its WAL, with the same term and another chain
    write_events(other, 6_000, start=50_000)
    wait_caught_up(other, rogue)

    f2 = cluster.start_follower(
        "f2", replication_address(leader), args=[*SMALL, "--catch-up-from", serving_address(rogue)]
    )
    wait_until(lambda: replication(f2)["snapshots_received"] >= 1, 60, "f2 to install a snapshot")
    status = replication(f2)
    assert status["snapshot_source"] == "leader"
    assert status["snapshot_fallbacks"] >= 1
    assert replication(rogue)["serving_snapshots"]["snapshots_served"] >= 1  # it did send one
    assert metric(f2, "walship_replication_snapshots_from_followers_total") == 0
    assert metric(leader, "walship_replication_snapshots_confirmed_total") == 0
    log = (cluster.root / "f2.log").read_text()
    assert "the leader does not vouch for the snapshot" in log
    assert "differs from the leader's" in log

    write_events(leader, 500, start=6_000)
    assert wait_caught_up(leader, f2) == 6_500
    assert assert_same_query_results(leader, f2) == 6_500
    assert_clean_stop(cluster)
    assert assert_same_wal(cluster.data_dir("leader"), cluster.data_dir("f2"), whole=False) >= 1


def test_a_serving_follower_promoted_leads_on_its_replication_port(tmp_path: Path) -> None:
    """The snapshot server holds the follower's replication port; a promotion hands that port
    to the leader's listener (it stops serving first), and the new leader takes writes."""
    with FailoverCluster(tmp_path / "cluster") as cluster:
        leader = cluster.start_leader()
        port = free_port()
        f1 = cluster.start_follower(
            "f1",
            replication_address(leader),
            args=["--serve-snapshots", "--replication-port", str(port)],
        )
        assert serving_address(f1) == f"127.0.0.1:{port}"
        write_events(leader, 100)
        wait_caught_up(leader, f1)
        assert leader.stop() == 0

        answer = promote(f1, force=True)
        assert answer["role"] == "leader"
        assert answer["replication_address"] == f"127.0.0.1:{port}"
        assert health(f1)["fenced"] is None
        assert "serving_snapshots" not in replication(f1)
        assert write_events(f1, 10, start=100)[-1] > 100
        assert_clean_stop(cluster)
