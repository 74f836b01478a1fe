"""Every bound walship enforces, in one place, with its unit last in the name.

Crossing a limit gives ``LimitExceeded`` (or a protocol error that closes one connection),
never a crash or an unbounded allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB

LSN_MAX = (1 << 63) - 1
"""The highest lsn a query may name: the Parquet ``lsn`` column is int64."""

QUORUM_FOLLOWERS_MAX = 1_000
"""The largest N of ``quorum:N`` that parses at all (a cluster's own size bounds it further)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Named limits; one frozen instance is shared by a node."""

    # event model
    payload_bytes_max: int = 1 * MIB
    metadata_bytes_max: int = 64 * KIB
    tenant_id_chars_max: int = 64
    entity_id_chars_max: int = 128
    event_type_chars_max: int = 256  # topic names: module path, class, event name
    batch_events_max: int = 10_000
    request_bytes_max: int = 32 * MIB
    # request line and headers together, counted as they arrive: past it 431 and the
    # connection is closed (the HTTP parser otherwise buffered a 20 MB header whole)
    request_head_bytes_max: int = 64 * KIB
    append_bytes_max: int = 64 * MIB  # the records of one atomic append, together

    # queries
    query_limit_default: int = 100
    query_limit_max: int = 10_000
    min_lsn_wait_ms_max: int = 30_000
    # a query by tenant position reads at most this many of the tenant's events before the
    # range (the position index keeps one anchor per this many positions: 16 bytes each)
    tenant_position_index_stride: int = 256

    # consumers (tracked positions): the table is held in memory and in every checkpoint
    # manifest (about 100 bytes an entry), so its size is bounded
    consumer_name_chars_max: int = 128
    consumers_max: int = 100_000
    # and per tenant, so one tenant's write key cannot take every other tenant's consumers
    consumers_per_tenant_max: int = 10_000

    # subscriptions (SSE): a subscriber costs one page of events in memory while it is sent,
    # never a queue; the next page is read only when the last one left for the socket
    subscription_page_events: int = 500
    subscription_heartbeat_ms: int = 15_000  # a comment on an idle stream, under proxy timeouts
    subscriptions_max: int = 10_000  # open streams per node; more are answered 503
    # caught-up streams share each commit's events (read and encoded once) from a ring of
    # this many recent events; one further behind reads the store itself (http/live_tail.py)
    subscription_tail_events_max: int = 10_000

    # WAL
    segment_bytes_max: int = 64 * MIB
    record_bytes_max: int = 2 * MIB
    group_commit_bytes_max: int = 8 * MIB
    pending_appends_max: int = 100_000
    storage_full_probe_ms: int = 200  # while the disk is full: how often to look for space

    # memtable and checkpoints
    memtable_events_max: int = 50_000
    memtable_bytes_max: int = 32 * MIB
    checkpoint_interval_ms: int = 60_000
    parquet_row_group_rows: int = 1_024
    # merges of 16 similar parts: each event rewritten ~once (storage.compaction.pick_run)
    compaction_fanin_min: int = 16
    compaction_events_max: int = 500_000
    compaction_held_parts_max: int = 64  # parts a catching-up follower lets pile up
    # a physical follower waits for the leader's parts until its memtable holds this percent
    # of the memtable budget (events, bytes or age), then checkpoints itself; below the 200 %
    # at which appends block (store.writes.WritePath.throttle_locked)
    physical_fallback_percent: int = 150
    # an outside reader pinning the history retries while compactions replace the parts it
    # read in the manifest; each retry re-reads a newer manifest, so this is only reached when
    # the data dir is unreadable for that long (a snapshot install that does not end)
    history_pin_timeout_ms: int = 30_000
    # a failing checkpoint is retried with exponential backoff between these, and logged
    # when it starts, changes or ends, and every log interval while it lasts (storage/alarm.py)
    checkpoint_retry_ms_min: int = 1_000
    checkpoint_retry_ms_max: int = 60_000
    checkpoint_failure_log_interval_ms: int = 300_000
    # how often the store deletes the pins of readers that ended (besides after each merge)
    pin_sweep_interval_ms: int = 60_000

    # replication
    frame_bytes_max: int = 4 * MIB
    heartbeat_interval_ms: int = 1_000
    read_timeout_ms: int = 10_000
    # Until a peer has proved the shared secret it holds a socket and a frame buffer and
    # nothing more: 24 idle or slow handshakes once held 76 MB of a leader (4 MiB frames).
    handshake_timeout_ms: int = 5_000  # accept → proof verified, however the bytes trickle
    handshake_frame_bytes_max: int = 4 * KIB  # every handshake frame is under 3 KiB
    unauthenticated_connections_max: int = 32  # more are closed at once

    # operators
    lost_found_files_listed_max: int = 100  # newest files GET .../lost-found summarizes
    # a leader logs a warning when a follower's retention slot is forecast to reach
    # --wal-retention-bytes-max sooner than this (and /health, the metric say it always)
    retention_exhaustion_warn_ms: int = 15 * 60_000

    # HTTP authentication: a server looks at its API key file's mtime at most this often, so
    # a key created or revoked is in force about this long after the file changes
    api_keys_check_ms: int = 1_000
    jwt_clock_skew_ms: int = 10_000  # exp/nbf tolerance for clocks that disagree a little
    # per-key request limits keep one state per credential seen; JWT subjects are not a closed
    # set, so the oldest states are dropped past this many
    rate_limited_principals_max: int = 100_000

    def __post_init__(self) -> None:
        from walship.errors import InvalidInput

        for name in self.__dataclass_fields__:
            if getattr(self, name) <= 0:
                raise InvalidInput(f"limit {name} must be positive")
        if self.query_limit_default > self.query_limit_max:
            raise InvalidInput("query_limit_default cannot exceed query_limit_max")
        if self.append_bytes_max < self.record_bytes_max:
            raise InvalidInput("append_bytes_max must hold a record of record_bytes_max")
        if self.checkpoint_retry_ms_min > self.checkpoint_retry_ms_max:
            raise InvalidInput("checkpoint_retry_ms_min cannot exceed checkpoint_retry_ms_max")
        if self.record_bytes_max + 4096 > self.frame_bytes_max:
            raise InvalidInput("frame_bytes_max must hold a record of record_bytes_max")
        if self.handshake_frame_bytes_max > self.frame_bytes_max:
            raise InvalidInput("handshake_frame_bytes_max cannot exceed frame_bytes_max")


DEFAULT_LIMITS = Limits()
