"""Appends of records another node wrote (a follower's path), as methods of ``Wal``.

A follower's records arrive verified a frame at a time (``wal/frame.py``) from the position
they follow. They are queued as they are, after a
check that this position is the log's tail and with every newer term saved first; the writer
thread writes them as it writes a leader's appends. The attributes below are ``Wal``'s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from walship.errors import CorruptionError, invariant
from walship.position import Lsn, Term
from walship.wal.frame import VerifiedFrame
from walship.wal.group import Pending, WholeUnits
from walship.wal.terms import TermHistory
from walship.wal.types import WriteOutcome


class ShippedAppends:
    """``Wal.append_frame``; ``_lock`` held for it."""

    _lock: threading.Lock
    _wake: threading.Condition
    terms: TermHistory
    _last_lsn: int
    _last_term: int
    _last_chain: bytes
    _pending: list[Pending]
    _pending_bytes: int
    _pending_records: int
    _pending_future: Future[WriteOutcome]
    _sync_wanted: bool
    _wait_for_space: Callable[[], None]  # backpressure (Wal's)

    def append_frame(self, frame: VerifiedFrame) -> Future[WriteOutcome]:
        """Append a verified frame (``wal/frame.py``) exactly as another node wrote it: its
        bytes are queued and written as one buffer. Every record must belong to a whole atomic
        append; CorruptionError (and nothing appended) unless the frame continues this log's
        tail. The records are fsynced before the returned future completes, whatever the
        fsync policy."""
        invariant(
            frame.whole == frame.record_count,
            f"a frame ending at lsn {frame.last_lsn} cuts an append",
        )
        with self._lock:
            self._check_continues(frame.prev_lsn, frame.prev_term, frame.prev_chain, frame.rises)
            if not frame.record_count:
                return self._pending_future
            last = frame.tail()
            self._pending.append(
                WholeUnits([frame.data], frame.starts, frame.unit_ends, frame.prev_lsn + 1, last)
            )
            self._pending_bytes += len(frame.data)
            self._pending_records += frame.record_count
            return self._queued_replicated(*last)

    def _check_continues(
        self, lsn: int, term: int, chain: bytes, rises: Sequence[tuple[int, int]]
    ) -> None:
        """Under ``_lock``: wait for room, check that ``(lsn, term, chain)`` is this log's tail
        (CorruptionError otherwise) and save where each newer term of ``rises`` starts."""
        self._wait_for_space()
        tail = (self._last_lsn, self._last_term, self._last_chain)
        if (lsn, term, chain) != tail:
            raise CorruptionError(
                f"records after lsn {lsn} term {term} do not continue the "
                f"log at lsn {tail[0]} term {tail[1]}"
            )
        # records of a newer term: save where each term starts before writing any of them,
        # and queue nothing when that fails
        current = self.terms.current.value
        for r_term, r_lsn in rises:
            if r_term > current:
                self.terms.start(Term(r_term), Lsn(r_lsn))
                current = r_term

    def _queued_replicated(self, lsn: int, term: int, chain: bytes) -> Future[WriteOutcome]:
        """Under ``_lock``: records up to ``lsn`` were queued; wake the writer for them."""
        self._last_lsn, self._last_term, self._last_chain = lsn, term, chain
        # a follower acknowledges what it appends as durable: fsynced, whatever its own
        # policy (which governs the writes it takes once it leads)
        self._sync_wanted = True
        self._wake.notify()
        return self._pending_future
