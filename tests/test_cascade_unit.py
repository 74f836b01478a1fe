"""A serving follower's snapshot server against ``fetch_snapshot``, in-process over real TCP.

The serving side refuses while its node is not ready (not streaming, lagging) and without a
checkpoint reaching the lsn asked for (it checkpoints first when it holds that lsn); peers
authenticate with the shared secret both ways. ``test_cascade.py`` plays the whole flow with
real processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from walship.errors import AuthenticationError
from walship.replication.cascade import (
    SnapshotServer,
    SourceUnusable,
    StagedSnapshot,
    fetch_snapshot,
)
from walship.replication.config import ReplicationConfig
from walship.replication.metrics import ReplicationMetrics
from walship.replication.stream import PeerRefused
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

from .conftest import make_event

SECRET = b"cascade-secret"


def open_store(path: Path, node_id: str) -> Store:
    return Store.open(
        StoreConfig(path, node_id=node_id, fsync=FsyncPolicy.parse("never"), checkpoints=False)
    )


async def fetch_from(
    server: SnapshotServer, joiner: Store, min_lsn: int, secret: bytes = SECRET
) -> StagedSnapshot:
    assert server.address is not None
    return await fetch_snapshot(
        server.address,
        store=joiner,
        config=ReplicationConfig(secret=secret),
        node_id="f2",
        known_term=1,
        min_lsn=min_lsn,
        on_staging=lambda _: None,
    )


Body = Callable[[Store, Store, SnapshotServer, list[str | None]], Awaitable[None]]


def scenario(tmp_path: Path, body: Body) -> None:
    async def run() -> None:
        source = open_store(tmp_path / "f1", "f1")
        joiner = open_store(tmp_path / "f2", "f2")
        await asyncio.to_thread(
            source.append_batch, [make_event(f"acct-{i % 5}", payload={"i": i}) for i in range(300)]
        )
        readiness: list[str | None] = [None]
        server = SnapshotServer(
            source,
            ReplicationConfig(secret=SECRET, port=0),
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
