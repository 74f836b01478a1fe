"""Cutting a closed WAL back to an lsn (divergence repair), crash-safe.

The cut is announced first by an intent file (``TRUNCATE_AFTER``, holding the lsn, written
tmp → fsync → rename → fsync dir); then later segments are removed newest first, the segment
holding the cut is truncated and fsynced, the term history forgets terms that start after the
cut, and the intent file goes. ``Wal.open`` calls ``finish_truncation`` before it scans, so a
crash at any step is completed on the next start and the log never mixes the old tail with a
term history that no longer describes it. Every step is idempotent.
"""

from __future__ import annotations

import os
from pathlib import Path

from walship.errors import CorruptionError, InvalidInput
from walship.fsutil import atomic_write, fsync_dir
from walship.position import Lsn
from walship.wal.record import RecordIncomplete, RecordInvalid, decode_record
from walship.wal.segment import SEGMENT_HEADER_BYTES, list_segments, preallocate, zero_tail
from walship.wal.terms import TermHistory

MARKER = "TRUNCATE_AFTER"


def truncate_wal(directory: Path, lsn: int, body_bytes_max: int) -> None:
    """Remove every record after ``lsn`` from the (closed) WAL in ``directory``.

    InvalidInput when the WAL no longer holds lsn ``lsn + 1``'s segment (the cut is below
    its oldest segment: checkpoints removed that part, so it cannot be cut here).
    """
    segments = list_segments(directory)
    if not segments or segments[0][0] > lsn + 1:
        oldest = segments[0][0] if segments else None
        raise InvalidInput(
            f"cannot cut the WAL after lsn {lsn}: its oldest segment starts at {oldest}"
        )
    atomic_write(directory / MARKER, str(lsn).encode())
    finish_truncation(directory, body_bytes_max)


def finish_truncation(directory: Path, body_bytes_max: int) -> int | None:
    """Complete a cut announced by the intent file; the lsn cut after, None when none was."""
    marker = directory / MARKER
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise CorruptionError(f"{marker}: unreadable truncation intent {text!r}")
    lsn = int(text)
    segments = list_segments(directory)
    removed = False
    for first, path in reversed(segments):
        if first > lsn + 1:
            path.unlink()
            removed = True
    if removed:
        fsync_dir(directory)
    kept = [(first, path) for first, path in segments if first <= lsn + 1]
    if kept:
        _cut_segment(kept[-1][1], lsn, body_bytes_max)
    TermHistory.load(directory).truncate_after(Lsn(lsn))
    marker.unlink()
    fsync_dir(directory)
    return lsn


def _cut_segment(path: Path, lsn: int, body_bytes_max: int) -> None:
    """Truncate ``path`` just before record ``lsn + 1`` (a no-op when it ends before it)."""
    buf = path.read_bytes()
    view = memoryview(buf)
    offset = SEGMENT_HEADER_BYTES
    cut_at: int | None = None
    while offset < len(buf):
        if buf[offset] == 0 and zero_tail(buf, offset):
            break  # preallocated space: the records end before the cut
        try:
            rec = decode_record(view, offset, body_bytes_max)
        except (RecordIncomplete, RecordInvalid):
            cut_at = offset  # a torn tail: it goes too
            break
        if rec.lsn > lsn:
            cut_at = offset
            break
        offset += len(rec.raw)
    if cut_at is None or cut_at >= len(buf):
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, cut_at)
        preallocate(fd, len(buf))  # zeros again where the cut records were: the clean end
        os.fsync(fd)
    finally:
        os.close(fd)
