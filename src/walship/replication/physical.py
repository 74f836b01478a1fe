"""Physical followers: the leader ships its Parquet parts, a follower installs them verified.

Every node used to convert and encode its own checkpoints and merge its own parts, the largest
CPU cost of a replicated cluster. With ``--physical-followers`` on both ends (protocol
version 2, negotiated in the handshake: ``Welcome.ships_parts``), the leader sends each
checkpoint part and each merged part it makes, byte for byte, on the replication link:

* a ``PartShipper`` per follower queues the parts (bounded; each pinned on disk until sent)
  and sends one only once the follower has acked the part's last lsn, so the records it covers
  are already in the follower's WAL; its chunks go one per turn of the session loop, between
  WAL batches, so shipping the log never waits for a whole part;
* the shipper outlives the link (``PartShippers``, by follower node id): a part cut off by a
  reconnect goes back to the head of its queue and is sent again whole, and the parts made
  while the follower is away (checkpoints and merges) wait for it there, so its layout stays
  the leader's; a merge of parts still queued is queued in their place, as one part;
* the follower's ``PartReceiver`` stages the bytes, hashing them as they arrive, and
  ``install`` verifies and installs the part (``storage/adopt.py``: size, sha256, row count,
  lsn range, the rows against its own memtable, the record at the last lsn against its own
  WAL). A part that fails is refused (counted, logged) and the follower checkpoints that
  range from its own WAL instead; a merge that does not span exactly parts it holds is
  refused and it keeps its own parts.

While its leader ships parts, a follower neither checkpoints nor merges on its own
(``Store.parts_from_leader``), unless its memtable outgrows ``physical_fallback_percent`` of
the budget (parts stopped coming); after the link ends, or a promotion, it does both again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from walship.errors import ProtocolError
from walship.position import Lsn
from walship.replication.metrics import ReplicationMetrics
from walship.replication.protocol import Message, PartChunk, PartEnd, PartStart
from walship.replication.staging import checked_child
from walship.storage.adopt import adopt_checkpoint, adopt_merge
from walship.storage.consumers import ConsumerPosition
from walship.storage.manifest import CheckpointManifest
from walship.storage.parquet import PartInfo
from walship.storage.part_verify import PartRejected
from walship.store import Store

log = logging.getLogger(__name__)

PART_CHUNK_BYTES: Final = 256 << 10  # as snapshot chunks (leader.SNAPSHOT_CHUNK_BYTES)
PARTS_QUEUED_MAX: Final = 64  # per follower; past it the oldest is dropped (rebuilt there)
INCOMING_DIR: Final = "parts-incoming"
CORRUPT_PARTS_ENV: Final = "WALSHIP_TEST_CORRUPT_PARTS"
"""Test hook: the leader flips one byte of the first N parts it ships (after the frame
checksum, so only the part's own verification can catch it)."""
CUT_PARTS_ENV: Final = "WALSHIP_TEST_CUT_PARTS"
"""Test hook: the leader drops the link right after the first chunk of the first N parts it
ships (a reconnect in the middle of a transfer)."""


@dataclass
class OutgoingPart:
    """One part made by the leader, as it is shipped."""

    kind: str
    info: PartInfo
    replaces: list[PartInfo]
    last_term: int
    chain: bytes
    consumers: list[ConsumerPosition]

    @classmethod
    def of(
        cls, kind: str, info: PartInfo, replaces: list[PartInfo], manifest: CheckpointManifest
    ) -> OutgoingPart:
        return cls(
            kind, info, replaces, manifest.last_term, manifest.chain_bytes, manifest.consumers
        )

    def start(self) -> PartStart:
        return PartStart(
            kind="merge" if self.kind == "merge" else "checkpoint",
            info=msgspec.json.encode(self.info),
            last_term=self.last_term,
            chain=self.chain,
            replaces=msgspec.json.encode(self.replaces),
            consumers=msgspec.json.encode(self.consumers),
        )


class PartShipper:
    """The leader's queue of parts for one follower; lives on the event loop.

    It outlives one link (``PartShippers``): ``suspend`` puts a part cut off by the link's
    end back at the head of the queue, and parts made meanwhile are still queued.
    """

    _corrupt_left = int(os.environ.get(CORRUPT_PARTS_ENV, "0") or 0)
    _cut_left = int(os.environ.get(CUT_PARTS_ENV, "0") or 0)

    def __init__(self, store: Store, metrics: ReplicationMetrics, node_id: str = "?") -> None:
        self.store = store
        self.metrics = metrics
        self.node_id = node_id
        self.queue: deque[OutgoingPart] = deque()
        self._current: OutgoingPart | None = None
        self._offset = 0
        self._corrupt = False
        self._cut = False
        self._closed = False
        self.shipped = 0
        self.reshipped = 0  # parts cut off by a reconnect and queued again

    def offer(self, part: OutgoingPart) -> None:
        if self._closed:
            return
        self.store.pin_parts([part.info.file])
        if part.kind == "merge" and self._collapse(part):
            return
        self.queue.append(part)
        while len(self.queue) > PARTS_QUEUED_MAX:
            dropped = self.queue.popleft()
            self.store.unpin_parts([dropped.info.file])
            log.warning(
                "replication: dropped part %s queued for %s (too many queued; it builds that "
                "range itself)",
                dropped.info,
                self.node_id,
            )

    def _collapse(self, merge: OutgoingPart) -> bool:
        """Queue ``merge`` in place of its inputs when they are all still queued as whole
        checkpoint parts, one after another (a follower away or behind): it then installs the
        merged part as a checkpoint, and neither gets nor keeps the parts merged away. False
        when some input was sent already (the merge then goes as a merge)."""
        names = [p.file for p in merge.replaces]
        queued = [p.info.file for p in self.queue]
        if not names or names[0] not in queued:
            return False
        at = queued.index(names[0])
        run = list(self.queue)[at : at + len(names)]
        if [p.info for p in run] != merge.replaces or any(p.kind == "merge" for p in run):
            return False
        last = run[-1]  # the term, chain and consumers at the merged part's last lsn
        collapsed = OutgoingPart(
            "checkpoint", merge.info, [], last.last_term, last.chain, last.consumers
        )
        items = list(self.queue)
        items[at : at + len(names)] = [collapsed]
        self.queue = deque(items)
        self.store.unpin_parts(names)
        return True

    def due(self, durable_lsn: int) -> bool:
        """A chunk to send now: a part in transfer, or the next one acked by the follower."""
        return self._current is not None or bool(
            self.queue and self.queue[0].info.last_lsn <= durable_lsn
        )

    @property
    def waiting(self) -> bool:
        return bool(self.queue) and self._current is None

    async def next_message(self, durable_lsn: int) -> Message | None:
        """The next frame of part shipping, or None when nothing is due."""
        part = self._current
        if part is None:
            if not self.due(durable_lsn):
                return None
            part = self._current = self.queue.popleft()
            self._offset = 0
            self._corrupt = PartShipper._corrupt_left > 0
            if self._corrupt:
                PartShipper._corrupt_left -= 1
            self._cut = PartShipper._cut_left > 0
            if self._cut:
                PartShipper._cut_left -= 1
            return part.start()
        if self._cut and self._offset > 0:
            self._cut = False
            raise ConnectionResetError(f"test hook: link cut in the middle of part {part.info}")
        if self._offset >= part.info.bytes:
            self._current = None
            self.store.unpin_parts([part.info.file])
            self.shipped += 1
            self.metrics.parts_sent.inc()
            return PartEnd(part.info.file)
        size = min(PART_CHUNK_BYTES, part.info.bytes - self._offset)
        path = self.store.parts_dir / part.info.file
        data = await asyncio.to_thread(_read_chunk, path, self._offset, size)
        if self._current is not part:
            return None  # a new link took the queue over meanwhile (the part stays pinned)
        if len(data) != size:
            raise ProtocolError(f"part {part.info.file} is shorter than its info says")
        if self._corrupt and self._offset == 0:
            data = bytes([data[0] ^ 0x40]) + data[1:]
        chunk = PartChunk(self._offset, data)
        self._offset += size
        self.metrics.part_bytes_sent.inc(size)
        return chunk

    def suspend(self) -> None:
        """The link ended: a part in transfer goes back to the head of the queue, to be sent
        again whole (the follower drops what it staged of it) on the next link."""
        part, self._current = self._current, None
        if part is not None:
            self.queue.appendleft(part)
            self.reshipped += 1
            log.info(
                "replication: part %s to %s cut off by the link's end; sent again on the next",
                part.info,
                self.node_id,
            )
        self._offset = 0

    def take_over(self, old: PartShipper) -> None:
        """Continue ``old``'s queue (a follower reconnected before its old link was closed);
        ``old`` ships nothing more, and its pins are this shipper's now."""
        old.suspend()
        self.queue.extend(old.queue)
        self.reshipped += old.reshipped
        old.queue.clear()
        old._closed = True

    def drop_through(self, lsn: int) -> None:
        """Forget the queued parts that end at or before ``lsn`` (a snapshot to there
        replaces them)."""
        gone = [p for p in self.queue if p.info.last_lsn <= lsn]
        if gone:
            self.queue = deque(p for p in self.queue if p.info.last_lsn > lsn)
            self.store.unpin_parts([p.info.file for p in gone])

    def close(self) -> None:
        """Let go of every pinned part; nothing is shipped any more."""
        self._closed = True
        names = [p.info.file for p in self.queue]
        if self._current is not None:
            names.append(self._current.info.file)
        self.queue.clear()
        self._current = None
        if names:
            self.store.unpin_parts(names)


class PartShippers:
    """The leader's ``PartShipper`` of every physical follower it has served, connected or
    not, by node id: what a follower misses while away is shipped when it is back.

    Each queue is bounded (``PARTS_QUEUED_MAX``, its parts pinned on disk); a follower
    forgotten (``forget_follower``) or a leader stopping lets go of its queue. Lives on the
    event loop.
    """

    def __init__(self, store: Store, metrics: ReplicationMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self._by_node: dict[str, PartShipper] = {}

    def attach(self, node_id: str) -> PartShipper:
        """The shipper for a new link of ``node_id``: what its last link left, queued."""
        shipper = PartShipper(self.store, self.metrics, node_id)
        old = self._by_node.get(node_id)
        if old is not None:
            shipper.take_over(old)
        self._by_node[node_id] = shipper
        return shipper

    def detach(self, shipper: PartShipper) -> None:
        """The link of ``shipper`` ended: its queue waits for the follower's next link."""
        if self._by_node.get(shipper.node_id) is shipper:
            shipper.suspend()
        else:
            shipper.close()  # taken over already, or forgotten

    def offer(self, part: OutgoingPart) -> None:
        for shipper in self._by_node.values():
            shipper.offer(part)

    def queued(self, node_id: str) -> int:
        shipper = self._by_node.get(node_id)
        return len(shipper.queue) if shipper is not None else 0

    def forget(self, node_id: str) -> None:
        shipper = self._by_node.pop(node_id, None)
        if shipper is not None:
            shipper.close()

    def close(self) -> None:
        for shipper in self._by_node.values():
            shipper.close()
        self._by_node.clear()


def _read_chunk(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@dataclass
class IncomingPart:
    """A part being received: the leader's claims about it, and the bytes so far."""

    kind: str
    info: PartInfo
    replaces: list[PartInfo]
    last_term: int
    chain: bytes
    consumers: list[ConsumerPosition]
    path: Path
    written: int = 0
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)


class PartReceiver:
    """The follower's end: stage the leader's parts, verify and install them."""

    def __init__(self, store: Store, metrics: ReplicationMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self.directory = store.data_dir / INCOMING_DIR
        shutil.rmtree(self.directory, ignore_errors=True)  # a transfer cut off: sent again
        self.directory.mkdir(parents=True, exist_ok=True)
        self._current: IncomingPart | None = None
        self._file: int | None = None
        self.received = self.installed = self.refused = self.skipped = 0
        self.bytes_received = 0
        self.last_refusal: str | None = None

    def start(self, msg: PartStart) -> None:
        if self._current is not None:
            raise ProtocolError("PartStart while another part is in transfer")
        try:
            info = msgspec.json.decode(msg.info, type=PartInfo)
            replaces = msgspec.json.decode(msg.replaces, type=list[PartInfo])
            consumers = msgspec.json.decode(msg.consumers, type=list[ConsumerPosition])
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"undecodable PartStart: {exc}") from exc
        path = checked_child(self.directory, info.file)
        if info.bytes < 0 or info.bytes > self.store.limits.segment_bytes_max * 64:
            raise ProtocolError(f"part {info.file} of {info.bytes} bytes")
        self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._current = IncomingPart(
            msg.kind, info, replaces, msg.last_term, msg.chain, consumers, path
        )

    def chunk(self, msg: PartChunk) -> None:
        part = self._current
        if part is None or self._file is None:
            raise ProtocolError("PartChunk without PartStart")
        if msg.offset != part.written or part.written + len(msg.data) > part.info.bytes:
            raise ProtocolError(
                f"PartChunk at {msg.offset}+{len(msg.data)} of part {part.info.file} "
                f"({part.written} of {part.info.bytes} bytes received)"
            )
        os.write(self._file, msg.data)
        part.hasher.update(msg.data)
        part.written += len(msg.data)
        self.bytes_received += len(msg.data)
        self.metrics.part_bytes_received.inc(len(msg.data))

    def end(self, msg: PartEnd) -> IncomingPart:
        part = self._current
        if part is None or self._file is None or msg.file != part.info.file:
            raise ProtocolError(f"PartEnd for {msg.file!r}, which is not in transfer")
        os.fsync(self._file)
        os.close(self._file)
        self._file = None
        self._current = None
        self.received += 1
        self.metrics.parts_received.inc()
        return part

    def install(self, part: IncomingPart) -> bool:
        """Verify and install ``part`` (in a worker thread); on refusal rebuild from this
        node's WAL what it covered. True when it was installed."""
        store = self.store
        if part.kind == "checkpoint" and part.info.first_lsn <= store.manifest.last_lsn:
            # this node checkpointed (some of) that range itself (a clean stop, a fallback):
            # not a bad part, so not a refusal. Its own parts stand until the leader's merge
            # of that range comes in (``adopt_merge`` takes parts spanning it exactly), and it
            # checkpoints the rest of the range from its own WAL
            part.path.unlink(missing_ok=True)
            self.skipped += 1
            log.info(
                "replication: the leader's part %s overlaps this node's own checkpoint "
                "(through lsn %d); kept its own",
                part.info.file,
                store.manifest.last_lsn,
            )
            if part.info.last_lsn > store.manifest.last_lsn:
                store.checkpoint_through(Lsn(part.info.last_lsn))
            return False
        try:
            digest = part.hasher.digest()
            if part.kind == "checkpoint":
                adopt_checkpoint(
                    store,
                    part.path,
                    part.info,
                    part.last_term,
                    part.chain,
                    part.consumers,
                    digest,
                )
            else:
                adopt_merge(store, part.path, part.info, part.replaces, digest)
        except PartRejected as exc:
            self.refused += 1
            self.last_refusal = exc.message
            self.metrics.parts_refused.inc()
            log.warning("replication: refused the leader's part: %s", exc.message)
            if part.kind == "checkpoint":
                # rebuilt from this node's own WAL: its memtable holds that range
                store.checkpoint_through(Lsn(part.info.last_lsn))
            return False
        finally:
            part.path.unlink(missing_ok=True)
        self.installed += 1
        self.metrics.parts_installed.inc()
        return True

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None
        if self._current is not None:
            self._current.path.unlink(missing_ok=True)
            self._current = None

    def status(self) -> dict[str, object]:
        return {
            "received": self.received,
            "installed": self.installed,
            "refused": self.refused,
            "skipped": self.skipped,
            "bytes_received": self.bytes_received,
            "last_refusal": self.last_refusal,
        }
