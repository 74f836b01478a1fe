"""A reader that follows the WAL on disk from a position, for shipping to a follower.

It keeps its segment file open and its byte offset, so tailing live writes reads only the new
bytes; it crosses into the next segment when the current one is finished, and reports when the
records it needs were removed (the follower then needs a snapshot). It only returns records
the writer has finished writing, each CRC-checked, as raw bytes ready to ship.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import BinaryIO

from walship.errors import CorruptionError, InvalidInput
from walship.wal.log import Wal
from walship.wal.record import HEADER, HEADER_BYTES, crc32c
from walship.wal.segment import SEGMENT_HEADER_BYTES


class WalGone(InvalidInput):
    """The records a cursor needs are no longer in the WAL (removed after a checkpoint)."""

    code = "wal_gone"


@dataclass(frozen=True, slots=True)
class RawBatch:
    """Consecutive whole records ``first_lsn..last_lsn`` as they are on disk."""

    first_lsn: int
    last_lsn: int
    last_term: int
    last_chain: bytes
    data: bytes


class WalCursor:
    """Reads records from ``next_lsn`` onwards. Not thread-safe: one per follower session."""

    def __init__(self, wal: Wal, next_lsn: int, *, early: bool = False) -> None:
        self.wal = wal
        self.next_lsn = next_lsn
        # read up to flushed_lsn (in the file, maybe not fsynced) instead of written_lsn: a
        # leader shipping before its own fsync, to a follower that is told what is durable
        self.early = early
        self._file: BinaryIO | None = None
        self._segment_first = 0
        self._offset = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_segment(self) -> None:
        """Open the segment holding ``next_lsn`` and seek to it."""
        self.close()
        infos = self.wal.segment_infos()
        firsts = [first for first, _, _ in infos]
        if self.next_lsn < firsts[0]:
            raise WalGone(
                f"lsn {self.next_lsn} is no longer in the WAL (oldest is {firsts[0]})",
                oldest_lsn=firsts[0],
            )
        idx = bisect.bisect_right(firsts, self.next_lsn) - 1
        first, path, _ = infos[idx]
        try:
            # unbuffered: a buffered reader would keep preallocated zeros read ahead of the writer
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open across reads
        except FileNotFoundError as exc:
            raise WalGone(f"segment {path.name} was removed") from exc
        self._file = f
        self._segment_first = first
        self._offset = SEGMENT_HEADER_BYTES
        # skip to next_lsn using the writer's sparse index, then record by record
        for lsn, offset in reversed(self.wal.sparse_index(first)):
            if lsn <= self.next_lsn:
                self._offset = offset
                break
        end = self.wal.segment_end(first) or 0  # records end here; preallocated zeros follow
        at = self._lsn_at(self._offset) if self._offset < end else None
        while at is not None and at < self.next_lsn and self._offset < end:
            f.seek(self._offset)
            head = f.read(HEADER_BYTES)
            self._offset += HEADER_BYTES + HEADER.unpack(head)[0]
            at = self._lsn_at(self._offset) if self._offset < end else None

    def _lsn_at(self, offset: int) -> int | None:
        assert self._file is not None
        self._file.seek(offset)
        head = self._file.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            return None
        return int(HEADER.unpack(head)[2])

    def read_recent(self, max_bytes: int) -> RawBatch | None:
        """The next records if the WAL still holds them in memory from its last writes (a
        cursor tailing the log): no file read, no re-check (they are the bytes just written,
        each checked when encoded or received). None otherwise; ``read`` then reads the files.
        """
        recent = self.wal.recent_from(self.next_lsn, max_bytes, early=self.early)
        if not recent:
            return None
        last = recent[-1]
        if self._file is not None and self._segment_first == last.segment_first:
            self._offset = last.end_offset
        else:
            self.close()  # the next read from the files finds its place by lsn
        self.next_lsn = last.last_lsn + 1
        data = recent[0].data if len(recent) == 1 else b"".join(w.data for w in recent)
        return RawBatch(recent[0].first_lsn, last.last_lsn, last.last_term, last.last_chain, data)

    def backlog_bytes(self) -> int | None:
        """Bytes written but not yet read in this cursor's segment; None when unknown (no
        segment open yet, or the records continue in another segment)."""
        if self._file is None:
            return None
        end = self.wal.segment_end(self._segment_first)
        if end is None or end <= self._offset:
            return None
        return end - self._offset

    def read(self, max_bytes: int) -> RawBatch | None:
        """The next whole records written so far, at most ``max_bytes`` of them (or one record
        when it alone is larger); None when there is none yet.

        A batch ends where an atomic append ends whenever one fits, so a follower rarely has to
        hold the start of an append until the rest arrives. Raises WalGone when the records
        were removed, CorruptionError when a record fails its CRC.
        """
        return self.read_recent(max_bytes) or self.read_files(max_bytes)

    def read_files(self, max_bytes: int) -> RawBatch | None:
        """``read`` from the segment files only (the caller has looked in memory already)."""
        written = (self.wal.flushed_lsn if self.early else self.wal.written_lsn).value
        if self.next_lsn > written:
            return None
        if self._file is None:
            self._open_segment()
        assert self._file is not None
        end_offset = self.wal.segment_end(self._segment_first)
        if end_offset is None:
            raise WalGone(f"the segment holding lsn {self.next_lsn} was removed")
        if self._offset >= end_offset:
            # this segment is finished: the next lsn is in the following one
            self._open_segment()
            end_offset = self.wal.segment_end(self._segment_first) or 0
        available = max(end_offset - self._offset, 0)
        self._file.seek(self._offset)
        data = self._file.read(min(available, max(max_bytes, HEADER_BYTES)))
        if len(data) >= HEADER_BYTES:
            first_len = HEADER_BYTES + HEADER.unpack_from(data, 0)[0]
            if max_bytes < first_len <= available:
                data += self._file.read(first_len - len(data))  # one record beyond max_bytes
        pos = boundary = 0
        first = self.next_lsn
        lsn = first - 1
        last = (first - 1, 0, b"")  # (lsn, term, chain) of the last record taken
        at_boundary = last
        body_max = self.wal.limits.record_bytes_max
        view = memoryview(data)
        unpack = HEADER.unpack_from
        # the CRC of a record's length field, by length (record_crc's first step): records
        # are mostly of a few sizes, and this saves a slice and a call for each
        length_crcs: dict[int, int] = {}
        # never past the written end: beyond it a group is being written, or cut back after
        # a full disk, so the bytes there may change under this read
        while lsn < written and pos + HEADER_BYTES <= len(data):
            body_len, crc, rec_lsn, rec_term, left, rec_chain = unpack(data, pos)
            end = pos + HEADER_BYTES + body_len
            if body_len > body_max or end > len(data) or rec_lsn > written:
                break
            length_crc = length_crcs.get(body_len)
            if length_crc is None:
                length_crc = length_crcs[body_len] = crc32c(view[pos : pos + 4])
            if crc32c(view[pos + 8 : end], length_crc) != crc:
                raise CorruptionError(
                    f"WAL record lsn {rec_lsn} fails its CRC at offset {self._offset + pos}",
                    offset=self._offset + pos,
                )
            if rec_lsn != lsn + 1:
                raise CorruptionError(f"WAL lsn {rec_lsn} where {lsn + 1} was expected")
            lsn = rec_lsn
            last = (rec_lsn, rec_term, rec_chain)
            pos = end
            if left == 0:
                boundary, at_boundary = pos, last
        if lsn < first:
            return None
        if 0 < boundary < pos:
            pos, last = boundary, at_boundary  # end on the last whole append that fitted
        self._offset += pos
        self.next_lsn = last[0] + 1
        return RawBatch(first, last[0], last[1], last[2], data[:pos])
