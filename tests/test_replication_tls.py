"""Replication over TLS with client-certificate verification (real TCP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

import pytest

from walship.replication.config import (
    ReplicationConfig,
    client_ssl_context,
    server_ssl_context,
)
from walship.replication.follower import Follower
from walship.replication.leader import Leader
from walship.replication.metrics import ReplicationMetrics

from .pki import HAVE_OPENSSL, make_pki
from .test_replication_unit import (
    LIMITS,
    SECRET,
    eventually,
    open_store,
    raw_records,
    run,
    write,
)

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL, reason="needs openssl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a leader certificate for 127.0.0.1 and a follower client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _follower(store_path: Path, port: int, client_ssl: object, node_id: str) -> Follower:
    store = open_store(store_path, node_id)
    config = ReplicationConfig(
        secret=SECRET,
        leader=f"127.0.0.1:{port}",
        client_ssl=client_ssl,  # type: ignore[arg-type]
        reconnect_backoff_min_ms=10,
        reconnect_backoff_max_ms=100,
    )
    return Follower(store, config, ReplicationMetrics(store.metrics.registry), node_id)


def test_follower_with_a_client_certificate_replicates_over_tls(tmp_path: Path, pki: Path) -> None:
    async def scenario() -> None:
        leader_store = open_store(tmp_path / "leader", "leader")
        server = server_ssl_context(
            pki / "leader.pem", pki / "leader.key", pki / "ca.pem", require_client_cert=True
        )
        leader = Leader(
            leader_store,
            ReplicationConfig(secret=SECRET, port=0, server_ssl=server),
            ReplicationMetrics(leader_store.metrics.registry),
        )
        await leader.start()
        assert leader.port is not None
        good = _follower(
            tmp_path / "good",
            leader.port,
            client_ssl_context(pki / "ca.pem", pki / "follower.pem", pki / "follower.key"),
            "good",
        )
        no_cert = _follower(
            tmp_path / "nocert", leader.port, client_ssl_context(pki / "ca.pem"), "nocert"
        )
        plain = _follower(tmp_path / "plain", leader.port, None, "plain")
        try:
            last = await write(leader_store, 50)
            for f in (good, no_cert, plain):
                await f.start()
            await eventually(lambda: good.store.visible_lsn >= last)
            assert raw_records(good.store) == raw_records(leader_store)
            await eventually(lambda: no_cert.status()["reconnects"] >= 1)
            await eventually(lambda: plain.status()["reconnects"] >= 1)
            await asyncio.sleep(0.2)
            assert no_cert.store.visible_lsn == 0
            assert plain.store.visible_lsn == 0
            assert set(s.node_id for s in leader.sessions.values()) == {"good"}
        finally:
            for f in (good, no_cert, plain):
                await f.stop()
                f.store.close()
            await leader.stop()
            leader_store.close()

    run(scenario)


def test_a_peer_that_never_finishes_the_tls_handshake_is_dropped_at_the_deadline(
    tmp_path: Path, pki: Path
) -> None:
    """TLS is negotiated before the replication handshake sees the connection; a peer that
    opens TCP and then says nothing is still dropped at ``handshake_timeout_ms`` (asyncio's
    own default is 60 s), and a real follower then replicates over TLS."""
    limits = dataclasses.replace(LIMITS, handshake_timeout_ms=1_000, read_timeout_ms=20_000)

    async def scenario() -> None:
        leader_store = open_store(tmp_path / "leader", "leader", limits)
        server = server_ssl_context(
            pki / "leader.pem", pki / "leader.key", pki / "ca.pem", require_client_cert=True
        )
        leader = Leader(
            leader_store,
            ReplicationConfig(secret=SECRET, port=0, server_ssl=server),
            ReplicationMetrics(leader_store.metrics.registry),
        )
        await leader.start()
        assert leader.port is not None
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", leader.port)
        good = _follower(
            tmp_path / "good",
            leader.port,
            client_ssl_context(pki / "ca.pem", pki / "follower.pem", pki / "follower.key"),
            "good",
        )
        try:
            t0 = loop.time()
            async with asyncio.timeout(8):
                with contextlib.suppress(ConnectionResetError):
                    while await reader.read(65536):
                        pass
            assert 0.9 <= loop.time() - t0 < 8
            await good.start()
            last = await write(leader_store, 50)
            await eventually(lambda: good.store.visible_lsn >= last)
        finally:
            writer.close()
            await good.stop()
            good.store.close()
            await leader.stop()
            leader_store.close()

    run(scenario)
