"""A follower's side of ``LeaderDurable``: what it may show of the records it holds.

The store shows no more than ``VisibleBound`` (``storage/visibility.py``); this keeps that
bound on a follower:

* a leader that speaks protocol version 3 tells its durable lsn (``LeaderDurable``); the bound
  rises to it (it never falls within a link);
* when a link begins, the bound drops to what this node holds then (never above what it
  showed): a new leader may hold another history, and must say itself what of it is durable;
* a leader that does not speak version 3 ships only what it made durable: once it has shown
  that it continues this log (its first WAL batch or CaughtUp), there is no bound;
* promoted, the node leads its own log: no bound (its records past the last leader-durable
  lsn it heard of become its new term's history, as a Raft leader's do);
* the bound is kept in ``replication/leader_durable.json`` (at most every ``SAVE_EVERY_S``,
  at every link and at a stop), so a follower restarted before it reaches its leader shows
  no more than it was told; after a crash it may show a little less until the leader tells
  it again. No file: no bound (a node from before this, or one that has only led).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import msgspec

from walship.fsutil import atomic_write
from walship.storage.visibility import VisibleBound

log = logging.getLogger(__name__)

FILE_NAME = "leader_durable.json"
SAVE_EVERY_S = 1.0


class _Saved(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    lsn: int | None


class LeaderDurableView:
    """Keeps a follower store's ``VisibleBound`` from its leader's ``LeaderDurable``."""

    def __init__(self, bound: VisibleBound, data_dir: Path) -> None:
        self.bound = bound
        self.path = data_dir / "replication" / FILE_NAME
        self.leader_tells = False  # the leader of this link speaks version 3
        self._saved: int | None = -1  # what the file holds (-1: not known)
        self._saved_at = 0.0

    def load(self, checkpointed_lsn: int) -> None:
        """When the node first follows in this process: the bound it had (no file: none)."""
        if self.bound.loaded:
            return
        self.bound.loaded = True
        try:
            saved = msgspec.json.decode(self.path.read_bytes(), type=_Saved)
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError) as exc:
            # unreadable: show only what a checkpoint holds until the leader says more
            log.warning(
                "replication: unreadable %s (%s): showing no more than is checkpointed",
                self.path,
                exc,
            )
            self.bound.set(checkpointed_lsn)
            return
        self._saved = saved.lsn
        self.bound.set(saved.lsn)

    def link_began(self, leader_tells: bool, held_lsn: int) -> None:
        """A link to a leader was authenticated: show no more than what is held now, and
        no more than before, until the leader says what is durable."""
        self.leader_tells = leader_tells
        current = self.bound.lsn
        self.bound.set(held_lsn if current is None else min(current, held_lsn))

    def continues(self) -> None:
        """The leader showed it continues this log (a WAL batch, CaughtUp): a leader that
        does not speak version 3 ships only what it holds durably, so nothing is bounded."""
        if not self.leader_tells and self.bound.lsn is not None:
            self.bound.set(None)

    def told(self, lsn: int) -> None:
        """The leader holds its log durably up to ``lsn``."""
        current = self.bound.lsn
        if current is not None and lsn > current:
            self.bound.set(lsn)

    def lifted(self) -> None:
        """This node leads now: it shows its whole log."""
        self.bound.set(None)

    @property
    def save_due(self) -> bool:
        return self.bound.lsn != self._saved and time.monotonic() - self._saved_at >= SAVE_EVERY_S

    def save(self) -> None:
        """Persist the bound (tmp → fsync → rename → fsync dir); blocking."""
        lsn = self.bound.lsn
        if lsn == self._saved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, msgspec.json.encode(_Saved(lsn)))
        self._saved = lsn
        self._saved_at = time.monotonic()
