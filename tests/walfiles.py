"""Helpers for tests that build a WAL on disk, damage it on purpose, or ship its records."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_event
from walship.limits import Limits
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy
from walship.wal.frame import VerifiedFrame, verify_frame
from walship.wal.record import GENESIS_CHAIN, HEADER_BYTES, Record
from walship.wal.segment import SEGMENT_HEADER_BYTES, list_segments


def write_store(data_dir: Path, events: int = 60, segment_bytes_max: int = 2048) -> None:
    """A closed store with ``events`` events spread over several small WAL segments."""
    config = StoreConfig(
        data_dir,
        fsync=FsyncPolicy.parse("never"),
        limits=Limits(segment_bytes_max=segment_bytes_max),
        checkpoints=False,
    )
    with Store.open(config) as store:
        for i in range(events):
            store.append(make_event(f"acct-{i % 4}", payload={"i": i}))


def segments(data_dir: Path) -> list[Path]:
    return [path for _, path in list_segments(data_dir / "wal")]


def record_offsets(segment: Path) -> list[int]:
    """Byte offsets of every record in a segment (following the length fields)."""
    data = segment.read_bytes()
    offsets = []
    pos = SEGMENT_HEADER_BYTES
    while pos < len(data):
        offsets.append(pos)
        pos += HEADER_BYTES + int.from_bytes(data[pos : pos + 4], "little")
    return offsets


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def flip_bit_in_record_body(segment: Path, index: int) -> int:
    """Flip a bit in the body of the ``index``-th record; returns that record's offset."""
    offset = record_offsets(segment)[index]
    flip_bit(segment, offset + HEADER_BYTES + 2)
    return offset


def cut_inside_last_record(segment: Path) -> int:
    """Truncate ``segment`` in the middle of its last record; returns that record's offset."""
    offset = record_offsets(segment)[-1]
    with open(segment, "r+b") as f:
        f.truncate(offset + 10)
    return offset


def shipped(
    records: list[Record], first: int, last: int, body_bytes_max: int = 1 << 20
) -> VerifiedFrame:
    """Records first..last (of ``records``, lsn 1 onwards) as a follower receives them: one
    frame, verified from their predecessor (``wal/frame.py``)."""
    prev = records[first - 2] if first > 1 else None
    return verify_frame(
        b"".join(r.raw for r in records[first - 1 : last]),
        first - 1,
        prev.term if prev else 0,
        prev.chain if prev else GENESIS_CHAIN,
        records[-1].term,
        body_bytes_max,
    )
