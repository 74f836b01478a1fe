"""Shipped records a frame at a time (``wal/frame.py``, ``replication/applier.py``, the WAL's
``append_frame``): the same checks and messages as the record-at-a-time path, a corrupted
record anywhere in a frame refused, appends cut by frame boundaries held until whole, and
frames written as one buffer ending byte-identical to the leader's log."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walship.errors import CorruptionError, ProtocolError
from walship.limits import Limits
from walship.position import Lsn, Term
from walship.replication.applier import BatchApplier
from walship.replication.protocol import WalBatch
from walship.wal import FsyncPolicy, Wal
from walship.wal.cursor import WalCursor
from walship.wal.frame import verify_frame
from walship.wal.record import (
    GENESIS_CHAIN,
    HEADER,
    HEADER_BYTES,
    Record,
    encode_record,
    verify_run,
)
from walship.wal.segment import SEGMENT_HEADER_BYTES, list_segments


def make_log(
    appends: list[int], *, term_at: dict[int, int] | None = None, scale: int = 1
) -> list[bytes]:
    """Raw records of atomic appends of the given sizes from lsn 1 (bodies of ~10-70 bytes
    times ``scale``); ``term_at``: the term that starts at an lsn (term 1 before any)."""
    out, chain, lsn, term = [], GENESIS_CHAIN, 1, 1
    for size in appends:
        for i in range(size):
            term = (term_at or {}).get(lsn, term)
            body = f"event {lsn} ".encode() * (1 + lsn % 7) * scale
            raw, chain = encode_record(lsn, term, chain, body, size - 1 - i)
            out.append(raw)
            lsn += 1
    return out


def batch_of(records: list[bytes], first: int, last: int, term: int = 9) -> WalBatch:
    """Records ``first..last`` (lsn 1 onwards) as the leader ships them."""
    if first > 1:
        _, _, p_lsn, p_term, _, p_chain = HEADER.unpack_from(records[first - 2], 0)
    else:
        p_lsn, p_term, p_chain = 0, 0, GENESIS_CHAIN
    return WalBatch(
        term=term,
        prev_lsn=p_lsn,
        prev_term=p_term,
        prev_chain=p_chain,
        first_lsn=first,
        last_lsn=last,
        leader_lsn=len(records),
        leader_write_ts_us=0,
        records=b"".join(records[first - 1 : last]),
    )


def outcome(fn: object, *args: object) -> tuple[str, object]:
    try:
        result = fn(*args)  # type: ignore[operator]
    except CorruptionError as exc:
        return "error", (exc.message, exc.details.get("offset"))
    return "ok", result


# ------------------------------------------------------------------ verify_frame


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    appends=st.lists(st.integers(1, 6), min_size=1, max_size=8),
    flip=st.one_of(st.none(), st.integers(0, 10**9)),
    rise=st.integers(0, 30),
)
def test_frame_verification_matches_record_verification(
    appends: list[int], flip: int | None, rise: int
) -> None:
    """Any bit flipped anywhere (or none): verify_frame fails exactly as verify_run does (same
    message, same offset), and when both pass they describe the same records."""
    records = make_log(appends, term_at={rise: 3} if rise else None)
    buf = bytearray(b"".join(records))
    if flip is not None:
        bit = flip % (len(buf) * 8)
        buf[bit // 8] ^= 1 << (bit % 8)
    data = bytes(buf)
    old = outcome(verify_run, data, 0, 0, GENESIS_CHAIN, 3, 1 << 16)
    new = outcome(verify_frame, data, 0, 0, GENESIS_CHAIN, 3, 1 << 16)
    if flip is not None:
        assert new[0] == "error"  # every record's CRC covers all of its bytes
    assert old[0] == new[0]
    if old[0] == "error":
        assert old[1] == new[1]
        return
    run, frame = old[1], new[1]
    assert isinstance(run, type(run)) and not isinstance(frame, str)
    recs: list[Record] = run.records  # type: ignore[attr-defined]
    assert frame.record_count == len(recs)  # type: ignore[attr-defined]
    assert [(lsn, term, bytes(body)) for lsn, term, body in frame.entries()] == [  # type: ignore[attr-defined]
        (r.lsn, r.term, r.body) for r in recs
    ]
    assert frame.tail() == (recs[-1].lsn, recs[-1].term, recs[-1].chain)  # type: ignore[attr-defined]


def test_a_bit_flip_in_the_middle_of_a_frame_is_refused_naming_its_record() -> None:
    records = make_log([10] * 5)  # 50 records, five appends
    buf = bytearray(b"".join(records))
    middle = sum(map(len, records[:25]))  # record 26 starts here
    buf[middle + 40] ^= 0x10  # in its body: only its own CRC can see it
    with pytest.raises(CorruptionError, match=r"CRC mismatch .*lsn field 26") as info:
        verify_frame(bytes(buf), 0, 0, GENESIS_CHAIN, 1, 1 << 16)
    assert info.value.details["offset"] == middle


def test_a_frame_from_another_history_a_gap_or_a_lower_term_is_refused() -> None:
    records = make_log([3, 3], term_at={4: 2})
    with pytest.raises(ProtocolError, match="chain hash mismatch at record 1"):
        BatchApplier().take(msgspec.structs.replace(batch_of(records, 1, 6), prev_chain=b"x" * 8))
    with pytest.raises(ProtocolError, match="record lsn 3 where 2 was due"):
        BatchApplier().take(
            msgspec.structs.replace(batch_of(records, 1, 1), records=records[0] + records[2])
        )
    with pytest.raises(ProtocolError, match=r"has term 2, outside 1\.\.1"):
        BatchApplier().take(batch_of(records, 1, 6, term=1))
    with pytest.raises(ProtocolError, match="the records end at lsn 6"):
        BatchApplier().take(
            msgspec.structs.replace(batch_of(records, 1, 6), last_lsn=7, leader_lsn=7)
        )


# ------------------------------------------------------------------ the applier


def test_an_append_cut_by_frames_is_held_until_its_last_record_arrives() -> None:
    records = make_log([2, 7, 1])  # lsns 1-2 | 3-9 | 10
    applier = BatchApplier()
    first = applier.take(batch_of(records, 1, 4))  # ends inside the second append
    assert first is not None and first.last_lsn == 2 and first.whole == 2
    assert applier.holding and applier.held_tail() == (4, 1, HEADER.unpack_from(records[3], 0)[5])
    assert applier.take(batch_of(records, 5, 7)) is None  # still inside it
    last = applier.take(batch_of(records, 8, 10))
    assert last is not None and (last.prev_lsn, last.last_lsn) == (2, 10)
    assert last.data == b"".join(records[2:10])
    assert [lsn for lsn, _, _ in last.entries()] == list(range(3, 11))
    assert not applier.holding


def test_a_corrupt_frame_is_refused_and_leaves_the_held_records_as_they_were() -> None:
    records = make_log([6])
    applier = BatchApplier()
    assert applier.take(batch_of(records, 1, 3)) is None
    bad = bytearray(b"".join(records[3:]))
    bad[len(records[3]) + 35] ^= 0x01  # the body of lsn 5, in the middle of the frame
    good = batch_of(records, 4, 6)
    with pytest.raises(ProtocolError, match=r"WalBatch 4\.\.6: CRC mismatch"):
        applier.take(msgspec.structs.replace(good, records=bytes(bad)))
    assert applier.held_tail() is not None and applier.held_tail()[0] == 3  # type: ignore[index]
    whole = applier.take(good)
    assert whole is not None and whole.data == b"".join(records)


def test_an_open_append_larger_than_any_a_leader_accepts_is_refused() -> None:
    records = make_log([12])
    applier = BatchApplier(Limits(batch_events_max=10))
    with pytest.raises(ProtocolError, match="still open after 11 records"):
        applier.take(batch_of(records, 1, 11))


# ------------------------------------------------------------------ the WAL


def open_wal(path: Path, **kw: object) -> Wal:
    wal = Wal.open(path, fsync=FsyncPolicy.parse("never"), **kw)  # type: ignore[arg-type]
    if wal.terms.current == Term(0):
        wal.begin_term(Term(1))
    return wal


def test_frames_written_whole_give_the_leaders_records_across_segments_and_a_reopen(
    tmp_path: Path,
) -> None:
    """Frames cut at random record boundaries, appends of 1-9 records, a term rise, segments
    of 4 KiB: the follower's log holds the same records, reads from any lsn (sparse index),
    keeps every append within one segment and every segment within its limit, survives a
    reopen and knows where term 2 began."""
    rng = random.Random(15)
    appends = [rng.randint(1, 9) for _ in range(60)]
    records = make_log(appends, term_at={100: 2}, scale=4)
    limits = Limits(segment_bytes_max=4096)
    wal = open_wal(tmp_path, limits=limits)
    applier = BatchApplier(limits)
    first = 1
    while first <= len(records):
        last = min(first + rng.randint(0, 40), len(records))  # often more than a segment
        frame = applier.take(batch_of(records, first, last))
        if frame is not None:
            wal.append_frame(frame).result()
        first = last + 1
    assert not applier.holding
    assert [r.raw for r in wal.read_from(1)] == records
    for lsn in (1, 57, 100, 101, len(records)):
        assert next(iter(wal.read_from(lsn))).raw == records[lsn - 1]
    segments = list_segments(tmp_path)
    assert len(segments) > 3
    for first_lsn, _ in segments[1:]:  # every segment starts right after an append ended
        assert HEADER.unpack_from(records[first_lsn - 2], 0)[4] == 0
    for _, path in segments[:-1]:  # a frame larger than a segment was cut between appends
        assert path.stat().st_size <= 4096
    wal.close()
    wal = open_wal(tmp_path, limits=limits)
    assert [r.raw for r in wal.read_from(1)] == records
    assert wal.terms.term_at(Lsn(99)) == Term(1) and wal.terms.term_at(Lsn(100)) == Term(2)
    wal.close()


def test_a_frame_that_does_not_continue_the_log_is_refused_and_nothing_is_queued(
    tmp_path: Path,
) -> None:
    records = make_log([3, 3])
    wal = open_wal(tmp_path)
    frame = BatchApplier().take(batch_of(records, 4, 6))
    assert frame is not None
    with pytest.raises(CorruptionError, match="do not continue the log at lsn 0"):
        wal.append_frame(frame)
    assert wal.last_position.lsn.value == 0
    wal.close()


def test_a_leader_reading_a_frame_from_its_files_refuses_a_damaged_record(tmp_path: Path) -> None:
    """The ship path's read checks each record's CRC: a bit flipped on disk in the middle of
    what would be one frame stops the read there, naming the record, instead of shipping it."""
    wal = open_wal(tmp_path)
    bodies = [f"event {i} ".encode() * 20 for i in range(30)]
    wal.append(bodies).done.result()
    (first_lsn, path), *_ = list_segments(tmp_path)
    records = [r.raw for r in wal.read_from(1)]
    at = HEADER.unpack_from(records[0], 0)[0]  # only to show the layout is as assumed
    assert first_lsn == 1 and at == len(bodies[0])
    offset = SEGMENT_HEADER_BYTES + sum(map(len, records[:14])) + HEADER_BYTES + 7
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x04]))
    cursor = WalCursor(wal, 1)
    with pytest.raises(CorruptionError, match="WAL record lsn 15 fails its CRC"):
        cursor.read_files(1 << 20)
    cursor.close()
    wal.close()
