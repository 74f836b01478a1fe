"""Prometheus metrics of replication, in the node's registry. Follower label values are
bounded to known node ids and removed when a follower is forgotten.

Names follow Prometheus' conventions so that ``promtool check metrics`` passes: base units
(seconds, bytes) named last, ``_total`` on counters. The figures kept in milliseconds inside
walship (``lag_ms``) are published divided by 1000.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sized
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class _FollowerView(Protocol):
    sent_lsn: int
    durable_lsn: int
    applied_lsn: int
    in_sync: bool

    def lag_ms(self) -> float: ...
    def lag_records(self) -> int: ...


class _LeaderSide(Protocol):
    """What the leader-side gauges read of a Leader at a scrape."""

    @property
    def sessions(self) -> Sized: ...
    @property
    def tracker(self) -> Any: ...  # its ``in_sync`` set


class _FollowerSide(Protocol):
    """What the follower-side gauges read of a Follower at a scrape."""

    @property
    def connected(self) -> bool: ...
    @property
    def durable_lsn(self) -> int: ...
    @property
    def applied_lsn(self) -> int: ...
    @property
    def leader_lsn(self) -> int: ...

    def lag_ms(self) -> float | None: ...
    def lag_records(self) -> int: ...


class ReplicationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(f"walship_replication_{name}", doc, labels, registry=registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"walship_replication_{name}", doc, registry=registry)

        # leader side
        self.followers = gauge("followers", "Connected followers")
        self.in_sync = gauge("in_sync", "Followers in the in-sync set")
        self.follower_lag_seconds = gauge(
            "follower_lag_seconds",
            "How long ago the leader wrote the oldest record the follower has not acked",
            "node_id",
        )
        self.follower_lag_records = gauge(
            "follower_lag_records",
            "Records written by the leader and not yet acked by the follower",
            "node_id",
        )
        self.follower_durable_lsn = gauge(
            "follower_durable_lsn", "Highest lsn the follower has durably written", "node_id"
        )
        self.follower_applied_lsn = gauge(
            "follower_applied_lsn",
            "Highest lsn the follower has applied (readable there)",
            "node_id",
        )
        self.follower_sent_lsn = gauge(
            "follower_sent_lsn", "Highest lsn the leader has sent to the follower", "node_id"
        )
        self.follower_in_sync = gauge("follower_in_sync", "1 when in the in-sync set", "node_id")
        self.shipped_records = counter("shipped_records", "WAL records sent to followers")
        self.snapshots_sent = counter("snapshots_sent", "Snapshots sent to followers")
        self.snapshot_bytes = counter("snapshot_bytes", "Snapshot bytes sent")
        self.snapshots_redirected = counter(
            "snapshots_redirected",
            "Leader: followers needing a snapshot sent to a serving follower instead",
        )
        self.snapshots_confirmed = counter(
            "snapshots_confirmed",
            "Leader: snapshots fetched from a serving follower that it vouched for",
        )
        # physical followers (replication/physical.py)
        self.parts_sent = counter("parts_sent", "Parquet parts shipped to followers")
        self.part_bytes_sent = counter("part_bytes_sent", "Parquet part bytes shipped")
        self.parts_received = counter("parts_received", "Parquet parts received from the leader")
        self.parts_installed = counter("parts_installed", "Leader's parts verified and installed")
        self.parts_refused = counter(
            "parts_refused", "Leader's parts that failed verification (rebuilt from the WAL)"
        )
        self.part_bytes_received = counter(
            "part_bytes_received", "Parquet part bytes received from the leader"
        )
        self.auth_failures = counter("auth_failures", "Connections refused by authentication")
        self.handshakes_refused = counter(
            "handshakes_refused",
            "Connections closed at once: unauthenticated_connections_max were in their handshake",
        )
        self.degraded_writes = gauge(
            "degraded_writes",
            "Writes in the degradation ledger: committed without the acknowledgements their "
            "mode required (persisted, so it survives a restart)",
        )
        self.ledger_save_failures = counter(
            "ledger_save_failures",
            "Degradation ledger saves that failed (the next save writes what they missed)",
        )
        self.degraded_ranges = gauge("degraded_ranges", "Lsn ranges in the degradation ledger")
        self.at_risk_writes = gauge(
            "at_risk_writes",
            "Degraded writes not yet held by as many followers as the ack mode asks: lost "
            "with the leader (persisted with the ledger)",
        )
        self.at_risk_ranges = gauge(
            "at_risk_ranges", "Lsn ranges of the degradation ledger still at risk"
        )
        self.ack_wait_seconds = Histogram(
            "walship_replication_ack_wait_seconds",
            "Time writes waited for follower acknowledgements",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1.0, 5.0),
            registry=registry,
        )
        self.lag_budget_seconds = gauge(
            "lag_budget_seconds",
            "--max-replication-lag-ms: writes slow down to keep in-sync followers within it "
            "(0: off)",
        )
        self.lag_budget_waiting = gauge(
            "lag_budget_waiting", "Writes held back now by the replication lag budget"
        )
        self.lag_budget_wait_seconds = Histogram(
            "walship_replication_lag_budget_wait_seconds",
            "How long writes the replication lag budget held back waited",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.fenced = gauge("fenced", "1 while this node is a fenced (deposed) leader")
        self.in_sync_required = gauge(
            "in_sync_required",
            "Followers that must be in sync for the leader's ack mode to be met "
            "(0 on a follower and on an async leader)",
        )
        self.max_lag_seconds = gauge(
            "max_lag_seconds", "--max-lag-ms: a follower further behind leaves the in-sync set"
        )
        self.follower_retention_bytes = gauge(
            "follower_retention_bytes",
            "WAL bytes the leader keeps for the follower (its retention slot, connected or not)",
            "node_id",
        )
        self.follower_retention_exhaustion_seconds = gauge(
            "follower_retention_exhaustion_seconds",
            "When the follower's retention slot reaches the retention cap at the current ingest "
            "rate and lag (+Inf while its lag does not grow; 0 at the cap)",
            "node_id",
        )
        self.retention_bytes_max = gauge(
            "retention_bytes_max",
            "--wal-retention-bytes-max: a slot past it no longer holds WAL back (snapshot)",
        )
        self.retention_slots = gauge(
            "retention_slots",
            "Followers the leader keeps WAL for (connected or not); 0 on a follower",
        )
        # follower side
        self.frames_rejected = counter(
            "frames_rejected", "Frames a follower rejected (checksum, gap, chain)"
        )
        self.reconnects = counter("reconnects", "Follower reconnects to its leader")
        self.applied_records = counter("applied_records", "Records a follower applied")
        self.leader_lag_seconds = gauge(
            "lag_seconds", "Follower: time lag behind the leader (NaN while unknown)"
        )
        self.leader_lag_records = gauge("lag_records", "Follower: records behind the leader")
        self.connected = gauge("connected", "Follower: 1 while connected to its leader")
        self.durable_lsn = gauge(
            "durable_lsn", "Follower: highest lsn durably written (what it acknowledges)"
        )
        self.applied_lsn = gauge("applied_lsn", "Follower: highest lsn applied")
        self.leader_lsn = gauge(
            "leader_lsn", "Follower: the leader's last lsn, as last heard from it"
        )
        self.snapshots_from_followers = counter(
            "snapshots_from_followers",
            "Follower: snapshots installed that a serving follower sent (not the leader)",
        )
        self.snapshot_fallbacks = counter(
            "snapshot_fallbacks",
            "Follower: redirects for a snapshot given up (no source served one the leader "
            "vouched for): the next one comes from the leader",
        )
        self.snapshots_received = counter(
            "snapshots_received", "Follower: snapshots received and installed"
        )
        self.divergence_repairs = counter(
            "divergence_repairs",
            "Times a follower cut its log back to the leader's history (records to lost-and-found)",
        )
        self.lost_found_records = counter(
            "lost_found_records", "Records moved to lost-and-found by divergence repair"
        )
        # both
        self.term = gauge("term", "The node's current term")
        self.is_leader = Gauge(
            "walship_is_leader",
            "1 while this node is the leader, 0 as a follower",
            registry=registry,
        )
        self._labels: set[str] = set()

    def follow_roles(
        self,
        leader: Callable[[], _LeaderSide | None],
        follower: Callable[[], _FollowerSide | None],
    ) -> None:
        """Read the role-bound gauges from the node's current Leader or Follower at each
        scrape, so that none outlives its role: a follower promoted to leader kept its last
        lag, ``connected`` and lsns for ever (and a deposed leader its follower counts).
        A role's gauges read 0 on the other role (a lag of 0: nothing to be behind)."""

        def of_follower(read: Callable[[_FollowerSide], float]) -> Callable[[], float]:
            def value() -> float:
                f = follower()
                return 0.0 if f is None else read(f)

            return value

        def lag_seconds(f: _FollowerSide) -> float:
            lag_ms = f.lag_ms()
            return math.nan if lag_ms is None else lag_ms / 1000

        self.connected.set_function(of_follower(lambda f: 1.0 if f.connected else 0.0))
        self.durable_lsn.set_function(of_follower(lambda f: f.durable_lsn))
        self.applied_lsn.set_function(of_follower(lambda f: f.applied_lsn))
        self.leader_lsn.set_function(of_follower(lambda f: f.leader_lsn))
        self.leader_lag_records.set_function(of_follower(lambda f: f.lag_records()))
        self.leader_lag_seconds.set_function(of_follower(lag_seconds))

        def followers() -> float:
            lead = leader()
            return 0.0 if lead is None else float(len(lead.sessions))

        def in_sync() -> float:
            lead = leader()
            return 0.0 if lead is None else float(len(lead.tracker.in_sync))

        self.followers.set_function(followers)
        self.in_sync.set_function(in_sync)

    def forget_followers(self) -> None:
        """This node leads no more: drop every per-follower series (the session figures and
        the retention slots' forecasts), which nothing would update or remove after."""
        for gauge in (
            self.follower_lag_seconds,
            self.follower_lag_records,
            self.follower_durable_lsn,
            self.follower_applied_lsn,
            self.follower_sent_lsn,
            self.follower_in_sync,
            self.follower_retention_bytes,
            self.follower_retention_exhaustion_seconds,
        ):
            gauge.clear()
        self._labels.clear()

    def set_follower(self, node_id: str, view: _FollowerView | Any | None) -> None:
        """Publish one follower's figures; ``None`` removes its label values."""
        gauges = (
            self.follower_lag_seconds,
            self.follower_lag_records,
            self.follower_durable_lsn,
            self.follower_applied_lsn,
            self.follower_sent_lsn,
            self.follower_in_sync,
        )
        if view is None:
            if node_id in self._labels:
                for g in gauges:
                    g.remove(node_id)
                self._labels.discard(node_id)
            return
        self._labels.add(node_id)
        self.follower_lag_seconds.labels(node_id).set(view.lag_ms() / 1000)
        self.follower_lag_records.labels(node_id).set(view.lag_records())
        self.follower_durable_lsn.labels(node_id).set(view.durable_lsn)
        self.follower_applied_lsn.labels(node_id).set(view.applied_lsn)
        self.follower_sent_lsn.labels(node_id).set(view.sent_lsn)
        self.follower_in_sync.labels(node_id).set(1 if view.in_sync else 0)
