"""A walship node: one store plus what it serves, its role and its health.

The node is what the HTTP API and the CLI talk to. It owns the Store (opened from a
``NodeConfig``), knows its role, runs the replication end that goes with it (a ``Leader``
listener or a ``Follower`` stream, started on the event loop by ``start``), turns a write's
local durability into a durability receipt, and answers ``health()``. The store never imports
this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from walship import __version__
from walship.errors import AckTimeout, InvalidInput, ReadOnly, WaitTimeout
from walship.limits import DEFAULT_LIMITS, Limits
from walship.replication.acks import AckMode
from walship.replication.config import ReplicationConfig
from walship.replication.follower import Follower
from walship.replication.leader import Leader
from walship.replication.metrics import ReplicationMetrics
from walship.store import PendingAppend, Receipt, Store, StoreConfig
from walship.wal import FsyncPolicy


class Role(StrEnum):
    """What a node does with writes: a leader accepts them, a follower refuses them."""

    LEADER = "leader"
    FOLLOWER = "follower"


class HealthStatus(StrEnum):
    HEALTHY = "healthy"
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

    def store_config(self) -> StoreConfig:
        return StoreConfig(
            data_dir=self.data_dir,
            node_id=self.node_id,
            fsync=self.fsync,
            limits=self.limits,
            checkpoints=self.checkpoints,
        )


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
        self.leader: Leader | None = None
        self.follower: Follower | None = None
        if self.role is Role.LEADER:
            self.leader = Leader(store, config.replication, self.replication_metrics)
        else:
            self.follower = Follower(
                store, config.replication, self.replication_metrics, config.node_id
            )
        self._visible = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False

    @classmethod
    def open(cls, config: NodeConfig) -> Node:
        """Open (and recover) the node's store. Raises CorruptionError on damaged data."""
        return cls(config, Store.open(config.store_config()))

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def limits(self) -> Limits:
        return self.config.limits

    # ------------------------------------------------------------------ lifecycle on the loop

    async def start(self) -> None:
        """Start replication on the running event loop (idempotent)."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._visible = asyncio.Event()
        self.store.wal.add_listener(self._on_commit)
        if self.leader is not None:
            await self.leader.start()
        if self.follower is not None:
            await self.follower.start()

    async def stop(self) -> None:
        """Stop replication (before ``close``)."""
        if not self._started:
            return
        self._started = False
        self.store.wal.remove_listener(self._on_commit)
        if self.leader is not None:
            await self.leader.stop()
        if self.follower is not None:
            await self.follower.stop()

    def _on_commit(self, lsn: int) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._pulse)

    def _pulse(self) -> None:
        self._visible.set()
        self._visible = asyncio.Event()

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

    def check_writable(self) -> None:
        """Raise ReadOnly (409, naming the leader) unless this node accepts writes."""
        if self.role is not Role.LEADER:
            raise ReadOnly(
                f"node {self.node_id} is a {self.role}; write to the leader",
                leader=self.config.replication.leader,
            )

    def ack_mode_for(self, requested: str | None) -> AckMode:
        """The server's ack mode, or a stricter one a write asked for (never a weaker one)."""
        mode = self.config.replication.ack_mode
        if not requested:
            return mode
        asked = AckMode.parse(requested)
        in_sync = len(self.leader.tracker.in_sync) if self.leader is not None else 0
        return mode.stricter(asked, in_sync)

    async def confirm(self, pending: PendingAppend, requested: str | None) -> list[Receipt]:
        """Wait for the write's acknowledgement mode and fill in the durability receipts.

        ``replicated`` when the mode was met; on timeout ``degraded`` (recorded in the
        ledger) or, with ``on_ack_timeout=fail``, AckTimeout (503) saying the write is
        committed locally at its lsn but not confirmed by replicas.
        """
        receipts = pending.receipts
        mode = self.ack_mode_for(requested)
        if self.leader is None or not mode.waits or not receipts:
            return receipts
        last = pending.max_lsn
        outcome = await self.leader.confirm(last, mode)
        if outcome.satisfied:
            durability = "replicated"
        else:
            reason = outcome.reason or "not confirmed"
            self.leader.record_degraded(pending.min_lsn, last, reason)
            if self.config.replication.on_ack_timeout == "fail":
                raise AckTimeout(
                    f"committed locally at lsn {last} (term {receipts[-1].term}) but not "
                    f"confirmed by replicas: {reason}",
                    lsn=last,
                    first_lsn=pending.min_lsn,
                    term=receipts[-1].term,
                    ack_mode=str(mode),
                    required=outcome.required,
                    acked_by=outcome.acked_by,
                    committed_locally=True,
                )
            durability = "degraded"
        for r in receipts:
            r.durability = durability
            r.required = outcome.required
            r.acked_by = outcome.acked_by
        return receipts

    def health(self) -> dict[str, Any]:
        """Liveness and position; ``status`` is unhealthy when the WAL cannot be written."""
        store = self.store
        wal = store.wal.status()
        healthy = wal.failed is None and not self._closed
        return {
            "status": HealthStatus.HEALTHY if healthy else HealthStatus.UNHEALTHY,
            "role": self.role,
            "node_id": self.node_id,
            "term": store.wal.terms.current.value,
            "last_lsn": wal.last_lsn,
            "visible_lsn": wal.written_lsn,
            "synced_lsn": wal.synced_lsn,
            "wal_failed": wal.failed,
            "checkpoint_lsn": store.manifest.last_lsn,
            "uptime_s": round(time.monotonic() - self._started_monotonic, 3),
            "version": __version__,
            "replication": self.replication_status(),
        }

    def replication_status(self) -> dict[str, Any]:
        if self.leader is not None:
            return self.leader.status()
        assert self.follower is not None
        return self.follower.status()

    def degraded_ranges(self) -> list[dict[str, object]]:
        """The degradation ledger (a leader's); empty on a follower."""
        return self.leader.ledger.to_list() if self.leader is not None else []

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
