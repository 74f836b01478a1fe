"""Where a client sends each request in a cluster, and what it does after a failure (no I/O).

``Router`` holds what the client knows: the node URLs it was given, the leader it believes in,
the followers it saw, and the lsn of its own last write. ``Client`` and ``AsyncClient`` do the
HTTP and ask the router:

* writes go to the leader. A 409 ``read_only``/``fenced`` naming a ``leader_url`` is followed
  at once; a node that cannot be reached, a 409 without a leader or a 503 that may pass (no
  lease, not ready) makes the client forget the leader, wait (``RetryPolicy``: bounded
  attempts and time, exponential backoff with jitter) and ask every node's ``/health`` again.
  The request is sent again byte for byte, with the same event ids, so a write that was stored
  before the failure is answered ``duplicate`` with its original receipt, never stored twice.
* reads go where ``read_from`` says; on a node other than the believed leader they carry
  ``min_lsn`` = the lsn of this client's last write (read-your-writes), and a node that cannot
  answer in time hands the read to the next one.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from walship.errors import AckTimeout, ReadOnly, Unavailable, WaitTimeout, WalshipError
from walship.peers import PeerView, normalize_url


class ReadFrom(StrEnum):
    """Which nodes serve a client's reads."""

    LEADER = "leader"  # the leader; another node only while the leader cannot answer
    FOLLOWERS = "followers"  # followers in turn, the leader when none can answer
    ANY = "any"  # every node in turn


@dataclass(frozen=True)
class RetryPolicy:
    """How long a write keeps trying through a failover: at most ``attempts_max`` sends, none
    started after ``deadline_s`` seconds (one already sent may wait up to the client's
    ``timeout``), sleeping ``backoff_min_s`` doubling up to ``backoff_max_s`` (full jitter)
    between rounds. ``RetryPolicy(attempts_max=1)`` sends once."""

    attempts_max: int = 20
    deadline_s: float = 30.0
    backoff_min_s: float = 0.05
    backoff_max_s: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts_max < 1 or self.deadline_s < 0 or self.backoff_min_s < 0:
            raise ValueError("RetryPolicy needs attempts_max >= 1 and non-negative times")
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("RetryPolicy backoff_max_s must be >= backoff_min_s")

    def backoff_s(self, waits: int, rng: random.Random | None = None) -> float:
        """The sleep before round ``waits`` (1, 2, ...): jittered, never above the cap."""
        cap = min(self.backoff_max_s, self.backoff_min_s * 2 ** max(waits - 1, 0))
        return (rng or random).uniform(self.backoff_min_s, max(cap, self.backoff_min_s))


@dataclass(frozen=True)
class Retry:
    """What to do after a failed write: send to ``url`` at once, or (``url`` None) wait,
    find the leader again and send there."""

    url: str | None = None


def is_retriable_write_error(exc: WalshipError) -> bool:
    """Whether sending the same write again (same ids) may succeed.

    A node that is not (or no longer) the leader, or that is unreachable, unavailable or not
    ready, may pass with a failover. AckTimeout is an answer about a stored write (committed
    locally, not confirmed), and everything else is about the request itself: both raise.
    """
    if isinstance(exc, AckTimeout):
        return False
    return isinstance(exc, ReadOnly | Unavailable) or exc.retriable


class Router:
    """What a client knows of the cluster; not thread-safe beyond single assignments (a
    wrong guess is corrected by the next answer)."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        read_from: ReadFrom | str = ReadFrom.LEADER,
        read_your_writes: bool = True,
    ) -> None:
        given = [urls] if isinstance(urls, str) else list(urls)
        self.urls = list(dict.fromkeys(normalize_url(u) for u in given if u.strip()))
        if not self.urls:
            raise ValueError("a client needs at least one node URL")
        self.read_from = ReadFrom(read_from)
        self.read_your_writes = read_your_writes
        # one URL: it is the leader until an answer says otherwise (no discovery round trip)
        self.leader: str | None = self.urls[0] if len(self.urls) == 1 else None
        self.followers: list[str] = []
        self.last_write_lsn = 0
        self._turn = 0

    # ------------------------------------------------------------------ leader discovery

    def probe_urls(self) -> list[str]:
        """The URLs to ask for ``/health`` when looking for the leader."""
        return list(self.urls)

    def learn(self, views: Iterable[PeerView]) -> list[str]:
        """Take the leader and followers from ``views``; return URLs they named that were
        not asked yet (a follower's ``leader_url``), to be asked too."""
        views = list(views)
        asked = {v.url for v in views}
        leaders = [
            v
            for v in views
            if v.answered
            and v.role == "leader"
            and v.fenced is None
            and (v.health or {}).get("status") != "unhealthy"
        ]
        if leaders:
            self.leader = max(leaders, key=lambda v: v.term).url
        followers = [v for v in views if v.answered and v.role == "follower"]
        # ready followers first: one that lost its leader would only make reads wait
        followers.sort(key=lambda v: (v.health or {}).get("ready") is False)
        self.followers = [v.url for v in followers]
        hinted = []
        for v in followers:
            url = ((v.health or {}).get("replication") or {}).get("leader_url")
            if isinstance(url, str) and normalize_url(url) not in asked:
                hinted.append(normalize_url(url))
        return list(dict.fromkeys(hinted)) if not leaders else []

    # ------------------------------------------------------------------ writes

    def wrote(self, url: str, last_lsn: int) -> None:
        """A write was answered by ``url`` at ``last_lsn``: it leads, and reads wait for it."""
        self.leader = url
        self.last_write_lsn = max(self.last_write_lsn, last_lsn)

    def after_write_error(self, url: str, exc: WalshipError) -> Retry:
        """What to do after ``url`` failed a write with ``exc``; raises ``exc`` when sending
        again cannot help."""
        if not is_retriable_write_error(exc):
            raise exc
        hint = exc.details.get("leader_url") if isinstance(exc, ReadOnly) else None
        if isinstance(hint, str) and normalize_url(hint) != url:
            self.leader = normalize_url(hint)
            return Retry(self.leader)
        if self.leader == url:
            self.leader = None
        return Retry(None)

    # ------------------------------------------------------------------ reads

    def needs_discovery(self) -> bool:
        """Whether to ask the nodes' ``/health`` before a read: no leader known, or reads
        meant for followers and none seen yet."""
        if self.leader is None:
            return True
        return self.read_from is not ReadFrom.LEADER and not self.followers and len(self.urls) > 1

    def read_targets(self, prefer: str | None = None) -> list[str]:
        """The nodes to try for a read, in order (``prefer`` first, e.g. the node that served
        the previous page of the same query)."""
        leader = self.leader
        others = [u for u in dict.fromkeys([*self.followers, *self.urls]) if u != leader]
        self._turn += 1
        if others:
            k = self._turn % len(others)
            others = others[k:] + others[:k]  # spread reads over the followers
        if self.read_from is ReadFrom.LEADER:
            order = [leader, *others] if leader else others
        elif self.read_from is ReadFrom.FOLLOWERS:
            order = [*others, leader] if leader else others
        else:
            order = [leader, *others] if leader else others
            k = self._turn % len(order)
            order = order[k:] + order[:k]
        if prefer is not None:
            order = [prefer, *(u for u in order if u != prefer)]
        return list(dict.fromkeys(u for u in order if u is not None))

    def min_lsn_for(self, url: str, floor: int = 0) -> int | None:
        """The ``min_lsn`` a read on ``url`` must carry: this client's last write (when
        read-your-writes is on) or ``floor``, whichever is higher; None on the leader, which
        has both, and when there is nothing to wait for."""
        need = max(self.last_write_lsn if self.read_your_writes else 0, floor)
        return need if need > 0 and url != self.leader else None

    def read_failed(self, url: str, exc: WalshipError) -> None:
        """``url`` could not answer a read with ``exc``; raises ``exc`` unless another node
        may answer it (the node is unreachable, unavailable, or has not caught up in time)."""
        if not isinstance(exc, Unavailable):  # WaitTimeout and NotReady are Unavailable too
            raise exc
        if url == self.leader and not isinstance(exc, WaitTimeout):
            self.leader = None

    def __repr__(self) -> str:
        return f"<Router leader={self.leader} urls={self.urls} reads={self.read_from}>"
