"""A serving follower's snapshot server against ``fetch_snapshot``, in-process over real TCP.

The serving side refuses while its node is not ready (not streaming, lagging) and without a
checkpoint reaching the lsn asked for (it checkpoints first when it holds that lsn); peers
authenticate with the shared secret both ways. ``test_cascade.py`` plays the whole flow with
real processes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from walship.errors import AuthenticationError, WalshipError
from walship.replication.cascade import (
    CascadeClient,
    SnapshotRedirected,
    SnapshotServer,
    SourceUnusable,
    StagedSnapshot,
    fetch_snapshot,
)
from walship.replication.config import (
    ReplicationConfig,
    client_ssl_context,
    server_ssl_context,
)
from walship.replication.metrics import ReplicationMetrics
from walship.replication.protocol import REDIRECT_ANY, REDIRECT_NO
from walship.replication.stream import PeerRefused
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

from .conftest import make_event
from .pki import HAVE_OPENSSL, make_pki

SECRET = b"cascade-secret"


def open_store(path: Path, node_id: str) -> Store:
    return Store.open(
        StoreConfig(path, node_id=node_id, fsync=FsyncPolicy.parse("never"), checkpoints=False)
    )


async def fetch_from(
    server: SnapshotServer,
    joiner: Store,
    min_lsn: int,
    secret: bytes = SECRET,
    client_ssl: ssl.SSLContext | None = None,
) -> StagedSnapshot:
    assert server.address is not None
    return await fetch_snapshot(
        server.address,
        store=joiner,
        config=ReplicationConfig(secret=secret, client_ssl=client_ssl),
        node_id="f2",
        known_term=1,
        min_lsn=min_lsn,
        on_staging=lambda _: None,
    )


Body = Callable[[Store, Store, SnapshotServer, list[str | None]], Awaitable[None]]


def scenario(tmp_path: Path, body: Body, server_config: ReplicationConfig | None = None) -> None:
    async def run() -> None:
        source = open_store(tmp_path / "f1", "f1")
        joiner = open_store(tmp_path / "f2", "f2")
        await asyncio.to_thread(
            source.append_batch, [make_event(f"acct-{i % 5}", payload={"i": i}) for i in range(300)]
        )
        readiness: list[str | None] = [None]
        server = SnapshotServer(
            source,
            server_config or ReplicationConfig(secret=SECRET, port=0),
            ReplicationMetrics(source.metrics.registry),
            lambda: readiness[0],
        )
        await server.start()
        try:
            await body(source, joiner, server, readiness)
        finally:
            await server.stop()
            joiner.close()
            source.close()

    asyncio.run(asyncio.wait_for(run(), 25))


def test_a_snapshot_server_checkpoints_up_to_the_lsn_asked_then_serves_it(
    tmp_path: Path,
) -> None:
    async def body(
        source: Store, joiner: Store, server: SnapshotServer, _: list[str | None]
    ) -> None:
        assert source.manifest.last_lsn == 0  # nothing checkpointed yet
        staged = await fetch_from(server, joiner, min_lsn=250)
        assert source.manifest.last_lsn == 300  # it checkpointed what it held
        assert staged.manifest == source.manifest
        assert staged.source == server.address
        assert staged.terms == source.wal.terms.to_list()
        assert server.served == 1

    scenario(tmp_path, body)


def test_a_snapshot_server_that_is_not_ready_refuses(tmp_path: Path) -> None:
    async def body(
        source: Store, joiner: Store, server: SnapshotServer, readiness: list[str | None]
    ) -> None:
        readiness[0] = "it lags its leader"
        with pytest.raises(SourceUnusable, match="it lags its leader"):
            await fetch_from(server, joiner, min_lsn=1)
        readiness[0] = None
        with pytest.raises(SourceUnusable, match="its checkpoint reaches lsn 0, not 301"):
            await fetch_from(server, joiner, min_lsn=301)
        assert server.served == 0 and server.refused == 2

    scenario(tmp_path, body)


def test_a_snapshot_server_and_its_peer_prove_the_secret(tmp_path: Path) -> None:
    async def body(
        source: Store, joiner: Store, server: SnapshotServer, _: list[str | None]
    ) -> None:
        with pytest.raises(PeerRefused) as refused:
            await fetch_from(server, joiner, min_lsn=1, secret=b"another-secret")
        assert refused.value.details["refused"] == AuthenticationError.code
        assert server.served == 0

    scenario(tmp_path, body)


def free_address() -> str:
    """An address nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_a_joining_follower_tries_its_sources_in_order_then_falls_back(tmp_path: Path) -> None:
    """``--catch-up-from`` first, then the leader's sources: a source that is down is skipped
    for the next; when none serves, the client gives up and its next Subscribe takes no
    redirect (the leader sends its own snapshot)."""

    async def body(
        source: Store, joiner: Store, server: SnapshotServer, _: list[str | None]
    ) -> None:
        assert server.address is not None
        down = free_address()
        config = ReplicationConfig(secret=SECRET, catch_up_from=down)
        metrics = ReplicationMetrics(joiner.metrics.registry)
        client = CascadeClient(joiner, config, metrics, "f2")
        assert client.subscription("").redirect == REDIRECT_ANY

        redirect = SnapshotRedirected("redirected", sources=[server.address], min_lsn=100)
        assert await client.fetch(redirect, known_term=1) is None
        assert client.staged is not None and client.staged.source == server.address
        assert client.fallbacks == 0
        staged = client.subscription("")
        assert staged.staged and staged.lsn == source.manifest.last_lsn == 300
        client.drop_staged("the test is done with it")

        why = await client.fetch(
            SnapshotRedirected("redirected", sources=[down], min_lsn=100), known_term=1
        )
        assert why is not None and down in why
        assert client.failed and client.fallbacks == 1
        after = client.subscription("")
        assert after.redirect == REDIRECT_NO and not after.staged

    scenario(tmp_path, body)


@pytest.mark.skipif(not HAVE_OPENSSL, reason="needs openssl")
def test_a_snapshot_server_takes_tls_peers_as_the_leader_does(tmp_path: Path) -> None:
    """With ``--tls-require-client-cert`` the serving follower refuses a peer without a client
    certificate before the handshake, and serves one that has it."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    server_ssl = server_ssl_context(
        pki / "leader.pem", pki / "leader.key", pki / "ca.pem", require_client_cert=True
    )

    async def body(
        source: Store, joiner: Store, server: SnapshotServer, _: list[str | None]
    ) -> None:
        with pytest.raises((OSError, WalshipError)):
            await fetch_from(server, joiner, 1, client_ssl=client_ssl_context(pki / "ca.pem"))
        with pytest.raises((OSError, WalshipError)):
            await fetch_from(server, joiner, 1)  # no TLS at all
        assert server.served == 0
        good = client_ssl_context(pki / "ca.pem", pki / "follower.pem", pki / "follower.key")
        staged = await fetch_from(server, joiner, 1, client_ssl=good)
        assert staged.manifest == source.manifest and server.served == 1

    scenario(tmp_path, body, ReplicationConfig(secret=SECRET, port=0, server_ssl=server_ssl))
