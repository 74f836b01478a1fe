"""The group-committing write-ahead log.

``Wal.append`` assigns lsns under one lock, encodes records (CRC + chain) in lsn order and
hands them to a single writer thread, which joins everything pending into one ``write`` and one
``fdatasync`` (group commit). Each append gets a future that resolves once its records are as
durable as the fsync policy makes them. Readers read records back from the segment files on
disk, from any lsn; they only see records the writer has finished writing.

A full disk (ENOSPC or EDQUOT while writing a group, rolling to a new segment or creating one)
is not fatal: the writer rolls the whole group back -- segments it created are deleted, the
active segment is cut back to where the group began and fsynced, the lsn counter, term and
chain return to the last written record, every append queued behind the group fails too (it
was given lsns above), and ``on_rollback`` lets the store forget what it indexed for them. The
WAL is then *full*: appends are refused with StorageFull at once, without taking lsns, until
the writer's probe (every ``storage_full_probe_ms``) can allocate as much as the failed group
needed; then writes resume at the next lsn, the chain continuing from the last written record.

Any other I/O error, and any error from ``fdatasync``, fails the WAL for good (the
"fsyncgate" lesson: after a failed fsync the kernel may have dropped the dirty pages, so it is
never retried as if the data were safe); the node must be restarted, and recovery decides what
the log holds.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from walship.errors import CorruptionError, InvalidInput, StorageFull, WalFailed, invariant
from walship.fsutil import fsync_dir
from walship.limits import DEFAULT_LIMITS, Limits
from walship.position import LogPoint, Lsn, Position, Term
from walship.wal.fsync_hold import FsyncHold
from walship.wal.group import (
    Pending,
    WholeUnits,
    first_lsn,
    fit_first,
    index_sparse,
    joined,
    last_position,
    plan_units,
)
from walship.wal.reading import WalReader, _Segment
from walship.wal.record import (
    GENESIS_CHAIN,
    TERM_MAX,
    Record,
    encode_records,
)
from walship.wal.segment import (
    SEGMENT_HEADER_BYTES,
    SPARSE_INDEX_BYTES,
    SegmentHeader,
    SegmentScan,
    create_segment,
    list_segments,
    preallocate,
    scan_segment,
)
from walship.wal.shipped import ShippedAppends
from walship.wal.terms import TermHistory
from walship.wal.truncate import finish_truncation
from walship.wal.types import (
    AppendResult,
    FsyncMode,
    FsyncPolicy,
    RecentWrite,
    RollbackListener,
    WalListener,
    WalStatus,
    WriteOutcome,
)

__all__ = [
    "AppendResult",
    "FsyncMode",
    "FsyncPolicy",
    "RecentWrite",
    "RollbackListener",
    "Wal",
    "WalListener",
    "WalStatus",
    "WriteOutcome",
]

log = logging.getLogger(__name__)

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""Errors of a full disk or quota: the failed group is rolled back and writes resume later."""

PROBE_FILE = "space-probe.wal.tmp"
"""Allocated and removed by the free-space probe (``*.wal.tmp``: a crash leaves it to open)."""


@dataclass(frozen=True, slots=True)
class _GroupStart:
    """Where the log stood when the writer took a group: what a rollback returns to."""

    active: _Segment
    bytes: int
    indexed: int  # length of the active segment's sparse index


class _FsyncFailed(Exception):
    """``fdatasync`` of a file holding log records failed: always fatal (fsyncgate)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


RECENT_WRITES_MAX = 64
RECENT_BYTES_MAX = 16 << 20
"""How much of what was just written stays in memory for tailing cursors."""


class Wal(WalReader, ShippedAppends):
    """A directory of segments with one writer thread. Thread-safe."""

    def __init__(
        self,
        directory: Path,
        terms: TermHistory,
        segments: list[_Segment],
        last: SegmentScan | None,
        fsync: FsyncPolicy,
        limits: Limits,
        on_commit: Callable[[int, int, float], None] | None,
        on_rollback: RollbackListener | None = None,
    ) -> None:
        self.directory = directory
        self.terms = terms
        self.fsync = fsync
        self.limits = limits
        self._segments = segments
        self._on_commit = on_commit  # (records, bytes, fsync_seconds) for metrics
        self._on_rollback = on_rollback
        self._lock = threading.Lock()
        # held while the active segment's descriptor is fsynced from outside the writer, or
        # replaced by the writer: an fdatasync never meets a closed (or reused) descriptor,
        # and never holds ``_lock``, which readers on an event loop take
        self._fd_lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._space = threading.Condition(self._lock)
        self._pending: list[Pending] = []
        self._pending_bytes = 0
        self._pending_records = 0  # a WholeUnits is one element of many records
        self._pending_future: Future[WriteOutcome] = Future()
        self._listeners: list[WalListener] = []
        self._failed: WalFailed | StorageFull | None = None
        self._full: StorageFull | None = None  # refusing appends until the probe finds space
        self._full_need_bytes = 0
        self._inflight: Future[WriteOutcome] | None = None  # the group the writer is writing
        self._recent: list[RecentWrite] = []  # the last writes, oldest first (see recent_from)
        self._recent_bytes = 0
        self.rollback_seq = 0
        """Odd while a full-disk rollback is under way (the WAL and then the store undo it),
        two more for each one done: a checkpoint that sees it odd or changed retries."""
        self._closing = False
        if last is not None:
            self._last_lsn = last.last_lsn
            self._last_term = last.last_term
            self._last_chain = last.last_chain
        else:
            self._last_lsn, self._last_term, self._last_chain = 0, 0, GENESIS_CHAIN
        # the last record the writer has written: where a rolled-back group returns to
        self._written_term, self._written_chain = self._last_term, self._last_chain
        self._written_lsn = self._last_lsn
        # written to the file, maybe not yet fsynced: what may be shipped early (see flushed_lsn)
        self._flushed_lsn = self._last_lsn
        self._flush_listeners: list[WalListener] = []
        self.fsync_hold = FsyncHold.from_env()  # tests only
        self._synced_lsn = self._last_lsn
        self._last_sync = time.monotonic()
        self._sync_wanted = False  # a queued run must be fsynced whatever the policy
        active = self._segments[-1]
        # writes go at explicit offsets (pwrite): the file is preallocated past its records
        self._fd = os.open(active.path, os.O_WRONLY)
        # what recovery read may be only in the page cache (a process killed before its
        # fsync): make it durable before anything counts it as synced or ships it as such
        os.fdatasync(self._fd)
        preallocate(self._fd, self.limits.segment_bytes_max)
        self._writer = threading.Thread(
            target=self._run_writer, name="walship-wal-writer", daemon=True
        )
        self._writer.start()

    # ------------------------------------------------------------------ opening and recovery

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        fsync: FsyncPolicy | None = None,
        limits: Limits = DEFAULT_LIMITS,
        start: tuple[int, int, bytes] | None = None,
        on_record: Callable[[Record], None] | None = None,
        on_commit: Callable[[int, int, float], None] | None = None,
        on_rollback: RollbackListener | None = None,
    ) -> Wal:
        """Open (creating if empty) and recover the WAL in ``directory``.

        Every record is verified (CRC, lsn continuity, chain). A torn tail of the last segment
        is truncated away; damage anywhere else raises CorruptionError naming file and offset.
        ``start = (last_lsn, last_term, chain)`` is where a new, empty WAL begins (after a
        snapshot); the default is the beginning of history. ``on_record`` sees each record in
        order during recovery. ``on_rollback`` hears of groups a full disk rolled back.
        """
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.wal.tmp"):
            stale.unlink()
        # a cut by divergence repair that a crash interrupted is finished before anything else
        finish_truncation(directory, limits.record_bytes_max)
        terms = TermHistory.load(directory)
        found = list_segments(directory)
        body_max = limits.record_bytes_max
        if not found:
            last_lsn, last_term, chain = start if start is not None else (0, 0, GENESIS_CHAIN)
            create_segment(directory, SegmentHeader(last_lsn + 1, last_term, chain))
            found = list_segments(directory)
        segments: list[_Segment] = []
        scan: SegmentScan | None = None
        for i, (_, path) in enumerate(found):
            scan = scan_segment(
                path,
                expected_first_lsn=None if scan is None else scan.last_lsn + 1,
                expected_prev_chain=None if scan is None else scan.last_chain,
                is_last=i == len(found) - 1,
                body_bytes_max=body_max,
                on_record=on_record,
            )
            if scan.torn_tail is not None:
                _truncate(path, scan.valid_bytes)
            segments.append(
                _Segment(scan.header.first_lsn, path, scan.valid_bytes, scan.sparse_index)
            )
        assert scan is not None
        for seg_a, seg_b in itertools.pairwise(segments):
            if seg_a.bytes == SEGMENT_HEADER_BYTES and seg_a.first_lsn != seg_b.first_lsn:
                raise CorruptionError(f"{seg_a.path}: empty segment in the middle of the log")
        # a term start saved for records a crash (or a full disk) kept from the files: the
        # next lsn may start a term (a promotion), nothing after it can
        terms.truncate_after(Lsn(scan.last_lsn + 1))
        if scan.last_term > terms.current.value:
            raise CorruptionError(
                f"{directory}: records of term {scan.last_term} but the term history ends at "
                f"{terms.current.value}"
            )
        wal = cls(
            directory, terms, segments, scan, fsync or FsyncPolicy(), limits, on_commit, on_rollback
        )
        wal.torn_tail = scan.torn_tail
        return wal

    torn_tail: str | None = None
    """Set after ``open`` when recovery truncated a torn tail (for logs and tests)."""

    # ------------------------------------------------------------------ appending

    @property
    def last_position(self) -> Position:
        with self._lock:
            return Position(Term(self._last_term), Lsn(self._last_lsn))

    @property
    def last_chain(self) -> bytes:
        with self._lock:
            return self._last_chain

    @property
    def last_point(self) -> LogPoint:
        """The last record's term, lsn and chain, read together (never from two appends)."""
        with self._lock:
            return LogPoint(Term(self._last_term), Lsn(self._last_lsn), self._last_chain)

    @property
    def written_lsn(self) -> Lsn:
        return Lsn(self._written_lsn)

    @property
    def synced_lsn(self) -> Lsn:
        return Lsn(self._synced_lsn)

    @property
    def flushed_lsn(self) -> Lsn:
        """The last lsn written to the files, before the fsync that makes it ``written_lsn``
        under ``always``: what a leader may ship early, never what it may acknowledge, show or
        call durable (a power loss before that fsync takes it back)."""
        return Lsn(self._flushed_lsn)

    def add_flush_listener(self, listener: WalListener) -> None:
        """Call ``listener(flushed_lsn)`` from the writer thread after each group is written,
        before its fsync."""
        with self._lock:
            self._flush_listeners.append(listener)

    def remove_flush_listener(self, listener: WalListener) -> None:
        with self._lock:
            if listener in self._flush_listeners:
                self._flush_listeners.remove(listener)

    @property
    def closing(self) -> bool:
        """True once ``close`` has begun."""
        return self._closing

    @property
    def failed(self) -> WalFailed | StorageFull | None:
        """Why appends are refused: WalFailed for good, StorageFull while the disk is full."""
        return self._failed or self._full

    def begin_term(self, term: Term) -> None:
        """Start writing records of ``term`` from the next lsn (persisted first).

        Whatever is queued is written first: a term then always starts right after the
        written end, which is what a full-disk rollback returns to and keeps.
        """
        if self._last_lsn > self._written_lsn:
            self.sync()
        with self._lock:
            self.terms.start(term, Lsn(self._last_lsn + 1))

    def append(self, bodies: Sequence[bytes]) -> AppendResult:
        """Assign the next lsns to ``bodies`` (in order) and queue them for group commit.

        Raises WalFailed once the WAL has failed,
        StorageFull (taking no lsns) while the disk is full, and InvalidInput for an oversized
        body.
        """
        term = self.terms.current.value
        invariant(0 < term <= TERM_MAX, "no term started: begin_term must run first")
        body_max = self.limits.record_bytes_max
        for body in bodies:
            if len(body) > body_max:
                raise InvalidInput(f"record of {len(body)} bytes exceeds the WAL record limit")
        with self._lock:
            self._wait_for_space()
            first = self._last_lsn + 1
            chain = self._last_chain
            # one buffer, and where each record starts in it: the writer indexes and packs
            # the append from these instead of reading every record's header again
            data, starts, chains = encode_records(first, term, chain, bodies)
            added = len(data)
            if chains:
                chain = chains[-1]
                last = first + len(bodies) - 1
                self._pending.append(
                    WholeUnits([data], starts, [len(chains)], first, (last, term, chain))
                )
            self._pending_bytes += added
            self._pending_records += len(bodies)
            self._last_lsn = first + len(bodies) - 1
            self._last_term = term
            self._last_chain = chain
            result = AppendResult(
                Lsn(first), Lsn(self._last_lsn), Term(term), chains, self._pending_future
            )
            self._wake.notify()
        return result

    def backlogged(self) -> bool:
        """True when an append would wait for the writer to drain (backpressure)."""
        return self._pending_records >= self.limits.pending_appends_max

    def _wait_for_space(self) -> None:
        """Backpressure: block while too much is pending; raise if the WAL has failed or the
        disk is full (a fresh error each time: re-raising one instance grows its traceback)."""
        deadline = time.monotonic() + 30
        while True:
            if self._failed is not None:
                raise self._failed
            if self._closing:
                raise WalFailed("the WAL is closed")
            if self._full is not None:
                raise StorageFull(self._full.message)
            if self._pending_records < self.limits.pending_appends_max:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WalFailed("the WAL writer made no progress for 30 s")
            self._space.wait(remaining)

    def append_future(self) -> Future[WriteOutcome]:
        """A future that resolves once everything appended so far has been written (fails
        when that write fails: the group being written counts too)."""
        with self._lock:
            if self._pending:
                return self._pending_future
            if self._inflight is not None:
                return self._inflight
            done: Future[WriteOutcome] = Future()
            done.set_result(WriteOutcome(self._written_lsn, self._synced_lsn >= self._written_lsn))
            return done

    def sync(self) -> int:
        """Write and fsync everything appended so far; returns the synced lsn.

        Raises StorageFull when a full disk rolled some of it back, WalFailed when the WAL
        failed (a failed fsync fails it for good).
        """
        with self._lock:
            target = self._last_lsn
            fut = self._pending_future if self._pending else self._inflight
        if fut is not None:
            fut.result()
        with self._lock:
            if self._failed is not None:
                raise self._failed
            if self._written_lsn < target:
                raise StorageFull(
                    f"lsn {self._written_lsn + 1}..{target} were rolled back: no space left for "
                    f"the WAL in {self.directory}"
                )
            if self._synced_lsn >= target and self.fsync.mode is FsyncMode.ALWAYS:
                return self._synced_lsn
            written = self._written_lsn
        self._sync_written(written)
        return self._synced_lsn

    def _sync_written(self, written: int) -> None:
        """fdatasync the active segment (holding ``_fd_lock``, not ``_lock``); everything up to
        ``written`` is then durable. Any error fails the WAL for good (fsyncgate)."""
        with self._fd_lock:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                with self._lock:
                    self._failed = _fsync_error(exc, self.directory)
                    self._space.notify_all()
                raise self._failed from exc
        with self._lock:
            self._synced_lsn = max(self._synced_lsn, written)

    def add_listener(self, listener: WalListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    @property
    def listeners(self) -> list[WalListener]:
        """The commit listeners (a copy), to carry over to a WAL reopened in its place."""
        with self._lock:
            return list(self._listeners)

    def remove_listener(self, listener: WalListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    # ------------------------------------------------------------------ the writer thread

    def _run_writer(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing and self._full is None:
                    timeout = self._idle_timeout()
                    self._wake.wait(timeout)
                    if timeout is not None and not self._pending:
                        self._maybe_interval_sync_locked()
                if not self._pending:
                    if self._closing or self._failed is not None:
                        return
                    # full: appends are refused, so nothing is queued; look for space now and then
                    self._wake.wait(self.limits.storage_full_probe_ms / 1000)
                    need = self._full_need_bytes
                    batch = None
                else:
                    batch, future = self._pending, self._pending_future
                    must_sync, self._sync_wanted = self._sync_wanted, False
                    nbytes, nrecords = self._pending_bytes, self._pending_records
                    self._pending, self._pending_bytes, self._pending_records = [], 0, 0
                    self._pending_future = Future()
                    self._inflight = future
                    start = _GroupStart(
                        self._segments[-1],
                        self._segments[-1].bytes,
                        len(self._segments[-1].sparse_index),
                    )
                    self._space.notify_all()
            if batch is None:
                if not self._closing:
                    self._probe_space(need)
                continue
            try:
                outcome, fsync_s = self._write_batch(batch, must_sync)
            except _FsyncFailed as exc:
                self._fail_for_good(_fsync_error(exc.error, self.directory), future)
                return
            except OSError as exc:
                if exc.errno not in NO_SPACE_ERRNOS:
                    self._fail_for_good(_io_error(exc, self.directory), future)
                    return
                if not self._roll_back(start, nbytes, future, exc):
                    return  # the undo failed: the WAL has failed for good
                continue
            future.set_result(outcome)
            if self._on_commit is not None:
                self._on_commit(nrecords, nbytes, fsync_s)
            for listener in list(self._listeners):
                try:
                    listener(outcome.lsn)
                except Exception:
                    pass

    def _forget_recent_locked(self) -> None:
        self._recent = []
        self._recent_bytes = 0

    def _fail_for_good(self, err: WalFailed, future: Future[WriteOutcome]) -> None:
        """Stop the WAL: the group being written and everything queued fail with ``err``."""
        with self._lock:
            self._failed = err
            pending_future = self._pending_future
            self._inflight = None
            self._space.notify_all()
        if not future.done():
            future.set_exception(err)
        pending_future.set_exception(err)

    def _idle_timeout(self) -> float | None:
        if self.fsync.mode is FsyncMode.INTERVAL and self._synced_lsn < self._written_lsn:
            return self.fsync.interval_ms / 1000
        return None

    def _maybe_interval_sync_locked(self) -> None:
        """Writer thread, holding ``_lock``: fsync what ``interval`` left unsynced. The lock is
        let go during the fdatasync, so readers are not held up by it."""
        if self._synced_lsn < self._written_lsn and self._failed is None:
            written = self._written_lsn
            self._lock.release()
            try:
                self._sync_written(written)
            except WalFailed:
                return
            finally:
                self._lock.acquire()
            self._last_sync = time.monotonic()

    def _write_batch(self, batch: list[Pending], must_sync: bool) -> tuple[WriteOutcome, float]:
        """Write a group to the active segment(s), rolling over as needed, then fsync per policy
        (or at once when ``must_sync``: the group holds replicated records).

        An atomic append (records up to one with ``batch_left == 0``) never spans two
        segments, so recovery can always drop a torn one within the last segment. Raises
        OSError from a write or a new segment (the caller rolls back on a full disk) and
        _FsyncFailed from an fsync.
        """
        seg_max = self.limits.segment_bytes_max
        units = plan_units(batch)  # (start, end, bytes) of each atomic append
        fsync_s = 0.0
        chunks: list[RecentWrite] = []  # what was written where, for tailing cursors
        u = 0
        while u < len(units):
            active = self._segments[-1]
            room = seg_max - active.bytes
            if fit_first(batch, units[u][0], room):
                units = plan_units(batch)  # one element became two: the indexes move
            v, size = u, 0
            while v < len(units) and (
                size + units[v][2] <= room or (v == u and active.bytes == SEGMENT_HEADER_BYTES)
            ):
                size += units[v][2]
                v += 1
            if v == u:
                fsync_s += self._roll_segment(batch[units[u][0]])
                continue
            i, j = units[u][0], units[v - 1][1]
            data = joined(batch[i:j])
            self._write_all(data, active, batch[i:j])
            chunk_last, chunk_term, chunk_chain = last_position(batch[j - 1])
            chunks.append(
                RecentWrite(
                    first_lsn(batch[i]),
                    chunk_last,
                    chunk_term,
                    chunk_chain,
                    data,
                    active.first_lsn,
                    active.bytes,
                )
            )
            u = v
        last_lsn, last_term, last_chain = last_position(batch[-1])
        with self._lock:
            # in the file now: tailing cursors may read it, bounded by the end they may ship
            # (written_lsn, or flushed_lsn for a leader that ships before its fsync)
            self._flushed_lsn = last_lsn
            recent = self._recent
            for chunk in chunks:
                recent.append(chunk)
                self._recent_bytes += len(chunk.data)
            while len(recent) > RECENT_WRITES_MAX or self._recent_bytes > RECENT_BYTES_MAX:
                self._recent_bytes -= len(recent.pop(0).data)
            flush_listeners = self._flush_listeners
        for listener in list(flush_listeners):
            try:
                listener(last_lsn)
            except Exception:
                pass
        synced = False
        if (
            must_sync
            or self.fsync.mode is FsyncMode.ALWAYS
            or (
                self.fsync.mode is FsyncMode.INTERVAL
                and (time.monotonic() - self._last_sync) * 1000 >= self.fsync.interval_ms
            )
        ):
            self.fsync_hold.wait()
            t0 = time.perf_counter()
            _fdatasync(self._fd)
            fsync_s += time.perf_counter() - t0
            self._last_sync = time.monotonic()
            synced = True
        with self._lock:
            self._written_lsn = last_lsn
            self._written_term, self._written_chain = last_term, last_chain
            self._inflight = None  # written: whoever asks from now on needs no future
            if synced:
                self._synced_lsn = last_lsn
        return WriteOutcome(last_lsn, synced or self._synced_lsn >= last_lsn), fsync_s

    def _write_all(self, data: bytes, active: _Segment, records: list[Pending]) -> None:
        offset = active.bytes
        view = memoryview(data)
        at = offset
        while view:
            n = os.pwrite(self._fd, view, at)
            view = view[n:]
            at += n
        # sparse index for readers, one entry every ~256 KiB
        active.bytes = index_sparse(active.sparse_index, records, offset, SPARSE_INDEX_BYTES)

    def _roll_segment(self, next_record: Pending) -> float:
        """Close the active segment (fsynced) and start a new one before ``next_record``."""
        t0 = time.perf_counter()
        # cut the finished segment's unused preallocated space, then make it all durable
        os.ftruncate(self._fd, self._segments[-1].bytes)
        _fdatasync(self._fd)
        elapsed = time.perf_counter() - t0
        lsn = first_lsn(next_record)
        prev = self._record_before(lsn)
        path = create_segment(
            self.directory, SegmentHeader(lsn, prev[0], prev[1]), self.limits.segment_bytes_max
        )
        fd = os.open(path, os.O_WRONLY)  # before closing the old one: _fd stays valid on error
        with self._fd_lock:
            os.close(self._fd)
            self._fd = fd
        with self._lock:
            self._segments.append(_Segment(lsn, path, SEGMENT_HEADER_BYTES, []))
        return elapsed

    # ------------------------------------------------------------------ a full disk

    def _roll_back(
        self, start: _GroupStart, nbytes: int, future: Future[WriteOutcome], cause: OSError
    ) -> bool:
        """Undo a group that ran out of space; False when the undo failed (the WAL is failed).

        Files first, so that a crash at any point leaves a log recovery reads as it is:
        segments holding only lsns of the group are deleted (and the directory fsynced), then
        the active segment is cut back to where the group began and fsynced. The files then
        end exactly at the last written record; nothing of the group is left for recovery or a
        reader to take for a record. Then the lsn counter, term and chain return to that
        record, appends queued behind the group fail with it (their lsns were above it),
        ``on_rollback`` runs, and appends are refused until ``_probe_space`` finds room.
        Callers hear of the failure last, when nothing of the group can be seen any more.
        """
        written = self._written_lsn
        with self._lock:
            kept = [seg for seg in self._segments if seg.first_lsn <= written + 1]
        invariant(bool(kept), "a rollback would leave the WAL without a segment")
        active = kept[-1]
        # a segment created by this group is kept only when it starts right after the last
        # written record (retention may have removed the one before it): then it is empty
        keep_bytes = start.bytes if active is start.active else SEGMENT_HEADER_BYTES
        try:
            removed = False
            for first, path in list_segments(self.directory):
                if first > active.first_lsn:
                    path.unlink(missing_ok=True)
                    removed = True
            for stale in self.directory.glob("*.wal.tmp"):  # a new segment that failed midway
                stale.unlink(missing_ok=True)
                removed = True
            if removed:
                fsync_dir(self.directory)
            fd = os.open(active.path, os.O_WRONLY)
            with self._fd_lock:
                os.close(self._fd)
                self._fd = fd
            os.ftruncate(fd, keep_bytes)
            _fdatasync(fd)
        except (OSError, _FsyncFailed) as exc:
            self._fail_for_good(
                WalFailed(
                    f"no space left for the WAL in {self.directory}, and undoing the failed "
                    f"write failed too ({exc}); restart the node to recover"
                ),
                future,
            )
            return False
        self.rollback_seq += 1  # odd: under way (see rollback_seq)
        full = StorageFull(
            f"no space left for the WAL in {self.directory} ({cause.strerror}): writes are "
            f"refused until space is freed (checked every {self.limits.storage_full_probe_ms} ms)"
        )
        with self._lock:
            self._forget_recent_locked()  # only written groups are in it; cleared all the same
            self._segments = [seg for seg in self._segments if seg.first_lsn <= written + 1]
            active.bytes = keep_bytes
            del active.sparse_index[start.indexed if active is start.active else 0 :]
            self._last_lsn, self._last_term = written, self._written_term
            self._last_chain = self._written_chain
            self._flushed_lsn = written
            queued = self._pending_future
            self._pending, self._pending_bytes, self._pending_records = [], 0, 0
            self._pending_future = Future()
            self._full = full
            self._full_need_bytes = min(nbytes, self.limits.segment_bytes_max)
            self._synced_lsn = max(self._synced_lsn, written)  # the fdatasync above covers it
            # a term that started in the rolled-back records (a follower's) starts nowhere now;
            # one begun right after the written end (a promotion) stays
            try:
                self.terms.truncate_after(Lsn(written + 1))
            except OSError:
                # the disk is full: the file keeps the start until the next save, or until the
                # next open trims what lies past the log's end
                log.warning("WAL: could not save the term history after a rollback")
            self._space.notify_all()
        log.warning(
            "WAL: %s; rolled back a group of %d bytes after lsn %d", full.message, nbytes, written
        )
        if self._on_rollback is not None:
            try:
                self._on_rollback(written)
            except Exception as exc:
                log.exception("WAL: a rollback listener failed")
                err = WalFailed(
                    f"no space left for the WAL in {self.directory}, and the store could not "
                    f"undo the failed write ({exc!r}); restart the node to recover"
                )
                queued.set_exception(err)
                self._fail_for_good(err, future)
                return False
        self.rollback_seq += 1  # even again: the store has forgotten the events too
        error = StorageFull(full.message)
        future.set_exception(error)
        queued.set_exception(error)
        with self._lock:
            self._inflight = None
        return True

    def _probe_space(self, need: int) -> None:
        """Take appends again once ``need`` bytes (what the failed group needed) can be
        allocated in the WAL directory: they are allocated in a scratch file, which is then
        removed, and the active segment is preallocated again (best effort)."""
        path = self.directory / PROBE_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _allocate(fd, need)
            finally:
                os.close(fd)
                os.unlink(path)
        except OSError as exc:
            if exc.errno not in NO_SPACE_ERRNOS:
                log.debug("WAL: the free-space probe failed: %s", exc)
            return
        preallocate(self._fd, self.limits.segment_bytes_max)
        with self._lock:
            if self._failed is None:
                self._full = None
        log.warning("WAL: space for writes in %s is back; taking writes again", self.directory)

    # ------------------------------------------------------------------ retention

    def remove_segments_through(self, lsn: Lsn) -> list[Path]:
        """Delete segments whose every record is at or below ``lsn``; never the active one.

        The caller decides ``lsn`` (checkpointed and released by every retention slot).
        Returns the removed paths.
        """
        removed: list[Path] = []
        with self._lock:
            while len(self._segments) > 1 and self._segments[1].first_lsn - 1 <= int(lsn):
                removed.append(self._segments.pop(0).path)
            if removed:
                # what is gone from the files is gone for cursors too (they need a snapshot)
                oldest = self._segments[0].first_lsn
                kept = [w for w in self._recent if w.first_lsn >= oldest]
                self._recent = kept
                self._recent_bytes = sum(len(w.data) for w in kept)
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            from walship.fsutil import fsync_dir

            fsync_dir(self.directory)
        return removed

    def status(self) -> WalStatus:
        with self._lock:
            return WalStatus(
                last_lsn=self._last_lsn,
                last_term=self._last_term,
                written_lsn=self._written_lsn,
                synced_lsn=self._synced_lsn,
                segments=len(self._segments),
                bytes=sum(s.bytes for s in self._segments),
                failed=None if self.failed is None else self.failed.message,
            )

    def close(self) -> None:
        """Write and fsync what is pending, stop the writer, close the file. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify_all()
        self._writer.join()
        with self._lock:
            if self._failed is None:
                try:
                    # give back the preallocated space: a closed WAL ends at its last record
                    os.ftruncate(self._fd, self._segments[-1].bytes)
                    os.fdatasync(self._fd)
                    self._synced_lsn = self._written_lsn
                except OSError:
                    pass
            with self._fd_lock:  # a sync() in another thread finishes first
                os.close(self._fd)
            self._forget_recent_locked()
            pending = self._pending_future
        if not pending.done():
            pending.set_exception(WalFailed("the WAL was closed"))

    def __repr__(self) -> str:
        state = "FAILED" if self._failed else ("CLOSED" if self._closing else "OPEN")
        if state == "OPEN" and self._full is not None:
            state = "FULL"
        return f"<Wal {self.directory} {state} last={self._last_term}/{self._last_lsn:016x}>"


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fdatasync(fd: int) -> None:
    """``os.fdatasync`` whose failure can never be mistaken for a full disk to roll back."""
    try:
        os.fdatasync(fd)
    except OSError as exc:
        raise _FsyncFailed(exc) from exc


def _allocate(fd: int, size: int) -> None:
    """Make the filesystem allocate ``size`` bytes of ``fd`` now; OSError (ENOSPC) if it cannot.

    Writes zeros where ``posix_fallocate`` is missing or not supported by the filesystem.
    """
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    zeros = bytes(min(size, 1 << 20))
    at = 0
    while at < size:
        at += os.pwrite(fd, zeros[: size - at], at)


def _fsync_error(exc: OSError, directory: Path) -> WalFailed:
    return WalFailed(
        f"WAL fsync failed in {directory}: {exc}; what it covered may not be on disk, so the "
        "WAL takes no more writes: restart the node to recover"
    )


def _io_error(exc: OSError, directory: Path) -> WalFailed:
    return WalFailed(f"WAL I/O error in {directory}: {exc}; restart the node to recover")
