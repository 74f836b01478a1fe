"""Physical followers with real processes: the leader's Parquet parts, installed verified.

With ``--physical-followers`` on every node, a follower installs the leader's checkpoint and
merged parts byte for byte instead of encoding its own (``replication/physical.py``); a part
that fails verification is refused and rebuilt from the follower's own WAL.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
from tests.failover_cluster import FailoverCluster, admin_post, promote
from walship.replication.physical import CORRUPT_PARTS_ENV
from walship.testing.process import NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PHYSICAL = ["--physical-followers"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FailoverCluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")
    with FailoverCluster(root) as c:
        yield c


def parts_of(node: NodeProcess) -> list[tuple[str, str]]:
    """(file, sha256 of its bytes on disk) of every part in the node's manifest (none before
    its first checkpoint)."""
    parts_dir = node.data_dir / "checkpoints" / "parts"
    path = node.data_dir / "checkpoints" / "manifest.json"
    if not path.exists():
        return []
    manifest = json.loads(path.read_bytes())
    return [
        (p["file"], hashlib.sha256((parts_dir / p["file"]).read_bytes()).hexdigest())
        for p in manifest["parts"]
    ]


def checkpoint(node: NodeProcess) -> dict[str, Any]:
    response = admin_post(node, "/internal/checkpoint")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def parts_status(node: NodeProcess) -> dict[str, Any]:
    status: dict[str, Any] = replication(node)["parts"]
    return status


def write_and_checkpoint(leader: NodeProcess, rounds: int, per_round: int, start: int) -> int:
    for _ in range(rounds):
        write_events(leader, per_round, start=start, batch=per_round)
        start += per_round
        checkpoint(leader)
    return start


def test_followers_install_the_leaders_parts_byte_for_byte(cluster: FailoverCluster) -> None:
    """Past 17 checkpoints and a merge of 16 of them, both physical followers hold exactly
    the leader's part files and encoded no Parquet themselves; a follower without the flag
    (protocol v1) follows the same leader as before."""
    leader = cluster.start_leader(args=PHYSICAL)
    address = replication_address(leader)
    followers = [cluster.start_follower(f"f{i}", address, args=PHYSICAL) for i in (1, 2)]
    plain = cluster.start_follower("f3", address, args=["--no-physical-followers"])  # v1
    write_and_checkpoint(leader, 17, 40, 0)
    wait_until(lambda: stats(leader)["compactions"] >= 1, 60, "the leader merges its parts")
    wait_caught_up(leader, *followers)
    want = parts_of(leader)
    assert len(want) < 17  # merged
    for follower in followers:
        wait_until(lambda f=follower: parts_of(f) == want, 60, f"{follower.node_id} has them")
        assert stats(follower)["parquet_encodes"] == 0
        assert stats(follower)["parts_adopted"] >= 18
        # the status counter is bumped just after the store swaps the part in: wait for it
        wait_until(
            lambda f=follower: parts_status(f)["installed"] >= 18, 30, "the installs counted"
        )
        assert parts_status(follower)["refused"] == 0
        assert_same_query_results(leader, follower)
    assert stats(leader)["parquet_encodes"] >= 18
    wait_caught_up(leader, plain)
    assert parts_status(plain) == {}
    assert stats(plain)["parts_from_leader"] is False
    assert_same_query_results(leader, plain)


def test_a_corrupted_part_is_refused_and_rebuilt_from_the_wal(cluster: FailoverCluster) -> None:
    """The leader flips a byte of its first part after the frame checksum (a test hook): the
    follower refuses it, checkpoints that range itself, and installs the next parts."""
    leader = cluster.node(
        "leader",
        [
            "--role",
            "leader",
            "--replication-port",
            "0",
            "--replication-secret-file",
            str(cluster.secret_file),
            *cluster.admin_args(PHYSICAL),
        ],
        "never",
    )
    leader.env = {CORRUPT_PARTS_ENV: "1"}
    leader.start()
    follower = cluster.start_follower("f1", replication_address(leader), args=PHYSICAL)
    write_and_checkpoint(leader, 3, 50, 0)
    wait_caught_up(leader, follower)
    wait_until(lambda: parts_status(follower)["installed"] >= 2, 60, "two parts installed")
    status = parts_status(follower)
    assert status["refused"] == 1 and "sha256" in status["last_refusal"], status
    assert stats(follower)["parquet_encodes"] == 1  # the refused range, from its own WAL
    leader_parts, follower_parts = parts_of(leader), parts_of(follower)
    assert [f for f, _ in follower_parts] == [f for f, _ in leader_parts]
    assert follower_parts[1:] == leader_parts[1:]
    assert assert_same_query_results(leader, follower) == 150


def test_a_follower_restarted_mid_transfer_ends_correct(cluster: FailoverCluster) -> None:
    leader = cluster.start_leader(args=PHYSICAL)
    follower = cluster.start_follower("f1", replication_address(leader), args=PHYSICAL)
    start = write_and_checkpoint(leader, 2, 200, 0)
    write_events(leader, 300, start=start, batch=300)
    start += 300
    checkpoint(leader)
    follower.kill()  # likely while that part is on its way
    # what a kill in the middle of a transfer leaves, whether or not this one did: the
    # leader's next part half staged, not in the manifest
    incoming = follower.data_dir / "parts-incoming"
    incoming.mkdir(exist_ok=True)
    leader_parts = follower.data_dir.parent / "leader" / "checkpoints" / "parts"
    newest = leader_parts / parts_of(leader)[-1][0]
    (incoming / newest.name).write_bytes(newest.read_bytes()[:1000])
    start = write_and_checkpoint(leader, 2, 100, start)
    follower = cluster.restart(follower)
    start = write_and_checkpoint(leader, 2, 100, start)
    wait_caught_up(leader, follower)
    assert assert_same_query_results(leader, follower) == start
    want = parts_of(leader)[-1]
    wait_until(lambda: parts_of(follower)[-1] == want, 60, "the newest part installed")
    assert not (follower.data_dir / "parts-incoming" / newest.name).exists()
    assert parts_status(follower)["refused"] == 0


def test_waiting_for_parts_is_bounded_and_promotion_resumes_local_checkpoints(
    cluster: FailoverCluster,
) -> None:
    """A follower waits for the leader's parts up to 150 % of its memtable budget, then
    checkpoints itself; once promoted it checkpoints at its budget again."""
    leader = cluster.start_leader(args=PHYSICAL)  # never checkpoints in this test
    small = [*PHYSICAL, "--memtable-events-max", "100"]
    follower = cluster.start_follower("f1", replication_address(leader), args=small)
    write_events(leader, 120, batch=120)
    wait_caught_up(leader, follower)
    assert stats(follower)["parts_from_leader"] is True
    time.sleep(1.0)  # ten turns of its checkpointer: 120 events are over 100 but under 150
    assert stats(follower)["parquet_encodes"] == 0
    write_events(leader, 60, start=120, batch=60)  # 180 >= 150: parts stopped coming
    wait_until(lambda: stats(follower)["parquet_encodes"] == 1, 30, "the fallback checkpoint")
    leader.stop()
    promote(follower, force=True)
    assert stats(follower)["parts_from_leader"] is False
    write_events(follower, 110, start=180, batch=110)  # over 100: checkpoints itself again
    wait_until(lambda: stats(follower)["parquet_encodes"] == 2, 30, "a checkpoint as leader")


def test_a_follower_that_fell_back_converges_on_the_leaders_parts(
    cluster: FailoverCluster,
) -> None:
    """What the sustained run showed, forced: the follower's memtable (budget 100 events)
    passes its fallback threshold before each of the leader's parts comes, so it checkpoints
    itself, at an lsn where the leader's part does not end. Each late part is held and put
    in place of the follower's own parts once they span it, so after every round its layout
    is the leader's, and the leader's merge of 16 of them is taken as it is: the follower
    ends with the leader's very files (it encoded 34 parts on the way, all replaced)."""
    leader = cluster.start_leader(args=PHYSICAL)  # checkpoints only when told
    small = [*PHYSICAL, "--memtable-events-max", "100"]  # falls back at 150..300 events
    follower = cluster.start_follower("f1", replication_address(leader), args=small)
    start = 0
    for round_ in range(17):
        write_events(leader, 350, start=start, batch=350)  # past 300 %: falls back
        start += 350
        wait_until(
            lambda r=round_: stats(follower)["parquet_encodes"] >= 2 * r + 1,
            30,
            "the follower checkpoints itself",
        )
        write_events(leader, 40, start=start, batch=40)
        start += 40
        wait_caught_up(leader, follower)
        checkpoint(leader)  # its part ends 40 events past the follower's own
        wait_until(
            lambda: [f for f, _ in parts_of(follower)] == [f for f, _ in parts_of(leader)],
            30,
            "the follower's layout is the leader's again",
        )
    wait_until(lambda: stats(leader)["compactions"] >= 1, 60, "the leader merges 16 parts")
    want = parts_of(leader)
    assert len(want) == 2
    wait_until(lambda: parts_of(follower) == want, 60, "the follower takes the leader's merge")
    status = parts_status(follower)
    assert status["skipped"] == 17 and status["refused"] == 0, status
    assert status["realigned"] == 34 and status["held"] == 0, status
    follower_stats = stats(follower)
    assert follower_stats["parquet_encodes"] == 34  # its fallbacks; no merge of its own
    assert follower_stats["compactions"] == 0
    assert follower_stats["physical_late_parts"] == 17
    assert assert_same_query_results(leader, follower) == start
    # the leader's parts came late every time: it now waits up to 300 % of its budget
    assert follower_stats["physical_fallback_percent"] == 300
    write_events(leader, 250, start=start, batch=250)
    wait_caught_up(leader, follower)
    time.sleep(1.0)  # ten turns of its checkpointer: 250 events are over 150 % but under 300
    assert stats(follower)["parquet_encodes"] == 34
