"""Ack modes and the tracker that waits on a write's own lsn; the degradation ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from walship.errors import InvalidInput
from walship.replication.acks import AckMode, AckTracker, DegradationLedger


def test_ack_modes_parse_and_compare() -> None:
    assert str(AckMode.parse("semi-sync")) == "semi-sync"
    assert AckMode.parse("quorum:2").required(0) == 2
    assert AckMode.parse("sync").required(3) == 3
    assert AckMode.parse("sync").required(0, min_in_sync=2) == 2
    assert not AckMode.parse("async").waits
    server = AckMode.parse("semi-sync")
    assert server.stricter(AckMode.parse("async"), 2) == server
    assert server.stricter(AckMode.parse("quorum:2"), 2) == AckMode.parse("quorum:2")
    for bad in ("quorum:0", "quorum:x", "most", "", "quorum:" + "9" * 40, "quorum:1001"):
        with pytest.raises(InvalidInput):
            AckMode.parse(bad)


def test_semi_sync_waits_for_the_writes_own_lsn() -> None:
    async def scenario() -> None:
        tracker = AckTracker()
        tracker.set_in_sync("f1", True)
        tracker.update("f1", 4)
        waiting = asyncio.create_task(tracker.wait(5, AckMode.parse("semi-sync"), 2.0))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        tracker.update("f1", 5)
        outcome = await waiting
        assert outcome.satisfied
        assert outcome.acked_by == ["f1"]
        assert outcome.required == 1
        # an ack that is already there answers at once: no wake-up to miss
        assert (await tracker.wait(3, AckMode.parse("semi-sync"), 0.01)).satisfied

    asyncio.run(scenario())


def test_quorum_needs_n_followers_and_times_out_otherwise() -> None:
    async def scenario() -> None:
        tracker = AckTracker()
        for f in ("f1", "f2"):
            tracker.set_in_sync(f, True)
        tracker.update("f1", 10)
        outcome = await tracker.wait(10, AckMode.parse("quorum:2"), 0.05)
        assert not outcome.satisfied
        assert outcome.acked_by == ["f1"]
        assert outcome.reason is not None
        tracker.update("f2", 10)
        assert (await tracker.wait(10, AckMode.parse("quorum:2"), 0.05)).acked_by == ["f1", "f2"]

    asyncio.run(scenario())


def test_sync_waits_for_every_in_sync_follower_and_shrinks_with_the_set() -> None:
    async def scenario() -> None:
        tracker = AckTracker()
        for f in ("f1", "f2"):
            tracker.set_in_sync(f, True)
        tracker.update("f1", 7)
        waiting = asyncio.create_task(tracker.wait(7, AckMode.parse("sync"), 2.0))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        tracker.set_in_sync("f2", False)  # f2 lags past max-lag: it leaves the set
        outcome = await waiting
        assert outcome.satisfied
        assert outcome.acked_by == ["f1"]
        assert outcome.required == 1

    asyncio.run(scenario())


def test_below_the_in_sync_floor_writes_do_not_wait() -> None:
    async def scenario() -> None:
        tracker = AckTracker()
        tracker.set_in_sync("f1", True)
        outcome = await tracker.wait(1, AckMode.parse("sync"), 5.0, min_in_sync=2)
        assert not outcome.satisfied
        assert "floor" in (outcome.reason or "")

    asyncio.run(scenario())


def test_ledger_merges_adjacent_ranges_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "degraded.json"
    ledger = DegradationLedger.load(path)
    ledger.record(1, 1, "timeout", 100)
    ledger.record(2, 5, "timeout", 200)
    ledger.record(9, 9, "floor", 300)
    ledger.flush()
    again = DegradationLedger.load(path)
    assert [(r.first_lsn, r.last_lsn, r.writes) for r in again.ranges] == [(1, 5, 2), (9, 9, 1)]
    assert again.degraded_writes == 3
