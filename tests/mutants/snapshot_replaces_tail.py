"""Mutant: divergence is judged only where the records remain (walship before issue 17).

The leader offers a snapshot to a follower whose position it can no longer read, without
asking its term history; the follower installs a snapshot without checking it against its
own. A deposed leader that rejoins after the new leader removed the WAL at its position loses
its unreplicated tail without a trace. ``walship verify --faults rejoin`` must catch it
(check ``rejoin_tail_accounted``, and ``lost_found_accounted`` with it).
"""

from __future__ import annotations

from walship.replication import follower, leader
from walship.replication.protocol import Subscribe

_locate = leader.Leader.locate


def _locate_without_terms(self: leader.Leader, sub: Subscribe) -> object:
    first = self.store.wal.first_lsn().value
    if 0 < sub.lsn < first - 1 and sub.lsn != self.store.manifest.last_lsn:
        return None  # "cannot check that far back; a snapshot replaces it"
    return _locate(self, sub)


def _no_check(self: follower.Follower, *args: object) -> None:
    return None


leader.Leader.locate = _locate_without_terms  # type: ignore[assignment]
follower.Follower._check_snapshot_history = _no_check  # type: ignore[assignment,method-assign]

if __name__ == "__main__":
    from walship.cli.main import main

    main()
