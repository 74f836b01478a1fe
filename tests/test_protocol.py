"""Replication protocol v1: framing, limits, checksums, messages, handshake and WAL batches."""

from __future__ import annotations

import itertools
import os
import struct
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walship.errors import (
    AuthenticationError,
    InvalidInput,
    InvariantViolation,
    LimitExceeded,
    ProtocolError,
    VersionConflict,
)
from walship.limits import DEFAULT_LIMITS
from walship.position import Lsn, Position, Term
from walship.replication.acks import AckMode
from walship.replication.applier import BatchApplier
from walship.replication.config import AckSettings, ReplicationConfig
from walship.replication.protocol import (
    FRAME_HEADER_BYTES,
    MESSAGE_TYPES,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    REDIRECT_ANY,
    SECRET_ENV,
    Ack,
    CaughtUp,
    Challenge,
    Diverged,
    FrameDecoder,
    Heartbeat,
    Hello,
    HelloProof,
    InSyncSet,
    InSyncStored,
    LeaderDurable,
    Message,
    PartChunk,
    PartEnd,
    PartStart,
    PartsWelcome,
    Refused,
    SnapshotChunk,
    SnapshotConfirmed,
    SnapshotEnd,
    SnapshotFile,
    SnapshotRedirect,
    SnapshotResume,
    SnapshotStart,
    Subscribe,
    WalBatch,
    Welcome,
    batch_records,
    client_proof,
    encode,
    encode_parts,
    hello_error,
    load_secret,
    make_hello_proof,
    make_nonce,
    make_welcome,
    server_proof,
    stale_term_error,
    verify_hello_proof,
    verify_welcome,
)
from walship.wal.frame import VerifiedFrame
from walship.wal.record import GENESIS_CHAIN, HEADER_BYTES, crc32c, encode_record

U64_MAX = (1 << 64) - 1
SECRET = b"correct horse battery staple"
# WALSHIP_FUZZ_EXAMPLES=20000 runs the property tests much longer (a nightly fuzz).
FAST = settings(
    max_examples=int(os.environ.get("WALSHIP_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def make_records(
    count: int, *, first_lsn: int = 1, term: int = 1, body_bytes: int = 40
) -> tuple[list[bytes], list[bytes]]:
    """``count`` consecutive raw records after GENESIS_CHAIN; returns (records, chains)."""
    records, chains, chain = [], [], GENESIS_CHAIN
    for i in range(count):
        raw, chain = encode_record(first_lsn + i, term, chain, bytes([i % 251]) * body_bytes)
        records.append(raw)
        chains.append(chain)
    return records, chains


RECORDS, CHAINS = make_records(3)
SAMPLES: list[Message] = [
    Hello(PROTOCOL_VERSION, "cluster-a", "node-2", "follower", bytes(range(32))),
    Challenge(b"\xff" * NONCE_BYTES),
    HelloProof(b"p" * 32),
    Welcome("node-1", 7, 1_000, b"w" * 32),
    Refused("authentication_failed", "wrong secret"),
    Subscribe(term=6, lsn=999, chain=b"c" * 8),
    Diverged(common_term=5, common_lsn=900, reason="tail written in term 6 was never committed"),
    SnapshotStart(
        snapshot_id="snap-0001",
        last_lsn=500,
        last_term=5,
        chain=b"s" * 8,
        files=[
            SnapshotFile("0000000000000001-00000000000001f4.parquet", 1234, b"h" * 32),
            SnapshotFile("manifest.json", 66, b"m" * 32),
        ],
        total_bytes=1300,
    ),
    SnapshotChunk(file_index=1, offset=4096, data=bytes(range(256)) * 4),
    SnapshotEnd("snap-0001"),
    CaughtUp(term=7, leader_lsn=1_000),
    WalBatch(
        term=1,
        prev_lsn=0,
        prev_term=0,
        prev_chain=GENESIS_CHAIN,
        first_lsn=1,
        last_lsn=3,
        leader_lsn=3,
        leader_write_ts_us=1_700_000_000_000_000,
        records=b"".join(RECORDS),
    ),
    Ack(durable_lsn=3, applied_lsn=2),
    Heartbeat(term=U64_MAX, last_lsn=U64_MAX, ts_us=0),
    SnapshotResume(snapshot_id="0000000000000010-abcdef", file_index=2, offset=4096),
    InSyncSet(term=2, version=7, lsn=4096, members=["f1", "f2"], ack_mode="semi-sync"),
    InSyncStored(term=2, version=7),
    SnapshotRedirect(term=7, sources=["127.0.0.2:3911", "[::1]:3912"], min_lsn=4_000),
    SnapshotConfirmed(
        term=7, lsn=4_500, last_term=6, chain=b"k" * 8, term_history=[(1, 1), (6, 4_001)]
    ),
    Subscribe(
        term=6,
        lsn=4_500,
        chain=b"k" * 8,
        http_url="http://127.0.0.1:3901",
        redirect=REDIRECT_ANY,
        serve_address="127.0.0.1:3911",
        staged=True,
        snapshot_min_lsn=4_000,
    ),
    PartStart(kind="checkpoint", info=b'{"file":"p"}', last_term=2, chain=b"k" * 8),
    PartChunk(offset=262144, data=bytes(range(256)) * 3),
    PartEnd("0000000000000001-00000000000001f4.parquet"),
    PartsWelcome("node-1", 7, 1_000, b"w" * 32, "http://l", ""),
    LeaderDurable(term=7, lsn=1_000),
]
STREAM = b"".join(encode(m) for m in SAMPLES)


def frame_with(payload: bytes, code: int, *, length: int | None = None) -> bytes:
    """A frame with valid checksums around any payload (and optionally a lying length)."""
    head = struct.pack(">IB", len(payload) if length is None else length, code)
    crc = crc32c(payload, crc32c(head[4:]))
    return head + struct.pack(">II", crc32c(head), crc) + payload


# ------------------------------------------------------------------------------- strategies

u64 = st.integers(0, U64_MAX)
ident = st.text(min_size=1, max_size=128)
nonce = st.binary(min_size=32, max_size=32)
chain = st.binary(min_size=8, max_size=8)
file_name = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,40}\Z")


@st.composite
def wal_batches(draw: st.DrawFn) -> WalBatch:
    prev_lsn = draw(st.integers(0, U64_MAX - 100))
    last = prev_lsn + draw(st.integers(1, 50))
    term = draw(u64)
    return WalBatch(
        term=term,
        prev_lsn=prev_lsn,
        prev_term=draw(st.integers(0, term)),
        prev_chain=draw(chain),
        first_lsn=prev_lsn + 1,
        last_lsn=last,
        leader_lsn=draw(st.integers(last, U64_MAX)),
        leader_write_ts_us=draw(u64),
        records=draw(st.binary(min_size=32, max_size=2000)),
    )


@st.composite
def snapshot_starts(draw: st.DrawFn) -> SnapshotStart:
    names = draw(st.lists(file_name, max_size=5, unique=True))
    files = [SnapshotFile(n, draw(st.integers(0, 2**40)), draw(nonce)) for n in names]
    return SnapshotStart(
        draw(ident), draw(u64), draw(u64), draw(chain), files, sum(f.size for f in files)
    )


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello,
        st.integers(0, 2**32 - 1),
        ident,
        ident,
        st.sampled_from(["leader", "follower"]),
        nonce,
    ),
    st.builds(Challenge, nonce),
    st.builds(HelloProof, nonce),
    st.builds(Welcome, ident, u64, u64, nonce),
    st.builds(Refused, st.text(min_size=1, max_size=64), st.text(max_size=300)),
    st.builds(Subscribe, u64, u64, chain),
    st.builds(Diverged, u64, u64, st.text(max_size=300)),
    snapshot_starts(),
    st.builds(SnapshotChunk, st.integers(0, 2**32 - 1), u64, st.binary(max_size=3000)),
    st.builds(SnapshotEnd, ident),
    st.builds(CaughtUp, u64, u64),
    wal_batches(),
    st.builds(Ack, u64, u64),
    st.builds(Heartbeat, u64, u64, u64),
    st.builds(InSyncSet, u64, u64, u64, st.lists(ident, max_size=5), st.sampled_from(["sync"])),
    st.builds(InSyncStored, u64, u64),
    st.builds(
        PartStart,
        st.sampled_from(["checkpoint", "merge"]),
        st.binary(max_size=300),
        u64,
        chain,
        st.binary(max_size=300),
        st.binary(max_size=300),
    ),
    st.builds(PartChunk, u64, st.binary(max_size=3000)),
    st.builds(PartEnd, st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
    st.builds(PartsWelcome, ident, u64, u64, nonce),
)


# ---------------------------------------------------------------------------------- framing


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(msg: Message) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode(msg)) == [msg]
    assert decoder.buffered_bytes == 0
    decoder.end_of_stream()


@FAST
@given(st.lists(messages, min_size=1, max_size=5))
def test_random_messages_round_trip(msgs: list[Message]) -> None:
    assert FrameDecoder().feed(b"".join(encode(m) for m in msgs)) == msgs


def test_large_bytes_fields_travel_as_raw_bytes_not_base64() -> None:
    data = bytes(range(256)) * 1024
    frame = encode(SnapshotChunk(0, 0, data))
    assert data in frame
    assert len(frame) < len(data) + 64


def test_stream_split_at_every_byte_boundary_decodes_the_same() -> None:
    for cut in range(len(STREAM) + 1):
        decoder = FrameDecoder()
        got = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:])
        assert got == SAMPLES, f"split at byte {cut}"
        decoder.end_of_stream()


def test_stream_fed_one_byte_at_a_time_decodes_the_same() -> None:
    decoder = FrameDecoder()
    got: list[Message] = []
    for i in range(len(STREAM)):
        got += decoder.feed(STREAM[i : i + 1])
    assert got == SAMPLES


@FAST
@given(st.lists(st.integers(0, len(STREAM)), max_size=20))
def test_stream_split_anywhere_any_number_of_times_decodes_the_same(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    decoder = FrameDecoder()
    got: list[Message] = []
    for a, b in itertools.pairwise(bounds):
        got += decoder.feed(memoryview(STREAM)[a:b])
    assert got == SAMPLES


def _feed_checked(decoder: FrameDecoder, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except ProtocolError:
            return
        assert decoder.buffered_bytes <= decoder.limit_bytes


@FAST
@given(st.lists(st.binary(max_size=600), max_size=8), st.integers(FRAME_HEADER_BYTES + 1, 1024))
def test_arbitrary_bytes_give_messages_or_protocol_error(chunks: list[bytes], limit: int) -> None:
    """Garbage never crashes the decoder nor makes it hold more than one frame's worth."""
    _feed_checked(FrameDecoder(limit), chunks)


@FAST
@given(st.lists(st.binary(max_size=600), max_size=8), st.integers(FRAME_HEADER_BYTES + 1, 300))
def test_before_authentication_garbage_never_makes_the_decoder_hold_more_than_a_handshake_frame(
    chunks: list[bytes], limit: int
) -> None:
    _feed_checked(FrameDecoder(1 << 20, handshake_frame_bytes_max=limit), chunks)


@pytest.mark.parametrize("kind", [Hello, HelloProof, Refused, SnapshotChunk, WalBatch])
def test_before_authentication_a_header_claiming_megabytes_is_refused_before_its_body(
    kind: type[Message],
) -> None:
    """A peer that has not proved the secret cannot make the decoder wait for, or buffer,
    more than ``handshake_frame_bytes_max``, whatever type its frame claims to be."""
    code = next(c for c, cls in MESSAGE_TYPES.items() if cls is kind)
    header = frame_with(b"", code, length=DEFAULT_LIMITS.frame_bytes_max - FRAME_HEADER_BYTES)
    decoder = FrameDecoder(handshake_frame_bytes_max=DEFAULT_LIMITS.handshake_frame_bytes_max)
    with pytest.raises(ProtocolError, match=f"{kind.__name__} frame of 4194304 bytes before"):
        for i in range(len(header)):  # byte by byte: refused as the header completes
            decoder.feed(header[i : i + 1])
    assert decoder.buffered_bytes == 0
    # after authentication the same header is the start of a frame the stream waits for
    decoder = FrameDecoder(handshake_frame_bytes_max=DEFAULT_LIMITS.handshake_frame_bytes_max)
    decoder.authenticated()
    assert decoder.feed(header) == []
    assert decoder.buffered_bytes == FRAME_HEADER_BYTES


def test_the_handshake_frame_limit_is_lifted_once_the_peer_authenticated() -> None:
    chunk = SnapshotChunk(0, 0, b"x" * 100_000)
    handshake = [Hello(PROTOCOL_VERSION, "c", "n", "follower", make_nonce()), HelloProof(b"p" * 32)]
    decoder = FrameDecoder(handshake_frame_bytes_max=4096)
    assert decoder.feed(b"".join(encode(m) for m in handshake)) == handshake
    decoder.authenticated()
    assert decoder.feed(encode(chunk)) == [chunk]
    with pytest.raises(InvalidInput, match="handshake_frame_bytes_max"):
        FrameDecoder(1024, handshake_frame_bytes_max=2048)


def test_every_handshake_message_at_its_largest_fits_the_handshake_frame_limit() -> None:
    """Identifiers and URLs of 4-byte characters, at their longest: what a real peer sends
    before it is authenticated always fits, with room to spare."""
    wide = "\U0001f600"
    ident = wide * 128
    largest: list[Message] = [
        Hello(2**32 - 1, ident, ident, "follower", make_nonce()),
        Challenge(make_nonce()),
        HelloProof(b"p" * 32),
        Welcome(ident, 2**64 - 1, 2**64 - 1, b"p" * 32, wide * 512),
        Refused(wide * 64, wide * 500),  # MessageStream.refuse cuts messages at 500 chars
    ]
    limit = DEFAULT_LIMITS.handshake_frame_bytes_max
    for msg in largest:
        frame = encode(msg)
        assert len(frame) <= limit * 3 // 4, (type(msg).__name__, len(frame))
        decoder = FrameDecoder(handshake_frame_bytes_max=limit)
        assert decoder.feed(frame) == [msg]


@FAST
@given(st.binary(max_size=400), st.integers(0, 20), st.binary(max_size=50), st.integers(1, 400))
def test_well_framed_garbage_payloads_give_messages_or_protocol_error(
    payload: bytes, code: int, tail: bytes, split: int
) -> None:
    """Frames with valid checksums around random payloads exercise the payload decoder."""
    stream = STREAM[:200] + frame_with(payload, code) + tail
    _feed_checked(FrameDecoder(512), [stream[:split], stream[split:]])


def test_oversized_length_is_rejected_before_the_body_is_buffered() -> None:
    decoder = FrameDecoder(1024)
    header = frame_with(b"", 14, length=2**32 - 1)  # claims 4 GiB, checksums valid
    with pytest.raises(ProtocolError, match="exceeds frame_bytes_max 1024"):
        decoder.feed(header)
    assert decoder.buffered_bytes == 0


def test_frame_exactly_at_the_limit_passes_and_one_byte_more_fails() -> None:
    frame = encode(SnapshotChunk(0, 0, b"x" * 1000))
    assert FrameDecoder(len(frame)).feed(frame) == [SnapshotChunk(0, 0, b"x" * 1000)]
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder(len(frame) - 1).feed(frame[:FRAME_HEADER_BYTES])
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(SnapshotChunk(0, 0, b"x" * 1000), frame_bytes_max=len(frame) - 1)


_BULK_SIZES = st.sampled_from([0, 1, 255, 256, 65_535, 65_536, 70_001]) | st.integers(0, 3000)


@settings(max_examples=60, deadline=None)
@given(
    size=_BULK_SIZES,
    lsn=st.integers(0, 2**64 - 2),
    ts=st.integers(0, 2**64 - 1),
    index=st.integers(0, 2**32 - 1),
)
def test_frames_in_parts_are_the_same_bytes_with_the_bulk_not_copied(
    size: int, lsn: int, ts: int, index: int
) -> None:
    """``send`` writes a WalBatch or SnapshotChunk as parts whose last is the caller's own
    bytes; joined, they are exactly ``encode``'s frame, whatever the bin header's width."""
    records = bytes(range(256)) * (max(size, HEADER_BYTES) // 256) + b"r" * (
        max(size, HEADER_BYTES) % 256
    )
    batch = WalBatch(7, lsn, 3, b"c" * 8, lsn + 1, lsn + 1, lsn + 1, ts, records)
    chunk = SnapshotChunk(index, lsn, records[:size])
    for msg, bulk in ((batch, records), (chunk, chunk.data)):
        parts = encode_parts(msg, 1 << 20)
        assert b"".join(parts) == encode(msg, 1 << 20)
        assert parts[-1] is bulk
        assert FrameDecoder(1 << 20).feed(b"".join(parts)) == [msg]


def test_frames_in_parts_keep_the_size_limit_and_other_messages_whole() -> None:
    for msg in SAMPLES:
        parts = encode_parts(msg)
        assert b"".join(parts) == encode(msg)
        assert len(parts) == (2 if isinstance(msg, WalBatch | SnapshotChunk | PartChunk) else 1)
    chunk = SnapshotChunk(0, 0, b"x" * 1000)
    size = len(encode(chunk))
    assert b"".join(encode_parts(chunk, frame_bytes_max=size)) == encode(chunk)
    with pytest.raises(ProtocolError, match="exceeds") as info:
        encode_parts(chunk, frame_bytes_max=size - 1)
    assert info.value.details["frame_bytes"] == size


def test_unknown_message_type_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="unknown message type 99"):
        FrameDecoder().feed(frame_with(b"\x90", 99))


def test_undecodable_payload_is_rejected_with_the_message_name() -> None:
    with pytest.raises(ProtocolError, match="undecodable Ack payload"):
        FrameDecoder().feed(frame_with(b"\x92\xa1x\x01", 13))  # ["x", 1]: a str for an lsn


def test_negative_position_is_rejected() -> None:
    import msgspec

    with pytest.raises(ProtocolError, match="undecodable Ack"):
        FrameDecoder().feed(frame_with(msgspec.msgpack.encode([-1, 0]), 13))


def test_snapshot_file_name_that_is_a_path_is_rejected() -> None:
    for name in ("../etc/passwd", "/etc/passwd", "a/b", ".hidden", "..", "", "a\x00b"):
        start = SnapshotStart("s", 1, 1, b"c" * 8, [SnapshotFile(name, 1, b"h" * 32)], 1)
        with pytest.raises(ProtocolError, match="undecodable SnapshotStart"):
            FrameDecoder().feed(encode(start))


def test_inconsistent_messages_cannot_be_built_nor_decoded() -> None:
    with pytest.raises(ProtocolError, match="does not follow"):
        WalBatch(1, 5, 1, GENESIS_CHAIN, 7, 7, 7, 0, b"".join(RECORDS))
    with pytest.raises(ProtocolError, match="total_bytes"):
        SnapshotStart("s", 1, 1, b"c" * 8, [SnapshotFile("a", 1, b"h" * 32)], 2)
    import msgspec

    lying = msgspec.msgpack.encode([1, 5, 1, GENESIS_CHAIN, 7, 7, 7, 0, b"".join(RECORDS)])
    with pytest.raises(ProtocolError, match="does not follow"):
        FrameDecoder().feed(frame_with(lying, 12))


@FAST
@given(messages, st.data())
def test_single_bit_flip_anywhere_in_a_frame_is_detected(msg: Message, data: st.DataObject) -> None:
    frame = bytearray(encode(msg))
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(bytes(frame))


def test_every_single_bit_flip_of_a_heartbeat_frame_is_detected() -> None:
    frame = encode(Heartbeat(3, 42, 1_700_000_000_000_000))
    for bit in range(len(frame) * 8):
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProtocolError):
            FrameDecoder().feed(bytes(flipped))


def test_decoder_stays_failed_after_a_protocol_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(encode(SAMPLES[0]))


def test_stream_ending_inside_a_frame_is_a_protocol_error() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(STREAM[:-1]) == SAMPLES[:-1]
    with pytest.raises(ProtocolError, match="ended inside a frame"):
        decoder.end_of_stream()


def test_repr_of_bulky_messages_does_not_dump_their_bytes() -> None:
    assert f"records=<{len(b''.join(RECORDS))} bytes>" in repr(SAMPLES[11])
    assert len(repr(SnapshotChunk(0, 0, b"x" * 100_000))) < 100


# ------------------------------------------------------------------------ handshake, fencing


def test_positions_read_as_value_types() -> None:
    pos = Position(Term(6), Lsn(999))
    subscribe, batch = SAMPLES[5], SAMPLES[11]
    assert isinstance(subscribe, Subscribe) and isinstance(batch, WalBatch)
    assert Subscribe.at(pos, b"c" * 8) == subscribe
    assert subscribe.position == pos
    assert batch.prev_position == Position.start()


def test_hello_with_another_protocol_version_is_refusable() -> None:
    ok = Hello(PROTOCOL_VERSION, "cluster-a", "n2", "follower", make_nonce())
    assert hello_error(ok, "cluster-a") is None
    error = hello_error(Hello(5, "cluster-a", "n2", "follower", make_nonce()), "cluster-a")
    assert isinstance(error, ProtocolError)
    assert "version 5 is not supported" in error.message
    refused = Refused.from_error(error)
    assert isinstance(refused.to_error(), ProtocolError)
    assert isinstance(hello_error(ok, "cluster-b"), ProtocolError)


def test_refused_maps_back_to_the_error_class() -> None:
    err = Refused.from_error(AuthenticationError("no")).to_error()
    assert isinstance(err, AuthenticationError) and not err.retriable
    assert isinstance(Refused("version_conflict", "x").to_error(), VersionConflict)


def test_frames_from_a_lower_term_are_fenced() -> None:
    assert stale_term_error(Heartbeat(5, 1, 0), known_term=5) is None
    assert isinstance(stale_term_error(Heartbeat(4, 1, 0), known_term=5), ProtocolError)
    assert isinstance(stale_term_error(SAMPLES[11], known_term=2), ProtocolError)
    assert stale_term_error(Ack(1, 1), known_term=9) is None


def test_mutual_proofs_verify_with_the_right_secret() -> None:
    hello = Hello(PROTOCOL_VERSION, "cluster-a", "n2", "follower", make_nonce())
    challenge = Challenge(make_nonce())
    verify_hello_proof(SECRET, hello, challenge, make_hello_proof(SECRET, hello, challenge))
    welcome = make_welcome(
        SECRET, hello, challenge, leader_node_id="n1", term=3, leader_last_lsn=10
    )
    verify_welcome(SECRET, hello, challenge, welcome)


def test_proofs_fail_with_a_wrong_secret() -> None:
    hello = Hello(PROTOCOL_VERSION, "cluster-a", "n2", "follower", make_nonce())
    challenge = Challenge(make_nonce())
    with pytest.raises(AuthenticationError, match="follower 'n2'"):
        verify_hello_proof(SECRET, hello, challenge, make_hello_proof(b"guess", hello, challenge))
    welcome = make_welcome(
        b"guess", hello, challenge, leader_node_id="n1", term=3, leader_last_lsn=0
    )
    with pytest.raises(AuthenticationError, match="leader 'n1'"):
        verify_welcome(SECRET, hello, challenge, welcome)


def test_proofs_are_bound_to_their_nonces_role_and_fields() -> None:
    hello = Hello(PROTOCOL_VERSION, "cluster-a", "n2", "follower", make_nonce())
    challenge = Challenge(make_nonce())
    proof = make_hello_proof(SECRET, hello, challenge)
    with pytest.raises(AuthenticationError):  # replay against a fresh challenge
        verify_hello_proof(SECRET, hello, Challenge(make_nonce()), proof)
    welcome = make_welcome(SECRET, hello, challenge, leader_node_id="n1", term=3, leader_last_lsn=0)
    with pytest.raises(AuthenticationError):  # a leader's proof does not vouch for another term
        verify_welcome(SECRET, hello, challenge, Welcome("n1", 4, 0, welcome.leader_proof))
    args = (hello.client_nonce, challenge.server_nonce, "cluster-a", "n2")
    assert client_proof(SECRET, *args) != server_proof(SECRET, *args, "n2", 0)
    with pytest.raises(AuthenticationError):  # reflecting the follower's proof back
        verify_welcome(SECRET, hello, challenge, Welcome("n1", 3, 0, proof.proof))
    url = "http://10.0.0.1:3900"
    welcome = make_welcome(
        SECRET, hello, challenge, leader_node_id="n1", term=3, leader_last_lsn=0, leader_url=url
    )
    verify_welcome(SECRET, hello, challenge, welcome)
    assert FrameDecoder().feed(encode(welcome)) == [welcome]
    with pytest.raises(AuthenticationError):  # a man in the middle sending writes elsewhere
        verify_welcome(SECRET, hello, challenge, Welcome("n1", 3, 0, welcome.leader_proof, "x"))
    settings = AckSettings.of(ReplicationConfig(ack_mode=AckMode.parse("semi-sync"))).encode()
    welcome = make_welcome(
        SECRET,
        hello,
        challenge,
        leader_node_id="n1",
        term=3,
        leader_last_lsn=0,
        leader_url=url,
        ack_settings=settings,
    )
    verify_welcome(SECRET, hello, challenge, welcome)
    assert FrameDecoder().feed(encode(welcome)) == [welcome]
    assert AckSettings.decode(welcome.ack_settings).ack_mode == "semi-sync"
    weakened = AckSettings.of(ReplicationConfig()).encode()  # async
    with pytest.raises(AuthenticationError):  # a man in the middle weakening the guarantee
        verify_welcome(
            SECRET, hello, challenge, Welcome("n1", 3, 0, welcome.leader_proof, url, weakened)
        )


def test_subscribe_carries_the_followers_advertised_url() -> None:
    sub = Subscribe.at(Position(Term(2), Lsn(9)), b"c" * 8, "http://127.0.0.3:3901")
    assert FrameDecoder().feed(encode(sub)) == [sub]
    assert sub.http_url == "http://127.0.0.3:3901"
    assert Subscribe(term=2, lsn=9, chain=b"c" * 8).http_url == ""  # a follower that did not say


def test_ack_settings_refuse_what_a_leader_could_not_run_with() -> None:
    for bad in ('{"ack_mode": "most"}', '{"on_ack_timeout": "shrug"}', "[", '{"x": 1}'):
        with pytest.raises(InvalidInput):
            AckSettings.decode(bad)


def test_nonces_are_fresh_and_an_empty_secret_is_refused() -> None:
    assert len(make_nonce()) == NONCE_BYTES
    assert make_nonce() != make_nonce()
    with pytest.raises(AuthenticationError):
        client_proof(b"", b"a", b"b", "c", "d")


def test_load_secret_reads_a_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"s3cret\n")
    assert load_secret(path, environ={SECRET_ENV: "other"}) == b"s3cret"
    assert load_secret(environ={SECRET_ENV: " from-env "}) == b"from-env"
    path.write_bytes(b"\n")
    with pytest.raises(InvalidInput, match="empty"):
        load_secret(path)
    with pytest.raises(InvalidInput, match="empty"):
        load_secret(environ={SECRET_ENV: ""})
    with pytest.raises(InvalidInput, match=SECRET_ENV):
        load_secret(environ={})
    with pytest.raises(InvalidInput, match="cannot read"):
        load_secret(tmp_path / "missing")


# ------------------------------------------------------------------------------ WAL batches


@FAST
@given(
    st.lists(st.integers(0, 700), min_size=0, max_size=40),
    st.integers(900, 4000),
    st.booleans(),
)
def test_batch_records_fits_every_frame_and_keeps_every_record_in_order(
    body_sizes: list[int], frame_bytes_max: int, huge_numbers: bool
) -> None:
    """With the widest u64 fields too, so the overhead bound is tested at its worst."""
    first = U64_MAX - 100 if huge_numbers else 1
    records, chain = [], GENESIS_CHAIN
    for i, size in enumerate(body_sizes):
        raw, chain = encode_record(first + i, 7, chain, b"e" * size)
        records.append(raw)
    top = U64_MAX if huge_numbers else 10**6
    batches = batch_records(
        records,
        frame_bytes_max,
        term=top,
        prev_lsn=first - 1,
        prev_term=7,
        prev_chain=GENESIS_CHAIN,
        leader_lsn=top,
        leader_write_ts_us=top,
    )
    decoder = FrameDecoder(frame_bytes_max)
    shipped = []
    prev = (first - 1, GENESIS_CHAIN)
    for batch in batches:
        frame = encode(batch, frame_bytes_max)
        assert len(frame) <= frame_bytes_max
        [got] = decoder.feed(frame)
        assert isinstance(got, WalBatch)
        assert (got.prev_lsn, got.prev_chain) == prev
        frame = _take(got)
        starts = frame.starts
        shipped += [bytes(frame.data[a:b]) for a, b in itertools.pairwise(starts)]
        lsn, _, chain = frame.tail()
        prev = (lsn, chain)
    assert shipped == records


def test_batch_records_refuses_a_record_larger_than_a_frame() -> None:
    records, _ = make_records(1, body_bytes=2000)
    with pytest.raises(LimitExceeded, match="cannot fit"):
        batch_records(
            records,
            1024,
            term=1,
            prev_lsn=0,
            prev_term=0,
            prev_chain=GENESIS_CHAIN,
            leader_lsn=1,
            leader_write_ts_us=0,
        )


def test_batch_records_refuses_records_with_a_gap() -> None:
    records, _ = make_records(3)
    with pytest.raises(InvariantViolation, match="does not follow"):
        batch_records(
            [records[0], records[2]],
            term=1,
            prev_lsn=0,
            prev_term=0,
            prev_chain=GENESIS_CHAIN,
            leader_lsn=3,
            leader_write_ts_us=0,
        )


def _batch(records: list[bytes], /, **changes: object) -> WalBatch:
    fields: dict[str, object] = {
        "term": 1,
        "prev_lsn": 0,
        "prev_term": 0,
        "prev_chain": GENESIS_CHAIN,
        "first_lsn": 1,
        "last_lsn": len(records),
        "leader_lsn": 10,
        "leader_write_ts_us": 0,
        "records": b"".join(records),
    }
    fields.update(changes)
    return WalBatch(**fields)  # type: ignore[arg-type]


def _take(
    batch: WalBatch, record_bytes_max: int = DEFAULT_LIMITS.record_bytes_max
) -> VerifiedFrame:
    """The batch's records as a follower's applier verifies them (a frame at a time)."""
    applier = BatchApplier()
    applier.record_bytes_max = record_bytes_max
    frame = applier.take(batch)
    assert frame is not None
    return frame


def test_a_batch_is_taken_as_verified_records() -> None:
    frame = _take(_batch(RECORDS))
    assert [lsn for lsn, _, _ in frame.entries()] == [1, 2, 3]
    assert [frame.position_after(k)[2] for k in (1, 2, 3)] == CHAINS


def test_a_batch_with_a_corrupt_record_is_refused() -> None:
    raw = bytearray(b"".join(RECORDS))
    raw[50] ^= 0x01  # inside the first record's body: the frame CRC would not see this
    with pytest.raises(ProtocolError, match="CRC mismatch"):
        _take(_batch(RECORDS, records=bytes(raw)))


def test_a_batch_with_a_gap_a_chain_break_or_short_is_refused() -> None:
    with pytest.raises(ProtocolError, match="where 2 was due"):
        _take(_batch([RECORDS[0], RECORDS[2]], last_lsn=3))
    with pytest.raises(ProtocolError, match="chain hash mismatch"):
        _take(_batch(RECORDS, prev_chain=b"x" * 8))
    with pytest.raises(ProtocolError, match="end at lsn 3"):
        _take(_batch(RECORDS, last_lsn=4))
    with pytest.raises(ProtocolError, match="more bytes"):
        _take(_batch(RECORDS, records=b"".join(RECORDS)[:-1]))
    with pytest.raises(ProtocolError, match="header needs 32 bytes"):
        _take(_batch(RECORDS, records=b"".join(RECORDS) + RECORDS[0][:20]))


def test_a_batch_with_a_record_longer_than_the_limit_is_refused() -> None:
    longer, _ = make_records(2, first_lsn=4, body_bytes=41)  # chained from GENESIS_CHAIN
    batch = _batch(longer, prev_lsn=3, prev_term=1, first_lsn=4, last_lsn=5)
    assert _take(batch, record_bytes_max=41).last_lsn == 5
    with pytest.raises(ProtocolError, match="record length 41 exceeds 40") as info:
        _take(batch, record_bytes_max=40)
    assert info.value.details["offset"] == 0


def test_a_batch_with_records_from_a_later_term_than_its_own_is_refused() -> None:
    later, _ = make_records(2, term=5)
    with pytest.raises(ProtocolError, match="term 5"):
        _take(_batch(later, term=4))


class _WelcomeV1(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Welcome as a version-1 node decodes it."""

    leader_node_id: str
    term: int
    leader_last_lsn: int
    leader_proof: bytes
    leader_url: str = ""
    ack_settings: str = ""


def test_a_welcome_without_parts_is_what_a_version_1_follower_decodes() -> None:
    """Parts are negotiated: a v1 follower is never offered them and decodes its Welcome as
    before; a Welcome offering parts would not decode there (so one is never sent to it)."""
    plain = Welcome("node-1", 7, 1_000, b"w" * 32, "http://l", '{"ack_mode":"sync"}')
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(plain), type=_WelcomeV1)
    assert (old.leader_node_id, old.ack_settings) == ("node-1", '{"ack_mode":"sync"}')
    offering = PartsWelcome(*msgspec.structs.astuple(plain))
    assert offering.offers_parts and not plain.offers_parts
    # a message type a version-1 node does not have (its last was InSyncStored, 17), sent
    # only to a follower that said version 2
    code = {cls: code for code, cls in MESSAGE_TYPES.items()}
    assert code[PartsWelcome] > code[InSyncStored] == 17
    assert FrameDecoder().feed(encode(offering)) == [offering]
    hello_v1 = Hello(PROTOCOL_VERSION, "c", "n", "follower", b"n" * NONCE_BYTES)
    challenge = Challenge(b"s" * NONCE_BYTES)
    with pytest.raises(InvariantViolation):
        make_welcome(
            b"secret",
            hello_v1,
            challenge,
            leader_node_id="l",
            term=1,
            leader_last_lsn=0,
            ships_parts=True,
        )
    # the offer is under the leader's proof: a man in the middle cannot add or strip it
    hello_v2 = msgspec.structs.replace(hello_v1, protocol_version=2)
    welcome = make_welcome(
        b"secret",
        hello_v2,
        challenge,
        leader_node_id="l",
        term=1,
        leader_last_lsn=0,
        ships_parts=True,
    )
    verify_welcome(b"secret", hello_v2, challenge, welcome)
    with pytest.raises(AuthenticationError):
        stripped = msgspec.structs.replace(welcome, ships_parts=False)
        verify_welcome(b"secret", hello_v2, challenge, stripped)
