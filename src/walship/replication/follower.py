"""The follower's end: one connection to the leader at a time, the WAL applied in order, acks.

``Follower`` runs a connect loop: connect (TLS when configured), authenticate both ways,
subscribe from the follower's own durable end of log (read from the WAL on every connect,
never remembered from the last session), then ``step()`` through the leader's messages:

* ``WalBatch``: must continue the local log exactly (prev lsn, term and chain); its records
  are CRC-, lsn- and chain-checked, then appended to the WAL and the memtable in a worker
  thread, strictly one batch at a time and in order. The write's future goes to the ack loop,
  which awaits the futures in order and sends cumulative ``Ack(durable_lsn, applied_lsn)``
  while the receive loop goes on (pipelined, coalesced: one Ack covers every batch written
  since the last one).
* ``SnapshotStart/Chunk/End``: staged, verified and resumable (``staging.py``), checked against
  this node's own end of log (the snapshot's term history must hold it; else repair first),
  then installed atomically by the store; the stream continues from S+1.
* Anything wrong -- a gap, a bad checksum, a chain mismatch, a stale term -- rejects the
  frame: the connection closes and the loop resubscribes from the durable position after a
  backoff. Nothing is ever skipped.

* ``InSyncSet``: the leader's in-sync set, stored durably (``insync.py``) and confirmed with
  ``InSyncStored`` -- by a member only once it holds the record's lsn -- so that a failover
  can tell whether this node may be missing writes answered ``replicated``.

The ack loop also keeps the link alive: at least one Ack (or, while a snapshot is in flight,
a Heartbeat) per ``heartbeat_interval_ms``, so the leader's read deadline never fires on an
idle follower.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, TypeVar

from walship.errors import (
    AuthenticationError,
    CorruptionError,
    InvalidInput,
    ProtocolError,
    ReplicationError,
    Unavailable,
    WaitTimeout,
    WalshipError,
    invariant,
)
from walship.events import now_us
from walship.replication.applier import BatchApplier
from walship.replication.cascade import CascadeClient, SnapshotRedirected
from walship.replication.config import AckSettings, ReplicationConfig
from walship.replication.divergence import snapshot_divergence
from walship.replication.handshake import authenticate_to, speaks_versions
from walship.replication.insync import InSyncFile, InSyncRecord, stored_message
from walship.replication.leader_durable import LeaderDurableView
from walship.replication.metrics import ReplicationMetrics
from walship.replication.physical import PartReceiver
from walship.replication.protocol import (
    PROTOCOL_VERSION,
    PROTOCOL_VERSION_DURABLE,
    PROTOCOL_VERSION_DURABLE_PARTS,
    PROTOCOL_VERSION_PARTS,
    Ack,
    CaughtUp,
    Diverged,
    Heartbeat,
    InSyncSet,
    LeaderDurable,
    Message,
    PartChunk,
    PartEnd,
    PartStart,
    Refused,
    SnapshotChunk,
    SnapshotConfirmed,
    SnapshotEnd,
    SnapshotRedirect,
    SnapshotStart,
    WalBatch,
    Welcome,
    hello_version,
    older_version,
    stale_term_error,
    takes_leader_durable,
)
from walship.replication.repair import repair_divergence
from walship.replication.staging import SnapshotStaging
from walship.replication.stream import MessageStream, PeerRefused
from walship.store import Store
from walship.wal.log import WriteOutcome

log = logging.getLogger(__name__)

T = TypeVar("T")

HEALTHY_CONNECTION_S: Final = 5.0
"""A connection that lasted this long (or reached STREAMING) resets the backoff."""

UNACKED_BATCHES_MAX: Final = 1024
"""Batches applied but not yet acknowledged as written; the receive loop waits beyond it."""

INLINE_APPLY_BYTES: Final = 32 * 1024
"""A batch up to this size is verified and applied on the event loop (~10 µs a record); larger
ones (catch-up) go to a worker thread so reads and acks are not held up."""

APPLIED_POLL_S: Final = 0.05
"""``wait_applied`` re-checks at least this often, in case a wake-up came from elsewhere."""


class FollowerState(Enum):
    """Where the follower's link to its leader stands."""

    CONNECTING = "connecting"  # connecting, authenticating, subscribing
    SNAPSHOT = "snapshot"  # receiving or installing a snapshot
    CATCHING_UP = "catching_up"  # receiving WAL the leader already had
    STREAMING = "streaming"  # caught up once; tailing live writes
    BACKOFF = "backoff"  # waiting before the next connection attempt
    DIVERGED = "diverged"  # the leader says this log is not on its history; needs repair
    CLOSED = "closed"  # not started, or stopped


class FrameRejected(ProtocolError):
    """A frame from the leader failed a check (checksum, gap, chain, term): the link closes
    and the follower resubscribes from its durable position."""


class StaleFrame(FrameRejected):
    """A frame from a lower term than this follower knows: the sender was deposed. Refused
    with the ``stale_term`` code, which tells that leader it is fenced."""

    code = "stale_term"


class LeaderDiverged(ReplicationError):
    """The leader answered Subscribe with Diverged: this log's tail is not on its history."""

    code = "diverged"
    retriable = False


class Backoff:
    """Capped exponential backoff with full jitter; pure, so tests need no sleeping.

    Attempt n waits a uniform random time in ``[min, min(max, min * 2**n)]``: the jitter
    spreads reconnecting followers apart, the floor keeps a flapping leader from being hit in
    a tight loop.
    """

    def __init__(self, min_ms: int, max_ms: int, rng: random.Random | None = None) -> None:
        if not 0 < min_ms <= max_ms:
            raise InvalidInput(f"backoff needs 0 < min_ms <= max_ms, not {min_ms}..{max_ms}")
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.attempts = 0
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"<Backoff {self.min_ms}..{self.max_ms} ms attempts={self.attempts}>"

    def ceiling_ms(self) -> int:
        """The largest delay the next attempt may get."""
        return min(self.max_ms, self.min_ms << min(self.attempts, 32))

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; each call counts one attempt."""
        ceiling = self.ceiling_ms()
        self.attempts += 1
        return self._rng.uniform(self.min_ms, ceiling) / 1000

    def reset(self) -> None:
        """After a healthy connection: the next failure starts from the minimum again."""
        self.attempts = 0


@dataclass(frozen=True, slots=True)
class _Written:
    """A batch handed to the WAL, waiting for its write to be acknowledged."""

    last_lsn: int
    done: Future[WriteOutcome]
    leader_write_ts_us: int


@contextlib.contextmanager
def _rejecting() -> Iterator[None]:
    """Turn a failed check on the leader's data into FrameRejected (counted, reconnects)."""
    try:
        yield
    except FrameRejected:
        raise
    except (ProtocolError, CorruptionError) as exc:
        raise FrameRejected(exc.message, **exc.details) from exc


class Follower:
    """Replication on a follower node: follows ``config.leader`` until stopped."""

    def __init__(
        self,
        store: Store,
        config: ReplicationConfig,
        metrics: ReplicationMetrics,
        node_id: str,
        *,
        known_term: int = 0,
        on_term: Callable[[int], None] | None = None,
        in_sync_file: InSyncFile | None = None,
        on_settings: Callable[[AckSettings], None] | None = None,
    ) -> None:
        if not config.secret:
            raise InvalidInput("a follower needs the replication secret to authenticate")
        self.store = store
        self.config = config
        self.metrics = metrics
        self.node_id = node_id
        self._host, self._port = config.leader_address()
        self.state = FollowerState.CLOSED
        self.connected = False
        # the highest term seen; frames from below are refused. ``on_term`` persists a rise
        self.known_term = max(known_term, store.log.current_term.value)
        self._on_term = on_term
        self._on_settings = on_settings  # the leader's ack settings, kept for a promotion
        self.repairs = 0
        self.last_repair: dict[str, Any] | None = None
        self.leader_lsn = 0
        self.leader_url: str | None = None  # the leader's HTTP URL, from its Welcome
        self.leader_node_id = ""
        self.in_sync_file = in_sync_file or InSyncFile(store.data_dir)
        self._in_sync_held: InSyncRecord | None = None  # a member's, until it holds its lsn
        self._in_sync_due: InSyncRecord | None = None  # to store and confirm
        self._in_sync_wake = asyncio.Event()
        self.durable_lsn = store.log.written_lsn.value
        self.reconnects = 0
        self.snapshots_received = 0
        self.frames_rejected = 0
        self.last_error: str | None = None
        self.close_reason: str | None = None
        self.backoff = Backoff(config.reconnect_backoff_min_ms, config.reconnect_backoff_max_ms)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stream: MessageStream | None = None
        self._staging: SnapshotStaging | None = None
        # the leader's Parquet parts, when it ships them (replication/physical.py)
        self.parts: PartReceiver | None = None
        self._hello_down = 0  # a leader refused a Hello: the version the next one says
        self._link_version = 0  # the version of this link's Hello
        # what of its log this node shows: no more than its leader holds durably
        self.durable_view = LeaderDurableView(store.visible_bound, store.data_dir)
        self.durable_view.load(store.manifest.last_lsn)
        self.parts_stats: dict[str, Any] = {}
        self._installing = False  # the snapshot in _staging is whole and being installed
        self._logged_failure: str | None = None  # the last reason logged for a lost link
        self._send_lock = asyncio.Lock()
        self._last_sent = 0.0
        self._io: asyncio.Future[Any] | None = None  # the worker-thread job in flight
        self._unacked: deque[_Written] = deque()
        self._ack_wake = asyncio.Event()
        self._ack_room = asyncio.Event()
        self._ack_wanted = False
        self._may_ack = False  # the leader knows this session's position: Acks are welcome
        self._batches = 0  # WalBatches received in this session
        # verifies batches a frame at a time and holds the start of an atomic append whose
        # last record has not arrived (``applier.py``)
        self.applier = BatchApplier(store.limits)
        self._reached_streaming = False
        self._newest_ts_us: int | None = None
        self._heard_at: float | None = None  # monotonic time of the leader's last frame
        self._applied = asyncio.Event()
        self.cascade = CascadeClient(store, config, metrics, node_id)  # ``cascade.py``

    def __repr__(self) -> str:
        return (
            f"<Follower {self.node_id} {self.state.name} leader={self.leader_address} "
            f"durable={self.durable_lsn} leader_lsn={self.leader_lsn}>"
        )

    @property
    def leader_address(self) -> str:
        """``HOST:PORT`` of the leader's replication listener."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    @property
    def applied_lsn(self) -> int:
        """The highest lsn reads on this node can see."""
        return self.store.visible_lsn

    def lag_records(self) -> int:
        """Records the leader has written that this follower has not applied."""
        return max(self.leader_lsn - self.applied_lsn, 0)

    def lag_ms(self) -> float | None:
        """Time lag behind the leader; 0 when caught up, None while unknown.

        An approximation from above: how long ago (by this node's clock) the leader wrote the
        newest batch this follower has written. The oldest record still missing was written
        at or after that, so the true lag is at most this (clock skew between the two hosts
        aside). Unknown until the first batch of a session, e.g. during a snapshot.
        """
        if self.lag_records() == 0:
            return 0.0
        if self._newest_ts_us is None:
            return None
        return max(now_us() - self._newest_ts_us, 0) / 1000

    def silence_ms(self) -> float | None:
        """How long ago this session last heard from the leader (any frame); None while not
        connected.

        ``lag_records`` counts against the leader's end of log as last heard: through a link
        that went quiet without closing (a partition, a paused leader) it stays 0 until the
        read deadline, while the leader may be writing. The silence bounds what is unknown.
        """
        if not self.connected or self._heard_at is None:
            return None
        return max(time.monotonic() - self._heard_at, 0.0) * 1000

    def status(self) -> dict[str, Any]:
        lag_ms = self.lag_ms()
        silence_ms = self.silence_ms()
        return {
            "leader": self.leader_address,
            "leader_url": self.leader_url,
            "connected": self.connected,
            "state": self.state.value,
            "durable_lsn": self.durable_lsn,
            "applied_lsn": self.applied_lsn,
            "leader_lsn": self.leader_lsn,
            "lag_records": self.lag_records(),
            "lag_ms": None if lag_ms is None else round(lag_ms, 3),
            "silence_ms": None if silence_ms is None else round(silence_ms, 3),
            "reconnects": self.reconnects,
            "snapshots_received": self.snapshots_received,
            "parts": self.parts_status(),
            "frames_rejected": self.frames_rejected,
            "last_error": self.last_error,
            "known_term": self.known_term,
            "repairs": self.repairs,
            "last_repair": self.last_repair,
            "snapshot": self._snapshot_status(),
            "snapshot_source": self.cascade.snapshot_source,
            "snapshot_fallbacks": self.cascade.fallbacks,
        }

    def _snapshot_status(self) -> dict[str, Any] | None:
        """The snapshot transfer in progress: from the leader, or from a serving follower."""
        staging = self._staging
        if staging is None:
            return self.cascade.transfer_status(self._installing)
        return {
            "id": staging.snapshot_id,
            "state": "installing" if self._installing else "receiving",
            "source": "leader",
            "bytes_done": staging.bytes_done,
            "bytes_total": staging.bytes_total,
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start following in a background task (returns at once)."""
        if self._task is not None:
            return
        self._stopping = False
        self.close_reason = None
        self.state = FollowerState.CONNECTING
        self._task = asyncio.create_task(self._run(), name=f"follower-{self.node_id}")

    async def stop(
        self, reason: str = "the follower was stopped", *, shutting_down: bool = False
    ) -> None:
        """Close the link and stop; pending ``wait_applied`` calls fail with ``reason``.

        Idempotent. Waits for a worker-thread job in flight (an apply, a snapshot install).
        Checkpoints and merges are the store's own again, unless ``shutting_down``: a physical
        follower's store then leaves its memtable to the WAL at close instead of encoding a
        part of its own, which the leader's next parts would not line up with.
        """
        self._stopping = True
        self.close_reason = reason
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        io = self._io
        if io is not None:
            # a repair or an apply still running in its thread: nothing may follow it
            await asyncio.wait({io})
            self._io = None
            self._report_unawaited(io)
        if self._staging is not None:
            self._staging.close()  # when a cancel cut the session's teardown short
            self._staging = None
        self.state = FollowerState.CLOSED
        self.connected = False
        try:
            await asyncio.to_thread(self.durable_view.save)
        except OSError as exc:  # a restart then shows no more than it saved before
            log.warning("replication: could not save the leader's durable lsn: %s", exc)
        if not shutting_down:
            self.store.parts_from_leader = False  # checkpoints and merges are this node's again
        self._wake_applied()

    async def wait_applied(self, lsn: int, timeout_s: float) -> int:
        """Wait until reads here see ``lsn``; returns the applied lsn.

        WaitTimeout when ``timeout_s`` passes first; Unavailable when the follower is stopped
        (nothing more will arrive).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            event = self._applied
            applied = self.applied_lsn
            if applied >= lsn:
                return applied
            if self._task is None:
                raise Unavailable(
                    f"lsn {lsn} is not applied (applied: {applied}) and will not be: "
                    f"{self.close_reason or 'the follower is not running'}",
                    applied_lsn=applied,
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise WaitTimeout(
                    f"lsn {lsn} not applied within {int(timeout_s * 1000)} ms (applied: {applied})",
                    applied_lsn=applied,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, APPLIED_POLL_S)):
                    await event.wait()

    def _wake_applied(self) -> None:
        event, self._applied = self._applied, asyncio.Event()
        event.set()

    # ------------------------------------------------------------------ the connect loop

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            if attempt:
                self.reconnects += 1
                self.metrics.reconnects.inc()
            attempt += 1
            started = time.monotonic()
            self._reached_streaming = False
            self.state = FollowerState.CONNECTING
            diverged: LeaderDiverged | None = None
            redirected: SnapshotRedirected | None = None
            try:
                await self._connect_and_follow()
            except SnapshotRedirected as exc:
                redirected = exc
            except Exception as exc:
                if isinstance(exc, LeaderDiverged):
                    diverged = exc
                self._note_failure(exc)
            finally:
                await self._teardown()
            if diverged is not None and await self._repair(diverged):
                continue  # resubscribe at once from the repaired end of log
            if redirected is not None:
                self.state = FollowerState.SNAPSHOT
                failed = await self.cascade.fetch(redirected, self.known_term)
                if failed is not None:
                    self.last_error = failed
                continue  # back to the leader at once: with a staged snapshot, or without
            if self._reached_streaming or time.monotonic() - started > HEALTHY_CONNECTION_S:
                self.backoff.reset()
            delay = self.backoff.next_delay()
            self.state = FollowerState.DIVERGED if diverged else FollowerState.BACKOFF
            await asyncio.sleep(delay)

    async def _repair(self, diverged: LeaderDiverged) -> bool:
        """Cut this log back to where it meets the leader's, the cut records moved to
        lost-and-found; True when it did (False: it failed, and the loop backs off)."""
        self.state = FollowerState.DIVERGED
        common_term = int(diverged.details["common_term"])
        common_lsn = int(diverged.details["common_lsn"])
        try:
            result = await self._in_thread(repair_divergence, self.store, common_term, common_lsn)
        except WalshipError as exc:
            self.last_error = f"divergence repair failed: {exc.message}"
            log.error("replication: %s", self.last_error)
            return False
        self.repairs += 1
        self.metrics.divergence_repairs.inc()
        self.metrics.lost_found_records.inc(result.cut_records)
        self.last_repair = {
            "kept_lsn": result.kept_lsn,
            "cut_records": result.cut_records,
            "lost_found": None if result.lost_found is None else str(result.lost_found),
            "reset": result.reset,
            "leader": self.leader_address,
            "at_us": now_us(),
        }
        self._note_term(result.highest_cut_term)
        self.durable_lsn = self.store.log.written_lsn.value
        self._wake_applied()
        return True

    def _note_term(self, term: int) -> None:
        """Remember ``term`` as seen (persisted by the node): a later promotion goes above it."""
        self.known_term = max(self.known_term, term)
        if self._on_term is not None:
            self._on_term(term)

    def _note_failure(self, exc: Exception) -> None:
        """Record why the link ended, for status() and the log."""
        if isinstance(exc, FrameRejected):
            self.frames_rejected += 1
            self.metrics.frames_rejected.inc()
            self.last_error = f"rejected a frame from the leader: {exc.message}"
            self._log_failure(logging.WARNING, self.last_error)
        elif isinstance(exc, LeaderDiverged):
            self.last_error = exc.message
            self._log_failure(logging.ERROR, exc.message)
        elif isinstance(exc, PeerRefused):
            code = exc.details.get("refused", "refused")
            self.last_error = f"the leader refused this follower ({code}): {exc.message}"
            self._log_failure(logging.WARNING, self.last_error)
        elif isinstance(exc, AuthenticationError):
            self.last_error = f"authentication failed: {exc.message}"
            self._log_failure(logging.WARNING, self.last_error)
        elif isinstance(exc, WalshipError):
            self.last_error = exc.message
            self._log_failure(logging.INFO, f"link to {self.leader_address} ended: {exc.message}")
        elif isinstance(exc, OSError | TimeoutError):
            self.last_error = f"connection to {self.leader_address} failed: {exc!r}"
            self._log_failure(logging.INFO, self.last_error)
        else:
            self.last_error = f"unexpected error: {exc!r}"
            log.exception("replication: follower link failed unexpectedly")

    def _log_failure(self, level: int, message: str) -> None:
        """Log why the link ended. The same reason again, attempt after attempt while the
        leader stays away, goes to debug: a line at info or above says what changed (a
        follower of a dead leader logged a line every backoff, up to every 5 s, forever)."""
        if message == self._logged_failure:
            level = logging.DEBUG
        self._logged_failure = message
        log.log(level, "replication: %s", message)

    async def _connect_and_follow(self) -> None:
        limits = self.store.limits
        timeout_s = limits.read_timeout_ms / 1000
        ssl_ctx = self.config.client_ssl
        # read_timeout_ms bounds connecting (and the TLS handshake) too
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=ssl_ctx,
                server_hostname=self._host if ssl_ctx is not None else None,
            )
        # whatever answers at that address gets a few KiB of buffer until it proves the secret
        stream = MessageStream(
            reader,
            writer,
            limits.frame_bytes_max,
            handshake_frame_bytes_max=limits.handshake_frame_bytes_max,
        )
        self._stream = stream
        await self._handshake(stream, timeout_s)
        self.connected = True
        self._begin_session()
        await self._send(self.cascade.subscription(self.config.http_url or ""))
        self.state = FollowerState.CATCHING_UP
        self.store.hold_compaction(True)  # until caught up: the replay gets the cores
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._receive_loop(), name=f"follower-recv-{self.node_id}")
                group.create_task(self._ack_loop(), name=f"follower-ack-{self.node_id}")
                group.create_task(self._in_sync_loop(), name=f"follower-isr-{self.node_id}")
        except BaseExceptionGroup as errors:
            exc = _first_error(errors)
            if isinstance(exc, FrameRejected):
                await stream.refuse(exc.code, exc.message)  # stale_term tells it is fenced
            raise exc from None

    async def _handshake(self, stream: MessageStream, timeout_s: float) -> Welcome:
        """Hello → Challenge → HelloProof → Welcome; both sides prove the shared secret."""
        assert self.config.secret is not None
        default = (
            PROTOCOL_VERSION_DURABLE_PARTS
            if self.config.physical_followers
            else PROTOCOL_VERSION_DURABLE
        )
        version = hello_version(self._hello_down or default, speaks_versions())
        self._hello_down = 0  # the next link asks again: the leader may have been upgraded
        try:
            welcome = await authenticate_to(
                stream,
                self.config.secret,
                self.config.cluster_id,
                self.node_id,
                timeout_s,
                version=version,
            )
        except PeerRefused as exc:
            if "protocol version" in exc.message and version > PROTOCOL_VERSION:
                # a leader from before v3 (or v2) refuses the Hello: follow it with the
                # version before (without LeaderDurable; without parts)
                self._hello_down = older_version(version)
            if version == PROTOCOL_VERSION_PARTS and "protocol version" in exc.message:
                log.warning(
                    "replication: the leader at %s does not speak protocol v2 (physical "
                    "followers): following it with v1, checkpointing here",
                    self.leader_address,
                )
            raise
        self._last_sent = time.monotonic()
        self._link_version = version
        known = max(self.known_term, self.store.log.current_term.value)
        stale = stale_term_error(welcome, known)
        if stale is not None:
            await stream.refuse(stale.code, stale.message)
            raise StaleFrame(stale.message, **stale.details)
        self._note_term(welcome.term)
        self.leader_lsn = welcome.leader_last_lsn
        self.leader_url = welcome.leader_url or None
        self._logged_failure = None  # connected: the next failure is news again
        self.leader_node_id = welcome.leader_node_id
        if welcome.offers_parts:
            self.parts = PartReceiver(self.store, self.metrics)
        # the leader's parts instead of its own; kept across a reconnect (the leader queues
        # what it makes meanwhile), bounded by physical_fallback_percent of its memtable
        self.store.parts_from_leader = welcome.offers_parts
        if welcome.ack_settings and self._on_settings is not None:
            try:
                self._on_settings(AckSettings.decode(welcome.ack_settings))
            except InvalidInput as exc:  # authenticated but unusable: keep what it had
                log.warning("replication: ignoring the leader's ack settings: %s", exc.message)
        log.info(
            "replication: following %s at %s (term %d, leader lsn %d)",
            welcome.leader_node_id,
            self.leader_address,
            welcome.term,
            welcome.leader_last_lsn,
        )
        return welcome

    def _begin_session(self) -> None:
        """Forget everything of the last session; positions come from the store again."""
        self._unacked.clear()
        self._ack_wanted = False
        self._may_ack = False
        self._batches = 0
        self.applier.reset()
        self._newest_ts_us = None
        self._in_sync_held = None
        self._in_sync_due = None
        self._heard_at = time.monotonic()  # the Welcome just came
        self.cascade.staged_sent = False
        self.durable_lsn = self.store.log.written_lsn.value
        self.durable_view.link_began(
            takes_leader_durable(self._link_version), self.store.log.written_lsn.value
        )

    async def _teardown(self) -> None:
        """Close the link once the worker-thread job in flight (an apply, a snapshot write or
        install) has finished: the next session must start from what it left."""
        self.connected = False
        self.store.hold_compaction(False)
        io = self._io
        if io is not None:
            await asyncio.wait({io})
            self._io = None
            self._report_unawaited(io)
        if self._staging is not None:
            self._staging.close()  # what is staged stays, for a resume
            self._staging = None
        if self.parts is not None:
            self.parts.close()  # a part cut off is sent again whole on the next link
            self.parts_stats = _add_stats(self.parts_stats, self.parts.status())
            self.parts = None
        while self._unacked and self._unacked[0].done.done():
            item = self._unacked.popleft()
            if item.done.exception() is None:
                self._note_durable(item)
        self._unacked.clear()
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
        self._publish()

    def _report_unawaited(self, job: asyncio.Future[Any]) -> None:
        """A worker-thread job the session did not wait for to the end (a snapshot chunk's
        write is awaited only when the next chunk arrives): say how it failed, if it did."""
        if job.cancelled():
            return
        exc = job.exception()  # retrieved either way
        if exc is not None:
            log.warning("replication: a write in flight when the link ended failed: %r", exc)
            if isinstance(exc, (ProtocolError, CorruptionError)):
                self.frames_rejected += 1
                self.metrics.frames_rejected.inc()
            self.last_error = f"{type(exc).__name__}: {exc}"

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn`` in a worker thread; if this task is cancelled, the job still
        finishes and ``_teardown`` waits for it."""
        job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._io = job
        result: T = await self._await_io(job)
        return result

    async def _io_finished(self) -> None:
        """Wait for the worker-thread job in flight, if any; its error is raised here."""
        job = self._io
        if job is not None:
            await self._await_io(job)

    async def _await_io(self, job: asyncio.Future[T]) -> T:
        """The result of the job in flight. It is forgotten once done: its error, if any, is
        raised here and reported by the session; a cancel leaves it for ``_teardown``."""
        try:
            result = await asyncio.shield(job)
        except BaseException:
            if job.done():
                self._io = None
            raise
        self._io = None
        return result

    async def _send(self, msg: Message) -> None:
        stream = self._stream
        invariant(stream is not None, "no connection to send on")
        assert stream is not None
        timeout_s = self.store.limits.read_timeout_ms / 1000
        async with self._send_lock:
            try:
                async with asyncio.timeout(timeout_s):
                    await stream.send(msg)
            except TimeoutError as exc:
                raise WaitTimeout(
                    f"the leader at {self.leader_address} did not take a frame for "
                    f"{int(timeout_s * 1000)} ms"
                ) from exc
            self._last_sent = time.monotonic()

    # ------------------------------------------------------------------ receiving

    async def _receive_loop(self) -> None:
        while True:
            await self.step()

    async def step(self) -> None:
        """Receive one message from the leader and act on it (one unit of work)."""
        stream = self._stream
        invariant(stream is not None, "step() needs a connection")
        assert stream is not None
        try:
            msg = await stream.recv(self.store.limits.read_timeout_ms / 1000)
        except ProtocolError as exc:
            if stream.reader.at_eof():
                raise  # the leader closed the connection: not a bad frame
            raise FrameRejected(exc.message, **exc.details) from exc
        await self.handle(msg)

    async def handle(self, msg: Message) -> None:
        """Act on one message from the leader. FrameRejected when it fails a check."""
        self._heard_at = time.monotonic()  # snapshot chunks count: the link is alive
        stale = stale_term_error(msg, self.known_term)
        if stale is not None:
            raise StaleFrame(stale.message, **stale.details)
        if isinstance(msg, WalBatch | CaughtUp | Heartbeat) and msg.term > self.known_term:
            self._note_term(msg.term)
        if isinstance(msg, WalBatch):
            self.durable_view.continues()
            await self._on_batch(msg)
        elif isinstance(msg, LeaderDurable):
            self.durable_view.told(msg.lsn)
            self._wake_applied()
        elif isinstance(msg, Heartbeat):
            self._leader_heard(msg.last_lsn)
            self._ack_wanted = True
            self._ack_wake.set()
        elif isinstance(msg, CaughtUp):
            self.durable_view.continues()
            self._leader_heard(msg.leader_lsn)
            self.state = FollowerState.STREAMING
            self._reached_streaming = True
            self.store.hold_compaction(False)
            self._ack_wanted = True
            self._ack_wake.set()
        elif isinstance(msg, SnapshotStart):
            if self.cascade.staged_sent:
                self.cascade.drop_staged("the leader sends a snapshot of its own instead")
            await self._on_snapshot_start(msg)
        elif isinstance(msg, SnapshotConfirmed):
            await self._install_staged(msg)
        elif isinstance(msg, SnapshotRedirect):
            raise SnapshotRedirected(
                "the leader redirects this follower for a snapshot",
                sources=list(msg.sources),
                min_lsn=msg.min_lsn,
            )
        elif isinstance(msg, SnapshotChunk):
            await self._on_snapshot_chunk(msg)
        elif isinstance(msg, SnapshotEnd):
            await self._on_snapshot_end(msg)
        elif isinstance(msg, PartStart | PartChunk | PartEnd):
            await self._on_part(msg)
        elif isinstance(msg, InSyncSet):
            self._on_in_sync(InSyncRecord.from_wire(msg, self.leader_node_id))
        elif isinstance(msg, Diverged) and self.cascade.staged_sent:
            raise self.cascade.refused(msg.reason)  # about the staged position, not this log
        elif isinstance(msg, Diverged):
            raise LeaderDiverged(
                f"this follower's log is not on the leader's history ({msg.reason}); both "
                f"hold the same records up to lsn {msg.common_lsn} (term {msg.common_term}): "
                "repairing (the records after it go to lost-and-found)",
                common_lsn=msg.common_lsn,
                common_term=msg.common_term,
            )
        elif isinstance(msg, Refused):
            raise PeerRefused(f"the leader refused: {msg.message}", refused=msg.code)
        else:
            raise FrameRejected(f"unexpected {type(msg).__name__} from the leader")

    async def _on_part(self, msg: PartStart | PartChunk | PartEnd) -> None:
        """Stage the leader's part as it arrives, then verify and install it in a worker
        thread (refused: rebuilt from this node's WAL there); the link goes on either way."""
        receiver = self.parts
        if receiver is None:
            raise FrameRejected(f"{type(msg).__name__} from a leader that did not offer parts")
        with _rejecting():
            if isinstance(msg, PartStart):
                receiver.start(msg)
            elif isinstance(msg, PartChunk):
                receiver.chunk(msg)
            else:
                part = receiver.end(msg)
                await self._in_thread(receiver.install, part)

    def parts_status(self) -> dict[str, Any]:
        """Parts received, installed and refused over every session, this one included."""
        current = self.parts.status() if self.parts is not None else {}
        return _add_stats(self.parts_stats, current)

    def _leader_heard(self, leader_lsn: int) -> None:
        if self._staging is not None:
            raise FrameRejected("the leader streams before the snapshot it sent has ended")
        self._may_ack = True
        self.leader_lsn = max(self.leader_lsn, leader_lsn)
        self._publish()

    async def _on_batch(self, batch: WalBatch) -> None:
        self._leader_heard(batch.leader_lsn)
        held_tail = self.applier.held_tail()
        if held_tail is not None:
            tail = held_tail
        else:
            end = self.store.log.last_point
            tail = (end.lsn.value, end.term.value, end.chain)
        if (batch.prev_lsn, batch.prev_term, batch.prev_chain) != tail:
            raise FrameRejected(
                f"{batch!r} does not continue this follower's log, which ends at lsn "
                f"{tail[0]} term {tail[1]} chain {tail[2].hex()}: a gap or another history"
            )
        timeout_s = self.store.limits.read_timeout_ms / 1000
        while len(self._unacked) >= UNACKED_BATCHES_MAX:
            self._ack_room.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ack_room.wait()
            except TimeoutError as exc:
                raise WaitTimeout("the WAL did not write applied batches in time") from exc
        self._batches += 1
        if (
            len(batch.records) <= INLINE_APPLY_BYTES
            and not self.applier.holding  # completing a held append: maybe thousands of records
            and not self.store.log.backlogged()
        ):
            # a small live batch: verifying and applying it here is cheaper than two hops to a
            # worker thread and back, which dominate a single write's replication latency
            count, last_lsn, done = self._decode_and_apply(batch)
        else:
            count, last_lsn, done = await self._in_thread(self._decode_and_apply, batch)
        if done is None:
            return  # the whole batch is the start of an append still arriving
        self._unacked.append(_Written(last_lsn, done, batch.leader_write_ts_us))
        loop = asyncio.get_running_loop()
        done.add_done_callback(lambda _: _call_soon(loop, self._ack_wake.set))
        self.metrics.applied_records.inc(count)

    def _decode_and_apply(self, batch: WalBatch) -> tuple[int, int, Future[WriteOutcome] | None]:
        """Verify every record, then append the whole atomic appends among them to the WAL and
        the memtable; ``(count, last lsn, write)`` of what was applied (``applier.py`` holds
        the start of an append that continues in the next frame: nothing of it is written,
        shown or acked until it is whole)."""
        with _rejecting():
            frame = self.applier.take(batch)
            if frame is None:
                return 0, 0, None
            done = self.store.apply_frame(frame)
            return frame.record_count, frame.last_lsn, done

    def _on_in_sync(self, record: InSyncRecord) -> None:
        """Have the leader's in-sync set stored and confirmed; a member first waits until it
        holds the record's lsn (so every member of a record holds what was answered before
        it)."""
        if self.node_id in record.members and self.durable_lsn < record.lsn:
            self._in_sync_held = record
            return
        self._in_sync_held = None
        self._in_sync_due = record
        self._in_sync_wake.set()

    async def _in_sync_loop(self) -> None:
        """Store each in-sync set due (the newest, when several came meanwhile) and confirm
        it: beside the receive loop, whose WAL batches must not wait for this fsync."""
        while True:
            await self._in_sync_wake.wait()
            self._in_sync_wake.clear()
            record, self._in_sync_due = self._in_sync_due, None
            if record is not None:
                await asyncio.to_thread(self.in_sync_file.store, record)
                await self._send(stored_message(record))

    # ------------------------------------------------------------------ acknowledging

    async def _ack_loop(self) -> None:
        """Ack writes in order, cumulatively, as they complete; keep the link alive."""
        heartbeat_s = self.store.limits.heartbeat_interval_ms / 1000
        while True:
            self._ack_wake.clear()
            if self._absorb_written():
                self._ack_room.set()
                self._wake_applied()
                self._publish()
                await self._send_position()
                held = self._in_sync_held
                if held is not None and self.durable_lsn >= held.lsn:
                    self._on_in_sync(held)
                continue
            if self.durable_view.save_due:
                await asyncio.to_thread(self.durable_view.save)
            idle_s = time.monotonic() - self._last_sent
            if self._ack_wanted or idle_s >= heartbeat_s:
                await self._send_position()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(heartbeat_s - idle_s):
                    await self._ack_wake.wait()

    def _absorb_written(self) -> bool:
        """Take every batch whose write completed, in order; True when there was one.

        Raises the WAL's error when a write failed (the link then closes).
        """
        progressed = False
        while self._unacked and self._unacked[0].done.done():
            item = self._unacked.popleft()
            self._note_durable(item)
            self._newest_ts_us = item.leader_write_ts_us
            progressed = True
        return progressed

    def _note_durable(self, item: _Written) -> None:
        """A batch's write completed: what it makes durable (fsynced) on this node. Raises the
        WAL's error when the write failed."""
        durable = item.last_lsn
        if not item.done.result().synced:  # append_frame always fsyncs; never trust less
            durable = min(durable, self.store.log.synced_lsn.value)
        self.durable_lsn = max(self.durable_lsn, durable)

    async def _send_position(self) -> None:
        """An Ack once the leader knows where this session stands; a Heartbeat before (the
        leader refuses acks past what it has sent, and sends nothing before a snapshot ends)."""
        self._ack_wanted = False
        msg: Message
        if self._may_ack:
            msg = Ack(durable_lsn=self.durable_lsn, applied_lsn=self.applied_lsn)
        else:
            msg = Heartbeat(term=self.known_term, last_lsn=self.durable_lsn, ts_us=now_us())
        await self._send(msg)

    def _publish(self) -> None:
        m = self.metrics
        m.connected.set(1 if self.connected else 0)
        m.durable_lsn.set(self.durable_lsn)
        m.applied_lsn.set(self.applied_lsn)
        m.leader_lsn.set(self.leader_lsn)
        self.metrics.leader_lag_records.set(self.lag_records())
        lag_ms = self.lag_ms()
        self.metrics.leader_lag_seconds.set(math.nan if lag_ms is None else lag_ms / 1000)

    # ------------------------------------------------------------------ snapshots

    async def _on_snapshot_start(self, start: SnapshotStart) -> None:
        if self._batches or self._staging is not None:
            raise FrameRejected("SnapshotStart after the stream began")
        local_end = self.store.log.last_position.lsn.value
        if start.last_lsn < local_end:
            # never go back silently: that would drop records this node holds
            raise FrameRejected(
                f"snapshot ends at lsn {start.last_lsn}, before this follower's end of log "
                f"{local_end}"
            )
        if start.last_term > self.known_term:
            raise FrameRejected(
                f"snapshot of term {start.last_term} from a leader of term {self.known_term}"
            )
        self.state = FollowerState.SNAPSHOT
        self._may_ack = False
        with _rejecting():
            staging = await self._in_thread(SnapshotStaging.open, self.store.data_dir, start)
        self._staging, self._installing = staging, False
        resume = staging.resume
        log.info(
            "replication: receiving snapshot %s up to lsn %d (%d bytes in %d files), from file "
            "%d offset %d (%d bytes already here)",
            start.snapshot_id,
            start.last_lsn,
            start.total_bytes,
            len(start.files),
            resume.file_index,
            resume.offset,
            staging.bytes_done,
        )
        self._publish()
        await self._send(resume)

    async def _on_snapshot_chunk(self, chunk: SnapshotChunk) -> None:
        """Write ``chunk`` in a worker thread while the next one is received: the write of
        the chunk before must have finished (and passed) first, so chunks are still written in
        order, one at a time, and a failed one is reported before anything follows it."""
        staging = self._staging
        if staging is None:
            raise FrameRejected("SnapshotChunk without SnapshotStart")
        with _rejecting():
            await self._io_finished()
            self._io = asyncio.ensure_future(asyncio.to_thread(staging.write, chunk))

    async def _on_snapshot_end(self, end: SnapshotEnd) -> None:
        staging = self._staging
        if staging is None or end.snapshot_id != staging.snapshot_id:
            raise FrameRejected(f"SnapshotEnd for {end.snapshot_id!r}, which is not in progress")
        self._installing = True
        with _rejecting():
            await self._io_finished()
            manifest, terms = await self._in_thread(staging.finish)
        self._check_snapshot_history(manifest.last_lsn, manifest.chain_bytes, terms)
        invariant(not self._unacked, "records were applied before the snapshot was installed")
        await self._in_thread(self.store.install_snapshot, staging.files_dir, manifest, terms)
        await self._in_thread(staging.discard)
        self._staging = None
        self.snapshots_received += 1
        self.cascade.installed("leader")
        self.metrics.snapshots_received.inc()
        self.durable_lsn = self.store.log.written_lsn.value
        self.state = FollowerState.CATCHING_UP
        self._wake_applied()
        self._publish()
        log.info(
            "replication: installed snapshot %s up to lsn %d (%d parts)",
            staging.snapshot_id,
            manifest.last_lsn,
            len(manifest.parts),
        )

    async def _install_staged(self, msg: SnapshotConfirmed) -> None:
        """The leader vouched for the snapshot staged from a serving follower: install it
        with the leader's term history (not the source's); WAL follows from the leader."""
        with _rejecting():
            staged, terms = self.cascade.confirmed(msg)
        manifest = staged.manifest
        self._check_snapshot_history(manifest.last_lsn, manifest.chain_bytes, terms)
        invariant(not self._unacked, "records were applied before the snapshot was installed")
        self.state = FollowerState.SNAPSHOT
        self._installing = True
        try:
            await self._in_thread(
                self.store.install_snapshot, staged.staging.files_dir, manifest, terms
            )
            await self._in_thread(staged.staging.discard)
        finally:
            self._installing = False
        self.cascade.installed(staged.source)
        self.snapshots_received += 1
        self.metrics.snapshots_received.inc()
        self.durable_lsn = self.store.log.written_lsn.value
        self.state = FollowerState.CATCHING_UP
        self._wake_applied()
        self._publish()
        log.info(
            "replication: installed snapshot %s up to lsn %d from %s (vouched for by the leader)",
            staged.staging.snapshot_id,
            manifest.last_lsn,
            staged.source,
        )

    def _check_snapshot_history(
        self, last_lsn: int, chain: bytes, terms: list[tuple[int, int]]
    ) -> None:
        """Before an install: this node's end of log must be on the snapshot's term history.

        An install replaces the whole log, so a tail of this node's own that the snapshot's
        log lacks (a deposed leader's unreplicated writes) would vanish without a trace. The
        leader should have said ``Diverged`` first; whatever it did, this node repairs itself
        (tail to lost-and-found, at the point both histories share) and subscribes again; the
        staged files stay for a resume. Invariant 12: trust this log, not a file from the wire.
        """
        end = self.store.log.last_point
        own_term, own_lsn = end.term.value, end.lsn.value
        common = snapshot_divergence(
            terms,
            last_lsn,
            own_term,
            own_lsn,
            chain_differs=own_lsn == last_lsn and end.chain != chain,
        )
        if common is None:
            return
        common_term, common_lsn = common
        raise LeaderDiverged(
            f"the snapshot up to lsn {last_lsn} does not hold this follower's record {own_lsn} "
            f"of term {own_term} (its term history differs there); both hold the same records "
            f"up to lsn {common_lsn} (term {common_term}): repairing before the install (the "
            "records after it go to lost-and-found)",
            common_lsn=common_lsn,
            common_term=common_term,
        )


def _add_stats(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    out = dict(total)
    for key, value in more.items():
        if isinstance(value, int):
            out[key] = out.get(key, 0) + value
        elif value is not None:
            out[key] = value
    return out


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """Schedule ``callback`` on ``loop`` from any thread; a no-op once the loop is closed."""
    if not loop.is_closed():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error of a task group (cancellations of the sibling tasks aside)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
