"""Shipping before the leader's own fsync, and telling followers what is durable.

A leader that ships only what it made durable runs its fsync and the follower's in series (a
semi-sync write waits for both, one after the other). Raft ships a record as soon as it is in
the leader's log and lets the two disks work at once; so does a walship leader, to a follower
that can be told what the leader may still lose. The safety argument is in the README
("Shipping before the leader's fsync"); in short:

* a follower that said protocol version 3 or 4 (``takes_leader_durable``) is sent
  ``LeaderDurable(term, lsn)`` whenever the leader's durable end (``written_lsn``: fsynced
  under ``--fsync always``, as the policy counts it otherwise) passes what it was told, and
  shows, checkpoints and serves nothing past the lowest of that and its own durable lsn
  (``replication/visibility.py``). Only such a follower is shipped early: records up to the
  WAL's ``flushed_lsn`` (in the file, not yet fsynced). A follower of version 1 or 2 is
  shipped what is durable, as before, and told nothing;
* a leader ships early only in a term this process began (a promotion, or the new term every
  leader start takes, ``restart_term.py``): should the process die before its fsync, its
  next start leads a newer term from its durable end, so a follower holding the lost records
  holds records of an older term past that term's end on the leader's history, which
  divergence repair cuts (``divergence.py``);
* acknowledgements do not change: a write is answered once the leader's own write (and
  fsync) is done and the followers its mode needs have acked.

Sans I/O: the session asks what it may read and which message is due.
"""

from __future__ import annotations

from walship.replication.protocol import LeaderDurable


class DurableNotice:
    """One follower session: whether it is told the leader's durable lsn (and so may be
    shipped early), and the ``LeaderDurable`` due when that lsn moved past what it was told."""

    __slots__ = ("told", "wanted")

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted  # the follower said version 3 or 4
        self.told = -1  # nothing told yet on this link: the first check always sends

    def due(self, term: int, durable_lsn: int) -> LeaderDurable | None:
        """The message to send now, or None (not wanted, or nothing new to tell)."""
        if not self.wanted or durable_lsn <= self.told:
            return None
        self.told = durable_lsn
        return LeaderDurable(term=term, lsn=durable_lsn)


def ships_early(enabled: bool, term_begun_here: bool, notice: DurableNotice) -> bool:
    """Whether a session may ship records the leader has not made durable yet: the leader
    allows it (``--ship-before-fsync``), its current term was begun by this process, and the
    follower is told what is durable."""
    return enabled and term_begun_here and notice.wanted
