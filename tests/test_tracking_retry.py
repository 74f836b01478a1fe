"""A tracked batch sent again after it was stored (its answer lost) is answered, not refused.

The clients send a write again with the same event ids when its answer is lost (a cut
connection, a failover); with tracking in the batch, the second send met the consumer at the
position it carries and was refused with 409 ``tracking_conflict``: a write that was stored
looked failed (an ``eventsourcing`` process application saw an IntegrityError). The same batch
sent again is now answered with its original receipts; anything else at that position is still
refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from walship import Client, EventIn, RetryPolicy, Store, StoreConfig
from walship.cli.process import NodeProcess
from walship.errors import TrackingConflict
from walship.events import TrackingIn
from walship.storage.query import QueryFilter
from walship.testing.proxy import FaultProxy
from walship.wal import FsyncPolicy


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(StoreConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never")))
    try:
        yield s
    finally:
        s.close()


def _events(n: int, entity: str = "order-1") -> list[EventIn]:
    return [
        EventIn(entity, "order.noted", msgspec.Raw(b'{"n": %d}' % i), id=uuid.uuid4())
        for i in range(n)
    ]


def test_the_same_tracked_batch_again_gets_its_original_receipts(store: Store) -> None:
    batch = _events(3)
    tracking = TrackingIn("upstream", 7)
    first = store.append_batch(batch, tracking=tracking)
    again = store.append_batch(batch, tracking=tracking)
    assert [(r.lsn, r.position, r.version) for r in again] == [
        (r.lsn, r.position, r.version) for r in first
    ]
    assert all(r.duplicate for r in again)
    assert len(store.query(QueryFilter(tenant_id="default"), 100).events) == 3
    found = store.consumer_position("default", "upstream")
    assert found is not None and found.position == 7


def test_other_batches_at_a_tracked_position_are_still_refused(store: Store) -> None:
    batch = _events(2)
    store.append_batch(batch, tracking=TrackingIn("upstream", 7))
    with pytest.raises(TrackingConflict):  # new events at the same position
        store.append_batch(_events(1), tracking=TrackingIn("upstream", 7))
    with pytest.raises(TrackingConflict):  # the stored events with another batch's position
        store.append_batch(batch[:1], tracking=TrackingIn("upstream", 7))
    with pytest.raises(TrackingConflict):  # a position only (nothing tells it is a retry)
        store.append_batch([], tracking=TrackingIn("upstream", 7))
    store.append_batch(_events(1), tracking=TrackingIn("upstream", 9))
    with pytest.raises(TrackingConflict):  # the first batch again, once the consumer moved on
        store.append_batch(batch, tracking=TrackingIn("upstream", 7))
    assert len(store.query(QueryFilter(tenant_id="default"), 100).events) == 3


def test_a_tracked_batch_whose_answer_is_lost_is_sent_again_and_answered(
    tmp_path: Path,
) -> None:
    with NodeProcess(tmp_path / "node", fsync="never").start() as node:
        host, port = node.url.removeprefix("http://").rsplit(":", 1)
        with FaultProxy((host, int(port))) as proxy:
            url = f"http://127.0.0.1:{proxy.port}"
            policy = RetryPolicy(attempts_max=5, deadline_s=30)
            with Client(url, retry=policy) as client:
                proxy.cut_next_answers(1)  # stored, its answer lost: the client sends it again
                events = [
                    {"entity_id": "order-1", "event_type": "order.noted", "payload": {"n": 1}}
                ]
                tracking = {"consumer": "upstream", "position": 3, "tenant_id": "default"}
                answer = client.append_batch(events, tracking=tracking)
                assert answer.receipts[0].position == 1
                assert proxy.state.dropped_connections == 1
                assert client.consumer_position("upstream").position == 3
                assert client.query(tenant_id="default").count == 1
