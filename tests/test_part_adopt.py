"""A follower's store takes the leader's parts only when they match its own WAL.

Two real stores in one process: the follower gets the leader's WAL records (as replication
would give them) and then the leader's part files; ``storage/adopt.py`` installs them or
refuses them, and a refused range is checkpointed from the follower's own memtable.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from tests.conftest import make_event
from walship.limits import Limits
from walship.position import Lsn
from walship.storage.adopt import adopt_checkpoint, adopt_merge
from walship.storage.parquet import PartInfo
from walship.storage.part_verify import PartRejected
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy
from walship.wal.frame import verify_frame
from walship.wal.record import GENESIS_CHAIN


def open_store(path: Path) -> Store:
    # no background checkpoints: the test decides when parts are made
    limits = Limits(memtable_events_max=10**6, checkpoint_interval_ms=10**9)
    return Store.open(StoreConfig(path, fsync=FsyncPolicy.parse("never"), limits=limits))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    leader, follower = open_store(tmp_path / "leader"), open_store(tmp_path / "follower")
    yield leader, follower
    follower.close()
    leader.close()


def ship_wal(leader: Store, follower: Store) -> None:
    """Give the follower the leader's records after its own end, as replication does."""
    end = follower.wal.last_position
    records = list(leader.wal.read_from(end.lsn.value + 1))
    if not records:
        return
    chain = follower.wal.last_chain if end.lsn.value else GENESIS_CHAIN
    frame = verify_frame(
        b"".join(r.raw for r in records),
        end.lsn.value,
        end.term.value,
        chain,
        leader.wal.terms.current.value,
        1 << 20,
    )
    follower.apply_frame(frame).result()


def staged_copy(leader: Store, info: PartInfo, where: Path, flip: bool = False) -> Path:
    where.mkdir(exist_ok=True)
    path = where / info.file
    shutil.copyfile(leader.parts_dir / info.file, path)
    if flip:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    return path


def adopt(leader: Store, follower: Store, info: PartInfo, staged: Path) -> None:
    m = leader.manifest
    digest = hashlib.sha256(staged.read_bytes()).digest()
    adopt_checkpoint(follower, staged, info, m.last_term, m.chain_bytes, m.consumers, digest)


def all_events(store: Store) -> list[int]:
    return [ev.lsn for ev in store.query(QueryFilter(), limit=1000).events]


def write(store: Store, start: int, count: int) -> None:
    store.append_batch([make_event(f"e{i % 5}") for i in range(start, start + count)])


def test_adopted_parts_are_the_leaders_bytes_and_merges_swap_the_same_inputs(
    pair: tuple[Store, Store], tmp_path: Path
) -> None:
    leader, follower = pair
    infos = []
    for k in range(3):
        write(leader, 10 * k, 10)
        ship_wal(leader, follower)
        part = leader.checkpoint()
        assert part is not None
        infos.append(part)
        adopt(leader, follower, part, staged_copy(leader, part, tmp_path / "in"))
    assert follower.manifest.parts == leader.manifest.parts
    assert follower.parquet_encodes == 0 and follower.parts_adopted == 3
    assert follower.stats()["memtable_events"] == 0
    for info in infos:
        assert (follower.parts_dir / info.file).read_bytes() == (
            leader.parts_dir / info.file
        ).read_bytes()
    assert all_events(follower) == all_events(leader) == list(range(1, 31))

    merged = leader.compact()
    assert merged is None  # too few parts for the default fan-in: merge by hand below
    from walship.storage.compaction import merge_parts

    merged, _ = merge_parts(leader.parts_dir, leader.core.parts, 1024)
    staged = staged_copy(leader, merged, tmp_path / "in")
    digest = hashlib.sha256(staged.read_bytes()).digest()
    # a merge of a range its parts do not end at is refused, and nothing changes
    short = msgspec.structs.replace(merged, last_lsn=25)
    with pytest.raises(PartRejected, match="do not line up"):
        adopt_merge(follower, staged, short, infos, digest)
    adopt_merge(follower, staged, merged, infos, digest)
    assert follower.manifest.parts == [merged]
    assert all_events(follower) == list(range(1, 31))


def test_a_part_that_does_not_match_is_refused_and_nothing_changes(
    pair: tuple[Store, Store], tmp_path: Path
) -> None:
    leader, follower = pair
    write(leader, 0, 10)
    ship_wal(leader, follower)
    part = leader.checkpoint()
    assert part is not None
    before = follower.manifest
    flipped = staged_copy(leader, part, tmp_path / "bad", flip=True)
    with pytest.raises(PartRejected, match="sha256"):
        adopt(leader, follower, part, flipped)
    # right bytes, but the follower's log is another history at the part's last lsn
    m = leader.manifest
    good = staged_copy(leader, part, tmp_path / "good")
    digest = hashlib.sha256(good.read_bytes()).digest()
    with pytest.raises(PartRejected, match="another history"):
        adopt_checkpoint(follower, good, part, m.last_term, b"x" * 8, m.consumers, digest)
    # a part claiming one row fewer than the follower holds there
    lying = PartInfo(**{**{f: getattr(part, f) for f in part.__struct_fields__}, "events": 9})
    with pytest.raises(PartRejected, match="rows"):
        adopt_checkpoint(follower, good, lying, m.last_term, m.chain_bytes, m.consumers, digest)
    assert follower.manifest == before and follower.parts_adopted == 0
    # the refused range, rebuilt from the follower's own memtable, lines up with the leader's
    write(leader, 10, 10)
    ship_wal(leader, follower)
    assert follower.checkpoint_through(Lsn(part.last_lsn)) is not None
    assert follower.manifest.last_lsn == part.last_lsn
    assert follower.stats()["memtable_events"] == 10
    nxt = leader.checkpoint()
    assert nxt is not None
    adopt(leader, follower, nxt, staged_copy(leader, nxt, tmp_path / "next"))
    assert [p.file for p in follower.manifest.parts] == [p.file for p in leader.manifest.parts]
    assert follower.parquet_encodes == 1 and follower.parts_adopted == 1


def test_a_read_view_taken_before_an_install_still_sees_every_event(
    pair: tuple[Store, Store], tmp_path: Path
) -> None:
    """An install swaps in new memtables and leaves the old ones alone: a read that took its
    view before (parts before the install, the old memtable) still finds every event."""
    leader, follower = pair
    write(leader, 0, 10)
    part = leader.checkpoint()
    assert part is not None
    write(leader, 10, 5)
    ship_wal(leader, follower)
    view = follower.read_view()
    adopt(leader, follower, part, staged_copy(leader, part, tmp_path / "in"))
    in_memory = sorted(lsn for m in view.memtables for lsn in m.lsn_array().tolist())
    assert not view.parts and in_memory == list(range(1, 16))
    write(leader, 15, 5)
    ship_wal(leader, follower)
    assert follower.checkpoint_through(Lsn(17)) is not None
    assert sorted(lsn for m in view.memtables for lsn in m.lsn_array().tolist()) == list(
        range(1, 16)
    )
    assert all_events(follower) == list(range(1, 21))


def test_a_merge_goes_in_for_the_followers_own_parts_when_they_span_its_range(
    pair: tuple[Store, Store], tmp_path: Path
) -> None:
    """The follower checkpointed 1..30 itself, at other boundaries than the leader (a
    fallback): the leader's merge of its three parts there replaces the follower's two, its
    rows being at exactly their lsns; a merged part whose events are not the follower's
    count there is refused."""
    leader, follower = pair
    infos = []
    for k in range(3):
        write(leader, 10 * k, 10)
        part = leader.checkpoint()
        assert part is not None
        infos.append(part)
    ship_wal(leader, follower)
    assert follower.checkpoint_through(Lsn(15)) is not None
    assert follower.checkpoint_through(Lsn(30)) is not None
    own = follower.manifest.parts
    assert [(p.first_lsn, p.last_lsn) for p in own] == [(1, 15), (16, 30)]
    from walship.storage.compaction import merge_parts

    merged, _ = merge_parts(leader.parts_dir, leader.core.parts, 1024)
    staged = staged_copy(leader, merged, tmp_path / "in")
    digest = hashlib.sha256(staged.read_bytes()).digest()
    fewer = msgspec.structs.replace(merged, events=29)
    with pytest.raises(PartRejected, match="29 events"):
        adopt_merge(follower, staged, fewer, infos, digest)
    assert follower.manifest.parts == own
    adopt_merge(follower, staged, merged, infos, digest)
    assert follower.manifest.parts == [merged]
    assert (follower.parts_dir / merged.file).read_bytes() == (
        leader.parts_dir / merged.file
    ).read_bytes()
    assert not any((follower.parts_dir / p.file).exists() for p in own)
    assert all_events(follower) == list(range(1, 31))
