"""A subscription follows the cluster's log through what a consumer meets in production, with
real ``walship serve`` processes: ``Client.subscribe`` from lsn 0 while writers run (history
in Parquet parts, then live), a dropped connection, a restart of the node it reads from and a
failover to a new leader (it then reads from a follower), delivering every event exactly once
in lsn order. And when a failover repair cuts a node's log below what a subscription had
sent, the stream ends saying so (SSE ``event: cut``, WebSocket close 4409, ``LogCut`` from
the client), and a resume from a position the repair cut away is refused with 409."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.cluster import (
    Writers,
    event,
    post_batch,
    query_all,
    replication,
    replication_address,
    wait_caught_up,
    wait_until,
    write_events,
)
from tests.failover_cluster import FailoverCluster, promote, repoint
from tests.sse_reader import SseReader
from tests.test_client_subscribe import Collector, as_dicts, client_view
from walship.client import Client
from walship.errors import LogCut
from walship.replication.config import parse_address
from walship.testing.proxy import FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STREAM = "/api/v1/events/stream"
SMALL = ["--memtable-events-max", "400", "--checkpoint-interval-ms", "200"]
FAST_ACKS = ["--ack-timeout-ms", "1000", "--max-lag-ms", "1000"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FailoverCluster]:
    with FailoverCluster(tmp_path) as c:
        yield c


def port_of(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def test_subscribe_from_zero_gets_every_event_once_across_a_cut_a_restart_and_a_failover(
    cluster: FailoverCluster,
) -> None:
    leader = cluster.start_leader(args=SMALL)
    f1 = cluster.start_follower("f1", replication_address(leader), args=SMALL)
    f2 = cluster.start_follower("f2", replication_address(leader), args=SMALL)
    write_events(leader, 1_500, batch=250)  # history: Parquet parts and the memtable
    with contextlib.ExitStack() as stack:
        # the client reaches the cluster through one proxy, pointed where the test wants it
        proxy = stack.enter_context(FaultProxy(port_of(leader.url)))
        client = stack.enter_context(Client(f"http://127.0.0.1:{proxy.port}"))
        collector = Collector(client, from_lsn=0)
        writers = Writers(leader.url, threads=2, batch=50, first=10_000).start()
        collector.wait_for(1_500)  # history, then live while the writers run
        wait_until(lambda: writers.written >= 500, 60, "live writes")
        proxy.cut()  # the connection drops: the client resumes by Last-Event-ID
        wait_until(lambda: writers.written >= 1_000, 60, "more live writes")
        lsns = writers.stop()
        collector.wait_for(lsns[-1])

        # the node the subscription reads from restarts (on its replication port)
        port = parse_address(replication_address(leader))[1]
        assert leader.stop() == 0
        leader = cluster.restart(leader, replication_port=port)
        proxy.target = port_of(leader.url)
        writers = Writers(leader.url, threads=2, batch=50, first=20_000, events_max=600).start()
        lsns = writers.join()
        collector.wait_for(lsns[-1])

        # failover: everything reached both followers, the leader dies, f1 takes over and the
        # subscription goes on from the follower f2
        writers = Writers(leader.url, threads=2, batch=50, first=30_000, events_max=400).start()
        lsns = writers.join()
        wait_caught_up(leader, f1, f2)
        collector.wait_for(lsns[-1])
        leader.kill()
        proxy.target = port_of(f2.url)
        proxy.cut()
        wait_until(lambda: not replication(f1)["connected"], 15, "f1 to lose its leader")
        answer = promote(f1, peers=[f2])
        repoint(f2, answer["replication_address"])
        writers = Writers(f1.url, threads=2, batch=50, first=40_000, events_max=600).start()
        lsns = writers.join()
        wait_caught_up(f1, f2)
        collector.wait_for(lsns[-1])
        collector.stop(lambda: post_batch(httpx.Client(), f1.url, [event(50_000)]))
        log = client_view(query_all(f1))
    got = as_dicts(collector.events)
    assert len(got) >= 1_500 + 1_000 + 600 + 400 + 600
    assert got == log[: len(got)]  # every event once, in lsn order, nothing from nowhere
    # three terms: the first leader's, the one its restart began (every leader start begins a
    # new term, README "Shipping before the leader's fsync"), and f1's after the failover
    assert len({e["term"] for e in got}) == 3


def test_a_repair_cut_ends_open_subscriptions_and_refuses_resumes_it_cut_away(
    cluster: FailoverCluster,
) -> None:
    """The leader, cut off from its follower, answers 30 writes the follower never gets;
    subscribers on it read them. The follower is promoted and writes on; the old leader is
    repointed to it, and its repair cuts those 30 records. Its open SSE stream ends with
    ``event: cut``, its WebSocket closes with 4409, ``Client.subscribe`` raises LogCut; a
    resume with the last id they had is refused with 409 ``log_cut`` on both nodes."""
    leader = cluster.start_leader(args=["--ack-mode", "async", *FAST_ACKS])
    with FaultProxy(parse_address(replication_address(leader))) as link:
        f1 = cluster.start_follower("f1", f"127.0.0.1:{link.port}")
        shared = write_events(leader, 100, batch=50)
        wait_caught_up(leader, f1)
        link.set_refuse(True)
        link.cut()
        wait_until(lambda: not replication(f1)["connected"], 15, "f1 to lose its leader")
        tail = write_events(leader, 30, start=1_000, batch=10)
        assert tail[0] == shared[-1] + 1

        stack = contextlib.ExitStack()
        sse = stack.enter_context(SseReader(f"{leader.url}{STREAM}?from_lsn=1"))
        ws_url = f"ws://{leader.url.removeprefix('http://')}{STREAM}?from_lsn=90"
        ws = stack.enter_context(connect(ws_url))
        client = stack.enter_context(Client(leader.url))
        collector = Collector(client, from_lsn=1)
        with stack:
            had = sse.take(130)
            assert [e["lsn"] for e in had] == shared + tail
            last = had[-1]
            for _ in range(41):
                ws.recv(timeout=30)
            collector.wait_for(tail[-1])

            answer = promote(f1, force=True)
            assert answer["term"] == 2
            write_events(f1, 60, start=2_000, batch=20)  # f1's log passes the old tail's lsns
            repoint(leader, answer["replication_address"])
            wait_until(lambda: replication(leader)["repairs"] == 1, 30, "the old leader's repair")

            wait_until(lambda: sse.cut is not None, 15, "the cut frame")
            assert sse.cut is not None
            assert (sse.cut["error"], sse.cut["kept_lsn"]) == ("log_cut", shared[-1])
            assert sse.drain() == []  # nothing after what it had, nothing of the new history
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=15)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4409
            assert closed.value.rcvd.reason == f"log_cut kept_lsn={shared[-1]}"
            wait_until(lambda: collector.error is not None, 30, "the client's LogCut")
            assert isinstance(collector.error, LogCut), collector.error
            assert len(collector.events) == 130

            wait_caught_up(f1, leader)
            resume = f"{last['lsn']}:{last['term']}"
            with pytest.raises(InvalidStatus) as refused:  # a WebSocket resume, as a browser's
                connect(f"ws://{f1.url.removeprefix('http://')}{STREAM}?last_event_id={resume}")
            assert refused.value.response.status_code == 409
            for node in (leader, f1):
                with httpx.stream(
                    "GET", f"{node.url}{STREAM}", headers={"Last-Event-ID": resume}
                ) as response:
                    assert response.status_code == 409, node.node_id
                    body = json.loads(response.read())
                    assert body["error"] == "log_cut", body
                    # where the node's log still agrees with what the consumer had
                    assert body["kept_lsn"] == shared[-1], body
            # a plain lsn past the leader's end is refused too; one it holds is taken
            end = query_all(f1)[-1]["lsn"]
            with httpx.stream(
                "GET", f"{f1.url}{STREAM}", headers={"Last-Event-ID": str(end + 100)}
            ) as response:
                assert response.status_code == 409
            with SseReader(f"{f1.url}{STREAM}", last_event_id=end - 5) as again:
                assert [e["lsn"] for e in again.take(5)] == [e["lsn"] for e in query_all(f1)][-5:]
