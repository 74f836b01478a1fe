"""Replication with real processes and real TCP on 127.0.0.1 (integration and fault tiers).

Every test starts ``walship serve`` children through ``tests.cluster.Cluster`` (ports chosen
at run time, every node stopped at the end) and checks the promise from the follower's side:
whatever the link went through -- a late join, a snapshot, kill -9, a slow or stalled
follower, a flipped bit, an intruder -- the follower ends with the leader's records byte for
byte and answers queries the same, and every write answer says how durable it really is.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import (
    Cluster,
    Writers,
    assert_same_query_results,
    assert_same_wal,
    event,
    follower_session,
    get_json,
    handshake_with_secret,
    health,
    http,
    last_lsn,
    post_event,
    query_all,
    raw_connection,
    read_until_closed,
    refusal,
    replication,
    replication_address,
    stats,
    wait_caught_up,
    wait_until,
    wal_records,
    write_events,
)
from walship.replication.config import parse_address
from walship.replication.protocol import FRAME_HEADER, MESSAGE_TYPES, Hello
from walship.testing.process import NodeProcess
from walship.testing.proxy import FaultProxy
from walship.wal.record import crc32c

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MIB = 1 << 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")  # shown when a test fails
    with Cluster(root) as c:
        yield c
    # checked after every node stopped; a traceback in a log is an error a node did not handle
    problems = c.log_problems()
    if problems:
        pytest.fail("unhandled errors in the node logs:\n" + "\n".join(problems), pytrace=False)


def session_state(leader: NodeProcess, node_id: str, key: str) -> object:
    session = follower_session(leader, node_id)
    return None if session is None else session[key]


def assert_clean_stop(cluster: Cluster) -> None:
    codes = cluster.stop_all()
    assert codes and all(code == 0 for code in codes.values()), codes


# ---------------------------------------------------------------------------------- catch-up


def test_new_follower_catches_up_from_the_wal_and_ends_identical(cluster: Cluster) -> None:
    """A follower joining a leader whose whole history is still in its WAL is served from the
    WAL (no snapshot), then tails live writes; both logs are the same bytes."""
    leader = cluster.start_leader()
    write_events(leader, 3_000)
    follower = cluster.start_follower("f1", replication_address(leader))
    wait_caught_up(leader, follower)
    write_events(leader, 500, start=3_000)  # live tail after the catch-up
    assert wait_caught_up(leader, follower) == 3_500

    status = replication(follower)
    assert status["connected"] is True
    assert status["state"] == "streaming"
    assert status["snapshots_received"] == 0
    assert status["frames_rejected"] == 0
    assert status["lag_records"] == 0
    session = follower_session(leader, "f1")
    assert session is not None
    assert session["state"] == "streaming"
    assert session["in_sync"] is True
    assert session["durable_lsn"] == 3_500
    assert health(follower)["role"] == "follower"

    assert assert_same_query_results(leader, follower) == 3_500
    assert_clean_stop(cluster)
    assert assert_same_wal(cluster.data_dir("leader"), cluster.data_dir("f1")) == 3_500


def test_follower_behind_removed_wal_gets_a_snapshot_then_the_wal(cluster: Cluster) -> None:
    """Checkpoints removed the leader's early WAL before the follower joined: it installs the
    checkpoint (Parquet files up to S) and streams from S+1; queries and WAL after S match."""
    small = ["--segment-bytes-max", "65536", "--memtable-events-max", "1000"]
    leader = cluster.start_leader(args=small)
    write_events(leader, 6_000)
    wait_until(
        lambda: stats(leader)["wal_first_lsn"] > 1001,
        30,
        "checkpoints to remove the leader's early WAL segments",
    )

    follower = cluster.start_follower("f1", replication_address(leader))
    wait_until(
        lambda: replication(follower)["snapshots_received"] >= 1, 30, "the snapshot to install"
    )
    # the transfer's progress ends with the install, on both ends (it used to stay at
    # "sending, 100 %" in the leader's view for as long as the follower stayed connected)
    assert replication(follower)["snapshot"] is None
    wait_until(
        lambda: (s := follower_session(leader, "f1")) and "snapshot" not in s,
        20,
        "the leader to see the install end",
    )
    # the checkpoint is the snapshot's until the leader's next (a physical follower installs
    # that one too, so it is read now)
    snapshot_lsn = stats(follower)["checkpoint_lsn"]
    write_events(leader, 2_000, start=6_000)  # streamed from the WAL after the snapshot
    assert wait_caught_up(leader, follower) == 8_000

    follower_stats = stats(follower)
    assert snapshot_lsn >= 1_000
    assert follower_stats["checkpoint_lsn"] >= snapshot_lsn
    assert follower_stats["parquet_parts"] >= 1
    assert follower_stats["wal_first_lsn"] == snapshot_lsn + 1
    assert replication(follower)["frames_rejected"] == 0
    assert assert_same_query_results(leader, follower) == 8_000

    assert_clean_stop(cluster)
    records = wal_records(cluster.data_dir("f1"))
    assert records[0].lsn == snapshot_lsn + 1  # the follower's WAL starts after the snapshot
    compared = assert_same_wal(cluster.data_dir("leader"), cluster.data_dir("f1"), whole=False)
    assert compared >= 1


def test_follower_killed_mid_stream_catches_up_without_gap_or_duplicate(
    cluster: Cluster,
) -> None:
    """kill -9 on a follower while the leader takes 10,000 more writes; restarted, it resumes
    from its own durable position via the WAL. Then the leader restarts: the follower
    reconnects and new lsns continue where the log ended."""
    leader = cluster.start_leader(fsync="always")
    address = replication_address(leader)
    follower = cluster.start_follower("f1", address, fsync="always")
    write_events(leader, 1_000)
    wait_caught_up(leader, follower)

    writers = Writers(leader.url, threads=2, batch=100, first=1_000, events_max=10_000).start()
    wait_until(lambda: writers.written >= 2_000, 30, "the leader to take 2,000 more writes")
    follower.kill()  # SIGKILL while batches stream to it
    lsns = writers.join()
    assert lsns == list(range(1_001, 11_001))  # every write answered, each once, gapless

    follower.start()
    assert wait_caught_up(leader, follower) == 11_000
    status = replication(follower)
    assert status["snapshots_received"] == 0  # caught up from the leader's WAL
    assert status["frames_rejected"] == 0
    assert assert_same_query_results(leader, follower) == 11_000

    reconnects = status["reconnects"]
    assert leader.stop() == 0
    cluster.restart(leader, replication_port=parse_address(address)[1])
    assert replication_address(leader) == address

    def reconnected() -> bool:
        r = replication(follower)
        return bool(r["reconnects"] > reconnects and r["connected"])

    wait_until(reconnected, 30, "the follower to reconnect to the restarted leader")
    assert health(leader)["last_lsn"] == 11_000
    assert write_events(leader, 100, start=11_000) == list(range(11_001, 11_101))
    assert wait_caught_up(leader, follower) == 11_100
    assert assert_same_query_results(leader, follower) == 11_100

    assert_clean_stop(cluster)
    assert assert_same_wal(cluster.data_dir("leader"), cluster.data_dir("f1")) == 11_100


def test_slow_follower_never_loses_a_record(cluster: Cluster) -> None:
    """The leader writes as fast as it can for a few seconds while its follower's link is
    slowed by a delaying proxy and the follower itself is frozen for a while (SIGSTOP): the
    follower falls far behind, then catches up with every record."""
    leader = cluster.start_leader()
    with FaultProxy(parse_address(replication_address(leader))) as proxy:
        follower = cluster.start_follower("slow", f"127.0.0.1:{proxy.port}")
        wait_caught_up(leader, follower)
        proxy.set_delay_ms(25)
        writers = Writers(leader.url, threads=2, batch=250).start()
        max_lag = 0
        froze = False
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            lag = session_state(leader, "slow", "lag_records")
            if isinstance(lag, int):
                max_lag = max(max_lag, lag)
            if not froze and time.monotonic() - t0 > 0.7:
                assert follower.process is not None
                os.kill(follower.process.pid, signal.SIGSTOP)
                time.sleep(0.5)
                os.kill(follower.process.pid, signal.SIGCONT)
                froze = True
            time.sleep(0.05)
        lsns = writers.stop()
        assert len(lsns) == len(set(lsns)) and lsns == list(range(1, len(lsns) + 1))
        assert max_lag >= 1_000, f"the follower never fell behind (max lag {max_lag})"
        proxy.heal()
        assert wait_caught_up(leader, follower, timeout_s=60) == len(lsns)

    status = replication(follower)
    assert status["frames_rejected"] == 0
    assert assert_same_query_results(leader, follower) == len(lsns)
    assert_clean_stop(cluster)
    assert assert_same_wal(cluster.data_dir("leader"), cluster.data_dir("slow")) == len(lsns)


# ---------------------------------------------------------------------------------- ack modes


def test_semi_sync_without_followers_degrades_and_records_the_range(cluster: Cluster) -> None:
    leader = cluster.start_leader(
        args=["--ack-mode", "semi-sync", "--ack-timeout-ms", "300", "--on-ack-timeout", "degrade"]
    )
    response = post_event(leader, event(0))
    assert response.status_code == 200, response.text
    receipt = response.json()
    assert receipt["durability"] == "degraded"
    assert receipt["required"] == 1
    assert receipt["acked_by"] == []

    batch = http().post(
        f"{leader.url}/api/v1/events/batch", json={"events": [event(i) for i in range(1, 4)]}
    )
    assert batch.status_code == 200, batch.text
    assert {r["durability"] for r in batch.json()["receipts"]} == {"degraded"}

    def covered(ledger: dict[str, object], lsns: range) -> bool:
        ranges = ledger["ranges"]
        assert isinstance(ranges, list)
        return all(any(r["first_lsn"] <= n <= r["last_lsn"] for r in ranges) for n in lsns)

    ledger = get_json(leader, "/api/v1/replication/degraded")
    assert ledger["writes"] == 2  # one single write, one batch
    assert covered(ledger, range(1, 5))
    assert replication(leader)["degraded"]["writes"] == 2

    # the ledger is persisted: it survives a restart
    assert leader.stop() == 0
    cluster.restart(leader)
    assert covered(get_json(leader, "/api/v1/replication/degraded"), range(1, 5))


def test_semi_sync_on_timeout_fail_answers_503_naming_the_local_lsn(cluster: Cluster) -> None:
    leader = cluster.start_leader(
        args=[
            "--ack-mode",
            "semi-sync",
            "--ack-timeout-ms",
            "300",
            "--on-ack-timeout",
            "fail",
            "--min-in-sync",
            "0",  # no floor: the write really waits for the ack timeout
        ]
    )
    t0 = time.monotonic()
    response = post_event(leader, event(0))
    elapsed = time.monotonic() - t0
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "ack_timeout"
    assert body["lsn"] == 1
    assert body["committed_locally"] is True
    assert "lsn 1" in body["message"]
    assert 0.25 <= elapsed < 5.0

    # committed locally means committed: the event is there, at that lsn
    assert [e["lsn"] for e in query_all(leader)] == [1]
    ledger = get_json(leader, "/api/v1/replication/degraded")
    assert ledger["ranges"][0]["first_lsn"] == 1


def test_quorum_2_lists_both_followers_in_acked_by(cluster: Cluster) -> None:
    leader = cluster.start_leader(
        fsync="always", args=["--ack-mode", "quorum:2", "--ack-timeout-ms", "1000"]
    )
    address = replication_address(leader)
    f1 = cluster.start_follower("f1", address, fsync="always")
    f2 = cluster.start_follower("f2", address, fsync="always")
    wait_until(
        lambda: replication(leader)["in_sync_count"] == 2, 20, "both followers to be in sync"
    )

    for i in range(3):
        response = post_event(leader, event(i))
        assert response.status_code == 200, response.text
        receipt = response.json()
        assert receipt["durability"] == "replicated"
        assert receipt["required"] == 2
        assert sorted(receipt["acked_by"]) == ["f1", "f2"]
        # replicated to N means N followers hold it durably when the answer leaves
        for follower in (f1, f2):
            assert replication(follower)["durable_lsn"] >= receipt["lsn"]

    # with one of the two gone the quorum cannot be met: the answer says so
    assert f2.stop() == 0
    wait_until(
        lambda: follower_session(leader, "f2") is None, 20, "the leader to drop f2's session"
    )
    response = post_event(leader, event(3))
    assert response.status_code == 200, response.text
    receipt = response.json()
    assert receipt["durability"] == "degraded"
    assert receipt["acked_by"] == ["f1"]


def test_sync_drops_a_stalled_follower_from_the_in_sync_set_and_continues(
    cluster: Cluster,
) -> None:
    """sync waits for every in-sync follower; one frozen with SIGSTOP leaves the set after
    --max-lag-ms, writes go on `replicated` with the other (above --min-in-sync 1), and the
    frozen one rejoins once it is thawed and caught up."""
    leader = cluster.start_leader(
        args=[
            "--ack-mode",
            "sync",
            "--max-lag-ms",
            "500",
            "--min-in-sync",
            "1",
            "--ack-timeout-ms",
            "10000",
        ]
    )
    address = replication_address(leader)
    f1 = cluster.start_follower("f1", address)
    stalled = cluster.start_follower("f2", address)
    wait_until(
        lambda: replication(leader)["in_sync_count"] == 2, 20, "both followers to be in sync"
    )
    receipt = post_event(leader, event(0)).json()
    assert receipt["durability"] == "replicated"
    assert sorted(receipt["acked_by"]) == ["f1", "f2"]

    assert stalled.process is not None
    os.kill(stalled.process.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        response = post_event(leader, event(1))
        elapsed = time.monotonic() - t0
        assert response.status_code == 200, response.text
        receipt = response.json()
        assert receipt["durability"] == "replicated"
        assert receipt["acked_by"] == ["f1"]
        # the receipt names what the answer met: one follower, the whole in-sync set by then
        assert receipt["required"] == 1, receipt
        assert 0.4 <= elapsed < 5.0, elapsed  # it waited for f2 until f2 left the set

        status = replication(leader)
        assert status["in_sync_count"] == 1
        assert session_state(leader, "f2", "in_sync") is False
        assert session_state(leader, "f1", "in_sync") is True

        for i in range(2, 12):  # no more waiting on the stalled follower
            t0 = time.monotonic()
            receipt = post_event(leader, event(i)).json()
            assert receipt["durability"] == "replicated"
            assert receipt["acked_by"] == ["f1"]
            assert receipt["required"] == 1
            assert time.monotonic() - t0 < 2.0  # far from the 10 s ack timeout
    finally:
        os.kill(stalled.process.pid, signal.SIGCONT)

    wait_until(
        lambda: replication(leader)["in_sync_count"] == 2, 20, "f2 to rejoin the in-sync set"
    )
    receipt = post_event(leader, event(12)).json()
    assert receipt["durability"] == "replicated"
    assert sorted(receipt["acked_by"]) == ["f1", "f2"]
    wait_caught_up(leader, f1, stalled)
    assert assert_same_query_results(leader, stalled) == 13


def test_a_write_may_ask_for_a_stricter_ack_mode_but_not_a_weaker_one(cluster: Cluster) -> None:
    leader = cluster.start_leader(args=["--ack-mode", "semi-sync", "--ack-timeout-ms", "300"])
    follower = cluster.start_follower("f1", replication_address(leader))
    wait_until(lambda: replication(leader)["in_sync_count"] == 1, 20, "the follower in sync")

    plain = post_event(leader, event(0)).json()
    assert plain["durability"] == "replicated"
    assert plain["acked_by"] == ["f1"]

    weaker = post_event(leader, event(1), headers={"X-Walship-Ack-Mode": "async"}).json()
    assert weaker["durability"] == "replicated"  # the server's semi-sync still applies
    assert weaker["required"] == 1
    assert replication(follower)["durable_lsn"] >= weaker["lsn"]

    by_header = http().post(
        f"{leader.url}/api/v1/events", headers={"X-Walship-Ack-Mode": "quorum:2"}, json=event(2)
    )
    by_query = http().post(
        f"{leader.url}/api/v1/events", params={"ack_mode": "quorum:2"}, json=event(3)
    )
    for response in (by_header, by_query):
        # only one follower exists: refused at once, nothing written, nothing in the ledger
        assert response.status_code == 400, response.text
        refusal = response.json()
        assert refusal["error"] == "unmeetable_ack_mode"
        assert (refusal["followers_asked"], refusal["followers_configured"]) == (2, 1)
    assert last_lsn(leader) == weaker["lsn"]
    assert get_json(leader, "/api/v1/replication/degraded")["ranges"] == []

    stricter = post_event(leader, event(4), headers={"X-Walship-Ack-Mode": "sync"}).json()
    assert stricter["durability"] == "replicated" and stricter["acked_by"] == ["f1"]


# ---------------------------------------------------------------------------------- faults


def test_follower_rejects_a_corrupted_frame_reconnects_and_ends_identical(
    cluster: Cluster,
) -> None:
    leader = cluster.start_leader()
    with FaultProxy(parse_address(replication_address(leader)), seed=7) as proxy:
        follower = cluster.start_follower("f1", f"127.0.0.1:{proxy.port}")
        write_events(leader, 500)
        wait_caught_up(leader, follower)

        proxy.flip_next(direction="down")
        write_events(leader, 500, start=500)

        def rejected_and_back() -> bool:
            r = replication(follower)
            return bool(r["frames_rejected"] >= 1 and r["reconnects"] >= 1 and r["connected"])

        wait_until(rejected_and_back, 30, "the follower to reject the frame and reconnect")
        assert proxy.state.flipped >= 1
        assert "rejected a frame" in (replication(follower)["last_error"] or "")
        write_events(leader, 500, start=1_000)
        assert wait_caught_up(leader, follower) == 1_500

    assert assert_same_query_results(leader, follower) == 1_500
    assert_clean_stop(cluster)
    assert assert_same_wal(cluster.data_dir("leader"), cluster.data_dir("f1")) == 1_500


def test_bad_connections_are_closed_while_the_real_follower_keeps_streaming(
    cluster: Cluster,
) -> None:
    """A wrong secret, garbage bytes and a frame header announcing 100 MiB each get their own
    connection refused and closed; the real follower is not disturbed and keeps receiving."""
    leader = cluster.start_leader()
    address = replication_address(leader)
    follower = cluster.start_follower("f1", address)
    written = 0

    def leader_still_serves_the_follower() -> None:
        nonlocal written
        write_events(leader, 200, start=written)
        written += 200
        assert wait_caught_up(leader, follower, timeout_s=20) == written
        status = replication(follower)
        assert status["reconnects"] == 0 and status["connected"] is True

    leader_still_serves_the_follower()

    # a wrong secret: refused before anything is shipped
    with raw_connection(address) as sock:
        handshake_with_secret(sock, b"not-the-secret", "intruder")
        refused = refusal(read_until_closed(sock))
        assert refused is not None and refused.code == "authentication_failed", refused
    leader_still_serves_the_follower()

    # garbage: not a walship frame at all
    with raw_connection(address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: walship\r\n\r\n" + os.urandom(256))
        refused = refusal(read_until_closed(sock))
        assert refused is not None and refused.code == "protocol_error", refused
    leader_still_serves_the_follower()

    # an oversized frame: a valid header announcing 100 MiB, refused before any body arrives
    with raw_connection(address) as sock:
        hello_type = next(code for code, cls in MESSAGE_TYPES.items() if cls is Hello)
        head = struct.pack(">IB", 100 * MIB, hello_type)
        sock.sendall(FRAME_HEADER.pack(100 * MIB, hello_type, crc32c(head), 0) + b"\0" * 1024)
        refused = refusal(read_until_closed(sock))
        assert refused is not None and "frame_bytes_max" in refused.message, refused
    leader_still_serves_the_follower()

    # a peer that connects and says nothing is dropped at the read deadline at the latest,
    # and meanwhile costs the real follower nothing
    with raw_connection(address):
        leader_still_serves_the_follower()

    assert health(leader)["status"] == "healthy"
    assert [s["node_id"] for s in replication(leader)["followers"]] == ["f1"]
    assert_clean_stop(cluster)
    assert assert_same_wal(cluster.data_dir("leader"), cluster.data_dir("f1")) == written


# ---------------------------------------------------------------------------------- follower reads


def test_follower_refuses_writes_naming_the_leader(cluster: Cluster) -> None:
    leader = cluster.start_leader()
    address = replication_address(leader)
    follower = cluster.start_follower("f1", address)
    response = post_event(follower, event(0))
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["error"] == "read_only"
    assert body["leader"] == address
    # once connected, it also names the URL clients write to (from the leader's Welcome)
    wait_until(lambda: health(follower)["replication"]["connected"], 10, "f1 to connect")
    assert health(follower)["replication"]["leader_url"] == leader.url
    assert post_event(follower, event(0)).json()["leader_url"] == leader.url
    batch = http().post(f"{follower.url}/api/v1/events/batch", json={"events": [event(1)]})
    assert batch.status_code == 409
    assert batch.json()["leader"] == address
    assert last_lsn(follower) == 0 and last_lsn(leader) == 0


def test_min_lsn_reads_on_a_follower_wait_for_the_write(cluster: Cluster) -> None:
    """With the link slowed by a proxy, a read on the follower right after a write on the
    leader returns that write when it names its lsn; a lsn that never comes answers 504."""
    leader = cluster.start_leader()
    with FaultProxy(parse_address(replication_address(leader))) as proxy:
        follower = cluster.start_follower("f1", f"127.0.0.1:{proxy.port}")
        wait_until(lambda: replication(follower)["connected"], 20, "the follower to connect")
        proxy.set_delay_ms(300)
        for i in range(3):
            receipt = post_event(leader, event(i, entities=1)).json()
            lsn = receipt["lsn"]
            t0 = time.monotonic()
            page = get_json(
                follower,
                "/api/v1/events/query",
                entity_id="acct-000",
                min_lsn=lsn,
                min_lsn_wait_ms=10_000,
            )
            assert [e["id"] for e in page["events"]][-1] == receipt["event_id"]
            assert page["events"][-1]["lsn"] == lsn
            assert time.monotonic() - t0 >= 0.2  # it did wait: the proxy holds each chunk 300 ms
            state = get_json(
                follower, "/api/v1/entities/acct-000/state", min_lsn=lsn, min_lsn_wait_ms=10_000
            )
            assert state["version"] == receipt["version"]

        t0 = time.monotonic()
        response = http().get(
            f"{follower.url}/api/v1/events/query",
            params={"min_lsn": 1_000_000, "min_lsn_wait_ms": 300},
        )
        elapsed = time.monotonic() - t0
        assert response.status_code == 504, response.text
        assert response.json()["error"] == "wait_timeout"
        assert 0.25 <= elapsed < 5.0
