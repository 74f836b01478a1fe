"""A deposed leader rejoining through a snapshot: its tail goes to lost-and-found first.

The new leader took term 2 at lsn 101, went on writing and checkpointed; its WAL below the old
leader's position is gone, so only its term history (which outlives the WAL) can tell that the
old leader's records 101..110 of term 1 are not on its log. Both ends use it: the leader
answers ``Diverged`` rather than offering a snapshot, and the follower checks a snapshot's
term history before installing it (for a leader that offers one anyway). In-process stores
and real TCP; ``test_failover.py`` plays the same with real processes.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from walship.errors import StaleTerm
from walship.events import to_out
from walship.limits import Limits
from walship.position import Term
from walship.replication.acks import AckHistory, DegradationLedger
from walship.replication.config import ReplicationConfig
from walship.replication.follower import Follower
from walship.replication.leader import Leader
from walship.replication.lostfound import find_files, read_file
from walship.replication.metrics import ReplicationMetrics
from walship.replication.protocol import Diverged, Subscribe
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy
from walship.wal.record import GENESIS_CHAIN

from .conftest import make_event

SECRET = b"s3cret"
LIMITS = Limits(
    segment_bytes_max=4096,
    frame_bytes_max=16 * 1024,
    record_bytes_max=8 * 1024,
    heartbeat_interval_ms=100,
    read_timeout_ms=3_000,
)
TIMEOUT_S = 15.0
SHARED, TAIL, NEW = 100, 10, 300


def open_store(path: Path, node_id: str) -> Store:
    return Store.open(
        StoreConfig(
            path,
            node_id=node_id,
            fsync=FsyncPolicy.parse("never"),
            limits=LIMITS,
            checkpoints=False,
        )
    )


def write(store: Store, count: int, start: int) -> None:
    store.append_batch(
        [
            make_event(f"acct-{i % 7}", payload={"i": i, "pad": "x" * 40})
            for i in range(start, start + count)
        ]
    )


def deposed_and_new(tmp_path: Path) -> tuple[Store, Store]:
    """``old`` led term 1: lsns 1..100 answered ``replicated``, then 101..110 ``degraded``
    while cut off. ``new`` held 1..100, took term 2 at 101, wrote 101..400 and checkpointed
    them: its WAL no longer reaches back to lsn 110."""
    old = open_store(tmp_path / "old", "old")
    write(old, SHARED, 0)
    old.close()
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    old = open_store(tmp_path / "old", "old")
    write(old, TAIL, SHARED)
    repl = tmp_path / "old" / "replication"
    acks = AckHistory(repl / "acks.json")
    acks.led(1)
    acks.replicated(1, SHARED)
    acks.flush()
    ledger = DegradationLedger.load(repl / "degraded.json")
    ledger.record(SHARED + 1, SHARED + TAIL, "no follower confirmed in time", 1)
    ledger.flush()

    new = open_store(tmp_path / "new", "new")
    new.wal.begin_term(Term(2))
    for start in range(SHARED, SHARED + NEW, 20):
        write(new, 20, 10_000 + start)
    assert new.checkpoint() is not None
    assert new.wal.first_lsn().value > SHARED + TAIL + 1, "the WAL at lsn 110 should be gone"
    assert new.wal.terms.to_list() == [(1, 1), (2, SHARED + 1)]
    return old, new


async def eventually(check: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def make_leader(store: Store) -> Leader:
    config = ReplicationConfig(secret=SECRET, port=0)
    return Leader(store, config, ReplicationMetrics(store.metrics.registry))


def test_leader_judges_a_position_it_no_longer_holds_by_its_term_history(tmp_path: Path) -> None:
    old, new = deposed_and_new(tmp_path)
    leader = make_leader(new)
    try:
        tail = old.wal.last_position
        decision = leader.locate(Subscribe.at(tail, old.wal.last_chain))
        assert isinstance(decision, Diverged), "a snapshot would drop lsns 101..110 untraced"
        assert (decision.common_term, decision.common_lsn) == (1, SHARED)
        assert "term history" in decision.reason
        # below the WAL start but on the history: a snapshot replaces it, nothing is lost
        assert leader.locate(Subscribe(term=1, lsn=SHARED, chain=GENESIS_CHAIN)) is None
        assert leader.locate(Subscribe(term=2, lsn=SHARED + 50, chain=GENESIS_CHAIN)) is None
        # a term this history never had at that lsn, or a newer one than the leader's
        wrong = leader.locate(Subscribe(term=1, lsn=SHARED + 50, chain=GENESIS_CHAIN))
        assert isinstance(wrong, Diverged) and wrong.common_lsn == SHARED
        with pytest.raises(StaleTerm):
            leader.locate(Subscribe(term=3, lsn=SHARED + 50, chain=GENESIS_CHAIN))
    finally:
        old.close()
        new.close()


class LeaderOfAnEarlierRelease(Leader):
    """Offers a snapshot for any position it can no longer read, without a term check (as
    walship did before): the follower must protect its own tail by itself."""

    def locate(self, sub: Subscribe) -> int | Diverged | None:
        first = self.store.wal.first_lsn().value
        if 0 < sub.lsn < first - 1 and sub.lsn != self.store.manifest.last_lsn:
            return None
        return super().locate(sub)


@pytest.mark.parametrize(
    "leader_class", [Leader, LeaderOfAnEarlierRelease], ids=["leader", "old-leader"]
)
def test_deposed_leader_rejoining_through_a_snapshot_keeps_its_tail_in_lost_and_found(
    tmp_path: Path, leader_class: type[Leader]
) -> None:
    async def scenario() -> None:
        old, new = deposed_and_new(tmp_path)
        tail = old.query(QueryFilter(from_lsn=SHARED + 1), 100).events
        tail_ids = [to_out(e).id for e in tail]
        config = ReplicationConfig(secret=SECRET, port=0)
        leader = leader_class(new, config, ReplicationMetrics(new.metrics.registry))
        await leader.start()
        assert leader.port is not None
        follower = Follower(
            old,
            ReplicationConfig(
                secret=SECRET,
                leader=f"127.0.0.1:{leader.port}",
                reconnect_backoff_min_ms=10,
                reconnect_backoff_max_ms=100,
            ),
            ReplicationMetrics(old.metrics.registry),
            "old",
        )
        try:
            await follower.start()
            await follower.wait_applied(new.wal.written_lsn.value, TIMEOUT_S)
            # reads see the snapshot as soon as it is installed, a moment before it is counted
            await eventually(lambda: follower.snapshots_received == 1)
            assert follower.repairs == 1
            repair = follower.last_repair
            assert repair is not None
            assert (repair["kept_lsn"], repair["cut_records"]) == (SHARED, TAIL)
            (path,) = find_files(old.data_dir)
            cut = list(read_file(path))
            assert [r.lsn for r in cut] == list(range(SHARED + 1, SHARED + TAIL + 1))
            assert {r.term for r in cut} == {1}
            assert {r.acknowledged for r in cut} == {"degraded"}
            assert [msgspec.json.decode(r.event)["id"] for r in cut] == tail_ids
            assert old.wal.last_position == new.wal.last_position
            assert old.manifest == new.manifest
        finally:
            await follower.stop()
            await leader.stop()
            old.close()
            new.close()

    asyncio.run(asyncio.wait_for(scenario(), 40))
