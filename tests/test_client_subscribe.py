"""``Client.subscribe`` / ``AsyncClient.subscribe`` and the clients' stream reads, against a
real uvicorn server: the iterator resumes after the last event it delivered when the
connection is cut and when the server restarts, so the caller sees the log exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import wait_until
from tests.test_subscriptions import LIMITS, serving, write
from walship.client import AsyncClient, Client, Event
from walship.errors import InvalidParameter, NotFound
from walship.node import Node, NodeConfig
from walship.testing.proxy import FaultProxy
from walship.wal import FsyncPolicy


class RecordingTransport(httpx.HTTPTransport):
    """Keeps the Last-Event-ID each subscription request carried (None: none)."""

    def __init__(self) -> None:
        super().__init__()
        self.resumed_after: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events/stream"):
            self.resumed_after.append(request.headers.get("last-event-id"))
        return super().handle_request(request)


def open_node(path: Path) -> Node:
    return Node.open(NodeConfig(path, fsync=FsyncPolicy.parse("never"), limits=LIMITS))


class Collector:
    """Runs ``client.subscribe(...)`` in a thread, keeping every event it yields."""

    def __init__(self, client: Client, **kw: Any) -> None:
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._iter = client.subscribe(**kw)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self._iter:
                self.events.append(ev)
                if self._stop.is_set():
                    return
        except BaseException as exc:
            self.error = exc

    def wait_for(self, lsn: int, timeout_s: float = 60) -> None:
        wait_until(
            lambda: (self.events and self.events[-1].lsn >= lsn) or self.error,
            timeout_s,
            f"lsn {lsn} from the subscription",
        )
        assert self.error is None, self.error

    def stop(self, then_write: Any) -> None:
        self._stop.set()
        then_write()  # one more event wakes the iterator so it can see the stop
        self._thread.join(30)
        assert not self._thread.is_alive()


def log_of(url: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/events/query", params={"limit": 10_000}).json()
    assert body["next_cursor"] is None
    return client_view(body["events"])


def client_view(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events as the client's ``Event`` holds them (the fields it has: the server may
    send newer ones, such as ``position``, that this client does not read yet)."""
    fields = Event.__struct_fields__
    return [{k: e[k] for k in fields if k in e} for e in events]


def as_dicts(events: list[Event]) -> list[dict[str, Any]]:
    import msgspec

    # fields the server leaves out at their defaults (payload_encoding of a JSON payload)
    defaults = {"payload_encoding": None, "position": 0}
    return [
        {k: v for k, v in msgspec.to_builtins(ev).items() if k not in defaults or v != defaults[k]}
        for ev in events
    ]


def test_subscribe_resumes_after_a_cut_and_a_server_restart(tmp_path: Path) -> None:
    """History (a Parquet part and the memtable), then live; the proxy in front of the server
    cuts the connection; then the node and its server stop and start again behind it. The one
    iterator delivers the log exactly once, in order."""
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(FaultProxy(("127.0.0.1", 1)))
        transport = RecordingTransport()
        client = stack.enter_context(Client(f"http://127.0.0.1:{proxy.port}", transport=transport))
        node = open_node(tmp_path / "d")
        try:
            with serving(node) as url:
                proxy.target = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
                write(url, 0, 300)
                node.store.checkpoint()
                collector = Collector(client, from_lsn=0)
                collector.wait_for(300)
                before_cut = write(url, 300, 100)
                collector.wait_for(before_cut[-1])
                proxy.cut()  # the connection drops under the subscriber
                lsns = write(url, 400, 100)
                collector.wait_for(lsns[-1])
        finally:
            node.close()
        node = stack.enter_context(open_node(tmp_path / "d"))  # restarted
        url = stack.enter_context(serving(node))
        proxy.target = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        lsns = write(url, 500, 50)
        collector.wait_for(lsns[-1])
        collector.stop(lambda: write(url, 999, 1))
        log = log_of(url)
    got = as_dicts(collector.events)
    assert len(got) >= 550 and got == log[: len(got)]
    # it resumed where it was, not from the start (the server sent nothing twice)
    assert transport.resumed_after[0] is None
    assert transport.resumed_after[1] == f"{before_cut[-1]}:1"  # lsn:term of the last one
    assert all(after is not None for after in transport.resumed_after[1:])


def test_async_subscribe_and_filters(tmp_path: Path) -> None:
    with open_node(tmp_path / "d") as node, serving(node) as url:
        write(url, 0, 40)

        async def run() -> list[Event]:
            async with AsyncClient(url) as client:
                out: list[Event] = []
                async for ev in client.subscribe(entity_id="e-2"):
                    out.append(ev)
                    if len(out) == 6:
                        await asyncio.to_thread(write, url, 40, 14)
                    if len(out) == 8:
                        return out
            raise AssertionError("the subscription ended")

        got = asyncio.run(asyncio.wait_for(run(), 60))
        want = [e for e in log_of(url) if e["entity_id"] == "e-2"]
        assert as_dicts(got) == want[:8]


def test_subscribe_raises_refusals_at_once(tmp_path: Path) -> None:
    with open_node(tmp_path / "d") as node, serving(node) as url, Client(url) as client:
        with pytest.raises(TypeError):
            client.subscribe(min_lsn=3)
        with pytest.raises(InvalidParameter):
            next(iter(client.subscribe(entity_id="")))


def test_client_stream_reads(tmp_path: Path) -> None:
    with open_node(tmp_path / "d") as node, serving(node) as url, Client(url) as client:
        for i in range(30):
            client.append("acct/1", "acct.credited", {"i": i})
            if i % 10 == 9:
                node.store.checkpoint()
        assert client.entity_version("acct/1") == 30
        page = client.entity_events("acct/1", direction="backward", limit=4)
        assert [e.version for e in page.events] == [30, 29, 28, 27] and page.next_version == 26
        page = client.entity_events("acct/1", from_version=9, to_version=12)
        assert [e.payload["i"] for e in page.events] == [8, 9, 10, 11]
        assert client.event(page.events[0].id) == page.events[0]
        with pytest.raises(NotFound):
            client.event("00000000-0000-7000-8000-000000000000")


def test_subscribe_moves_to_the_next_url_when_one_is_down(tmp_path: Path) -> None:
    """A client given a dead URL first subscribes through the live one, from the start."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    with contextlib.closing(dead), open_node(tmp_path / "d") as node, serving(node) as url:
        lsns = write(url, 0, 5)
        with Client([f"http://127.0.0.1:{dead.getsockname()[1]}", url]) as client:
            got = []
            for ev in client.subscribe(from_lsn=1):
                got.append(ev.lsn)
                if len(got) == 5:
                    break
            assert got == lsns
            assert [e.lsn for e in client.iter_query(event_type_prefix="t.")] == lsns


def test_close_from_another_thread_ends_an_idle_subscription_at_once(tmp_path: Path) -> None:
    """The iterating thread is blocked reading a stream with nothing to send (the server's
    keepalive is 15 s away); ``close()`` from another thread ends its iteration at once, and
    it does not connect again."""
    # the default limits: an idle stream's keepalive every 15 s
    node = Node.open(NodeConfig(tmp_path / "d", fsync=FsyncPolicy.parse("never")))
    try:
        with serving(node) as url, Client(url) as client:
            write(url, 0, 3)
            subscription = client.subscribe(from_lsn=1)
            got: list[int] = []
            ended = threading.Event()

            def run() -> None:
                got.extend(ev.lsn for ev in subscription)  # ends only when closed
                ended.set()

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            wait_until(lambda: len(got) == 3, 30, "the history from the subscription")
            assert not ended.wait(0.3)  # idle, blocked on the stream (not the check)
            subscription.close()
            assert ended.wait(5.0), "close() did not end the blocked iteration"
            assert got == [1, 2, 3]
            with pytest.raises(StopIteration):
                next(subscription)
    finally:
        node.close()
