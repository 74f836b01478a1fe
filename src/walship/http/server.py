"""A uvicorn server that reports when it is ready and lets its caller finish the shutdown,
and an HTTP protocol that bounds a request's head before the parser buffers it.

Library code (``walship serve`` and the tests run a node's app with it), imported only where a
server is started (``walship.http`` does not import it), so the other commands and the client
do not pay for importing uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import signal
import socket
import threading
from collections.abc import Callable, Generator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from walship.limits import DEFAULT_LIMITS

if TYPE_CHECKING:
    from walship.node import Node

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
except ImportError:  # pragma: no cover (httptools is part of uvicorn[standard])
    HttpToolsProtocol = None  # type: ignore[assignment,misc]
    RequestResponseCycle = None  # type: ignore[assignment,misc]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NodeServer(uvicorn.Server):
    """``uvicorn.Server`` with a ready callback and no re-raised stop signal.

    Stock uvicorn re-raises the SIGTERM/SIGINT it caught once it has drained, which kills the
    process before ``walship serve`` can close the node (flush and fsync the WAL). Here the
    signal is only recorded in ``stop_signal``; the caller closes the node and exits 0.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        on_started: Callable[[], None],
        on_draining: Callable[[], None] | None = None,
        companions: Sequence[tuple[CompanionServer, socket.socket]] = (),
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._on_draining = on_draining
        self._companions = companions
        self._companion_tasks: list[asyncio.Task[None]] = []
        self.stop_signal: int | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.should_exit:
            return
        # on the node's event loop, started once the API listens, stopped when it stops
        for companion, sock in self._companions:
            self._companion_tasks.append(asyncio.create_task(companion.serve(sockets=[sock])))
        for companion, _ in self._companions:
            while not companion.started:
                if companion.should_exit or any(t.done() for t in self._companion_tasks):
                    self.should_exit = True  # it could not start: neither serves
                    return
                await asyncio.sleep(0.01)
        self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for companion, _ in self._companions:
            companion.should_exit = True
        await asyncio.gather(*self._companion_tasks, return_exceptions=True)
        # uvicorn waits for open responses to finish before the node stops, and a
        # subscription never finishes on its own: tell them to end first
        if self._on_draining is not None:
            self._on_draining()
        await super().shutdown(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self._stop) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = sig
        # a second Ctrl-C skips waiting for open connections (uvicorn's own behaviour)
        self.handle_exit(sig, frame)


class CompanionServer(uvicorn.Server):
    """A second listener of the node's process (``--metrics-listen``), run by ``NodeServer``
    on its event loop: the node's server owns the signals, and stops this one with itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


_HEAD_END = b"\r\n\r\n"
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def _chunk_writer_cycle() -> type:
    """uvicorn's request cycle, writing each chunk of a chunked body without copying it.

    uvicorn joins a chunk's size line, its bytes and the CRLF into a new bytes object before
    the write: a copy of every chunk. The live tail hands the same frames to every stream
    with a filter (``http/live_tail.py``), so with 100 live streams that copy was made 100
    times over and was much of what the fan-out still cost (~9% of the node's samples with
    uvicorn's write). ``writelines`` gives the three pieces to the transport as they are
    (uvloop writes them with one ``writev``). The bytes on the wire are uvicorn's exactly;
    anything else (headers, the last chunk, HEAD, a fixed length) goes through uvicorn."""
    assert RequestResponseCycle is not None

    class ChunkWriterCycle(RequestResponseCycle):
        async def send(self, message: Any) -> None:
            if (
                message["type"] == "http.response.body"
                and message.get("more_body", False)
                and self.response_started
                and not self.response_complete
                and self.chunked_encoding
                and self.scope["method"] != "HEAD"
            ):
                if self.flow.write_paused and not self.disconnected:
                    await self.flow.drain()
                if self.disconnected:
                    return
                body = message.get("body", b"")
                if body:
                    self.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
                return
            await super().send(message)

    return ChunkWriterCycle


def head_bytes_max_protocol(head_bytes_max: int = DEFAULT_LIMITS.request_head_bytes_max) -> type:
    """uvicorn's httptools protocol, refusing (431, connection closed) a request whose line
    and headers exceed ``head_bytes_max`` before its bytes reach the parser: httptools keeps
    a header value whole until it ends, so a 20 MB header was held in memory and accepted."""
    if HttpToolsProtocol is None:  # pragma: no cover
        raise RuntimeError("httptools is not installed")

    chunk_writer = _chunk_writer_cycle()

    class BoundedHeadProtocol(HttpToolsProtocol):
        _in_head = True
        _head_bytes = 0
        _tail = b""

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()
            # before its task first runs, where the app is handed ``send`` (an upgrade to a
            # WebSocket makes no cycle)
            if type(self.cycle) is RequestResponseCycle:
                self.cycle.__class__ = chunk_writer

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_bytes, self._tail = True, 0, b""

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                budget = head_bytes_max - self._head_bytes
                seen = self._tail + data
                end = seen.find(_HEAD_END)
                head_here = len(data) if end < 0 else end + len(_HEAD_END) - len(self._tail)
                if head_here > budget:
                    body = (
                        b'{"error":"limit_exceeded","message":"request line and headers exceed '
                        b'%d bytes","limit":%d}' % (head_bytes_max, head_bytes_max)
                    )
                    self.transport.write(_TOO_LARGE % (len(body), body))
                    self.transport.close()
                    return
                if end < 0:
                    self._head_bytes += len(data)
                    self._tail = seen[-3:]
            super().data_received(data)

    return BoundedHeadProtocol


def http_protocol(head_bytes_max: int) -> type | str:
    """The HTTP protocol of a node's listeners: httptools with the request head bounded
    (``head_bytes_max_protocol``) when it is installed, else h11 (bounded by its own limit)."""
    if importlib.util.find_spec("httptools"):
        return head_bytes_max_protocol(head_bytes_max)
    return "h11"


def metrics_server(node: Node, log_level: str) -> CompanionServer:
    """The ``--metrics-listen`` server: ``GET /metrics`` of ``node`` alone, no credentials."""
    from walship.http.metrics_listener import metrics_app

    head_bytes_max = node.limits.request_head_bytes_max
    config = uvicorn.Config(
        metrics_app(node.store.metrics.registry),
        http=http_protocol(head_bytes_max),
        h11_max_incomplete_event_size=head_bytes_max,
        lifespan="off",  # the node's own server runs its lifespan
        access_log=False,
        log_level=log_level,
        server_header=False,
    )
    return CompanionServer(config)
