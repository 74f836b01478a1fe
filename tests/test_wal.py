"""The WAL: gapless lsns, group commit, recovery from torn tails, refusal on corruption."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.walfiles import shipped
from walship.errors import CorruptionError, InvalidInput
from walship.limits import Limits
from walship.position import Lsn, Term
from walship.wal import FsyncPolicy, Wal
from walship.wal.frame import verify_frame
from walship.wal.record import (
    GENESIS_CHAIN,
    RecordIncomplete,
    RecordInvalid,
    decode_record,
    encode_record,
    encode_records,
)
from walship.wal.segment import SEGMENT_HEADER_BYTES, list_segments


def open_wal(path: Path, **kw: object) -> Wal:
    wal = Wal.open(path, **kw)  # type: ignore[arg-type]
    if wal.terms.current == Term(0):
        wal.begin_term(Term(1))
    return wal


def write(wal: Wal, n: int, size: int = 100) -> None:
    for i in range(n):
        wal.append([f"record-{i}".encode().ljust(size, b".")]).done.result()


def test_record_round_trip_and_crc_covers_body() -> None:
    raw, chain = encode_record(7, 2, GENESIS_CHAIN, b"hello")
    rec = decode_record(raw, 0, 1024)
    assert (rec.lsn, rec.term, rec.body, rec.chain) == (7, 2, b"hello", chain)
    flipped = bytearray(raw)
    flipped[-1] ^= 0x01
    with pytest.raises(RecordInvalid):
        decode_record(bytes(flipped), 0, 1024)
    with pytest.raises(RecordIncomplete):
        decode_record(raw[:-1], 0, 1024)


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300), max_size=12),
    first=st.integers(min_value=1, max_value=2**64 - 13),
    term=st.integers(min_value=1, max_value=2**32 - 1),
    prev_chain=st.binary(min_size=8, max_size=8),
)
def test_batch_encoder_gives_the_records_of_the_per_record_one(
    bodies: list[bytes], first: int, term: int, prev_chain: bytes
) -> None:
    """``encode_records`` (a leader's append, one buffer) is ``encode_record`` in a loop with
    ``batch_left`` counting down: the same bytes, starts and chains."""
    raws: list[bytes] = []
    chains: list[bytes] = []
    chain = prev_chain
    for i, body in enumerate(bodies):
        raw, chain = encode_record(first + i, term, chain, body, len(bodies) - 1 - i)
        raws.append(raw)
        chains.append(chain)
    data, starts, got_chains = encode_records(first, term, prev_chain, bodies)
    assert data == b"".join(raws)
    assert got_chains == chains
    assert starts == [sum(map(len, raws[:i])) for i in range(len(raws) + 1)]


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=64), bit=st.integers(min_value=0))
def test_any_single_bit_flip_in_a_record_is_detected(body: bytes, bit: int) -> None:
    raw, _ = encode_record(1, 1, GENESIS_CHAIN, body)
    bit %= len(raw) * 8
    damaged = bytearray(raw)
    damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((RecordInvalid, RecordIncomplete)):
        decode_record(bytes(damaged), 0, 1 << 20)


def test_segments_are_named_by_first_lsn_in_fixed_width_hex(tmp_path: Path) -> None:
    wal = open_wal(tmp_path, limits=Limits(segment_bytes_max=4096))
    write(wal, 100)
    wal.close()
    names = [p.name for _, p in list_segments(tmp_path)]
    assert names[0] == "0000000000000001.wal"
    assert len(names) > 3
    assert names == sorted(names)
    assert all(len(n) == len("0000000000000001.wal") for n in names)


def test_concurrent_appenders_get_distinct_gapless_lsns_in_log_order(tmp_path: Path) -> None:
    wal = open_wal(tmp_path, fsync=FsyncPolicy.parse("always"))
    got: list[int] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(200):
            res = wal.append([f"{k}-{i}".encode()])
            res.done.result()
            with lock:
                got.append(res.first_lsn.value)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 1601))
    assert [r.lsn for r in wal.read_from(1)] == list(range(1, 1601))
    wal.close()


def test_group_commit_gathers_concurrent_appends(tmp_path: Path) -> None:
    commits: list[int] = []
    wal = open_wal(tmp_path, on_commit=lambda n, b, s: commits.append(n))
    results = [wal.append([b"x" * 10]) for _ in range(500)]
    for r in results:
        r.done.result()
    wal.close()
    assert sum(commits) == 500
    assert len(commits) < 500


def test_reopen_continues_lsns_and_chain(tmp_path: Path) -> None:
    wal = open_wal(tmp_path)
    write(wal, 10)
    chain = wal.last_chain
    wal.close()
    wal = open_wal(tmp_path)
    assert wal.last_position.lsn == Lsn(10)
    assert wal.last_chain == chain
    res = wal.append([b"eleven"])
    res.done.result()
    assert res.first_lsn == Lsn(11)
    wal.close()


def test_recovery_stops_at_torn_tail(tmp_path: Path) -> None:
    wal = open_wal(tmp_path)
    write(wal, 10)
    wal.close()
    (_, seg), *_ = list_segments(tmp_path)
    size = seg.stat().st_size
    os.truncate(seg, size - 20)  # cut the middle of the last record
    wal = open_wal(tmp_path)
    assert wal.torn_tail is not None
    assert wal.last_position.lsn == Lsn(9)
    res = wal.append([b"new ten"])
    res.done.result()
    assert res.first_lsn == Lsn(10)
    assert [r.body for r in wal.read_from(10)] == [b"new ten"]
    wal.close()


def test_bit_flip_in_an_earlier_record_refuses_to_start(tmp_path: Path) -> None:
    wal = open_wal(tmp_path)
    write(wal, 10)
    wal.close()
    (_, seg), *_ = list_segments(tmp_path)
    data = bytearray(seg.read_bytes())
    offset = SEGMENT_HEADER_BYTES + 3 * 132 + 50  # inside the 4th record's body
    data[offset] ^= 0x10
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptionError) as err:
        Wal.open(tmp_path)
    assert seg.name in str(err.value)
    assert "offset" in str(err.value)


def test_flipped_length_field_does_not_hide_later_records(tmp_path: Path) -> None:
    wal = open_wal(tmp_path)
    write(wal, 10)
    wal.close()
    (_, seg), *_ = list_segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[SEGMENT_HEADER_BYTES + 2 * 132 + 1] ^= 0x40  # length field of lsn 3
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptionError):
        Wal.open(tmp_path)


def test_damage_in_a_non_last_segment_is_corruption(tmp_path: Path) -> None:
    wal = open_wal(tmp_path, limits=Limits(segment_bytes_max=2048))
    write(wal, 60)
    wal.close()
    segs = list_segments(tmp_path)
    first = segs[0][1]
    os.truncate(first, first.stat().st_size - 5)
    with pytest.raises(CorruptionError):
        Wal.open(tmp_path, limits=Limits(segment_bytes_max=2048))


def test_read_from_any_lsn_across_segments(tmp_path: Path) -> None:
    wal = open_wal(tmp_path, limits=Limits(segment_bytes_max=2048))
    write(wal, 80)
    assert [r.lsn for r in wal.read_from(37)] == list(range(37, 81))
    assert [r.lsn for r in wal.read_from(80)] == [80]
    assert list(wal.read_from(81)) == []
    wal.close()


def test_segment_removal_keeps_lsns_and_refuses_reads_before_it(tmp_path: Path) -> None:
    limits = Limits(segment_bytes_max=2048)
    wal = open_wal(tmp_path, limits=limits)
    write(wal, 80)
    removed = wal.remove_segments_through(Lsn(50))
    assert removed
    first = wal.first_lsn().value
    assert 1 < first <= 51
    with pytest.raises(InvalidInput):
        list(wal.read_from(1))
    wal.close()
    wal = open_wal(tmp_path, limits=limits)
    assert wal.last_position.lsn == Lsn(80)
    res = wal.append([b"next"])
    res.done.result()
    assert res.first_lsn == Lsn(81)
    wal.close()


def test_removing_everything_checkpointed_keeps_the_active_segment(tmp_path: Path) -> None:
    wal = open_wal(tmp_path)
    write(wal, 5)
    assert wal.remove_segments_through(Lsn(5)) == []
    wal.close()


def test_term_history_is_persisted_and_records_carry_their_term(tmp_path: Path) -> None:
    wal = open_wal(tmp_path)
    write(wal, 3)
    wal.begin_term(Term(2))
    write(wal, 2)
    wal.close()
    wal = Wal.open(tmp_path)
    assert wal.terms.to_list() == [(1, 1), (2, 4)]
    assert [r.term for r in wal.read_from(1)] == [1, 1, 1, 2, 2]
    assert wal.terms.term_at(Lsn(3)) == Term(1)
    wal.close()


def test_oversized_record_is_refused_and_appends_nothing(tmp_path: Path) -> None:
    wal = open_wal(tmp_path, limits=Limits(record_bytes_max=100))
    with pytest.raises(InvalidInput):
        wal.append([b"ok", b"x" * 101])
    res = wal.append([b"fine"])
    res.done.result()
    assert res.first_lsn == Lsn(1)
    wal.close()


def test_follower_append_refuses_records_that_do_not_continue_the_log(tmp_path: Path) -> None:
    src = open_wal(tmp_path / "a")
    write(src, 5)
    records = list(src.read_from(1))
    src.close()

    dst = open_wal(tmp_path / "b")
    with pytest.raises(CorruptionError):
        dst.append_frame(shipped(records, 2, 5))  # gap: starts at lsn 2
    dst.append_frame(shipped(records, 1, 3)).result()
    with pytest.raises(CorruptionError):
        dst.append_frame(shipped(records, 5, 5))  # gap: lsn 4 is missing
    with pytest.raises(CorruptionError, match="chain hash mismatch"):  # another history
        verify_frame(b"".join(r.raw for r in records[3:]), 3, 1, b"x" * 8, 1, 1 << 20)
    dst.append_frame(shipped(records, 4, 5)).result()
    assert [r.raw for r in dst.read_from(1)] == [r.raw for r in records]
    dst.close()


def test_fsync_policies_parse() -> None:
    assert str(FsyncPolicy.parse("interval:50")) == "interval:50"
    for bad in ["sometimes", "interval:", "interval:-1", "interval:x"]:
        with pytest.raises(InvalidInput):
            FsyncPolicy.parse(bad)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10 * 132))
def test_any_truncation_recovers_a_prefix(
    tmp_path_factory: pytest.TempPathFactory, cut: int
) -> None:
    path = tmp_path_factory.mktemp("wal")
    wal = open_wal(path)
    write(wal, 10)
    bodies = [r.body for r in wal.read_from(1)]
    wal.close()
    (_, seg), *_ = list_segments(path)
    os.truncate(seg, SEGMENT_HEADER_BYTES + cut)
    wal = Wal.open(path)
    got = [r.body for r in wal.read_from(1)] if wal.last_position.lsn.value else []
    assert got == bodies[: cut // 132]
    wal.close()


def test_cursor_follows_the_log_across_segments_and_live_appends(tmp_path: Path) -> None:
    from walship.wal.cursor import WalCursor

    wal = open_wal(tmp_path, limits=Limits(segment_bytes_max=2048))
    write(wal, 50)
    cursor = WalCursor(wal, 10)
    seen: list[int] = []
    raw = b""
    while (batch := cursor.read(500)) is not None:
        seen.extend(range(batch.first_lsn, batch.last_lsn + 1))
        raw += batch.data
    assert seen == list(range(10, 51))
    write(wal, 5)
    batch = cursor.read(1 << 20)
    assert batch is not None
    assert (batch.first_lsn, batch.last_lsn) == (51, 55)
    assert batch.last_chain == wal.last_chain
    assert raw == b"".join(r.raw for r in wal.read_from(10) if r.lsn <= 50)
    cursor.close()
    wal.close()


def test_cursor_batches_end_where_an_atomic_append_ends_when_one_fits(tmp_path: Path) -> None:
    """A shipped batch is cut after the last whole append that fits, so followers rarely hold
    half an append; an append larger than the budget still ships, over several batches."""
    from walship.wal.cursor import WalCursor

    wal = open_wal(tmp_path)
    wal.append([b"a" * 100] * 3).done.result()  # lsn 1..3, 132 bytes a record
    wal.append([b"b" * 100] * 3).done.result()  # lsn 4..6
    cursor = WalCursor(wal, 1)
    spans = []
    while (batch := cursor.read(5 * 132)) is not None:
        spans.append((batch.first_lsn, batch.last_lsn))
    assert spans == [(1, 3), (4, 6)]  # not (1, 5), (6, 6)
    big = WalCursor(wal, 1)
    spans = []
    while (batch := big.read(2 * 132)) is not None:
        spans.append((batch.first_lsn, batch.last_lsn))
    assert spans == [(1, 2), (3, 3), (4, 5), (6, 6)]  # no whole append fits: cut where it must
    one = WalCursor(wal, 1)
    first = one.read(10)  # a budget smaller than one record still ships that record
    assert first is not None and (first.first_lsn, first.last_lsn) == (1, 1)
    for c in (cursor, big, one):
        c.close()
    wal.close()


def test_cursor_takes_recent_writes_from_memory_and_continues_from_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cursor tailing the log gets what was just written from the WAL's memory; once it
    falls behind what memory keeps, it reads the files from exactly where it stopped, across
    segment rolls; either way it ships the bytes on disk, and never what retention removed."""
    from walship.wal import log as wal_log
    from walship.wal.cursor import WalCursor

    monkeypatch.setattr(wal_log, "RECENT_WRITES_MAX", 3)
    wal = open_wal(tmp_path, limits=Limits(segment_bytes_max=2048))
    cursor = WalCursor(wal, 1)
    shipped = b""
    sources = []
    for round_ in range(12):
        groups = 1 if round_ % 3 else 5  # every third round falls behind what memory keeps
        for g in range(groups):
            wal.append([b"r%d-%d-" % (round_, g) + b"x" * 90] * 2).done.result()
        while True:
            batch = cursor.read_recent(1 << 20)
            source = "memory"
            if batch is None:
                batch, source = cursor.read(1 << 20), "files"
            if batch is None:
                break
            sources.append(source)
            shipped += batch.data
            assert batch.last_chain == next(
                r.chain for r in wal.read_from(batch.last_lsn) if r.lsn == batch.last_lsn
            )
    assert shipped == b"".join(r.raw for r in wal.read_from(1))
    assert {"memory", "files"} <= set(sources)
    assert len(list_segments(tmp_path)) > 3  # the reads crossed segment rolls
    last = wal.written_lsn.value
    wal.append([b"tail"]).done.result()
    wal.remove_segments_through(Lsn(last))
    assert wal.recent_from(1, 1 << 20) == []  # removed from the files: not served from memory
    cursor.close()
    wal.close()


def test_cursor_reports_removed_wal(tmp_path: Path) -> None:
    from walship.wal.cursor import WalCursor, WalGone

    wal = open_wal(tmp_path, limits=Limits(segment_bytes_max=2048))
    write(wal, 50)
    wal.remove_segments_through(Lsn(40))
    with pytest.raises(WalGone):
        WalCursor(wal, 1).read(1000)
    wal.close()


def test_a_torn_batch_is_dropped_whole(tmp_path: Path) -> None:
    """A crash inside a multi-record append leaves none of it: batches are atomic."""
    wal = open_wal(tmp_path)
    wal.append([b"single"]).done.result()
    wal.append([b"a" * 50, b"b" * 50, b"c" * 50]).done.result()
    wal.close()
    (_, seg), *_ = list_segments(tmp_path)
    os.truncate(seg, seg.stat().st_size - 10)  # tear the batch's last record
    replayed: list[int] = []
    wal = Wal.open(tmp_path, on_record=lambda r: replayed.append(r.lsn))
    assert wal.last_position.lsn == Lsn(1)
    assert replayed == [1]
    assert wal.torn_tail is not None
    res = wal.append([b"next"])
    res.done.result()
    assert res.first_lsn == Lsn(2)
    wal.close()


def test_an_append_never_spans_two_segments(tmp_path: Path) -> None:
    wal = open_wal(tmp_path, limits=Limits(segment_bytes_max=1024))
    for _ in range(5):
        wal.append([b"x" * 100] * 4).done.result()
    wal.close()
    wal = Wal.open(tmp_path, limits=Limits(segment_bytes_max=1024))
    for first, _, _ in wal.segment_infos():
        assert (first - 1) % 4 == 0  # every segment starts at an append boundary
    wal.close()


def test_allocator_tuning_applies_on_glibc() -> None:
    import platform

    from walship.runtime import tune_allocator

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_allocator() is True


def test_server_process_tuning_sets_switch_interval_and_collector() -> None:
    import gc
    import sys

    from walship.runtime import GC_THRESHOLDS, SWITCH_INTERVAL_S, settle, tune_process

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    try:
        tune_process()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
        assert gc.get_threshold() == GC_THRESHOLDS
        settle()
        assert gc.get_freeze_count() > 0  # what was alive is out of later collections
    finally:
        gc.unfreeze()
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)


def test_fsyncs_outside_a_group_let_go_of_the_wal_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sync()`` (checkpoints) and the writer's interval fsync run without the lock readers
    take, so a cursor on an event loop never waits for a disk flush."""
    import time

    from walship.wal import log as wal_log

    wal = open_wal(tmp_path, fsync=FsyncPolicy.parse("interval:5"))
    held: list[bool] = []

    class Probe:
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        def fdatasync(self, fd: int) -> None:
            free = wal._lock.acquire(blocking=False)
            if free:
                wal._lock.release()
            held.append(not free)
            os.fdatasync(fd)

    monkeypatch.setattr(wal_log, "os", Probe())
    write(wal, 3)
    wal.sync()
    write(wal, 2)
    deadline = time.monotonic() + 2
    while wal.synced_lsn.value < 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer's interval fsync
    assert wal.synced_lsn.value == 5
    assert held and not any(held), held
    wal.close()
