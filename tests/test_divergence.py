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

from walship.replication.divergence import common_point, end_of_term, keep_point, term_at

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
