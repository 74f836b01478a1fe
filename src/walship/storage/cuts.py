"""The record of a store's log cuts, for readers that follow the log (subscriptions).

A divergence repair cuts a node's log back to where it meets the new leader's history; the
records after the cut are gone (moved to lost-and-found) and new ones will take their lsns.
A subscription that already sent events past the cut must not go on as if nothing happened,
and one that read a page while the cut ran must not send it. So a cut is bracketed like a
sequence lock: ``seq`` is odd while a cut runs and grows by one at its start and its end; a
page read with the same even ``seq`` before and after saw no cut, and ``lowest_since`` says
how far back the cuts a reader missed went.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

CUTS_KEPT = 64  # cuts are rare (one per repair); a reader further behind is told "from 0"


class LogCuts:
    """Cuts of one store's log (thread-safe); listeners are called at each cut's start and end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._cuts: list[tuple[int, int]] = []  # (seq at the cut's start, kept lsn), oldest first
        self._listeners: list[Callable[[], None]] = []

    @property
    def seq(self) -> int:
        """Grows by one at each cut's start and end: odd while a cut runs."""
        return self._seq

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @contextmanager
    def cutting(self, kept_lsn: int) -> Iterator[None]:
        """Bracket a cut that keeps the log up to ``kept_lsn``. A cut that fails midway is
        still counted: readers cannot know how much of it happened."""
        with self._lock:
            self._seq += 1
            self._cuts.append((self._seq, kept_lsn))
            del self._cuts[:-CUTS_KEPT]
        self._notify()
        try:
            yield
        finally:
            with self._lock:
                self._seq += 1
            self._notify()

    def lowest_since(self, seq: int) -> int | None:
        """The lowest lsn kept by a cut that started after ``seq`` (or was running at it);
        None when there was none. 0 when ``seq`` is older than the cuts remembered."""
        with self._lock:
            if not self._cuts or (self._seq == seq and seq % 2 == 0):
                return None
            if self._cuts[0][0] > seq + 1 and len(self._cuts) == CUTS_KEPT:
                return 0
            kept = [lsn for start, lsn in self._cuts if start >= seq]
            return min(kept) if kept else None

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()
