"""Replication protocol v1, sans I/O: bytes in, messages out; messages in, bytes out.

This module owns the wire format between a leader and its followers (framing, the frame-size
limit, checksums, the message types and the shared-secret handshake) and never touches a
socket. The asyncio layer reads, ``FrameDecoder.feed``s, acts on the messages and writes
``encode(msg)``; keeping that split is what makes fuzzing and fault simulation cheap.

A frame, in network byte order::

    offset  size  field
    0       4     length    u32: payload bytes; the whole frame is 13 + length bytes
    4       1     type      message type (``MESSAGE_TYPES``)
    5       4     head_crc  CRC-32C of bytes 0..5: a corrupt length is caught before any of
                            the body is awaited or buffered
    9       4     crc       CRC-32C of type and payload
    13      n     payload   msgpack array of the message's fields, in declaration order

No frame exceeds ``Limits.frame_bytes_max`` (13 + n bytes in all), and until the peer has
proved the shared secret none exceeds ``Limits.handshake_frame_bytes_max`` (a few KiB: the
largest handshake message is under 3 KiB), so an unauthenticated peer can make a node buffer
no more than that. ``WalBatch.records`` and
``SnapshotChunk.data`` are msgpack ``bin``: raw WAL records and file bytes travel as they are
on disk, never re-encoded or base64'd.

Message flow (F = follower, L = leader)::

    F ── Hello(version, cluster_id, node_id, role, client_nonce) ──▶ L
    F ◀── Challenge(server_nonce) ───────────────────────────────── L
    F ── HelloProof(HMAC "follower proof") ────────────────────────▶ L
    F ◀── Welcome(leader_node_id, term, last_lsn, HMAC "leader proof", url, ack settings) L
    F ── Subscribe(term, lsn, chain, http_url) ────────────────────▶ L
    then one of
    F ◀── Diverged(common_term, common_lsn)          F truncates, lost-and-found, resubscribes
    F ◀── SnapshotStart, SnapshotChunk…, SnapshotEnd  F installs S, then WAL from S+1
    F ◀── WalBatch… CaughtUp WalBatch…                catch-up from disk, then live tail
    F ◀── SnapshotRedirect(sources, min_lsn)          F fetches the snapshot from a serving
                                                      follower (same handshake, Subscribe,
                                                      SnapshotStart…End), then subscribes here
                                                      with ``staged``; L vouches with
    F ◀── SnapshotConfirmed(lsn, term, chain, terms)  and WAL follows from lsn + 1
    all along
    F ── Ack(durable_lsn, applied_lsn) ──▶ L          F ◀── Heartbeat(term, …) ──▶ L
    F ◀── InSyncSet(term, version, lsn, members)      when the in-sync set changes
    F ── InSyncStored(term, version) ──▶ L            once it is durably stored

Either side may answer with ``Refused(code, message)`` and close. A frame whose sender term is
lower than the receiver's known term is refused (fencing, see ``stale_term_error``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeAlias, cast, get_args

import msgspec

from walship.errors import (
    AuthenticationError,
    InvalidInput,
    LimitExceeded,
    ProtocolError,
    StaleTerm,
    WalshipError,
    error_class_for,
    invariant,
)
from walship.limits import DEFAULT_LIMITS
from walship.position import Lsn, Position, Term
from walship.wal.record import (
    CHAIN_BYTES,
    HEADER,
    HEADER_BYTES,
    crc32c,
)

PROTOCOL_VERSION: Final = 1
# A follower that takes the leader's Parquet parts (``PartStart``/``PartChunk``/``PartEnd``)
# says version 2 in its Hello; a leader that does not know it refuses the Hello cleanly, and a
# version-1 follower is never sent a part.
PROTOCOL_VERSION_PARTS: Final = 2
# A follower that bounds what it shows by the leader's durable lsn (``LeaderDurable``) says
# version 3 (4: and takes the leader's parts, as 2). Only such a follower is shipped records
# before the leader's own fsync and sent LeaderDurable; a follower of version 1 or 2 gets
# only what the leader made durable, as before, and a follower talking to a leader that
# refuses 3 and 4 steps back to 2 or 1 (everything such a leader ships is durable there).
PROTOCOL_VERSION_DURABLE: Final = 3
PROTOCOL_VERSION_DURABLE_PARTS: Final = 4
SUPPORTED_VERSIONS: Final = (
    PROTOCOL_VERSION,
    PROTOCOL_VERSION_PARTS,
    PROTOCOL_VERSION_DURABLE,
    PROTOCOL_VERSION_DURABLE_PARTS,
)


def takes_parts(version: int) -> bool:
    """A Hello of ``version`` asks for the leader's Parquet parts."""
    return version in (PROTOCOL_VERSION_PARTS, PROTOCOL_VERSION_DURABLE_PARTS)


def takes_leader_durable(version: int) -> bool:
    """A Hello of ``version`` bounds its reads by ``LeaderDurable`` (so may be shipped early)."""
    return version >= PROTOCOL_VERSION_DURABLE


def older_version(version: int) -> int:
    """The version a follower says to a leader that refused ``version``: the same without
    LeaderDurable (4 → 2, 3 → 1), or without parts (2 → 1)."""
    return {
        PROTOCOL_VERSION_DURABLE_PARTS: PROTOCOL_VERSION_PARTS,
        PROTOCOL_VERSION_DURABLE: PROTOCOL_VERSION,
    }.get(version, PROTOCOL_VERSION)


def hello_version(wanted: int, speaks: tuple[int, ...]) -> int:
    """``wanted``, or the first older one this node ``speaks`` (a test hook plays a walship
    from before some version)."""
    version = wanted
    while version not in speaks and version != PROTOCOL_VERSION:
        version = older_version(version)
    return version


SECRET_ENV: Final = "WALSHIP_REPLICATION_SECRET"  # noqa: S105 (a variable name)
NONCE_BYTES: Final = 32
PROOF_BYTES: Final = hashlib.sha256().digest_size

FRAME_HEADER = struct.Struct(">IBII")
FRAME_HEADER_BYTES: Final = FRAME_HEADER.size  # 13

# Wire-format bounds (part of v1 itself, not tuning knobs, hence not in limits.py). They are
# checked when a frame is decoded; everything else is bounded by frame_bytes_max.
U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints end at 2**64 - 1 anyway
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
Chain = Annotated[bytes, msgspec.Meta(min_length=CHAIN_BYTES, max_length=CHAIN_BYTES)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)]
Digest = Annotated[bytes, msgspec.Meta(min_length=PROOF_BYTES, max_length=PROOF_BYTES)]
Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
URL_BYTES_MAX: Final = 512
SETTINGS_BYTES_MAX: Final = 512
# A bare file name: no separators, no leading dot (so never "." or ".."), no NUL. Names from
# the wire are still never joined to a path unchecked (DESIGN 8.10).
FileName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")]
Role = Literal["leader", "follower"]
IN_SYNC_MEMBERS_MAX: Final = 255  # followers named in one in-sync set
AckModeName = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]


def _require(condition: bool, message: str) -> None:
    # ProtocolError (not ValueError) so msgspec lets it through decode unchanged.
    if not condition:
        raise ProtocolError(message)


class _Wire(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Base of every wire struct: immutable, encoded as a msgpack array."""


class Hello(_Wire, frozen=True):
    """F→L: who is asking, and a fresh nonce the leader must prove itself against."""

    protocol_version: U32
    cluster_id: Ident
    node_id: Ident
    role: Role
    client_nonce: Nonce


class Challenge(_Wire, frozen=True):
    """L→F: the leader's fresh nonce for the follower's proof."""

    server_nonce: Nonce


class HelloProof(_Wire, frozen=True):
    """F→L: ``client_proof`` over both nonces, the cluster id and the follower's node id."""

    proof: Digest


class Welcome(_Wire, frozen=True):
    """L→F: accepted; the leader's identity, term and end of log, and its own proof.

    ``leader_url`` is the leader's HTTP URL (empty when it does not know a reachable one): a
    follower names it when it refuses a write. ``ack_settings`` is the cluster's write
    guarantee (``AckSettings`` as JSON; empty: not told), which a follower keeps and leads
    with once promoted. The proof covers both, so a man in the middle cannot send clients
    elsewhere or weaken the guarantee."""

    leader_node_id: Ident
    term: U64
    leader_last_lsn: U64
    leader_proof: Digest
    leader_url: Annotated[str, msgspec.Meta(max_length=URL_BYTES_MAX)] = ""
    ack_settings: Annotated[str, msgspec.Meta(max_length=SETTINGS_BYTES_MAX)] = ""

    @property
    def offers_parts(self) -> bool:
        """The leader will ship its Parquet parts (``PartsWelcome``)."""
        return False


class PartsWelcome(Welcome, frozen=True):
    """L→F (protocol v2): ``Welcome`` from a leader that will ship its Parquet parts.

    A message of its own (not a field added to Welcome, whose array a version-1 follower
    decodes with no room for more): only ever sent to a follower that said version 2, and
    the offer is under the leader's proof like the rest."""

    ships_parts: bool = True

    @property
    def offers_parts(self) -> bool:
        return self.ships_parts


class Refused(_Wire, frozen=True):
    """Either way: a plain refusal; ``code`` is a walship error code. The sender then closes."""

    code: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    message: str

    @classmethod
    def from_error(cls, exc: WalshipError) -> Refused:
        return cls(code=exc.code, message=exc.message)

    def to_error(self) -> WalshipError:
        """The error this refusal stands for (its class keeps the ``retriable`` flag)."""
        return error_class_for(self.code)(f"refused by peer: {self.message}", refused=self.code)


REDIRECT_NO: Final = 0
"""Subscribe.redirect: send the snapshot yourself (what followers before cascading expect)."""
REDIRECT_AUTO: Final = 1
"""Subscribe.redirect: redirect me to a caught-up follower that serves snapshots, if any."""
REDIRECT_ANY: Final = 2
"""Subscribe.redirect: redirect me even when you know none: I have a source of my own."""
SOURCES_MAX: Final = 16  # snapshot sources named in one SnapshotRedirect


class Subscribe(_Wire, frozen=True):
    """F→L: the follower's durable end of log ``(term, lsn)`` and the chain hash there, and
    its advertised HTTP URL (empty: unknown), which the leader keeps to ask before it takes
    writes again after a restart (``leadership.py``).

    Cascading (``cascade.py``) adds, all trailing with defaults (so this leader reads a
    Subscribe from a follower before them; a leader before them refuses theirs, hence leaders
    are upgraded first): ``redirect`` (one of the
    ``REDIRECT_*``: may the leader answer ``SnapshotRedirect`` instead of sending a snapshot),
    ``serve_address`` (``HOST:PORT`` where this follower serves snapshots; empty: it does not),
    ``staged`` (the position is a snapshot fetched from another follower and not installed:
    the leader must vouch for it, ``SnapshotConfirmed``, or refuse) and ``snapshot_min_lsn``
    (to a serving follower: the snapshot must reach at least this lsn)."""

    term: U64
    lsn: U64
    chain: Chain
    http_url: Annotated[str, msgspec.Meta(max_length=URL_BYTES_MAX)] = ""
    redirect: Annotated[int, msgspec.Meta(ge=0, le=REDIRECT_ANY)] = REDIRECT_NO
    serve_address: Annotated[str, msgspec.Meta(max_length=URL_BYTES_MAX)] = ""
    staged: bool = False
    snapshot_min_lsn: U64 = 0

    @classmethod
    def at(cls, position: Position, chain: bytes, http_url: str = "", **more: Any) -> Subscribe:
        return cls(
            term=int(position.term), lsn=int(position.lsn), chain=chain, http_url=http_url, **more
        )

    @property
    def position(self) -> Position:
        return Position(Term(self.term), Lsn(self.lsn))


class Diverged(_Wire, frozen=True):
    """L→F: the follower's tail is not on the leader's history; keep only up to this point."""

    common_term: U64
    common_lsn: U64
    reason: str

    @property
    def position(self) -> Position:
        return Position(Term(self.common_term), Lsn(self.common_lsn))


class SnapshotFile(_Wire, frozen=True):
    """One file of a snapshot: bare name, size and sha256 of its whole content."""

    name: FileName
    size: U64
    sha256: Digest


class SnapshotStart(_Wire, frozen=True):
    """L→F: a checkpoint manifest covering exactly lsn ≤ ``last_lsn``; files follow in chunks."""

    snapshot_id: Ident
    last_lsn: U64
    last_term: U64
    chain: Chain
    files: list[SnapshotFile]
    total_bytes: U64

    def __post_init__(self) -> None:
        _require(
            self.total_bytes == sum(f.size for f in self.files),
            f"SnapshotStart total_bytes {self.total_bytes} is not the sum of its file sizes",
        )
        names = [f.name for f in self.files]
        _require(len(set(names)) == len(names), "SnapshotStart lists a file name twice")

    @property
    def position(self) -> Position:
        return Position(Term(self.last_term), Lsn(self.last_lsn))


class SnapshotChunk(_Wire, frozen=True):
    """L→F: ``data`` of ``files[file_index]`` at ``offset`` (resumable by offset)."""

    file_index: U32
    offset: U64
    data: bytes

    def __repr__(self) -> str:
        return (
            f"SnapshotChunk(file_index={self.file_index}, offset={self.offset}, "
            f"data=<{len(self.data)} bytes>)"
        )


class SnapshotEnd(_Wire, frozen=True):
    """L→F: every chunk of the snapshot was sent; verify sha256s, install, stream from S+1."""

    snapshot_id: Ident


class SnapshotRedirect(_Wire, frozen=True):
    """L→F: fetch the snapshot from one of ``sources`` (caught-up followers' replication
    addresses, in order of preference); it must reach at least ``min_lsn`` for the leader to
    go on from its WAL. Then subscribe again with the staged position (``Subscribe.staged``)."""

    term: U64
    sources: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=URL_BYTES_MAX)]],
        msgspec.Meta(max_length=SOURCES_MAX),
    ]
    min_lsn: U64


class SnapshotConfirmed(_Wire, frozen=True):
    """L→F, the answer to a staged Subscribe: the leader's record ``lsn`` has this term and
    chain (it checked them), and its term history up to there; the follower installs the
    staged snapshot with this history and WAL follows from ``lsn + 1``."""

    term: U64
    lsn: U64
    last_term: U64
    chain: Chain
    term_history: list[tuple[U64, U64]]  # bounded by the frame size


class CaughtUp(_Wire, frozen=True):
    """L→F: the follower has every record up to the leader's end of log."""

    term: U64
    leader_lsn: U64


class WalBatch(_Wire, frozen=True):
    """L→F: raw WAL records ``first_lsn..last_lsn`` that continue ``(prev_term, prev_lsn)``.

    ``term`` is the leader's current term (for fencing); ``records`` are the records' bytes
    exactly as in the leader's segment files; ``leader_write_ts_us`` is the leader's wall clock
    when the last of them was written, for time lag.
    """

    term: U64
    prev_lsn: U64
    prev_term: U64
    prev_chain: Chain
    first_lsn: U64
    last_lsn: U64
    leader_lsn: U64
    leader_write_ts_us: U64
    records: bytes

    def __post_init__(self) -> None:
        span = f"WalBatch {self.first_lsn}..{self.last_lsn}"
        _require(self.first_lsn == self.prev_lsn + 1, f"{span} does not follow {self.prev_lsn}")
        _require(self.last_lsn >= self.first_lsn, f"{span} is empty")
        _require(self.leader_lsn >= self.last_lsn, f"{span} ends past leader {self.leader_lsn}")
        _require(self.prev_term <= self.term, f"{span} prev_term is above term {self.term}")
        _require(len(self.records) >= HEADER_BYTES, f"{span} carries no record bytes")

    def __repr__(self) -> str:
        return (
            f"WalBatch(term={self.term}, prev={self.prev_term}/{self.prev_lsn}, "
            f"lsns={self.first_lsn}..{self.last_lsn}, leader_lsn={self.leader_lsn}, "
            f"records=<{len(self.records)} bytes>)"
        )

    @property
    def prev_position(self) -> Position:
        return Position(Term(self.prev_term), Lsn(self.prev_lsn))


class LeaderDurable(_Wire, frozen=True):
    """L→F (protocol v3): the leader has made its log durable up to ``lsn`` (fsynced, or as
    its fsync policy counts it), in ``term``. Sent only to a follower that said version 3 or
    4, which shows (and checkpoints, and serves) nothing past the lowest of this and its
    own durable lsn: records shipped before the leader's fsync may still be lost by it."""

    term: U64
    lsn: U64


class Ack(_Wire, frozen=True):
    """F→L: the highest lsn the follower has durably written, and the highest it applied."""

    durable_lsn: U64
    applied_lsn: U64


class SnapshotResume(_Wire, frozen=True):
    """F→L, the answer to SnapshotStart: send from ``files[file_index]`` at ``offset``.

    ``(0, 0)`` for a fresh transfer; after an interruption, the bytes the follower already holds
    and verified for the same ``snapshot_id`` are not sent again.
    """

    snapshot_id: Ident
    file_index: U32
    offset: U64


class Heartbeat(_Wire, frozen=True):
    """Either way: liveness, the sender's term and end of log, its wall clock in µs."""

    term: U64
    last_lsn: U64
    ts_us: U64


class InSyncSet(_Wire, frozen=True):
    """L→F: the leader's in-sync set, the followers whose acks count towards ``replicated``.

    Ordered by ``(term, version)``; ``lsn`` was the leader's end of log when it was made, so
    every write answered before it is at or below it. A follower stores it durably and
    answers ``InSyncStored`` (a member only once it holds ``lsn``): failover reads it to
    refuse a candidate that cannot prove it holds every ``replicated`` write
    (``replication/insync.py``)."""

    term: U64
    version: U64
    lsn: U64
    members: Annotated[list[Ident], msgspec.Meta(max_length=IN_SYNC_MEMBERS_MAX)]
    ack_mode: AckModeName


class InSyncStored(_Wire, frozen=True):
    """F→L: the in-sync set ``(term, version)`` is durably stored here."""

    term: U64
    version: U64


PART_INFO_BYTES_MAX: Final = 1 << 20
PartKind = Literal["checkpoint", "merge"]


class PartStart(_Wire, frozen=True):
    """L→F (protocol v2): one Parquet part of the leader's, its bytes follow in ``PartChunk``s.

    ``info`` is the leader's ``PartInfo`` as JSON (file name, lsn range, rows, size, sha256);
    ``kind`` says whether it is a checkpoint (appended after the follower's parts, covering
    up to ``last_term``/``chain`` at its last lsn) or a merge replacing the parts named in
    ``replaces`` (their ``PartInfo``s as JSON, which the follower must hold exactly).
    ``consumers`` is the checkpoint manifest's consumer table as JSON. Sent only after the
    follower acked the part's last lsn; nothing in it is trusted before it is verified
    against the follower's own WAL (``replication/physical.py``).
    """

    kind: PartKind
    info: Annotated[bytes, msgspec.Meta(max_length=PART_INFO_BYTES_MAX)]
    last_term: U64
    chain: Chain
    replaces: Annotated[bytes, msgspec.Meta(max_length=PART_INFO_BYTES_MAX)] = b"[]"
    consumers: Annotated[bytes, msgspec.Meta(max_length=PART_INFO_BYTES_MAX)] = b"[]"


class PartChunk(_Wire, frozen=True):
    """L→F: ``data`` of the part in transfer at ``offset`` (chunks come in order)."""

    offset: U64
    data: bytes

    def __repr__(self) -> str:
        return f"PartChunk(offset={self.offset}, data=<{len(self.data)} bytes>)"


class PartEnd(_Wire, frozen=True):
    """L→F: every chunk of part ``file`` was sent: verify, then install or refuse it."""

    file: FileName


# A message's type byte is its 1-based position in this union: never reorder, only append.
Message: TypeAlias = (
    Hello
    | Challenge
    | HelloProof
    | Welcome
    | Refused
    | Subscribe
    | Diverged
    | SnapshotStart
    | SnapshotChunk
    | SnapshotEnd
    | CaughtUp
    | WalBatch
    | Ack
    | Heartbeat
    | SnapshotResume
    | InSyncSet
    | InSyncStored
    | SnapshotRedirect
    | SnapshotConfirmed
    | PartStart
    | PartChunk
    | PartEnd
    | PartsWelcome
    | LeaderDurable
)


MESSAGE_TYPES: Final[dict[int, type[Message]]] = dict(enumerate(get_args(Message), start=1))
_CODE_OF: Final = {cls: code for code, cls in MESSAGE_TYPES.items()}
_DECODERS: Final[dict[int, msgspec.msgpack.Decoder[Any]]] = {
    code: msgspec.msgpack.Decoder(cls) for code, cls in MESSAGE_TYPES.items()
}
_ENCODER: Final = msgspec.msgpack.Encoder()
_CRC = struct.Struct(">I")


# ---------------------------------------------------------------------------------- framing


def encode(msg: Message, frame_bytes_max: int = DEFAULT_LIMITS.frame_bytes_max) -> bytes:
    """One whole frame for ``msg``; ProtocolError when it would exceed ``frame_bytes_max``."""
    code = _CODE_OF[type(msg)]
    buf = bytearray(FRAME_HEADER_BYTES)
    _ENCODER.encode_into(msg, buf, FRAME_HEADER_BYTES)
    if len(buf) > frame_bytes_max:
        raise ProtocolError(
            f"{type(msg).__name__} frame of {len(buf)} bytes exceeds frame_bytes_max "
            f"{frame_bytes_max}",
            frame_bytes=len(buf),
        )
    length = len(buf) - FRAME_HEADER_BYTES
    head = struct.pack(">IB", length, code)
    with memoryview(buf) as view:
        crc = crc32c(view[FRAME_HEADER_BYTES:], crc32c(head[4:]))
    FRAME_HEADER.pack_into(buf, 0, length, code, crc32c(head), crc)
    return bytes(buf)


_BIN8, _BIN16, _BIN32 = struct.Struct(">BB"), struct.Struct(">BH"), struct.Struct(">BI")


def _bin_header(size: int) -> bytes:
    """The msgpack header of a ``bin`` of ``size`` bytes, in its shortest form (as msgspec
    writes it)."""
    if size < 1 << 8:
        return _BIN8.pack(0xC4, size)
    if size < 1 << 16:
        return _BIN16.pack(0xC5, size)
    return _BIN32.pack(0xC6, size)


def encode_parts(
    msg: Message, frame_bytes_max: int = DEFAULT_LIMITS.frame_bytes_max
) -> list[bytes]:
    """The frame ``encode`` gives, as buffers to write one after the other.

    The bulk of a WalBatch (its records) or a SnapshotChunk (its data) is the last buffer,
    the caller's own bytes object: a leader shipping a batch to each follower copied it twice
    per follower otherwise (into the frame, then out of the bytearray), ~1 MB per 1,000 events.
    """
    if not isinstance(msg, WalBatch | SnapshotChunk | PartChunk):
        return [encode(msg, frame_bytes_max)]
    fields = msgspec.structs.astuple(msg)
    bulk: bytes = fields[-1]
    # the same array with an empty bin last: its two-byte header is swapped for the real one
    prefix = _ENCODER.encode((*fields[:-1], b""))[:-2] + _bin_header(len(bulk))
    length = len(prefix) + len(bulk)
    if FRAME_HEADER_BYTES + length > frame_bytes_max:
        raise ProtocolError(
            f"{type(msg).__name__} frame of {FRAME_HEADER_BYTES + length} bytes exceeds "
            f"frame_bytes_max {frame_bytes_max}",
            frame_bytes=FRAME_HEADER_BYTES + length,
        )
    code = _CODE_OF[type(msg)]
    head = struct.pack(">IB", length, code)
    crc = crc32c(bulk, crc32c(prefix, crc32c(head[4:])))
    return [FRAME_HEADER.pack(length, code, crc32c(head), crc) + prefix, bulk]


class FrameDecoder:
    """Turns a byte stream into messages; any split of the stream gives the same messages.

    Holds at most one partial frame, never more than ``frame_bytes_max`` bytes: a frame's
    header (length included) is checked before any of its body is buffered. After a
    ProtocolError the stream is unusable and every later ``feed`` raises again; messages that
    preceded the bad frame in the same ``feed`` are dropped with it (the link closes anyway).

    With ``handshake_frame_bytes_max`` the decoder starts in the handshake: every frame is held
    to that smaller limit until ``authenticated()`` (the peer proved the shared secret). A
    header announcing more is refused before a byte of its body is awaited. Neither side sends
    anything after its last handshake frame until the other answers, so no frame of the
    authenticated stream can arrive while the small limit still applies.
    """

    def __init__(
        self,
        frame_bytes_max: int = DEFAULT_LIMITS.frame_bytes_max,
        *,
        handshake_frame_bytes_max: int | None = None,
    ) -> None:
        if frame_bytes_max < FRAME_HEADER_BYTES + 1:
            raise InvalidInput(f"frame_bytes_max {frame_bytes_max} cannot hold a frame")
        if handshake_frame_bytes_max is not None and not (
            FRAME_HEADER_BYTES < handshake_frame_bytes_max <= frame_bytes_max
        ):
            raise InvalidInput(
                f"handshake_frame_bytes_max {handshake_frame_bytes_max} must hold a frame and "
                f"not exceed frame_bytes_max {frame_bytes_max}"
            )
        self.frame_bytes_max = frame_bytes_max
        self._handshake_bytes_max = handshake_frame_bytes_max
        self._buf = bytearray()
        self._frame_bytes: int | None = None  # size of the buffered frame, once its header passed
        self._error: ProtocolError | None = None

    def __repr__(self) -> str:
        state = "failed" if self._error else f"buffered={len(self._buf)}"
        phase = " handshake" if self._handshake_bytes_max is not None else ""
        return f"<FrameDecoder{phase} {state} limit_bytes={self.limit_bytes}>"

    @property
    def limit_bytes(self) -> int:
        """The largest frame accepted now: the handshake limit until ``authenticated()``."""
        return self._handshake_bytes_max or self.frame_bytes_max

    def authenticated(self) -> None:
        """The peer proved the shared secret: frames up to ``frame_bytes_max`` from now on."""
        self._handshake_bytes_max = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held until the rest arrives."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Every message completed by ``data``, in order; ProtocolError on a bad frame."""
        if self._error is not None:
            raise ProtocolError(f"stream already failed: {self._error.message}")
        try:
            with memoryview(data) as raw, raw.cast("B") as view:
                return self._feed(view)
        except ProtocolError as exc:
            self._error = exc
            self._buf, self._frame_bytes = bytearray(), None
            raise

    def end_of_stream(self) -> None:
        """Check that the peer closed between frames; ProtocolError when it stopped inside one."""
        if self._buf:
            want = self._frame_bytes if self._frame_bytes is not None else FRAME_HEADER_BYTES
            raise ProtocolError(f"stream ended inside a frame: {len(self._buf)} of {want} bytes")

    def _feed(self, view: memoryview) -> list[Message]:
        out: list[Message] = []
        pos, end = 0, len(view)
        if self._buf:
            pos = self._fill(view, pos)
            if self._frame_bytes is None or len(self._buf) < self._frame_bytes:
                return out  # every byte went into the partial frame
            out.append(_decode_frame(self._buf, 0, self._frame_bytes))
            self._buf, self._frame_bytes = bytearray(), None
        # Whole frames are decoded straight from the caller's bytes, without a copy.
        while end - pos >= FRAME_HEADER_BYTES:
            size = self._check_header(view, pos)
            if end - pos < size:
                break
            out.append(_decode_frame(view, pos, size))
            pos += size
        if pos < end:
            self._fill(view, pos)
        return out

    def _fill(self, view: memoryview, pos: int) -> int:
        """Move bytes of the partial frame from ``view[pos:]`` into the buffer; the new pos."""
        if self._frame_bytes is None:
            take = min(FRAME_HEADER_BYTES - len(self._buf), len(view) - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) < FRAME_HEADER_BYTES:
                return pos
            self._frame_bytes = self._check_header(self._buf, 0)
        take = min(self._frame_bytes - len(self._buf), len(view) - pos)
        self._buf += view[pos : pos + take]
        return pos + take

    def _check_header(self, buf: bytearray | memoryview, pos: int) -> int:
        """Validate the frame header at ``pos``; returns the whole frame's size in bytes."""
        length, code, head_crc, _ = FRAME_HEADER.unpack_from(buf, pos)
        actual = crc32c(bytes(buf[pos : pos + 5]))
        if actual != head_crc:
            raise ProtocolError(
                f"frame header checksum mismatch (stored {head_crc:08x}, computed "
                f"{actual:08x}): corrupt stream, or the peer does not speak walship protocol v1"
            )
        size: int = FRAME_HEADER_BYTES + length
        if self._handshake_bytes_max is not None and size > self._handshake_bytes_max:
            kind = MESSAGE_TYPES[code].__name__ if code in MESSAGE_TYPES else f"type {code}"
            raise ProtocolError(
                f"{kind} frame of {size} bytes before the peer authenticated exceeds "
                f"handshake_frame_bytes_max {self._handshake_bytes_max}",
                frame_bytes=size,
            )
        if size > self.frame_bytes_max:
            raise ProtocolError(
                f"frame of {size} bytes exceeds frame_bytes_max {self.frame_bytes_max}",
                frame_bytes=size,
            )
        if code not in _DECODERS:
            raise ProtocolError(f"unknown message type {code} (protocol v{PROTOCOL_VERSION})")
        if length == 0:
            raise ProtocolError(f"{MESSAGE_TYPES[code].__name__} frame has an empty payload")
        return size


def _decode_frame(buf: bytearray | memoryview, pos: int, size: int) -> Message:
    """Check the CRC of the whole frame at ``pos`` (header already checked) and decode it."""
    with memoryview(buf) as whole, whole[pos : pos + size] as frame:
        code = frame[4]
        name = MESSAGE_TYPES[code].__name__
        (stored,) = _CRC.unpack_from(frame, 9)
        actual = crc32c(frame[FRAME_HEADER_BYTES:], crc32c(frame[4:5]))
        if actual != stored:
            raise ProtocolError(
                f"{name} frame checksum mismatch (stored {stored:08x}, computed {actual:08x})"
            )
        try:
            return cast(Message, _DECODERS[code].decode(frame[FRAME_HEADER_BYTES:]))
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"undecodable {name} payload: {exc}") from exc


# -------------------------------------------------------------------------- handshake checks


def hello_error(
    hello: Hello, cluster_id: str, supported: tuple[int, ...] = SUPPORTED_VERSIONS
) -> ProtocolError | None:
    """Why the leader must refuse ``hello`` (wrong version or cluster); None when it may go on.

    ``supported``: the versions it speaks (a test plays a leader from before v2 with ``(1,)``).
    """
    if hello.protocol_version not in supported:
        return ProtocolError(
            f"protocol version {hello.protocol_version} is not supported; this node speaks "
            f"versions {', '.join(map(str, supported))}",
            supported=list(supported),
        )
    if hello.cluster_id != cluster_id:
        return ProtocolError(
            f"node {hello.node_id!r} belongs to cluster {hello.cluster_id!r}, not {cluster_id!r}"
        )
    return None


def stale_term_error(msg: Message, known_term: int) -> StaleTerm | None:
    """A StaleTerm error when ``msg`` comes from a lower term than ``known_term`` (fencing).

    The sender's term is in Welcome, WalBatch, CaughtUp, Heartbeat, InSyncSet and
    SnapshotRedirect; other messages pass.
    """
    if not isinstance(
        msg,
        Welcome | WalBatch | CaughtUp | Heartbeat | InSyncSet | SnapshotRedirect | LeaderDurable,
    ):
        return None
    term = msg.term
    if term < known_term:
        return StaleTerm(
            f"{type(msg).__name__} from term {term}, but term {known_term} is already known: "
            "the sender was deposed",
            sender_term=term,
            known_term=known_term,
        )
    return None


# ------------------------------------------------------------------------------------ auth


def make_nonce() -> bytes:
    """A fresh random nonce of NONCE_BYTES for one handshake."""
    return secrets.token_bytes(NONCE_BYTES)


def _mac(secret: bytes, *parts: bytes | str | int) -> bytes:
    if not secret:
        raise AuthenticationError("the replication secret is empty")
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        if isinstance(part, str):
            data = part.encode()
        elif isinstance(part, int):
            data = part.to_bytes(8, "big")
        else:
            data = part
        # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        mac.update(len(data).to_bytes(4, "big"))
        mac.update(data)
    return mac.digest()


_FOLLOWER_LABEL = b"walship/v1 follower proof"
_LEADER_LABEL = b"walship/v1 leader proof"


def client_proof(
    secret: bytes, client_nonce: bytes, server_nonce: bytes, cluster_id: str, node_id: str
) -> bytes:
    """The follower's HMAC-SHA256 proof that it holds ``secret``; ``node_id`` is its own."""
    return _mac(secret, _FOLLOWER_LABEL, client_nonce, server_nonce, cluster_id, node_id)


def server_proof(
    secret: bytes,
    client_nonce: bytes,
    server_nonce: bytes,
    cluster_id: str,
    node_id: str,
    leader_node_id: str,
    term: int,
    leader_url: str = "",
    ack_settings: str = "",
    ships_parts: bool = False,
) -> bytes:
    """The leader's proof: another label (no replay of one for the other), binds id, term,
    the URL it gives for writes, the ack settings it passes on and whether it ships parts
    (bound only when it does, so a version-1 proof is unchanged)."""
    parts = (client_nonce, server_nonce, cluster_id, node_id, leader_node_id, term, leader_url)
    more = (b"ships parts",) if ships_parts else ()
    return _mac(secret, _LEADER_LABEL, *parts, ack_settings, *more)


def verify_proof(expected: bytes, proof: bytes, who: str) -> None:
    """AuthenticationError naming ``who`` unless ``proof`` equals ``expected`` (constant time)."""
    if not hmac.compare_digest(expected, proof):
        raise AuthenticationError(f"{who} failed the shared-secret challenge")


def _handshake(hello: Hello, challenge: Challenge) -> tuple[bytes, bytes, str, str]:
    return hello.client_nonce, challenge.server_nonce, hello.cluster_id, hello.node_id


def make_hello_proof(secret: bytes, hello: Hello, challenge: Challenge) -> HelloProof:
    """Follower side: the answer to ``challenge``."""
    return HelloProof(client_proof(secret, *_handshake(hello, challenge)))


def verify_hello_proof(secret: bytes, hello: Hello, challenge: Challenge, msg: HelloProof) -> None:
    """Leader side: AuthenticationError unless the follower proved it holds the secret."""
    expected = client_proof(secret, *_handshake(hello, challenge))
    verify_proof(expected, msg.proof, f"follower {hello.node_id!r}")


def make_welcome(
    secret: bytes,
    hello: Hello,
    challenge: Challenge,
    *,
    leader_node_id: str,
    term: int,
    leader_last_lsn: int,
    leader_url: str = "",
    ack_settings: str = "",
    ships_parts: bool = False,
) -> Welcome:
    """Leader side, once the follower's proof verified: Welcome with the leader's own proof.
    ``ships_parts`` only for a follower that said version 2."""
    invariant(
        not ships_parts or takes_parts(hello.protocol_version),
        "parts offered to a version-1 follower",
    )
    handshake = _handshake(hello, challenge)
    proof = server_proof(
        secret, *handshake, leader_node_id, term, leader_url, ack_settings, ships_parts
    )
    if ships_parts:
        return PartsWelcome(leader_node_id, term, leader_last_lsn, proof, leader_url, ack_settings)
    return Welcome(leader_node_id, term, leader_last_lsn, proof, leader_url, ack_settings)


def verify_welcome(secret: bytes, hello: Hello, challenge: Challenge, welcome: Welcome) -> None:
    """Follower side: AuthenticationError unless the leader proved it holds the secret."""
    handshake = _handshake(hello, challenge)
    expected = server_proof(
        secret,
        *handshake,
        welcome.leader_node_id,
        welcome.term,
        welcome.leader_url,
        welcome.ack_settings,
        welcome.offers_parts,
    )
    verify_proof(expected, welcome.leader_proof, f"leader {welcome.leader_node_id!r}")


def load_secret(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> bytes:
    """The shared secret from the file at ``path``, else from ``$WALSHIP_REPLICATION_SECRET``.

    Surrounding whitespace (a trailing newline) is stripped. InvalidInput when there is no
    secret, the file cannot be read, or the secret is empty.
    """
    if path is not None:
        try:
            secret = Path(path).read_bytes().strip()
        except OSError as exc:
            raise InvalidInput(f"cannot read replication secret file {path}: {exc}") from exc
        source = f"file {path}"
    else:
        value = (os.environ if environ is None else environ).get(SECRET_ENV)
        if value is None:
            raise InvalidInput(f"no replication secret: pass a secret file or set {SECRET_ENV}")
        secret, source = value.strip().encode(), SECRET_ENV
    if not secret:
        raise InvalidInput(f"the replication secret from {source} is empty")
    return secret


# ------------------------------------------------------------------------------ WAL batches

WAL_BATCH_OVERHEAD_BYTES: Final = FRAME_HEADER_BYTES + 1 + 7 * 9 + (2 + CHAIN_BYTES) + 5
"""Most bytes a WalBatch frame needs besides its records: frame header, array header, seven
u64 fields at their widest (9 bytes), ``prev_chain`` as bin 8, ``records``' bin 32 header."""


def batch_records(
    records: Iterable[bytes],
    frame_bytes_max: int = DEFAULT_LIMITS.frame_bytes_max,
    *,
    term: int,
    prev_lsn: int,
    prev_term: int,
    prev_chain: bytes,
    leader_lsn: int,
    leader_write_ts_us: int,
) -> list[WalBatch]:
    """Split consecutive raw records (after ``prev_lsn``) into WalBatches that each fit a frame.

    Records keep their order and bytes; each batch continues the one before. Returns [] for no
    records. LimitExceeded when one record alone cannot fit; InvariantViolation when the
    records are not consecutive from ``prev_lsn + 1``.
    """
    budget = frame_bytes_max - WAL_BATCH_OVERHEAD_BYTES
    batches: list[WalBatch] = []
    group: list[bytes] = []
    group_bytes = 0
    start = end = (prev_lsn, prev_term, prev_chain)
    for raw in records:
        invariant(len(raw) >= HEADER_BYTES, f"{len(raw)} bytes are not a WAL record")
        body_len, _crc, lsn, rec_term, _batch_left, chain = HEADER.unpack_from(raw)
        invariant(len(raw) == HEADER_BYTES + body_len, f"record {lsn} has a wrong length")
        invariant(lsn == end[0] + 1, f"record {lsn} does not follow {end[0]}")
        if len(raw) > budget:
            raise LimitExceeded(
                f"record {lsn} of {len(raw)} bytes cannot fit a {frame_bytes_max}-byte frame"
            )
        if group and group_bytes + len(raw) > budget:
            batches.append(_wal_batch(group, start, end, term, leader_lsn, leader_write_ts_us))
            group, group_bytes, start = [], 0, end
        group.append(raw)
        group_bytes += len(raw)
        end = (lsn, rec_term, chain)
    if group:
        batches.append(_wal_batch(group, start, end, term, leader_lsn, leader_write_ts_us))
    return batches


def _wal_batch(
    group: list[bytes],
    start: tuple[int, int, bytes],
    end: tuple[int, int, bytes],
    term: int,
    leader_lsn: int,
    leader_write_ts_us: int,
) -> WalBatch:
    prev_lsn, prev_term, prev_chain = start
    return WalBatch(
        term=term,
        prev_lsn=prev_lsn,
        prev_term=prev_term,
        prev_chain=prev_chain,
        first_lsn=prev_lsn + 1,
        last_lsn=end[0],
        leader_lsn=leader_lsn,
        leader_write_ts_us=leader_write_ts_us,
        records=b"".join(group),
    )
