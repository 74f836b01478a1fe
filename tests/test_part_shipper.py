"""The leader's part queues outlive a follower's link (``replication/physical.py``).

A real store makes the parts (checkpoints, a merge); ``PartShippers`` queues them per
follower node id. What a cut link leaves of a part is sent again from its start, what is
made while the follower is away waits for it, a merge of parts still queued replaces them,
and every part is pinned on disk exactly while some queue holds it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import make_event
from walship.limits import Limits
from walship.replication.metrics import ReplicationMetrics
from walship.replication.physical import OutgoingPart, PartShipper, PartShippers
from walship.replication.protocol import Message, PartChunk, PartEnd, PartStart
from walship.storage.manifest import CheckpointManifest
from walship.storage.parquet import PartInfo
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    limits = Limits(memtable_events_max=10**6, checkpoint_interval_ms=10**9, compaction_fanin_min=4)
    s = Store.open(StoreConfig(tmp_path, fsync=FsyncPolicy.parse("never"), limits=limits))
    yield s
    s.close()


@pytest.fixture
def made(store: Store) -> list[OutgoingPart]:
    """The parts the store makes, as the leader offers them."""
    parts: list[OutgoingPart] = []

    def on_part(
        kind: str, info: PartInfo, replaces: list[PartInfo], manifest: CheckpointManifest
    ) -> None:
        parts.append(OutgoingPart.of(kind, info, replaces, manifest))

    store.on_part = on_part
    return parts


def checkpoints(store: Store, count: int) -> None:
    for _ in range(count):
        store.append_batch([make_event(f"e{i % 3}") for i in range(20)])
        assert store.checkpoint() is not None


def drain(shipper: PartShipper, store: Store) -> list[Message]:
    """Every frame the shipper has for a follower that acked the whole log."""
    out: list[Message] = []
    while (msg := asyncio.run(shipper.next_message(store.wal.written_lsn.value))) is not None:
        out.append(msg)
    return out


def shipped_files(frames: list[Message]) -> list[str]:
    return [m.file for m in frames if isinstance(m, PartEnd)]


def test_a_part_cut_off_by_the_links_end_is_sent_again_from_its_start(
    store: Store, made: list[OutgoingPart]
) -> None:
    shippers = PartShippers(store, ReplicationMetrics(CollectorRegistry()))
    first = shippers.attach("f1")
    checkpoints(store, 1)
    shippers.offer(made[0])
    lsn = store.wal.written_lsn.value
    assert isinstance(asyncio.run(first.next_message(lsn)), PartStart)
    assert isinstance(asyncio.run(first.next_message(lsn)), PartChunk)
    shippers.detach(first)  # the link ended mid-part
    assert store.core.pins == {made[0].info.file: 1}  # still pinned for the follower
    again = shippers.attach("f1")
    frames = drain(again, store)
    assert isinstance(frames[0], PartStart)
    chunks = [m for m in frames if isinstance(m, PartChunk)]
    assert chunks[0].offset == 0
    assert b"".join(c.data for c in chunks) == (store.parts_dir / made[0].info.file).read_bytes()
    assert shipped_files(frames) == [made[0].info.file]
    assert store.core.pins == {}


def test_parts_made_while_a_follower_is_away_wait_for_it_and_a_new_link_takes_over(
    store: Store, made: list[OutgoingPart]
) -> None:
    """Parts offered while no link is attached are shipped, in order, on the next; a link
    that replaces one not closed yet takes its queue, and the old one ships nothing more."""
    shippers = PartShippers(store, ReplicationMetrics(CollectorRegistry()))
    shippers.detach(shippers.attach("f1"))
    checkpoints(store, 2)
    for part in made:
        shippers.offer(part)
    old = shippers.attach("f1")
    assert isinstance(asyncio.run(old.next_message(store.wal.written_lsn.value)), PartStart)
    new = shippers.attach("f1")  # reconnected before the old link was closed
    assert asyncio.run(old.next_message(store.wal.written_lsn.value)) is None
    shippers.detach(old)
    assert shipped_files(drain(new, store)) == [p.info.file for p in made]
    assert store.core.pins == {}


def test_a_merge_of_parts_still_queued_replaces_them_and_lets_them_go(
    store: Store, made: list[OutgoingPart]
) -> None:
    shippers = PartShippers(store, ReplicationMetrics(CollectorRegistry()))
    away = shippers.attach("away")  # got none of them
    shippers.detach(away)
    checkpoints(store, 4)
    for part in made:
        shippers.offer(part)
    sent = shippers.attach("sent")  # attached after the first one was shipped
    sent.offer(made[0])
    assert shipped_files(drain(sent, store)) == [made[0].info.file]
    for part in made[1:]:
        sent.offer(part)
    deadline = time.monotonic() + 30
    while made[-1].kind != "merge":  # the store's compactor, or this call, merges the four
        store.compact()
        assert time.monotonic() < deadline, "no merge"
        time.sleep(0.01)
    merge = made[-1]
    assert merge.kind == "merge" and len(merge.replaces) == 4
    shippers.offer(merge)
    # the follower away gets the merged part alone, as a checkpoint at the inputs' end
    queued = list(shippers._by_node["away"].queue)
    assert [(p.kind, p.info) for p in queued] == [("checkpoint", merge.info)]
    assert (queued[0].last_term, queued[0].chain) == (made[3].last_term, made[3].chain)
    # the other holds the first input already: it gets the other three, then the merge
    assert [p.kind for p in sent.queue] == ["checkpoint"] * 3 + ["merge"]
    shippers.forget("away")
    shippers.close()
    assert store.core.pins == {}


def test_a_snapshot_sent_lets_the_parts_it_holds_go(store: Store, made: list[OutgoingPart]) -> None:
    shippers = PartShippers(store, ReplicationMetrics(CollectorRegistry()))
    shipper = shippers.attach("f1")
    checkpoints(store, 2)
    for part in made:
        shippers.offer(part)
    shipper.drop_through(made[0].info.last_lsn)
    assert [p.info for p in shipper.queue] == [made[1].info]
    assert store.core.pins == {made[1].info.file: 1}
