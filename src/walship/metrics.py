"""Prometheus metrics of one node, in a registry of its own (several nodes can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
_GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class StoreMetrics:
    """The storage metrics: appends, fsync latency, group-commit size, checkpoints, memtable."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.appends = Counter("walship_appends", "Events appended (durable)", registry=r)
        self.append_requests = Counter(
            "walship_append_requests", "Append calls (single or batch)", registry=r
        )
        self.duplicates = Counter(
            "walship_duplicate_appends", "Appends answered with an existing receipt", registry=r
        )
        self.conflicts = Counter(
            "walship_version_conflicts", "Appends refused by expected_version", registry=r
        )
        self.fsync_seconds = Histogram(
            "walship_wal_fsync_seconds", "WAL fdatasync latency", buckets=_FSYNC_BUCKETS, registry=r
        )
        self.group_commit_records = Histogram(
            "walship_wal_group_commit_records",
            "Records written per group commit",
            buckets=_GROUP_BUCKETS,
            registry=r,
        )
        self.wal_bytes = Counter(
            "walship_wal_written_bytes", "Bytes written to the WAL", registry=r
        )
        self.checkpoint_seconds = Histogram(
            "walship_checkpoint_seconds", "Duration of a checkpoint to Parquet", registry=r
        )
        self.checkpoint_events = Counter(
            "walship_checkpointed_events", "Events written to Parquet parts", registry=r
        )
        self.checkpoint_failures = Counter(
            "walship_checkpoint_failures", "Checkpoints that failed (each retry counts)", registry=r
        )
        self.checkpoint_failing = Gauge(
            "walship_checkpoint_failing",
            "1 while checkpoints fail (the memtable and the WAL grow until one works)",
            registry=r,
        )
        self.memtable_events = Gauge(
            "walship_memtable_events", "Events held in memtables", registry=r
        )
        self.memtable_bytes = Gauge(
            "walship_memtable_bytes", "Approximate bytes held in memtables", registry=r
        )
        self.last_lsn = Gauge("walship_last_lsn", "Last lsn written to the WAL", registry=r)
        self.wal_failed = Gauge(
            "walship_wal_failed",
            "1 when the WAL accepts no writes: failed for good, or while the disk is full",
            registry=r,
        )

    def on_commit(self, records: int, nbytes: int, fsync_s: float) -> None:
        """WAL writer callback after each group commit."""
        self.group_commit_records.observe(records)
        self.wal_bytes.inc(nbytes)
        if fsync_s > 0:
            self.fsync_seconds.observe(fsync_s)
