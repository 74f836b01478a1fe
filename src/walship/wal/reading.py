"""The WAL's read side: records back from the segment files, and what was just written
from memory. ``Wal`` inherits it; only records the writer has finished writing are read."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from walship.errors import CorruptionError, InvalidInput
from walship.limits import Limits
from walship.position import Lsn
from walship.wal.record import Record, RecordIncomplete, RecordInvalid, decode_record
from walship.wal.segment import SEGMENT_HEADER_BYTES, SegmentHeader
from walship.wal.types import RecentWrite


@dataclass(slots=True)
class _Segment:
    first_lsn: int
    path: Path
    bytes: int
    sparse_index: list[tuple[int, int]]  # (lsn, offset) every ~256 KiB, for readers


def _first_lsn(write: RecentWrite) -> int:
    return write.first_lsn


class WalReader:
    """Reading methods of ``Wal``; the attributes below are the writer's, read under ``_lock``."""

    limits: Limits
    _lock: threading.Lock
    _segments: list[_Segment]
    _written_lsn: int
    _flushed_lsn: int
    _recent: list[RecentWrite]

    def recent_from(self, lsn: int, max_bytes: int, *, early: bool = False) -> list[RecentWrite]:
        """The writes still in memory that start exactly at ``lsn`` and follow each other,
        at most ``max_bytes`` together; empty when ``lsn`` is not where one starts (the
        caller then reads the files). Only records up to ``written_lsn`` are returned, or up
        to ``flushed_lsn`` (in the file, maybe not yet fsynced) when ``early``."""
        with self._lock:
            recent = self._recent
            limit = self._flushed_lsn if early else self._written_lsn
            k = bisect.bisect_left(recent, lsn, key=_first_lsn)
            out: list[RecentWrite] = []
            size = 0
            while k < len(recent) and recent[k].first_lsn == lsn:
                w = recent[k]
                if size + len(w.data) > max_bytes or w.last_lsn > limit:
                    break
                out.append(w)
                size += len(w.data)
                lsn = w.last_lsn + 1
                k += 1
            return out

    def first_lsn(self) -> Lsn:
        """The lowest lsn still held in the WAL (may be one past the end when it is empty)."""
        with self._lock:
            return Lsn(self._segments[0].first_lsn)

    def segment_infos(self) -> list[tuple[int, Path, int]]:
        """``(first_lsn, path, bytes)`` of each segment, oldest first."""
        with self._lock:
            return [(s.first_lsn, s.path, s.bytes) for s in self._segments]

    def sparse_index(self, first_lsn: int) -> list[tuple[int, int]]:
        """``(lsn, offset)`` samples of the segment starting at ``first_lsn`` (may be empty)."""
        with self._lock:
            for seg in self._segments:
                if seg.first_lsn == first_lsn:
                    return list(seg.sparse_index)
        return []

    def segment_end(self, first_lsn: int) -> int | None:
        """Bytes written to the segment starting at ``first_lsn``; None once it is removed."""
        with self._lock:
            for seg in self._segments:
                if seg.first_lsn == first_lsn:
                    return seg.bytes
        return None

    def read_from(self, lsn: Lsn | int, *, max_bytes: int | None = None) -> Iterator[Record]:
        """Records from ``lsn`` up to what the writer has written, verified, in order.

        Raises InvalidInput when ``lsn`` is older than the oldest retained segment. Stops after
        ``max_bytes`` of records (at least one record is returned when any is available).
        """
        start = int(lsn)
        with self._lock:
            segments = list(self._segments)
            limit = self._written_lsn
        if start < segments[0].first_lsn:
            raise InvalidInput(
                f"lsn {start} is no longer in the WAL (oldest retained is {segments[0].first_lsn})"
            )
        firsts = [s.first_lsn for s in segments]
        idx = max(bisect.bisect_right(firsts, start) - 1, 0)
        total = 0
        for seg in segments[idx:]:
            if seg.first_lsn > limit:
                return  # created by a group still being written (or being rolled back)
            for rec in self._iter_segment(seg, start, limit):
                if rec.lsn < start:
                    continue
                yield rec
                total += len(rec.raw)
                if max_bytes is not None and total >= max_bytes:
                    return

    def _iter_segment(
        self, seg: _Segment, from_lsn: int, upto_lsn: int | None = None
    ) -> Iterator[Record]:
        """Records of ``seg`` from about ``from_lsn`` (the sparse index's sample before it),
        stopping after ``upto_lsn``: past it the writer may be writing, or cutting back."""
        offset = SEGMENT_HEADER_BYTES
        if seg.sparse_index:
            lsns = [entry[0] for entry in seg.sparse_index]
            k = bisect.bisect_right(lsns, from_lsn) - 1
            if k >= 0:
                offset = seg.sparse_index[k][1]
        with open(seg.path, "rb") as f:
            f.seek(offset)
            data = f.read(max(seg.bytes - offset, 0))
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            try:
                rec = decode_record(view, pos, self.limits.record_bytes_max)
            except (RecordIncomplete, RecordInvalid) as exc:
                raise CorruptionError(
                    f"{seg.path} at offset {offset + pos}: {exc}",
                    file=str(seg.path),
                    offset=offset + pos,
                ) from exc
            yield rec
            if upto_lsn is not None and rec.lsn >= upto_lsn:
                return
            pos += len(rec.raw)

    @staticmethod
    def _read_header(seg: _Segment) -> SegmentHeader:
        with open(seg.path, "rb") as f:
            return SegmentHeader.decode(f.read(SEGMENT_HEADER_BYTES), seg.path)

    def _record_before(self, lsn: int) -> tuple[int, bytes]:
        """(term, chain) of record ``lsn - 1``, read back from the active segment's tail."""
        for rec in self._iter_segment(self._segments[-1], lsn - 1):
            if rec.lsn == lsn - 1:
                return rec.term, rec.chain
        header = self._read_header(self._segments[-1])
        return header.prev_term, header.prev_chain
