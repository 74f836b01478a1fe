"""Both sides of the handshake, and what an unauthenticated peer may hold meanwhile.

The serving side (``authenticate_follower``) is the leader's, and a follower's that serves
snapshots (``cascade.py``): the same proof of the shared secret, the same bounds. The asking
side (``authenticate_to``) is a follower's, towards its leader or a serving follower.

Anyone who can reach the replication port may open a connection; until it proves the shared
secret it holds a socket, a task and a few KiB of frame buffer (``handshake_frame_bytes_max``,
enforced by the decoder), for ``handshake_timeout_ms`` at most, and at most
``unauthenticated_connections_max`` such connections exist at once (``HandshakeGate``). A
follower that authenticated leaves the gate and is bounded by the stream's own limits.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Final

from walship.errors import AuthenticationError, LimitExceeded, ProtocolError
from walship.limits import Limits
from walship.replication.metrics import ReplicationMetrics
from walship.replication.protocol import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Challenge,
    Hello,
    HelloProof,
    Welcome,
    hello_error,
    make_hello_proof,
    make_nonce,
    verify_hello_proof,
    verify_welcome,
)
from walship.replication.stream import MessageStream

log = logging.getLogger(__name__)

PROTOCOL_VERSIONS_ENV: Final = "WALSHIP_TEST_PROTOCOL_VERSIONS"
"""Test hook: the versions this node accepts in a Hello, comma-separated (``1`` plays a
walship from before protocol v2, to test mixed versions)."""


def speaks_versions() -> tuple[int, ...]:
    """The protocol versions a Hello may say here (all of them, but for the test hook)."""
    value = os.environ.get(PROTOCOL_VERSIONS_ENV, "")
    if not value:
        return SUPPORTED_VERSIONS
    return tuple(v for v in SUPPORTED_VERSIONS if str(v) in value.split(","))


class HandshakeGate:
    """Counts the connections still in their handshake; admits none past ``capacity``.

    Used from the event loop only (no lock).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.open = 0
        self._full_logged = False

    def __repr__(self) -> str:
        return f"<HandshakeGate {self.open}/{self.capacity}>"

    def admit(self) -> HandshakeSlot | None:
        """A slot for one more unauthenticated connection; None when every slot is taken."""
        if self.open >= self.capacity:
            if not self._full_logged:  # once per flood, not once per connection
                self._full_logged = True
                log.warning(
                    "replication: %d connections are in their handshake; closing new ones "
                    "until some authenticate or time out",
                    self.open,
                )
            return None
        self.open += 1
        return HandshakeSlot(self)

    def _leave(self) -> None:
        self.open -= 1
        if self.open < self.capacity:
            self._full_logged = False


class HandshakeSlot:
    """One admitted connection's place in the gate until it authenticates or closes."""

    def __init__(self, gate: HandshakeGate) -> None:
        self._gate: HandshakeGate | None = gate

    def release(self) -> None:
        """Give the place back; later calls do nothing."""
        if self._gate is not None:
            self._gate._leave()
            self._gate = None


async def open_admitted(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    limits: Limits,
    gate: HandshakeGate,
    metrics: ReplicationMetrics,
) -> tuple[MessageStream, HandshakeSlot] | None:
    """A new connection's stream on a serving side (the leader's or a serving follower's) and
    its place in ``gate``; None when the gate is full, the connection then refused and closed
    before a byte is read: a flood of idle connections costs a socket each for
    handshake_timeout_ms at most, never a frame buffer."""
    stream = MessageStream(
        reader,
        writer,
        limits.frame_bytes_max,
        handshake_frame_bytes_max=limits.handshake_frame_bytes_max,
    )
    slot = gate.admit()
    if slot is None:
        metrics.handshakes_refused.inc()
        await stream.refuse(
            LimitExceeded.code,
            f"more than unauthenticated_connections_max "
            f"{limits.unauthenticated_connections_max} connections in their handshake",
        )
        return None
    return stream, slot


async def authenticate_follower(
    stream: MessageStream, limits: Limits, cluster_id: str, secret: bytes
) -> tuple[Hello, Challenge]:
    """Hello → Challenge → HelloProof, the whole exchange within ``handshake_timeout_ms``.

    The deadline covers the exchange, not each read: a peer that trickles a byte of its Hello
    every second never lets a read time out and would hold its socket for ever. On success
    the stream takes frames up to ``frame_bytes_max``. ProtocolError for a wrong version or
    cluster or when the deadline passes, AuthenticationError for a wrong proof.
    """
    read_timeout_s = limits.read_timeout_ms / 1000
    try:
        async with asyncio.timeout(limits.handshake_timeout_ms / 1000):
            hello = await stream.expect(Hello, read_timeout_s)
            error = hello_error(hello, cluster_id, speaks_versions())
            if error is not None:
                raise error
            challenge = Challenge(make_nonce())
            await stream.send(challenge)
            proof = await stream.expect(HelloProof, read_timeout_s)
    except TimeoutError as exc:
        raise ProtocolError(
            f"handshake not finished within handshake_timeout_ms {limits.handshake_timeout_ms}"
        ) from exc
    verify_hello_proof(secret, hello, challenge, proof)
    stream.authenticated()
    return hello, challenge


async def authenticate_to(
    stream: MessageStream,
    secret: bytes,
    cluster_id: str,
    node_id: str,
    timeout_s: float,
    *,
    version: int = PROTOCOL_VERSION,
) -> Welcome:
    """Hello → Challenge → HelloProof → Welcome, as a follower: both sides prove the shared
    secret. AuthenticationError (after refusing the peer) when the Welcome's proof is wrong;
    on success the stream takes frames up to ``frame_bytes_max``. ``version`` 2
    (``PROTOCOL_VERSION_PARTS``) asks for the leader's Parquet parts (a ``PartsWelcome``)."""
    hello = Hello(version, cluster_id, node_id, "follower", make_nonce())
    await stream.send(hello)
    challenge = await stream.expect(Challenge, timeout_s)
    await stream.send(make_hello_proof(secret, hello, challenge))
    welcome = await stream.expect(Welcome, timeout_s)
    try:
        verify_welcome(secret, hello, challenge, welcome)
    except AuthenticationError as exc:
        await stream.refuse(exc.code, exc.message)
        raise
    stream.authenticated()
    return welcome
