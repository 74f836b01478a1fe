"""The write path of a node (``check_writable`` → ``Store.submit`` → WAL → ``confirm``) against
a real store and a real leader end, in-process: what a write in a waiting ack mode is answered
when the node's role changes under it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import pytest

from walship.errors import AckTimeout, UnmeetableAckMode
from walship.events import EventIn
from walship.node import Node, NodeConfig, Role
from walship.replication.acks import AckMode, DegradationLedger
from walship.replication.config import ReplicationConfig
from walship.store import PendingAppend
from walship.wal import FsyncPolicy
from walship.wal.log import WriteOutcome
from walship.write_path import append_events, wait_written

SECRET = b"walship-test-secret"


def leader_node(path: Path, **replication: Any) -> Node:
    """A leader with no follower connected, in a cluster of two (``--peers``)."""
    config = NodeConfig(
        path,
        fsync=FsyncPolicy.parse("always"),
        checkpoints=False,
        peers=("http://127.0.0.2:3900",),
        replication=ReplicationConfig(secret=SECRET, port=0, **replication),
    )
    node = Node.open(config)
    # the peer is only named (for the ack-mode checks), never started: nobody else leads, so
    # the leader need not ask it before its first write (``leadership.py``)
    node.leadership.confirmed("a test leader: its one peer never runs")
    return node


def an_event(entity: str = "order-1") -> EventIn:
    return EventIn(entity_id=entity, event_type="order.placed", payload=msgspec.Raw(b"{}"))


async def demoted_while_written(
    node: Node, monkeypatch: pytest.MonkeyPatch, ack_mode: str | None
) -> asyncio.Task[Any]:
    """Start a write, and demote the node (repoint it) after the write was queued in the WAL
    but before its answer was worked out; the write's task, let go after the demotion."""
    real_submit = node.store.submit
    queued = asyncio.Event()
    loop = asyncio.get_running_loop()
    held: list[tuple[Future[WriteOutcome], Future[WriteOutcome]]] = []

    def submit_and_hold(events: Any, **options: Any) -> PendingAppend:
        pending = real_submit(events, **options)
        assert pending.done is not None
        gate: Future[WriteOutcome] = Future()
        held.append((pending.done, gate))
        pending.done = gate  # the WAL writes it as usual; the write sees it only when let go
        loop.call_soon_threadsafe(queued.set)
        return pending

    monkeypatch.setattr(node.store, "submit", submit_and_hold)
    task = asyncio.create_task(append_events(node, [an_event()], ack_mode))
    queued_wait = asyncio.create_task(queued.wait())
    await asyncio.wait([task, queued_wait], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if not queued.is_set():
        queued_wait.cancel()
        raise AssertionError(f"the write never reached the WAL: {task}")
    await node.repoint("127.0.0.1:9")  # a new leader elsewhere; nothing listens there
    assert node.role is Role.FOLLOWER and node.leader is None
    written, gate = held[0]
    gate.set_result(await wait_written(written))
    return task


@pytest.mark.parametrize("how", ["server mode", "asked for"])
def test_a_write_demoted_while_it_waits_is_degraded_and_ledgered_never_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The leader is repointed after the write entered the WAL: nothing can confirm it any
    more, so the answer is ``degraded`` with the range in the ledger -- not ``local``, which
    would claim the mode asked for none."""
    server = "semi-sync" if how == "server mode" else "async"
    node = leader_node(tmp_path / "n", ack_mode=AckMode.parse(server))

    async def scenario() -> list[Any]:
        await node.start()
        try:
            task = await demoted_while_written(
                node, monkeypatch, None if how == "server mode" else "quorum:1"
            )
            return list(await task)
        finally:
            await node.stop()

    try:
        receipts = asyncio.run(scenario())
    finally:
        node.close()
    assert [r.durability for r in receipts] == ["degraded"]
    assert receipts[0].required == 1 and receipts[0].acked_by == []
    ledger = DegradationLedger.load(tmp_path / "n" / "replication" / "degraded.json")
    assert [(r.first_lsn, r.last_lsn) for r in ledger.ranges] == [(receipts[0].lsn,) * 2]


def test_a_write_demoted_while_it_waits_is_503_under_on_ack_timeout_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = leader_node(tmp_path / "n", ack_mode=AckMode.parse("semi-sync"), on_ack_timeout="fail")

    async def scenario() -> None:
        await node.start()
        try:
            task = await demoted_while_written(node, monkeypatch, None)
            with pytest.raises(AckTimeout) as info:
                await task
            assert info.value.details["committed_locally"] is True
            assert info.value.http_status == 503
        finally:
            await node.stop()

    try:
        asyncio.run(scenario())
    finally:
        node.close()


def test_peers_configure_how_many_followers_a_write_may_ask_for(tmp_path: Path) -> None:
    """No follower has connected yet, but ``--peers`` names two other nodes (and this one,
    which does not count): quorum:2 is taken (and degraded: nobody is in sync), quorum:3 is
    refused before anything is written."""
    config = NodeConfig(
        tmp_path / "n",
        fsync=FsyncPolicy.parse("never"),
        checkpoints=False,
        http_port=3999,
        peers=("http://127.0.0.1:3999", "http://127.0.0.2:3999", "http://127.0.0.3:3999/"),
        replication=ReplicationConfig(secret=SECRET, port=0),
    )
    node = Node.open(config)
    node.leadership.confirmed("a test leader: its peers are only named")

    async def scenario() -> None:
        await node.start()
        try:
            (taken,) = await append_events(node, [an_event()], "quorum:2")
            assert taken.durability == "degraded" and taken.required == 2
            with pytest.raises(UnmeetableAckMode) as info:
                await append_events(node, [an_event()], "quorum:3")
            assert info.value.details["followers_configured"] == 2
            assert node.store.last_position.lsn.value == taken.lsn
            assert [r["last_lsn"] for r in node.degraded_ranges()] == [taken.lsn]
        finally:
            await node.stop()

    try:
        asyncio.run(scenario())
    finally:
        node.close()
