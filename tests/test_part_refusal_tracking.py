"""A physical follower that refused a leader's part rebuilds exactly that range from its own
WAL, also while consumers keep tracking after it, so that the leader's next part lines up.

Found by ``scripts/fault_probe.py`` (seeds 12 and 18, ``--physical-followers`` with batches
carrying ``tracking``): once one part was refused, the follower checkpointed its whole
memtable instead of the part's range whenever a tracking record came after it, so every
later part was refused too and the follower encoded all its own parts from then on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_event
from tests.test_part_adopt import adopt, open_store, ship_wal, staged_copy
from walship.events import TrackingIn
from walship.position import Lsn
from walship.storage.consumers import ConsumerPosition
from walship.store import Store


def append(store: Store, first: int, count: int, tracking: int | None = None) -> None:
    track = None if tracking is None else TrackingIn(consumer="proj", position=tracking)
    pending = store.submit(
        [make_event(f"e{i % 3}") for i in range(first, first + count)], tracking=track
    )
    if pending.done is not None:
        pending.done.result()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    leader, follower = open_store(tmp_path / "leader"), open_store(tmp_path / "follower")
    yield leader, follower
    follower.close()
    leader.close()


def test_a_refused_range_is_rebuilt_exactly_while_consumers_track_after_it(
    pair: tuple[Store, Store], tmp_path: Path
) -> None:
    leader, follower = pair
    append(leader, 0, 5, tracking=1)  # lsn 1-6: the tracking record is lsn 6
    part = leader.checkpoint()
    assert part is not None and part.last_lsn == 6
    append(leader, 5, 4, tracking=2)  # lsn 7-11
    append(leader, 9, 3, tracking=3)  # lsn 12-15
    ship_wal(leader, follower)

    # the follower refused the leader's part 1-6: it rebuilds lsn 1-6 from its own WAL
    rebuilt = follower.checkpoint_through(Lsn(part.last_lsn))
    assert rebuilt is not None
    assert (rebuilt.first_lsn, rebuilt.last_lsn) == (1, 6)
    assert follower.manifest.last_lsn == 6
    # the consumer table of that checkpoint is the one as of lsn 6, not the latest
    assert follower.manifest.consumers == [ConsumerPosition("default", "proj", 1, 6)]
    assert follower.manifest.consumers == leader.manifest.consumers
    # the rest stays in memory for the leader's next part; the live table is the latest
    assert follower.consumer_position("default", "proj") == ConsumerPosition(
        "default", "proj", 3, 15
    )

    # the leader's next part lines up with what the follower checkpointed
    nxt = leader.checkpoint()
    assert nxt is not None and nxt.first_lsn == follower.manifest.last_lsn + 1
    adopt(leader, follower, nxt, staged_copy(leader, nxt, tmp_path / "in"))
    assert follower.manifest.parts[-1] == nxt
    assert follower.manifest.consumers == leader.manifest.consumers
    follower.close()
    again = open_store(follower.data_dir)
    try:
        assert again.consumer_position("default", "proj") == ConsumerPosition(
            "default", "proj", 3, 15
        )
    finally:
        again.close()
