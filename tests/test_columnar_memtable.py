"""The memtable as Arrow record batches (issue 15, item 2): a checkpoint of the batches writes
the bytes the per-event conversion wrote, and reads, splits, truncations and duplicate checks
that cross or cut a batch answer as they did with one object per event."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from walship.errors import IdConflict
from walship.events import EventIn, StoredEvent
from walship.limits import DEFAULT_LIMITS
from walship.position import Lsn
from walship.storage.memtable import SEAL_ROWS_MIN, Memtable, seal_tail
from walship.storage.parquet import (
    DICTIONARY_COLUMNS,
    SCHEMA,
    PartReader,
    uuid_strings,
    write_part,
    write_part_rows,
)
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy


def _event(lsn: int, *, tenant: str = "default", binary_every: int = 7) -> StoredEvent:
    binary = lsn % binary_every == 0
    payload = bytes([lsn % 256, 0, 255]) if binary else f'{{"n": {lsn}, "s": "é"}}'.encode()
    return StoredEvent(
        lsn,
        1 + lsn // 500,
        uuid.UUID(int=lsn * 7919 + 13).bytes,
        tenant if lsn % 5 else "other",
        f"e-{lsn % 11}",
        "t.odd" if lsn % 2 else "t.even",
        1_700_000_000_000_000 + lsn * 1000,
        lsn // 11 + 1,
        payload,
        None if lsn % 3 else b'{"m": 1}',
        lsn,
        binary,
    )


def _old_part_bytes(path: Path, events: list[StoredEvent], rows: int) -> bytes:
    """The part file the per-event conversion (before issue 15, item 2) wrote for ``events``."""
    order = pc.sort_indices(
        pa.table(
            {
                "tenant_id": pa.array([e.tenant_id for e in events], pa.string()),
                "entity_id": pa.array([e.entity_id for e in events], pa.string()),
                "lsn": pa.array([e.lsn for e in events], pa.int64()),
            }
        ),
        sort_keys=[("tenant_id", "ascending"), ("entity_id", "ascending"), ("lsn", "ascending")],
    ).to_pylist()

    def table(evs: list[StoredEvent]) -> pa.Table:
        return pa.table(
            {
                "lsn": pa.array([e.lsn for e in evs], pa.int64()),
                "term": pa.array([e.term for e in evs], pa.int64()),
                "id": uuid_strings([e.id for e in evs]),
                "tenant_id": pa.array([e.tenant_id for e in evs], pa.string()),
                "entity_id": pa.array([e.entity_id for e in evs], pa.string()),
                "event_type": pa.array([e.event_type for e in evs], pa.string()),
                "timestamp": pa.array([e.timestamp_us for e in evs], pa.timestamp("us", tz="UTC")),
                "payload": pa.array(
                    [None if e.payload_binary else e.payload for e in evs], pa.binary()
                ).cast(pa.string()),
                "metadata": pa.array([e.metadata for e in evs], pa.binary()).cast(pa.string()),
                "version": pa.array([e.version for e in evs], pa.int64()),
                "tenant_position": pa.array([e.tenant_position for e in evs], pa.int64()),
                "payload_binary": pa.array([e.payload_binary for e in evs], pa.bool_()),
                "payload_bytes": pa.array(
                    [e.payload if e.payload_binary else None for e in evs], pa.binary()
                ),
            },
            schema=SCHEMA,
        )

    full = pa.concat_tables(
        [table([events[i] for i in order[at : at + 2048]]) for at in range(0, len(order), 2048)]
    )
    pq.write_table(
        full, path, row_group_size=rows, compression="zstd", use_dictionary=DICTIONARY_COLUMNS
    )
    return path.read_bytes()


def _layered(events: list[StoredEvent], sizes: list[int]) -> Memtable:
    """A memtable of ``events`` in batches of ``sizes``, the rest in its open tail (appended
    one by one)."""
    mem = Memtable()
    at = 0
    for size in sizes:
        mem.add_all(events[at : at + size])
        mem.seal()
        at += size
    for ev in events[at:]:
        mem.add_all([ev])
    return mem


@pytest.mark.parametrize("binary_every", [7, 1_000_000])
def test_a_checkpoint_of_batches_writes_the_bytes_of_the_per_event_conversion(
    tmp_path: Path, binary_every: int
) -> None:
    """Physical followers compare sha256s of parts: one that checkpoints its own memtable
    must write what a node of the previous version writes for the same events (with and
    without binary payloads)."""
    events = [_event(lsn, binary_every=binary_every) for lsn in range(1, 5_001)]
    old = _old_part_bytes(tmp_path / "old.parquet", events, 1_000)
    mem = _layered(events, [1_000, 3, 2_000, SEAL_ROWS_MIN, 1_500])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    info = write_part_rows(tmp_path / "a", mem.table(), 1, 5_000, 1_000)
    assert (tmp_path / "a" / info.file).read_bytes() == old
    assert info.sha256 == hashlib.sha256(old).hexdigest()
    again = write_part(tmp_path / "b", events, 1, 5_000, 1_000)
    assert again == info
    rows = PartReader(tmp_path / "a" / info.file, info).select(QueryFilter(), 10_000)
    assert rows == events


@pytest.mark.parametrize("sizes", [[600], [300, 300], [100, 300]])
def test_select_over_batches_and_tail_matches_a_filter_of_the_events(sizes: list[int]) -> None:
    events = [_event(lsn) for lsn in range(1, 701)]
    mem = _layered(events, sizes)
    filters = [
        QueryFilter(),
        QueryFilter(from_lsn=250, to_lsn=650),
        QueryFilter(tenant_id="default", entity_id="e-3"),
        QueryFilter(tenant_id="other", entity_id="e-5", from_lsn=100),
        QueryFilter(event_type="t.odd", from_lsn=290),
        QueryFilter(event_type_prefix="t.e", since_us=1_700_000_000_300_000),
        QueryFilter(tenant_id="other", until_us=1_700_000_000_500_000),
        QueryFilter(tenant_ids=frozenset({"other"}), from_position=200, to_position=400),
    ]
    for flt in filters:
        for visible, limit in ((700, 1_000), (650, 17), (299, 5)):
            want = [ev for ev in events if ev.lsn <= visible and flt.matches(ev)][:limit]
            assert mem.select(flt, visible, limit) == want, (flt, visible, limit)
    assert mem.events_at([3, 299, 300, 301, 650, 10_000]) == [
        events[i - 1] for i in (3, 299, 300, 301, 650)
    ]
    assert len(mem) == 700 and mem.first_lsn == 1 and mem.last_lsn == 700
    assert mem.bytes == sum(ev.size_bytes() for ev in events)


def test_split_inside_a_batch_keeps_every_row_on_one_side() -> None:
    events = [_event(lsn) for lsn in range(1, 801)]
    mem = _layered(events, [500, 280])  # a batch of 500, one of 280, a tail of 20
    for cut in (0, 1, 250, 500, 650, 780, 790, 800):
        head, rest = mem.split_at(cut)
        assert head.select(QueryFilter(), 10_000, 10_000) == events[:cut]
        assert rest.select(QueryFilter(), 10_000, 10_000) == events[cut:]
        assert len(head) + len(rest) == 800
        assert head.bytes + rest.bytes == mem.bytes
        assert head.lsn_array().tolist() == list(range(1, cut + 1))
        assert head.id_bytes() == b"".join(ev.id for ev in events[:cut])
        key = "default\x00e-4"
        want = [ev for ev in events[cut:] if ev.tenant_id == "default" and ev.entity_id == "e-4"]
        found = rest.entity_lsns(key)
        assert (found[0] if found else []) == [ev.lsn for ev in want]
    # the memtable split is left as it was (a reader's view may hold it)
    assert mem.select(QueryFilter(), 10_000, 10_000) == events


def test_truncation_inside_a_batch_forgets_ids_and_entities_after_it() -> None:
    events = [_event(lsn) for lsn in range(1, 701)]
    mem = _layered(events, [400, 290])  # the cut falls in the second batch
    assert mem.find_id(events[500].id) == events[500]  # builds the id index
    assert mem.entity_lsns("default\x00e-1") is not None  # and the entity index
    removed = mem.truncate_after(450)
    assert removed == events[450:]
    assert mem.select(QueryFilter(), 10_000, 10_000) == events[:450]
    assert mem.find_id(events[500].id) is None
    assert mem.find_id(events[449].id) == events[449]
    lsns, versions = mem.entity_lsns("default\x00e-1") or ([], [])
    want = [ev for ev in events[:450] if ev.tenant_id == "default" and ev.entity_id == "e-1"]
    assert lsns == [ev.lsn for ev in want] and versions == [ev.version for ev in want]
    assert mem.bytes == sum(ev.size_bytes() for ev in events[:450]) and len(mem) == 450
    # the rolled-back lsns are taken again, by other events
    again = [replace_lsn(_event(lsn + 10_000), lsn) for lsn in range(451, 461)]
    mem.add_all(again)
    assert mem.select(QueryFilter(from_lsn=440), 10_000, 10_000) == events[439:450] + again
    assert mem.find_id(again[0].id) == again[0]
    assert mem.truncate_after(0) == events[:450] + again and len(mem) == 0


def replace_lsn(ev: StoredEvent, lsn: int) -> StoredEvent:
    import msgspec

    return msgspec.structs.replace(ev, lsn=lsn)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    limits = replace(DEFAULT_LIMITS, memtable_events_max=1_000_000, checkpoint_interval_ms=3600_000)
    s = Store.open(StoreConfig(tmp_path, fsync=FsyncPolicy.parse("never"), limits=limits))
    yield s
    s.close()


def _ins(n: int, prefix: str, ids: list[uuid.UUID] | None = None) -> list[EventIn]:
    import msgspec

    return [
        EventIn(
            entity_id=f"{prefix}-{i % 3}",
            event_type="t",
            payload=msgspec.Raw(b'{"i": %d}' % i),
            id=None if ids is None else ids[i],
        )
        for i in range(n)
    ]


def test_duplicates_are_found_across_batches_tail_and_a_partial_checkpoint(store: Store) -> None:
    n = SEAL_ROWS_MIN + 176
    ids = [uuid.uuid4() for _ in range(n)]
    first = store.append_batch(_ins(n, "a", ids))
    seal_tail(store.core.lock, lambda: store.core.active)  # as the checkpointer does (if not yet)
    singles = [store.append(_ins(1, "b")[0]) for _ in range(5)]  # the open tail
    # the same ids again, one at a time and as a batch: their first receipts, no new lsns
    again = store.append(_ins(n, "a", ids)[123])
    assert again.duplicate and again.lsn == first[123].lsn
    batch = store.append_batch(_ins(n, "a", ids)[n - 10 :] + _ins(2, "c"))
    assert [r.duplicate for r in batch] == [True] * 10 + [False, False]
    assert [r.lsn for r in batch[:10]] == [r.lsn for r in first[n - 10 :]]
    with pytest.raises(IdConflict):
        changed = _ins(n, "a", ids)[7]
        changed.entity_id = "elsewhere"
        store.append(changed)
    # a checkpoint through the middle of the batch: ids on both sides are still duplicates
    half = n // 2
    assert store.checkpoint_through(Lsn(first[half - 1].lsn)) is not None
    assert store.manifest.last_lsn == first[half - 1].lsn
    for i in (0, half - 1, half, n - 1):
        receipt = store.append(_ins(n, "a", ids)[i])
        assert receipt.duplicate and receipt.lsn == first[i].lsn
    events = store.query(QueryFilter(), limit=2_000).events
    assert [ev.lsn for ev in events] == list(range(1, n + 8))
    state = store.entity_state("a-1")
    last_a1 = max(i for i in range(n) if i % 3 == 1)
    assert state.version == n // 3 and state.last_lsn == first[last_a1].lsn
    recent = store.recent_events(first[half - 1].lsn, 10_000, 10_000)
    assert recent == events[half:]
    assert singles[-1].lsn == n + 5
    store.checkpoint()
    assert store.query(QueryFilter(), limit=2_000).events == events
    # a part written through the batch, then the rest: each event once, in lsn order
    parts = sorted(os.listdir(store.parts_dir))
    assert len(parts) == 2


def test_a_seal_taken_before_a_truncation_is_not_put_in_place() -> None:
    """The checkpointer seals the tail outside the store lock: a rollback meanwhile wins."""
    events = [_event(lsn) for lsn in range(1, 2_001)]
    mem = _layered(events[:1_000], [500])
    mem.add_all(events[1_000:])
    assert seal_tail(threading.Lock(), lambda: mem)
    assert mem.select(QueryFilter(), 10_000, 10_000) == events
    mem.add_all([replace_lsn(_event(lsn), lsn) for lsn in range(2_001, 2_001 + SEAL_ROWS_MIN)])
    job = mem.tail_job(SEAL_ROWS_MIN)
    assert job is not None
    chunk = job.seal()
    mem.truncate_after(2_010)
    assert not mem.install(job, chunk)
    assert mem.lsn_array().tolist() == list(range(1, 2_011))
    job = mem.tail_job(1)
    assert job is not None and mem.install(job, job.seal())
    assert mem.select(QueryFilter(from_lsn=1_990), 10_000, 10_000) == [
        _event(lsn) for lsn in range(1_990, 2_011)
    ]
    assert mem.tail_job(1) is None
