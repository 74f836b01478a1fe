"""Consumer positions (tracking) on one node: a batch's ``tracking`` is stored in the same
atomic append as its events or, when not above the consumer's stored position, refuses the
whole batch; the record is invisible to readers and takes no tenant position; the table
survives restarts, checkpoints, compactions and WAL cuts; bad input is a 4xx JSON error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_event
from walship.errors import InvalidInput, TrackingConflict, ValidationError
from walship.events import TrackingIn
from walship.http import create_app
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.position import Lsn
from walship.storage.consumers import ConsumerPosition, ConsumerTable
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

LIMITS = Limits(
    segment_bytes_max=4096, compaction_fanin_min=2, consumers_max=3, consumers_per_tenant_max=2
)


def open_store(path: Path) -> Store:
    return Store.open(
        StoreConfig(path, fsync=FsyncPolicy.parse("never"), limits=LIMITS, checkpoints=False)
    )


def track(position: int, consumer: str = "proj", tenant: str = "t1") -> TrackingIn:
    return TrackingIn(consumer=consumer, position=position, tenant_id=tenant)


def append(store: Store, events: list[Any], tracking: TrackingIn | None = None) -> Any:
    pending = store.submit(events, tracking=tracking)
    if pending.done is not None:
        pending.done.result()
    return pending


def events_of(store: Store) -> list[Any]:
    return store.query(QueryFilter(), 10_000).events


def test_a_tracking_not_above_the_stored_one_fails_the_whole_batch(tmp_path: Path) -> None:
    with open_store(tmp_path / "d") as store:
        first = append(store, [make_event("a", tenant_id="t1")], track(5))
        assert first.tracking is not None
        assert (first.tracking.position, first.tracking.lsn) == (5, 2)
        assert store.consumer_position("t1", "proj") == ConsumerPosition("t1", "proj", 5, 2)
        before = (events_of(store), store.tenant_position("t1"), store.last_position)
        for position in (5, 4, 1):
            with pytest.raises(TrackingConflict) as refused:
                append(
                    store,
                    [make_event("b", tenant_id="t1"), make_event("c", tenant_id="t2")],
                    track(position),
                )
            assert refused.value.details["stored_position"] == 5
        # nothing stored: no event, no lsn, no tenant position, no version
        assert (events_of(store), store.tenant_position("t1"), store.last_position) == before
        assert store.entity_version("b", "t1") == 0
        receipts = append(store, [make_event("b", tenant_id="t1")], track(6)).receipts
        assert (receipts[0].lsn, receipts[0].position, receipts[0].version) == (3, 2, 1)
        # consumers are per tenant and per name
        append(store, [], track(1, tenant="t2"))
        append(store, [], track(1, consumer="other"))
        assert store.consumer_position("t1", "proj") == ConsumerPosition("t1", "proj", 6, 4)
        assert store.consumer_position("t2", "proj") == ConsumerPosition("t2", "proj", 1, 5)


def test_tracking_alone_and_an_empty_batch(tmp_path: Path) -> None:
    with open_store(tmp_path / "d") as store:
        with pytest.raises(InvalidInput):
            store.submit([])
        pending = append(store, [], track(3))
        assert pending.receipts == [] and pending.tracking is not None
        assert pending.tracking.lsn == 1
        assert events_of(store) == [] and store.stats()["events"] == 0
        # the record takes no tenant position and no reader sees it
        assert store.append(make_event("a", tenant_id="t1")).position == 1
        assert [e.lsn for e in events_of(store)] == [2]
        assert store.entities.read("proj", "t1", limit=10) == ([], 0)
        with pytest.raises(ValidationError):
            store.submit([], tracking=track(0))
        with pytest.raises(ValidationError):
            store.submit([], tracking=track(1, consumer="no spaces"))


def test_the_consumer_table_is_bounded(tmp_path: Path) -> None:
    from walship.errors import LimitExceeded

    with open_store(tmp_path / "d") as store:
        for name in ("a", "b"):
            append(store, [], track(1, consumer=name))
        # one tenant cannot take every consumer of the node: t1 is full, t2 is not
        with pytest.raises(LimitExceeded, match="tenant 't1'"):
            append(store, [], track(1, consumer="c"))
        append(store, [], track(1, consumer="c", tenant="t2"))
        with pytest.raises(LimitExceeded, match="consumers are tracked"):
            append(store, [], track(1, consumer="d", tenant="t3"))
        append(store, [], track(2, consumer="a"))  # a known consumer still moves on
    # the counts are rebuilt at recovery
    with open_store(tmp_path / "d") as store, pytest.raises(LimitExceeded, match="tenant 't1'"):
        append(store, [], track(1, consumer="e"))


def test_consumer_positions_survive_restart_checkpoint_compaction_and_wal_cut(
    tmp_path: Path,
) -> None:
    with open_store(tmp_path / "d") as store:
        append(store, [make_event("a", tenant_id="t1")], track(1))
        append(store, [make_event("a", tenant_id="t2")], track(7, tenant="t2"))
        for i in range(40):  # several WAL segments, then checkpoints and a merge
            append(store, [make_event(f"e{i}", payload={"x": "y" * 200})], track(10 + i, "big"))
            if i % 10 == 9:
                store.checkpoint()
        assert store.compact() is not None
        store.checkpoints.remove_checkpointed_wal()
        assert store.wal.first_lsn().value > 4  # the early tracking records are gone
        append(store, [], track(2))  # after the last checkpoint: in the WAL only
        want = {
            ("t1", "proj"): ConsumerPosition("t1", "proj", 2, store.last_position.lsn.value),
            ("t2", "proj"): ConsumerPosition("t2", "proj", 7, 4),
            ("t1", "big"): store.consumer_position("t1", "big"),
        }
    with open_store(tmp_path / "d") as store:
        got = {key: store.consumer_position(*key) for key in want}
        assert got == want
        assert got[("t1", "big")] is not None and got[("t1", "big")].position == 49
        with pytest.raises(TrackingConflict):
            append(store, [], track(6, tenant="t2"))
        repeat = append(store, [], track(7, tenant="t2")).tracking  # its answer lost: again
        assert repeat.duplicate and (repeat.position, repeat.lsn) == (7, 4)


def test_the_table_answers_only_what_the_wal_wrote_and_rolls_back() -> None:
    table = ConsumerTable()
    table.apply(ConsumerPosition("t", "c", 1, 10), written_lsn=10)
    table.apply(ConsumerPosition("t", "c", 2, 11), written_lsn=10)
    table.apply(ConsumerPosition("t", "c", 3, 12), written_lsn=10)
    table.apply(ConsumerPosition("t", "n", 1, 13), written_lsn=10)
    assert table.visible("t", "c", 10) == ConsumerPosition("t", "c", 1, 10)
    assert table.visible("t", "c", 11) == ConsumerPosition("t", "c", 2, 11)
    assert table.visible("t", "n", 12) is None
    table.forget_after(11)  # a full disk rolled 12 and 13 back
    assert table.stored("t", "c") == ConsumerPosition("t", "c", 2, 11)
    assert table.stored("t", "n") is None


# ---------------------------------------------------------------------------------- HTTP


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    node = Node.open(NodeConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never")))
    try:
        with TestClient(create_app(node)) as client:
            yield client
    finally:
        node.close()


def _batch(events: list[dict[str, Any]], tracking: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"events": events}
    if tracking is not None:
        body["tracking"] = tracking
    return body


def test_http_tracking_conflict_stores_nothing(api: TestClient) -> None:
    ev = {"entity_id": "a", "event_type": "x.y", "payload": {}, "tenant_id": "t1"}
    tracking = {"consumer": "bank:Projection-1", "position": 3, "tenant_id": "t1"}
    ok = api.post("/api/v1/events/batch", json=_batch([ev], tracking))
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["tracking"]["position"] == 3 and body["last_lsn"] == body["tracking"]["lsn"] == 2
    refused = api.post("/api/v1/events/batch", json=_batch([ev, ev], tracking))
    assert refused.status_code == 409
    assert refused.json()["error"] == "tracking_conflict"
    assert refused.json()["stored_position"] == 3
    assert api.get("/api/v1/events/query").json()["count"] == 1
    assert api.get("/api/v1/tenants/t1/position").json()["position"] == 1
    answer = api.get("/api/v1/consumers/bank:Projection-1", params={"tenant_id": "t1"})
    assert answer.json() == {
        "consumer": "bank:Projection-1",
        "tenant_id": "t1",
        "position": 3,
        "lsn": 2,
    }
    alone = api.post("/api/v1/events/batch", json=_batch([], {**tracking, "position": 4}))
    assert alone.status_code == 200 and alone.json()["receipts"] == []


@pytest.mark.parametrize(
    ("method", "path", "body_or_params", "status"),
    [
        ("GET", "/api/v1/consumers/nobody", {"tenant_id": "t1"}, 404),
        ("GET", "/api/v1/consumers/" + "n" * 129, {}, 422),
        ("GET", "/api/v1/consumers/bad%20name", {}, 422),
        ("GET", "/api/v1/consumers/ok", {"tenant_id": "bad tenant"}, 422),
        ("GET", "/api/v1/consumers/ok", {"tenant": "t1"}, 400),
        ("POST", "/api/v1/events/batch", {"events": []}, 400),
        ("POST", "/api/v1/events/batch", {"tracking": {"consumer": "c", "position": -1}}, 422),
        ("POST", "/api/v1/events/batch", {"tracking": {"consumer": "c", "position": 0}}, 422),
        ("POST", "/api/v1/events/batch", {"tracking": {"consumer": "c", "position": 2**63}}, 422),
        ("POST", "/api/v1/events/batch", {"tracking": {"consumer": "c", "position": "1"}}, 422),
        ("POST", "/api/v1/events/batch", {"tracking": {"consumer": "", "position": 1}}, 422),
        ("POST", "/api/v1/events/batch", {"tracking": {"consumer": "a/b", "position": 1}}, 422),
        ("POST", "/api/v1/events/batch", {"tracking": {"position": 1}}, 422),
        (
            "POST",
            "/api/v1/events/batch",
            {"tracking": {"consumer": "c", "position": 1, "tenant_id": "no way"}},
            422,
        ),
        (
            "POST",
            "/api/v1/events/batch",
            {"tracking": {"consumer": "c", "position": 1, "extra": 1}},
            422,
        ),
    ],
)
def test_bad_consumer_input_is_a_4xx_json_error(
    api: TestClient, method: str, path: str, body_or_params: dict[str, Any], status: int
) -> None:
    if method == "GET":
        response = api.get(path, params=body_or_params)
    else:
        response = api.post(path, json=body_or_params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]
    assert api.get("/api/v1/events/query").json()["count"] == 0  # nothing stored


def test_a_cut_tail_gives_its_positions_again_and_takes_its_tracking_back(tmp_path: Path) -> None:
    """A divergence repair cuts a deposed leader's unreplicated tail: what the tail held
    (tenant positions, a tracked position) is as if never written, as docs/http-api.md says."""
    with open_store(tmp_path / "d") as store:
        append(store, [make_event("a", tenant_id="t1") for _ in range(3)], track(3))  # lsn 1-4
        append(store, [make_event("a", tenant_id="t1") for _ in range(2)], track(5))  # lsn 5-7
        assert store.tenant_position("t1") == (5, 6)
        store.truncate_after(Lsn(4))
        assert store.tenant_position("t1") == (3, 3)
        assert store.consumer_position("t1", "proj") == ConsumerPosition("t1", "proj", 3, 4)
        again = append(store, [make_event("b", tenant_id="t1")], track(4))
        assert (again.receipts[0].lsn, again.receipts[0].position) == (5, 4)
