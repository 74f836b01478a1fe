"""Failover with real processes on 127.0.0.1: promote, repoint, terms and fencing, divergence
repair into lost-and-found.

The promise checked from the clients' side: every write whose receipt said ``replicated``
survives a change of leader at its lsn; lsns continue under the new term; a deposed leader
takes no write that could be answered ``replicated``; and whatever a node has to cut from its
log is in its lost-and-found file, never silently dropped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.cluster import (
    assert_same_query_results,
    assert_same_wal,
    event,
    follower_session,
    health,
    http,
    last_lsn,
    post_batch,
    post_event,
    query_all,
    replication,
    replication_address,
    stats,
    wait_caught_up,
    wait_until,
    wal_records,
    write_events,
)
from tests.failover_cluster import (
    FailoverCluster,
    ReceiptWriters,
    admin_post,
    assert_receipts_held,
    lost_found,
    promote,
    repoint,
)
from walship.cli.main import app
from walship.replication.config import parse_address
from walship.testing.proxy import FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

runner = CliRunner()
FAST_ACKS = ["--ack-timeout-ms", "1000", "--max-lag-ms", "1000"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FailoverCluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")  # shown when a test fails
    with FailoverCluster(root) as c:
        yield c
    problems = c.log_problems()
    if problems:
        pytest.fail("unhandled errors in the node logs:\n" + "\n".join(problems), pytrace=False)


def test_admin_endpoints_need_the_token_and_change_nothing_without_it(
    cluster: FailoverCluster,
) -> None:
    leader = cluster.start_leader()
    follower = cluster.start_follower("f1", replication_address(leader))
    bare = cluster.node("bare", ["--role", "leader"], "never").start()  # no admin token at all
    write_events(leader, 50)
    wait_caught_up(leader, follower)
    before = {n.node_id: health(n) for n in (leader, follower, bare)}

    for token in (None, "wrong-token", "walship-test-admin-token-but-longer"):
        for node in (follower, leader):
            r = admin_post(node, "/internal/promote", token=token, force="true")
            assert r.status_code == 401, r.text
            assert r.json()["error"] == "unauthorized"
            r = admin_post(node, "/internal/repoint", token=token, leader="127.0.0.1:1")
            assert r.status_code == 401, r.text
            r = admin_post(node, "/internal/forget-follower", token=token, node_id="f1")
            assert r.status_code == 401, r.text
    # a node started without a token refuses even a request carrying one
    r = admin_post(bare, "/internal/promote", force="true")
    assert r.status_code == 401 and "without an admin token" in r.json()["message"]
    r = admin_post(bare, "/internal/repoint", leader="127.0.0.1:1")
    assert r.status_code == 401

    for node in (leader, follower, bare):
        now = health(node)
        was = before[node.node_id]
        assert (now["role"], now["term"], now["last_lsn"]) == (
            was["role"],
            was["term"],
            was["last_lsn"],
        )
    assert replication(follower)["connected"] is True
    assert post_event(leader, event(1)).status_code == 200


def test_kill_9_in_sync_mode_promote_the_most_caught_up_and_repair_the_old_leader(
    cluster: FailoverCluster,
) -> None:
    """Sync writes while f2, then f1 stall; the leader is killed with writes in flight. The
    lagging f2 cannot be promoted without force; f1 is, under term 2, and every write
    answered ``replicated`` is on it; f2 follows it."""
    leader = cluster.start_leader(args=["--ack-mode", "sync", *FAST_ACKS])
    address = replication_address(leader)
    # each follower reaches the leader through a proxy, so its link can be cut cleanly
    link1, link2 = FaultProxy(parse_address(address)), FaultProxy(parse_address(address))
    with link1, link2:
        f1 = cluster.start_follower("f1", f"127.0.0.1:{link1.port}")
        f2 = cluster.start_follower("f2", f"127.0.0.1:{link2.port}")
        wait_until(lambda: replication(leader)["in_sync_count"] == 2, 10, "both in sync")

        writers = ReceiptWriters(leader.url).start()
        writers.wait_for("replicated", 300)
        link2.set_refuse(True)  # f2 falls behind; sync goes on with f1 once f2 leaves the set
        wait_until(lambda: replication(leader)["in_sync_count"] == 1, 10, "f2 to leave the set")
        mark = writers.count("replicated")
        writers.wait_for("replicated", mark + 300)
        mark = writers.count("degraded")
        link1.set_refuse(True)  # now nobody confirms: the leader's tail is answered degraded
        writers.wait_for("degraded", mark + 200)
        time.sleep(0.3)  # long enough for the degradation ledger to persist the range
        leader.kill()
        receipts = writers.stop()
    replicated = [r for r in receipts if r["durability"] == "replicated"]
    assert replicated and all(r["term"] == 1 for r in receipts)

    # f2 is behind f1: refused without force, and nothing changes on it
    wait_until(lambda: not replication(f2)["connected"], 15, "f2 to lose its leader")
    wait_until(lambda: not replication(f1)["connected"], 15, "f1 to lose its leader")
    r = admin_post(f2, "/internal/promote", peers=f1.url)
    assert r.status_code == 409, r.text
    assert "behind f1" in r.json()["message"]
    assert health(f2)["role"] == "follower" and health(f2)["term"] == 1

    old_end = max(last_lsn(f1), last_lsn(f2))
    answer = promote(f1, peers=[f2])
    assert answer["role"] == "leader" and answer["term"] == 2
    assert answer["first_lsn"] == old_end + 1  # lsns continue, the term's first record
    new_address = answer["replication_address"]
    repoint(f2, new_address)

    assert_receipts_held(f1, replicated)
    after = post_event(f1, event(10**6)).json()
    assert after["term"] == 2 and after["lsn"] == old_end + 2
    write_events(f1, 200, start=10**6 + 1)
    wait_caught_up(f1, f2)
    assert_receipts_held(f2, replicated)
    assert health(f2)["term"] == 2

    # the old leader comes back (as its flags say, a leader of term 1); before taking writes
    # it asks the followers it knows, learns of term 2 and follows f1 by itself: its tail
    # that f1 never had goes to lost-and-found
    old_tail = wal_records(cluster.data_dir("leader"), killed=True)[-1].lsn
    assert old_tail > old_end, "the old leader should hold writes nobody confirmed"
    leader.start()
    wait_until(lambda: replication(leader)["repairs"] == 1, 15, "the old leader's repair")
    assert replication(leader)["leader"] == new_address
    wait_caught_up(f1, leader)
    lost = lost_found(cluster.data_dir("leader"))
    assert [r["lsn"] for r in lost] == list(range(old_end + 1, old_tail + 1))
    assert {r["term"] for r in lost} == {1}
    replicated_ids = {r["event_id"] for r in replicated}
    by_lsn = {r["lsn"]: r for r in receipts}
    for record in lost:
        assert record["acknowledged"] != "replicated", record
        assert record["event"]["id"] not in replicated_ids, record
        answered = by_lsn.get(record["lsn"])
        if answered is not None:  # answered before the kill: it said degraded
            assert answered["durability"] == "degraded"
            assert answered["event_id"] == record["event"]["id"]
            # the ledger persists a range's growth every 0.2 s: the newest may read as
            # unanswered after kill -9, never as more than it was
            assert record["acknowledged"] in ("degraded", "local_or_unanswered")
    assert any(r["acknowledged"] == "degraded" for r in lost)
    status = replication(leader)["last_repair"]
    assert status["kept_lsn"] == old_end and status["cut_records"] == len(lost)

    cluster.stop_all()
    for node_id in ("leader", "f2"):
        assert_same_wal(cluster.data_dir("f1"), cluster.data_dir(node_id))

    # the operator's view of the cut records
    listed = runner.invoke(app, ["lost-found", "list", str(cluster.data_dir("leader"))])
    assert listed.exit_code == 0, listed.output
    assert f"{len(lost)} records in 1 files" in listed.output
    out = cluster.root / "lost.json"
    leader_dir = str(cluster.data_dir("leader"))
    exported = runner.invoke(
        app, ["lost-found", "export", leader_dir, "--format", "json", "--out", str(out)]
    )
    assert exported.exit_code == 0, exported.output
    assert json.loads(out.read_text()) == lost


def test_walship_forget_follower_releases_the_wal_a_departed_follower_held(
    cluster: FailoverCluster,
) -> None:
    leader = cluster.start_leader(
        args=["--segment-bytes-max", "65536", "--checkpoint-interval-ms", "200"]
    )
    f1 = cluster.start_follower("f1", replication_address(leader))
    token = ["--admin-token-file", str(cluster.token_file)]
    write_events(leader, 200, batch=20)
    wait_caught_up(leader, f1)

    def forget(node_id: str) -> Any:
        return runner.invoke(app, ["forget-follower", leader.url, node_id, *token])

    connected = forget("f1")
    assert connected.exit_code == 1 and "is connected" in connected.output
    on_follower = runner.invoke(app, ["forget-follower", f1.url, "f1", *token])
    assert on_follower.exit_code == 1 and "not the leader" in on_follower.output
    f1.stop()
    wait_until(lambda: follower_session(leader, "f1") is None, 15, "the leader to see f1 go")
    write_events(leader, 2_000, start=200, batch=20)
    wait_until(lambda: stats(leader)["checkpoint_lsn"] >= 2_000, 15, "a checkpoint")
    assert stats(leader)["wal_first_lsn"] <= 201  # f1's slot keeps the WAL it needs

    forgotten = forget("f1")
    assert forgotten.exit_code == 0, forgotten.output
    assert "forgot follower f1" in forgotten.output and "from lsn 201" in forgotten.output
    write_events(leader, 100, start=2_200, batch=20)
    wait_until(lambda: stats(leader)["wal_first_lsn"] > 201, 15, "the WAL to be released")
    unknown = forget("f1")
    assert unknown.exit_code == 1 and "knows no follower" in unknown.output

    f1.start()  # back after all: a new follower, caught up from a snapshot
    wait_caught_up(leader, f1)
    assert replication(f1)["snapshots_received"] == 1
    assert_same_query_results(leader, f1)


def test_kill_9_in_quorum_mode_then_walship_failover(cluster: FailoverCluster) -> None:
    """quorum:1 writes from three threads; kill -9 of the leader. ``walship failover``
    promotes the most caught-up follower and repoints the other; every write answered
    ``replicated`` is on the new leader, lsns continue under term 2."""
    leader = cluster.start_leader(args=["--ack-mode", "quorum:1", *FAST_ACKS])
    f1 = cluster.start_follower("f1", replication_address(leader))
    f2 = cluster.start_follower("f2", replication_address(leader))
    nodes = ",".join(n.url for n in (leader, f1, f2))
    token = ["--admin-token-file", str(cluster.token_file)]

    refused = runner.invoke(app, ["failover", "--nodes", nodes, *token])
    assert refused.exit_code == 1 and "a leader still answers" in refused.output

    writers = ReceiptWriters(leader.url, threads=4).start()
    writers.wait_for("replicated", 1_500)
    leader.kill()
    receipts = writers.stop()
    replicated = [r for r in receipts if r["durability"] == "replicated"]
    for f in (f1, f2):
        wait_until(lambda f=f: not replication(f)["connected"], 15, f"{f.node_id} to notice")
    positions = {f.node_id: (health(f)["last_term"], last_lsn(f)) for f in (f1, f2)}
    best = max((f1, f2), key=lambda f: positions[f.node_id])
    other = f2 if best is f1 else f1

    result = runner.invoke(app, ["failover", "--nodes", nodes, *token])
    assert result.exit_code == 0, result.output
    assert f"promoting {best.node_id}" in result.output
    assert f"repointed {other.node_id}" in result.output
    assert "is unreachable" in result.output  # the dead leader, with the command to run later
    assert health(best)["role"] == "leader" and health(best)["term"] == 2
    assert_receipts_held(best, replicated)
    old_end = max(positions.values())[1]
    after = post_event(best, event(10**6)).json()
    assert (after["term"], after["lsn"]) == (2, old_end + 2)
    wait_caught_up(best, other)
    assert_receipts_held(other, replicated)

    nobody = runner.invoke(app, ["failover", "--nodes", leader.url, *token])
    assert nobody.exit_code == 1 and "no reachable follower" in nobody.output


def test_two_leaders_followers_follow_only_the_higher_term(cluster: FailoverCluster) -> None:
    """A false failover: f1 is promoted (forced) while the old leader still runs. f2 follows
    f1; the old leader's semi-sync writes can then only degrade, never say replicated; a
    follower of term 2 pointed at it refuses it and fences it."""
    leader = cluster.start_leader(args=["--ack-mode", "semi-sync", *FAST_ACKS])
    address = replication_address(leader)
    f1 = cluster.start_follower("f1", address)
    f2 = cluster.start_follower("f2", address)
    write_events(leader, 100)
    wait_caught_up(leader, f1, f2)

    r = admin_post(f1, "/internal/promote")
    assert r.status_code == 409 and "still connected" in r.json()["message"]
    answer = promote(f1, force=True)
    assert answer["term"] == 2
    repoint(f2, answer["replication_address"])
    wait_until(lambda: health(f2)["last_term"] == 2, 10, "f2 to hold term 2")

    # the old leader has no follower left: its writes degrade
    wait_until(lambda: replication(leader)["in_sync_count"] == 0, 10, "old leader to lose f1/f2")
    old = post_event(leader, event(1)).json()
    assert old["durability"] == "degraded" and old["term"] == 1
    # f1's writes replicate to f2
    new = post_event(f1, event(2), headers={"X-Walship-Ack-Mode": "semi-sync"}).json()
    assert new["durability"] == "replicated" and new["term"] == 2

    # f2 pointed back at the old leader refuses it (stale term): the old leader is fenced
    repoint(f2, address)
    wait_until(lambda: health(leader)["fenced"], 10, "the old leader to be fenced")
    r = post_event(leader, event(3))
    assert r.status_code == 409 and r.json()["error"] == "fenced"
    # a restart does not forget it: the newer term is persisted with the node's role
    leader.stop()
    leader.start()
    assert health(leader)["fenced"]
    r = post_event(leader, event(5))
    assert r.status_code == 409 and r.json()["error"] == "fenced"
    assert health(f2)["term"] == 2
    assert last_lsn(f2) == last_lsn(f1)
    repoint(f2, answer["replication_address"])
    post_event(f1, event(4))
    wait_caught_up(f1, f2)
    cluster.stop_all()
    assert_same_wal(cluster.data_dir("f1"), cluster.data_dir("f2"))


def test_deposed_leader_rejoining_after_its_wal_position_was_removed_keeps_its_tail(
    cluster: FailoverCluster,
) -> None:
    """1,000 writes reach both followers; cut off, the leader answers 10 more ``degraded``
    and is killed. f1 is promoted and writes on until it has checkpointed and removed the WAL
    that covered lsn 1,010. The old leader comes back as a follower: the new leader cannot
    read its position any more, but its term history says term 1 ended at lsn 1,000 there, so
    the 10 writes go to lost-and-found (each ``degraded``) before a snapshot replaces the log."""
    small = ["--segment-bytes-max", "65536", "--memtable-events-max", "500"]
    small += ["--checkpoint-interval-ms", "200"]
    leader = cluster.start_leader(args=["--ack-mode", "semi-sync", *FAST_ACKS, *small])
    address = replication_address(leader)
    link1, link2 = FaultProxy(parse_address(address)), FaultProxy(parse_address(address))
    with link1, link2:
        f1 = cluster.start_follower("f1", f"127.0.0.1:{link1.port}", args=small)
        f2 = cluster.start_follower("f2", f"127.0.0.1:{link2.port}", args=small)
        shared = write_events(leader, 1_000)
        assert shared == list(range(1, 1_001))
        wait_caught_up(leader, f1, f2)
        link1.set_refuse(True)
        link2.set_refuse(True)
        wait_until(lambda: replication(leader)["in_sync_count"] == 0, 15, "both to leave")
        tail = post_batch(http(), leader.url, [event(i) for i in range(1_000, 1_010)])
        receipts = tail["receipts"]
        assert [r["lsn"] for r in receipts] == list(range(1_001, 1_011))
        assert {r["durability"] for r in receipts} == {"degraded"}
        leader.kill()
    for f in (f1, f2):
        wait_until(lambda f=f: not replication(f)["connected"], 15, f"{f.node_id} to notice")

    answer = promote(f1, peers=[f2])
    assert answer["term"] == 2 and answer["first_lsn"] == 1_001
    new_address = answer["replication_address"]
    repoint(f2, new_address)
    write_events(f1, 3_000, start=10_000, batch=100)
    wait_caught_up(f1, f2)
    wait_until(lambda: stats(f1)["wal_first_lsn"] > 1_011, 30, "f1 to remove the WAL at lsn 1,010")

    # the old leader comes back as a follower of f1, on its own data dir
    old = cluster.start_follower("leader", new_address, args=small)
    wait_caught_up(f1, old)
    wait_until(lambda: replication(old)["snapshots_received"] >= 1, 15, "the snapshot counted")
    status = replication(old)
    repair = status["last_repair"]
    assert repair is not None, "the tail was replaced by the snapshot without a trace"
    assert (repair["kept_lsn"], repair["cut_records"]) == (1_000, 10)
    lost = lost_found(cluster.data_dir("leader"))
    assert [r["lsn"] for r in lost] == list(range(1_001, 1_011))
    assert {r["term"] for r in lost} == {1}
    assert [r["event"]["id"] for r in lost] == [r["event_id"] for r in receipts]
    assert {r["acknowledged"] for r in lost} == {"degraded"}
    assert (health(old)["last_term"], last_lsn(old)) == (health(f1)["last_term"], last_lsn(f1))
    # the same events (f1's query results skip lsn 1,001, the term-start record)
    assert query_all(old) == query_all(f1)
