"""Catch-up subscriptions over SSE (``GET /api/v1/events/stream``): every matching event
exactly once, in lsn order, from history (Parquet parts, memtables) into live tailing while
writers run, across client reconnects (``Last-Event-ID``), a server restart and on a follower
that only shows what it has applied; bad input is a 4xx JSON error."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.cluster import Cluster, Writers, query_all, replication_address, stats, wait_until
from tests.sse_reader import SseReader
from walship.http import create_app, stream
from walship.http.server import NodeServer
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.replication.config import parse_address
from walship.testing.proxy import FaultProxy
from walship.wal import FsyncPolicy

STREAM = "/api/v1/events/stream"
LIMITS = Limits(
    memtable_events_max=200,
    parquet_row_group_rows=64,
    subscription_page_events=50,
    subscription_heartbeat_ms=300,
    compaction_fanin_min=1_000,  # keep the parts apart
)


@contextmanager
def serving(node: Node) -> Iterator[str]:
    """The node's app under uvicorn in a thread (lifespan on: the node's commit pulses run,
    and draining ends open subscriptions as ``walship serve`` does)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(node), log_level="warning", timeout_graceful_shutdown=10)
    server = NodeServer(config, lambda: None, node.end_subscriptions)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 10, "the server to start")
    assert thread.is_alive()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node.open(NodeConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never"), limits=LIMITS))
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def url(node: Node) -> Iterator[str]:
    with serving(node) as base:
        yield base


def write(url: str, first: int, count: int, **fields: Any) -> list[int]:
    events = [
        {"entity_id": f"e-{i % 7}", "event_type": "t.a" if i % 2 else "t.b", "payload": {"i": i}}
        | fields
        for i in range(first, first + count)
    ]
    response = httpx.post(f"{url}/api/v1/events/batch", json={"events": events})
    assert response.status_code == 200, response.text
    return [r["lsn"] for r in response.json()["receipts"]]


def all_events(url: str, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = httpx.get(
            f"{url}/api/v1/events/query",
            params={**params, "limit": 10_000, **({"cursor": cursor} if cursor else {})},
        ).json()
        out.extend(page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def test_subscription_from_zero_gets_every_event_once_across_live_switch_and_reconnect(
    node: Node, url: str
) -> None:
    """History in several Parquet parts and the memtable, then writers running while the
    subscriber reads; the client drops the connection midway and resumes with Last-Event-ID:
    together the two connections deliver the log exactly, in lsn order."""
    for first in range(0, 450, 150):
        write(url, first, 150)
        node.store.checkpoint()
    write(url, 450, 50)  # and some in the memtable
    assert len(node.store.manifest.parts) >= 2
    writers = Writers(url, threads=2, batch=25, first=1_000, events_max=1_500).start()
    try:
        first = SseReader(f"{url}{STREAM}?from_lsn=0")
        got = first.take(700)
        first.close()
        assert first.error is not None or first.events.empty()  # it was cut, not finished
        got += first.drain()
        second = SseReader(f"{url}{STREAM}", last_event_id=got[-1]["lsn"])
        lsns = writers.join()
        got += second.take_until(lsns[-1], got[-1]["lsn"])
        time.sleep(0.3)  # anything extra would be a duplicate or an event from nowhere
        got += second.drain()
        second.close()
    finally:
        writers.stop()
    assert len(node.store.manifest.parts) >= 4  # checkpoints ran while the stream was read
    assert got == all_events(url)
    assert len(got) == 500 + 1_500


def test_filters_apply_to_history_and_live(url: str) -> None:
    write(url, 0, 60)
    write(url, 0, 10, tenant_id="other")
    by_entity = SseReader(f"{url}{STREAM}?entity_id=e-3&event_type_prefix=t.")
    by_tenant = SseReader(f"{url}{STREAM}?tenant_id=other&event_type=t.a")
    try:
        write(url, 60, 60)
        write(url, 10, 10, tenant_id="other")
        want = all_events(url, entity_id="e-3")
        assert by_entity.take(len(want)) == want
        want = all_events(url, tenant_id="other", event_type="t.a")
        assert by_tenant.take(len(want)) == want
        time.sleep(0.3)
        assert by_entity.drain() == [] and by_tenant.drain() == []
    finally:
        by_entity.close()
        by_tenant.close()


def test_idle_subscription_gets_keepalive_comments(url: str) -> None:
    with SseReader(f"{url}{STREAM}?from_lsn=1") as reader:
        wait_until(lambda: reader.comments >= 3, 10, "keepalive comments")
        write(url, 0, 1)
        assert reader.take(1)[0]["lsn"] == 1


def test_many_idle_subscribers_share_one_wakeup(node: Node, url: str) -> None:
    """Forty idle streams cost nothing per commit beyond a wake-up: each gets the next write."""
    readers = [SseReader(f"{url}{STREAM}?from_lsn=1") for _ in range(40)]
    try:
        lsns = write(url, 0, 3)
        for reader in readers:
            assert [e["lsn"] for e in reader.take(3)] == lsns
    finally:
        for reader in readers:
            reader.close()
    wait_until(lambda: node_open_streams(url) == 0, 10, "the streams to be released")


def node_open_streams(url: str) -> int:
    return int(httpx.get(f"{url}/api/v1/stats").json().get("subscriptions", -1))


def test_stopping_the_server_ends_open_subscriptions(tmp_path: Path) -> None:
    """uvicorn waits for open responses before it stops: a subscription must end on drain,
    not hold the shutdown for its full grace period."""
    n = Node.open(NodeConfig(tmp_path / "d", fsync=FsyncPolicy.parse("never"), limits=LIMITS))
    try:
        with serving(n) as base:
            reader = SseReader(f"{base}{STREAM}")
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 5
        reader.close()
    finally:
        n.close()


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"from_lsn": -1}, {}),
        ({"from_lsn": 2**63}, {}),
        ({"from_lsn": "x"}, {}),
        ({"form_lsn": 3}, {}),
        ({"event_typ": "t.a"}, {}),
        ({"entity_id": ""}, {}),
        ({"event_type_prefix": "x" * 1000}, {}),
        ({}, {"Last-Event-ID": "abc"}),
        ({}, {"Last-Event-ID": "-5"}),
        ({}, {"Last-Event-ID": "1.5"}),
        ({}, {"Last-Event-ID": "9" * 40}),
        ({}, {"Last-Event-ID": "0x10"}),
        ({}, {"Last-Event-ID": "5:"}),
        ({}, {"Last-Event-ID": ":5"}),
        ({}, {"Last-Event-ID": "5:x"}),
        ({}, {"Last-Event-ID": "5:1:2"}),
        ({}, {"Last-Event-ID": "5:-1"}),
    ],
)
def test_bad_subscription_input_is_a_4xx_json_error(
    url: str, params: dict[str, Any], headers: dict[str, str]
) -> None:
    # streamed: a stream wrongly opened must fail the test, not hang it
    with httpx.stream("GET", f"{url}{STREAM}", params=params, headers=headers) as response:
        assert 400 <= response.status_code < 500, response.status_code
        assert response.headers["content-type"] == "application/json"
        assert json.loads(response.read())["error"] == "invalid_parameter"


def test_last_event_id_wins_over_from_lsn(url: str) -> None:
    write(url, 0, 10)
    with SseReader(f"{url}{STREAM}?from_lsn=1", last_event_id=7) as reader:
        assert [e["lsn"] for e in reader.take(3)] == [8, 9, 10]
    with SseReader(f"{url}{STREAM}", headers={"Last-Event-ID": "8:1"}) as reader:
        assert [e["lsn"] for e in reader.take(2)] == [9, 10]


def test_a_resume_from_a_term_the_node_has_not_seen_is_not_called_a_cut(url: str) -> None:
    """The consumer read from a newer leader: this node is the one behind, so it says 503
    (try another node), not that the consumer's position was repaired away."""
    write(url, 0, 10)
    with httpx.stream("GET", f"{url}{STREAM}", headers={"Last-Event-ID": "5:2"}) as response:
        assert response.status_code == 503
        assert json.loads(response.read())["error"] == "unavailable"


@pytest.mark.parametrize("last_event_id", ["8:0", "11", "11:1", "99:1"])
def test_a_resume_from_an_event_this_log_does_not_hold_is_409(url: str, last_event_id: str) -> None:
    """Another term at that lsn, or past the end of the leader's log: the consumer's position
    was repaired away (or never was on this history), which it must be told, not skipped."""
    write(url, 0, 10)
    with httpx.stream(
        "GET", f"{url}{STREAM}", headers={"Last-Event-ID": last_event_id}
    ) as response:
        assert response.status_code == 409
        assert json.loads(response.read())["error"] == "log_cut"


# ------------------------------------------------------------------ real servers


def test_subscription_resumes_after_a_server_restart(tmp_path: Path) -> None:
    """The subscriber drops out midway through a write load; the server is stopped (with
    another subscription open, which must not hold the shutdown) and started again; resuming
    from the last lsn received delivers the rest from disk, then live, exactly once."""
    with Cluster(tmp_path) as cluster:
        leader = cluster.start_leader(args=["--memtable-events-max", "300"])
        writers = Writers(leader.url, threads=2, batch=50, events_max=1_000).start()
        reader = SseReader(f"{leader.url}{STREAM}?from_lsn=0")
        got = reader.take(400)
        reader.close()
        got += reader.drain()
        lsns = writers.join()
        assert got[-1]["lsn"] < lsns[-1]
        idle = SseReader(f"{leader.url}{STREAM}?from_lsn=999999")
        t0 = time.monotonic()
        assert leader.stop() == 0  # the WAL flushed: a clean stop
        assert time.monotonic() - t0 < 8, "the open subscription held the shutdown"
        idle.close()
        leader = cluster.restart(leader)
        again = SseReader(f"{leader.url}{STREAM}", last_event_id=got[-1]["lsn"])
        got += again.take_until(lsns[-1], got[-1]["lsn"])
        got += again.take(20) if write(leader.url, 5_000, 20) else []
        again.close()
        assert got == query_all(leader)
        assert len(got) == 1_020


def test_follower_subscription_shows_only_what_it_applied(tmp_path: Path) -> None:
    """Cut off from its leader, a follower's subscription stops at the follower's applied
    lsn while the leader goes on; once the link heals, the rest arrives, once, in order."""
    with Cluster(tmp_path) as cluster:
        leader = cluster.start_leader()
        with FaultProxy(parse_address(replication_address(leader))) as proxy:
            follower = cluster.start_follower("f1", f"127.0.0.1:{proxy.port}")
            before = write(leader.url, 0, 200)
            wait_until(lambda: stats(follower)["visible_lsn"] >= before[-1], 30, "the follower")
            reader = SseReader(f"{follower.url}{STREAM}?from_lsn=1")
            try:
                assert [e["lsn"] for e in reader.take(200)] == before
                proxy.set_refuse(True)  # cut off: the leader goes on alone
                after = write(leader.url, 200, 100)
                time.sleep(1.0)
                applied = stats(follower)["visible_lsn"]
                assert applied < after[-1]
                early = reader.drain()
                assert all(e["lsn"] <= applied for e in early), (applied, early[-1:])
                proxy.heal()
                rest = reader.take_until(after[-1], early[-1]["lsn"] if early else before[-1])
            finally:
                reader.close()
            assert [e["lsn"] for e in early + rest] == after
            assert early + rest == query_all(leader, from_lsn=after[0])


def test_a_consumer_that_does_not_read_is_paced_by_tcp(
    node: Node, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber that stops reading holds the server to what the socket buffers take: the
    stream reads its next page only once the last one went out, so ~32 MB of events behind it
    cost a few pages of reads, not a queue of the whole backlog. Reading again then delivers
    every event."""
    pages: list[int] = []
    read_page = stream.frame_page  # an unfiltered stream reads its history as frame pages

    def counting(view: Any, from_lsn: int, to_lsn: int, limit: int) -> Any:
        pages.append(from_lsn)
        return read_page(view, from_lsn, to_lsn, limit)

    monkeypatch.setattr(stream, "frame_page", counting)
    blob = "x" * 16_000
    for _ in range(20):
        events = [{"entity_id": f"e{i}", "event_type": "big", "payload": blob} for i in range(100)]
        response = httpx.post(f"{url}/api/v1/events/batch", json={"events": events}, timeout=60)
        assert response.status_code == 200
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect((host, int(port)))
    try:
        sock.sendall(f"GET {STREAM}?from_lsn=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_until(lambda: len(pages) >= 2, 10, "the stream to start")
        time.sleep(1.5)  # unpaced, it would read all 40 pages of 50 events meanwhile
        assert len(pages) <= 15, pages
        received = 0
        sock.settimeout(30)
        buffer = b""
        while received < 2_000:
            chunk = sock.recv(1 << 20)
            assert chunk, "the stream ended"
            buffer += chunk
            *done, buffer = buffer.split(b"\n\n")
            received += sum(1 for frame in done if b"\ndata: " in frame)
        assert received == 2_000
        assert len(pages) >= 40
    finally:
        sock.close()


def test_subscriptions_over_the_limit_are_503(tmp_path: Path) -> None:
    limits = Limits(subscriptions_max=2, subscription_heartbeat_ms=300)
    n = Node.open(NodeConfig(tmp_path / "d", fsync=FsyncPolicy.parse("never"), limits=limits))
    try:
        with serving(n) as base:
            readers = [SseReader(f"{base}{STREAM}") for _ in range(2)]
            wait_until(lambda: node_open_streams(base) == 2, 10, "two open streams")
            with httpx.stream("GET", f"{base}{STREAM}") as response:
                assert response.status_code == 503
                assert json.loads(response.read())["error"] == "unavailable"
            readers.pop().close()
            wait_until(lambda: node_open_streams(base) == 1, 10, "a stream released")
            readers.append(SseReader(f"{base}{STREAM}"))
            for reader in readers:
                reader.close()
    finally:
        n.close()


def test_query_and_stream_share_the_type_prefix_filter(node: Node, url: str) -> None:
    write(url, 0, 6)
    write(url, 0, 2, event_type="u.x")
    node.store.checkpoint()  # the prefix is matched in Parquet parts and in the memtable
    write(url, 6, 4)
    write(url, 2, 2, event_type="u.x")
    want = [e for e in all_events(url) if e["event_type"].startswith("t.")]
    assert all_events(url, event_type_prefix="t.") == want and len(want) == 10
    with SseReader(f"{url}{STREAM}?event_type_prefix=u.") as reader:
        assert [e["event_type"] for e in reader.take(4)] == ["u.x"] * 4


def test_keepalives_flow_while_writes_run_that_the_filter_skips(url: str) -> None:
    """Commits keep waking the stream, but none matches: a proxy must still see traffic."""
    with SseReader(f"{url}{STREAM}?entity_id=nobody") as reader:
        start = reader.comments
        deadline = time.monotonic() + 2.0
        n = 0
        while time.monotonic() < deadline:
            write(url, n, 1)
            n += 1
            time.sleep(0.02)
        assert reader.comments - start >= 3, reader.comments
        assert reader.drain() == []


def test_a_query_limit_below_the_subscription_page_still_streams_everything(
    tmp_path: Path,
) -> None:
    """A deployment may set ``query_limit_max`` under ``subscription_page_events``: the stream
    pages at the smaller size instead of failing after its answer started."""
    limits = Limits(query_limit_max=20, query_limit_default=10, subscription_page_events=500)
    small = Node.open(NodeConfig(tmp_path / "d", fsync=FsyncPolicy.parse("never"), limits=limits))
    try:
        with serving(small) as base:
            lsns = write(base, 0, 30) + write(base, 30, 30)
            reader = SseReader(f"{base}{STREAM}?from_lsn=0")
            try:
                got = reader.take(60)
            finally:
                reader.close()
            assert [e["lsn"] for e in got] == lsns
    finally:
        small.close()


def test_caught_up_subscribers_share_each_commits_read(
    node: Node, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thirty caught-up streams (ten per filter) get each commit's events from one shared
    read of the live tail, not thirty queries; each still gets exactly what its filter says."""
    write(url, 0, 20)
    everything = [SseReader(f"{url}{STREAM}?from_lsn=1") for _ in range(10)]
    by_entity = [SseReader(f"{url}{STREAM}?entity_id=e-3") for _ in range(10)]
    by_tenant = [SseReader(f"{url}{STREAM}?tenant_id=other") for _ in range(10)]
    readers = everything + by_entity + by_tenant
    try:
        for reader in everything:
            assert len(reader.take(20)) == 20
        for reader in by_entity:
            assert len(reader.take(3)) == 3  # e-3 of 0..19: 3, 10, 17
        wait_until(lambda: node_open_streams(url) == 30, 10, "thirty open streams")
        # the tenant streams' first read has run too: every stream follows the live tail
        wait_until(
            lambda: httpx.get(f"{url}/api/v1/stats").json()["subscriptions_live"] == 30,
            10,
            "thirty streams on the live tail",
        )
        reads: list[int] = []
        query = node.store.query
        recent = node.store.recent_events  # the tail's read on the loop

        def counting(flt: Any, limit: Any = None, cursor: Any = None) -> Any:
            reads.append(flt.from_lsn)
            return query(flt, limit, cursor)

        def counting_recent(after: int, to_lsn: int, limit: int, **kw: Any) -> Any:
            reads.append(after + 1)
            return recent(after, to_lsn, limit, **kw)

        monkeypatch.setattr(node.store, "query", counting)
        monkeypatch.setattr(node.store, "recent_events", counting_recent)
        lsns = write(url, 20, 14) + write(url, 0, 5, tenant_id="other")
        for reader in everything:
            assert [e["lsn"] for e in reader.take(19)] == lsns
        for reader in by_entity:
            assert [e["lsn"] for e in reader.take(2)] == [lsns[4], lsns[11]]  # 24 and 31
        for reader in by_tenant:
            assert [e["lsn"] for e in reader.take(5)] == lsns[14:]
        assert 1 <= len(reads) <= 6, reads  # two commits, one read each (and a straggler or two)
        time.sleep(0.3)
        assert all(reader.drain() == [] for reader in readers)
    finally:
        for reader in readers:
            reader.close()


def test_json_spread_over_lines_stays_one_data_line_in_every_path(node: Node, url: str) -> None:
    """A client may send its payload and metadata pretty-printed: JSON allows CR and LF
    between tokens, and walship stores the text as sent. In an event stream a line break ends
    the ``data`` line (a blank one the event), so each path that writes frames -- a part's
    frames built in bulk, a memtable's, a filtered page, the live tail -- must put the JSON on
    one line; the consumer gets the same values."""
    payload = b'{\n  "a": [1,\r\n 2],\r  "s": "x"\n\n}'
    metadata = b'{\n"m":\n\n true}'

    def write_pretty(count: int) -> None:
        one = b'{"entity_id": "pretty", "event_type": "t.p", "payload": %s, "metadata": %s}'
        body = b'{"events": [%s]}' % b",\n".join([one % (payload, metadata)] * count)
        response = httpx.post(
            f"{url}/api/v1/events/batch",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 200, response.text

    write_pretty(3)
    node.store.checkpoint()  # history from a part
    write_pretty(3)  # and from the memtable
    readers = [
        SseReader(f"{url}{STREAM}"),  # every event: frames built a slab at a time
        SseReader(f"{url}{STREAM}?tenant_id=default&event_type=t.p"),  # filtered pages
    ]
    try:
        got = [r.take(6, timeout_s=10) for r in readers]
        write_pretty(3)  # live, from the tail the caught-up streams share
        got = [old + r.take(3, timeout_s=10) for old, r in zip(got, readers, strict=True)]
    finally:
        for r in readers:
            r.close()
    for events in got:
        assert [ev["lsn"] for ev in events] == list(range(1, 10))
        for ev in events:
            assert ev["payload"] == {"a": [1, 2], "s": "x"}
            assert ev["metadata"] == {"m": True}
