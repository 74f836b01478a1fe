"""Catching up over big Parquet parts: a part of more than two slabs is decoded once into an
lsn-ordered spill (``storage.lsn_spill``) instead of once per slab. The stream still gets every
event exactly once, in lsn order, with the bytes the per-event path makes, across parts of
every layout (a merged part, a part written before positions and binary payloads existed, a
small part read without a spill, the memtable); and what the catch-up holds stays bounded:
spills and kept slabs per process, a page's bytes its own, no named file left behind."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pyarrow.parquet as pq
import pytest

from tests.sse_reader import SseReader
from tests.test_lsn_scan import DecodedRows
from tests.test_subscriptions import serving
from walship.event_frames import frame_of
from walship.events import EventIn
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.storage import lsn_spill, parquet
from walship.storage.frame_scan import frame_page
from walship.storage.manifest import load_manifest, save_manifest
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

LIMITS = Limits(parquet_row_group_rows=32, compaction_fanin_min=4, subscription_page_events=37)
SLAB = 64  # SCAN_SLAB_ROWS here: a part of more than 128 rows is spilled
NEVER = FsyncPolicy.parse("never")


@pytest.fixture(autouse=True)
def small_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small slabs, spills built in chunks of a few row groups (so a slab gathers runs of
    rows from several chunks), and caches of this test's own (they are per process)."""
    monkeypatch.setattr(parquet, "SCAN_SLAB_ROWS", SLAB)
    monkeypatch.setattr(lsn_spill, "SPILL_CHUNK_ROWS", 100)
    monkeypatch.setattr(parquet, "_SPILLS", lsn_spill.Recent(lsn_spill.SPILLS_KEPT))
    monkeypatch.setattr(parquet, "_KEPT_SLABS", lsn_spill.Recent(parquet.SCAN_SLABS_KEPT))


def _events(first: int, count: int, *, binary: bool = True) -> list[EventIn]:
    out = []
    for i in range(first, first + count):
        if binary and i % 5 == 0:
            payload = msgspec.json.encode(base64.b64encode(b"\x00\xff%d" % i).decode())
            out.append(
                EventIn(
                    f"e-{(i * 31) % 53}",
                    "t.bin",
                    msgspec.Raw(payload),
                    "default",
                    payload_encoding="base64",
                )
            )
            continue
        # some JSON spread over lines: the frame builder must make it one data line
        text = b'{"i": %d,\n "t": "x"}' % i if i % 7 == 0 else b'{"i":%d}' % i
        out.append(EventIn(f"e-{(i * 31) % 53}", "t.x", msgspec.Raw(text), f"t{i % 3}"))
    return out


def _make_first_part_old(data: Path) -> None:
    """Rewrite the first part as walship wrote parts before tenant positions and binary
    payloads (none of those columns), its manifest entry to match."""
    checkpoints = data / "checkpoints"
    manifest = load_manifest(checkpoints)
    info = manifest.parts[0]
    path = checkpoints / "parts" / info.file
    table = pq.read_table(path).drop_columns(["tenant_position", "payload_binary", "payload_bytes"])
    json_payload = table.schema.field("payload").with_nullable(False)
    table = table.cast(table.schema.set(table.schema.get_field_index("payload"), json_payload))
    pq.write_table(table, path, row_group_size=LIMITS.parquet_row_group_rows)
    old = msgspec.structs.replace(info, bytes=path.stat().st_size, sha256=parquet._sha256(path))
    save_manifest(checkpoints, msgspec.structs.replace(manifest, parts=[old, *manifest.parts[1:]]))


def _fill(data: Path) -> None:
    """Parts of 300 (old layout), 400 (merged from four), 100 (two slabs), then 50 events
    in the memtable: 850 in all."""
    with Store.open(StoreConfig(data, fsync=NEVER, limits=LIMITS)) as store:
        store.append_batch(_events(0, 300, binary=False))
        store.checkpoint()
    _make_first_part_old(data)
    with Store.open(StoreConfig(data, fsync=NEVER, limits=LIMITS)) as store:
        for first in range(300, 700, 100):
            store.append_batch(_events(first, 100))
            store.checkpoint()
        assert store.compact() is not None
        store.append_batch(_events(700, 100))
        store.checkpoint()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    _fill(tmp_path / "d")
    return tmp_path / "d"


@pytest.fixture
def store(data: Path) -> Iterator[Store]:
    with Store.open(StoreConfig(data, fsync=NEVER, limits=LIMITS)) as s:
        s.append_batch(_events(800, 50))
        assert [p.events for p in s.manifest.parts] == [300, 400, 100]
        yield s


def _per_event(store: Store) -> list[bytes]:
    """Every event's frame the per-event way, read by the filtered path (no slab, no spill)."""
    flt = QueryFilter(tenant_ids=frozenset({"default", "t0", "t1", "t2"}))
    return [frame_of(ev) for ev in store.query(flt, 10_000).events]


def _catch_up(store: Store, page: int) -> list[bytes]:
    """Pages of frames from lsn 1 on, as an unfiltered subscription reads them."""
    frames: list[bytes] = []
    after = 0
    while after < store.visible_lsn:
        got = frame_page(store.read_view(), after + 1, store.visible_lsn, page)
        for span in got.spans:
            frames += [
                bytes(span.data[a:b]) for a, b in zip([0, *span.ends[:-1]], span.ends, strict=True)
            ]
        after = got.last_lsn if got.full else store.visible_lsn
    return frames


def _lsn(frame: bytes) -> int:
    return int(frame.split(b"\n", 1)[0].removeprefix(b"id: ").split(b":")[0])


@pytest.mark.parametrize("page", [37, 500])
def test_a_catch_up_over_spilled_parts_gets_every_event_once_in_lsn_order(
    store: Store, page: int
) -> None:
    frames = _catch_up(store, page)
    assert [_lsn(f) for f in frames] == list(range(1, 851))
    assert frames == _per_event(store)  # the same bytes, binary and multi-line payloads too
    # read again (now from the spills and kept slabs): still the same
    assert _catch_up(store, 101) == frames
    # an unfiltered query pages through the same slabs as events
    events = []
    after = 0
    while (result := store.query(QueryFilter(from_lsn=after + 1), 90)).events:
        events += result.events
        after = result.events[-1].lsn
    assert [frame_of(ev) for ev in events] == frames


def test_a_big_part_is_decoded_once_for_a_catch_up(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = DecodedRows(monkeypatch)
    assert len(_catch_up(store, 37)) == 850
    # read per slab, the part of 300 decodes 5 times and the merged part of 400 7 times
    # (4,300 rows with the small part's 2 x 100); spilled, each row once
    assert decoded.rows <= 300 + 400 + 2 * 100, decoded.rows
    assert len(parquet._SPILLS) == 2


def test_what_a_catch_up_holds_is_bounded(
    data: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parquet, "_SPILLS", lsn_spill.Recent(1))
    listing = sorted(p.name for p in data.rglob("*"))
    after = 0
    pages = []
    while after < store.visible_lsn:
        got = frame_page(store.read_view(), after + 1, store.visible_lsn, 37)
        pages.append(got)
        after = got.last_lsn if got.full else store.visible_lsn
        assert len(parquet._SPILLS) <= 1
        assert len(parquet._KEPT_SLABS) <= parquet.SCAN_SLABS_KEPT
    # a page held by a slow consumer holds its own bytes, never a whole slab's frames
    for got in pages:
        for span in got.spans:
            assert isinstance(span.data.obj, bytes) and len(span.data.obj) == len(span.data)
    # the spills never had a name: nothing new in the data dir, nothing left in it
    assert sorted(p.name for p in data.rglob("*")) == listing


def test_an_sse_catch_up_over_spilled_parts_gets_every_event_once(data: Path) -> None:
    node = Node.open(NodeConfig(data, fsync=NEVER, limits=LIMITS))
    try:
        with serving(node) as url:
            write = [
                {"entity_id": f"e-{i}", "event_type": "t.x", "payload": {"i": i}}
                for i in range(850, 900)
            ]
            response = httpx.post(f"{url}/api/v1/events/batch", json={"events": write})
            assert response.status_code == 200, response.text
            reader = SseReader(f"{url}/api/v1/events/stream?from_lsn=1")
            try:
                got = [reader.events.get(timeout=30) for _ in range(850)]
            finally:
                reader.close()
    finally:
        node.close()
    assert [ev["lsn"] for ev in got] == list(range(1, 851))
    assert reader.events.empty()


def test_a_tenant_catch_up_over_spilled_parts_reads_them_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant-scoped catch-up (a ``tenant_id`` subscription, a scoped key) over big parts
    reads them in lsn order from the spill, not a page's rows out of every row group."""
    every = [frame_of(ev) for ev in store.query(QueryFilter(), 10_000).events]
    assert len(every) == 850
    decoded = DecodedRows(monkeypatch)
    for tenants in ({"t1"}, {"t0", "default"}):
        got = []
        after = 0
        while True:
            flt = QueryFilter(from_lsn=after + 1, tenant_ids=frozenset(tenants))
            result = store.query(flt, 7)
            got += result.events
            if result.next_cursor is None:
                break
            after = result.events[-1].lsn
        assert [frame_of(ev) for ev in got] == [
            f for f in every if msgspec.json.decode(f.split(b"data: ")[1])["tenant_id"] in tenants
        ]
    # each spilled part decoded once (picking each page out of the row groups: ~9,400 rows)
    assert decoded.rows <= 300 + 400 + 4 * 100, decoded.rows


def test_a_catch_up_without_room_for_a_spill_reads_slab_by_slab(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spill is a cache: a data dir that cannot take it (full disk) costs time, not events."""

    def no_room(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lsn_spill.tempfile, "TemporaryFile", no_room)
    frames = _catch_up(store, 37)
    assert [_lsn(f) for f in frames] == list(range(1, 851))
    assert len(parquet._SPILLS) == 0
