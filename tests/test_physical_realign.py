"""A physical follower that checkpointed itself comes back to the leader's layout.

Two real stores in one process (as in ``test_part_adopt.py``): the follower gets the leader's
WAL records, checkpoints some of them itself (its fallback, ``storage/fallback.py``), and then
receives the leader's part over that range through ``PartReceiver.install``. The part is held
and goes in place of the follower's own parts once they span its range
(``storage/realign.py``); a part that fails verification is not held. Where the layout left
the leader's for good, the follower merges its own parts (``follower_may_merge``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.test_part_adopt import all_events, ship_wal, staged_copy, write
from walship.limits import Limits
from walship.position import Lsn
from walship.replication.metrics import ReplicationMetrics
from walship.replication.physical import IncomingPart, PartReceiver
from walship.storage import realign
from walship.storage.compaction import pick_run
from walship.storage.fallback import FallbackThreshold
from walship.storage.parquet import PartInfo
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy


def open_store(path: Path) -> Store:
    # no background checkpoints: the test decides when parts are made; fan-in 4 for merges
    limits = Limits(memtable_events_max=10**6, checkpoint_interval_ms=10**9, compaction_fanin_min=4)
    return Store.open(StoreConfig(path, fsync=FsyncPolicy.parse("never"), limits=limits))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    leader, follower = open_store(tmp_path / "leader"), open_store(tmp_path / "follower")
    follower.parts_from_leader = True  # as while a leader ships its parts
    yield leader, follower
    follower.close()
    leader.close()


def incoming(leader: Store, info: PartInfo, where: Path, flip: bool = False) -> IncomingPart:
    """The leader's checkpoint part ``info`` as the receiver has it once PartEnd came."""
    path = staged_copy(leader, info, where, flip)
    record = next(iter(leader.wal.read_from(Lsn(info.last_lsn))))  # the chain there
    hasher = hashlib.sha256(path.read_bytes())
    return IncomingPart(
        "checkpoint", info, [], record.term, record.chain, [], path, info.bytes, hasher
    )


def files(store: Store) -> list[str]:
    return [p.file for p in store.manifest.parts]


def test_a_follower_that_checkpointed_itself_takes_the_leaders_parts_in_place_of_its_own(
    pair: tuple[Store, Store], tmp_path: Path
) -> None:
    """The follower checkpoints lsn 1..20 itself before the leader's part over 1..30 comes:
    that part is held, the follower checkpoints 21..30 from its own WAL, and then the
    leader's part replaces both of its own -- the same bytes as the leader's. The next part
    is appended as usual."""
    leader, follower = pair
    receiver = PartReceiver(follower, ReplicationMetrics(CollectorRegistry()))
    write(leader, 0, 20)
    ship_wal(leader, follower)
    assert follower.checkpoint() is not None  # the fallback: lsn 1..20, its own
    write(leader, 20, 10)
    ship_wal(leader, follower)
    first = leader.checkpoint()
    assert first is not None and (first.first_lsn, first.last_lsn) == (1, 30)

    assert receiver.install(incoming(leader, first, tmp_path / "in")) is False
    assert files(follower) == files(leader) == [first.file]
    assert (follower.parts_dir / first.file).read_bytes() == (
        leader.parts_dir / first.file
    ).read_bytes()
    assert follower.parquet_encodes == 2  # its own two, both replaced
    assert follower.core.own_parts == set()
    status = receiver.status()
    assert (status["skipped"], status["refused"], status["held"], status["realigned"]) == (
        1,
        0,
        0,
        2,
    )
    assert follower.core.fallback.late_parts == 1
    assert all_events(follower) == all_events(leader) == list(range(1, 31))
    # its own files went, nothing is left held
    assert sorted(p.name for p in follower.parts_dir.iterdir()) == [first.file]
    assert list(receiver.held.directory.iterdir()) == []

    write(leader, 30, 10)
    ship_wal(leader, follower)
    second = leader.checkpoint()
    assert second is not None
    assert receiver.install(incoming(leader, second, tmp_path / "in")) is True
    assert files(follower) == files(leader)
    assert follower.parquet_encodes == 2


def test_parts_late_twice_in_a_row_are_held_until_the_followers_parts_line_up(
    pair: tuple[Store, Store], tmp_path: Path
) -> None:
    """Two leader parts both overlap the follower's own checkpoints: both are held, and go
    in together for its three own parts once those end where the second ends."""
    leader, follower = pair
    receiver = PartReceiver(follower, ReplicationMetrics(CollectorRegistry()))
    write(leader, 0, 25)
    ship_wal(leader, follower)
    a = leader.checkpoint()  # 1..25, not shipped yet
    write(leader, 25, 25)
    ship_wal(leader, follower)
    assert follower.checkpoint() is not None  # its own: 1..50
    b = leader.checkpoint()  # 26..50
    write(leader, 50, 20)
    ship_wal(leader, follower)
    assert follower.checkpoint() is not None  # its own: 51..70
    write(leader, 70, 10)
    ship_wal(leader, follower)
    c = leader.checkpoint()  # 51..80
    assert a is not None and b is not None and c is not None
    assert receiver.install(incoming(leader, a, tmp_path / "in")) is False
    assert receiver.install(incoming(leader, b, tmp_path / "in")) is False
    # 1..50 is one part of its own: the two held parts span it exactly
    assert files(follower)[:2] == [a.file, b.file]
    assert receiver.install(incoming(leader, c, tmp_path / "in")) is False
    assert files(follower) == files(leader) == [a.file, b.file, c.file]
    assert all_events(follower) == list(range(1, 81))
    merged = leader.compact()  # fan-in 4 is not reached: nothing to merge yet
    assert merged is None


def test_a_held_part_is_verified_like_any_other(pair: tuple[Store, Store], tmp_path: Path) -> None:
    """A leader's part that came late and fails its sha256 is refused, not held: the
    follower keeps its own parts."""
    leader, follower = pair
    receiver = PartReceiver(follower, ReplicationMetrics(CollectorRegistry()))
    write(leader, 0, 20)
    ship_wal(leader, follower)
    own = follower.checkpoint()
    write(leader, 20, 10)
    ship_wal(leader, follower)
    part = leader.checkpoint()
    assert own is not None and part is not None
    assert receiver.install(incoming(leader, part, tmp_path / "in", flip=True)) is False
    status = receiver.status()
    assert status["refused"] == 1 and "sha256" in status["last_refusal"]
    assert status["held"] == 0
    assert files(follower)[0] == own.file and len(files(follower)) == 2
    assert all_events(follower) == list(range(1, 31))


def test_a_follower_merges_its_own_parts_once_the_leaders_parts_cannot_replace_them(
    pair: tuple[Store, Store], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four parts installed from the leader are left to the leader's merge, and four of the
    follower's own wait while the leader's part over them may still come; once it came and
    could not be held (none may be, here), the follower merges them with its own compaction,
    as far as the store's policy goes."""
    monkeypatch.setattr(realign, "HELD_PARTS_MAX", 0)
    leader, follower = pair
    receiver = PartReceiver(follower, ReplicationMetrics(CollectorRegistry()))
    for k in range(4):
        write(leader, 10 * k, 10)
        ship_wal(leader, follower)
        part = leader.checkpoint()
        assert part is not None
        assert receiver.install(incoming(leader, part, tmp_path / "in")) is True
    assert follower.compact() is None  # the leader's merge of them is on its way
    assert not follower.parts.may_compact()
    for k in range(4, 8):
        write(leader, 10 * k, 10)
        ship_wal(leader, follower)
        assert follower.checkpoint() is not None  # fallbacks: its own
    assert follower.parts.may_compact()
    # the leader's part over them may still line up: nothing merged (nor by its thread)
    assert follower.compact() is None and follower.compactions == 0
    late = leader.checkpoint()  # 41..80, after the follower's own
    assert late is not None
    assert receiver.install(incoming(leader, late, tmp_path / "in")) is False
    assert receiver.status()["held"] == 0 and follower.core.own_merges_through == 80
    while follower.compact() is not None:  # (or its compactor thread, woken by them)
        pass
    limits = follower.limits
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pick_run(
        follower.manifest.parts, limits.compaction_fanin_min, limits.compaction_events_max
    ):
        time.sleep(0.05)
    # the runs pick_run chose held parts of its own: merged here, until the policy is done
    assert follower.compactions >= 1
    assert len(follower.manifest.parts) < 8
    parts = follower.manifest.parts
    assert pick_run(parts, limits.compaction_fanin_min, limits.compaction_events_max) is None
    assert all_events(follower) == list(range(1, 81))


def test_the_fallback_threshold_follows_when_the_leaders_parts_come() -> None:
    limits = Limits(physical_fallback_percent=150, physical_fallback_percent_max=300)
    threshold = FallbackThreshold(limits)
    assert threshold.percent == 150
    threshold.part_in_time(100)  # in time with room to spare: stays at the base
    assert threshold.percent == 150
    threshold.part_in_time(140)  # close: a quarter's headroom over what it held
    assert threshold.percent == 175
    threshold.part_late()
    assert threshold.percent == 262.5 and threshold.late_parts == 1
    threshold.part_late()
    assert threshold.percent == 300  # the memory bound
    for _ in range(100):
        threshold.part_in_time(100)
    assert threshold.percent == 150  # back to the base, slowly
    with pytest.raises(Exception, match="physical_fallback_percent"):
        Limits(physical_fallback_percent=400)


def test_held_parts_are_bounded_and_go_with_the_link(
    pair: tuple[Store, Store], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``HELD_PARTS_MAX`` the oldest held part goes (the follower keeps its own parts
    there, merged by its own compaction); the rest go when the link ends."""
    monkeypatch.setattr(realign, "HELD_PARTS_MAX", 1)
    leader, follower = pair
    receiver = PartReceiver(follower, ReplicationMetrics(CollectorRegistry()))
    write(leader, 0, 5)
    ship_wal(leader, follower)
    a = leader.checkpoint()  # 1..5
    write(leader, 5, 5)
    ship_wal(leader, follower)
    b = leader.checkpoint()  # 6..10
    write(leader, 10, 5)
    ship_wal(leader, follower)
    assert follower.checkpoint() is not None  # its own: 1..15
    assert a is not None and b is not None
    assert receiver.install(incoming(leader, a, tmp_path / "in")) is False
    assert receiver.status()["held"] == 1  # its own part begins where it does: may line up
    assert receiver.install(incoming(leader, b, tmp_path / "in")) is False
    # one may be held: the older went, and 6..10 alone can never line up with 1..15
    assert receiver.status()["held"] == 0 and receiver.held.dropped == 2
    assert files(follower) == [f"{1:016x}-{15:016x}.parquet"]
    write(leader, 15, 5)
    ship_wal(leader, follower)
    c = leader.checkpoint()  # 11..20: held until its own parts end at 20
    assert c is not None
    assert receiver.install(incoming(leader, c, tmp_path / "in")) is False
    assert receiver.status()["held"] == 0  # 11 is inside its own 1..15
    assert all_events(follower) == list(range(1, 21))
    receiver.close()
    assert not receiver.held.directory.exists()


def test_a_follower_keeps_the_wal_a_late_part_is_checked_against(tmp_path: Path) -> None:
    """The follower's own checkpoint would remove the WAL segment holding the record at the
    late part's last lsn (small segments here), and without that record the part could not
    be verified and held. A physical follower keeps its WAL past the leader's parts received,
    so both late parts are held and replace its own part."""
    limits = Limits(
        memtable_events_max=10**6, checkpoint_interval_ms=10**9, segment_bytes_max=64 << 10
    )
    config = {"fsync": FsyncPolicy.parse("never"), "limits": limits}
    with (
        Store.open(StoreConfig(tmp_path / "leader", **config)) as leader,  # type: ignore[arg-type]
        Store.open(StoreConfig(tmp_path / "follower", **config)) as follower,  # type: ignore[arg-type]
    ):
        leader.set_retention_floor(lambda: 1)  # its WAL gives the test the chain at each lsn
        follower.parts_from_leader = True
        receiver = PartReceiver(follower, ReplicationMetrics(CollectorRegistry()))
        write(leader, 0, 20)
        a = leader.checkpoint()  # 1..20
        for k in range(10):
            write(leader, 20 + 100 * k, 100)
        ship_wal(leader, follower)
        assert follower.checkpoint() is not None  # its own: 1..1020
        b = leader.checkpoint()  # 21..1020
        assert a is not None and b is not None
        assert follower.wal.first_lsn().value <= a.last_lsn  # kept for the late part
        assert receiver.install(incoming(leader, a, tmp_path / "in")) is False
        assert receiver.status()["held"] == 1
        assert receiver.install(incoming(leader, b, tmp_path / "in")) is False
        assert files(follower) == files(leader) == [a.file, b.file]
        assert follower.stats()["parquet_events"] == 1020 and all_events(follower)[0] == 1
        receiver.close()
