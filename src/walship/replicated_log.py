"""The store's log as replication sees it: one narrow front door instead of ``store.wal``.

Replication (the leader's shipping, a follower's applying, cascading, divergence repair,
snapshot sending) needs to know where the log ends and what its terms are, to read records
and segments from a point, and to hear when it advanced. It used to reach into ``store.wal``
for that, 39 times, and so could call anything the WAL has — appending, truncating, removing
segments — past the store. ``ReplicatedLog`` is what it may use; the writes stay the store's.

The WAL object behind it is looked up on every call, not held: the store opens a new one
after a snapshot install or a divergence repair. Ends are typed values (``Lsn``, ``Term``,
``Position``, the ``LogPoint`` of term, lsn and chain); the term history is ``(term, first
lsn)`` pairs as the protocol sends them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from walship.position import LogPoint, Lsn, Position, Term
from walship.wal.cursor import WalCursor
from walship.wal.log import Wal
from walship.wal.record import Record
from walship.wal.types import WalListener


class HoldsWal(Protocol):
    """What owns the WAL (the store): its current WAL, which it may replace."""

    @property
    def wal(self) -> Wal: ...


class ReplicatedLog:
    """Where the log ends, its terms, and reads from a point; no writes."""

    __slots__ = ("_owner",)

    def __init__(self, owner: HoldsWal) -> None:
        self._owner = owner

    # ------------------------------------------------------------------ where it ends

    @property
    def written_lsn(self) -> Lsn:
        """The last lsn written to the files (what may be shipped)."""
        return self._owner.wal.written_lsn

    @property
    def flushed_lsn(self) -> Lsn:
        """The last lsn in the files, maybe not yet fsynced (what may be shipped early)."""
        return self._owner.wal.flushed_lsn

    @property
    def synced_lsn(self) -> Lsn:
        """The last lsn fsynced (what may be acknowledged as durable)."""
        return self._owner.wal.synced_lsn

    @property
    def last_position(self) -> Position:
        """The term and lsn of the last record (``Position.start()`` for an empty log)."""
        return self._owner.wal.last_position

    @property
    def last_chain(self) -> bytes:
        """The running chain hash at the last record."""
        return self._owner.wal.last_chain

    @property
    def last_point(self) -> LogPoint:
        """The last record's ``(term, lsn, chain)``, read together: what the next record must
        continue (``LogPoint(Term(0), Lsn(0), GENESIS_CHAIN)`` for an empty log)."""
        return self._owner.wal.last_point

    def first_lsn(self) -> Lsn:
        """The lowest lsn still held (one past the end when the log is empty)."""
        return self._owner.wal.first_lsn()

    def backlogged(self) -> bool:
        """True while appends wait for the writer (a follower then reads less ahead)."""
        return self._owner.wal.backlogged()

    # ------------------------------------------------------------------ terms

    @property
    def current_term(self) -> Term:
        return self._owner.wal.terms.current

    def term_history(self) -> list[tuple[int, int]]:
        """``(term, first lsn)`` of every term the log holds, oldest first."""
        return self._owner.wal.terms.to_list()

    # ------------------------------------------------------------------ reading

    def read_from(self, lsn: Lsn | int) -> Iterator[Record]:
        """Verified records from ``lsn`` to the written end (InvalidInput before the first)."""
        return self._owner.wal.read_from(lsn)

    def cursor(self, next_lsn: int, *, early: bool = False) -> WalCursor:
        """A shipping cursor that reads whole runs of records from ``next_lsn`` on, up to
        ``written_lsn`` (up to ``flushed_lsn`` when ``early``)."""
        return WalCursor(self._owner.wal, next_lsn, early=early)

    def segment_infos(self) -> list[tuple[int, Path, int]]:
        """``(first_lsn, path, bytes)`` of each segment, oldest first."""
        return self._owner.wal.segment_infos()

    # ------------------------------------------------------------------ hearing it advance

    def add_listener(self, listener: WalListener) -> None:
        """Call ``listener(written_lsn)`` from the writer thread after each group commit."""
        self._owner.wal.add_listener(listener)

    def remove_listener(self, listener: WalListener) -> None:
        self._owner.wal.remove_listener(listener)

    def add_flush_listener(self, listener: WalListener) -> None:
        """Call ``listener(flushed_lsn)`` from the writer thread after each group is written,
        before its fsync."""
        self._owner.wal.add_flush_listener(listener)

    def remove_flush_listener(self, listener: WalListener) -> None:
        self._owner.wal.remove_flush_listener(listener)

    def __repr__(self) -> str:
        return f"<ReplicatedLog {self.last_position} written={self.written_lsn.value}>"
