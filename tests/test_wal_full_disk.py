"""A full disk in the WAL: the failed group is rolled back, appends are refused without taking
lsns, and writes resume at the next lsn once space is back -- with nothing of the refused
writes left on disk, in the WAL's counters or in the store.

The disk is simulated in-process: ``FullDisk`` (tests/fulldisk.py) replaces the ``os`` module
the WAL calls and, while armed, fails ``pwrite`` and ``posix_fallocate`` (the free-space
probe) with ENOSPC or EDQUOT; segment creation is failed by replacing ``create_segment``.
The real-disk version of the story, on a small tmpfs, is in test_storage_faults.py; a
follower's, in test_replication_unit.py.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import walship.wal.log as wal_log
from tests.conftest import make_event
from tests.fulldisk import FullDisk
from tests.walfiles import shipped
from walship.errors import StorageFull, TrackingConflict, VersionConflict, WalFailed
from walship.events import TrackingIn
from walship.limits import Limits
from walship.position import Lsn, Term
from walship.storage.consumers import ConsumerPosition
from walship.store import Store, StoreConfig
from walship.wal import AppendResult, FsyncPolicy, Wal
from walship.wal.record import GENESIS_CHAIN, next_chain
from walship.wal.segment import (
    SEGMENT_HEADER_BYTES,
    SegmentHeader,
    create_segment,
    list_segments,
)

PROBE_MS = 20
LIMITS = Limits(storage_full_probe_ms=PROBE_MS)
RECORD_BYTES = 32 + 100  # header + body(i)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> FullDisk:
    fake = FullDisk()
    monkeypatch.setattr(wal_log, "os", fake)
    return fake


def open_wal(path: Path, limits: Limits = LIMITS) -> Wal:
    wal = Wal.open(path, fsync=FsyncPolicy.parse("always"), limits=limits)
    if wal.terms.current == Term(0):
        wal.begin_term(Term(1))
    return wal


def body(i: int, size: int = 100) -> bytes:
    return f"record-{i}".encode().ljust(size, b".")


def write(wal: Wal, first: int, n: int) -> None:
    for i in range(first, first + n):
        assert wal.append([body(i)]).done.result().lsn == i


def append_while_held(wal: Wal, disk: FullDisk, lsn: int) -> AppendResult:
    """Append record ``lsn`` and wait until the writer is inside its write of it, held there:
    appends made from now on queue up behind it as the next group."""
    disk.hold()
    in_flight = wal.append([body(lsn)])
    assert disk.held.wait(5)
    return in_flight


def assert_refused(appends: list[AppendResult]) -> None:
    """The write of each append failed with StorageFull."""
    for append in appends:
        with pytest.raises(StorageFull):
            append.done.result(timeout=5)


def wait_for_space(wal: Wal) -> None:
    deadline = time.monotonic() + 5
    while wal.failed is not None:
        assert isinstance(wal.failed, StorageFull), wal.failed
        assert time.monotonic() < deadline, "the WAL did not take writes again"
        time.sleep(PROBE_MS / 1000)


def assert_log(path: Path, bodies: list[bytes], limits: Limits = LIMITS) -> None:
    """Recovery from disk finds exactly ``bodies`` at lsn 1.., chained, with no torn tail."""
    wal = Wal.open(path, limits=limits)
    try:
        assert wal.torn_tail is None
        records = list(wal.read_from(1))
        assert [r.body for r in records] == bodies
        assert [r.lsn for r in records] == list(range(1, len(bodies) + 1))
        chain = GENESIS_CHAIN
        for rec in records:
            assert rec.chain == next_chain(chain, rec.lsn, rec.term, rec.body)
            chain = rec.chain
    finally:
        wal.close()


@pytest.mark.parametrize(
    ("code", "partial"),
    [(errno.ENOSPC, False), (errno.ENOSPC, True), (errno.EDQUOT, False)],
    ids=["enospc", "enospc-torn-write", "edquot"],
)
def test_full_disk_rolls_back_the_group_and_refuses_without_taking_lsns(
    tmp_path: Path, disk: FullDisk, code: int, partial: bool
) -> None:
    wal = open_wal(tmp_path)
    write(wal, 1, 5)
    chain_5 = wal.last_chain
    disk.full, disk.errno, disk.partial = True, code, partial

    refused = wal.append([body(6), body(7)])
    assert refused.first_lsn == Lsn(6)
    with pytest.raises(StorageFull, match="no space left"):
        refused.done.result(timeout=5)
    assert isinstance(wal.failed, StorageFull)
    assert wal.last_position.lsn == Lsn(5) and wal.last_chain == chain_5
    assert wal.status().last_lsn == wal.status().written_lsn == 5
    for _ in range(3):  # refused at once, and no lsn is taken
        with pytest.raises(StorageFull):
            wal.append([body(99)])
    assert wal.last_position.lsn == Lsn(5)
    assert [r.lsn for r in wal.read_from(1)] == [1, 2, 3, 4, 5]
    # cut back to the last written record: nothing of the refused group is left on disk
    assert (tmp_path / "0000000000000001.wal").stat().st_size == 40 + 5 * RECORD_BYTES
    time.sleep(3 * PROBE_MS / 1000)
    assert isinstance(wal.failed, StorageFull), "the probe found space on a full disk"

    disk.full = False
    wait_for_space(wal)
    assert wal.failed is None and wal.status().failed is None
    resumed = wal.append([body(6)])
    assert resumed.first_lsn == Lsn(6)
    resumed.done.result(timeout=5)
    (record_6,) = wal.read_from(6)
    assert record_6.chain == next_chain(chain_5, 6, 1, body(6))
    wal.close()
    assert_log(tmp_path, [body(i) for i in range(1, 7)])


def test_appends_queued_behind_a_failed_group_fail_with_it(tmp_path: Path, disk: FullDisk) -> None:
    """Their lsns were assigned above the failed group, so they cannot be written either."""
    wal = open_wal(tmp_path)
    write(wal, 1, 3)
    disk.full = True
    in_flight = append_while_held(wal, disk, 4)  # the writer took lsn 4 as a group
    queued = [wal.append([body(5)]), wal.append([body(6), body(7)])]
    assert [q.first_lsn.value for q in queued] == [5, 6]
    disk.release()
    assert_refused([in_flight, *queued])
    assert wal.last_position.lsn == Lsn(3)

    disk.full = False
    wait_for_space(wal)
    assert wal.append([body(4)]).first_lsn == Lsn(4)
    wal.close()
    assert_log(tmp_path, [body(i) for i in range(1, 5)])


def test_sync_and_append_future_report_a_rolled_back_group(tmp_path: Path, disk: FullDisk) -> None:
    """What waits for "everything so far" (a checkpoint, a duplicate's receipt) hears of the
    failure, even when the failed group was already being written."""
    wal = open_wal(tmp_path)
    write(wal, 1, 2)
    disk.full = True
    append_while_held(wal, disk, 3)
    everything = wal.append_future()
    assert not everything.done()
    syncing: list[BaseException] = []
    calling = threading.Event()

    def sync() -> None:
        calling.set()
        _catch(wal.sync, syncing)

    syncer = threading.Thread(target=sync)
    syncer.start()
    assert calling.wait(5)
    time.sleep(0.05)
    assert syncer.is_alive(), "sync() returned while a group was still being written"
    disk.release()
    syncer.join(5)
    with pytest.raises(StorageFull):
        everything.result(timeout=5)
    assert len(syncing) == 1 and isinstance(syncing[0], StorageFull)
    wal.close()


def _catch(fn: Any, into: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as exc:
        into.append(exc)


# ---------------------------------------------------------------------------------- new segments

SMALL = Limits(segment_bytes_max=1024, storage_full_probe_ms=PROBE_MS)


class FailingCreate:
    """Replaces ``walship.wal.log.create_segment``: while ``full``, runs out of space
    before the new segment is renamed into place, or after (as if fsyncing the directory)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.full = False

    def __call__(self, directory: Path, header: SegmentHeader, preallocate_bytes: int = 0) -> Path:
        if not self.full:
            return create_segment(directory, header, preallocate_bytes)
        if self.how == "before-rename":
            (directory / f"{header.first_lsn:016x}.wal.tmp").write_bytes(header.encode())
        else:
            create_segment(directory, header, preallocate_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("how", ["before-rename", "after-rename"])
def test_full_disk_while_creating_a_segment_deletes_what_the_group_left(
    tmp_path: Path, disk: FullDisk, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The group fills the active segment, then cannot start the next one: what it wrote into
    the active segment is cut away, and no new segment or temporary file is left."""
    create = FailingCreate(how)
    monkeypatch.setattr(wal_log, "create_segment", create)
    wal = open_wal(tmp_path, SMALL)
    write(wal, 1, 4)  # 40 + 4 * 132 bytes: room for 3 more records in this segment
    blocker = append_while_held(wal, disk, 5)  # written alone; lsn 6..8 are the next group
    group = [wal.append([body(i)]) for i in (6, 7, 8)]  # 6 and 7 fit, 8 needs a new segment
    create.full = True
    disk.release()
    assert blocker.done.result(timeout=5).lsn == 5
    assert_refused(group)
    assert [p.name for _, p in list_segments(tmp_path)] == ["0000000000000001.wal"]
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "0000000000000001.wal").stat().st_size == 40 + 5 * RECORD_BYTES
    assert wal.last_position.lsn == Lsn(5)
    assert [r.lsn for r in wal.read_from(1)] == [1, 2, 3, 4, 5]

    create.full = False
    wait_for_space(wal)
    write(wal, 6, 5)  # rolls over into a new segment this time
    assert len(wal.segment_infos()) > 1
    wal.close()
    assert_log(tmp_path, [body(i) for i in range(1, 11)], SMALL)


def test_a_group_that_rolls_over_first_keeps_its_empty_new_segment(
    tmp_path: Path, disk: FullDisk
) -> None:
    """The group's first record opens a new segment and its write fails there: the segment
    starts right after the last written record, so it stays, empty, as the active one."""
    wal = open_wal(tmp_path, SMALL)
    write(wal, 1, 7)  # 7 records: the first segment has no room for an 8th
    segments_before = len(wal.segment_infos())
    disk.full = True
    with pytest.raises(StorageFull):
        wal.append([body(8)]).done.result(timeout=5)
    infos = wal.segment_infos()
    assert len(infos) == segments_before + 1
    first, path, size = infos[-1]
    assert (first, size) == (8, SEGMENT_HEADER_BYTES)
    assert path.stat().st_size == SEGMENT_HEADER_BYTES

    disk.full = False
    wait_for_space(wal)
    write(wal, 8, 2)
    wal.close()
    assert_log(tmp_path, [body(i) for i in range(1, 10)], SMALL)


def test_a_group_that_fails_in_its_new_segment_deletes_it(tmp_path: Path, disk: FullDisk) -> None:
    """Records of the group went into the old segment, then the write into the new one ran
    out of space: the new segment holds only lsns of the group, so it goes."""
    wal = open_wal(tmp_path, SMALL)
    write(wal, 1, 5)
    blocker = append_while_held(wal, disk, 6)
    group = [wal.append([body(i)]) for i in (7, 8)]  # 7 fits, 8 needs a new segment
    disk.writes_left = 2  # lsn 6, then lsn 7 into the old segment; lsn 8 finds the disk full
    disk.release()
    assert blocker.done.result(timeout=5).lsn == 6
    assert_refused(group)
    assert [p.name for _, p in list_segments(tmp_path)] == ["0000000000000001.wal"]
    assert (tmp_path / "0000000000000001.wal").stat().st_size == 40 + 6 * RECORD_BYTES
    assert wal.last_position.lsn == Lsn(6)

    disk.writes_left = None
    wait_for_space(wal)
    write(wal, 7, 3)
    wal.close()
    assert_log(tmp_path, [body(i) for i in range(1, 10)], SMALL)


def test_preallocation_that_fails_is_not_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preallocating segments is best effort: without it, records are written all the same."""
    import walship.wal.segment as segment

    class NoFallocate:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def posix_fallocate(self, fd: int, offset: int, size: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segment, "os", NoFallocate())
    wal = open_wal(tmp_path, SMALL)
    write(wal, 1, 20)
    assert wal.failed is None and len(wal.segment_infos()) > 2
    wal.close()
    assert_log(tmp_path, [body(i) for i in range(1, 21)], SMALL)


# ---------------------------------------------------------------------------------- fsync


def test_no_space_from_fdatasync_is_fatal_not_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC reported by fdatasync means writeback failed: the pages may be gone, so this is
    the fsyncgate case, not a full disk to wait out."""
    fake = FullDisk()

    def fdatasync(fd: int) -> None:
        fake.fsyncs += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    wal = open_wal(tmp_path)
    write(wal, 1, 2)
    monkeypatch.setattr(fake, "fdatasync", fdatasync)
    monkeypatch.setattr(wal_log, "os", fake)
    with pytest.raises(WalFailed, match="fsync failed"):
        wal.append([body(3)]).done.result(timeout=5)
    time.sleep(3 * PROBE_MS / 1000)
    assert isinstance(wal.failed, WalFailed)
    assert fake.fsyncs == 1
    with pytest.raises(WalFailed, match="restart"):
        wal.append([body(3)])
    with pytest.raises(WalFailed):
        wal.sync()
    assert fake.fsyncs == 1, "the failed fsync was retried"
    monkeypatch.setattr(wal_log, "os", os)
    wal.close()


# ---------------------------------------------------------------------------------- the store


@pytest.fixture
def store(tmp_path: Path, disk: FullDisk) -> Iterator[Store]:
    s = Store.open(
        StoreConfig(
            tmp_path / "data", fsync=FsyncPolicy.parse("always"), limits=LIMITS, checkpoints=False
        )
    )
    try:
        yield s
    finally:
        s.close()


def test_store_forgets_refused_events_and_a_retry_with_the_same_id_is_stored_once(
    store: Store, disk: FullDisk
) -> None:
    first = store.append(make_event("acct-1", id=uuid.UUID(int=1)))
    assert (first.lsn, first.version) == (1, 1)
    refused_id = uuid.UUID(int=2)
    disk.full = True
    with pytest.raises(StorageFull):
        store.append_batch(
            [
                make_event("acct-1", id=refused_id, expected_version=1),
                make_event("acct-2"),
            ]
        )
    # as if never appended: not readable, versions and ids untouched, no lsn taken
    assert [e.lsn for e in store.query(_all()).events] == [1]
    assert store.entity_version("acct-1") == 1 and store.entity_version("acct-2") == 0
    assert store.stats()["entities"] == 1 and store.stats()["last_lsn"] == 1
    with pytest.raises(StorageFull):
        store.append(make_event("acct-1", id=refused_id, expected_version=1))

    disk.full = False
    wait_for_space(store.wal)
    retried = store.append(make_event("acct-1", id=refused_id, expected_version=1))
    assert (retried.lsn, retried.version, retried.duplicate) == (2, 2, False)
    again = store.append(make_event("acct-1", id=refused_id))
    assert again.duplicate and again.lsn == 2
    with pytest.raises(VersionConflict):
        store.append(make_event("acct-1", expected_version=1))
    assert store.append(make_event("acct-2")).version == 1
    assert [e.lsn for e in store.query(_all()).events] == [1, 2, 3]


def test_a_rolled_back_group_gives_back_its_positions_and_its_tracking(
    store: Store, disk: FullDisk
) -> None:
    track = TrackingIn(consumer="proj", position=1, tenant_id="t1")
    pending = store.submit([make_event("a", tenant_id="t1")], tracking=track)
    assert pending.done is not None
    pending.done.result()
    disk.full = True
    with pytest.raises(StorageFull):
        pending = store.submit(
            [make_event("a", tenant_id="t1") for _ in range(3)],
            tracking=TrackingIn(consumer="proj", position=9, tenant_id="t1"),
        )
        assert pending.done is not None
        pending.done.result()
    assert store.tenant_position("t1") == (1, 1)
    assert store.consumer_position("t1", "proj") == ConsumerPosition("t1", "proj", 1, 2)
    disk.full = False
    wait_for_space(store.wal)
    with pytest.raises(TrackingConflict):  # 1 is stored, 9 was rolled back
        store.submit([make_event("b", tenant_id="t1")], tracking=track)
    again = TrackingIn(consumer="proj", position=2, tenant_id="t1")
    pending = store.submit([make_event("b", tenant_id="t1")], tracking=again)
    assert pending.done is not None
    pending.done.result()
    # the rolled-back lsns and positions are given again
    assert (pending.receipts[0].lsn, pending.receipts[0].position) == (3, 2)
    assert store.consumer_position("t1", "proj") == ConsumerPosition("t1", "proj", 2, 4)


def test_duplicate_of_an_event_in_a_failed_group_is_not_acknowledged(
    store: Store, disk: FullDisk
) -> None:
    """A retry that arrives while the original is still being written waits for that write,
    and hears that it failed: it never gets a receipt for an event that is not stored."""
    event_id = uuid.UUID(int=3)
    store.append(make_event("acct-1"))
    disk.hold()
    disk.full = True
    original = store.submit([make_event("acct-1", id=event_id)])
    assert disk.held.wait(5)
    retry = store.submit([make_event("acct-1", id=event_id)])
    assert retry.receipts[0].duplicate and retry.waits_on
    disk.release()
    assert original.done is not None
    with pytest.raises(StorageFull):
        original.done.result(timeout=5)
    with pytest.raises(StorageFull):
        retry.waits_on[0].result(timeout=5)


def test_follower_store_applies_shipped_records_again_after_a_full_disk(
    tmp_path: Path, store: Store, disk: FullDisk
) -> None:
    """A follower that hit a full disk resubscribes from its end of log, which is back at
    the last written record: the same records then continue it."""
    for i in range(4):
        store.append(make_event("acct-1", payload={"i": i}))
    records = list(store.wal.read_from(1))

    follower = Store.open(
        StoreConfig(tmp_path / "follower", limits=LIMITS, checkpoints=False),
    )
    try:
        follower.apply_frame(shipped(records, 1, 2)).result(timeout=5)
        disk.full = True
        with pytest.raises(StorageFull):
            follower.apply_frame(shipped(records, 3, 4)).result(timeout=5)
        assert follower.last_position.lsn == Lsn(2)
        assert follower.entity_version("acct-1") == 2
        with pytest.raises(StorageFull):
            follower.apply_frame(shipped(records, 3, 4))
        disk.full = False
        wait_for_space(follower.wal)
        follower.apply_frame(shipped(records, 3, 4)).result(timeout=5)
        assert [e.lsn for e in follower.query(_all()).events] == [1, 2, 3, 4]
        assert follower.entity_version("acct-1") == 4
    finally:
        follower.close()


def _all() -> Any:
    from walship.storage.query import QueryFilter

    return QueryFilter()


def test_a_rollback_does_not_deadlock_a_close_under_the_store_lock(
    store: Store, disk: FullDisk
) -> None:
    """A snapshot install or a cut closes the WAL while holding the store lock; a rollback
    in the writer, waiting for that lock to forget events, must not keep the close waiting."""
    store.append(make_event("acct-1"))
    disk.full = True
    with store.core.lock:
        pending = store.submit([make_event("acct-1")])
        time.sleep(0.1)  # the writer is rolling back, waiting for the store lock
        closer = threading.Thread(target=store.wal.close)
        closer.start()
        closer.join(5)
        assert not closer.is_alive(), "closing the WAL deadlocked with its rollback"
    assert pending.done is not None
    with pytest.raises(StorageFull):
        pending.done.result(timeout=5)


def test_a_term_start_rolled_back_with_its_records_is_forgotten(
    tmp_path: Path, disk: FullDisk
) -> None:
    """A follower saves where a new term starts before writing that term's records; when a
    full disk rolls them back the start goes too, so the follower can take the same records
    again, or be promoted, from its written end (and a restart agrees)."""
    leader = open_wal(tmp_path / "leader")
    write(leader, 1, 3)
    leader.begin_term(Term(2))
    write(leader, 4, 3)
    records = list(leader.read_from(1))
    leader.close()

    for then in ("follow", "lead"):
        path = tmp_path / f"follower-{then}"
        follower = Wal.open(path, fsync=FsyncPolicy.parse("always"), limits=LIMITS)
        follower.append_frame(shipped(records, 1, 2)).result(timeout=5)
        disk.full = True
        with pytest.raises(StorageFull):
            follower.append_frame(shipped(records, 3, 6)).result(timeout=5)
        assert follower.terms.to_list() == [(1, 1)]  # term 2 started at lsn 4, rolled back
        disk.full = False
        wait_for_space(follower)
        if then == "follow":
            follower.append_frame(shipped(records, 3, 6)).result(timeout=5)
            expected = [(1, 1), (2, 4)]
        else:
            follower.begin_term(Term(3))  # promoted: its term starts after what it wrote
            follower.append([b"first of term 3"]).done.result(timeout=5)
            expected = [(1, 1), (3, 3)]
        assert follower.terms.to_list() == expected
        follower.close()
        reopened = Wal.open(path, fsync=FsyncPolicy.parse("always"), limits=LIMITS)
        assert reopened.terms.to_list() == expected
        reopened.close()


def test_open_forgets_term_starts_past_the_end_of_the_log(tmp_path: Path) -> None:
    """A crash between saving a term's start and writing its records leaves a start past the
    log's end; the next lsn may start a term (a promotion), nothing after it can."""
    wal = open_wal(tmp_path)
    write(wal, 1, 3)
    wal.terms.start(Term(2), Lsn(9))  # as if the records from lsn 9 never reached the disk
    wal.close()
    wal = Wal.open(tmp_path, fsync=FsyncPolicy.parse("always"), limits=LIMITS)
    assert wal.terms.to_list() == [(1, 1)]
    wal.begin_term(Term(3))
    wal.close()
    wal = Wal.open(tmp_path, fsync=FsyncPolicy.parse("always"), limits=LIMITS)
    assert wal.terms.to_list() == [(1, 1), (3, 4)]  # begun, nothing written yet: it stays
    wal.close()
