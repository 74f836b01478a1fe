"""Automatic failover on a real etcd (Debian's etcd-server) with real walship processes.

Checked: a leader killed with kill -9 is replaced by the most caught-up follower within the
lease TTL plus a few seconds, every ``replicated`` write survives and the other follower
follows; a leader cut off from etcd stops taking writes before anyone else is elected; a
candidate that cannot prove it holds every ``replicated`` write is not elected unless it runs
with ``--unclean-election``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import (
    event,
    health,
    replication,
    replication_address,
    wait_caught_up,
    wait_until,
)
from tests.etcd_server import EtcdServer, running_etcd
from tests.failover_cluster import (
    FailoverCluster,
    ReceiptWriters,
    assert_receipts_held,
    events_by_id,
    pause,
    resume,
)
from walship.replication.config import parse_address
from walship.testing.proxy import FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TTL_S = 2
FAST_ACKS = ["--ack-timeout-ms", "1000", "--max-lag-ms", "1000"]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FailoverCluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")
    with FailoverCluster(root) as c:
        yield c
    problems = c.log_problems()
    if problems:
        pytest.fail("unhandled errors in the node logs:\n" + "\n".join(problems), pytrace=False)


def election_args(etcd_url: str) -> list[str]:
    ttl = str(TTL_S)
    return ["--etcd", etcd_url, "--cluster", "c1", "--etcd-ttl-s", ttl, "--etcd-settle-ms", "500"]


def election(node: Any) -> dict[str, Any]:
    body: dict[str, Any] = health(node)["election"]
    return body


def test_killed_leader_is_replaced_by_the_most_caught_up_follower(
    etcd: EtcdServer, cluster: FailoverCluster
) -> None:
    args = election_args(etcd.url)
    leader = cluster.start_leader(args=[*args, "--ack-mode", "quorum:1", *FAST_ACKS])
    wait_until(lambda: election(leader)["holding"], 10, "the leader to hold the etcd key")
    address = replication_address(leader)
    with FaultProxy(parse_address(address)) as link2:
        f1 = cluster.start_follower("f1", address, args=args)
        f2 = cluster.start_follower("f2", f"127.0.0.1:{link2.port}", args=args)
        writers = ReceiptWriters(leader.url).start()
        writers.wait_for("replicated", 300)
        link2.set_refuse(True)  # f2 falls behind f1
        mark = writers.count("replicated")
        writers.wait_for("replicated", mark + 300)
        leader.kill()
        killed = time.monotonic()
        receipts = writers.stop()
        wait_until(lambda: health(f1)["role"] == "leader", TTL_S + 8, "f1 to be promoted")
        took = time.monotonic() - killed
    assert took < TTL_S + 5, f"promotion took {took:.1f} s"
    assert health(f1)["term"] == 2 and election(f1)["holding"]
    assert health(f2)["role"] == "follower"
    replicated = [r for r in receipts if r["durability"] == "replicated"]
    assert_receipts_held(f1, replicated)
    new_address = health(f1)["replication_address"]
    wait_until(lambda: replication(f2)["leader"] == new_address, 10, "f2 to follow f1 from the key")
    r = httpx.post(f"{f1.url}/api/v1/events", json=event(10**6), timeout=10).json()
    assert r["term"] == 2
    wait_caught_up(f1, f2)
    assert_receipts_held(f2, replicated)


def test_leader_cut_off_from_etcd_stops_writes_before_a_new_leader_is_elected(
    etcd: EtcdServer, cluster: FailoverCluster
) -> None:
    with FaultProxy(("127.0.0.1", etcd.port)) as etcd_link:
        leader = cluster.start_leader(args=election_args(f"http://127.0.0.1:{etcd_link.port}"))
        wait_until(lambda: election(leader)["holding"], 10, "the leader to hold the etcd key")
        f1 = cluster.start_follower("f1", replication_address(leader), args=election_args(etcd.url))
        wait_caught_up(leader, f1)

        accepted: list[float] = []  # when each write the old leader took was answered
        refused: list[tuple[float, int, str]] = []
        follower_seen: list[float] = []  # when f1 last said it was a follower
        stop = threading.Event()

        def write_to_old_leader() -> None:
            with httpx.Client(timeout=5) as client:
                i = 0
                while not stop.is_set():
                    i += 1
                    r = client.post(f"{leader.url}/api/v1/events", json=event(i))
                    now = time.monotonic()
                    if r.status_code == 200:
                        accepted.append(now)
                    else:
                        refused.append((now, r.status_code, r.json()["error"]))
                    time.sleep(0.01)

        writer = threading.Thread(target=write_to_old_leader, daemon=True)
        writer.start()
        wait_until(lambda: len(accepted) > 10, 10, "writes on the leader")
        etcd_link.set_refuse(True)  # a partition between the leader and etcd only
        cut = time.monotonic()

        def f1_leads() -> bool:
            asked = time.monotonic()
            if health(f1)["role"] == "leader":
                return True
            follower_seen.append(asked)
            return False

        wait_until(f1_leads, TTL_S + 10, "f1 to be elected", interval_s=0.02)
        stop.set()
        writer.join(10)

        assert refused, "the old leader never refused a write"
        last_accepted, last_follower = max(accepted), max(follower_seen)
        assert last_accepted < last_follower, (
            f"the old leader took a write {last_accepted - cut:.2f} s after the cut, when f1 "
            f"was elected after {last_follower - cut:.2f} s"
        )
        assert last_accepted - cut < TTL_S
        assert {code for _, code, _ in refused} <= {409, 503}
        assert health(f1)["term"] == 2

        # once it reaches etcd again it sees the new leader and follows it
        etcd_link.heal()
        wait_until(lambda: health(leader)["role"] == "follower", 10, "the old leader to follow")
        wait_caught_up(f1, leader)


@pytest.mark.parametrize("unclean", [False, True])
def test_election_refuses_a_candidate_out_of_the_in_sync_set_etcd_holds(
    etcd: EtcdServer, cluster: FailoverCluster, unclean: bool
) -> None:
    """The double fault on etcd: f2 is cut off past --max-lag-ms (f1 alone acknowledges),
    f1 is paused and the leader killed. f2, the only live candidate, is not in the in-sync
    set in etcd: it is not elected, and the election waits until f1 is back -- unless f2 runs
    with --unclean-election, which elects it and says what is lost."""
    args = election_args(etcd.url)
    leader = cluster.start_leader(args=[*args, "--ack-mode", "semi-sync", *FAST_ACKS])
    wait_until(lambda: election(leader)["holding"], 10, "the leader to hold the etcd key")
    address = replication_address(leader)
    with FaultProxy(parse_address(address)) as link2:
        f1 = cluster.start_follower("f1", address, args=args)
        f2_args = [*args, "--unclean-election"] if unclean else args
        f2 = cluster.start_follower("f2", f"127.0.0.1:{link2.port}", args=f2_args)
        wait_until(lambda: replication(leader)["in_sync_count"] == 2, 20, "both in sync")
        writers = ReceiptWriters(leader.url).start()
        writers.wait_for("replicated", 200)
        link2.set_refuse(True)
        wait_until(
            lambda: replication(leader)["in_sync_set"]["counting"] == ["f1"], 20, "f2 to leave"
        )
        mark = writers.count("replicated")
        writers.wait_for("replicated", mark + 300)
        pause(f1)
        leader.kill()
        receipts = writers.stop()
    replicated = [r for r in receipts if r["durability"] == "replicated"]
    on_f2 = events_by_id(f2)
    only_f1 = [r for r in replicated if r["event_id"] not in on_f2]
    assert only_f1, "the scenario needs writes acknowledged by f1 alone"

    if unclean:
        wait_until(lambda: health(f2)["role"] == "leader", TTL_S + 10, "f2 to be elected")
        resume(f1)
        assert "unclean promotion of f2" in f2.log_path.read_text()
        return

    wait_until(
        lambda: election(f2)["refusing"] or health(f2)["role"] == "leader",
        TTL_S + 10,
        "f2 to refuse to run (or be elected)",
    )
    time.sleep(TTL_S + 1)  # well past a lease and a settle period: still nobody leads
    assert health(f2)["role"] == "follower" and health(f2)["term"] == 1, "f2 was elected"
    assert "f1 of the last in-sync set" in election(f2)["refusing"]
    resume(f1)
    wait_until(lambda: health(f1)["role"] == "leader", TTL_S + 15, "f1 to be elected")
    assert health(f1)["term"] == 2
    assert_receipts_held(f1, replicated)
    wait_until(lambda: replication(f2)["connected"], 15, "f2 to follow f1")
    wait_caught_up(f1, f2)
    assert_receipts_held(f2, replicated)
