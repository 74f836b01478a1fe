"""Sending a snapshot: a pinned checkpoint manifest and its files, in chunks, resumable.

One code path for every sender: the leader (``FollowerSession``) and a follower that serves
snapshots to others (``cascade.SnapshotServer``). The snapshot is the manifest given (the
Parquet parts covering exactly lsn <= S, plus S's term and chain), the manifest itself and
the sender's term history, each file announced with its size and sha256 in
``SnapshotStart``; the receiver answers where to resume (``SnapshotResume``) and the files
follow from there in chunks, then ``SnapshotEnd``. The parts are pinned against compaction
for the whole transfer; keeping the WAL after S is the leader's business (its retention).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from walship.errors import InvalidInput, ProtocolError, WaitTimeout
from walship.replication.metrics import ReplicationMetrics
from walship.replication.protocol import (
    SnapshotChunk,
    SnapshotEnd,
    SnapshotFile,
    SnapshotResume,
    SnapshotStart,
)
from walship.replication.stream import MessageStream
from walship.storage.manifest import CheckpointManifest
from walship.store import Store

# Well under the allocator's 1 MiB mmap threshold (runtime.py): each chunk is copied a few
# times on both ends, and buffers of 1 MiB or more are fresh pages every time, faulted in
# again at each copy. 1 MiB chunks shipped snapshots at ~145 MB/s here, 256 KiB at ~250.
SNAPSHOT_CHUNK_BYTES = 256 << 10


@dataclass
class SnapshotProgress:
    """A snapshot transfer to one follower: ``sending`` until SnapshotEnd is sent, then
    ``installing`` until the follower acknowledges ``last_lsn`` (it installed the snapshot),
    when the session drops it."""

    snapshot_id: str
    bytes_done: int
    bytes_total: int
    last_lsn: int
    sent: bool = False

    def status(self) -> dict[str, Any]:
        return {
            "id": self.snapshot_id,
            "state": "installing" if self.sent else "sending",
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
        }


async def send_snapshot(
    store: Store,
    manifest: CheckpointManifest,
    stream: MessageStream,
    resume: Callable[[], Awaitable[SnapshotResume]],
    metrics: ReplicationMetrics,
    started: Callable[[SnapshotProgress], None],
) -> None:
    """Send ``manifest`` (``store``'s, read by the caller without awaiting in between) over
    ``stream``; ``resume`` awaits the receiver's SnapshotResume, ``started`` gets the
    transfer's progress as soon as it is known. InvalidInput when there is no checkpoint yet;
    ProtocolError for a resume point outside the snapshot; WaitTimeout when the receiver does
    not answer SnapshotStart within ``read_timeout_ms``."""
    if manifest.last_lsn == 0:
        raise InvalidInput("the follower needs a snapshot but none exists yet")
    pinned = store.pin_parts([p.file for p in manifest.parts])
    try:
        files: list[tuple[SnapshotFile, Path | bytes]] = []
        for part in manifest.parts:
            files.append(
                (
                    SnapshotFile(part.file, part.bytes, bytes.fromhex(part.sha256)),
                    store.parts_dir / part.file,
                )
            )
        extra = {
            "manifest.json": msgspec.json.encode(manifest),
            "term_history.json": msgspec.json.encode(store.log.term_history()),
        }
        for name, data in extra.items():
            files.append((SnapshotFile(name, len(data), hashlib.sha256(data).digest()), data))
        total = sum(f.size for f, _ in files)
        digest = hashlib.sha256(extra["manifest.json"]).hexdigest()[:16]
        snapshot_id = f"{manifest.last_lsn:016x}-{digest}"
        progress = SnapshotProgress(snapshot_id, 0, total, manifest.last_lsn)
        started(progress)
        await stream.send(
            SnapshotStart(
                snapshot_id=snapshot_id,
                last_lsn=manifest.last_lsn,
                last_term=manifest.last_term,
                chain=manifest.chain_bytes,
                files=[f for f, _ in files],
                total_bytes=total,
            )
        )
        try:
            async with asyncio.timeout(store.limits.read_timeout_ms / 1000):
                answer = await resume()
        except TimeoutError as exc:
            raise WaitTimeout("the follower did not answer SnapshotStart") from exc
        if answer.snapshot_id != snapshot_id or answer.file_index > len(files):
            raise ProtocolError("SnapshotResume names another snapshot or file")
        progress.bytes_done = sum(f.size for f, _ in files[: answer.file_index]) + answer.offset
        for index in range(answer.file_index, len(files)):
            meta, source = files[index]
            offset = answer.offset if index == answer.file_index else 0
            if offset > meta.size:
                raise ProtocolError("SnapshotResume offset is past the end of the file")
            while offset < meta.size or (meta.size == 0 and offset == 0):
                size = min(SNAPSHOT_CHUNK_BYTES, meta.size - offset)
                data = (
                    source[offset : offset + size]
                    if isinstance(source, bytes)
                    else await asyncio.to_thread(_read_chunk, source, offset, size)
                )
                await stream.send(SnapshotChunk(index, offset, data))
                offset += size
                progress.bytes_done += size
                metrics.snapshot_bytes.inc(size)
                if meta.size == 0:
                    break
        # before the send: its drain may let the follower's ack of the install in first
        progress.sent = True
        await stream.send(SnapshotEnd(snapshot_id))
        metrics.snapshots_sent.inc()
    finally:
        store.unpin_parts(pinned)


def _read_chunk(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
