"""Fault ``acker_down``: a failover while the follower that acknowledged the latest writes is
unreachable, and the check that no promotion lost a write answered ``replicated``.

The double fault of issue 17 (4), seeded: one follower (the *lagging* one) is cut off until
the leader drops it from the in-sync set, so the writes after that are acknowledged by another
follower (the *acker*) alone; the acker is paused (SIGSTOP) and the leader killed. The lagging
follower, the only one that answers, lacks writes answered ``replicated``: asked to promote
itself it must refuse. The harness then resumes the acker and fails over as usual (the acker
leads, nothing is lost). Had the promotion been accepted, the run goes on with the lagging
follower as leader, the acker's tail is cut into lost-and-found when it rejoins, and the
checks flag every ``replicated`` write that is gone (``no_unclean_promotion`` names the ones
the promotion cut, in ``checker.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from walship.verify.checker import ACKER_DOWN as KIND
from walship.verify.cluster import NodeState, VerifyCluster, VerifyNode
from walship.verify.history import History

if TYPE_CHECKING:
    from walship.verify.faults import FaultScheduler

LEAVE_SET_S = 15.0
"""How long the lagging follower may take to leave the in-sync set once cut off (it leaves
after ``--max-lag-ms``, 1 s in verify runs)."""


def _in_sync(cluster: VerifyCluster) -> set[str] | None:
    """The followers the leader counts in sync (None when it does not answer)."""
    view = cluster.health(cluster.require_leader())
    if view is None:
        return None
    sessions = view["replication"].get("followers", [])
    return {s["node_id"] for s in sessions if s.get("in_sync")}


async def _wait_in_sync(cluster: VerifyCluster, want: set[str], drop: set[str]) -> bool:
    """Wait until the leader counts every node in ``want`` in sync and none in ``drop``."""
    deadline = time.monotonic() + LEAVE_SET_S
    while time.monotonic() < deadline:
        found = await asyncio.to_thread(_in_sync, cluster)
        if found is not None and want <= found and not (drop & found):
            return True
        await asyncio.sleep(0.1)
    return False


async def inject(scheduler: FaultScheduler, hold: float) -> None:
    """One ``acker_down`` step (see the module docstring); skipped with fewer than two live
    followers."""
    cluster, history, rng = scheduler.cluster, scheduler.history, scheduler.rng
    old = cluster.require_leader()
    live = [n for n in cluster.followers() if n.state is NodeState.UP]
    if len(live) < 2:
        history.fault(KIND, "-", "note", "skipped: needs two live followers")
        return
    lagging, acker = rng.sample(live, 2)
    # both must have stored a set naming them both: the lagging one then knows of the acker
    if not await _wait_in_sync(cluster, {lagging.node_id, acker.node_id}, set()):
        history.fault(KIND, "-", "note", "skipped: the followers were not both in sync")
        return
    await asyncio.to_thread(lagging.link.proxy.set_refuse, True)
    left = await _wait_in_sync(cluster, {acker.node_id}, {lagging.node_id})
    if not left:
        lagging.link.proxy.set_refuse(False)
        history.fault(KIND, lagging.node_id, "note", "skipped: it never left the in-sync set")
        return
    await asyncio.sleep(rng.uniform(0.3, 1.0))  # writes acknowledged by the acker alone
    cluster.pause(acker)
    image = await asyncio.to_thread(cluster.kill, old)
    lagging.link.proxy.set_refuse(False)
    scheduler.injected[KIND] += 1
    history.fault(
        KIND,
        f"{old.node_id} (leader)",
        "inject",
        f"SIGKILL of the leader (disk holds lsn ..{image.last_lsn}) while {acker.node_id}, "
        f"alone in sync, is paused and {lagging.node_id} lags",
    )
    try:
        await _fail_over(cluster, history, old, lagging, acker)
    finally:
        if acker.state is NodeState.PAUSED:
            cluster.resume(acker)
    await asyncio.sleep(hold)
    await asyncio.to_thread(cluster.restart, old)
    history.fault(KIND, f"{old.node_id} (old leader)", "heal", "back, repointed")


async def _fail_over(
    cluster: VerifyCluster,
    history: History,
    old: VerifyNode,
    lagging: VerifyNode,
    acker: VerifyNode,
) -> None:
    views = await asyncio.to_thread(cluster.wait_disconnected, [lagging])
    view = views[lagging.node_id] or {}
    position = (int(view.get("last_term", 0)), int(view.get("last_lsn", 0)))
    response = await asyncio.to_thread(cluster.try_promote, lagging, list(cluster.nodes))
    if response.status_code == 200:
        # the promotion that loses writes: go on with it, the checks must see the cost
        history.fault(
            KIND,
            lagging.node_id,
            "note",
            f"UNCLEAN: promoted although {acker.node_id} was unreachable, at "
            f"{position[0]}/{position[1]}",
        ).data.update(promoted=lagging.node_id, term=position[0], lsn=position[1])
        await asyncio.to_thread(cluster.adopt, lagging, response.json())
        cluster.resume(acker)
        await asyncio.to_thread(cluster.repoint, acker)
        return
    body: dict[str, Any] = {}
    try:
        body = response.json()
    except ValueError:
        pass
    message = str(body.get("message") or response.text)[:300]
    history.fault(
        KIND, lagging.node_id, "note", f"refused ({response.status_code}): {message}"
    ).data.update(refused=lagging.node_id, unclean=bool(body.get("unclean")))
    cluster.resume(acker)
    new, detail = await asyncio.to_thread(cluster.promote_best)
    history.fault(KIND, new.node_id, "note", f"promoted once {acker.node_id} was back: {detail}")
