"""A retry of a stored tracking batch (its answer lost, sent again with the same ids and the
same tracking) is answered as a duplicate, not 409: the original receipts and tracking
receipt, marked ``duplicate``, nothing stored again. Anything else at a position not above
the consumer's stays ``tracking_conflict`` with nothing stored: new ids under an old position
(another worker took the same notification), some ids stored and some not, an id with other
contents. Checked on a store (memtable, Parquet, after a restart) and through real
``walship serve`` nodes: a Client whose answer a proxy cuts, and a Client sent to a follower
that redirects it to the leader."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import Cluster, query_all, replication_address, stats, wait_until
from tests.conftest import make_event
from walship.client import Client
from walship.client_routing import RetryPolicy
from walship.errors import TrackingConflict
from walship.events import EventIn, TrackingIn
from walship.store import Store, StoreConfig
from walship.testing.proxy import FaultProxy
from walship.wal import FsyncPolicy

QUICK = RetryPolicy(attempts_max=40, deadline_s=20, backoff_min_s=0.02, backoff_max_s=0.2)


def new_id() -> str:
    return str(uuid.uuid4())


def track(position: int) -> TrackingIn:
    return TrackingIn(consumer="proj", position=position, tenant_id="t1")


def append(store: Store, events: list[EventIn], tracking: TrackingIn | None = None) -> Any:
    pending = store.submit(events, tracking=tracking)
    for fut in pending.waits_on:
        fut.result()
    if pending.done is not None:
        pending.done.result()
    return pending


def open_store(path: Path) -> Store:
    return Store.open(StoreConfig(path, fsync=FsyncPolicy.parse("never"), checkpoints=False))


def event(event_id: str | None, n: int = 1) -> EventIn:
    given = None if event_id is None else uuid.UUID(event_id)
    return make_event("out", id=given, tenant_id="t1", payload={"n": n})


def check_repeats_and_conflicts(store: Store, ids: list[str], first: Any) -> None:
    """``first``: the answer to storing ``ids`` (plus one event stored before them, ids[0])
    with tracking 5, then an event after it with id ``later``."""
    before = (store.last_position, store.tenant_position("t1"), store.entity_version("out", "t1"))
    again = append(store, [event(i, n) for n, i in enumerate(ids)], track(5))
    assert [(r.event_id, r.lsn, r.version, r.position) for r in again.receipts] == [
        (r.event_id, r.lsn, r.version, r.position) for r in first.receipts
    ]
    assert all(r.duplicate for r in again.receipts)
    assert again.tracking is not None and again.tracking.duplicate
    assert (again.tracking.position, again.tracking.lsn, again.tracking.term) == (
        5,
        first.tracking.lsn,
        first.tracking.term,
    )
    # a tracking-only batch at the stored position is a repeat too
    alone = append(store, [], track(5))
    assert alone.receipts == [] and alone.tracking.duplicate
    assert alone.tracking.lsn == first.tracking.lsn
    later = append(store, [event(new_id(), 9)]).receipts[0]
    before = (store.last_position, store.tenant_position("t1"), store.entity_version("out", "t1"))
    for refused in (
        [event(new_id())],  # new work under an old position: another worker
        [event(i, n) for n, i in enumerate(ids)] + [event(new_id())],  # some stored, some not
        [event(ids[0], 0), event(ids[1], 77)],  # an id with other contents
        [event(None)],  # no id: new work
        [event(later.event_id, 9)],  # stored after the tracking: not of its batch
    ):
        with pytest.raises(TrackingConflict) as conflict:
            append(store, refused, track(5))
        assert conflict.value.details["stored_position"] == 5
    with pytest.raises(TrackingConflict):
        append(store, [event(i, n) for n, i in enumerate(ids)], track(4))  # below: never a repeat
    assert (
        store.last_position,
        store.tenant_position("t1"),
        store.entity_version("out", "t1"),
    ) == before
    assert store.consumer_position("t1", "proj").position == 5  # type: ignore[union-attr]


def test_an_exact_repeat_is_a_duplicate_in_memtable_parquet_and_after_restart(
    tmp_path: Path,
) -> None:
    ids = [new_id() for _ in range(3)]
    with open_store(tmp_path / "d") as store:
        append(store, [event(ids[0], 0)])  # a batch may repeat an event stored before it
        first = append(store, [event(i, n) for n, i in enumerate(ids)], track(5))
        assert first.receipts[0].duplicate and not first.receipts[1].duplicate
        assert first.tracking.lsn == 4
        check_repeats_and_conflicts(store, ids, first)
        assert store.checkpoint() is not None  # every record of the batch now in Parquet
        check_repeats_and_conflicts(store, ids, first)
    with open_store(tmp_path / "d") as store:
        check_repeats_and_conflicts(store, ids, first)
        assert append(store, [], track(6)).tracking.lsn > first.tracking.lsn


# ---------------------------------------------------------------------- real walship serve

ADMIN = {"Authorization": "Bearer adm1n-token-for-tests"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    token = tmp_path / "admin.token"
    token.write_text("adm1n-token-for-tests\n")
    args = ["--admin-token-file", str(token)]
    with Cluster(tmp_path / "c") as c:
        leader = c.start_leader(args=args)
        follower = c.start_follower("f1", replication_address(leader), args=args)
        yield leader, follower


def batch(ids: list[str]) -> list[dict[str, Any]]:
    return [
        {"id": i, "entity_id": "out", "event_type": "t", "payload": n, "tenant_id": "t1"}
        for n, i in enumerate(ids)
    ]


def test_a_lost_answer_retried_through_the_client_is_stored_once(
    cluster: tuple[Any, Any],
) -> None:
    leader, follower = cluster
    tracking = {"consumer": "proj", "position": 7, "tenant_id": "t1"}
    ids = [new_id() for _ in range(3)]
    port = int(leader.url.rsplit(":", 1)[1])
    with (
        FaultProxy(("127.0.0.1", port)) as proxy,
        Client(f"http://127.0.0.1:{proxy.port}", retry=QUICK) as client,
    ):
        proxy.cut_next_answers(1)  # stored, its answer lost: the client sends it again
        done = client.append_batch(batch(ids), tracking=tracking)
        assert proxy.state.dropped_connections == 1
        assert [r.event_id for r in done.receipts] == ids
        assert all(r.duplicate for r in done.receipts)
        assert done.tracking is not None and done.tracking["duplicate"]
        assert done.tracking["lsn"] == done.receipts[-1].lsn + 1
        stored = query_all(leader, tenant_id="t1")
        assert [e["id"] for e in stored] == ids
        proxy.cut_next_answers(1)
        alone = client.append_batch([], tracking=tracking)
        assert alone.tracking is not None and alone.tracking["duplicate"]

        def refused_after(checkpointed: bool) -> None:
            conflicts: list[Callable[[], Any]] = [
                lambda: client.append_batch(batch([new_id()]), tracking=tracking),
                lambda: client.append_batch(batch([*ids, new_id()]), tracking=tracking),
                lambda: client.append_batch(batch(ids), tracking={**tracking, "position": 6}),
            ]
            for call in conflicts:
                with pytest.raises(TrackingConflict):
                    call()
            assert query_all(leader, tenant_id="t1") == stored, checkpointed
            assert client.consumer_position("proj", tenant_id="t1").position == 7

        refused_after(False)
        with httpx.Client(timeout=15) as http:
            r = http.post(f"{leader.url}/internal/checkpoint", headers=ADMIN)
            assert r.status_code == 200, r.text
        assert stats(leader)["parquet_events"] == 3
        proxy.cut_next_answers(1)
        again = client.append_batch(batch(ids), tracking=tracking)
        assert [r.lsn for r in again.receipts] == [r.lsn for r in done.receipts]
        assert all(r.duplicate for r in again.receipts) and again.tracking["duplicate"]
        refused_after(True)
    # a client sent to a follower is redirected to the leader, which answers the duplicate
    wait_until(lambda: stats(follower)["visible_lsn"] >= 4, 30, "the follower")
    with Client(follower.url, retry=QUICK) as client:
        again = client.append_batch(batch(ids), tracking=tracking)
        assert all(r.duplicate for r in again.receipts) and again.tracking["duplicate"]
        with pytest.raises(TrackingConflict):
            client.append_batch(batch([new_id()]), tracking=tracking)
    assert query_all(leader, tenant_id="t1") == stored
    assert stats(leader)["last_lsn"] == 4
