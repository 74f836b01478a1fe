"""Property tier: a WAL damaged anywhere either recovers a prefix of what was written or refuses
to open naming the file and offset — it never hands back a record that was not written.

One pristine multi-segment WAL (single appends and atomic batches, terms 1 and 2) is built once;
each example copies it, damages the copy (one flipped bit anywhere in any segment file, or a
truncation at any byte of any segment) and opens it. ``tests/test_wal.py`` has the
single-segment cases; this file covers segment headers, batches, terms and non-last segments.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walship.errors import CorruptionError
from walship.limits import Limits
from walship.position import Term
from walship.wal import FsyncPolicy, Wal
from walship.wal.record import GENESIS_CHAIN, Record, encode_record, verify_run
from walship.wal.segment import SEGMENT_HEADER_BYTES, list_segments

LIMITS = Limits(segment_bytes_max=1024)
EXAMPLES = int(os.environ.get("WALSHIP_FUZZ_EXAMPLES", "150"))
DAMAGE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Pristine:
    path: Path
    records: list[Record]  # every record, in lsn order
    segments: list[tuple[Path, int]]  # (file name relative to path, size), log order
    offsets: dict[int, tuple[str, int]]  # lsn -> (segment file name, offset in it)


def _build(path: Path) -> Pristine:
    wal = Wal.open(path, fsync=FsyncPolicy.parse("never"), limits=LIMITS)
    wal.begin_term(Term(1))
    n = 0
    for round_ in range(24):
        if round_ == 12:
            wal.begin_term(Term(2))
        size = 1 + (round_ * 37) % 3
        bodies = [f"event-{n + k}-".encode().ljust(20 + 13 * k, b"#") for k in range(size)]
        n += size
        wal.append(bodies).done.result()
    records = list(wal.read_from(1))
    wal.close()
    offsets: dict[int, tuple[str, int]] = {}
    segments = []
    for _, seg in list_segments(path):
        data = seg.read_bytes()
        segments.append((seg, len(data)))
        pos = SEGMENT_HEADER_BYTES
        while pos < len(data):
            lsn = int.from_bytes(data[pos + 8 : pos + 16], "little")
            offsets[lsn] = (seg.name, pos)
            pos += 32 + int.from_bytes(data[pos : pos + 4], "little")
    return Pristine(path, records, [(p.relative_to(path), s) for p, s in segments], offsets)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    built = _build(tmp_path_factory.mktemp("pristine") / "wal")
    assert len(built.segments) >= 3, "the fixture should span several segments"
    assert {r.term for r in built.records} == {1, 2}
    return built


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("damaged")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _copy(pristine: Pristine, root: Path) -> Path:
    target = root / f"wal-{len(list(root.iterdir()))}"
    shutil.copytree(pristine.path, target)
    return target


def _open_outcome(
    path: Path, pristine: Pristine
) -> tuple[list[Record] | None, CorruptionError | None]:
    """The records the damaged WAL recovers, or the CorruptionError it refuses with."""
    try:
        wal = Wal.open(path, fsync=FsyncPolicy.parse("never"), limits=LIMITS)
    except CorruptionError as exc:
        return None, exc
    try:
        got = list(wal.read_from(wal.first_lsn())) if wal.last_position.lsn.value else []
    finally:
        wal.close()
    return got, None


def _assert_prefix_or_located_refusal(
    pristine: Pristine, got: list[Record] | None, error: CorruptionError | None, file: str, at: int
) -> None:
    if error is not None:
        # refused: it must say where (the damaged file, or the next one whose start no longer
        # continues the log), never a bare "corrupt"
        assert error.details.get("file") or "wal" in error.message, error
        assert "offset" in error.details or "segment" in error.message, error
        return
    assert got is not None
    original = pristine.records
    assert [r.raw for r in got] == [r.raw for r in original[: len(got)]], "a wrong record"
    if len(got) < len(original):
        # only a tail may go: the first dropped record is in the last segment, at or before
        # the damage, and the recovered log ends on a whole atomic append
        seg_name, offset = pristine.offsets[original[len(got)].lsn]
        last_name = pristine.segments[-1][0].name
        assert seg_name == last_name and file == last_name, (
            f"damage in {file} at {at} dropped lsn {original[len(got)].lsn} of {seg_name}"
        )
        assert at >= offset, f"damage at {at} dropped a record starting at {offset}"
        assert not got or got[-1].batch_left == 0, "a torn batch was kept in part"


@DAMAGE
@given(data=st.data())
def test_any_single_bit_flip_recovers_a_prefix_or_refuses_with_a_location(
    pristine: Pristine, scratch: Path, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(pristine.segments) - 1), label="segment")
    rel, size = pristine.segments[index]
    at = data.draw(st.integers(0, size - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    copy = _copy(pristine, scratch)
    target = copy / rel
    buf = bytearray(target.read_bytes())
    buf[at] ^= 1 << bit
    target.write_bytes(bytes(buf))
    got, error = _open_outcome(copy, pristine)
    _assert_prefix_or_located_refusal(pristine, got, error, rel.name, at)
    reserved = range(SEGMENT_HEADER_BYTES - 4, SEGMENT_HEADER_BYTES)  # header padding, unread
    if error is None and index < len(pristine.segments) - 1 and at not in reserved:
        pytest.fail(f"a flipped bit in non-last segment {rel} at byte {at} went unnoticed")


@DAMAGE
@given(data=st.data())
def test_any_truncation_of_any_segment_recovers_a_prefix_or_refuses_with_a_location(
    pristine: Pristine, scratch: Path, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(pristine.segments) - 1), label="segment")
    rel, size = pristine.segments[index]
    keep = data.draw(st.integers(0, size - 1), label="bytes kept")
    copy = _copy(pristine, scratch)
    os.truncate(copy / rel, keep)
    got, error = _open_outcome(copy, pristine)
    _assert_prefix_or_located_refusal(pristine, got, error, rel.name, keep)
    if index < len(pristine.segments) - 1:
        assert error is not None, f"segment {rel} cut to {keep} bytes went unnoticed"


def _shipped(n: int) -> tuple[bytes, list[Record]]:
    """``n`` records encoded back to back, as a leader ships them."""
    chain = GENESIS_CHAIN
    raw = []
    for lsn in range(1, n + 1):
        rec, chain = encode_record(lsn, 1, chain, f"shipped-{lsn}".encode() * (lsn % 4 + 1))
        raw.append(rec)
    data = b"".join(raw)
    return data, _verify(data)


def _verify(data: bytes) -> list[Record]:
    """What a follower runs on a shipped batch: CRC, lsn, term and chain of every record."""
    return verify_run(data, 0, 1, GENESIS_CHAIN, 1, LIMITS.record_bytes_max).records


SHIPPED, SHIPPED_RECORDS = _shipped(8)


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(at=st.integers(0, len(SHIPPED) * 8 - 1), cut=st.integers(0, len(SHIPPED)))
def test_a_shipped_batch_with_a_flipped_bit_or_cut_short_is_refused_with_its_offset(
    at: int, cut: int
) -> None:
    """What a follower decodes off the wire: a damaged batch is refused whole (CorruptionError
    with the offset of the bad record), never partly applied or decoded into another record."""
    damaged = bytearray(SHIPPED)
    damaged[at // 8] ^= 1 << (at % 8)
    for data in (bytes(damaged), SHIPPED[:cut]):
        try:
            got = _verify(data)
        except CorruptionError as exc:
            assert isinstance(exc.details.get("offset"), int), exc
            continue
        # only an undamaged input decodes: a cut exactly between records gives a prefix
        assert [r.raw for r in got] == [r.raw for r in SHIPPED_RECORDS[: len(got)]]
        assert data != bytes(damaged), "a flipped bit went unnoticed"
