"""The fault schedule: one fault at a time, chosen, aimed and timed by ``random.Random(seed)``.

Each step picks a fault kind from the enabled ones, a target by role (the leader, or the k-th
follower), how long to hold it and how long to wait before the next, injects it, holds it and
heals it. Nodes are addressed by role rather than by name, so the same seed gives the same
sequence of kinds and roles even when a failover changes who leads.

* ``kill``: SIGKILL a node, read what its disk holds (the checker compares that with what it
  had acknowledged), start it again. A killed leader is replaced by the most caught-up
  follower when ``failover`` is enabled; otherwise writes fail until it is back.
* ``restart``: SIGTERM (a clean stop) and start again.
* ``partition``: a follower's link (or every link: the leader alone) refuses connections.
* ``delay``: a link forwards every chunk late.
* ``corrupt``: a link flips bits in the next chunks, and now and then while held.
* ``pause``: SIGSTOP a node, SIGCONT after the hold.
* ``failover``: SIGKILL the leader (half the time after cutting it off from every follower
  for a while, so it holds writes nobody confirmed), promote the most caught-up follower,
  repoint the others; the old leader comes back as a follower and its unreplicated tail must
  go to lost-and-found.
* ``rejoin``: the same failover of an isolated leader, but the old leader comes back only
  once the new one has checkpointed and removed the WAL at its end of log (its retention
  slot, if any, forgotten): only the new leader's term history can tell that tail apart, and
  it must still go to lost-and-found. Runs with it checkpoint every second in small WAL
  segments, and the fault writes ballast while it waits, so the removal comes within
  seconds in every ack mode.
* ``acker_down``: a failover while the follower that acknowledged the latest writes is
  unreachable (``acker_down.py``): the follower that lacks them must not be promoted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections import Counter
from typing import Any

import httpx

from walship.verify import acker_down
from walship.verify.cluster import ClusterError, Link, VerifyCluster, VerifyNode
from walship.verify.config import VerifyConfig
from walship.verify.history import History, Rejoin
from walship.verify.workload import EVENT_TYPE, Workload

LEADER_SHARE = 0.4
"""How often a node fault (kill, restart, pause) hits the leader rather than a follower."""
ISOLATE_FIRST_SHARE = 0.5
"""How often a failover first cuts the leader off from every follower, then kills it."""
REJOIN_CHECKPOINT_INTERVAL_MS = 1_000
REJOIN_SEGMENT_BYTES_MAX = 64 * 1024
"""With ``rejoin``: checkpoints and WAL segments small enough that a new leader removes the
WAL at the old leader's position within seconds of ordinary load."""
REJOIN_WAL_WAIT_S = 20.0
"""How long ``rejoin`` waits for that removal before bringing the old leader back anyway."""
BALLAST_EVENTS = 16
BALLAST_PAYLOAD_BYTES = 4 * 1024
"""``rejoin`` writes batches of this many events this large (a WAL segment a request) while it
waits: the removal then takes seconds in every ack mode, also where the workload's own
writes each wait out the ack timeout (quorum:2 with a node down)."""


def settings_for(config: VerifyConfig, kinds: tuple[str, ...]) -> VerifyConfig:
    """``config`` with the node settings the enabled faults need."""
    if "rejoin" not in kinds:
        return config
    return dataclasses.replace(
        config,
        checkpoint_interval_ms=min(config.checkpoint_interval_ms, REJOIN_CHECKPOINT_INTERVAL_MS),
        segment_bytes_max=min(config.segment_bytes_max, REJOIN_SEGMENT_BYTES_MAX),
    )


class FaultScheduler:
    """Runs the schedule until the deadline (seconds of history time)."""

    def __init__(
        self,
        cluster: VerifyCluster,
        history: History,
        config: VerifyConfig,
        kinds: tuple[str, ...],
    ) -> None:
        self.cluster = cluster
        self.history = history
        self.config = config
        self.kinds = kinds
        self.rng = random.Random(f"{config.seed}/faults")
        # its own: how much ballast a rejoin writes depends on timing, the schedule must not
        self.ballast_rng = random.Random(f"{config.seed}/ballast")
        self.injected: Counter[str] = Counter()
        self.harness_errors: list[str] = []

    async def run(self, deadline: float) -> None:
        if not self.kinds:
            return
        rng = self.rng
        await asyncio.sleep(rng.uniform(0.5, 1.5))  # let the workload get going first
        while self.history.now() < deadline - 1.0:
            kind = rng.choice(self.kinds)
            lo, hi = self.config.fault_hold_s
            hold = min(rng.uniform(lo, hi), max(deadline - self.history.now(), 0.2))
            try:
                await getattr(self, f"_{kind}")(hold)
            except (ClusterError, OSError, RuntimeError) as exc:
                # the harness could not do what the step needs: keep going, report it
                message = f"{kind}: {exc}"
                self.harness_errors.append(message)
                self.history.fault(kind, "-", "note", f"harness error: {exc}")
            await asyncio.sleep(rng.uniform(*self.config.fault_gap_s))

    # ------------------------------------------------------------------ choosing targets

    def _node(self) -> VerifyNode:
        followers = self.cluster.followers()
        if not followers or self.rng.random() < LEADER_SHARE:
            return self.cluster.require_leader()
        return followers[self.rng.randrange(len(followers))]

    def _links(self) -> tuple[str, list[Link]]:
        """One follower's link, or (one time in four) every follower's: the leader alone."""
        followers = self.cluster.followers()
        if not followers:
            return "-", []
        if len(followers) > 1 and self.rng.random() < 0.25:
            return "all followers", [n.link for n in followers]
        node = followers[self.rng.randrange(len(followers))]
        return node.node_id, [node.link]

    def _role(self, node: VerifyNode) -> str:
        return f"{node.node_id} ({node.role})"

    # ------------------------------------------------------------------ the faults

    async def _kill(self, hold: float) -> None:
        node = self._node()
        if node is self.cluster.leader and self.cluster.failover and self.cluster.followers():
            await self._failover(hold, "kill")
            return
        image = await asyncio.to_thread(self.cluster.kill, node)
        self.injected["kill"] += 1
        self.history.fault(
            "kill",
            self._role(node),
            "inject",
            f"SIGKILL; disk holds lsn {image.wal_first_lsn}..{image.last_lsn}"
            + (" (writes fail until it is back)" if node is self.cluster.leader else ""),
        )
        await asyncio.sleep(hold)
        await asyncio.to_thread(self.cluster.restart, node)
        self.history.fault("kill", self._role(node), "heal", "started again")

    async def _restart(self, hold: float) -> None:
        node = self._node()
        code = await asyncio.to_thread(self.cluster.stop, node)
        self.injected["restart"] += 1
        self.history.fault("restart", self._role(node), "inject", f"SIGTERM, exit code {code}")
        await asyncio.sleep(min(hold, 0.5))
        await asyncio.to_thread(self.cluster.restart, node)
        self.history.fault("restart", self._role(node), "heal", "started again")

    async def _partition(self, hold: float) -> None:
        target, links = self._links()
        if not links:
            return
        for link in links:
            await asyncio.to_thread(link.proxy.set_refuse, True)
        self.injected["partition"] += 1
        self.history.fault("partition", target, "inject", "link refuses connections")
        await asyncio.sleep(hold)
        for link in links:
            link.proxy.set_refuse(False)
        self.history.fault("partition", target, "heal")

    async def _delay(self, hold: float) -> None:
        target, links = self._links()
        if not links:
            return
        delay_ms = self.rng.choice((20, 50, 100, 250))
        for link in links:
            link.proxy.set_delay_ms(delay_ms)
        self.injected["delay"] += 1
        self.history.fault("delay", target, "inject", f"{delay_ms} ms per chunk")
        await asyncio.sleep(hold)
        for link in links:
            link.proxy.set_delay_ms(0)
        self.history.fault("delay", target, "heal")

    async def _corrupt(self, hold: float) -> None:
        target, links = self._links()
        if not links:
            return
        direction = self.rng.choice(("up", "down"))
        count = self.rng.randint(1, 3)
        probability = self.rng.choice((0.0, 0.01, 0.05))
        flipped_before = sum(link.proxy.state.flipped for link in links)
        for link in links:
            link.proxy.flip_next(direction, count)  # type: ignore[arg-type]
            link.proxy.set_flip_probability(probability)
        self.injected["corrupt"] += 1
        self.history.fault(
            "corrupt",
            target,
            "inject",
            f"flip a bit in the next {count} {direction} chunks, then p={probability}",
        )
        await asyncio.sleep(hold)
        for link in links:
            link.proxy.set_flip_probability(0.0)
            link.proxy.state.flips_pending.update(up=0, down=0)
        flipped = sum(link.proxy.state.flipped for link in links) - flipped_before
        self.history.fault("corrupt", target, "heal", f"{flipped} chunks had a bit flipped")

    async def _pause(self, hold: float) -> None:
        node = self._node()
        self.cluster.pause(node)
        self.injected["pause"] += 1
        self.history.fault("pause", self._role(node), "inject", "SIGSTOP")
        await asyncio.sleep(hold)
        self.cluster.resume(node)
        self.history.fault("pause", self._role(node), "heal", "SIGCONT")

    async def _acker_down(self, hold: float) -> None:
        await acker_down.inject(self, hold)

    async def _failover(self, hold: float, via: str = "failover") -> None:
        cluster = self.cluster
        old = cluster.require_leader()
        if not cluster.followers():
            return
        if self.rng.random() < ISOLATE_FIRST_SHARE:
            # cut the leader off first, so it takes writes nobody confirms: the promoted
            # follower lacks them, and the old leader's repair must move them to lost-and-found
            links = [n.link for n in cluster.followers()]
            for link in links:
                await asyncio.to_thread(link.proxy.set_refuse, True)
            isolated = self.rng.uniform(0.5, 2.0)
            self.history.fault(
                "failover", self._role(old), "note", f"isolated for {isolated:.1f} s"
            )
            await asyncio.sleep(isolated)
            image = await asyncio.to_thread(cluster.kill, old)
            for link in links:
                link.proxy.set_refuse(False)
        else:
            image = await asyncio.to_thread(cluster.kill, old)
        self.injected["failover"] += 1
        self.history.fault(
            "failover",
            self._role(old),
            "inject",
            f"SIGKILL of the leader ({via}); disk holds lsn "
            f"{image.wal_first_lsn}..{image.last_lsn}",
        )
        await self._promote_after_kill("failover", old)
        await asyncio.sleep(hold)
        await asyncio.to_thread(cluster.restart, old)
        self.history.fault("failover", self._role(old), "heal", "old leader back, repointed")

    async def _promote_after_kill(self, kind: str, old: VerifyNode) -> VerifyNode:
        """Promote the best follower once ``old`` (the leader) was killed; when nobody could
        be promoted, bring the old leader back and raise."""
        cluster = self.cluster
        try:
            new, detail = await asyncio.to_thread(cluster.promote_best)
        except ClusterError:
            if cluster.leader is old:
                await asyncio.to_thread(cluster.restart, old)
            raise
        self.history.fault(kind, new.node_id, "note", f"promoted: {detail}")
        return new

    async def _rejoin(self, hold: float) -> None:
        """Failover of an isolated leader, which rejoins only after the new leader removed
        the WAL at its end of log."""
        cluster = self.cluster
        old = cluster.require_leader()
        if not cluster.followers():
            return
        links = [n.link for n in cluster.followers()]
        for link in links:
            await asyncio.to_thread(link.proxy.set_refuse, True)
        # longer than the ack timeout: the writes it takes meanwhile are answered degraded
        isolated = self.rng.uniform(1.5, 3.0)
        self.history.fault("rejoin", self._role(old), "note", f"isolated for {isolated:.1f} s")
        await asyncio.sleep(isolated)
        image = await asyncio.to_thread(cluster.kill, old)
        for link in links:
            link.proxy.set_refuse(False)
        self.injected["rejoin"] += 1
        self.history.fault(
            "rejoin",
            self._role(old),
            "inject",
            f"SIGKILL of the isolated leader; disk holds lsn {image.wal_first_lsn}.."
            f"{image.last_lsn}",
        )
        new = await self._promote_after_kill("rejoin", old)
        # what lets a leader drop WAL a gone node once needed: the operator forgets it (or it
        # falls past the retention cap)
        forgot = await asyncio.to_thread(cluster.forget_follower, new, old.node_id)
        first = await self._wal_start_past(new, image.last_lsn, max(hold, REJOIN_WAL_WAIT_S))
        await asyncio.to_thread(cluster.restart, old)
        rejoin = Rejoin(old.node_id, image, new.node_id, first)
        self.history.rejoins.append(rejoin)
        self.history.fault(
            "rejoin",
            self._role(old),
            "heal",
            f"back as a follower; {new.node_id}'s WAL starts at lsn {first}, "
            + ("past" if rejoin.wal_removed else "NOT past (waited in vain)")
            + f" its end of log {image.last_lsn}"
            + ("; its slot was forgotten" if forgot else ""),
        )

    async def _wal_start_past(self, node: VerifyNode, lsn: int, timeout_s: float) -> int:
        """Write ballast until ``node``'s WAL starts after ``lsn``; the start last seen (0:
        unknown). The ballast is recorded and checked like every other write."""
        deadline = self.history.now() + timeout_s
        first = 0
        workload = Workload(self.cluster, self.history, self.config)
        timeout = httpx.Timeout(self.config.request_timeout_s, connect=2.0)
        async with httpx.AsyncClient(timeout=timeout) as client:
            while True:
                seen = await asyncio.to_thread(self.cluster.wal_first_lsn, node)
                first = seen if seen is not None else first
                if first > lsn + 1 or self.history.now() > deadline:
                    return first
                await workload.send(client, 0, 1, self._ballast())
                await asyncio.sleep(0.1)

    def _ballast(self) -> list[dict[str, Any]]:
        rng = self.ballast_rng
        return [
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "entity_id": f"e{rng.randrange(self.config.entities)}",
                "event_type": EVENT_TYPE,
                "payload": {"writer": 0, "ballast": "b" * BALLAST_PAYLOAD_BYTES},
            }
            for _ in range(BALLAST_EVENTS)
        ]
