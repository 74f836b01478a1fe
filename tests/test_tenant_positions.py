"""Tenant positions on one node: gapless per tenant, assigned once (a refused batch takes
none), rebuilt by recovery from the WAL and Parquet, and queries by position that answer
exactly what a full scan filtered by tenant and position would, over Parquet parts (also
compacted) and the memtable; bad input on the position parameters is a 4xx JSON error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_event
from walship.errors import VersionConflict
from walship.events import EventBody, decode_body, encode_body_fields
from walship.http import create_app
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

# a small stride: ranges start between anchors and anchors fall in every part
LIMITS = Limits(
    parquet_row_group_rows=8,
    query_limit_max=50,
    query_limit_default=10,
    tenant_position_index_stride=4,
    compaction_fanin_min=2,
)
TENANTS = ("t1", "t2", "t3")


def open_store(path: Path) -> Store:
    return Store.open(
        StoreConfig(path, fsync=FsyncPolicy.parse("never"), limits=LIMITS, checkpoints=False)
    )


def write_mix(store: Store, batches: int, start: int = 0) -> None:
    """Batches mixing the tenants unevenly (t1 twice, t3 only every other batch)."""
    for b in range(start, start + batches):
        tenants = ["t1", "t2", "t1"] + (["t3"] if b % 2 else [])
        store.append_batch(
            [
                make_event(f"e{b % 5}", tenant_id=t, payload={"b": b, "k": k})
                for k, t in enumerate(tenants)
            ]
        )


def scan(store: Store, **flt: Any) -> list[Any]:
    out, cursor = [], None
    while True:
        page = store.query(QueryFilter(**flt), LIMITS.query_limit_max, cursor)
        out.extend(page.events)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def assert_gapless(store: Store) -> dict[str, list[Any]]:
    everything = scan(store)
    by_tenant: dict[str, list[Any]] = {}
    for ev in everything:
        by_tenant.setdefault(ev.tenant_id, []).append(ev)
    for tenant, events in by_tenant.items():
        positions = [ev.tenant_position for ev in events]
        assert positions == list(range(1, len(events) + 1)), tenant
        assert store.tenant_position(tenant) == (len(events), events[-1].lsn)
    return by_tenant


def test_positions_are_gapless_per_tenant_and_consecutive_within_a_batch(tmp_path: Path) -> None:
    with open_store(tmp_path / "d") as store:
        receipts = store.append_batch(
            [make_event("a", tenant_id=t) for t in ("t1", "t2", "t1", "t1", "t2")]
        )
        assert [r.position for r in receipts] == [1, 1, 2, 3, 2]
        write_mix(store, 10)
        counts = {t: len(evs) for t, evs in assert_gapless(store).items()}
        assert counts == {"t1": 23, "t2": 12, "t3": 5}
        assert store.tenant_position("nobody") == (0, 0)


def test_a_refused_batch_takes_no_position(tmp_path: Path) -> None:
    with open_store(tmp_path / "d") as store:
        store.append_batch([make_event("a", tenant_id="t1"), make_event("b", tenant_id="t1")])
        with pytest.raises(VersionConflict):
            store.append_batch(
                [
                    make_event("c", tenant_id="t1"),
                    make_event("a", tenant_id="t1", expected_version=7),
                ]
            )
        assert store.append(make_event("d", tenant_id="t1")).position == 3
        # a retry of a stored event answers its original position, and takes no new one
        first = store.append(make_event("e", tenant_id="t1", id=_uuid(1)))
        again = store.append(make_event("e", tenant_id="t1", id=_uuid(1)))
        assert (first.position, again.position, again.duplicate) == (4, 4, True)
        assert store.append(make_event("f", tenant_id="t1")).position == 5
        assert_gapless(store)


def _uuid(n: int) -> Any:
    import uuid

    return uuid.UUID(int=(0x7 << 76) | (0x8 << 60) | n)


def test_recovery_rebuilds_positions_from_parquet_and_the_wal(tmp_path: Path) -> None:
    """Parts (two merged by a compaction) then WAL records after the checkpoint: after a
    restart the next event of each tenant continues its sequence, and reads by position
    still find every range."""
    with open_store(tmp_path / "d") as store:
        store.append_batch([make_event("s", tenant_id="solo") for _ in range(9)])  # Parquet only
        for _ in range(3):
            write_mix(store, 7)
            store.checkpoint()
        assert store.compact() is not None
        write_mix(store, 5, start=21)  # in the WAL only (no checkpoint at close: off)
        before = assert_gapless(store)
    with open_store(tmp_path / "d") as store:
        assert assert_gapless(store) == before
        receipts = store.append_batch([make_event("x", tenant_id=t) for t in (*TENANTS, "solo")])
        assert [r.position for r in receipts] == [len(before[t]) + 1 for t in (*TENANTS, "solo")]
        # the index anchors came back from the parts: a read near the end starts near it
        lo, _ = store.core.positions.lsn_window("t1", len(before["t1"]), None)
        assert lo > before["t1"][-LIMITS.tenant_position_index_stride - 1].lsn


def test_queries_by_position_equal_a_filtered_full_scan(tmp_path: Path) -> None:
    with open_store(tmp_path / "d") as store:
        for _ in range(3):
            write_mix(store, 9)
            store.checkpoint()
        write_mix(store, 6, start=27)  # and a memtable
        everything = scan(store)
        for tenant in TENANTS:
            last = store.tenant_position(tenant)[0]
            for lo, hi in [
                (0, None),
                (1, 1),
                (3, 9),
                (5, last),
                (last, None),
                (last + 1, None),
                (2, 2 + 17),
                (7, 6),
            ]:
                want = [
                    ev
                    for ev in everything
                    if ev.tenant_id == tenant
                    and ev.tenant_position >= lo
                    and (hi is None or ev.tenant_position <= hi)
                ]
                got = scan(store, tenant_id=tenant, from_position=lo, to_position=hi)
                assert got == want, (tenant, lo, hi)
        # with the other filters too
        got = scan(store, tenant_id="t1", from_position=4, entity_id="e2")
        assert got == [
            ev
            for ev in everything
            if ev.tenant_id == "t1" and ev.tenant_position >= 4 and ev.entity_id == "e2"
        ]


def test_a_record_written_before_positions_decodes_with_none() -> None:
    old = msgspec.msgpack.encode((b"\x01" * 16, "t", "e", "x.y", 5, 1, b"{}", None))
    assert decode_body(old) == EventBody(b"\x01" * 16, "t", "e", "x.y", 5, 1, b"{}", None, 0)
    new = encode_body_fields(b"\x01" * 16, "t", "e", "x.y", 5, 1, b"{}", None, 9)
    assert decode_body(new).tenant_position == 9


# ---------------------------------------------------------------------------------- HTTP


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    node = Node.open(
        NodeConfig(
            tmp_path / "data", fsync=FsyncPolicy.parse("never"), limits=LIMITS, checkpoints=False
        )
    )
    try:
        with TestClient(create_app(node)) as client:
            yield client
    finally:
        node.close()


def test_http_receipts_events_and_the_tenant_position_route(api: TestClient) -> None:
    events = [
        {"entity_id": "a", "event_type": "x.y", "payload": {}, "tenant_id": t}
        for t in ("t1", "t2", "t1")
    ]
    body = api.post("/api/v1/events/batch", json={"events": events}).json()
    assert [r["position"] for r in body["receipts"]] == [1, 1, 2]
    one = api.post("/api/v1/events", json={**events[0], "entity_id": "b"}).json()
    assert one["position"] == 3
    page = api.get(
        "/api/v1/events/query", params={"tenant_id": "t1", "from_position": 2, "to_position": 3}
    ).json()
    assert [(e["position"], e["lsn"]) for e in page["events"]] == [(2, 3), (3, 4)]
    assert api.get("/api/v1/tenants/t1/position").json() == {
        "tenant_id": "t1",
        "position": 3,
        "lsn": 4,
    }
    assert api.get("/api/v1/tenants/t9/position").json()["position"] == 0


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/events/query", {"from_position": 1}),  # no tenant_id
        ("/api/v1/events/query", {"to_position": 1}),
        ("/api/v1/events/query", {"tenant_id": "t1", "from_position": -1}),
        ("/api/v1/events/query", {"tenant_id": "t1", "to_position": -5}),
        ("/api/v1/events/query", {"tenant_id": "t1", "from_position": 2**63}),
        ("/api/v1/events/query", {"tenant_id": "t1", "from_position": "one"}),
        ("/api/v1/events/stream", {"from_position": 1}),
        ("/api/v1/events/stream", {"tenant_id": "t1", "from_position": -1}),
        ("/api/v1/tenants/no%20such/position", {}),
        ("/api/v1/tenants/t1/position", {"x": 1}),
    ],
)
def test_bad_position_input_is_a_4xx_json_error(
    api: TestClient, path: str, params: dict[str, Any]
) -> None:
    response = api.get(path, params=params)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] in ("invalid_parameter", "validation_error")


def _make_part_old(data_dir: Path) -> None:
    """Rewrite the one Parquet part as walship wrote it before positions existed (no
    ``tenant_position`` column), its manifest entry to match."""
    import pyarrow.parquet as pq

    from walship.storage.manifest import load_manifest, save_manifest
    from walship.storage.parquet import _sha256

    checkpoints = data_dir / "checkpoints"
    manifest = load_manifest(checkpoints)
    (info,) = manifest.parts
    path = checkpoints / "parts" / info.file
    table = pq.read_table(path).drop_columns(["tenant_position"])
    pq.write_table(table, path, row_group_size=LIMITS.parquet_row_group_rows)
    old = msgspec.structs.replace(info, bytes=path.stat().st_size, sha256=_sha256(path))
    save_manifest(checkpoints, msgspec.structs.replace(manifest, parts=[old]))


def test_parts_written_before_positions_are_read_merged_and_queried(tmp_path: Path) -> None:
    """An upgrade: old parts hold no position column. Their events read as position 0, the
    tenant's positions start at 1 with the first new event, a merge of old and new parts
    keeps both, and DuckDB sees the column (NULL in the old rows)."""
    import duckdb

    from walship import history

    data = tmp_path / "d"
    with open_store(data) as store:
        # one event in each part: parts of one size class, which compaction merges
        store.append_batch([make_event("a", tenant_id="t1")])
        store.checkpoint()
    _make_part_old(data)
    with open_store(data) as store:
        assert [e.tenant_position for e in scan(store)] == [0]
        assert store.tenant_position("t1") == (0, 0)
        assert store.append(make_event("b", tenant_id="t1")).position == 1
        store.checkpoint()
        con = duckdb.connect()
        history.duckdb_view(con, data)
        rows = con.execute("SELECT lsn, tenant_position FROM events ORDER BY lsn").fetchall()
        assert rows == [(1, None), (2, 1)]
        con.close()
        assert store.compact() is not None
        assert [e.tenant_position for e in scan(store)] == [0, 1]
        assert [e.lsn for e in scan(store, tenant_id="t1", from_position=1)] == [2]
        assert len(scan(store, tenant_id="t1", from_position=0)) == 2
    with open_store(data) as store:
        assert store.append(make_event("c", tenant_id="t1")).position == 2
