"""Replication settings shared by the leader and the follower ends."""

from __future__ import annotations

import dataclasses
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from walship.advertise import bracket, is_wildcard
from walship.errors import InvalidInput
from walship.replication.acks import AckMode


@dataclass(frozen=True)
class ReplicationConfig:
    """How a node replicates: who it talks to, how it proves itself, what writes wait for."""

    secret: bytes | None = None
    cluster_id: str = "walship"
    host: str = "127.0.0.1"
    port: int = 3910
    ack_mode: AckMode = field(default_factory=lambda: AckMode("async"))
    ack_timeout_ms: int = 5_000
    on_ack_timeout: str = "degrade"
    max_lag_ms: int = 5_000
    min_in_sync: int = 1
    wal_retention_bytes_max: int = 1 << 30
    # the recovery-point budget (``lagbudget.py``): writes slow down to keep in-sync
    # followers within it; 0 turns it off. A node's own setting, not sent to followers
    max_replication_lag_ms: int = 0
    leader: str | None = None  # HOST:PORT of the leader's replication listener (followers)
    http_url: str | None = None  # this node's advertised HTTP URL (told to followers, peers)
    # what this node publishes as its replication address (``advertise.py``): the bind host
    # and the listening port unless given
    advertise_host: str | None = None
    advertise_port: int | None = None
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None
    reconnect_backoff_min_ms: int = 50
    reconnect_backoff_max_ms: int = 5_000
    # cascading (``cascade.py``): a follower serves snapshots on its replication port; a
    # follower that needs one asks this serving follower (``HOST:PORT``) first
    serve_snapshots: bool = False
    catch_up_from: str | None = None
    # ship Parquet parts to followers / install the leader's (replication/physical.py)
    physical_followers: bool = False
    # ship records to followers told the leader's durable lsn before its own fsync
    # (replication/early_ship.py)
    ship_before_fsync: bool = True

    def __post_init__(self) -> None:
        if self.on_ack_timeout not in ("degrade", "fail"):
            raise InvalidInput("on-ack-timeout must be degrade or fail", field="on_ack_timeout")
        if self.ack_timeout_ms <= 0 or self.max_lag_ms <= 0 or self.min_in_sync < 0:
            raise InvalidInput("replication timeouts must be positive and min-in-sync >= 0")
        if self.max_replication_lag_ms < 0:
            raise InvalidInput("max-replication-lag-ms must be 0 (off) or positive")

    def published_address(self, listening_port: int | None) -> str | None:
        """``HOST:PORT`` other nodes reach this node's replication listener at; None when it
        does not listen, or listens on a wildcard with nothing to advertise instead."""
        port = self.advertise_port or listening_port
        host = self.advertise_host or self.host
        if not port or is_wildcard(host):
            return None
        return f"{bracket(host)}:{port}"

    def leader_address(self) -> tuple[str, int]:
        """``(host, port)`` of the leader; InvalidInput when unset or malformed."""
        return parse_address(self.leader or "", "leader")


class AckSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The cluster's write guarantee: what a leader's writes wait for and what happens when
    they cannot. A leader tells its followers (in its Welcome) so that a promoted follower
    leads with the same settings, not with its own flags' defaults."""

    ack_mode: str = "async"
    ack_timeout_ms: int = 5_000
    on_ack_timeout: str = "degrade"
    min_in_sync: int = 1
    max_lag_ms: int = 5_000

    @classmethod
    def of(cls, config: ReplicationConfig) -> AckSettings:
        return cls(
            str(config.ack_mode),
            config.ack_timeout_ms,
            config.on_ack_timeout,
            config.min_in_sync,
            config.max_lag_ms,
        )

    def apply(self, config: ReplicationConfig) -> ReplicationConfig:
        """``config`` with these settings; InvalidInput when one is out of range."""
        return dataclasses.replace(
            config,
            ack_mode=AckMode.parse(self.ack_mode),
            ack_timeout_ms=self.ack_timeout_ms,
            on_ack_timeout=self.on_ack_timeout,
            min_in_sync=self.min_in_sync,
            max_lag_ms=self.max_lag_ms,
        )

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def decode(cls, text: str) -> AckSettings:
        """InvalidInput unless ``text`` is settings ``encode`` wrote (and they are valid)."""
        try:
            found = msgspec.json.decode(text, type=cls)
        except msgspec.DecodeError as exc:
            raise InvalidInput(f"unreadable ack settings: {exc}") from exc
        found.apply(ReplicationConfig())  # checks every value
        return found

    def __str__(self) -> str:
        return (
            f"{self.ack_mode} (timeout {self.ack_timeout_ms} ms: {self.on_ack_timeout}, "
            f"min-in-sync {self.min_in_sync}, max-lag {self.max_lag_ms} ms)"
        )


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"{what} must be HOST:PORT, not {text!r}", field=what)
    return host.strip("[]"), int(port)


def server_ssl_context(
    cert: Path, key: Path, client_ca: Path | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """TLS for the leader's listener; with ``client_ca`` and ``require_client_cert`` it
    verifies follower certificates."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """TLS for a follower's connection: verifies the leader against ``ca`` (system CAs when
    None) and presents ``cert``/``key`` when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx
