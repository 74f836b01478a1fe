"""A leader proves it is still the leader before it writes (DESIGN invariant 10).

A node that starts as leader -- by its flags or by a promotion recorded in ``role.json`` --
may have been deposed while it was down: ``walship failover`` promoted a follower and could
not tell it. Before it answers any write it asks the other nodes it knows (``--peers`` and
the followers that ever subscribed to it, whose advertised URLs it keeps in
``replication/peers.json``) for their ``/health``:

* a peer that knows a newer term deposes it: it is fenced at once (``Fenced``, persisted, so
  a restart stays fenced) and, when a peer is the live leader of that newer term, it follows
  it (``repoint``: its unreplicated tail is cut into lost-and-found by divergence repair);
  otherwise it stays fenced, saying which term exists and whom the peers follow, and keeps
  asking until the leader answers;
* when at least half of the other nodes it knows answered and none knows a newer term --
  with itself, a majority of the cluster it knows -- it begins a new term above every term
  they and it know (``restart_term.py``: every leader start leads a new term) and takes
  writes;
* until then it refuses writes with ``503 leadership_unconfirmed`` and asks again every
  ``CONFIRM_POLL_S``. It waits for as long as it takes: when no peer is reachable it takes
  no writes. A leader that knows no peer at all (one node; or no follower ever subscribed
  and no ``--peers``) begins its new term and takes writes at once -- there is nobody to ask.

Once confirmed it stops asking: a leader deposed while it runs learns it from its followers
(fencing, ``replication/leader.py``) and stays fenced until repointed, as before. A leader
that starts fenced (it saved the newer term before it stopped) stays fenced too, and is not
asked about. A promotion confirms the new leader (it started a term above every term it or
its peers had seen). Under automatic failover (etcd) the lease decides and this check stays
off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from walship.errors import CorruptionError, WalshipError
from walship.fsutil import atomic_write
from walship.peers import PeerView, fetch_views, normalize_url
from walship.restart_term import begin_restart_term

if TYPE_CHECKING:
    from walship.node import Node

log = logging.getLogger(__name__)

FILE_NAME = "peers.json"
CONFIRM_POLL_S = 0.5


class KnownPeers:
    """Followers' advertised HTTP URLs by node id (``replication/peers.json``, tmp → fsync →
    rename): the leader asks them after a restart. Written only when a URL changes."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "replication" / FILE_NAME
        self.urls: dict[str, str] = {}
        if self.path.exists():
            try:
                self.urls = msgspec.json.decode(self.path.read_bytes(), type=dict[str, str])
            except msgspec.DecodeError as exc:
                raise CorruptionError(f"unreadable peer list {self.path}: {exc}") from exc

    def remember(self, node_id: str, url: str) -> None:
        """``node_id`` is reachable at ``url`` (persisted before returning, when new)."""
        if self.urls.get(node_id) != url:
            self._save({**self.urls, node_id: url})

    def forget(self, node_id: str) -> bool:
        """Stop asking ``node_id`` (a follower gone for good); True when it was known."""
        if node_id not in self.urls:
            return False
        self._save({k: v for k, v in self.urls.items() if k != node_id})
        return True

    def _save(self, urls: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, msgspec.json.encode(dict(sorted(urls.items()))))
        self.urls = urls


class LeadershipState(StrEnum):
    UNCHECKED = "unchecked"  # no peer known: nobody to ask
    CONFIRMING = "confirming"  # asking; no writes yet
    CONFIRMED = "confirmed"  # enough peers answered and none knows a newer term
    DEPOSED = "deposed"  # a peer knows a newer term
    IDLE = "idle"  # not a leader (or etcd decides)


@dataclass(frozen=True)
class Verdict:
    """What one round of answers says about a leader of ``term``."""

    state: LeadershipState
    reason: str
    newer_term: int = 0
    follow: PeerView | None = None  # the live leader of the newer term, when one answered


def judge(node_id: str, term: int, views: Sequence[PeerView]) -> Verdict:
    """Decide from the answers of every other node asked (``views``; this node's own answer,
    when its URL was among them, does not count either way)."""
    others = [v for v in views if v.node_id != node_id]
    answered = [v for v in others if v.answered]
    newer = [v for v in answered if known_term(v) > term]
    if newer:
        top = max(known_term(v) for v in newer)
        leaders = [
            v
            for v in newer
            if v.role == "leader" and v.fenced is None and v.term > term and v.replication_address
        ]
        follow = max(leaders, key=lambda v: v.term, default=None)
        if follow is not None:
            how = f"{follow.node_id} ({follow.url}) leads term {follow.term}: following it"
        else:
            hints = sorted({f"{v.node_id} follows {h}" for v in newer if (h := _follows(v))})
            how = "its leader did not answer" + (f" ({'; '.join(hints)})" if hints else "")
        seen = ", ".join(f"{v.node_id} ({v.url})" for v in newer)
        return Verdict(
            LeadershipState.DEPOSED,
            f"term {top} is newer than this leader's {term} (known to {seen}); {how}",
            top,
            follow,
        )
    needed = (len(others) + 1) // 2
    if len(answered) >= needed:
        return Verdict(
            LeadershipState.CONFIRMED,
            f"{len(answered)} of {len(others)} peers answered; none knows a term above {term}",
        )
    silent = ", ".join(v.url for v in others if not v.answered)
    return Verdict(
        LeadershipState.CONFIRMING,
        f"this leader (term {term}) started again and takes no writes until {needed} of its "
        f"{len(others)} peers answer that no newer term exists ({len(answered)} did; no "
        f"answer from {silent})",
    )


def known_term(view: PeerView) -> int:
    """The newest term a peer has heard of (its WAL's, or one it was told of)."""
    return max(view.term, int((view.health or {}).get("term_seen", 0) or 0))


def _follows(view: PeerView) -> str | None:
    replication = (view.health or {}).get("replication")
    if view.role != "follower" or not isinstance(replication, dict):
        return None
    leader = replication.get("leader")
    return None if leader is None else str(leader)


class LeadershipGuard:
    """Runs beside a node that may lead: confirms it, or deposes it (see the module doc)."""

    def __init__(self, node: Node, known: KnownPeers) -> None:
        self.node = node
        self.known = known
        self.state = LeadershipState.IDLE
        self.reason: str | None = None
        self.last_round: list[dict[str, Any]] = []
        self.newer: tuple[int, str | None] | None = None  # a newer term, its leader's URL
        self._task: asyncio.Task[None] | None = None

    def peer_urls(self) -> list[str]:
        """The URLs to ask: ``--peers`` and the followers known, not this node's own URL."""
        own = self.node.replication.http_url
        urls = dict.fromkeys(
            normalize_url(u) for u in (*self.node.config.peers, *self.known.urls.values())
        )
        if own:
            urls.pop(normalize_url(own), None)
        return list(urls)

    def write_block(self) -> str | None:
        """Why the leader must not take writes yet (None: it may)."""
        if self.state is LeadershipState.CONFIRMING:
            return self.reason or "confirming leadership with its peers"
        return None

    async def start(self) -> None:
        """On a leader: one round now (writes wait for it), then the loop in the background.
        Nothing to do when already confirmed (by a promotion, or by code that embeds the node
        and knows nobody else leads)."""
        if self.state is LeadershipState.CONFIRMED and self.node.leader is not None:
            await begin_restart_term(self.node)  # a new term at every start
            return
        if self.node.leader is None or self.node.leader.fenced is not None:
            self.state = LeadershipState.IDLE
        elif not self.peer_urls():
            await begin_restart_term(self.node)  # a new term at every start, before writes
            self.state = LeadershipState.UNCHECKED
            self.reason = "no peer known: nobody to ask whether a newer term exists"
        else:
            self.state = LeadershipState.CONFIRMING
            self.reason = "asking its peers whether a newer term exists"
            await self.check_once()
            self._task = asyncio.create_task(self._run(), name="leadership-guard")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def confirmed(self, reason: str) -> None:
        """This node just became leader of a term above every one it saw (a promotion)."""
        self.state, self.reason = LeadershipState.CONFIRMED, reason

    def idle(self) -> None:
        self.state, self.reason = LeadershipState.IDLE, None

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason, "peers": self.last_round}

    async def _run(self) -> None:
        # until confirmed, or deposed and following the newer term's leader
        while self.state in (LeadershipState.CONFIRMING, LeadershipState.DEPOSED):
            if self.node.leader is None:
                self.idle()
                return
            await asyncio.sleep(CONFIRM_POLL_S)
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except WalshipError as exc:
                log.warning("leadership check: %s", exc.message)
            except Exception:  # never let the guard die silently
                log.exception("leadership check failed; asking again")

    async def check_once(self) -> None:
        """Ask every peer once and act on the verdict."""
        node = self.node
        leader = node.leader
        urls = self.peer_urls()
        if leader is None or not urls:
            if leader is None:
                self.idle()
            elif self.state is LeadershipState.CONFIRMING:  # its peers were all forgotten
                self.state, self.reason = LeadershipState.UNCHECKED, "no peer known"
            return
        views = await fetch_views(urls, verify=node.config.peer_verify)  # --http-tls-ca
        self.last_round = [
            {"url": v.url, "node_id": v.node_id, "term": known_term(v), "error": v.error}
            for v in views
        ]
        if node.leader is not leader:
            return  # the role changed while asking: the next round starts over
        verdict = judge(node.node_id, leader.term, views)
        if verdict.state is LeadershipState.DEPOSED:
            await self._deposed(verdict)
        elif leader.fenced is not None:
            self.state, self.reason = LeadershipState.DEPOSED, leader.fenced
        elif verdict.state is LeadershipState.CONFIRMED:
            if self.state is not LeadershipState.CONFIRMED:
                log.info("leadership of term %d confirmed: %s", leader.term, verdict.reason)
                # a new term above every one the peers know, before the first write
                await begin_restart_term(node, [known_term(v) for v in views if v.answered])
            self.state, self.reason = LeadershipState.CONFIRMED, verdict.reason
        elif self.state is LeadershipState.CONFIRMING:
            # only a leader not yet allowed to write waits: one that leads (confirmed, or with
            # nobody to ask at its start) and loses its peers keeps leading -- the followers
            # that still connect fence it if they know better
            if self.reason != verdict.reason:
                log.warning("%s", verdict.reason)
            self.state, self.reason = LeadershipState.CONFIRMING, verdict.reason

    async def _deposed(self, verdict: Verdict) -> None:
        node = self.node
        leader = node.leader
        assert leader is not None
        if self.state is not LeadershipState.DEPOSED or self.reason != verdict.reason:
            log.error("deposed: %s", verdict.reason)
        self.state, self.reason = LeadershipState.DEPOSED, verdict.reason
        follow = verdict.follow
        url = None if follow is None else str((follow.health or {}).get("url") or follow.url)
        self.newer = (verdict.newer_term, url)
        leader.fence(verdict.reason, verdict.newer_term)
        if follow is None or follow.replication_address is None or not node.replication.secret:
            return
        await node.repoint(follow.replication_address)
