"""What a peer that has not proved the shared secret can hold on a replication port: little.

A real leader (and follower) over TCP on 127.0.0.1, fed by hand: a Hello trickled a byte at a
time is closed at ``handshake_timeout_ms`` although no single read times out; a frame header
claiming megabytes before authentication is refused as soon as the header is in; more than
``unauthenticated_connections_max`` connections in their handshake are closed at once; and
through all of it a real follower still authenticates and streams frames far larger than the
handshake limit. Last, the field report replayed against a ``walship serve`` leader: 24
connections pushing most of a 4 MiB frame no longer grow its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
from pathlib import Path

import pytest

from tests.cluster import Cluster, health, replication_address, rss_bytes, write_events
from walship.errors import InvalidInput
from walship.limits import DEFAULT_LIMITS, Limits
from walship.replication.config import parse_address
from walship.replication.follower import FollowerState
from walship.replication.protocol import (
    FRAME_HEADER_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Challenge,
    FrameDecoder,
    Hello,
    Message,
    Refused,
    SnapshotChunk,
    WalBatch,
    encode,
    make_nonce,
)
from walship.replication.stream import MessageStream
from walship.wal.record import crc32c

from .test_replication_unit import (
    TIMEOUT_S,
    assert_identical,
    eventually,
    make_follower,
    open_store,
    run,
    start_leader,
    write,
)

# Default frames (4 MiB, as in production); reads that never time out on their own, so only
# the handshake's own bounds can close a connection in these tests.
LIMITS = dataclasses.replace(
    DEFAULT_LIMITS,
    heartbeat_interval_ms=100,
    read_timeout_ms=20_000,
    handshake_timeout_ms=1_000,
    unauthenticated_connections_max=4,
)


def header_claiming(kind: type[Message], frame_bytes: int) -> bytes:
    """A frame header with valid checksums that announces a ``frame_bytes`` frame of ``kind``."""
    code = next(c for c, cls in MESSAGE_TYPES.items() if cls is kind)
    head = struct.pack(">IB", frame_bytes - FRAME_HEADER_BYTES, code)
    return head + struct.pack(">II", crc32c(head), 0)


async def until_closed(reader: asyncio.StreamReader, timeout_s: float) -> list[Message]:
    """What the leader sends until it closes the connection; AssertionError if it does not
    close it within ``timeout_s``."""
    decoder = FrameDecoder()
    messages: list[Message] = []
    try:
        async with asyncio.timeout(timeout_s):
            while data := await reader.read(65536):
                messages.extend(decoder.feed(data))
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {timeout_s} s") from None
    except ConnectionResetError:
        pass
    return messages


def refusal(messages: list[Message]) -> Refused:
    refused = [m for m in messages if isinstance(m, Refused)]
    assert refused, f"no Refused before the close: {messages}"
    return refused[0]


def test_a_peer_trickling_its_hello_is_closed_at_the_handshake_deadline(tmp_path: Path) -> None:
    """One byte of a Hello every 200 ms: every read completes long before read_timeout_ms,
    so only a deadline on the whole handshake ends it."""
    hello = encode(Hello(PROTOCOL_VERSION, "walship", "slow-loris", "follower", make_nonce()))

    async def scenario() -> None:
        lstore = open_store(tmp_path / "leader", "leader", LIMITS)
        leader = await start_leader(lstore)
        assert leader.port is not None
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", leader.port)

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for i in range(len(hello) - 1):  # never the last byte
                    writer.write(hello[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0.2)

        trickler = asyncio.create_task(trickle())
        try:
            t0 = loop.time()
            messages = await until_closed(reader, timeout_s=8)
            assert 0.9 <= loop.time() - t0 < 8
            assert "handshake_timeout_ms 1000" in refusal(messages).message
            assert not trickler.done(), "the Hello was sent whole; the test proves nothing"
            await eventually(lambda: leader.handshakes.open == 0)
        finally:
            trickler.cancel()
            writer.close()
            await leader.stop()
            lstore.close()

    run(scenario)


def test_a_frame_header_claiming_megabytes_before_authentication_is_refused_at_once(
    tmp_path: Path,
) -> None:
    """Only the 13-byte header of a 4 MiB Hello (the frame limit) is sent: the leader refuses
    and closes without waiting for the body, and a real follower is not disturbed."""
    # a deadline far from "at once", so that a loaded machine cannot blur the two
    limits = dataclasses.replace(LIMITS, handshake_timeout_ms=20_000)

    async def scenario() -> None:
        lstore = open_store(tmp_path / "leader", "leader", limits)
        fstore = open_store(tmp_path / "f1", "f1", limits)
        leader = await start_leader(lstore)
        assert leader.port is not None
        follower = make_follower(fstore, leader.port)
        await follower.start()
        loop = asyncio.get_running_loop()
        try:
            await follower.wait_applied(await write(lstore, 50), TIMEOUT_S)
            for kind in (Hello, WalBatch, SnapshotChunk):
                reader, writer = await asyncio.open_connection("127.0.0.1", leader.port)
                writer.write(header_claiming(kind, limits.frame_bytes_max))
                await writer.drain()
                t0 = loop.time()
                messages = await until_closed(reader, timeout_s=15)
                assert loop.time() - t0 < 10  # long before the handshake deadline
                message = refusal(messages).message
                assert f"{kind.__name__} frame of 4194304 bytes before" in message
                assert "handshake_frame_bytes_max 4096" in message
                writer.close()
            await follower.wait_applied(await write(lstore, 500, start=50), TIMEOUT_S)
            assert follower.state is FollowerState.STREAMING and follower.reconnects == 0
            assert_identical(fstore, lstore)
        finally:
            await follower.stop()
            await leader.stop()
            fstore.close()
            lstore.close()

    run(scenario)


def test_connections_past_the_unauthenticated_cap_are_closed_at_once(tmp_path: Path) -> None:
    """Four idle connections fill the gate; a fifth is refused at once. Once they are gone a
    follower authenticates, leaves the gate, and streams batches far larger than the
    handshake limit while four new unauthenticated connections come and time out."""
    # the idle four must outlive the fifth's refusal however loaded the machine is
    limits = dataclasses.replace(LIMITS, handshake_timeout_ms=10_000)

    async def scenario() -> None:
        lstore = open_store(tmp_path / "leader", "leader", limits)
        fstore = open_store(tmp_path / "f1", "f1", limits)
        leader = await start_leader(lstore)
        assert leader.port is not None
        loop = asyncio.get_running_loop()
        idle: list[asyncio.StreamWriter] = []
        follower = make_follower(fstore, leader.port)
        try:
            for _ in range(4):
                idle.append((await asyncio.open_connection("127.0.0.1", leader.port))[1])
            await eventually(lambda: leader.handshakes.open == 4)
            reader, writer = await asyncio.open_connection("127.0.0.1", leader.port)
            t0 = loop.time()
            messages = await until_closed(reader, timeout_s=8)
            assert loop.time() - t0 < 5  # at once, not at the handshake deadline
            writer.close()
            refused = refusal(messages)
            assert refused.code == "limit_exceeded"
            assert "unauthenticated_connections_max 4" in refused.message
            assert leader.metrics.handshakes_refused._value.get() == 1
            assert leader.handshakes.open == 4

            for w in idle:
                w.close()
            idle.clear()
            await eventually(lambda: leader.handshakes.open == 0)
            await follower.start()
            await follower.wait_applied(await write(lstore, 10), TIMEOUT_S)
            assert leader.handshakes.open == 0  # an authenticated follower leaves the gate
            for _ in range(4):
                idle.append((await asyncio.open_connection("127.0.0.1", leader.port))[1])
            await eventually(lambda: leader.handshakes.open == 4)
            # ~100 KB batches: the follower's stream took off its handshake limit too
            last = await write(lstore, 1_000, start=10)
            await follower.wait_applied(last, TIMEOUT_S)
            assert fstore.wal.written_lsn.value == last
            # the idle ones are dropped at the deadline and give their places back
            await eventually(lambda: leader.handshakes.open == 0, timeout_s=30)
            assert follower.state is FollowerState.STREAMING and follower.reconnects == 0
            assert leader.metrics.handshakes_refused._value.get() == 1
            assert_identical(fstore, lstore)
        finally:
            for w in idle:
                w.close()
            await follower.stop()
            await leader.stop()
            fstore.close()
            lstore.close()

    run(scenario)


def test_a_follower_drops_an_unauthenticated_leader_that_claims_a_huge_frame(
    tmp_path: Path,
) -> None:
    """Whatever answers at the leader's address gets a few KiB of the follower's memory until
    it proves the secret: a Challenge header announcing 4 MiB ends the connection at once."""
    limits = dataclasses.replace(LIMITS, read_timeout_ms=20_000)
    headers_sent = 0

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal headers_sent
        stream = MessageStream(reader, writer, limits.frame_bytes_max)
        try:
            await stream.expect(Hello, 5)
            writer.write(header_claiming(Challenge, limits.frame_bytes_max))
            await writer.drain()
            headers_sent += 1
            await reader.read(1)  # until the follower closes
        finally:
            await stream.close()

    async def scenario() -> None:
        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        fstore = open_store(tmp_path / "f1", "f1", limits)
        follower = make_follower(fstore, server.sockets[0].getsockname()[1])
        try:
            await follower.start()
            await eventually(lambda: follower.last_error is not None, timeout_s=5)
            assert headers_sent >= 1
            assert "handshake_frame_bytes_max 4096" in (follower.last_error or "")
        finally:
            await follower.stop()
            server.close()
            fstore.close()

    run(scenario)


def test_the_handshake_frame_limit_cannot_exceed_the_frame_limit() -> None:
    with pytest.raises(InvalidInput, match="handshake_frame_bytes_max cannot exceed"):
        Limits(handshake_frame_bytes_max=8 * 1024 * 1024)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_unauthenticated_connections_cannot_make_a_leader_process_grow(tmp_path: Path) -> None:
    """The field report: 24 connections that each announced a 4 MiB frame and sent most of it
    added 76 MB to a leader's RSS. Now each is refused after its 13-byte header."""
    with Cluster(tmp_path) as cluster:
        leader = cluster.start_leader()
        write_events(leader, 10)
        host, port = parse_address(replication_address(leader))
        before = rss_bytes(leader)
        peers: list[socket.socket] = []
        try:
            for _ in range(24):
                peer = socket.create_connection((host, port), timeout=10)
                peers.append(peer)
                with contextlib.suppress(OSError):  # refused and closed: reset, broken pipe
                    peer.sendall(header_claiming(Hello, DEFAULT_LIMITS.frame_bytes_max))
                    peer.sendall(bytes(3 << 20))
            growth = rss_bytes(leader) - before
        finally:
            for peer in peers:
                peer.close()
        assert growth < 16 << 20, f"RSS grew by {growth / (1 << 20):.1f} MiB"
        assert health(leader)["status"] == "healthy"
