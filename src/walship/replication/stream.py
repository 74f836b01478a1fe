"""The thin asyncio layer under both ends of a replication link: read, feed, write, drain.

``MessageStream`` wraps a reader/writer pair with the sans-I/O ``FrameDecoder`` and gives
``recv(timeout)`` (read deadline) and ``send`` (always drained, so a slow peer pushes back).
A stream opened with ``handshake_frame_bytes_max`` holds the peer to small frames until
``authenticated()``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar

from walship.errors import ProtocolError, WaitTimeout
from walship.replication.protocol import FrameDecoder, Message, Refused, encode_parts

M = TypeVar("M")

READ_CHUNK_BYTES = 256 * 1024


class PeerRefused(ProtocolError):
    """The peer answered ``Refused``; ``refused`` holds its code."""

    code = "refused"


class MessageStream:
    """One replication connection's framing; not shared between tasks for sending."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frame_bytes_max: int,
        *,
        handshake_frame_bytes_max: int | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.frame_bytes_max = frame_bytes_max
        self._decoder = FrameDecoder(
            frame_bytes_max, handshake_frame_bytes_max=handshake_frame_bytes_max
        )
        self._inbox: list[Message] = []
        self.bytes_in = 0
        self.bytes_out = 0
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    async def recv(self, timeout_s: float) -> Message:
        """The next message; WaitTimeout when none arrives in time, ProtocolError on bad bytes
        or a closed connection."""
        while not self._inbox:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that lands as the read completes, and a loop around recv then never stops
                async with asyncio.timeout(timeout_s):
                    data = await self.reader.read(READ_CHUNK_BYTES)
            except TimeoutError as exc:
                raise WaitTimeout(
                    f"no message from {self.peer} within {int(timeout_s * 1000)} ms"
                ) from exc
            if not data:
                self._decoder.end_of_stream()
                raise ProtocolError(f"{self.peer} closed the connection")
            self.bytes_in += len(data)
            self._inbox.extend(self._decoder.feed(data))
        return self._inbox.pop(0)

    def authenticated(self) -> None:
        """The peer proved the shared secret: lift the handshake's frame limit."""
        self._decoder.authenticated()

    async def expect(self, kind: type[M], timeout_s: float) -> M:
        """The next message, which must be a ``kind`` (a Refused raises PeerRefused)."""
        msg = await self.recv(timeout_s)
        if isinstance(msg, kind):
            return msg
        if isinstance(msg, Refused):
            raise PeerRefused(f"{self.peer} refused: {msg.message}", refused=msg.code)
        raise ProtocolError(f"expected {kind.__name__} from {self.peer}, got {type(msg).__name__}")

    async def send(self, msg: Message) -> None:
        """Write one frame and drain; ConnectionResetError once the connection is closed."""
        parts = encode_parts(msg, self.frame_bytes_max)
        if self.writer.is_closing():
            raise ConnectionResetError(f"the connection to {self.peer} is closed")
        try:
            self.writer.writelines(parts)
        except RuntimeError as exc:  # uvloop: "the handler is closed"
            raise ConnectionResetError(f"the connection to {self.peer} is closed") from exc
        self.bytes_out += sum(map(len, parts))
        await self.writer.drain()

    async def refuse(self, code: str, message: str) -> None:
        """Send ``Refused`` (best effort) and close."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.send(Refused(code=code, message=message[:500]))
        await self.close()

    async def close(self) -> None:
        """Close the connection (best effort, at most 1 s); never raises except to propagate
        a cancellation of the calling task."""
        try:
            self.writer.close()
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        except asyncio.CancelledError:
            # uvloop cancels the close waiter of a connection that was reset; only a
            # cancellation of this task itself must propagate
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:
            pass
