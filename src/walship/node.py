"""A walship node: one store plus what it serves, its role and its health.

The node is what the HTTP API and the CLI talk to. It owns the Store (opened from a
``NodeConfig``), knows its role, runs the replication end that goes with it (a ``Leader``
listener or a ``Follower`` stream, started on the event loop by ``start``), turns a write's
local durability into a durability receipt, and answers ``health()``. The store never imports
this module.

Roles switch at run time (``promote``, ``repoint``; one switch at a time):

* promote (follower → leader): the follower stream is stopped first, so nothing more is
  applied; then a new term starts (above every term this node or the peers it was given have
  seen, persisted in the term history) with a ``_system.term_started`` record, the leader
  listener starts, and only then are writes accepted. It leads with the cluster's ack
  settings, learned from its last leader's Welcome and kept in ``role.json`` (unless its own
  ack flags were given on purpose: ``NodeConfig.ack_pinned``).
* repoint (follower → follower of another leader, or a deposed leader → follower): the old
  end is stopped (a leader stops taking writes first; its pending acknowledgement waits are
  answered, never ``replicated``), then a follower of the new address starts. A tail the new
  leader does not have is cut by divergence repair, into lost-and-found.
* fencing: a leader that learns of a higher term from a follower refuses writes (``Fenced``).
* start-up: a leader asks its peers whether a newer term exists before its first write and
  follows the newer leader if so (``leadership.py``; off under etcd, whose lease decides);
  otherwise it begins a new term above every one it heard of (``restart_term.py``).

A switch is recorded in ``replication/role.json`` (``role_state.py``) so a restart keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import msgspec

from walship import __version__
from walship.advertise import bracket, is_wildcard
from walship.dirlock import DataDirLock
from walship.errors import (
    AckTimeout,
    Conflict,
    Fenced,
    InvalidInput,
    NotLeaseholder,
    ReadOnly,
    Unavailable,
    Unconfirmed,
    UnmeetableAckMode,
    WaitTimeout,
    invariant,
)
from walship.leadership import KnownPeers, LeadershipGuard
from walship.limits import DEFAULT_LIMITS, Limits
from walship.peers import PeerView, fetch_views
from walship.position import Position, Term
from walship.readiness import in_sync_floor, readiness
from walship.replication.acks import AckMode
from walship.replication.cascade import SnapshotServer
from walship.replication.config import AckSettings, ReplicationConfig, parse_address
from walship.replication.follower import Follower, FollowerState
from walship.replication.insync import InSyncFile, InSyncRecord, Witness, may_lose, unclean_reason
from walship.replication.leader import Leader
from walship.replication.metrics import ReplicationMetrics
from walship.role_state import RoleState
from walship.store import PendingAppend, Store, StoreConfig
from walship.wal import FsyncPolicy
from walship.wal.record import TERM_MAX
from walship.wire import Receipt

log = logging.getLogger(__name__)

TERM_STARTED = "_system.term_started"
"""The first record of every term a promotion starts: followers persist the new term with it."""


class Role(StrEnum):
    """What a node does with writes: a leader accepts them, a follower refuses them."""

    LEADER = "leader"
    FOLLOWER = "follower"


class Coordinator(Protocol):
    """Runs beside a node and switches its role (automatic failover, ``election.py``)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    async def publish_in_sync(self, record: InSyncRecord) -> None:
        """Store the leader's new in-sync set where elections read it, before it counts."""
        ...


class HealthStatus(StrEnum):
    """``/health``'s ``status``: ready, serving but not ready (``not_ready`` lists why), or
    unable to store anything (the WAL failed; answered 503)."""

    HEALTHY = "healthy"
    NOT_READY = "not_ready"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node is started with; the CLI fills it from flags and env vars."""

    data_dir: Path
    node_id: str = "walship-1"
    fsync: FsyncPolicy = field(default_factory=FsyncPolicy)
    limits: Limits = DEFAULT_LIMITS
    http_host: str = "127.0.0.1"
    http_port: int = 3900
    admin_token: str | None = None
    role: Role = Role.LEADER
    checkpoints: bool = True
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    peers: tuple[str, ...] = ()  # HTTP URLs of the other nodes, asked before a promotion
    # the ack settings were given on purpose (flags): they win over the cluster's settings
    # learned from a leader (``role.json``), which a promoted node otherwise leads with
    ack_pinned: bool = False
    # how their HTTPS is trusted (an ssl context from --http-tls-ca); True: the system's CAs
    peer_verify: bool | ssl.SSLContext = True
    part_worker: bool = False  # merges in a worker process (storage.part_worker)

    def store_config(self) -> StoreConfig:
        return StoreConfig(
            data_dir=self.data_dir,
            node_id=self.node_id,
            fsync=self.fsync,
            limits=self.limits,
            checkpoints=self.checkpoints,
            part_worker=self.part_worker,
        )


def http_url(host: str, port: int) -> str | None:
    """The URL clients reach this node at, or None when the host is a wildcard (which
    address a client should use is then unknown here: serve resolves it, ``advertise.py``)."""
    if not port or is_wildcard(host):
        return None
    return f"http://{bracket(host)}:{port}"


class Node:
    """One running node. Thread-safe to read; ``close`` once at the end."""

    def __init__(self, config: NodeConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.role = config.role
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self._closed = False
        self.replication_metrics = ReplicationMetrics(store.metrics.registry)
        self.role_state = RoleState(config.data_dir)
        self.in_sync_file = InSyncFile(config.data_dir)  # the leader's, or the one it sent
        # the leader address changes on repoint; the HTTP URL is what a leader tells followers
        self.replication = dataclasses.replace(
            config.replication,
            http_url=config.replication.http_url or http_url(config.http_host, config.http_port),
        )
        switched = self.role_state.record
        if switched.ack_settings is not None and not config.ack_pinned:
            learned = switched.ack_settings
            if learned != AckSettings.of(self.replication):
                log.info("ack settings %s, as the cluster's leader last said", learned)
            self.replication = learned.apply(self.replication)
        if switched.role is not None:
            role, leader = Role(switched.role), switched.leader
            if role is not self.role or (
                role is Role.FOLLOWER and leader != config.replication.leader
            ):
                log.warning(
                    "role %s%s from %s (set by promote/repoint) overrides the flags",
                    role,
                    f" of {leader}" if leader else "",
                    self.role_state.path,
                )
            self.role = role
            self.replication = dataclasses.replace(self.replication, leader=leader)
        self.known_peers = KnownPeers(config.data_dir)
        self.leadership = LeadershipGuard(self, self.known_peers)
        self.leader: Leader | None = None
        self.follower: Follower | None = None
        # a follower's listener for other followers' snapshots (``--serve-snapshots``)
        self.snapshot_server: SnapshotServer | None = None
        if self.role is Role.FOLLOWER and self.replication.serve_snapshots:
            self.snapshot_server = self._new_snapshot_server()
        if self.role is Role.LEADER:
            self.leader = self._new_leader()
        else:
            self.follower = self._new_follower(self.replication.leader, 0)
        self._visible = asyncio.Event()
        self.subscriptions_ended = False  # set when the server drains: open streams finish
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._switch = asyncio.Lock()
        # automatic failover (etcd): a reason to refuse writes, and what runs beside the node
        self.write_gate: Callable[[], str | None] | None = None
        self.coordinator: Coordinator | None = None
        self.replication_metrics.term.set(store.log.current_term.value)
        self._bind_role_metrics()

    def _bind_role_metrics(self) -> None:
        """Gauges read from the node's current role at each scrape.

        A role switch replaces the Leader or Follower object, so figures one of them set would
        outlive it (a deposed leader repointed to follow would report itself fenced for ever).
        """
        m = self.replication_metrics

        def fenced() -> float:
            return 1.0 if self.leader is not None and self.leader.fenced is not None else 0.0

        def slots() -> float:
            return 0.0 if self.leader is None else float(len(self.leader.slots.slots))

        def required() -> float:
            # the floor is the ack mode's, which only a leader has
            return 0.0 if self.leader is None else float(in_sync_floor(self))

        m.follow_roles(lambda: self.leader, lambda: self.follower)
        m.is_leader.set_function(lambda: 1.0 if self.leader is not None else 0.0)
        m.fenced.set_function(fenced)
        m.in_sync_required.set_function(required)
        m.retention_slots.set_function(slots)
        m.max_lag_seconds.set(self.replication.max_lag_ms / 1000)

    def _new_leader(self) -> Leader:
        """A leader of the WAL's current term: fenced from the start when this node has heard
        of a newer term (a deposed leader that restarted must not take writes again)."""
        leader = Leader(
            self.store,
            self.replication,
            self.replication_metrics,
            self.role_state.saw_term,
            self.in_sync_file,
            on_follower=self.known_peers.remember,
        )
        leader.insync.hook = self._publish_in_sync
        seen = self.role_state.record.term_seen
        if seen > leader.term:
            leader.fence(
                f"term {seen} was seen before this node started (it leads term {leader.term}): "
                "repoint it to the current leader",
                seen,
            )
        return leader

    def _new_follower(self, leader: str | None, known_term: int) -> Follower:
        config = dataclasses.replace(self.replication, leader=leader)
        self.replication = config
        return Follower(
            self.store,
            config,
            self.replication_metrics,
            self.config.node_id,
            known_term=max(known_term, self.role_state.record.term_seen),
            on_term=self.role_state.saw_term,
            in_sync_file=self.in_sync_file,
            on_settings=self._learn_settings,
        )

    def _new_snapshot_server(self) -> SnapshotServer:
        return SnapshotServer(
            self.store, self.replication, self.replication_metrics, self._snapshot_not_ready
        )

    def _snapshot_not_ready(self) -> str | None:
        """Why this node must not serve a snapshot now (None: it may): only a follower that
        streams from its leader within ``max_lag_ms`` hands out its checkpoint."""
        follower = self.follower
        if follower is None:
            return "it is not a follower"
        if not follower.connected or follower.state is not FollowerState.STREAMING:
            return f"it is not streaming from its leader ({follower.state.value})"
        lag_ms = follower.lag_ms()
        if lag_ms is None or lag_ms > self.replication.max_lag_ms:
            return f"it lags its leader ({lag_ms} ms, max_lag_ms {self.replication.max_lag_ms})"
        return None

    async def _start_snapshot_server(self) -> None:
        """Serve snapshots (when configured, on a started follower) and tell the follower
        where, so its leader can redirect others here."""
        if not self.replication.serve_snapshots or self.follower is None or not self._started:
            return
        if self.snapshot_server is None:
            self.snapshot_server = self._new_snapshot_server()
        if self.snapshot_server.port is None:
            try:
                await self.snapshot_server.start()
            except OSError as exc:  # following matters more than serving: go on without
                log.error("cannot serve snapshots on the replication port: %s", exc)
                self.snapshot_server = None
                return
        self.follower.cascade.serve_address = self.snapshot_server.address or ""

    async def _stop_snapshot_server(self) -> None:
        server, self.snapshot_server = self.snapshot_server, None
        if server is not None:
            await server.stop()

    def _learn_settings(self, settings: AckSettings) -> None:
        """The leader said the cluster's ack settings: keep them for a promotion."""
        if self.role_state.learned(settings):
            log.info("the cluster's ack settings are %s", settings)
        if not self.config.ack_pinned:
            self.replication = settings.apply(self.replication)

    async def _publish_in_sync(self, record: InSyncRecord) -> None:
        if self.coordinator is not None:
            await self.coordinator.publish_in_sync(record)

    @classmethod
    def open(cls, config: NodeConfig, *, dir_lock: DataDirLock | None = None) -> Node:
        """Open (and recover) the node's store, which takes the data dir's lock (or adopts
        ``dir_lock``). Raises DataDirLocked when the dir is open elsewhere, CorruptionError on
        damaged data."""
        store = Store.open(config.store_config(), dir_lock=dir_lock)
        try:
            return cls(config, store)
        except BaseException:
            store.close()  # and with it the lock
            raise

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def limits(self) -> Limits:
        return self.config.limits

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ lifecycle on the loop

    async def start(self) -> None:
        """Start replication on the running event loop (idempotent)."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._visible = asyncio.Event()
        self.store.log.add_listener(self._on_commit)
        self.store.cuts.add_listener(self._on_cut)
        self.store.visible_bound.add_listener(self._on_cut)  # a follower shows more
        if self.leader is not None:
            await self.leader.start()
        if self.follower is not None:
            await self._start_snapshot_server()  # first: its address goes in the Subscribe
            await self.follower.start()
        if self.coordinator is not None:
            await self.coordinator.start()  # etcd's lease decides who may write
        else:
            await self.leadership.start()  # before any write: is a newer term known?

    async def stop(self) -> None:
        """Stop replication (before ``close``)."""
        if not self._started:
            return
        self._started = False
        await self.leadership.stop()
        if self.coordinator is not None:
            await self.coordinator.stop()
        self.store.log.remove_listener(self._on_commit)
        self.store.cuts.remove_listener(self._on_cut)
        self.store.visible_bound.remove_listener(self._on_cut)
        if self.leader is not None:
            await self.leader.stop()
        if self.follower is not None:
            await self.follower.stop(shutting_down=True)
        await self._stop_snapshot_server()

    def _on_commit(self, lsn: int) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._pulse)

    def _on_cut(self) -> None:
        # a repair cut the log (any thread): subscriptions waiting for the next lsn must look
        self._on_commit(0)

    def _pulse(self) -> None:
        self._visible.set()
        self._visible = asyncio.Event()

    async def wait_past(self, lsn: int, timeout_s: float) -> bool:
        """Wait until an lsn above ``lsn`` is visible here or a repair cuts the log; False
        when ``timeout_s`` passes first or the node ends its subscriptions.

        Every waiter waits on the one event the WAL's commits pulse, so a thousand idle
        subscribers cost a thousand parked coroutines and nothing per commit but one wake-up.
        """
        deadline = time.monotonic() + timeout_s
        # before ``start`` nothing pulses: poll; after it, the tick only bounds a stale wait
        tick = 1.0 if self._started else 0.05
        cuts = self.store.cuts.seq
        while self.store.visible_lsn <= lsn and self.store.cuts.seq == cuts:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.subscriptions_ended:
                return False
            event = self._visible
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, tick)):
                    await event.wait()
        return not self.subscriptions_ended

    def end_subscriptions(self) -> None:
        """Make open subscriptions finish (the server is draining); call on the loop."""
        self.subscriptions_ended = True
        self._pulse()

    async def wait_visible(self, lsn: int, timeout_ms: int) -> None:
        """Wait until ``lsn`` is applied here (read-your-writes on a follower).

        WaitTimeout (504) when ``timeout_ms`` passes first; InvalidInput for a wait longer
        than ``min_lsn_wait_ms_max``.
        """
        if self.store.visible_lsn >= lsn:
            return
        cap = self.limits.min_lsn_wait_ms_max
        if not 0 <= timeout_ms <= cap:
            raise InvalidInput(f"min_lsn wait must be 0..{cap} ms", field="min_lsn_wait_ms")
        deadline = time.monotonic() + timeout_ms / 1000
        while self.store.visible_lsn < lsn:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(
                    f"lsn {lsn} was not applied within {timeout_ms} ms on {self.node_id} "
                    f"(applied: {self.store.visible_lsn})",
                    min_lsn=lsn,
                    applied_lsn=self.store.visible_lsn,
                )
            event = self._visible
            with contextlib.suppress(TimeoutError):
                # the tick covers nodes whose loop has not started replication
                async with asyncio.timeout(min(remaining, 0.05)):
                    await event.wait()

    # ------------------------------------------------------------------ writes

    def check_writable(self) -> Leader:
        """The leader end that takes this write; ReadOnly (409, naming the leader) unless this
        node accepts writes; Fenced (409) on a leader that learned it was deposed.

        The write is confirmed by the leader returned here, whatever happens to the node's
        role meanwhile (``confirm``)."""
        if self.role is not Role.LEADER:
            follower = self.follower
            raise ReadOnly(
                f"node {self.node_id} is a {self.role}; write to the leader",
                leader=None if follower is None else follower.leader_address,
                leader_url=None if follower is None else follower.leader_url,
            )
        leader = self.leader
        gate = self.write_gate
        if leader is not None and leader.fenced is None and gate is not None:
            reason = gate()
            if reason is not None:
                raise NotLeaseholder(
                    f"node {self.node_id} leads term {leader.term} but takes no writes: {reason}"
                )
        if leader is not None and leader.fenced is not None:
            newer_term, newer_url = self._newer_leader(leader)
            if newer_term is None:
                # fenced without word of a successor (e.g. its etcd lease ran out while etcd
                # was unreachable): there may be no leader at all yet
                where = "no newer leader is known to it yet; retry once one is elected or promoted"
            else:
                where = f"write to the leader of term {newer_term}" + (
                    f" at {newer_url}" if newer_url else ""
                )
            raise Fenced(
                f"node {self.node_id} was the leader of term {leader.term} but is fenced "
                f"({leader.fenced}): it accepts no writes; {where}",
                term=leader.term,
                fenced=leader.fenced,
                newer_term=newer_term,
                leader_url=newer_url,
            )
        block = self.leadership.write_block()
        if block is not None:
            raise Unconfirmed(f"node {self.node_id}: {block}")
        invariant(leader is not None, f"{self.node_id} is a leader without a leader end")
        assert leader is not None
        return leader

    def _newer_leader(self, leader: Leader) -> tuple[int | None, str | None]:
        """The term (and HTTP URL, when the election published it) of a leader newer than
        ``leader``; ``(None, None)`` when this node knows of none."""
        seen = None if self.coordinator is None else self.coordinator.status().get("leader")
        if isinstance(seen, dict) and int(seen.get("term") or 0) > leader.term:
            url = seen.get("url")
            return int(seen["term"]), None if url is None else str(url)
        newer = self.leadership.newer  # a peer named the newer term (and its leader)
        if newer is not None and newer[0] > leader.term:
            return newer
        if leader.fenced_term > leader.term:
            return leader.fenced_term, None
        return None, None

    def ack_mode_for(self, requested: AckMode | None, leader: Leader | None = None) -> AckMode:
        """The server's ack mode, or a stricter one a write asked for (never a weaker one)."""
        mode = self.replication.ack_mode
        if requested is None:
            return mode
        leader = leader or self.leader
        in_sync = len(leader.tracker.in_sync) if leader is not None else 0
        return mode.stricter(requested, in_sync)

    def check_ack_mode(self, requested: AckMode | None, leader: Leader) -> None:
        """UnmeetableAckMode (400) when a write asks for a stricter mode than the server's that
        needs more followers than the cluster is configured for; before anything is written,
        so it leaves no ledger entry and a retry stores nothing twice.

        The cluster is configured for as many followers as the more of: the followers this
        leader knows (connected, or holding a retention slot, which persists until
        ``forget-follower``) and the other nodes in ``--peers``. (``--min-in-sync`` is a floor
        for waiting, not a count of followers: its default of 1 is set on single nodes too.)
        The server's own mode is never refused here: it is what the operator chose, and a
        fresh cluster's followers connect after its leader starts.
        """
        # ``stricter`` hands back the very object asked for only when it raises the server's
        # mode; a request equal to it or weaker is the server's own mode
        if requested is None or self.ack_mode_for(requested, leader) is not requested:
            return
        replication = self.replication
        asked = requested.followers_asked(replication.min_in_sync)
        known = leader.known_followers()
        own_url = self.replication.http_url
        peers = [p for p in self.config.peers if p.rstrip("/") != (own_url or "").rstrip("/")]
        configured = max(len(known), len(peers))
        if asked > configured:
            raise UnmeetableAckMode(
                f"ack mode {requested} asks for {asked} follower{'s' * (asked != 1)}, but this "
                f"cluster is configured for {configured} (followers known to {self.node_id}: "
                f"{len(known)}; other nodes in --peers: {len(peers)})",
                field="ack_mode",
                ack_mode=str(requested),
                followers_asked=asked,
                followers_configured=configured,
            )

    async def confirm(
        self, pending: PendingAppend, requested: AckMode | None, leader: Leader
    ) -> list[Receipt]:
        """Wait for the write's acknowledgement mode and fill in the durability receipts.

        ``leader`` is the one ``check_writable`` gave the write: a write in a waiting mode is
        answered ``replicated``, ``degraded`` (recorded in that leader's ledger) or, with
        ``on_ack_timeout=fail``, AckTimeout (503) saying the write is committed locally at its
        lsn but not confirmed by replicas -- never ``local``, even when the node was demoted
        (its leader end stopped: nothing more can confirm) while the write waited.
        """
        receipts = pending.receipts
        answers = pending.answers  # with the batch's tracking receipt
        mode = self.ack_mode_for(requested, leader)
        if not mode.waits or not answers:
            return receipts
        last = pending.max_lsn
        outcome = await leader.confirm(last, mode)
        if outcome.satisfied:
            durability = "replicated"
            leader.note_replicated(last)
        else:
            reason = outcome.reason or "not confirmed"
            await leader.record_degraded(pending.min_lsn, last, reason)
            if leader.config.on_ack_timeout == "fail":
                raise AckTimeout(
                    f"committed locally at lsn {last} (term {answers[-1].term}) but not "
                    f"confirmed by replicas: {reason}",
                    lsn=last,
                    first_lsn=pending.min_lsn,
                    term=answers[-1].term,
                    ack_mode=str(mode),
                    required=outcome.required,
                    acked_by=outcome.acked_by,
                    committed_locally=True,
                )
            durability = "degraded"
        for r in answers:
            r.durability = durability
            r.required = outcome.required
            r.acked_by = outcome.acked_by
        return receipts

    def health(self) -> dict[str, Any]:
        """Role, position and readiness: ``status`` is unhealthy when the WAL cannot be
        written, not_ready when ``not_ready`` lists why this node cannot do its job."""
        store = self.store
        wal = store.wal.status()
        checkpoint_failure = store.checkpoint_failure
        reasons = readiness(self)
        if wal.failed is not None or self._closed:
            status = HealthStatus.UNHEALTHY
        else:
            status = HealthStatus.NOT_READY if reasons else HealthStatus.HEALTHY
        leader = self.leader
        return {
            "status": status,
            "ready": not reasons,
            "not_ready": reasons,
            "role": self.role,
            "node_id": self.node_id,
            "term": store.log.current_term.value,
            "term_seen": self.term_seen(),
            "url": self.replication.http_url,
            "last_term": wal.last_term,
            "last_lsn": wal.last_lsn,
            "fenced": None if leader is None else leader.fenced,
            "replication_address": self.replication_address(),
            "visible_lsn": store.visible_lsn,
            "leader_durable_lsn": store.visible_bound.lsn,
            "synced_lsn": wal.synced_lsn,
            "wal_failed": wal.failed,
            "checkpoint_lsn": store.manifest.last_lsn,
            "checkpoint_failing": None
            if checkpoint_failure is None
            else checkpoint_failure.to_dict(),
            "uptime_s": round(time.monotonic() - self._started_monotonic, 3),
            "version": __version__,
            "replication": self.replication_status(),
            "election": None if self.coordinator is None else self.coordinator.status(),
            "in_sync_set": self._in_sync_builtins(),
            "leadership": self.leadership.status(),
        }

    def _in_sync_builtins(self) -> dict[str, Any] | None:
        record = self.in_sync_file.record
        return None if record is None else msgspec.to_builtins(record)

    def witness(self) -> Witness:
        """This node as failover sees it: its end of log and newest in-sync record."""
        pos = self.position()
        return Witness(self.node_id, (pos.term.value, pos.lsn.value), self.in_sync_file.record)

    def term_seen(self) -> int:
        """The newest term this node has heard of: its own, or one a peer told it of."""
        leader, follower = self.leader, self.follower
        return max(
            self.store.log.current_term.value,
            self.role_state.record.term_seen,
            0 if leader is None else leader.fenced_term,
            0 if follower is None else follower.known_term,
        )

    def replication_address(self) -> str | None:
        """Where followers reach this node's replication listener (a leader) or will once it
        is promoted (a follower with a fixed or advertised port): the advertised address,
        never a wildcard; None when unknown or off."""
        config = self.replication
        if self.leader is not None:
            return None if self.leader.port is None else config.published_address(self.leader.port)
        server = self.snapshot_server
        if server is not None and server.port is not None:
            return server.address
        return config.published_address(config.port) if config.secret else None

    def position(self) -> Position:
        """The term and lsn of this node's last record."""
        return self.store.log.last_position

    # ------------------------------------------------------------------ role switches

    async def promote(
        self,
        *,
        force: bool = False,
        unclean: bool = False,
        peers: Sequence[str] | None = None,
        term: int | None = None,
    ) -> dict[str, Any]:
        """Make this follower the leader of a new term (see the module docstring).

        Conflict (409) without ``force`` when it is still connected to its leader, when one
        of ``peers`` (default: the configured ones) is a live leader or is further ahead;
        without ``force`` or ``unclean`` when it cannot prove it holds every write answered
        ``replicated`` (``insync.unclean_reason``: a member of the last in-sync set does not
        answer, or it lacks that set's lsn). Conflict on a fenced leader (repoint it
        instead). A leader that is not fenced answers that it already leads. ``term`` (from
        an election, which checks the in-sync set itself) is the term to start; Conflict
        when this node has already seen that term or a later one. The answer's ``unclean``
        says what a forced or unclean promotion may have lost.
        """
        async with self._switch:
            if self.role is Role.LEADER:
                assert self.leader is not None
                if self.leader.fenced is not None:
                    raise Conflict(
                        f"{self.node_id} is a fenced leader ({self.leader.fenced}); repoint "
                        "it to the new leader instead"
                    )
                return {**self._role_answer(), "changed": False}
            follower = self.follower
            assert follower is not None
            urls = list(self.config.peers if peers is None else peers)
            found = await fetch_views(urls, verify=self.config.peer_verify)
            views = [v for v in found if v.answered and v.node_id != self.node_id]
            if not force:
                self._check_promotable(follower, views)
            reason = None if term is not None else self._unclean_reason(views)
            if reason is not None and not (force or unclean):
                raise Conflict(
                    f"{self.node_id} cannot prove it holds every write answered replicated: "
                    f"{reason}. Bring those nodes back (or name them in peers), or promote "
                    "with unclean=true (CLI: --unclean), losing what only they hold",
                    unclean=reason,
                )
            warning = None if reason is None else may_lose(self.witness(), reason)
            await follower.stop("promoted to leader")  # nothing is applied after this
            wal = self.store.wal
            above = 1 + max(
                wal.terms.current.value,
                follower.known_term,
                self.role_state.record.term_seen,
                *(v.term for v in views),
            )
            if term is not None and term < above:
                await follower.start()
                raise Conflict(f"term {term} is not above every term this node has seen")
            term = above if term is None else term
            invariant(term <= TERM_MAX, f"term {term} is out of range")
            marker = msgspec.json.encode(
                {
                    "term": term,
                    "node_id": self.node_id,
                    "previous_leader": follower.leader_address,
                    "forced": force,
                    "unclean": warning,
                }
            )
            try:
                await asyncio.to_thread(wal.begin_term, Term(term))  # persisted
                first_lsn = await asyncio.to_thread(self.store.append_system, TERM_STARTED, marker)
            except BaseException:
                # not leading (a full disk, a failed WAL): still a follower, connecting again.
                # The term stays used (begun in the WAL): a retry takes a higher one, and a
                # leader of a lower term is refused from now on
                self.role_state.saw_term(term)
                await follower.start()
                raise
            self.role_state.switched(Role.LEADER, None, term)
            # it leads its whole log now, records past the last leader-durable lsn it was
            # told included: they are this term's history (README: shipping before fsync)
            follower.durable_view.lifted()
            try:
                await asyncio.to_thread(follower.durable_view.save)
            except OSError as exc:  # a later start as follower shows less at first: safe
                log.warning("could not save that this node shows its whole log: %s", exc)
            await self._stop_snapshot_server()  # the leader listens on that port now
            leader = self._new_leader()
            leader.term_begun_here = True  # it may ship before its fsync (early_ship.py)
            leader.acks.led(term)
            self.follower = None
            self.leader = leader
            self.replication_metrics.term.set(term)
            if self._started:
                try:
                    await leader.start()
                except OSError as exc:
                    leader.fence(f"the replication listener could not start: {exc}")
            self.leadership.confirmed(f"promoted to term {term}, above every term it had seen")
            self.role = Role.LEADER  # writes are accepted from here on
            log.warning(
                "promoted to leader of term %d at lsn %d (previous leader %s%s)",
                term,
                first_lsn,
                follower.leader_address,
                ", forced" if force else "",
            )
            if warning is not None:
                log.error("%s", warning)
            if leader.fenced is not None:
                raise Unavailable(f"promoted to term {term}, but {leader.fenced}")
            return {
                **self._role_answer(),
                "changed": True,
                "first_lsn": first_lsn,
                "unclean": warning,
            }

    def _unclean_reason(self, views: list[PeerView]) -> str | None:
        """Why this follower may lack a write answered ``replicated`` (None: it cannot)."""
        return unclean_reason(self.witness(), [v.witness() for v in views])

    def _check_promotable(self, follower: Follower, views: list[PeerView]) -> None:
        if follower.connected:
            raise Conflict(
                f"{self.node_id} is still connected to its leader at "
                f"{follower.leader_address}: promoting it would make two leaders (stop the "
                "leader first, or force)",
                leader=follower.leader_address,
            )
        for view in views:
            if view.role == Role.LEADER and view.fenced is None:
                raise Conflict(
                    f"{view.node_id} at {view.url} is a live leader (term {view.term}): "
                    "promoting would make two leaders (stop it first, or force)",
                    leader=view.url,
                )
        mine = self.position()
        ahead = [v for v in views if v.position > (mine.term.value, mine.lsn.value)]
        if ahead:
            best = max(ahead, key=lambda v: v.position)
            raise Conflict(
                f"{self.node_id} is at {mine.term.value}/{mine.lsn.value}, behind "
                f"{best.node_id} ({best.url}) at {best.position[0]}/{best.position[1]}: promote "
                "the most caught-up node, or force (what it lacks would be cut from the others "
                "into lost-and-found)",
                position=[mine.term.value, mine.lsn.value],
                ahead=[{"url": v.url, "node_id": v.node_id, "position": v.position} for v in ahead],
            )

    async def repoint(self, leader_address: str) -> dict[str, Any]:
        """Follow the leader at ``leader_address`` (replication ``HOST:PORT``).

        A follower switches streams; a leader (deposed) stops taking writes, answers its
        pending waits and becomes a follower, its unreplicated tail then cut by divergence
        repair. InvalidInput for a bad address or a node without the replication secret.
        """
        parse_address(leader_address, "leader")
        if not self.replication.secret:
            raise InvalidInput("this node has no replication secret: it cannot follow")
        async with self._switch:
            if self.role is Role.LEADER:
                leader = self.leader
                assert leader is not None
                self.role = Role.FOLLOWER  # writes are refused from here on
                if self._started:
                    await leader.stop()
                leader.tracker.fail_all(f"{self.node_id} was repointed to {leader_address}")
                known = max(leader.term, leader.fenced_term)
                self.leader = None
                self.store.set_retention_floor(lambda: None)
                self.replication_metrics.forget_followers()
                was = "leader"
            else:
                follower = self.follower
                assert follower is not None
                await follower.stop(f"repointed to {leader_address}")
                known = follower.known_term
                was = f"follower of {follower.leader_address}"
            self.role_state.switched(Role.FOLLOWER, leader_address, known)
            self.leadership.idle()
            self.follower = self._new_follower(leader_address, known)
            if self._started:
                await self._start_snapshot_server()
                await self.follower.start()
            log.warning("repointed: %s, now following %s", was, leader_address)
            return {**self._role_answer(), "changed": True, "was": was}

    def _role_answer(self) -> dict[str, Any]:
        pos = self.position()
        return {
            "node_id": self.node_id,
            "role": self.role,
            "term": self.store.log.current_term.value,
            "last_term": pos.term.value,
            "last_lsn": pos.lsn.value,
            "replication_address": self.replication_address(),
            "leader": None if self.follower is None else self.follower.leader_address,
        }

    def replication_status(self) -> dict[str, Any]:
        if self.leader is not None:
            return self.leader.status()
        assert self.follower is not None
        status = self.follower.status()
        if self.snapshot_server is not None:
            status["serving_snapshots"] = self.snapshot_server.status()
        return status

    def forget_follower(self, node_id: str) -> dict[str, Any]:
        """Drop a departed follower's retention slot (see ``Leader.forget_follower``);
        Conflict (409) on a node that does not lead."""
        if self.leader is None:
            raise Conflict(
                f"{self.node_id} is not the leader: forget followers on the leader",
                leader=None if self.follower is None else self.follower.leader_address,
            )
        answer = self.leader.forget_follower(node_id)
        self.known_peers.forget(node_id)  # not asked before writes after a restart either
        return {"node_id": self.node_id, **answer}

    def checkpoint(self) -> dict[str, Any]:
        """Write every event visible now to a Parquet part (blocking: call it off the loop).

        The answer says what the history in Parquet covers afterwards; ``part`` is None when
        there was nothing new to write.
        """
        part = self.store.checkpoint()
        manifest = self.store.manifest
        return {
            "node_id": self.node_id,
            "part": None if part is None else part.file,
            "events_written": 0 if part is None else part.events,
            "checkpoint_lsn": manifest.last_lsn,
            "checkpoint_term": manifest.last_term,
            "events": manifest.events,
        }

    def degraded_ranges(self, *, at_risk_only: bool = False) -> list[dict[str, object]]:
        """The degradation ledger's ranges (a leader's), each with its state; only those
        still at risk with ``at_risk_only``. Empty on a follower."""
        if self.leader is None:
            return []
        return self.leader.ledger.to_list(at_risk_only=at_risk_only)

    def close(self) -> None:
        """Close the store (flushing the WAL). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.store.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "CLOSED" if self._closed else "OPEN"
        return f"<Node {self.node_id} {self.role.upper()} {state} {self.config.data_dir}>"
