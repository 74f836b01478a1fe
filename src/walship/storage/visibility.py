"""How far a follower may show its log: its own durable end, and the leader's.

A leader may ship records before its own fsync (``replication/early_ship.py``); a power loss
there takes them back, and the leader's next term cuts them from every follower. Until the
leader says it holds them durably, a follower therefore keeps them out of everything it
shows or hands on: queries, entity state, tenant and consumer positions, subscriptions, its
checkpoints (Parquet parts, which snapshots and ``walship sql`` serve) and the snapshots it
serves other followers. The store's ``visible_lsn`` is the lower of its WAL's written end
and ``VisibleBound.lsn``; ``None`` is no bound (a leader; a follower of a leader that ships
only what it made durable).

Thread-safe enough by construction: ``lsn`` is one int replaced whole (the event loop sets
it, readers in any thread read it); listeners run in the setter's thread.
"""

from __future__ import annotations

from collections.abc import Callable


class VisibleBound:
    """The leader's durable lsn as this node was told it, bounding what it shows."""

    __slots__ = ("_listeners", "loaded", "lsn")

    def __init__(self) -> None:
        self.lsn: int | None = None
        self.loaded = False  # set once a follower read the bound it had saved
        self._listeners: list[Callable[[], None]] = []

    def set(self, lsn: int | None) -> None:
        """Bound what is shown at ``lsn`` (None: no bound); listeners hear of a rise."""
        before = self.lsn
        self.lsn = lsn
        if lsn is None or before is None or lsn > before:
            for listener in list(self._listeners):
                listener()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs whenever the bound rises or is lifted (wakes readers that wait
        for an lsn to become visible)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def cap(self, lsn: int) -> int:
        """``lsn`` bounded by the leader's durable lsn."""
        bound = self.lsn
        return lsn if bound is None or lsn <= bound else bound
