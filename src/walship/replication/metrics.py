"""Prometheus metrics of replication, in the node's registry. Follower label values are
bounded to known node ids and removed when a follower is forgotten."""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class _FollowerView(Protocol):
    sent_lsn: int
    durable_lsn: int
    applied_lsn: int
    in_sync: bool

    def lag_ms(self) -> float: ...
    def lag_records(self) -> int: ...


class ReplicationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.followers = Gauge("walship_replication_followers", "Connected followers", registry=r)
        self.in_sync = Gauge(
            "walship_replication_in_sync", "Followers in the in-sync set", registry=r
        )
        self.follower_lag_ms = Gauge(
            "walship_replication_follower_lag_ms",
            "How long ago the leader wrote the oldest record the follower has not acked",
            ["node_id"],
            registry=r,
        )
        self.follower_lag_records = Gauge(
            "walship_replication_follower_lag_records",
            "Records written by the leader and not yet acked by the follower",
            ["node_id"],
            registry=r,
        )
        self.follower_durable_lsn = Gauge(
            "walship_replication_follower_durable_lsn",
            "Highest lsn the follower has durably written",
            ["node_id"],
            registry=r,
        )
        self.follower_applied_lsn = Gauge(
            "walship_replication_follower_applied_lsn",
            "Highest lsn the follower has applied (readable there)",
            ["node_id"],
            registry=r,
        )
        self.follower_sent_lsn = Gauge(
            "walship_replication_follower_sent_lsn",
            "Highest lsn the leader has sent to the follower",
            ["node_id"],
            registry=r,
        )
        self.follower_in_sync = Gauge(
            "walship_replication_follower_in_sync",
            "1 when in the in-sync set",
            ["node_id"],
            registry=r,
        )
        self.shipped_records = Counter(
            "walship_replication_shipped_records", "WAL records sent to followers", registry=r
        )
        self.snapshots_sent = Counter(
            "walship_replication_snapshots_sent", "Snapshots sent to followers", registry=r
        )
        self.snapshot_bytes = Counter(
            "walship_replication_snapshot_bytes", "Snapshot bytes sent", registry=r
        )
        self.auth_failures = Counter(
            "walship_replication_auth_failures", "Connections refused by authentication", registry=r
        )
        self.degraded_writes = Gauge(
            "walship_replication_degraded_writes",
            "Writes in the degradation ledger: committed without the acknowledgements their "
            "mode required (persisted, so it survives a restart)",
            registry=r,
        )
        self.ledger_save_failures = Counter(
            "walship_replication_ledger_save_failures",
            "Degradation ledger saves that failed (the next save writes what they missed)",
            registry=r,
        )
        self.degraded_ranges = Gauge(
            "walship_replication_degraded_ranges",
            "Lsn ranges in the degradation ledger",
            registry=r,
        )
        self.ack_wait_seconds = Histogram(
            "walship_replication_ack_wait_seconds",
            "Time writes waited for follower acknowledgements",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1.0, 5.0),
            registry=r,
        )
        # follower side
        self.frames_rejected = Counter(
            "walship_replication_frames_rejected",
            "Frames a follower rejected (checksum, gap, chain)",
            registry=r,
        )
        self.reconnects = Counter(
            "walship_replication_reconnects", "Follower reconnects to its leader", registry=r
        )
        self.applied_records = Counter(
            "walship_replication_applied_records", "Records a follower applied", registry=r
        )
        self.leader_lag_ms = Gauge(
            "walship_replication_lag_ms", "Follower: time lag behind the leader", registry=r
        )
        self.leader_lag_records = Gauge(
            "walship_replication_lag_records", "Follower: records behind the leader", registry=r
        )
        self.connected = Gauge(
            "walship_replication_connected", "Follower: 1 while connected to its leader", registry=r
        )
        self.durable_lsn = Gauge(
            "walship_replication_durable_lsn",
            "Follower: highest lsn durably written (what it acknowledges)",
            registry=r,
        )
        self.applied_lsn = Gauge(
            "walship_replication_applied_lsn", "Follower: highest lsn applied", registry=r
        )
        self.leader_lsn = Gauge(
            "walship_replication_leader_lsn",
            "Follower: the leader's last lsn, as last heard from it",
            registry=r,
        )
        self.snapshots_received = Counter(
            "walship_replication_snapshots_received",
            "Follower: snapshots received and installed",
            registry=r,
        )
        self.divergence_repairs = Counter(
            "walship_replication_divergence_repairs",
            "Times a follower cut its log back to the leader's history (records to lost-and-found)",
            registry=r,
        )
        self.lost_found_records = Counter(
            "walship_replication_lost_found_records",
            "Records moved to lost-and-found by divergence repair",
            registry=r,
        )
        self.fenced = Gauge(
            "walship_replication_fenced", "1 while this leader is fenced (deposed)", registry=r
        )
        self.term = Gauge("walship_replication_term", "The node's current term", registry=r)
        self._labels: set[str] = set()

    def set_follower(self, node_id: str, view: _FollowerView | Any | None) -> None:
        """Publish one follower's figures; ``None`` removes its label values."""
        gauges = (
            self.follower_lag_ms,
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
        self.follower_lag_ms.labels(node_id).set(view.lag_ms())
        self.follower_lag_records.labels(node_id).set(view.lag_records())
        self.follower_durable_lsn.labels(node_id).set(view.durable_lsn)
        self.follower_applied_lsn.labels(node_id).set(view.applied_lsn)
        self.follower_sent_lsn.labels(node_id).set(view.sent_lsn)
        self.follower_in_sync.labels(node_id).set(1 if view.in_sync else 0)
