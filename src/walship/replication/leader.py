"""The leader's end: a listener, one ``FollowerSession`` per follower, acks and retention.

Each session authenticates the follower, checks its position against the leader's history,
then serves it from the WAL *on disk* (``WalCursor``) from its position -- or first a snapshot
when that part of the WAL is gone and the term history has the follower's term there -- and
keeps tailing as the WAL advances (woken by the WAL's commit listener, never a bounded
broadcast that could drop). Acks feed the ``AckTracker`` that writes wait on, the in-sync
set (published to the followers by ``InSyncPublisher``), the retention slots and the lag
figures.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

from walship.errors import (
    AuthenticationError,
    Conflict,
    NotFound,
    ProtocolError,
    StaleTerm,
    WalshipError,
)
from walship.events import now_us
from walship.replication.acks import AckHistory, AckMode, AckOutcome, AckTracker
from walship.replication.config import AckSettings, ReplicationConfig
from walship.replication.divergence import common_point, on_history, term_at
from walship.replication.early_ship import DurableNotice, ships_early
from walship.replication.handshake import (
    HandshakeGate,
    HandshakeSlot,
    authenticate_follower,
    open_admitted,
)
from walship.replication.insync import InSyncFile, InSyncPublisher
from walship.replication.lagbudget import AckRate, LagBudget, held_to_ms
from walship.replication.ledger import DegradationLedger, LedgerKeeper
from walship.replication.metrics import ReplicationMetrics
from walship.replication.physical import OutgoingPart, PartShipper, PartShippers
from walship.replication.protocol import (
    REDIRECT_ANY,
    REDIRECT_NO,
    SOURCES_MAX,
    WAL_BATCH_OVERHEAD_BYTES,
    Ack,
    CaughtUp,
    Diverged,
    Heartbeat,
    InSyncStored,
    Refused,
    SnapshotConfirmed,
    SnapshotRedirect,
    SnapshotResume,
    Subscribe,
    WalBatch,
    make_welcome,
    takes_leader_durable,
    takes_parts,
)
from walship.replication.retention import RetentionForecaster, RetentionSlots, slot_bytes
from walship.replication.snapshot_send import SnapshotProgress, send_snapshot
from walship.replication.stream import MessageStream, PeerRefused
from walship.storage.manifest import CheckpointManifest
from walship.storage.parquet import PartInfo
from walship.store import Store
from walship.wal.cursor import WalCursor, WalGone
from walship.wal.record import GENESIS_CHAIN
from walship.wal.segment import SEGMENT_HEADER_BYTES, SegmentHeader

log = logging.getLogger(__name__)


class FollowerState(Enum):
    CONNECTING = "connecting"
    SNAPSHOT = "snapshot"
    CATCHING_UP = "catching_up"
    STREAMING = "streaming"
    CLOSED = "closed"


class LagClock:
    """When the leader wrote each lsn (per group commit), to turn lsns into real time lag."""

    def __init__(self, keep: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._lsns: list[int] = []
        self._times_us: list[int] = []
        self._keep = keep

    def written(self, lsn: int) -> None:
        """WAL listener (writer thread): everything up to ``lsn`` was just written."""
        with self._lock:
            self._lsns.append(lsn)
            self._times_us.append(now_us())
            if len(self._lsns) > 2 * self._keep:
                del self._lsns[: self._keep]
                del self._times_us[: self._keep]

    def write_time_us(self, lsn: int) -> int | None:
        """When ``lsn`` was written; the oldest time known when it is older; None if unknown."""
        with self._lock:
            if not self._lsns:
                return None
            i = bisect.bisect_left(self._lsns, lsn)
            return self._times_us[min(i, len(self._lsns) - 1)]

    def lag_ms(self, durable_lsn: int, leader_lsn: int) -> float:
        """How long ago the leader wrote the oldest record the follower has not acked."""
        if durable_lsn >= leader_lsn:
            return 0.0
        written = self.write_time_us(durable_lsn + 1)
        return 0.0 if written is None else max(now_us() - written, 0) / 1000


IN_SYNC_RETRY_S = 0.5
"""How soon a leader tries again to publish an in-sync set it could not (etcd unreachable)."""

INLINE_READ_BYTES = 64 * 1024
"""A session reads at most this much WAL on the event loop; larger reads (catch-up) go to a
worker thread so other sessions and the HTTP API are not held up."""


class FollowerSession:
    """The leader's view of one connected follower."""

    def __init__(self, leader: Leader, stream: MessageStream) -> None:
        self.leader = leader
        self.stream = stream
        self.node_id = "?"
        self.address = stream.peer
        self.state = FollowerState.CONNECTING
        self.sent_lsn = 0
        self.durable_lsn = 0
        self.applied_lsn = 0
        self.in_sync = False
        self.connected_at = time.time()
        self.last_heard = time.monotonic()
        self.snapshot: SnapshotProgress | None = None
        self.serve_address = ""  # where it serves snapshots to other followers (empty: not)
        self.ack_rate = AckRate()
        self.close_reason: str | None = None
        self.wake = asyncio.Event()
        self._prev: tuple[int, int, bytes] = (0, 0, GENESIS_CHAIN)
        self._cursor: WalCursor | None = None
        self._caught_up_sent = False
        self._in_sync_sent: tuple[int, int] | None = None  # the newest record sent to it
        self._resume: asyncio.Queue[SnapshotResume] = asyncio.Queue(maxsize=1)
        self.parts: PartShipper | None = None  # a physical follower's (replication/physical)
        self.durable = DurableNotice(False)  # set from its Hello (replication/early_ship.py)

    def __repr__(self) -> str:
        return (
            f"<FollowerSession {self.node_id} {self.state.name} sent={self.sent_lsn} "
            f"durable={self.durable_lsn}>"
        )

    def lag_records(self) -> int:
        return max(self.leader.store.log.written_lsn.value - self.durable_lsn, 0)

    def lag_ms(self) -> float:
        return self.leader.lag_clock.lag_ms(
            self.durable_lsn, self.leader.store.log.written_lsn.value
        )

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": self.node_id,
            "address": self.address,
            "state": self.state.value,
            "sent_lsn": self.sent_lsn,
            "durable_lsn": self.durable_lsn,
            "applied_lsn": self.applied_lsn,
            "lag_records": self.lag_records(),
            "lag_ms": round(self.lag_ms(), 3),
            "in_sync": self.node_id in self.leader.tracker.in_sync,
        }
        if self.snapshot is not None:
            out["snapshot"] = self.snapshot.status()
        if self.serve_address:
            out["serves_snapshots"] = self.serve_address
        return out

    # ------------------------------------------------------------------ one unit of work

    async def step(self) -> bool:
        """Ship the next batch of WAL records, if any; True when something was sent."""
        store = self.leader.store
        assert self._cursor is not None
        cursor = self._cursor
        leader = self.leader
        cursor.early = ships_early(
            leader.config.ship_before_fsync, leader.term_begun_here, self.durable
        )
        end = store.log.flushed_lsn if cursor.early else store.log.written_lsn
        if cursor.next_lsn > end.value:
            return False  # nothing new: no read at all
        budget = self.stream.frame_bytes_max - WAL_BATCH_OVERHEAD_BYTES
        # tailing live writes: what was just written is still in the WAL's memory, or a few
        # KiB of it in the page cache; either costs less than a round trip to a worker thread
        raw = cursor.read_recent(budget)
        if raw is None:
            backlog = cursor.backlog_bytes()
            if backlog is not None and backlog <= INLINE_READ_BYTES:
                raw = cursor.read_files(budget)
            else:
                raw = await asyncio.to_thread(cursor.read_files, budget)
        if raw is None:
            return False
        prev_lsn, prev_term, prev_chain = self._prev
        leader_lsn = store.log.written_lsn.value
        written = self.leader.lag_clock.write_time_us(raw.last_lsn) or now_us()
        await self.stream.send(
            WalBatch(
                term=self.leader.term,
                prev_lsn=prev_lsn,
                prev_term=prev_term,
                prev_chain=prev_chain,
                first_lsn=raw.first_lsn,
                last_lsn=raw.last_lsn,
                leader_lsn=max(leader_lsn, raw.last_lsn),
                leader_write_ts_us=written,
                records=raw.data,
            )
        )
        self._prev = (raw.last_lsn, raw.last_term, raw.last_chain)
        self.sent_lsn = raw.last_lsn
        self.leader.metrics.shipped_records.inc(raw.last_lsn - raw.first_lsn + 1)
        return True

    # ------------------------------------------------------------------ the loops

    async def run(self, slot: HandshakeSlot) -> None:
        """Authenticate, subscribe and serve the follower until the link ends; ``slot`` (its
        place among the unauthenticated connections) is given back once it authenticated."""
        leader = self.leader
        timeout = leader.store.limits.read_timeout_ms / 1000
        stream = self.stream
        assert leader.config.secret is not None
        hello, challenge = await authenticate_follower(
            stream, leader.store.limits, leader.config.cluster_id, leader.config.secret
        )
        slot.release()
        self.node_id = hello.node_id
        ships_parts = leader.config.physical_followers and takes_parts(hello.protocol_version)
        self.durable = DurableNotice(takes_leader_durable(hello.protocol_version))
        if ships_parts:
            # what its last link left of a part, and what was made while it was away
            self.parts = leader.part_shippers.attach(self.node_id)
        else:
            leader.part_shippers.forget(self.node_id)  # it asks for none any more
        await stream.send(
            make_welcome(
                leader.config.secret,
                hello,
                challenge,
                leader_node_id=leader.store.config.node_id,
                term=leader.term,
                leader_last_lsn=leader.store.log.written_lsn.value,
                leader_url=leader.config.http_url or "",
                ack_settings=AckSettings.of(leader.config).encode(),
                ships_parts=ships_parts,
            )
        )
        try:
            sub = await stream.expect(Subscribe, timeout)
        except PeerRefused as exc:
            if exc.details.get("refused") == StaleTerm.code:
                # the follower knows a newer term than the one in our Welcome: we were deposed
                # (by at least the next term; the refusal does not say which)
                leader.fence(
                    f"follower {hello.node_id} refused this leader: {exc.message}", leader.term + 1
                )
            raise
        # it holds these already (a staged snapshot: once it installed it, before any ack)
        self.sent_lsn = self.durable_lsn = sub.lsn
        self.serve_address = sub.serve_address
        leader.note_follower(self.node_id, sub.http_url)
        leader.register(self)
        receiver = asyncio.create_task(self._receive(timeout), name=f"recv-{self.node_id}")
        try:
            await self._serve(sub)
        finally:
            receiver.cancel()
            with contextlib.suppress(BaseException):
                await receiver

    async def _serve(self, sub: Subscribe) -> None:
        leader = self.leader
        decision = leader.locate(sub)
        if isinstance(decision, Diverged):
            await self.stream.send(decision)
            self.close_reason = f"diverged: {decision.reason}"
            return
        next_lsn = decision
        if next_lsn is None:
            # a staged snapshot too old for this WAL gets one from here, not another redirect
            if not sub.staged and await self._redirect(sub):
                return
            next_lsn = await self._send_snapshot()
        else:
            if sub.staged:
                await self._confirm_staged(sub)
            self._prev = (sub.lsn, sub.term, sub.chain)
        self.sent_lsn = next_lsn - 1
        self._cursor = leader.store.log.cursor(next_lsn)
        self.state = FollowerState.CATCHING_UP
        heartbeat_s = leader.store.limits.heartbeat_interval_ms / 1000
        try:
            while True:
                self.wake.clear()
                await self._send_in_sync()
                end = leader.store.log.written_lsn.value  # the end of log as this step starts
                try:
                    sent = await self.step()
                except WalGone:
                    # retention let the WAL go: restart with a snapshot on the next connect
                    self.close_reason = "needed WAL was removed; reconnect for a snapshot"
                    return
                # caught up: sent the log's end as it was when the step began (as Kafka judges
                # a replica), not "nothing new at all", which a steady load may never allow
                if not self._caught_up_sent and self.sent_lsn >= end:
                    await self.stream.send(CaughtUp(term=leader.term, leader_lsn=self.sent_lsn))
                    self._caught_up_sent = True
                    self.state = FollowerState.STREAMING
                    leader.evaluate(self)
                told = self.durable.due(leader.term, leader.store.log.written_lsn.value)
                if told is not None:
                    await self.stream.send(told)  # after the records it may cover
                if self.parts is not None and self.parts.due(self.durable_lsn):
                    part_msg = await self.parts.next_message(self.durable_lsn)
                    if part_msg is not None:
                        # one chunk per turn, between WAL batches: the log never waits
                        # for a whole part
                        await self.stream.send(part_msg)
                        sent = True
                if sent:
                    continue
                try:
                    async with asyncio.timeout(heartbeat_s):
                        await self.wake.wait()
                except TimeoutError:
                    await self.stream.send(
                        Heartbeat(
                            term=leader.term,
                            last_lsn=leader.store.log.written_lsn.value,
                            ts_us=now_us(),
                        )
                    )
        finally:
            if self._cursor is not None:
                self._cursor.close()
            if self.parts is not None:
                self.leader.part_shippers.detach(self.parts)

    async def _send_in_sync(self) -> None:
        """The leader's newest in-sync record, when this follower has not been sent it: after
        the WAL already sent, so a member that stores it holds what it covers soon."""
        record = self.leader.insync.current
        if record is not None and record.order != self._in_sync_sent:
            await self.stream.send(record.to_wire())
            self._in_sync_sent = record.order

    async def _receive(self, timeout: float) -> None:
        """Acks and heartbeats from the follower; a silent follower is dropped at the deadline."""
        try:
            while True:
                msg = await self.stream.recv(timeout)
                self.last_heard = time.monotonic()
                if isinstance(msg, Ack):
                    if msg.durable_lsn > self.sent_lsn:
                        raise ProtocolError(
                            f"{self.node_id} acked lsn {msg.durable_lsn} beyond what was sent "
                            f"({self.sent_lsn})"
                        )
                    self.durable_lsn = max(self.durable_lsn, msg.durable_lsn)
                    self.applied_lsn = max(self.applied_lsn, msg.applied_lsn)
                    self.ack_rate.note(self.durable_lsn, time.monotonic())
                    # the follower acknowledges nothing while it installs: an ack of the
                    # snapshot's end means the install is over, and so is the transfer
                    snapshot = self.snapshot
                    if snapshot and snapshot.sent and self.durable_lsn >= snapshot.last_lsn:
                        self.snapshot = None
                    if self.parts is not None and self.parts.waiting:
                        self.wake.set()  # a part may be due now
                    self.leader.on_ack(self)
                elif isinstance(msg, Heartbeat):
                    if msg.term > self.leader.term:
                        self.leader.fence(
                            f"follower {self.node_id} is at term {msg.term}", msg.term
                        )
                        raise StaleTerm(
                            f"{self.node_id} is at term {msg.term}, above this leader's "
                            f"{self.leader.term}: this leader was deposed"
                        )
                elif isinstance(msg, Refused):
                    if msg.code == StaleTerm.code:
                        self.leader.fence(
                            f"follower {self.node_id} refused: {msg.message}", self.leader.term + 1
                        )
                    raise ProtocolError(
                        f"{self.node_id} refused the stream ({msg.code}): {msg.message}"
                    )
                elif isinstance(msg, InSyncStored):
                    self.leader.insync.confirm(self.node_id, msg.term, msg.version)
                elif isinstance(msg, SnapshotResume):
                    if self.state is not FollowerState.SNAPSHOT or self._resume.full():
                        raise ProtocolError("SnapshotResume outside a snapshot transfer")
                    self._resume.put_nowait(msg)
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} from a follower")
        except WalshipError as exc:
            self.close_reason = exc.message
            await self.stream.close()

    async def _send_snapshot(self) -> int:
        """Send the pinned checkpoint (``snapshot_send.py``); returns the lsn to stream from
        (S+1). The WAL after S is pinned too, until the transfer ends."""
        leader = self.leader
        store = leader.store
        manifest = store.manifest
        self.state = FollowerState.SNAPSHOT
        pin_id = id(self)
        leader.pins[pin_id] = manifest.last_lsn + 1
        try:
            await send_snapshot(
                store,
                manifest,
                self.stream,
                self._resume.get,
                leader.metrics,
                self._snapshot_started,
            )
        finally:
            leader.pins.pop(pin_id, None)
        self._prev = (manifest.last_lsn, manifest.last_term, manifest.chain_bytes)
        if self.parts is not None:
            self.parts.drop_through(manifest.last_lsn)  # the snapshot holds them
        return manifest.last_lsn + 1

    def _snapshot_started(self, progress: SnapshotProgress) -> None:
        self.snapshot = progress

    async def _redirect(self, sub: Subscribe) -> bool:
        """Send a follower that needs a snapshot to caught-up followers that serve them,
        when it takes redirects; True when it was redirected (the session then ends)."""
        if sub.redirect == REDIRECT_NO:
            return False
        leader = self.leader
        sources = leader.snapshot_sources(self.node_id)
        if not sources and sub.redirect != REDIRECT_ANY:
            return False
        min_lsn = leader.store.log.first_lsn().value - 1
        await self.stream.send(SnapshotRedirect(term=leader.term, sources=sources, min_lsn=min_lsn))
        leader.metrics.snapshots_redirected.inc()
        self.close_reason = f"redirected for a snapshot to {', '.join(sources) or 'its own source'}"
        log.info(
            "replication: %s needs a snapshot: redirected to %s (it must reach lsn %d)",
            self.node_id,
            ", ".join(sources) or "the source it names itself",
            min_lsn,
        )
        return True

    async def _confirm_staged(self, sub: Subscribe) -> None:
        """Vouch for a snapshot the follower fetched from another follower and has not
        installed (``locate`` found this very record -- term and chain -- in this log, and
        the WAL after it): the follower installs it with this leader's term history."""
        leader = self.leader
        await self.stream.send(
            SnapshotConfirmed(
                term=leader.term,
                lsn=sub.lsn,
                last_term=sub.term,
                chain=sub.chain,
                term_history=leader.store.log.term_history(),
            )
        )
        leader.metrics.snapshots_confirmed.inc()


class Leader:
    """Replication on a leader node: the listener, sessions, acks, in-sync set and retention."""

    def __init__(
        self,
        store: Store,
        config: ReplicationConfig,
        metrics: ReplicationMetrics,
        on_fence: Callable[[int], None] | None = None,
        in_sync_file: InSyncFile | None = None,
        on_follower: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self._on_fence = on_fence  # persists the newer term, so a restart stays fenced
        self._on_follower = on_follower  # remembers followers' URLs (asked after a restart)
        self.tracker = AckTracker()
        self.lag_clock = LagClock()
        repl_dir = store.data_dir / "replication"
        self.ledger_keeper = LedgerKeeper(repl_dir / "degraded.json", metrics)
        self.acks = AckHistory(repl_dir / "acks.json")
        self.fenced: str | None = None  # why this leader stopped taking writes (deposed)
        # this process began the current term (a promotion, or the term a leader start
        # takes): only then may records go out before its fsync (replication/early_ship.py)
        self.term_begun_here = False
        self.fenced_term = 0
        self.slots = RetentionSlots(repl_dir / "slots.json")
        self.lag_budget = LagBudget(
            config.max_replication_lag_ms, config.max_lag_ms, metrics, self.in_sync_lag_ms
        )
        self.retention = RetentionForecaster(
            config.wal_retention_bytes_max,
            metrics,
            warn_s=store.limits.retention_exhaustion_warn_ms / 1000,
        )
        self.sessions: dict[str, FollowerSession] = {}
        self.part_shippers = PartShippers(store, metrics)  # physical followers' part queues
        self.pins: dict[int, int] = {}
        self._server: asyncio.Server | None = None
        self._listen_sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: asyncio.Task[None] | None = None
        self.port: int | None = None
        self.handshakes = HandshakeGate(store.limits.unauthenticated_connections_max)
        self.insync = InSyncPublisher(
            in_sync_file or InSyncFile(store.data_dir),
            leader_id=store.config.node_id,
            term=self.term,
            ack_mode=str(config.ack_mode),
            end_lsn=lambda: self.store.log.written_lsn.value,
            on_change=self.tracker.set_counting,
        )
        self._publisher: asyncio.Task[None] | None = None
        store.set_retention_floor(self.retention_floor)

    @property
    def term(self) -> int:
        return self.store.log.current_term.value

    @property
    def ledger(self) -> DegradationLedger:
        return self.ledger_keeper.ledger

    def fence(self, reason: str, term: int = 0) -> None:
        """Stop taking writes for good: a newer term exists, so this leader was deposed.

        Pending and later acknowledgement waits answer unsatisfied at once (never
        ``replicated``); the node refuses writes (``Fenced``) from now on. ``term`` is the
        newer term (or a lower bound of it), 0 when the reason is not one; a newer term is
        persisted (``on_fence``), so the node is still fenced after a restart.
        """
        self.fenced_term = max(self.fenced_term, term)
        if self.fenced is None:
            self.fenced = reason
            log.error("replication: this leader (term %d) is fenced: %s", self.term, reason)
        self.tracker.fail_all(f"this leader is fenced: {reason}")
        if self.fenced_term and self._on_fence is not None:
            try:
                self._on_fence(self.fenced_term)  # a no-op once this term is saved
            except Exception as exc:  # fenced all the same; the next fence tries again
                log.error(
                    "replication: could not save the newer term %d: %s", self.fenced_term, exc
                )

    def note_follower(self, node_id: str, http_url: str) -> None:
        """A follower subscribed, reachable at ``http_url`` (empty: it did not say)."""
        if http_url and self._on_follower is not None:
            try:
                self._on_follower(node_id, http_url)
            except OSError as exc:  # only a later restart check misses it; replication goes on
                log.error("replication: could not remember follower %s: %s", node_id, exc)

    def note_replicated(self, lsn: int) -> None:
        """A write up to ``lsn`` was answered ``replicated`` (kept for lost-and-found)."""
        self.acks.replicated(self.term, lsn)

    def adopt_listener(self, sock: socket.socket) -> None:
        """Listen for followers on ``sock`` (bound and listening) when started, instead of
        binding then: ``walship serve`` binds before it serves, so that a port in use is a
        one-line start-up error and not a failure inside the HTTP server's start-up."""
        self._listen_sock = sock

    async def start(self) -> None:
        """Listen for followers (needs a secret) and start the in-sync monitor."""
        self._loop = asyncio.get_running_loop()
        self.acks.led(self.term)
        # records written before this start count as written now (lag is measured from here)
        self.lag_clock.written(self.store.log.written_lsn.value)
        self.store.log.add_listener(self._on_wal_commit)
        if self.config.ship_before_fsync:
            self.store.log.add_flush_listener(self._on_wal_flush)
        if self.config.physical_followers:
            self.store.on_part = self._on_part
        if self.config.secret is None:
            log.warning("replication listener disabled: no shared secret configured")
        else:
            # a socket handed over by adopt_listener, else bound here (after a promotion)
            adopted, self._listen_sock = self._listen_sock, None
            where: dict[str, Any] = (
                {"sock": adopted}
                if adopted is not None
                else {"host": self.config.host, "port": self.config.port}
            )
            self._server = await asyncio.start_server(
                self._accept,
                **where,
                ssl=self.config.server_ssl,
                # the TLS handshake happens before _accept sees the connection: bound it too
                ssl_handshake_timeout=(
                    self.store.limits.handshake_timeout_ms / 1000
                    if self.config.server_ssl is not None
                    else None
                ),
                limit=1 << 20,
            )
            sock = self._server.sockets[0].getsockname()
            self.port = int(sock[1])
            log.info("replication listening on %s:%s", sock[0], sock[1])
        self._monitor = asyncio.create_task(self._monitor_in_sync(), name="in-sync-monitor")
        self._publisher = asyncio.create_task(self._publish_in_sync(), name="in-sync-publisher")

    async def stop(self) -> None:
        self.store.log.remove_listener(self._on_wal_commit)
        self.store.log.remove_flush_listener(self._on_wal_flush)
        if self.store.on_part == self._on_part:
            self.store.on_part = None
        if self._server is not None:
            self._server.close()
        for task in (self._monitor, self._publisher):
            if task is not None:
                task.cancel()
        for session in list(self.sessions.values()):
            await session.stream.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self.tracker.fail_all("leader stopping")
        self.part_shippers.close()
        await self.ledger_keeper.flush()
        self.acks.flush()
        self.slots.save()

    def _on_wal_commit(self, lsn: int) -> None:
        """WAL writer thread: note the time and wake every session."""
        self.lag_clock.written(lsn)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake_sessions)

    def _on_wal_flush(self, lsn: int) -> None:
        """WAL writer thread, before the group's fsync: wake the sessions that ship early."""
        if not self.term_begun_here:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake_sessions)

    def _on_part(
        self, kind: str, info: PartInfo, replaces: list[PartInfo], manifest: CheckpointManifest
    ) -> None:
        """A checkpoint or merge thread made a part: queue it for every physical follower."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        part = OutgoingPart.of(kind, info, replaces, manifest)
        pinned = self.store.pin_parts([info.file])  # until each session pinned it for itself

        def offer() -> None:
            try:
                self.part_shippers.offer(part)  # connected or not: see PartShippers
                for session in self.sessions.values():
                    if session.parts is not None:
                        session.wake.set()
            finally:
                self.store.unpin_parts(pinned)

        try:
            loop.call_soon_threadsafe(offer)
        except RuntimeError:
            self.store.unpin_parts(pinned)

    def _wake_sessions(self) -> None:
        for session in self.sessions.values():
            session.wake.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        admitted = await open_admitted(
            reader, writer, self.store.limits, self.handshakes, self.metrics
        )
        if admitted is None:
            return
        stream, slot = admitted
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        session = FollowerSession(self, stream)
        try:
            await session.run(slot)
        except AuthenticationError as exc:
            self.metrics.auth_failures.inc()
            log.warning("replication: %s from %s", exc.message, stream.peer)
            await stream.refuse(exc.code, exc.message)
        except WalshipError as exc:
            session.close_reason = exc.message
            log.info("replication: closing %s (%s): %s", session.node_id, stream.peer, exc.message)
            await stream.refuse(exc.code, exc.message)
        except (ConnectionError, OSError) as exc:
            session.close_reason = str(exc)
        except asyncio.CancelledError:
            pass
        finally:
            slot.release()
            session.state = FollowerState.CLOSED
            self.unregister(session)
            await stream.close()
            if task is not None:
                self._tasks.discard(task)

    # ------------------------------------------------------------------ positions

    def locate(self, sub: Subscribe) -> int | Diverged | None:
        """Where a follower at ``sub`` continues: the next lsn to ship, None for "needs a
        snapshot", or Diverged when its tail is not on this leader's history."""
        wal = self.store.log
        last = wal.last_position
        if sub.term > self.term:
            # fencing: a follower that has seen a newer term must not follow a stale leader,
            # and this leader, deposed, must stop taking writes
            self.fence(f"a follower subscribed at term {sub.term}", sub.term)
            raise StaleTerm(
                f"follower is at term {sub.term}, above this leader's term {self.term}",
                stale_term=self.term,
            )
        if sub.lsn == 0:
            return 1 if wal.first_lsn().value <= 1 else None
        if sub.lsn > last.lsn.value:
            return self._diverged(sub, "follower has records past the leader's end of log")
        mine = self._term_and_chain_at(sub.lsn)
        if mine is None:
            # the record itself is gone (checkpointed, its WAL removed), but the term history
            # outlives the WAL and says which term wrote it here. Another term there means the
            # follower holds records this log does not: a snapshot would replace them without
            # a trace, so it first cuts them to lost-and-found, at a point on both histories
            history = wal.term_history()
            if not on_history(history, sub.term, sub.lsn):
                return self._diverged(
                    sub,
                    f"the leader's term history has term {term_at(history, sub.lsn)} at the "
                    f"follower's lsn {sub.lsn}, not {sub.term} (its WAL there was removed)",
                )
            return None  # on this history as far as terms tell; a snapshot replaces it
        if mine != (sub.term, sub.chain):
            return self._diverged(sub, f"follower's record {sub.lsn} differs from the leader's")
        if sub.lsn + 1 < wal.first_lsn().value:
            return None
        return sub.lsn + 1

    def _diverged(self, sub: Subscribe, reason: str) -> Diverged:
        """The last position both logs can share, from the term histories (Kafka's leader
        epochs, see ``divergence.py``); the follower cuts there (or before, by its own
        history) and subscribes again, which re-checks."""
        wal = self.store.log
        common_term, common = common_point(
            wal.term_history(), wal.last_position.lsn.value, sub.term, sub.lsn
        )
        return Diverged(common_term=common_term, common_lsn=common, reason=reason)

    def _term_and_chain_at(self, lsn: int) -> tuple[int, bytes] | None:
        wal = self.store.log
        first = wal.first_lsn().value
        if lsn >= first:
            for rec in wal.read_from(lsn):
                return rec.term, rec.chain
            return None
        if lsn == first - 1:
            _, path, _ = wal.segment_infos()[0]
            with open(path, "rb") as f:
                header = SegmentHeader.decode(f.read(SEGMENT_HEADER_BYTES), path)
            return header.prev_term, header.prev_chain
        manifest = self.store.manifest
        if lsn == manifest.last_lsn:
            return manifest.last_term, manifest.chain_bytes
        return None

    # ------------------------------------------------------------------ sessions and acks

    def register(self, session: FollowerSession) -> None:
        old = self.sessions.get(session.node_id)
        if old is not None and old is not session:
            log.info("replication: %s reconnected; closing its old session", session.node_id)
            old.close_reason = "replaced by a new connection"
            closing = asyncio.ensure_future(old.stream.close())
            self._tasks.add(closing)
            closing.add_done_callback(self._tasks.discard)
        self.sessions[session.node_id] = session
        self.metrics.followers.set(len(self.sessions))
        if session.node_id not in self.slots.slots:
            self.slots.update(session.node_id, 0, force=True)

    def unregister(self, session: FollowerSession) -> None:
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
            self.insync.want(session.node_id, False)
            session.in_sync = False
            self.metrics.followers.set(len(self.sessions))
            self.metrics.set_follower(session.node_id, None)

    def snapshot_sources(self, asking: str) -> list[str]:
        """Where a follower that needs a snapshot can fetch it instead of from here: the
        serving addresses of followers in the in-sync set (caught up, lag under
        ``max_lag_ms``), least lagging first; never ``asking`` itself."""
        ready = [
            s
            for s in self.sessions.values()
            if s.serve_address and s.node_id != asking and s.in_sync
        ]
        ready.sort(key=lambda s: s.lag_records())
        return [s.serve_address for s in ready][:SOURCES_MAX]

    def known_followers(self) -> set[str]:
        """Every follower this leader knows: connected, or holding a retention slot (which
        persists until ``forget_follower``)."""
        return set(self.sessions) | set(self.slots.slots)

    def forget_follower(self, node_id: str) -> dict[str, Any]:
        """Forget a follower that is gone for good: its retention slot (the WAL held back for
        it goes at the next checkpoint) and its acknowledgements. Conflict (409) while it is
        connected; NotFound (404) when this leader knows no such follower. Should it connect
        again, it is a new follower: from the WAL if it is still there, else a snapshot."""
        if node_id in self.sessions:
            raise Conflict(
                f"follower {node_id!r} is connected: stop it before forgetting it (a follower "
                "that just stopped counts as connected until the leader notices, at most "
                f"{self.store.limits.read_timeout_ms} ms)",
                node_id=node_id,
            )
        slot = self.slots.slots.get(node_id)
        if slot is None:
            raise NotFound(f"this leader knows no follower {node_id!r}", field="node_id")
        self.slots.drop(node_id)
        self.part_shippers.forget(node_id)
        self.tracker.forget(node_id)
        self.insync.forget(node_id)
        log.warning(
            "replication: forgot follower %s (its slot held WAL from lsn %d)", node_id, slot + 1
        )
        return {"forgotten": node_id, "slot_lsn": slot}

    def on_ack(self, session: FollowerSession) -> None:
        self.tracker.update(session.node_id, session.durable_lsn)
        self.slots.update(session.node_id, session.durable_lsn)
        self.evaluate(session)
        self.lag_budget.acked()

    def in_sync_lag_ms(self) -> float:
        """The lag the in-sync followers are held to by the lag budget: the highest of
        their lags, or of the lags their backlogs will make (0 with none in sync)."""
        now = time.monotonic()
        return max(
            (
                held_to_ms(s.lag_ms(), s.lag_records(), s.ack_rate.per_s(now))
                for s in self.sessions.values()
                if s.in_sync
            ),
            default=0.0,
        )

    def evaluate(self, session: FollowerSession) -> None:
        """Let ``session`` join or leave the in-sync set by its state and lag; publish it."""
        lag_ms = session.lag_ms()
        was = session.in_sync
        # only a follower that has been sent everything once (STREAMING) joins, as a replica
        # joins Kafka's ISR only once caught up: lag_ms counts from when the leader wrote a
        # record, and after a leader restart every older record counts as written at the
        # start, so a follower far behind would otherwise look in sync for max_lag_ms
        now = session.state is FollowerState.STREAMING and lag_ms <= self.config.max_lag_ms
        if now != was:
            session.in_sync = now
            self.insync.want(session.node_id, now)
            log.warning(
                "replication: %s %s the in-sync set (lag %.0f ms, %d records)",
                session.node_id,
                "joined" if now else "left",
                lag_ms,
                session.lag_records(),
            )
        self.metrics.set_follower(session.node_id, session)

    async def _monitor_in_sync(self) -> None:
        reported: str | None = None  # the last failure of the reports, logged once
        while True:
            await asyncio.sleep(0.05)
            self.acks.flush_due()
            for session in list(self.sessions.values()):
                self.evaluate(session)
            self.metrics.in_sync.set(len(self.tracker.in_sync))
            try:
                await self.ledger_keeper.heal(self.durable_positions(), self.followers_needed())
                self.retention.sample(
                    dict(self.slots.slots),
                    self.store.log.written_lsn.value,
                    self.store.log.segment_infos(),
                    time.monotonic(),
                )
            except Exception as exc:  # reports only: the in-sync set above must go on
                if str(exc) != reported:
                    reported = str(exc)
                    log.exception("replication: ledger healing or retention forecast failed")

    def durable_positions(self) -> dict[str, int]:
        """The durable lsn of every known follower: connected (its last ack) or not (its
        retention slot keeps the last one it acknowledged)."""
        durable = dict(self.slots.slots)
        for node_id, lsn in self.tracker.followers.items():
            durable[node_id] = max(lsn, durable.get(node_id, 0))
        return durable

    def followers_needed(self) -> int:
        """How many followers must hold a write for it not to be at risk: as many as the ack
        mode asks of a write (``sync``: the in-sync floor), at least ``--min-in-sync``, and
        at least one."""
        mode, floor = self.config.ack_mode, self.config.min_in_sync
        return max(mode.followers_asked(floor), floor, 1)

    async def _publish_in_sync(self) -> None:
        """Hand out a new in-sync record whenever the set changes (one at a time; a failed
        hand-out, etcd unreachable, is tried again while the old record stays in force)."""
        failing: str | None = None  # the last failure, logged once until it changes
        while True:
            await self.insync.changed.wait()
            if self.fenced is not None:
                return  # a deposed leader's set counts for nothing any more
            try:
                published = await self.insync.publish_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if str(exc) != failing:
                    failing = str(exc)
                    log.warning("replication: could not publish the in-sync set: %s", exc)
                self.insync.changed.set()
                await asyncio.sleep(IN_SYNC_RETRY_S)
                continue
            if failing is not None:
                log.info("replication: in-sync set published again")
                failing = None
            if published is not None:
                self._wake_sessions()

    def retention_floor(self) -> int | None:
        """The lowest lsn a follower or a snapshot transfer still needs from the WAL."""
        # called from the checkpointer thread: work on copies of loop-owned dicts
        needs = list(dict(self.pins).values())
        segments = self.store.log.segment_infos()
        for node_id, durable in dict(self.slots.slots).items():
            behind = slot_bytes(segments, durable)  # WAL from this follower's position on
            if behind <= self.config.wal_retention_bytes_max:
                needs.append(durable + 1)
            else:
                log.warning(
                    "replication: %s is %d WAL bytes behind, over the retention cap; it will "
                    "need a snapshot",
                    node_id,
                    behind,
                )
        return min(needs) if needs else None

    # ------------------------------------------------------------------ writes

    async def confirm(self, lsn: int, mode: AckMode) -> AckOutcome:
        """Wait for ``mode`` at the write's own ``lsn``; degradations go to the ledger."""
        t0 = time.perf_counter()
        outcome = await self.tracker.wait(
            lsn, mode, self.config.ack_timeout_ms / 1000, self.config.min_in_sync
        )
        self.metrics.ack_wait_seconds.observe(time.perf_counter() - t0)
        return outcome

    async def record_degraded(self, first_lsn: int, last_lsn: int, reason: str) -> None:
        """Add the range to the ledger and save it before the write's answer leaves."""
        await self.ledger_keeper.record(first_lsn, last_lsn, reason)

    def status(self) -> dict[str, Any]:
        return {
            "mode": str(self.config.ack_mode),
            "fenced": self.fenced,
            "listening": None if self.port is None else self.config.published_address(self.port),
            "followers": [s.status() for s in self.sessions.values()],
            "in_sync_count": len(self.tracker.in_sync),
            "in_sync_set": self.insync.status(),
            "min_in_sync": self.config.min_in_sync,
            "degraded": self.ledger_keeper.summary(),
            "retention_slots": dict(self.slots.slots),
            "retention": self.retention.status(),
            "lag_budget": self.lag_budget.status(),
        }
