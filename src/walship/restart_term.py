"""Every start of a leader leads a new term, before it takes a write or ships early.

A leader that ships records before its own fsync (``replication/early_ship.py``) can die
with followers holding records it never made durable; its next start finds its log ending
before them. Were it to go on in the same term, its next records would take those lsns
again with other bodies, and the follower's tail would look like a prefix of its history
(the chain at the follower's end catches that only while the leader still holds that very
record in its WAL; past a checkpoint the term history alone decides, ``divergence.py``).
Beginning a new term at its durable end instead -- persisted in the term history before any
write is answered -- makes the old term end exactly where the leader's log ends: a follower
with more of it holds records of the old term past that term's end on the leader's history,
and divergence repair cuts them (into lost-and-found) before it streams again.

The term is taken once the leadership guard (``leadership.py``) has confirmed that no peer
knows a newer one (or that there is nobody to ask), and is above every term this node and
the peers that answered have seen, so it is never one a promotion elsewhere took. A new log
(the store began term 1 in this process) needs none: nothing of it went out before. Under etcd
the lease decides and the term stays; such a leader ships only what it made durable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from walship.errors import WalshipError, invariant
from walship.position import Term
from walship.wal.record import TERM_MAX

if TYPE_CHECKING:
    from walship.node import Node

log = logging.getLogger(__name__)


async def begin_restart_term(node: Node, peer_terms: Iterable[int] = ()) -> int | None:
    """Begin a new term for a leader that resumed one (persisted before returning); the new
    term, or None when there is nothing to do (not a leader, fenced, or this process began
    its term already) or the WAL refused (then it ships only what it made durable)."""
    leader = node.leader
    if leader is None or leader.fenced is not None or leader.term_begun_here:
        return None
    if node.store.began_first_term and node.store.log.current_term == Term(1):
        # a new log: this process began its first term itself, and nothing went out before
        leader.term_begun_here = True
        return None
    log_ = node.store.log
    term = 1 + max(
        log_.current_term.value,
        node.role_state.record.term_seen,
        leader.fenced_term,
        *peer_terms,
    )
    invariant(term <= TERM_MAX, f"term {term} is out of range")
    previous = log_.current_term.value
    try:
        # the WAL's own door, as a promotion uses it: a term begins in the log itself
        await asyncio.to_thread(node.store.wal.begin_term, Term(term))  # persisted
    except WalshipError as exc:
        log.error("could not begin a new term at this leader's start: %s", exc.message)
        return None
    if node.leader is not leader:
        return None  # the role changed meanwhile; the term stays used
    node.role_state.saw_term(term)
    leader.acks.led(term)
    leader.insync.new_term(term)
    leader.term_begun_here = True
    node.replication_metrics.term.set(term)
    log.info(
        "leading term %d from lsn %d (term %d before this start)",
        term,
        log_.last_position.lsn.value + 1,
        previous,
    )
    return term
