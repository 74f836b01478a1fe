"""Whether a node can do its job now: the reasons behind ``/health/ready`` and ``/health``.

A load balancer sends traffic only to nodes whose readiness list is empty. The list is built by
small checks, each naming one condition in words an operator can act on; a new condition (a
store alarm, say) is one more check appended to ``CHECKS``.

* Every node: its WAL must be writable, its checkpoints working (while they fail, memory and
  the WAL grow until writes are refused) and the node open.
* A leader: not fenced, allowed to write by its election (holds a live etcd lease) or, after
  a start, confirmed by its peers (``leadership.py``), and with
  as many followers in sync as its ack mode needs (``--min-in-sync``, ``semi-sync`` one,
  ``quorum:N`` N). An ``async`` leader waits for nobody, so followers do not count for it.
* A follower: connected to its leader, not installing a snapshot, and known to be within
  ``--max-lag-ms`` of it: behind by no more, and not silent for longer (a quiet link).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from walship.replication.follower import FollowerState

if TYPE_CHECKING:
    from walship.node import Node

Check = Callable[["Node"], list[str]]


def readiness(node: Node) -> list[str]:
    """Why ``node`` is not ready; empty when it is."""
    reasons: list[str] = []
    for check in CHECKS:
        reasons.extend(check(node))
    return reasons


def in_sync_floor(node: Node) -> int:
    """How many followers must be in sync for the leader's ack mode to be met at all."""
    config = node.replication  # the cluster's settings when learned from a leader
    mode = config.ack_mode
    if not mode.waits:
        return 0
    # a sync write waits for every in-sync follower, at least --min-in-sync of them (and one)
    return max(config.min_in_sync, 1 if mode.kind == "sync" else mode.count)


def _storage(node: Node) -> list[str]:
    if node.closed:
        return ["the node is closed"]
    failed = node.store.wal.failed
    return [] if failed is None else [f"the WAL accepts no writes: {failed.message}"]


def _checkpoints(node: Node) -> list[str]:
    failure = node.store.checkpoint_failure
    if failure is None:
        return []
    return [f"checkpoints are failing ({failure.failures} attempts): {failure.error}"]


def _leader(node: Node) -> list[str]:
    leader = node.leader
    if leader is None:
        return []
    if leader.fenced is not None:
        return [f"this leader of term {leader.term} is fenced: {leader.fenced}"]
    reasons = []
    gate = node.write_gate
    blocked = None if gate is None else gate()
    if blocked is not None:
        reasons.append(f"this leader takes no writes: {blocked}")
    unconfirmed = node.leadership.write_block()
    if unconfirmed is not None:
        reasons.append(f"this leader takes no writes yet: {unconfirmed}")
    floor = in_sync_floor(node)
    in_sync = len(leader.tracker.in_sync)
    if in_sync < floor:
        config = node.replication
        reasons.append(
            f"{in_sync} of {len(leader.sessions)} connected followers in sync, fewer than the "
            f"{floor} that ack mode {config.ack_mode} needs (--min-in-sync {config.min_in_sync})"
        )
    return reasons


def _follower(node: Node) -> list[str]:
    follower = node.follower
    if follower is None:
        return []
    if not follower.connected:
        error = f": {follower.last_error}" if follower.last_error else ""
        return [
            f"not connected to its leader at {follower.leader_address} "
            f"(state {follower.state.value}{error})"
        ]
    if follower.state is FollowerState.SNAPSHOT:
        return [f"installing a snapshot from its leader at {follower.leader_address}"]
    max_lag_ms = node.replication.max_lag_ms
    # a link that went quiet without closing keeps ``connected`` and a lag of 0 records until
    # the read deadline (10 s by default); the leader heartbeats an idle link, so a silence
    # longer than --max-lag-ms (and than two heartbeats) means the lag is no longer known
    silence_ms = follower.silence_ms()
    silence_max_ms = max(max_lag_ms, 2 * node.limits.heartbeat_interval_ms)
    if silence_ms is not None and silence_ms > silence_max_ms:
        return [
            f"nothing heard from its leader at {follower.leader_address} for "
            f"{silence_ms:.0f} ms (over {silence_max_ms} ms): it may be that far behind"
        ]
    lag_ms = follower.lag_ms()
    if lag_ms is None:
        return [f"{follower.lag_records()} records behind its leader, for an unknown time"]
    if lag_ms > max_lag_ms:
        return [
            f"{lag_ms:.0f} ms ({follower.lag_records()} records) behind its leader, over "
            f"--max-lag-ms {max_lag_ms}"
        ]
    return []


CHECKS: list[Check] = [_storage, _checkpoints, _leader, _follower]
"""Every readiness check, in the order their reasons are listed."""
