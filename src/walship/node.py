"""A walship node: one store plus what it serves, its role and its health.

The node is what the HTTP API and the CLI talk to. It owns the Store (opened from a
``NodeConfig``), knows its role and answers ``health()``. Replication will add the leader's
follower sessions and the follower's stream here; the store never imports this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from walship import __version__
from walship.errors import ReadOnly
from walship.limits import DEFAULT_LIMITS, Limits
from walship.store import Store, StoreConfig
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

    def check_writable(self) -> None:
        """Raise ReadOnly (409) unless this node accepts writes."""
        if self.role is not Role.LEADER:
            raise ReadOnly(
                f"node {self.node_id} is a {self.role}; write to the leader", leader=None
            )

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
        }

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
