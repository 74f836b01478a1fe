"""The verdict a starting leader draws from its peers' answers, and the peer list it keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from walship.errors import CorruptionError
from walship.leadership import KnownPeers, LeadershipState, judge
from walship.peers import PeerView


def view(node_id: str, role: str = "follower", term: int = 1, **extra: Any) -> PeerView:
    health = {"node_id": node_id, "role": role, "term": term, "last_lsn": 10, **extra}
    return PeerView(f"http://{node_id}:3900", health=health)


def silent(node_id: str) -> PeerView:
    return PeerView(f"http://{node_id}:3900", error="ConnectError")


def test_a_live_leader_of_a_newer_term_deposes_and_is_followed() -> None:
    b = view("b", "leader", 2, fenced=None, replication_address="b:3910")
    verdict = judge("a", 1, [b, silent("c")])
    assert verdict.state is LeadershipState.DEPOSED
    assert verdict.newer_term == 2 and verdict.follow is b
    assert "b (http://b:3900) leads term 2" in verdict.reason


def test_a_follower_that_heard_of_a_newer_term_deposes_and_names_its_leader() -> None:
    c = view("c", term=1, term_seen=3, replication={"leader": "b:3910"})
    verdict = judge("a", 1, [silent("b"), c])
    assert verdict.state is LeadershipState.DEPOSED
    assert verdict.newer_term == 3 and verdict.follow is None
    assert "c follows b:3910" in verdict.reason


def test_a_fenced_leader_of_a_newer_term_is_not_followed() -> None:
    b = view("b", "leader", 2, fenced="deposed", replication_address="b:3910")
    verdict = judge("a", 1, [b])
    assert verdict.state is LeadershipState.DEPOSED and verdict.follow is None


@pytest.mark.parametrize(
    ("answering", "others", "state"),
    [
        (0, 1, LeadershipState.CONFIRMING),
        (1, 1, LeadershipState.CONFIRMED),
        (0, 2, LeadershipState.CONFIRMING),
        (1, 2, LeadershipState.CONFIRMED),  # with itself, 2 of 3
        (1, 4, LeadershipState.CONFIRMING),  # 2 of 5
        (2, 4, LeadershipState.CONFIRMED),  # 3 of 5
    ],
)
def test_confirmed_once_with_itself_a_majority_answered(
    answering: int, others: int, state: LeadershipState
) -> None:
    views = [view(f"p{i}") if i < answering else silent(f"p{i}") for i in range(others)]
    verdict = judge("a", 1, views)
    assert verdict.state is state, verdict.reason
    if state is LeadershipState.CONFIRMING:
        assert "no answer from" in verdict.reason


def test_its_own_answer_counts_neither_way() -> None:
    me = view("a", "leader", 1)
    assert judge("a", 1, [me, silent("b")]).state is LeadershipState.CONFIRMING
    assert judge("a", 1, [me, view("b")]).state is LeadershipState.CONFIRMED


def test_known_peers_persist_and_forget(tmp_path: Path) -> None:
    peers = KnownPeers(tmp_path)
    peers.remember("b", "http://b:3900")
    peers.remember("c", "http://c:3900")
    peers.remember("b", "http://b2:3900")  # moved
    assert KnownPeers(tmp_path).urls == {"b": "http://b2:3900", "c": "http://c:3900"}
    assert peers.forget("b") and not peers.forget("b")
    assert KnownPeers(tmp_path).urls == {"c": "http://c:3900"}
    peers.path.write_text("{not json")
    with pytest.raises(CorruptionError):
        KnownPeers(tmp_path)
