"""The store: versions, idempotency, batches, checkpoints to Parquet, queries, restart."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import make_event
from walship.errors import IdConflict, LimitExceeded, ValidationError, VersionConflict
from walship.events import EventIn
from walship.limits import Limits
from walship.storage.parquet import SCHEMA
from walship.storage.query import QueryFilter
from walship.store import INSTALL_MARKER, Store, StoreConfig
from walship.wal import FsyncPolicy
from walship.wal.frame import verify_frame


def open_store(path: Path, **limits: int) -> Store:
    return Store.open(StoreConfig(path, fsync=FsyncPolicy.parse("never"), limits=Limits(**limits)))


def all_events(store: Store, **flt: object) -> list[int]:
    out: list[int] = []
    cursor = None
    while True:
        page = store.query(QueryFilter(**flt), limit=7, cursor=cursor)  # type: ignore[arg-type]
        out.extend(e.lsn for e in page.events)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def test_versions_count_per_entity_and_receipts_say_local(tmp_path: Path) -> None:
    store = Store.open(StoreConfig(tmp_path))  # fsync always
    r1 = store.append(make_event("a"))
    r2 = store.append(make_event("b"))
    r3 = store.append(make_event("a"))
    assert [(r.lsn, r.version) for r in (r1, r2, r3)] == [(1, 1), (2, 1), (3, 2)]
    assert {r.durability for r in (r1, r2, r3)} == {"local"}
    assert r1.term == 1
    store.close()


def test_receipts_under_fsync_never_do_not_claim_local(store: Store) -> None:
    assert store.append(make_event()).durability == "buffered"


def test_expected_version_conflict_names_both_versions(store: Store) -> None:
    store.append(make_event("a"))
    with pytest.raises(VersionConflict) as err:
        store.append(make_event("a", expected_version=0))
    assert err.value.details["current_version"] == 1
    assert err.value.details["expected_version"] == 0
    assert store.append(make_event("a", expected_version=1)).version == 2


def test_batch_is_all_or_nothing(store: Store) -> None:
    store.append(make_event("a"))
    before = store.last_position
    with pytest.raises(VersionConflict):
        store.append_batch([make_event("b"), make_event("a", expected_version=5)])
    with pytest.raises(ValidationError) as err:
        store.append_batch([make_event("b"), make_event("c", etype="Bad Type")])
    assert err.value.details["index"] == 1
    assert store.last_position == before
    assert store.entity_version("b") == 0
    receipts = store.append_batch([make_event("b"), make_event("b"), make_event("a")])
    assert [r.version for r in receipts] == [1, 2, 2]


def test_repeated_event_id_returns_the_original_receipt(store: Store) -> None:
    import uuid

    eid = uuid.uuid4()
    first = store.append(make_event("a", id=eid))
    again = store.append(
        EventIn(
            entity_id="a",
            event_type="acct.credited",
            payload=msgspec.Raw(b'{ "amount" : 1 }'),  # the same JSON value, spaced otherwise
            id=eid,
        )
    )
    assert (again.lsn, again.version, again.event_id) == (first.lsn, first.version, str(eid))
    assert again.duplicate
    assert store.last_position.lsn.value == 1
    store.checkpoint()
    third = store.append(make_event("a", id=eid))
    assert third.lsn == first.lsn
    assert store.last_position.lsn.value == 1


@pytest.mark.parametrize("checkpointed", [False, True])
def test_an_id_reused_for_other_contents_is_refused_naming_the_stored_event(
    store: Store, checkpointed: bool
) -> None:
    """A retry (same id, same contents) is answered with the original receipt; the same id
    with anything else different is a 409 that names the stored event, never a 200 that
    silently drops the new contents."""
    import uuid

    eid = uuid.uuid4()
    first = store.append(make_event("a", id=eid, payload={"x": 1, "y": [1, 2]}, metadata=None))
    if checkpointed:
        assert store.checkpoint() is not None  # found through the part, not the memtable
    for other in (
        make_event("a", id=eid, payload={"x": 2, "y": [1, 2]}),
        make_event("b", id=eid, payload={"x": 1, "y": [1, 2]}),
        make_event("a", "acct.debited", id=eid, payload={"x": 1, "y": [1, 2]}),
        make_event("a", id=eid, payload={"x": 1, "y": [1, 2]}, tenant_id="t2"),
        make_event("a", id=eid, payload={"x": 1, "y": [1, 2]}, metadata=msgspec.Raw(b"{}")),
    ):
        with pytest.raises(IdConflict) as info:
            store.append(other)
        assert info.value.http_status == 409
        assert info.value.details["event_id"] == str(eid)
        stored = info.value.details["stored"]
        assert (stored["lsn"], stored["entity_id"], stored["version"]) == (1, "a", 1)
    again = store.append(make_event("a", id=eid, payload={"y": [1, 2], "x": 1}))
    assert again.duplicate and again.lsn == first.lsn
    assert store.last_position.lsn.value == 1


def test_a_batch_repeating_an_id_with_other_contents_is_refused_whole(store: Store) -> None:
    import uuid

    eid = uuid.uuid4()
    batch = [make_event("a", id=eid), make_event("z"), make_event("a", id=eid, payload=[2])]
    with pytest.raises(IdConflict) as info:
        store.append_batch(batch)
    assert info.value.details == {"event_id": str(eid), "index": 2, "first_index": 0}
    assert store.last_position.lsn.value == 0
    same = store.append_batch([make_event("a", id=eid), make_event("a", id=eid)])
    assert [r.lsn for r in same] == [1, 1]
    assert store.last_position.lsn.value == 1


def test_oversized_payload_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path, payload_bytes_max=100)
    with pytest.raises(LimitExceeded):
        store.append(make_event(payload={"x": "y" * 200}))
    assert store.last_position.lsn.value == 0
    store.close()


def test_checkpoint_writes_parquet_that_duckdb_and_pyarrow_read(store: Store) -> None:
    for i in range(50):
        store.append(make_event(f"e{i % 5}", payload={"i": i}, metadata=msgspec.Raw(b'{"k":1}')))
    part = store.checkpoint()
    assert part is not None
    assert part.file == "0000000000000001-0000000000000032.parquet"
    path = store.parts_dir / part.file
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert sorted(table.column("lsn").to_pylist()) == list(range(1, 51))
    rows = duckdb.sql(
        f"select lsn, entity_id, version, payload::json->>'i' as i, metadata "
        f"from read_parquet('{path}') order by lsn"
    ).fetchall()
    assert len(rows) == 50
    assert rows[7] == (8, "e2", 2, "7", '{"k":1}')


def test_queries_span_parquet_and_memtable_in_lsn_order(store: Store) -> None:
    for i in range(30):
        store.append(make_event(f"e{i % 3}", etype="t.even" if i % 2 == 0 else "t.odd"))
    store.checkpoint()
    for i in range(30, 45):
        store.append(make_event(f"e{i % 3}", etype="t.even" if i % 2 == 0 else "t.odd"))
    store.checkpoint()
    for i in range(45, 60):
        store.append(make_event(f"e{i % 3}", etype="t.even" if i % 2 == 0 else "t.odd"))
    assert all_events(store) == list(range(1, 61))
    assert all_events(store, entity_id="e1") == [i + 1 for i in range(60) if i % 3 == 1]
    assert all_events(store, event_type="t.odd") == [i + 1 for i in range(60) if i % 2 == 1]
    assert all_events(store, from_lsn=25, to_lsn=50) == list(range(25, 51))
    assert all_events(store, tenant_id="other") == []


def test_time_range_queries(store: Store) -> None:
    store.append(make_event("a"))
    mid = store.query(QueryFilter()).events[0].timestamp_us + 1
    import time

    time.sleep(0.002)
    store.append(make_event("a"))
    assert all_events(store, since_us=mid) == [2]
    assert all_events(store, until_us=mid) == [1]


def test_tenants_keep_entities_apart(store: Store) -> None:
    store.append(make_event("a", tenant_id="t1"))
    store.append(make_event("a", tenant_id="t2"))
    assert store.entity_version("a", "t1") == 1
    assert all_events(store, entity_id="a", tenant_id="t2") == [2]


def test_entity_state_merges_payloads_and_honours_as_of(store: Store) -> None:
    store.append(make_event("a", payload={"x": 1, "y": 1}))
    store.append(make_event("a", payload={"y": 2}))
    store.checkpoint()
    store.append(make_event("a", payload={"z": 3}))
    state = store.entity_state("a")
    assert state.state == {"x": 1, "y": 2, "z": 3}
    assert state.version == 3
    assert store.entity_state("a", as_of_lsn=1).state == {"x": 1, "y": 1}


def test_restart_after_checkpoint_restores_queries_and_versions(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for i in range(40):
        store.append(make_event(f"e{i % 4}", payload={"i": i}))
    store.checkpoint()
    for i in range(40, 55):
        store.append(make_event(f"e{i % 4}", payload={"i": i}))
    before = [msgspec.to_builtins(e) for e in store.query(QueryFilter(), limit=100).events]
    versions = {e: store.entity_version(e) for e in ("e0", "e1", "e2", "e3")}
    store.close()
    store = open_store(tmp_path)
    after = [msgspec.to_builtins(e) for e in store.query(QueryFilter(), limit=100).events]
    assert after == before
    assert {e: store.entity_version(e) for e in versions} == versions
    assert store.append(make_event("e0")).lsn == 56
    assert store.append(make_event("e0")).version == versions["e0"] + 2
    store.close()


def test_checkpoint_removes_wal_segments_but_never_restarts_lsns(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_bytes_max=4096)
    for i in range(100):
        store.append(make_event(f"e{i % 4}"))
    segments_before = store.wal.status().segments
    store.checkpoint()
    assert store.wal.status().segments < segments_before
    assert store.wal.first_lsn().value > 1
    store.close()
    store = open_store(tmp_path, segment_bytes_max=4096)
    assert store.append(make_event("e0")).lsn == 101
    assert len(all_events(store)) == 101
    store.close()


def test_retention_hook_keeps_wal_a_follower_needs(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_bytes_max=4096)
    store.set_retention_floor(lambda: 10)
    for i in range(100):
        store.append(make_event(f"e{i % 4}"))
    store.checkpoint()
    assert store.wal.first_lsn().value <= 10
    store.close()


def test_checkpoint_triggers_by_size(tmp_path: Path) -> None:
    import time

    store = open_store(tmp_path, memtable_events_max=20)
    for i in range(50):
        store.append(make_event(f"e{i % 4}"))
    deadline = time.monotonic() + 10
    while store.manifest.last_lsn < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.manifest.last_lsn >= 20
    assert len(all_events(store)) == 50
    store.close()


def test_memtable_stays_bounded_while_the_store_grows(tmp_path: Path) -> None:
    """Appends wait when the active memtable reaches twice its budget while one is frozen."""
    store = open_store(tmp_path, memtable_events_max=500)
    peak = 0
    for _ in range(40):
        store.append_batch([make_event(f"e{j % 50}") for j in range(250)])
        peak = max(peak, store.stats()["memtable_events"])
    assert peak <= 2 * (2 * 500 + 250)
    assert store.stats()["parquet_events"] >= 10_000 - peak
    store.close()


def test_install_snapshot_replaces_state_and_continues_from_its_end(tmp_path: Path) -> None:
    import shutil

    leader = open_store(tmp_path / "leader")
    for i in range(30):
        leader.append(make_event(f"e{i % 3}", payload={"i": i}))
    leader.checkpoint()
    for i in range(30, 40):
        leader.append(make_event(f"e{i % 3}", payload={"i": i}))
    manifest = leader.manifest
    staged = tmp_path / "staged"
    staged.mkdir()
    for part in manifest.parts:
        shutil.copy(leader.parts_dir / part.file, staged / part.file)

    follower = open_store(tmp_path / "follower")
    follower.append(make_event("junk"))  # replaced by the snapshot
    follower.install_snapshot(staged, manifest, leader.wal.terms.to_list())
    assert follower.last_position == leader.manifest_position()
    assert follower.entity_version("junk") == 0
    assert follower.entity_version("e0") == 10
    shipped = b"".join(r.raw for r in leader.wal.read_from(31))
    frame = verify_frame(shipped, 30, manifest.last_term, manifest.chain_bytes, 1, 1 << 20)
    follower.apply_frame(frame).result()
    assert all_events(follower) == all_events(leader)
    assert [r.raw for r in follower.wal.read_from(31)] == [r.raw for r in leader.wal.read_from(31)]
    follower.close()
    follower = open_store(tmp_path / "follower")
    assert all_events(follower) == list(range(1, 41))
    assert follower.entity_version("e1") == leader.entity_version("e1")
    follower.close()
    leader.close()


def test_compaction_merges_parts_without_changing_any_answer(tmp_path: Path) -> None:
    import uuid

    store = open_store(tmp_path, compaction_fanin_min=3, parquet_row_group_rows=16)
    ids = []
    for round_ in range(5):
        for i in range(40):
            eid = uuid.uuid4()
            ids.append(eid)
            store.append(make_event(f"e{i % 6}", id=eid, payload={"r": round_, "i": i}))
        store.checkpoint()
    store.append(make_event("e1"))
    before = [msgspec.to_builtins(e) for e in store.query(QueryFilter(), limit=1000).events]
    by_entity = all_events(store, entity_id="e3")
    while store.compact() is not None:  # the background compactor may have started already
        pass
    assert len(store.manifest.parts) < 5
    assert store.compactions >= 1
    merged = store.manifest.parts[0]
    assert merged.events > 40
    on_disk = {p.name for p in store.parts_dir.glob("*.parquet")}
    assert on_disk == {p.file for p in store.manifest.parts}
    after = [msgspec.to_builtins(e) for e in store.query(QueryFilter(), limit=1000).events]
    assert after == before
    assert all_events(store, entity_id="e3") == by_entity
    # ids stay deduplicated through the merged part
    assert store.append(make_event("e1", id=ids[7], payload={"r": 0, "i": 7})).lsn == 8
    with pytest.raises(IdConflict):  # and the merged part's copy is what a reuse is checked with
        store.append(make_event("e0", id=ids[7]))
    rows = duckdb.sql(
        f"select count(*), count(distinct lsn), min(lsn), max(lsn) "
        f"from read_parquet('{store.parts_dir / merged.file}')"
    ).fetchall()[0]
    assert rows == (merged.events, merged.events, merged.first_lsn, merged.last_lsn)
    store.close()
    store = open_store(tmp_path, compaction_fanin_min=3, parquet_row_group_rows=16)
    assert [msgspec.to_builtins(e) for e in store.query(QueryFilter(), limit=1000).events] == before
    store.close()


class _Crash(Exception):
    """Stands for the process dying at this point."""


@pytest.mark.parametrize("renames_done", [0, 1, 2, 3])
def test_a_snapshot_install_cut_short_is_finished_on_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renames_done: int
) -> None:
    """The swap of ``install/`` for ``wal/`` and ``checkpoints/`` is four renames behind a
    marker file; a crash after any of them leaves a store the next open finishes installing,
    never half old and half new."""
    import shutil

    leader = open_store(tmp_path / "leader")
    for i in range(30):
        leader.append(make_event(f"e{i % 3}", payload={"i": i}))
    leader.checkpoint()
    manifest = leader.manifest
    staged = tmp_path / "staged"
    staged.mkdir()
    for part in manifest.parts:
        shutil.copy(leader.parts_dir / part.file, staged / part.file)
    follower_dir = tmp_path / "follower"
    follower = open_store(follower_dir)
    for _ in range(5):
        follower.append(make_event("junk"))  # replaced by the snapshot

    swaps = 0
    replace = os.replace

    def crashing_replace(src: Any, dst: Any) -> None:
        nonlocal swaps
        if Path(src).parent.name == "install" or Path(dst).parent.name == "install-trash":
            if swaps == renames_done:
                raise _Crash
            swaps += 1
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(_Crash):
        follower.install_snapshot(staged, manifest, leader.wal.terms.to_list())
    monkeypatch.setattr(os, "replace", replace)
    assert (follower_dir / INSTALL_MARKER).exists()
    follower.close()  # what is left of the "dead" process

    again = open_store(follower_dir)  # the "restart"
    assert not (follower_dir / INSTALL_MARKER).exists()
    assert not (follower_dir / "install").exists()
    assert again.manifest == manifest
    assert again.last_position == leader.manifest_position()
    assert again.entity_version("junk") == 0
    assert all_events(again) == list(range(1, 31))
    assert again.append(make_event("e0")).lsn == 31  # the log continues from the snapshot
    again.close()
    leader.close()


def _wait_for(check: Callable[[], bool], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_held_compaction_waits_for_the_release_or_the_parts_cap(tmp_path: Path) -> None:
    # parts of one event each, merged two at a time
    store = open_store(
        tmp_path, compaction_fanin_min=2, compaction_events_max=2, compaction_held_parts_max=6
    )
    store.hold_compaction(True)  # as a follower does while it catches up
    for round_ in range(5):
        store.append(make_event(f"e{round_}"))
        store.checkpoint()
    assert not store.parts.may_compact()  # the compactor thread's own test: closed below the cap
    assert (len(store.manifest.parts), store.compactions) == (5, 0)
    store.append(make_event("e5"))
    store.checkpoint()  # the 6th part reaches the cap: merging starts while still held ...
    assert _wait_for(lambda: len(store.manifest.parts) == 5)
    assert not store.parts.may_compact()
    assert (len(store.manifest.parts), store.compactions) == (5, 1)  # ... and stops below it
    store.hold_compaction(False)  # caught up: every pair is merged
    assert _wait_for(lambda: [p.events for p in store.manifest.parts] == [2, 2, 2])
    assert [e.entity_id for e in store.query(QueryFilter(), limit=10).events] == [
        f"e{i}" for i in range(6)
    ]
    store.close()


def test_pinned_parts_outlive_their_compaction(tmp_path: Path) -> None:
    store = Store.open(
        StoreConfig(
            tmp_path,
            fsync=FsyncPolicy.parse("never"),
            limits=Limits(compaction_fanin_min=2),
            checkpoints=False,  # no background compactor: this test drives it
        )
    )
    for _ in range(3):
        store.append(make_event("a"))
        store.checkpoint()
    pinned = store.pin_parts([p.file for p in store.manifest.parts])
    assert store.compact() is not None
    assert all((store.parts_dir / f).exists() for f in pinned)
    store.unpin_parts(pinned)
    assert not any((store.parts_dir / f).exists() for f in pinned)
    store.close()


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.binary(min_size=16, max_size=16), max_size=50))
def test_uuid_column_matches_the_canonical_text(ids: list[bytes]) -> None:
    """Checkpoints format ids in one vectorized pass; each must read as ``uuid.UUID`` does."""
    import uuid

    from walship.storage.parquet import uuid_strings

    assert uuid_strings(ids).to_pylist() == [str(uuid.UUID(bytes=i)) for i in ids]


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=50))
def test_vectorized_id_hashes_match_id_hash(ids: list[bytes]) -> None:
    """Checkpoints hash ids in one pass, and parts read back hash their id column in one pass
    (any case); both must give the dedupe index ``id_hash``'s keys."""
    import pyarrow as pa

    from walship.storage.parquet import id_hash, id_hashes, id_hashes_of_text, uuid_strings

    expected = [id_hash(i) for i in ids]
    assert id_hashes(ids).tolist() == expected
    text = uuid_strings(ids)
    for column in (text, pa.array([s.upper() for s in text.to_pylist()]), text.slice(1)):
        hashes = id_hashes_of_text(column)
        assert hashes is not None
        assert hashes.tolist() == expected[len(ids) - len(column) :]


def test_part_ids_not_written_as_walship_writes_them_are_hashed_one_by_one(
    tmp_path: Path,
) -> None:
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    from walship.storage.parquet import PartReader, id_hash, id_hashes_of_text

    ids = [uuid.uuid4().bytes for _ in range(3)]
    odd = pa.array([f"{{{uuid.UUID(bytes=ids[0])}}}", ids[1].hex(), str(uuid.UUID(bytes=ids[2]))])
    assert id_hashes_of_text(odd) is None
    assert id_hashes_of_text(pa.array(["g" * 36])) is None
    assert id_hashes_of_text(pa.array([None], pa.string())) is None
    store = open_store(tmp_path)
    for i in range(3):
        store.append(make_event(f"e{i}"))
    store.checkpoint()
    part = store.manifest.parts[0]
    path = store.parts_dir / part.file
    written = PartReader(path, part).id_hashes()
    assert written.tolist() == sorted(
        id_hash(uuid.UUID(s).bytes) for s in pq.read_table(path).column("id").to_pylist()
    )
    pq.write_table(pq.read_table(path).set_column(2, "id", odd), path)
    assert PartReader(path, part).id_hashes().tolist() == sorted(id_hash(i) for i in ids)
    store.close()


def test_an_append_larger_than_followers_hold_is_refused_whole(tmp_path: Path) -> None:
    """Followers hold an atomic append in memory until its last record arrives, so one append
    is bounded in bytes (not only in events) for every caller, HTTP or embedded."""
    limits = Limits(record_bytes_max=8 * 1024, frame_bytes_max=16 * 1024, append_bytes_max=16_384)
    store = Store.open(StoreConfig(tmp_path, limits=limits))
    try:
        big = [make_event(f"e{i}", payload={"pad": "x" * 3000}) for i in range(8)]
        with pytest.raises(LimitExceeded, match="atomic append"):
            store.append_batch(big)
        assert store.stats()["events"] == 0
        assert store.append_batch(big[:4])[-1].lsn == 4  # under the limit: stored
    finally:
        store.close()


def test_every_payload_intake_accepts_can_be_checkpointed(store: Store) -> None:
    """What ``prepare`` lets in, Arrow's string columns take: non-ASCII text, escaped
    surrogate pairs, control characters as escapes; and what Arrow refuses is refused at
    intake, naming the field, so no event can stop the checkpoints."""
    good = [
        b'{"name":"\xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80"}',
        b'{"x":"\\ud83d\\ude00","y":"\\u0000\\n"}',
        b'"\xe2\x82\xac"',
    ]
    for i, raw in enumerate(good):
        store.append(
            EventIn(
                entity_id=f"u{i}",
                event_type="t",
                payload=msgspec.Raw(raw),
                metadata=msgspec.Raw(b'{"m":"\xc3\xbc"}'),
            )
        )
    for raw, field in [(b'"\xff"', "payload"), (b'{"k":"\xed\xb2\x80"}', "payload")]:
        with pytest.raises(ValidationError) as info:
            store.append(EventIn(entity_id="bad", event_type="t", payload=msgspec.Raw(raw)))
        assert info.value.details["field"] == field
    with pytest.raises(ValidationError) as info:
        store.append(
            EventIn(
                entity_id="bad",
                event_type="t",
                payload=msgspec.Raw(b"1"),
                metadata=msgspec.Raw(b'{"k":"\x80"}'),
            )
        )
    assert info.value.details["field"] == "metadata"
    assert store.checkpoint() is not None
    assert [ev.payload for ev in store.query(QueryFilter()).events] == good


def _break_parts_dir(store: Store) -> None:
    """Make every checkpoint fail for real: the parts directory becomes a plain file."""
    for leftover in store.parts_dir.iterdir():
        leftover.unlink()
    store.parts_dir.rmdir()
    store.parts_dir.write_text("not a directory\n")


def _mend_parts_dir(store: Store) -> None:
    store.parts_dir.unlink()
    store.parts_dir.mkdir()


def test_a_failing_checkpoint_is_an_alarm_until_one_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint that keeps failing is kept as ``checkpoint_failure`` (and a metric),
    logged once rather than at every retry, retried with backoff, and cleared, with a log
    line, by the first checkpoint that works."""
    limits = Limits(
        memtable_events_max=10,
        checkpoint_retry_ms_min=20,
        checkpoint_retry_ms_max=100,
        checkpoint_failure_log_interval_ms=600_000,
    )
    store = Store.open(
        StoreConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never"), limits=limits)
    )
    registry = store.metrics.registry
    try:
        _break_parts_dir(store)
        caplog.set_level("WARNING", logger="walship.store")
        store.append_batch([make_event(f"e{i}") for i in range(15)])
        deadline = time.monotonic() + 30
        while (store.checkpoint_failure is None or store.checkpoint_failure.failures < 4) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.02)
        failure = store.checkpoint_failure
        assert failure is not None and failure.failures >= 4, failure
        assert "NotADirectoryError" in failure.error
        assert store.stats()["checkpoint_failing"] is True
        assert registry.get_sample_value("walship_checkpoint_failing") == 1
        assert registry.get_sample_value("walship_checkpoint_failures_total") >= 4
        alarms = [r for r in caplog.records if "checkpoint failing" in r.getMessage()]
        assert len(alarms) == 1 and alarms[0].levelname == "ERROR", alarms
        assert alarms[0].exc_info is not None  # the first one carries the traceback
        _mend_parts_dir(store)
        deadline = time.monotonic() + 30

        def mended() -> bool:
            # the checkpointer clears the failure, then sets the gauge, then logs: wait for
            # all three (a loaded machine can pause it between them)
            return (
                store.checkpoint_failure is None
                and registry.get_sample_value("walship_checkpoint_failing") == 0
                and any("checkpoints work again" in r.getMessage() for r in caplog.records)
            )

        while not mended() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.checkpoint_failure is None
        assert store.checkpoints_taken >= 1 and store.manifest.last_lsn >= 15
        assert registry.get_sample_value("walship_checkpoint_failing") == 0
        assert any("checkpoints work again" in r.getMessage() for r in caplog.records)
    finally:
        store.close()


def test_checkpoint_alarm_backs_off_and_logs_on_change_or_interval() -> None:
    from walship.storage.alarm import CheckpointAlarm

    alarm = CheckpointAlarm(retry_ms_min=1_000, retry_ms_max=8_000, log_interval_ms=60_000)
    assert alarm.state(0.0) is None and alarm.retry_due(0.0)
    logged = [alarm.failed("disk", now=float(t), wall=100.0) for t in range(5)]
    assert logged == [True, False, False, False, False]  # not at every retry
    state = alarm.state(4.0)
    assert state is not None and state.failures == 5 and state.since_s == 100.0
    assert state.retry_in_ms == 8_000  # 1, 2, 4, 8, then capped at 8 s
    assert not alarm.retry_due(11.9) and alarm.retry_due(12.0)
    assert alarm.failed("other error", now=12.0, wall=112.0)  # a new error is said at once
    assert not alarm.failed("other error", now=13.0, wall=113.0)
    assert alarm.failed("other error", now=73.0, wall=173.0)  # and again after the interval
    assert alarm.succeeded() == 8 and alarm.state(74.0) is None and alarm.retry_due(74.0)
    assert alarm.succeeded() == 0


_NOT_JSON_A_READER_TAKES = [
    ("syntax", b"{not json"),
    ("two values", b"{} {}"),
    ("empty", b""),
    ("lone surrogate escape", b'{"\\ud800":1}'),
    ("invalid UTF-8", b'"\xff"'),
    ("past a double", b"[1e999]"),
]


@pytest.mark.parametrize("field", ["payload", "metadata"])
@pytest.mark.parametrize(
    "raw", [c[1] for c in _NOT_JSON_A_READER_TAKES], ids=[c[0] for c in _NOT_JSON_A_READER_TAKES]
)
def test_the_embedded_store_refuses_raw_json_no_reader_takes(
    store: Store, field: str, raw: bytes
) -> None:
    """The embedded API takes ``msgspec.Raw`` from the caller, which nothing had parsed: invalid
    JSON was stored, shipped to followers and put in every query page (an HTTP body that is
    not JSON), and the entity's state failed for good."""
    store.append(make_event("e", payload={"a": 1}))
    before = store.wal.last_position
    event = make_event("e", payload={"a": 2})
    event = msgspec.structs.replace(event, **{field: msgspec.Raw(raw)})
    with pytest.raises(ValidationError) as info:
        store.append(event)
    assert info.value.details["field"] == field
    assert store.wal.last_position == before
    assert store.entity_state("e").state == {"a": 1}


def test_the_embedded_store_refuses_an_entity_id_utf8_cannot_encode(store: Store) -> None:
    """A lone surrogate in a Python str: it failed with a UnicodeEncodeError from the encoder
    instead of a ValidationError naming the field."""
    with pytest.raises(ValidationError) as info:
        store.append(make_event("order-\udc80"))
    assert info.value.details["field"] == "entity_id"
    assert store.wal.last_position.lsn.value == 0
