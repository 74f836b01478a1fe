"""Physical followers across reconnects: nothing the leader made is lost with the link.

A part whose transfer a reconnect cuts off is sent again whole on the next link, and the
parts the leader makes while a follower is away (checkpoints and merges) are shipped once it
is back, so the follower ends with the leader's part files, byte for byte, never encoding
Parquet itself (``replication/physical.py``: ``PartShipper.suspend``, ``PartShippers``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.cluster import (
    assert_same_query_results,
    replication,
    replication_address,
    stats,
    wait_caught_up,
    wait_until,
    write_events,
)
from tests.failover_cluster import FailoverCluster
from tests.test_physical_followers import (
    PHYSICAL,
    checkpoint,
    parts_of,
    parts_status,
    write_and_checkpoint,
)
from walship.replication.handshake import PROTOCOL_VERSIONS_ENV
from walship.replication.physical import CORRUPT_PARTS_ENV, CUT_PARTS_ENV
from walship.storage.manifest import read_manifest
from walship.testing.process import NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MERGING = [*PHYSICAL, "--compaction-fanin-min", "4"]  # a merge every four checkpoints


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FailoverCluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")
    with FailoverCluster(root) as c:
        yield c


def start_leader(
    cluster: FailoverCluster, env: dict[str, str], args: Sequence[str] = PHYSICAL
) -> NodeProcess:
    """A physical leader with the test hooks in ``env``."""
    leader = cluster.node(
        "leader",
        [
            "--role",
            "leader",
            "--replication-port",
            "0",
            "--replication-secret-file",
            str(cluster.secret_file),
            *cluster.admin_args(args),
        ],
        "never",
    )
    leader.env = env
    return leader.start()


def test_a_part_cut_off_by_a_reconnect_is_sent_again_whole(cluster: FailoverCluster) -> None:
    """The leader drops the link after the first chunk of its first part (a test hook): the
    follower reconnects, gets that part again from its start, and installs it and the next
    one -- the leader's bytes, no refusal, no Parquet encoded by the follower."""
    leader = start_leader(cluster, {CUT_PARTS_ENV: "1"})
    follower = cluster.start_follower("f1", replication_address(leader), args=PHYSICAL)
    write_events(leader, 300, batch=300)
    wait_caught_up(leader, follower)
    checkpoint(leader)  # its transfer is cut
    wait_until(lambda: replication(follower)["reconnects"] >= 1, 30, "the link cut mid-part")
    write_and_checkpoint(leader, 1, 100, 300)
    wait_caught_up(leader, follower)
    want = parts_of(leader)
    assert len(want) == 2
    wait_until(lambda: parts_of(follower) == want, 60, "the leader's two parts installed")
    assert stats(follower)["parquet_encodes"] == 0
    assert stats(follower)["parts_adopted"] == 2
    wait_until(lambda: parts_status(follower)["installed"] == 2, 30, "the installs counted")
    assert parts_status(follower)["refused"] == 0
    assert not list((follower.data_dir / "parts-incoming").iterdir())
    assert assert_same_query_results(leader, follower) == 400


def test_a_corrupt_part_sent_again_after_a_cut_is_refused_and_rebuilt(
    cluster: FailoverCluster,
) -> None:
    """The first part's transfer is cut, and the copy sent again is corrupt (both test
    hooks): the follower refuses it on its sha256, checkpoints that range from its own WAL,
    and installs the leader's next part as it is."""
    leader = start_leader(cluster, {CUT_PARTS_ENV: "1", CORRUPT_PARTS_ENV: "2"})
    follower = cluster.start_follower("f1", replication_address(leader), args=PHYSICAL)
    write_events(leader, 200, batch=200)
    wait_caught_up(leader, follower)
    checkpoint(leader)
    wait_until(lambda: parts_status(follower).get("refused") == 1, 60, "the copy refused")
    assert "sha256" in parts_status(follower)["last_refusal"]
    write_and_checkpoint(leader, 1, 100, 200)
    wait_caught_up(leader, follower)
    wait_until(lambda: len(parts_of(follower)) == 2, 60, "two parts on the follower")
    leader_parts, follower_parts = parts_of(leader), parts_of(follower)
    assert [f for f, _ in follower_parts] == [f for f, _ in leader_parts]
    assert follower_parts[1] == leader_parts[1]
    assert stats(follower)["parquet_encodes"] == 1  # the refused range, from its own WAL
    assert assert_same_query_results(leader, follower) == 300


def test_merges_made_while_a_follower_was_away_are_shipped_when_it_is_back(
    cluster: FailoverCluster,
) -> None:
    """The follower holds the leader's first parts, then is down (stopped cleanly with
    events in its memtable, which its clean stop checkpoints like any node's, so its history
    is whole in Parquet while it is down) while the leader checkpoints six more times and
    merges twice; once back it gets what it missed and holds the leader's layout exactly: the
    leader's merges take the place of its own parts, none refused."""
    leader = cluster.start_leader(args=MERGING)
    follower = cluster.start_follower("f1", replication_address(leader), args=PHYSICAL)
    start = write_and_checkpoint(leader, 2, 50, 0)
    wait_caught_up(leader, follower)
    wait_until(lambda: parts_of(follower) == parts_of(leader), 60, "the first parts installed")
    write_events(leader, 30, start=start, batch=30)  # in its memtable as it stops
    start += 30
    wait_caught_up(leader, follower)
    follower.stop()
    stopped = read_manifest(follower.data_dir / "checkpoints")
    assert stopped is not None and stopped.events == start  # a clean stop checkpoints
    start = write_and_checkpoint(leader, 1, 20, start)  # parts of 50 events, all alike
    start = write_and_checkpoint(leader, 5, 50, start)
    wait_until(lambda: stats(leader)["compactions"] >= 2, 60, "the leader merges its parts")
    follower = cluster.restart(follower)
    wait_caught_up(leader, follower)
    want = parts_of(leader)
    assert len(want) < 8  # merged
    wait_until(lambda: parts_of(follower) == want, 60, "the follower has the leader's layout")
    assert parts_status(follower)["refused"] == 0
    assert parts_status(follower)["skipped"] == 1  # the leader's part over its own tail
    assert assert_same_query_results(leader, follower) == start


def test_a_merge_of_parts_still_queued_is_shipped_in_their_place(
    cluster: FailoverCluster,
) -> None:
    """A follower away before its first part: the leader merges four queued parts, and
    ships the merged part (as a checkpoint) instead of them, then the fifth."""
    leader = cluster.start_leader(args=MERGING)
    follower = cluster.start_follower("f1", replication_address(leader), args=PHYSICAL)
    wait_caught_up(leader, follower)
    follower.stop()
    start = write_and_checkpoint(leader, 5, 50, 0)
    wait_until(lambda: stats(leader)["compactions"] >= 1, 60, "the leader merges four parts")
    want = parts_of(leader)
    assert len(want) == 2
    follower = cluster.restart(follower)
    wait_caught_up(leader, follower)
    wait_until(lambda: parts_of(follower) == want, 60, "the follower has the leader's layout")
    wait_until(lambda: parts_status(follower)["installed"] == 2, 30, "two parts installed")
    assert stats(follower)["parquet_encodes"] == 0
    assert assert_same_query_results(leader, follower) == start


def test_a_physical_follower_follows_a_leader_from_before_v2_with_v1(
    cluster: FailoverCluster,
) -> None:
    """Mixed versions: a leader that speaks only protocol v1 (a test hook plays a walship
    from before v2) refuses the follower's v2 Hello; the follower says v1 on its next link
    and follows it, checkpointing itself, with nothing lost."""
    leader = start_leader(cluster, {PROTOCOL_VERSIONS_ENV: "1"}, args=())
    follower = cluster.start_follower("f1", replication_address(leader), args=PHYSICAL)
    start = write_and_checkpoint(leader, 2, 50, 0)
    wait_caught_up(leader, follower)
    assert stats(follower)["parts_from_leader"] is False
    assert parts_status(follower) == {}
    assert replication(follower)["reconnects"] >= 1  # the refused v2 Hello
    checkpoint(follower)
    assert stats(follower)["parquet_encodes"] == 1
    assert assert_same_query_results(leader, follower) == start
