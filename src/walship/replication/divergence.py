"""Where two logs part: the last position a leader and a follower share, from term histories.

Sans I/O and pure, so it is tested against simulated histories. The method is Kafka's leader
epochs (KIP-101/279) with Raft's log matching: a term is written by one leader, so two logs
that hold a record of the same term at the same lsn agree up to it, and a log's terms never
decrease. The chain hash (checked by the leader at the follower's position) catches the one
case the terms cannot: two leaders that took the same term number by mistake.

The exchange, repeated until the leader finds the follower's position on its history::

    F ── Subscribe(term, lsn) ──▶ L      L: common_point(...) -> Diverged(common_term, lsn)
    F: keep_point(...) -> k; F moves records k+1.. to lost-and-found, truncates, subscribes

Each round the follower cuts at least one record and never below the true common prefix
(when terms are unique); with terms taken twice the chain check makes it cut back to before
the duplicated term. A history is ``[(term, first_lsn), ...]`` in increasing order.

The history outlives the WAL, so where a record is gone (checkpointed, its WAL removed) the
terms alone decide (``on_history``): on the leader before it offers a snapshot, and on the
follower before it installs one (``snapshot_divergence``). A snapshot replaces the whole log,
so without that check a tail off the history would vanish without reaching lost-and-found.
"""

from __future__ import annotations

from collections.abc import Sequence

History = Sequence[tuple[int, int]]


def term_at(history: History, lsn: int) -> int:
    """The term of record ``lsn``; 0 for lsn 0 or before any term."""
    found = 0
    for term, first in history:
        if first <= lsn:
            found = term
        else:
            break
    return found if lsn > 0 else 0


def start_of_term(history: History, term: int) -> int | None:
    """The first lsn of ``term``; None when this history has no such term."""
    for t, first in history:
        if t == term:
            return first
    return None


def end_of_term(history: History, term: int, last_lsn: int) -> int | None:
    """The last lsn of ``term`` in a log ending at ``last_lsn``; None when there is no such
    term (the newest term ends with the log)."""
    for i, (t, _) in enumerate(history):
        if t == term:
            if i + 1 < len(history):
                return min(history[i + 1][1] - 1, last_lsn)
            return last_lsn
    return None


def on_history(history: History, sub_term: int, sub_lsn: int) -> bool:
    """Whether a record of ``sub_term`` at ``sub_lsn`` can be on this log, judged by the term
    history alone (for when the record itself is gone: checkpointed and its WAL removed).

    A term is written by one leader, so a log whose history has ``sub_term`` at ``sub_lsn``
    holds that very record and everything before it. The chain cannot be compared without the
    record; two leaders that took one term by mistake are caught where the records remain.
    """
    return sub_lsn == 0 or term_at(history, sub_lsn) == sub_term


def snapshot_divergence(
    history: History,
    last_lsn: int,
    own_term: int,
    own_lsn: int,
    *,
    chain_differs: bool = False,
) -> tuple[int, int] | None:
    """Follower side, before installing a snapshot whose log (``history``) ends at
    ``last_lsn``: None when this node's end of log ``(own_term, own_lsn)`` is on it, so the
    snapshot only adds to it; else the common point ``(term, lsn)`` to cut back to first, so
    this node's own tail goes to lost-and-found rather than being replaced without a trace.

    ``chain_differs``: the snapshot ends exactly at ``own_lsn`` with another chain hash (a
    term taken twice).
    """
    if own_lsn > last_lsn:
        return common_point(history, last_lsn, own_term, own_lsn)
    if on_history(history, own_term, own_lsn) and not chain_differs:
        return None
    return common_point(history, last_lsn, own_term, own_lsn)


def common_point(history: History, last_lsn: int, sub_term: int, sub_lsn: int) -> tuple[int, int]:
    """Leader side: ``(common_term, common_lsn)`` for a follower whose last record
    ``(sub_term, sub_lsn)`` is not on this log (it differs here, or lies past the end).

    The end of the newest term of this log not above ``sub_term`` (the follower cannot hold
    records of newer terms of this log), and at most ``sub_lsn - 1``. When this log holds a
    record of ``sub_term`` at ``sub_lsn`` that still differs, two leaders took that term:
    nothing of it is trusted, back to before its start here.
    """
    older = [t for t, _ in history if t <= sub_term]
    if not older or sub_lsn == 0:
        return 0, 0
    newest = older[-1]
    start = start_of_term(history, newest)
    assert start is not None
    if newest == sub_term and sub_lsn <= last_lsn and term_at(history, sub_lsn) == sub_term:
        common = start - 1
    else:
        end = end_of_term(history, newest, last_lsn)
        assert end is not None
        common = min(end, sub_lsn - 1)
    common = max(common, 0)
    return term_at(history, common), common


def keep_point(history: History, last_lsn: int, common_term: int, common_lsn: int) -> int:
    """Follower side: the last lsn to keep after the leader answered ``Diverged``.

    At most ``common_lsn``, and never a record of a term above ``common_term``: the leader's
    log holds only terms up to ``common_term`` up to there, so such records cannot be on it.
    """
    keep = min(common_lsn, last_lsn)
    for term, first in history:
        if term > common_term and first <= keep:
            keep = first - 1
            break
    return max(keep, 0)
