"""Stream reads of one entity by version range (forward and backward), its current version and
reads by id, over events spread across several Parquet parts and the memtables: each answer is
exactly what a full scan of the log, filtered, would give."""

from __future__ import annotations

import dataclasses
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_event
from walship.events import StoredEvent
from walship.limits import Limits
from walship.storage.entity_reads import EntityReader
from walship.storage.parquet import PartReader
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

LIMITS = Limits(parquet_row_group_rows=8, query_limit_max=10_000)
ENTITIES = [("default", "acct-0"), ("default", "acct-1"), ("t2", "acct-0"), ("default", "a/b")]


@pytest.fixture
def spread(tmp_path: Path) -> Iterator[Store]:
    """A store whose events lie in four parts (tiny row groups) and the active memtable."""
    store = Store.open(
        StoreConfig(
            tmp_path / "data", fsync=FsyncPolicy.parse("never"), limits=LIMITS, checkpoints=False
        )
    )
    rng = random.Random(13)
    try:
        for round_ in range(5):
            for i in range(60):
                tenant, entity = rng.choice(ENTITIES)
                store.append(make_event(entity, tenant_id=tenant, payload={"r": round_, "i": i}))
            if round_ < 4:
                assert store.checkpoint() is not None
        assert len(store.manifest.parts) == 4
        yield store
    finally:
        store.close()


def full_scan(store: Store) -> list[StoredEvent]:
    return store.query(QueryFilter(), LIMITS.query_limit_max).events


def expected(
    log: list[StoredEvent],
    tenant: str,
    entity: str,
    lo: int,
    hi: int | None,
    backward: bool,
    limit: int,
) -> list[tuple[int, int]]:
    rows = [
        (ev.version, ev.lsn)
        for ev in log
        if ev.tenant_id == tenant
        and ev.entity_id == entity
        and ev.version >= lo
        and (hi is None or ev.version <= hi)
    ]
    if backward:
        rows.reverse()
    return rows[:limit]


def test_version_ranges_forward_and_backward_match_a_filtered_full_scan(spread: Store) -> None:
    rng = random.Random(7)
    log = full_scan(spread)
    by_lsn = {ev.lsn: ev for ev in log}
    for tenant, entity in ENTITIES:
        current = spread.entities.current_version(entity, tenant)
        assert current == sum(1 for ev in log if (ev.tenant_id, ev.entity_id) == (tenant, entity))
        cases = [(1, None, 1000), (0, None, 3), (current, current, 5), (current + 1, None, 10)]
        cases += [
            (rng.randint(0, current + 2), rng.choice([None, rng.randint(0, current + 2)]), lim)
            for lim in (1, 2, 7, 30)
            for _ in range(5)
        ]
        for lo, hi, limit in cases:
            for backward in (False, True):
                got, at = spread.entities.read(
                    entity, tenant, from_version=lo, to_version=hi, backward=backward, limit=limit
                )
                assert at == current
                want = expected(log, tenant, entity, lo, hi, backward, limit)
                assert [(ev.version, ev.lsn) for ev in got] == want, (lo, hi, limit, backward)
                assert all(by_lsn[ev.lsn] == ev for ev in got)


def test_unknown_entity_reads_empty_at_version_zero(spread: Store) -> None:
    assert spread.entities.read("nobody", limit=10) == ([], 0)
    assert spread.entities.read("acct-0", "no-such-tenant", limit=10) == ([], 0)
    assert spread.entities.current_version("nobody") == 0


def test_a_version_range_reads_only_the_row_groups_that_hold_it(
    spread: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No full-stream scan: the last two versions of an entity touch at most two row groups
    of one part (rows sorted by entity, 8 rows per group), however long the stream."""
    read: list[list[int]] = []
    original = PartReader.read_row_groups

    def counting(self: PartReader, groups: list[int]) -> object:
        read.append(groups)
        return original(self, groups)

    monkeypatch.setattr(PartReader, "read_row_groups", counting)
    spread.checkpoint()  # everything in parts now
    current = spread.entities.current_version("acct-1")
    assert current > 20
    got, _ = spread.entities.read("acct-1", backward=True, limit=2)
    assert [ev.version for ev in got] == [current, current - 1]
    assert sum(len(g) for g in read) <= 2, read
    read.clear()
    got, _ = spread.entities.read("acct-1", from_version=3, to_version=4, limit=100)
    assert [ev.version for ev in got] == [3, 4]
    assert sum(len(g) for g in read) <= 2, read


def test_events_not_yet_written_are_not_read(store: Store) -> None:
    """The current version and the events read stop at what the WAL has written: a view whose
    visible lsn is 3 (records 4 and 5 still in the group commit) shows versions 1..3."""
    for _ in range(5):
        store.append(make_event("e"))
    reader = EntityReader(lambda: dataclasses.replace(store.read_view(), visible=3))
    assert reader.current_version("e") == 3
    got, current = reader.read("e", limit=10)
    assert current == 3 and [ev.version for ev in got] == [1, 2, 3]
    got, _ = reader.read("e", backward=True, limit=10)
    assert [ev.version for ev in got] == [3, 2, 1]
    last = store.query(QueryFilter(), 10).events[-1]
    assert reader.find(last.id) is None and store.entities.find(last.id) == last


def test_find_by_id_in_parts_and_memtable(spread: Store) -> None:
    events = full_scan(spread)
    for ev in (events[0], events[100], events[-1]):
        assert spread.entities.find(ev.id) == ev
    assert spread.entities.find(b"\x01" * 16) is None


def test_commit_listeners_survive_a_snapshot_install(tmp_path: Path) -> None:
    """The node's "visible lsn advanced" pulse (what read-your-writes waits and subscriptions
    wake on) is a WAL commit listener: a follower that installs a snapshot gets a new WAL and
    must keep its listeners, or every waiter falls back to polling."""
    source = Store.open(StoreConfig(tmp_path / "src", fsync=FsyncPolicy.parse("never")))
    try:
        for i in range(5):
            source.append(make_event(f"e{i}"))
        source.checkpoint()
        manifest = source.manifest
        staged = tmp_path / "staged"
        staged.mkdir()
        for part in manifest.parts:
            shutil.copy(source.parts_dir / part.file, staged / part.file)
    finally:
        source.close()
    target = Store.open(StoreConfig(tmp_path / "dst", fsync=FsyncPolicy.parse("never")))
    try:
        heard: list[int] = []
        target.wal.add_listener(heard.append)
        target.install_snapshot(staged, manifest, [(1, 1)])
        assert target.wal.listeners == [heard.append]
        target.append(make_event("after"))
        assert heard and heard[-1] == manifest.last_lsn + 1
        target.reset_to_empty()  # the other path through install_snapshot: still once
        assert target.wal.listeners == [heard.append]
    finally:
        target.close()


def test_find_by_id_in_a_part_reads_the_id_column_and_one_row_group(
    spread: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading an event (or checking a resent id) never reads a part's payloads whole."""
    import pyarrow.parquet as pq

    reads: list[object] = []
    original = pq.ParquetFile.read

    def recording(self: pq.ParquetFile, columns: object = None, **kw: object) -> object:
        reads.append(columns)
        return original(self, columns=columns, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pq.ParquetFile, "read", recording)
    spread.checkpoint()
    target = full_scan(spread)[77]
    reads.clear()
    assert spread.entities.find(target.id) == target
    assert reads and all(columns == ["id"] for columns in reads), reads
