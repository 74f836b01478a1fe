"""Divergence points from term histories (replication/divergence.py), against simulated logs.

A log is a list of records ``(term, writer)``; two logs agree up to lsn n when their first n
records are equal (what the chain hash checks). The simulation plays the Subscribe/Diverged
exchange until the leader finds the follower on its history, and checks that each round cuts
something, that nothing of the true common prefix is ever cut, and that it ends in few rounds.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from walship.replication.divergence import (
    common_point,
    end_of_term,
    keep_point,
    on_history,
    snapshot_divergence,
    term_at,
)

Log = list[tuple[int, str]]


def history(log: Log) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lsn, (term, _) in enumerate(log, start=1):
        if not out or out[-1][0] != term:
            out.append((term, lsn))
    return out


def common_prefix(a: Log, b: Log) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def repair(leader: Log, follower: Log) -> tuple[Log, int]:
    """Play the exchange; the follower's log once the leader accepts it, and the rounds."""
    rounds = 0
    true_common = common_prefix(leader, follower)
    while True:
        sub_lsn = len(follower)
        if sub_lsn <= len(leader) and leader[:sub_lsn] == follower:
            return follower, rounds
        rounds += 1
        sub_term = follower[-1][0]
        ct, cl = common_point(history(leader), len(leader), sub_term, sub_lsn)
        keep = keep_point(history(follower), len(follower), ct, cl)
        assert keep < sub_lsn, "a round must cut something"
        assert keep >= true_common, f"cut into the common prefix: kept {keep} < {true_common}"
        follower = follower[:keep]


def test_helpers_read_a_history() -> None:
    h = [(1, 1), (3, 50), (4, 60)]
    assert term_at(h, 0) == 0
    assert term_at(h, 49) == 1
    assert term_at(h, 50) == 3
    assert end_of_term(h, 1, 70) == 49
    assert end_of_term(h, 4, 70) == 70
    assert end_of_term(h, 2, 70) is None


def test_deposed_leader_tail_is_cut_at_the_end_of_its_term_on_the_new_leader() -> None:
    """Old leader wrote 1..110 in term 1; the new leader had 1..100 and began term 2 at 101."""
    assert common_point([(1, 1), (2, 101)], 150, 1, 110) == (1, 100)
    assert common_point([(1, 1), (2, 101)], 100, 1, 110) == (1, 100)
    assert keep_point([(1, 1)], 110, 1, 100) == 100


def test_follower_of_a_lost_term_goes_back_to_the_term_both_share() -> None:
    leader = [(1, "a")] * 39 + [(2, "b")] * 20 + [(4, "d")] * 11
    follower = [(1, "a")] * 49 + [(3, "c")] * 21
    end, rounds = repair(leader, follower)
    assert len(end) == 39 and rounds <= 3


def test_a_term_taken_twice_is_cut_back_to_before_it() -> None:
    """Two leaders both took term 2 (a manual failover without peers): same terms, different
    records; the chain check tells, and the follower goes back to before term 2."""
    leader = [(1, "a")] * 10 + [(2, "x")] * 10
    follower = [(1, "a")] * 10 + [(2, "y")] * 5
    end, rounds = repair(leader, follower)
    assert len(end) == 10 and rounds <= 3


def cluster_logs(rng: random.Random) -> tuple[Log, Log]:
    """A leader's and a follower's log from a random sequence of leaders with unique terms:
    a shared prefix, then each side continues under terms of its own."""
    term = 0
    shared: Log = []
    for _ in range(rng.randint(0, 4)):
        term += 1
        shared += [(term, f"w{term}")] * rng.randint(1, 6)
    leader, follower = list(shared), list(shared)
    # the follower may hold some of the leader's next records too
    for _ in range(rng.randint(1, 4)):
        term += 1
        side = rng.choice(("leader", "follower", "both"))
        n = rng.randint(1, 6)
        if side in ("leader", "both"):
            leader = (
                leader[: rng.randint(max(len(shared), 0), len(leader))] + [(term, f"w{term}")] * n
            )
        if side in ("follower", "both"):
            follower = follower[: rng.randint(len(shared), len(follower))] + [
                (term, f"w{term}")
            ] * rng.randint(1, n)
    return leader, follower


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_repair_converges_without_cutting_the_common_prefix(seed: int) -> None:
    leader, follower = cluster_logs(random.Random(seed))
    if not follower:
        return
    end, rounds = repair(leader, follower)
    assert len(end) == common_prefix(leader, follower)
    terms = len({t for t, _ in follower})
    assert rounds <= terms + 1, f"{rounds} rounds for {terms} terms (seed {seed})"


# ------------------------------------------------------------- when the records are gone


def test_a_position_is_judged_on_the_term_history_when_its_record_is_gone() -> None:
    """The new leader's WAL below lsn 400 is gone; its history still says term 1 ended at 100."""
    h = [(1, 1), (2, 101)]
    assert on_history(h, 1, 100) and on_history(h, 2, 150) and on_history(h, 0, 0)
    assert not on_history(h, 1, 110), "a deposed leader's tail of term 1 past lsn 100"
    assert not on_history(h, 3, 150)
    assert not on_history(h, 1, 110) and common_point(h, 6000, 1, 110) == (1, 100)


def test_a_snapshot_that_would_replace_the_followers_own_tail_is_refused() -> None:
    h = [(1, 1), (2, 101)]
    # the deposed leader of term 1 at lsn 110: its records 101..110 are not in the snapshot
    assert snapshot_divergence(h, 5000, 1, 110) == (1, 100)
    # on the snapshot's history: the install only adds to this log
    assert snapshot_divergence(h, 5000, 1, 100) is None
    assert snapshot_divergence(h, 5000, 2, 4000) is None
    assert snapshot_divergence(h, 5000, 0, 0) is None
    # past the snapshot's end, or the same end of another chain (a term taken twice)
    assert snapshot_divergence(h, 5000, 2, 5001) == (2, 5000)
    assert snapshot_divergence(h, 5000, 2, 5000, chain_differs=True) == (1, 100)


def unique_term_logs(rng: random.Random) -> tuple[Log, Log]:
    """A leader's and a follower's log under unique terms: a shared prefix, then each side
    goes on under terms only it holds (cutting back within its own branch now and then)."""
    term = 0
    shared: Log = []
    for _ in range(rng.randint(0, 4)):
        term += 1
        shared += [(term, f"w{term}")] * rng.randint(1, 6)
    logs = {"leader": list(shared), "follower": list(shared)}
    for _ in range(rng.randint(1, 5)):
        term += 1
        log = logs[rng.choice(("leader", "follower"))]
        del log[rng.randint(len(shared), len(log)) :]
        log += [(term, f"w{term}")] * rng.randint(1, 6)
    return logs["leader"], logs["follower"]


def rejoin(leader: Log, follower: Log, gone: int, *, leader_checks_terms: bool) -> Log:
    """Play a rejoin against a leader whose records 1..``gone`` are gone (checkpointed, WAL
    removed). It offers a snapshot for a position it cannot read, after a term-history check
    (``leader_checks_terms``) or, as before, blindly; the follower checks a snapshot against
    the snapshot's term history before installing it. Returns the follower's log as the
    snapshot or the stream takes over: it must be a prefix of the leader's, every cut having
    gone to lost-and-found and none into the common prefix."""
    true_common = common_prefix(leader, follower)
    h = history(leader)
    for _ in range(len(follower) + 2):
        sub_lsn = len(follower)
        sub_term = follower[-1][0] if follower else 0
        if sub_lsn > len(leader):
            cut_to = common_point(h, len(leader), sub_term, sub_lsn)
        elif sub_lsn <= gone:
            if leader_checks_terms and not on_history(h, sub_term, sub_lsn):
                cut_to = common_point(h, len(leader), sub_term, sub_lsn)
            else:
                snapshot_cut = snapshot_divergence(h, len(leader), sub_term, sub_lsn)
                if snapshot_cut is None:
                    return follower  # installed: replaces the follower's log
                cut_to = snapshot_cut
        elif leader[:sub_lsn] == follower:
            return follower  # streams on from the WAL
        else:
            cut_to = common_point(h, len(leader), sub_term, sub_lsn)
        keep = keep_point(history(follower), len(follower), *cut_to)
        assert true_common <= keep < sub_lsn, (keep, sub_lsn, true_common)
        follower = follower[:keep]  # records keep+1.. to lost-and-found
    raise AssertionError("the rejoin did not end")


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.booleans())
def test_a_rejoin_through_a_snapshot_never_drops_a_tail_untraced(
    seed: int, leader_checks_terms: bool
) -> None:
    rng = random.Random(seed)
    leader, follower = unique_term_logs(rng)
    gone = rng.randint(0, len(leader))
    end = rejoin(leader, follower, gone, leader_checks_terms=leader_checks_terms)
    assert end == leader[: len(end)], f"a tail not on the leader's log survived (seed {seed})"
    assert len(end) >= common_prefix(leader, follower)
