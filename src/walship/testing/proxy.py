"""A fault-injecting TCP proxy for replication links: cut, delay, drop, flip bits, pause.

It runs its own event loop in a thread, so synchronous tests and tools can steer it::

    with FaultProxy(("127.0.0.1", leader_port)) as proxy:
        start_follower(leader=f"127.0.0.1:{proxy.port}")
        proxy.flip_next(direction="down")   # corrupt one byte of the next leader->follower chunk
        proxy.cut()                         # close every connection now
        proxy.set_delay_ms(50)

"down" is listen-side <- target (leader to follower), "up" is the other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")

Direction = Literal["up", "down", "both"]


@dataclass
class FaultState:
    delay_ms: int = 0
    drop_probability: float = 0.0
    flip_probability: float = 0.0
    flips_pending: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    paused: bool = False
    refuse: bool = False
    answers_to_cut: int = 0  # connections to cut as their first answer byte arrives
    connections: int = 0  # accepted so far (refused ones too)
    flipped: int = 0
    dropped_connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class FaultProxy:
    """A TCP proxy on 127.0.0.1 (port chosen at run time) in front of ``target``."""

    def __init__(self, target: tuple[str, int], seed: int = 0) -> None:
        self.target = target
        self.state = FaultState()
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.port = 0

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        self.port = self._call(self._start())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        # let the handlers see their connections end: a task still pending when the loop
        # stops is reported as "destroyed but it is pending" at garbage collection
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=2)

    # ------------------------------------------------------------------ controls

    def cut(self) -> None:
        """Close every open connection (new ones are accepted unless ``refuse``)."""
        self._call(self._cut())

    async def _cut(self) -> None:
        for w in list(self._conns):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._conns.clear()

    def set_refuse(self, refuse: bool) -> None:
        """Refuse (close at once) new connections: a partition until healed."""
        self.state.refuse = refuse
        if refuse:
            self.cut()

    def cut_next_answers(self, count: int = 1) -> None:
        """Cut each of the next ``count`` connections whose target starts to answer, before
        the answer is passed on: the request was served, its answer is lost."""
        self.state.answers_to_cut += count

    def set_delay_ms(self, ms: int) -> None:
        self.state.delay_ms = ms

    def set_paused(self, paused: bool) -> None:
        """Stop forwarding (bytes queue up in the kernel) until resumed."""
        self.state.paused = paused

    def flip_next(self, direction: Literal["up", "down"] = "down", count: int = 1) -> None:
        """Flip one random bit in each of the next ``count`` chunks going ``direction``."""
        self.state.flips_pending[direction] += count

    def set_flip_probability(self, p: float) -> None:
        self.state.flip_probability = p

    def heal(self) -> None:
        self.state.delay_ms = 0
        self.state.refuse = False
        self.state.paused = False
        self.state.flip_probability = 0.0
        self.state.drop_probability = 0.0

    # ------------------------------------------------------------------ forwarding

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        self.state.connections += 1
        if self.state.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_writer))
        tasks = [
            asyncio.create_task(self._pipe(reader, up_writer, "up")),
            asyncio.create_task(self._pipe(up_reader, writer, "down")),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.transport.abort()
            self._conns.discard(w)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        st = self.state
        while True:
            data = await reader.read(65536)
            if not data:
                return
            while st.paused:
                await asyncio.sleep(0.01)
            if direction == "down" and st.answers_to_cut > 0:
                st.answers_to_cut -= 1
                st.dropped_connections += 1
                writer.transport.abort()
                return
            if st.delay_ms:
                await asyncio.sleep(st.delay_ms / 1000)
            if st.flips_pending.get(direction, 0) > 0 or (
                st.flip_probability and self._rng.random() < st.flip_probability
            ):
                if st.flips_pending.get(direction, 0) > 0:
                    st.flips_pending[direction] -= 1
                buf = bytearray(data)
                bit = self._rng.randrange(len(buf) * 8)
                buf[bit // 8] ^= 1 << (bit % 8)
                data = bytes(buf)
                st.flipped += 1
            if direction == "up":
                st.bytes_up += len(data)
            else:
                st.bytes_down += len(data)
            writer.write(data)
            await writer.drain()
