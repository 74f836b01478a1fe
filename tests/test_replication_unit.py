"""Leader and follower in one event loop over real TCP on 127.0.0.1, each with its own store.

Covers the follower's contract: catch-up from the WAL and live streaming end byte-identical,
restart without gap or duplicate, snapshot + WAL (and a resumed snapshot that does not resend
verified bytes), authentication both ways, corrupt or discontinuous frames rejected and never
skipped; plus the pure pieces (Backoff, the staging directory's name checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import walship.wal.log as wal_log
from walship.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    ProtocolError,
    StorageFull,
    Unavailable,
    WaitTimeout,
)
from walship.limits import Limits
from walship.replication import leader as leader_mod
from walship.replication import snapshot_send
from walship.replication.acks import DegradationLedger
from walship.replication.config import ReplicationConfig
from walship.replication.follower import Backoff, Follower, FollowerState, FrameRejected
from walship.replication.leader import Leader
from walship.replication.metrics import ReplicationMetrics
from walship.replication.protocol import (
    Challenge,
    Hello,
    HelloProof,
    Message,
    SnapshotStart,
    WalBatch,
    Welcome,
    batch_records,
    make_nonce,
)
from walship.replication.staging import STAGING_DIR, SnapshotStaging, checked_child
from walship.replication.stream import MessageStream
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.testing.proxy import FaultProxy
from walship.wal import FsyncPolicy
from walship.wal.record import GENESIS_CHAIN, Record

from .conftest import make_event
from .fulldisk import FullDisk

SECRET = b"s3cret"
# small frames so catch-up takes many batches; fast heartbeats so idle links are exercised
LIMITS = Limits(
    frame_bytes_max=16 * 1024,
    record_bytes_max=8 * 1024,
    heartbeat_interval_ms=100,
    read_timeout_ms=3_000,
)
TIMEOUT_S = 10.0


def open_store(path: Path, node_id: str, limits: Limits = LIMITS) -> Store:
    return Store.open(
        StoreConfig(
            path,
            node_id=node_id,
            fsync=FsyncPolicy.parse("never"),
            limits=limits,
            checkpoints=False,
        )
    )


async def start_leader(store: Store, **config_args: Any) -> Leader:
    config = ReplicationConfig(secret=SECRET, port=0, **config_args)
    leader = Leader(store, config, ReplicationMetrics(store.metrics.registry))
    await leader.start()
    return leader


def make_follower(
    store: Store, port: int, *, secret: bytes = SECRET, node_id: str = "f1"
) -> Follower:
    config = ReplicationConfig(
        secret=secret,
        leader=f"127.0.0.1:{port}",
        reconnect_backoff_min_ms=10,
        reconnect_backoff_max_ms=100,
    )
    return Follower(store, config, ReplicationMetrics(store.metrics.registry), node_id)


async def stop_all(
    leader: Leader, lstore: Store, follower: Follower | None = None, fstore: Store | None = None
) -> None:
    """Stop the follower, then the leader, then close their stores."""
    if follower is not None:
        await follower.stop()
    await leader.stop()
    if fstore is not None:
        fstore.close()
    lstore.close()


@contextlib.asynccontextmanager
async def leader_and_follower(
    tmp_path: Path, limits: Limits = LIMITS, *, secret: bytes = SECRET
) -> AsyncIterator[tuple[Store, Store, Leader, Follower]]:
    """Stores "leader" and "f1" under ``tmp_path``, a started leader, and a follower (not
    started) pointed at it; afterwards both are stopped and both stores closed."""
    lstore = open_store(tmp_path / "leader", "leader", limits)
    fstore = open_store(tmp_path / "f1", "f1", limits)
    leader = await start_leader(lstore)
    assert leader.port is not None
    follower = make_follower(fstore, leader.port, secret=secret)
    try:
        yield lstore, fstore, leader, follower
    finally:
        await stop_all(leader, lstore, follower, fstore)


async def write(store: Store, count: int, start: int = 0) -> int:
    """Append ``count`` events on the leader; returns its last lsn."""
    events = [
        make_event(f"acct-{i % 7}", payload={"i": i, "pad": "x" * (i % 50)})
        for i in range(start, start + count)
    ]
    await asyncio.to_thread(store.append_batch, events)
    return store.wal.written_lsn.value


def wal_batch(
    recs: list[Record], first: int, last: int, *, prev_chain: bytes | None = None
) -> WalBatch:
    """One leader frame carrying records first..last of ``recs`` (lsn 1 onwards); its
    ``prev_chain`` is the right one unless given."""
    prev = recs[first - 2] if first > 1 else None
    if prev_chain is None:
        prev_chain = prev.chain if prev else GENESIS_CHAIN
    (batch,) = batch_records(
        [r.raw for r in recs[first - 1 : last]],
        term=recs[last - 1].term,
        prev_lsn=first - 1,
        prev_term=prev.term if prev else 0,
        prev_chain=prev_chain,
        leader_lsn=recs[-1].lsn,
        leader_write_ts_us=0,
    )
    return batch


def raw_records(store: Store, from_lsn: int = 1) -> list[bytes]:
    return [r.raw for r in store.wal.read_from(from_lsn)]


def query_all(store: Store) -> list[Any]:
    return store.query(QueryFilter(), limit=10_000).events


async def eventually(check: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 25))


def assert_identical(follower_store: Store, leader_store: Store, from_lsn: int = 1) -> None:
    assert follower_store.wal.last_position == leader_store.wal.last_position
    assert follower_store.wal.last_chain == leader_store.wal.last_chain
    assert raw_records(follower_store, from_lsn) == raw_records(leader_store, from_lsn)
    assert query_all(follower_store) == query_all(leader_store)


# ---------------------------------------------------------------------------------- WAL path


def test_new_follower_catches_up_from_wal_and_streams_live_writes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with leader_and_follower(tmp_path) as (lstore, fstore, leader, follower):
            last = await write(lstore, 600)
            await follower.start()
            await follower.wait_applied(last, TIMEOUT_S)
            assert_identical(fstore, lstore)
            await eventually(lambda: follower.state is FollowerState.STREAMING)

            # live writes while streaming, in several commits
            for k in range(5):
                last = await write(lstore, 40, start=600 + 40 * k)
            await follower.wait_applied(last, TIMEOUT_S)
            assert_identical(fstore, lstore)
            assert fstore.wal.terms.to_list() == lstore.wal.terms.to_list()

            # acks reach the leader; an idle link stays up past several heartbeats
            await eventually(lambda: leader.sessions["f1"].durable_lsn == last)
            await asyncio.sleep(0.5)
            status = follower.status()
            assert set(status) == {
                "leader",
                "leader_url",
                "connected",
                "state",
                "durable_lsn",
                "applied_lsn",
                "leader_lsn",
                "lag_records",
                "lag_ms",
                "silence_ms",
                "reconnects",
                "snapshots_received",
                "parts",
                "frames_rejected",
                "last_error",
                "known_term",
                "repairs",
                "last_repair",
                "snapshot",
                "snapshot_source",
                "snapshot_fallbacks",
            }
            assert status["leader"] == f"127.0.0.1:{leader.port}"
            assert status["connected"] is True
            assert status["state"] == "streaming"
            assert status["durable_lsn"] == status["applied_lsn"] == status["leader_lsn"] == last
            assert status["lag_records"] == 0
            assert status["lag_ms"] == 0.0
            assert status["reconnects"] == 0
            assert status["frames_rejected"] == 0
            assert status["snapshot"] is None
            assert leader.sessions["f1"].state is leader_mod.FollowerState.STREAMING
            assert "STREAMING" in repr(follower)
        assert follower.state is FollowerState.CLOSED

    run(scenario)


def test_follower_holds_compaction_back_only_while_it_catches_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with leader_and_follower(tmp_path) as (lstore, fstore, _leader, follower):
            calls: list[tuple[bool, int, FollowerState]] = []
            hold = fstore.hold_compaction

            def spy(held: bool) -> None:
                calls.append((held, fstore.wal.written_lsn.value, follower.state))
                hold(held)

            fstore.hold_compaction = spy  # type: ignore[method-assign]
            last = await write(lstore, 600)
            await follower.start()
            await follower.wait_applied(last, TIMEOUT_S)
            await eventually(lambda: follower.state is FollowerState.STREAMING)
            # held from before the first record is replayed, let go once the leader says it
            # has sent everything
            assert calls[0] == (True, 0, FollowerState.CATCHING_UP)
            assert calls[1:] == [(False, calls[1][1], FollowerState.STREAMING)]
            assert fstore.core.compaction_held is False
            await follower.stop()
            assert calls[-1][0] is False  # and whenever the link ends
            assert len(calls) == 3
            assert fstore.core.compaction_held is False

    run(scenario)


def test_every_degraded_answer_is_in_the_saved_ledger_before_it_leaves(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        store = open_store(tmp_path / "leader", "leader")
        leader = await start_leader(store)
        saves = 0
        writing = 0  # saves in progress at once: never more than one
        overlapped = False
        gate = {"armed": False}
        started, release = threading.Event(), threading.Event()
        write = leader.ledger.write

        def counted(data: bytes) -> None:
            nonlocal saves, writing, overlapped
            saves += 1
            writing += 1
            overlapped = overlapped or writing > 1
            if gate["armed"]:  # hold this save in its thread until the test lets it go
                gate["armed"] = False
                started.set()
                release.wait(5)
            else:
                time.sleep(0.01)  # a slow disk, so that a burst piles up behind one save
            write(data)
            writing -= 1

        leader.ledger.write = counted  # type: ignore[method-assign]
        try:
            # what is on disk once a record_degraded returns, without any stop or flush: a
            # crash right after the answer must not lose it
            await leader.record_degraded(1, 1, "timeout")
            await leader.record_degraded(2, 4, "timeout")  # extends the range just saved
            on_disk = DegradationLedger.load(leader.ledger.path).ranges
            assert [(r.first_lsn, r.last_lsn, r.writes) for r in on_disk] == [(1, 4, 2)]
            # a burst: every answer waits for a save that covers it, and saves are shared
            saves = 0
            await asyncio.gather(
                *(leader.record_degraded(lsn, lsn, "timeout") for lsn in range(5, 105))
            )
            on_disk = DegradationLedger.load(leader.ledger.path).ranges
            assert [(r.first_lsn, r.last_lsn, r.writes) for r in on_disk] == [(1, 104, 102)]
            assert 1 <= saves < 100
            # a request cancelled while its save runs (its client gone): the save goes on,
            # and the next one waits for it instead of writing the same file beside it
            gate["armed"] = True
            cancelled = asyncio.create_task(leader.record_degraded(105, 105, "timeout"))
            assert await asyncio.to_thread(started.wait, 5)  # its save is in its thread
            cancelled.cancel()
            later = asyncio.create_task(leader.record_degraded(200, 200, "floor"))
            # the later save either waits for the lock (right) or writes beside the held one
            await eventually(lambda: overlapped or bool(leader.ledger_keeper._lock._waiters))
            release.set()
            await later
            on_disk = DegradationLedger.load(leader.ledger.path).ranges
            assert [(r.first_lsn, r.last_lsn) for r in on_disk] == [(1, 105), (200, 200)]
            assert not overlapped
        finally:
            await leader.stop()
            store.close()
        # the metric is the ledger's, so it survives a restart as the ledger does
        store = open_store(tmp_path / "leader", "leader")
        leader = await start_leader(store)
        try:
            assert metric(store, "walship_replication_degraded_writes") == 104
            assert metric(store, "walship_replication_degraded_ranges") == 2
        finally:
            await leader.stop()
            store.close()

    run(scenario)


def test_a_follower_acknowledges_only_what_it_has_fsynced_whatever_its_policy(
    tmp_path: Path,
) -> None:
    # both stores run fsync "never" (leader_and_follower): the follower must fsync what it
    # acknowledges all the same, or "replicated" would promise what a power loss takes away
    async def scenario() -> None:
        async with leader_and_follower(tmp_path) as (lstore, fstore, leader, follower):
            assert fstore.wal.fsync.mode.value == "never"
            synced_at_ack: list[tuple[int, int]] = []
            send = follower._send_position

            async def spy() -> None:
                synced_at_ack.append((follower.durable_lsn, fstore.wal.synced_lsn.value))
                await send()

            follower._send_position = spy  # type: ignore[method-assign]
            await follower.start()
            last = 0

            def acked() -> bool:
                return "f1" in leader.sessions and leader.sessions["f1"].durable_lsn == last

            for k in range(4):
                last = await write(lstore, 50, start=50 * k)
                await eventually(acked)
            assert lstore.wal.synced_lsn.value == 0  # the leader itself never synced
            assert all(durable <= synced for durable, synced in synced_at_ack)
            assert max(durable for durable, _ in synced_at_ack) == last

    run(scenario)


def metric(store: Store, name: str, **labels: str) -> float | None:
    """A sample of the node's Prometheus registry; None when absent."""
    return store.metrics.registry.get_sample_value(name, labels)


def test_replication_metrics_on_both_ends_and_labels_gone_with_the_follower(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with leader_and_follower(tmp_path) as (lstore, fstore, leader, follower):
            await follower.start()
            last = await write(lstore, 120)
            await follower.wait_applied(last, TIMEOUT_S)
            await eventually(lambda: "f1" in leader.sessions and leader.sessions["f1"].in_sync)
            await eventually(lambda: leader.sessions["f1"].durable_lsn == last)
            f1 = {"node_id": "f1"}
            # published on every ack and by the in-sync monitor
            await eventually(
                lambda: metric(lstore, "walship_replication_follower_applied_lsn", **f1) == last
            )

            assert metric(lstore, "walship_replication_followers") == 1
            assert metric(lstore, "walship_replication_follower_durable_lsn", **f1) == last
            assert metric(lstore, "walship_replication_follower_applied_lsn", **f1) == last
            assert metric(lstore, "walship_replication_follower_sent_lsn", **f1) == last
            assert metric(lstore, "walship_replication_follower_lag_records", **f1) == 0
            assert metric(lstore, "walship_replication_follower_in_sync", **f1) == 1
            lag_s = metric(lstore, "walship_replication_follower_lag_seconds", **f1)
            assert lag_s is not None and lag_s >= 0

            assert metric(fstore, "walship_replication_connected") == 1
            assert metric(fstore, "walship_replication_durable_lsn") == last
            assert metric(fstore, "walship_replication_applied_lsn") == last
            assert metric(fstore, "walship_replication_leader_lsn") == last
            assert metric(fstore, "walship_replication_lag_records") == 0
            assert metric(fstore, "walship_replication_snapshots_received_total") == 0

            await leader.record_degraded(last, last, "timeout")
            assert metric(lstore, "walship_replication_degraded_writes") == 1
            assert metric(lstore, "walship_replication_degraded_ranges") == 1

            await follower.stop()
            await eventually(lambda: "f1" not in leader.sessions)
            assert metric(fstore, "walship_replication_connected") == 0
            assert metric(lstore, "walship_replication_followers") == 0
            for name in ("lag_seconds", "lag_records", "durable_lsn", "applied_lsn", "in_sync"):
                assert metric(lstore, f"walship_replication_follower_{name}", **f1) is None

    run(scenario)


def test_read_deadlines_drop_a_silent_peer_at_either_end(tmp_path: Path) -> None:
    """Both ends read with a deadline (``read_timeout_ms``): the leader drops a connection
    that says nothing, and a follower whose link goes silent (heartbeats and all) drops it
    and connects again."""
    limits = dataclasses.replace(LIMITS, read_timeout_ms=500)

    async def scenario() -> None:
        lstore = open_store(tmp_path / "leader", "leader", limits)
        fstore = open_store(tmp_path / "f1", "f1", limits)
        leader = await start_leader(lstore)
        assert leader.port is not None
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", leader.port)
            t0 = loop.time()
            while await asyncio.wait_for(reader.read(65536), 5):
                pass  # until the leader closes it
            assert 0.45 <= loop.time() - t0 < 3
            writer.close()

            with FaultProxy(("127.0.0.1", leader.port)) as proxy:
                follower = make_follower(fstore, proxy.port)
                await follower.start()
                try:
                    await follower.wait_applied(await write(lstore, 10), TIMEOUT_S)
                    await eventually(lambda: follower.state is FollowerState.STREAMING)
                    proxy.set_paused(True)  # nothing passes, not even heartbeats
                    t0 = loop.time()
                    await eventually(lambda: not follower.connected)
                    # the deadline runs from the last heartbeat (every 100 ms) before the pause
                    assert 0.35 <= loop.time() - t0 < 3
                    assert follower.reconnects == 0
                    assert "within 500 ms" in (follower.status()["last_error"] or "")
                    proxy.set_paused(False)
                    await follower.wait_applied(await write(lstore, 10, start=10), TIMEOUT_S)
                    assert follower.reconnects >= 1
                    assert_identical(fstore, lstore)
                finally:
                    await follower.stop()
        finally:
            await leader.stop()
            fstore.close()
            lstore.close()

    run(scenario)


def test_a_follower_joins_the_in_sync_set_only_once_caught_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a leader restart every older record counts as written at the start, so lag in
    time alone would call a follower far behind "in sync"; sync writes would then wait on it.
    It joins only once it has been sent everything (STREAMING)."""

    async def scenario() -> None:
        lstore = open_store(tmp_path / "leader", "leader")
        for start in range(0, 3000, 500):
            await write(lstore, 500, start=start)
        lstore.close()
        lstore = open_store(tmp_path / "leader", "leader")  # the leader restarted
        leader = await start_leader(lstore)
        assert leader.port is not None
        seen: list[tuple[leader_mod.FollowerState, bool]] = []
        evaluate = leader.evaluate
        judged_catching_up = asyncio.Event()

        def spy(session: leader_mod.FollowerSession) -> None:
            evaluate(session)
            seen.append((session.state, session.in_sync))
            if session.state is leader_mod.FollowerState.CATCHING_UP:
                judged_catching_up.set()

        leader.evaluate = spy  # type: ignore[method-assign]
        # the whole catch-up may fit in the socket buffers and be sent before the first ack
        # comes back; hold it after its first step until an ack has been judged mid-catch-up
        step = leader_mod.FollowerSession.step

        async def held_step(session: leader_mod.FollowerSession) -> bool:
            sent = await step(session)
            if session.state is leader_mod.FollowerState.CATCHING_UP:
                async with asyncio.timeout(TIMEOUT_S):
                    await judged_catching_up.wait()
            return sent

        monkeypatch.setattr(leader_mod.FollowerSession, "step", held_step)
        fstore = open_store(tmp_path / "f1", "f1")
        follower = make_follower(fstore, leader.port)
        try:
            await follower.start()
            await follower.wait_applied(3000, TIMEOUT_S)
            await eventually(lambda: "f1" in leader.sessions and leader.sessions["f1"].in_sync)
            catching_up = [in_sync for state, in_sync in seen if state.name == "CATCHING_UP"]
            assert catching_up, "acks came while it caught up (small frames)"
            assert not any(catching_up)
        finally:
            await stop_all(leader, lstore, follower, fstore)

    run(scenario)


def test_frames_are_filled_and_a_follower_that_stops_reading_holds_the_leader_back(
    tmp_path: Path,
) -> None:
    """Catch-up frames carry as many records as fit under the frame limit; and a follower
    that stops reading makes its session wait (``drain``) instead of buffering the WAL in the
    leader's memory."""

    async def scenario() -> None:
        async with leader_and_follower(tmp_path) as (lstore, fstore, leader, follower):
            for start in range(0, 2000, 250):
                await write(lstore, 250, start=start)
            frames: list[int] = []
            handle = follower.handle
            reading = asyncio.Event()
            reading.set()

            async def spy(msg: Any) -> None:
                if isinstance(msg, WalBatch):
                    frames.append(msg.last_lsn - msg.first_lsn + 1)
                await reading.wait()
                await handle(msg)

            follower.handle = spy  # type: ignore[method-assign]
            await follower.start()
            await follower.wait_applied(2000, TIMEOUT_S)
            wal_bytes = sum(len(r.raw) for r in lstore.wal.read_from(1))
            # frames fill up to frame_bytes_max (and end where an append ends when one fits):
            # on average at least half full, never a record or an append per frame
            assert len(frames) <= 2 * wal_bytes // LIMITS.frame_bytes_max + 2
            assert sum(frames) == 2000

            reading.clear()  # the follower stops reading; the leader writes ~20 MB more
            payload = "x" * 2000
            for _ in range(20):
                events = [make_event(f"big-{i % 7}", payload={"p": payload}) for i in range(500)]
                await asyncio.to_thread(lstore.append_batch, events)
            session = leader.sessions["f1"]
            transport = session.stream.writer.transport
            high_water = transport.get_write_buffer_limits()[1]
            # the link is full: the kernel's buffers and the transport's, past its high water
            await eventually(lambda: transport.get_write_buffer_size() > high_water)
            # not a synchronisation but the window the property is about: a leader without
            # backpressure keeps buffering, up to all 20 MB, during it
            await asyncio.sleep(0.5)
            assert session.sent_lsn < lstore.wal.written_lsn.value  # held back
            buffered = transport.get_write_buffer_size()
            assert buffered <= high_water + LIMITS.frame_bytes_max
            reading.set()
            await follower.wait_applied(lstore.wal.written_lsn.value, TIMEOUT_S)
            assert_identical(fstore, lstore)

    run(scenario)


def test_a_follower_catches_up_while_writes_keep_landing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caught up means sent the end of the log as it was when a step began: under a steady
    load something new is written during every step, and waiting for "nothing new at all"
    kept such a follower out of the in-sync set (and its compaction held) while it lasted."""
    writes_max = 300
    landed = {"writes": 0, "at_caught_up": -1}
    real_step = leader_mod.FollowerSession.step

    async def step_with_a_write_landing(self: leader_mod.FollowerSession) -> bool:
        sent = await real_step(self)
        if self.state is leader_mod.FollowerState.STREAMING and landed["at_caught_up"] < 0:
            landed["at_caught_up"] = landed["writes"]
        if sent and landed["writes"] < writes_max:  # one more write after every frame
            self.leader.store.append(make_event("busy", payload={"n": landed["writes"]}))
            landed["writes"] += 1
        return sent

    monkeypatch.setattr(leader_mod.FollowerSession, "step", step_with_a_write_landing)

    async def scenario() -> None:
        async with leader_and_follower(tmp_path) as (lstore, fstore, leader, follower):
            await write(lstore, 500)
            await follower.start()
            await follower.wait_applied(500 + writes_max, TIMEOUT_S)
            await eventually(lambda: follower.state is FollowerState.STREAMING)
            # caught up while the writes still landed, not only once they stopped
            assert 0 < landed["at_caught_up"] < writes_max
            assert leader.sessions["f1"].in_sync
            assert fstore.core.compaction_held is False
            assert_identical(fstore, lstore)

    run(scenario)


def test_follower_restarted_catches_up_without_gap_or_duplicate(tmp_path: Path) -> None:
    async def scenario() -> None:
        lstore = open_store(tmp_path / "leader", "leader")
        leader = await start_leader(lstore)
        assert leader.port is not None
        try:
            fstore = open_store(tmp_path / "f1", "f1")
            follower = make_follower(fstore, leader.port)
            await follower.start()
            last = await write(lstore, 300)
            await follower.wait_applied(last, TIMEOUT_S)
            await follower.stop()
            fstore.close()

            last = await write(lstore, 1_000, start=300)  # while the follower is away

            fstore = open_store(tmp_path / "f1", "f1")
            assert fstore.wal.last_position.lsn.value == 300
            follower = make_follower(fstore, leader.port)
            await follower.start()
            last = await write(lstore, 50, start=1_300)
            await follower.wait_applied(last, TIMEOUT_S)
            assert_identical(fstore, lstore)
            lsns = [r.lsn for r in fstore.wal.read_from(1)]
            assert lsns == list(range(1, last + 1))
            await follower.stop()
            fstore.close()
        finally:
            await leader.stop()
            lstore.close()

    run(scenario)


# ---------------------------------------------------------------------------------- snapshots


SNAPSHOT_LIMITS = Limits(
    segment_bytes_max=4096,
    frame_bytes_max=16 * 1024,
    record_bytes_max=8 * 1024,
    heartbeat_interval_ms=100,
    read_timeout_ms=3_000,
)


async def checkpointed_leader(tmp_path: Path) -> tuple[Store, Leader, int]:
    """A leader whose early WAL is gone: 400 events checkpointed (S), then 120 more."""
    lstore = open_store(tmp_path / "leader", "leader", SNAPSHOT_LIMITS)
    await write(lstore, 200)
    await write(lstore, 200, start=200)
    part = await asyncio.to_thread(lstore.checkpoint)
    assert part is not None
    snapshot_lsn = lstore.manifest.last_lsn
    assert lstore.wal.first_lsn().value > 1, "the early WAL segments should be gone"
    await write(lstore, 120, start=400)
    leader = await start_leader(lstore)
    return lstore, leader, snapshot_lsn


def test_follower_needing_a_snapshot_gets_snapshot_then_wal(tmp_path: Path) -> None:
    async def scenario() -> None:
        lstore, leader, snapshot_lsn = await checkpointed_leader(tmp_path)
        assert leader.port is not None
        fstore = open_store(tmp_path / "f1", "f1", SNAPSHOT_LIMITS)
        follower = make_follower(fstore, leader.port)
        progress: list[dict[str, Any] | None] = []
        try:
            await follower.start()
            await follower.wait_applied(lstore.wal.written_lsn.value, TIMEOUT_S)
            last = await write(lstore, 30, start=520)
            await follower.wait_applied(last, TIMEOUT_S)
            progress.append(follower.status()["snapshot"])

            assert follower.snapshots_received == 1
            assert fstore.manifest == lstore.manifest
            assert fstore.wal.first_lsn().value == snapshot_lsn + 1
            assert_identical(fstore, lstore, from_lsn=snapshot_lsn + 1)
            assert not any((fstore.data_dir / STAGING_DIR).iterdir())
            assert progress == [None]  # progress shows only while a transfer runs
        finally:
            await stop_all(leader, lstore, follower, fstore)

    run(scenario)


async def follow_then_leave(
    lstore: Store,
    leader: Leader,
    follower: Follower,
    while_connected: Callable[[], None] = lambda: None,
) -> None:
    """The follower takes lsns 1..100 and stops (its slot stays at 100); the leader then
    writes 300 more in small appends (many WAL segments) and checkpoints them."""
    await follower.start()
    await follower.wait_applied(await write(lstore, 100), TIMEOUT_S)
    await eventually(lambda: leader.slots.slots.get("f1") == 100)
    while_connected()
    await follower.stop()
    await eventually(lambda: "f1" not in leader.sessions)
    for start in range(100, 400, 10):
        await write(lstore, 10, start=start)
    assert await asyncio.to_thread(lstore.checkpoint) is not None


@pytest.mark.parametrize(
    ("cap", "snapshots"),
    [(1 << 30, 0), (1024, 1)],
    ids=["within-the-cap-from-the-wal", "over-the-cap-a-snapshot"],
)
def test_a_known_follower_keeps_its_wal_up_to_the_retention_cap(
    tmp_path: Path, cap: int, snapshots: int
) -> None:
    """A follower that was connected once holds a slot: checkpoints keep the WAL it still
    needs, unless that is more than ``wal_retention_bytes_max``; then it gets a snapshot."""

    async def scenario() -> None:
        lstore = open_store(tmp_path / "leader", "leader", SNAPSHOT_LIMITS)
        leader = await start_leader(lstore, wal_retention_bytes_max=cap)
        assert leader.port is not None
        fstore = open_store(tmp_path / "f1", "f1", SNAPSHOT_LIMITS)
        follower = make_follower(fstore, leader.port)
        try:
            await follow_then_leave(lstore, leader, follower)
            kept = lstore.wal.first_lsn().value <= 101
            assert kept is (snapshots == 0)

            fstore.close()  # the same node restarted
            fstore = open_store(tmp_path / "f1", "f1", SNAPSHOT_LIMITS)
            follower = make_follower(fstore, leader.port)
            await follower.start()
            last = await write(lstore, 20, start=400)
            await follower.wait_applied(last, TIMEOUT_S)
            assert follower.snapshots_received == snapshots
            both_hold = max(fstore.wal.first_lsn().value, lstore.wal.first_lsn().value)
            assert_identical(fstore, lstore, from_lsn=both_hold)
            assert query_all(fstore) == query_all(lstore)
        finally:
            await stop_all(leader, lstore, follower, fstore)

    run(scenario)


def test_forgetting_a_departed_follower_releases_its_wal(tmp_path: Path) -> None:
    async def scenario() -> None:
        lstore = open_store(tmp_path / "leader", "leader", SNAPSHOT_LIMITS)
        leader = await start_leader(lstore)
        assert leader.port is not None
        fstore = open_store(tmp_path / "f1", "f1", SNAPSHOT_LIMITS)
        follower = make_follower(fstore, leader.port)

        def refused_while_connected() -> None:
            with pytest.raises(Conflict, match="is connected"):
                leader.forget_follower("f1")

        try:
            await follow_then_leave(lstore, leader, follower, refused_while_connected)
            assert lstore.wal.first_lsn().value <= 101  # the slot holds it

            assert leader.forget_follower("f1") == {"forgotten": "f1", "slot_lsn": 100}
            assert "f1" not in leader.tracker.acked_by(1)
            slots_on_disk = msgspec.json.decode(leader.slots.path.read_bytes())
            assert "f1" not in slots_on_disk
            with pytest.raises(NotFound):
                leader.forget_follower("f1")
            await write(lstore, 20, start=400)
            await asyncio.to_thread(lstore.checkpoint)
            assert lstore.wal.first_lsn().value > 101  # released
        finally:
            await leader.stop()
            fstore.close()
            lstore.close()

    run(scenario)


@pytest.mark.parametrize("restart", [False, True], ids=["reconnect", "follower-restart"])
def test_interrupted_snapshot_resumes_without_resending_verified_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restart: bool
) -> None:
    """The link breaks after a few 256-byte chunks; the next SnapshotStart (same snapshot)
    is answered from the bytes already held, and only the rest is sent: on a reconnect, and
    after the follower restarted (what it held is read back from its staging directory)."""
    monkeypatch.setattr(snapshot_send, "SNAPSHOT_CHUNK_BYTES", 256)
    starts: list[tuple[int, int, int, int]] = []  # (file_index, offset, held, total) per start
    chunks: list[list[tuple[int, int, int]]] = []  # (file_index, offset, size) per start
    progress: list[dict[str, Any]] = []
    followers: list[Follower] = []
    real_open = SnapshotStaging.open
    real_write = SnapshotStaging.write

    def spy_open(data_dir: Path, start: SnapshotStart) -> SnapshotStaging:
        staging = real_open(data_dir, start)
        resume = staging.resume
        starts.append((resume.file_index, resume.offset, staging.bytes_done, start.total_bytes))
        chunks.append([])
        return staging

    def spy_write(self: SnapshotStaging, chunk: Any) -> None:
        if len(starts) == 1 and len(chunks[0]) == 6:
            raise ConnectionResetError("cut by the test")
        if len(starts) == 2 and not chunks[1]:
            progress.append(followers[0].status()["snapshot"])
        chunks[-1].append((chunk.file_index, chunk.offset, len(chunk.data)))
        real_write(self, chunk)

    monkeypatch.setattr(SnapshotStaging, "open", staticmethod(spy_open))
    monkeypatch.setattr(SnapshotStaging, "write", spy_write)

    async def scenario() -> None:
        lstore, leader, snapshot_lsn = await checkpointed_leader(tmp_path)
        assert leader.port is not None
        fstore = open_store(tmp_path / "f1", "f1", SNAPSHOT_LIMITS)
        follower = make_follower(fstore, leader.port)
        followers.append(follower)
        try:
            if restart:
                follower.backoff = Backoff(60_000, 60_000)  # no reconnect: it is restarted
                await follower.start()
                await eventually(lambda: "cut by the test" in (follower.last_error or ""))
                await follower.stop()
                fstore.close()
                fstore = open_store(tmp_path / "f1", "f1", SNAPSHOT_LIMITS)
                follower = make_follower(fstore, leader.port)
                followers[0] = follower
            await follower.start()
            await follower.wait_applied(lstore.wal.written_lsn.value, TIMEOUT_S)
            assert follower.snapshots_received == 1
            assert follower.reconnects == (0 if restart else 1)
            if not restart:
                assert "cut by the test" in (follower.last_error or "")
            assert_identical(fstore, lstore, from_lsn=snapshot_lsn + 1)
            registry = lstore.metrics.registry
            assert registry.get_sample_value("walship_replication_snapshots_sent_total") == 1
        finally:
            await stop_all(leader, lstore, follower, fstore)

    run(scenario)

    assert len(starts) == 2 and starts[0] == (0, 0, 0, starts[0][3])
    total = starts[1][3]
    assert total == starts[0][3], "the same snapshot was offered again"
    first, second = chunks
    held_before_cut = sum(size for _, _, size in first)
    assert held_before_cut == 6 * 256
    file_index, offset, held, _ = starts[1]
    assert held == held_before_cut, "the resume point is what was received before the cut"
    assert (file_index, offset) != (0, 0)
    assert second[0][:2] == (file_index, offset), "the leader continued at the resume point"
    # every byte of the snapshot arrived exactly once over the two connections
    assert held_before_cut + sum(size for _, _, size in second) == total
    (snap,) = progress
    assert snap["bytes_total"] == total
    assert held <= snap["bytes_done"] < total


# ---------------------------------------------------------------------------------- auth


def test_wrong_secret_is_refused_before_anything_is_shipped(tmp_path: Path) -> None:
    async def scenario() -> None:
        pair = leader_and_follower(tmp_path, secret=b"not the secret")
        async with pair as (lstore, fstore, leader, follower):
            await write(lstore, 50)
            await follower.start()
            await eventually(lambda: follower.last_error is not None)
            assert "authentication" in (follower.last_error or "")
            assert fstore.wal.last_position.lsn.value == 0
            assert not follower.status()["connected"]
            assert leader.sessions == {}
            with pytest.raises(WaitTimeout):
                await follower.wait_applied(1, 0.2)
        with pytest.raises(Unavailable):
            await follower.wait_applied(1, 0.2)

    run(scenario)


def test_follower_refuses_a_leader_that_cannot_prove_the_secret(tmp_path: Path) -> None:
    """A fake leader accepts the follower's proof blindly and answers with a bogus proof."""
    received: list[str] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = MessageStream(reader, writer, LIMITS.frame_bytes_max)
        try:
            await stream.expect(Hello, 2)
            await stream.send(Challenge(make_nonce()))
            await stream.expect(HelloProof, 2)
            await stream.send(Welcome("impostor", 1, 100, bytes(32)))
            while True:
                received.append(type(await stream.recv(2)).__name__)
        except Exception:
            pass
        finally:
            await stream.close()

    async def scenario() -> None:
        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        fstore = open_store(tmp_path / "f1", "f1")
        follower = make_follower(fstore, port)
        try:
            await follower.start()
            await eventually(lambda: follower.last_error is not None)
            assert "authentication" in (follower.last_error or "")
            assert "impostor" in (follower.last_error or "")
            await eventually(lambda: "Refused" in received)
            assert "Subscribe" not in received
        finally:
            await follower.stop()
            server.close()
            fstore.close()

    run(scenario)


# ---------------------------------------------------------------------------------- rejects


def test_corrupted_wal_batch_is_rejected_counted_and_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record byte flipped after the leader read it (the frame's own CRC is then right):
    the record CRC catches it, the follower reconnects from its durable position."""
    real_send = MessageStream.send
    corrupted: list[WalBatch] = []

    async def corrupting_send(self: MessageStream, msg: Message) -> None:
        if isinstance(msg, WalBatch) and not corrupted and msg.first_lsn > 1:
            data = bytearray(msg.records)
            data[40] ^= 0x01  # inside the first record's body
            msg = msgspec.structs.replace(msg, records=bytes(data))
            corrupted.append(msg)
        await real_send(self, msg)

    monkeypatch.setattr(MessageStream, "send", corrupting_send)

    async def scenario() -> None:
        async with leader_and_follower(tmp_path) as (lstore, fstore, _leader, follower):
            last = await write(lstore, 400)
            await follower.start()
            await follower.wait_applied(last, TIMEOUT_S)
            assert len(corrupted) == 1
            assert follower.frames_rejected == 1
            assert follower.status()["frames_rejected"] == 1
            assert follower.reconnects >= 1
            assert "rejected a frame" in (follower.last_error or "")
            assert "CRC" in (follower.last_error or "")
            assert_identical(fstore, lstore)
            registry = fstore.metrics.registry
            assert registry.get_sample_value("walship_replication_frames_rejected_total") == 1

    run(scenario)


def test_follower_out_of_space_resubscribes_and_catches_up_once_space_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follower's disk fills while it streams: its write is rolled back, the link drops,
    and it resubscribes from its own end of log (after a backoff) until there is space; then
    it catches up, byte-identical, with nothing applied twice or skipped."""
    disk = FullDisk(only_under=tmp_path / "f1")
    monkeypatch.setattr(wal_log, "os", disk)
    limits = dataclasses.replace(LIMITS, storage_full_probe_ms=20)

    async def scenario() -> None:
        async with leader_and_follower(tmp_path, limits) as (lstore, fstore, _leader, follower):
            before = await write(lstore, 100)
            await follower.start()
            await follower.wait_applied(before, TIMEOUT_S)
            disk.full = True
            last = await write(lstore, 100, start=100)
            await eventually(lambda: follower.reconnects >= 2)
            assert isinstance(fstore.wal.failed, StorageFull)
            assert "no space left" in (follower.last_error or "")
            assert fstore.wal.last_position.lsn.value == before == follower.applied_lsn
            assert len(query_all(fstore)) == before

            disk.full = False
            await follower.wait_applied(last, TIMEOUT_S)
            assert fstore.wal.failed is None
            assert_identical(fstore, lstore)

    run(scenario)


def test_batches_that_do_not_continue_the_log_are_rejected_never_skipped(
    tmp_path: Path,
) -> None:
    """The receive step checks prev position and chain against the local end of log, and
    refuses frames from a deposed (lower-term) leader; nothing is applied out of order."""

    async def scenario() -> None:
        source = open_store(tmp_path / "source", "source")
        fstore = open_store(tmp_path / "f1", "f1")
        follower = make_follower(fstore, 1)
        try:
            for i in range(4):
                source.append(make_event(f"e{i}"))
            recs = list(source.wal.read_from(1))

            with pytest.raises(FrameRejected, match="does not continue"):
                # a gap: lsn 1 is missing
                await follower.handle(wal_batch(recs, 2, 4, prev_chain=recs[0].chain))
            with pytest.raises(FrameRejected, match="does not continue"):
                # another history
                await follower.handle(wal_batch(recs, 1, 4, prev_chain=b"\x01" * 8))
            assert fstore.wal.last_position.lsn.value == 0

            follower.known_term = 2
            with pytest.raises(FrameRejected, match="deposed"):
                await follower.handle(wal_batch(recs, 1, 4))
            follower.known_term = 1

            await follower.handle(wal_batch(recs, 1, 4))  # the right one applies
            assert fstore.wal.last_position.lsn.value == 4
            await asyncio.to_thread(fstore.wal.sync)
            assert raw_records(fstore) == raw_records(source)
        finally:
            fstore.close()
            source.close()

    run(scenario)


def test_an_append_split_across_frames_is_held_until_its_last_record_arrives(
    tmp_path: Path,
) -> None:
    """A leader frame may end inside one atomic append (an append larger than a frame): the
    follower verifies that part and holds it — not written, not readable, not acked — and
    applies the whole append when the frame with its last record arrives."""

    async def scenario() -> None:
        source = open_store(tmp_path / "source", "source")
        fstore = open_store(tmp_path / "f1", "f1")
        follower = make_follower(fstore, 1)
        try:
            source.append(make_event("solo"))
            source.append_batch([make_event(f"e{i}") for i in range(5)])  # lsn 2..6, atomic
            recs = list(source.wal.read_from(1))
            assert [r.batch_left for r in recs] == [0, 4, 3, 2, 1, 0]

            # lsn 1 whole, lsn 2..3 the start of an append
            await follower.handle(wal_batch(recs, 1, 3))
            await asyncio.to_thread(fstore.wal.sync)
            assert fstore.wal.last_position.lsn.value == 1
            assert [e.lsn for e in query_all(fstore)] == [1]
            # still open: continues from the held records
            await follower.handle(wal_batch(recs, 4, 5))
            await asyncio.to_thread(fstore.wal.sync)
            assert fstore.wal.last_position.lsn.value == 1
            assert [e.lsn for e in query_all(fstore)] == [1]
            with pytest.raises(FrameRejected, match="does not continue"):
                # from the log's end, not the held tail
                await follower.handle(wal_batch(recs, 2, 6))
            follower._begin_session()  # a new connection forgets what was held
            await follower.handle(wal_batch(recs, 2, 4))
            # the append's last record: all of it applies
            await follower.handle(wal_batch(recs, 5, 6))
            await asyncio.to_thread(fstore.wal.sync)
            assert fstore.wal.last_position.lsn.value == 6
            assert [e.lsn for e in query_all(fstore)] == [1, 2, 3, 4, 5, 6]
            assert raw_records(fstore) == raw_records(source)
        finally:
            fstore.close()
            source.close()

    run(scenario)


# ---------------------------------------------------------------------------------- pure parts


def test_backoff_is_capped_exponential_with_jitter_and_resets() -> None:
    backoff = Backoff(100, 1_000, rng=random.Random(7))
    ceilings = []
    for _ in range(7):
        ceilings.append(backoff.ceiling_ms())
        delay = backoff.next_delay()
        assert 0.1 <= delay <= ceilings[-1] / 1000
    assert ceilings == [100, 200, 400, 800, 1_000, 1_000, 1_000]
    delays = {Backoff(100, 1_000, rng=random.Random(s)).next_delay() for s in range(3)}
    assert delays == {0.1}  # the first attempt's window is [min, min]
    jittered = {round(backoff.next_delay(), 6) for _ in range(20)}
    assert len(jittered) > 10 and all(0.1 <= d <= 1.0 for d in jittered)
    backoff.reset()
    assert backoff.ceiling_ms() == 100
    assert backoff.next_delay() == 0.1
    for bad in ((0, 10), (20, 10)):
        with pytest.raises(InvalidInput):
            Backoff(*bad)


def test_snapshot_names_from_the_wire_never_leave_the_staging_dir(tmp_path: Path) -> None:
    base = tmp_path / "files"
    base.mkdir()
    assert checked_child(base, "00000001-00000002.parquet") == base / "00000001-00000002.parquet"
    for name in ("../x", ".hidden", "a/b", "..", "", "x" * 200, "a\x00b"):
        with pytest.raises(ProtocolError):
            checked_child(base, name)
    os.symlink(tmp_path, base / "escape")
    with pytest.raises(ProtocolError, match="leaves"):
        checked_child(base, "escape")

    start = SnapshotStart(
        snapshot_id="../../evil",
        last_lsn=1,
        last_term=1,
        chain=GENESIS_CHAIN,
        files=[],
        total_bytes=0,
    )
    with pytest.raises(ProtocolError):
        SnapshotStaging.open(tmp_path / "data", start)
    assert not (tmp_path / "evil").exists()


def test_follower_needs_a_secret_and_a_leader_address(tmp_path: Path) -> None:
    fstore = open_store(tmp_path / "f1", "f1")
    metrics = ReplicationMetrics(fstore.metrics.registry)
    try:
        with pytest.raises(InvalidInput):
            Follower(fstore, ReplicationConfig(leader="127.0.0.1:1"), metrics, "f1")
        with pytest.raises(InvalidInput):
            Follower(fstore, ReplicationConfig(secret=SECRET), metrics, "f1")
        follower = Follower(
            fstore, ReplicationConfig(secret=SECRET, leader="127.0.0.1:3910"), metrics, "f1"
        )
        assert follower.leader_address == "127.0.0.1:3910"
        assert follower.state is FollowerState.CLOSED
    finally:
        fstore.close()
