"""Reading a WAL directory offline: verify its segments, iterate its records, change nothing.

Both read the segment files directly (``scan_segment``/``decode_record``) instead of
``Wal.open``, because recovery truncates a torn tail and an offline look must leave the
directory exactly as it found it: an operator runs ``walship wal verify``/``dump`` *before*
deciding to start a node, and the tests, benchmarks and ``walship verify`` read the logs of
nodes they stopped or killed. Nothing here takes the data-dir lock, so it can look at a running
node's WAL (whose last records may then be half written).

The checkpoint coverage of a whole data dir is checked one layer up, in
``storage/offline_check.py``; the CLI commands that print all this are in ``cli/wal.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from walship.errors import CorruptionError, InvalidInput
from walship.limits import DEFAULT_LIMITS
from walship.position import Lsn
from walship.wal.record import Record, RecordIncomplete, RecordInvalid, decode_record
from walship.wal.segment import (
    SEGMENT_HEADER_BYTES,
    SegmentHeader,
    list_segments,
    scan_segment,
    zero_tail,
)
from walship.wal.terms import TermHistory

# ---------------------------------------------------------------------- locating a WAL


@dataclass(frozen=True)
class WalLocation:
    """The WAL directory, and the node's data dir when it could be told."""

    wal_dir: Path
    data_dir: Path | None


def find_wal(directory: Path) -> WalLocation:
    """Accept a data dir (holding ``wal/``) or the ``wal/`` directory itself.

    Raises InvalidInput, saying why, when ``directory`` holds no WAL segments either way.
    """
    if not directory.is_dir():
        raise InvalidInput(f"{directory} is not a directory")
    if list_segments(directory):
        parent = directory.parent if directory.name == "wal" else None
        return WalLocation(directory, parent)
    nested = directory / "wal"
    if nested.is_dir() and list_segments(nested):
        return WalLocation(nested, directory)
    raise InvalidInput(f"no WAL segments (*.wal) in {directory} or {nested}")


# ---------------------------------------------------------------------- verify


@dataclass
class SegmentReport:
    """What verification found in one segment file."""

    path: Path
    first_lsn: Lsn
    last_lsn: Lsn  # first_lsn - 1 while no record was read
    records: int
    file_bytes: int
    status: str = "ok"


@dataclass(frozen=True)
class Damage:
    """A bad spot: which file, at which byte offset, and why."""

    file: str
    offset: int
    reason: str


@dataclass
class VerifyReport:
    """The outcome of verifying a whole WAL directory."""

    location: WalLocation
    segments: list[SegmentReport] = field(default_factory=list)
    torn_tail: Damage | None = None
    corruption: list[Damage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # corrupt state not tied to an offset
    notes: list[str] = field(default_factory=list)
    terms: list[tuple[int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corruption and not self.problems

    @property
    def last_lsn(self) -> Lsn:
        return self.segments[-1].last_lsn if self.segments else Lsn(0)


def damage_from(exc: CorruptionError, path: Path) -> Damage:
    """The file, offset and reason of a CorruptionError (the reason without its location)."""
    file = str(exc.details.get("file", path))
    offset = int(exc.details.get("offset", 0))
    reason = exc.message
    for prefix in (f"{file} at offset {offset}: ", f"{file}: "):
        if reason.startswith(prefix):
            reason = reason[len(prefix) :]
            break
    return Damage(file, offset, reason)


def verify_segments(location: WalLocation) -> VerifyReport:
    """Verify every segment: CRC, lsn and chain continuity, and the term history.

    After a corrupt segment, later segments are still scanned, each on its own (their
    continuity with the damaged part cannot be checked), so the report shows how much is
    intact. Never writes to the directory.
    """
    report = VerifyReport(location)
    wal_dir = location.wal_dir
    body_max = DEFAULT_LIMITS.record_bytes_max
    found = list_segments(wal_dir)
    chained: tuple[int, bytes] | None = None  # (next lsn, chain) the next segment must continue
    last_term = 0
    for i, (first_lsn, path) in enumerate(found):
        before = Lsn(max(first_lsn - 1, 0))
        seg = SegmentReport(path, Lsn(first_lsn), before, 0, path.stat().st_size)
        report.segments.append(seg)
        read = [0, before.value]  # records, last lsn: bare ints per record, an Lsn per segment

        def count(rec: Record, read: list[int] = read) -> None:
            read[0] += 1
            read[1] = rec.lsn

        try:
            scan = scan_segment(
                path,
                expected_first_lsn=None if chained is None else chained[0],
                expected_prev_chain=None if chained is None else chained[1],
                is_last=i == len(found) - 1,
                body_bytes_max=body_max,
                on_record=count,
            )
        except CorruptionError as exc:
            seg.status = "corrupt"
            report.corruption.append(damage_from(exc, path))
            chained = None
            continue
        finally:
            seg.records, seg.last_lsn = read[0], Lsn(read[1])
        last_term = max(last_term, scan.last_term)
        chained = (scan.last_lsn + 1, scan.last_chain)
        if scan.torn_tail is not None:
            seg.status = "torn tail"
            reason = scan.torn_tail
            prefix = f"{path} at offset {scan.valid_bytes}: "
            if reason.startswith(prefix):
                reason = reason[len(prefix) :]
            report.torn_tail = Damage(str(path), scan.valid_bytes, reason)
    stale = sorted(wal_dir.glob("*.wal.tmp"))
    for tmp in stale:
        report.notes.append(f"{tmp}: unfinished segment file, would be removed on start")
    _verify_terms(report, last_term)
    return report


def _verify_terms(report: VerifyReport, last_term: int) -> None:
    try:
        terms = TermHistory.load(report.location.wal_dir)
    except CorruptionError as exc:
        report.problems.append(exc.message)
        return
    report.terms = terms.to_list()
    if last_term > terms.current.value:
        report.problems.append(
            f"records of term {last_term} but the term history "
            f"({report.location.wal_dir / 'term_history.json'}) ends at term {terms.current.value}"
        )


# ---------------------------------------------------------------------- reading records


class DumpStopped(Exception):
    """An undecodable record ended the reading."""

    def __init__(self, damage: Damage, in_last_segment: bool) -> None:
        super().__init__(damage.reason)
        self.damage = damage
        self.in_last_segment = in_last_segment


def iter_wal_records(wal_dir: Path, from_lsn: Lsn = Lsn(1)) -> Iterator[tuple[Path, int, Record]]:
    """``(segment, offset, record)`` for every CRC-valid record with lsn >= ``from_lsn``.

    Raises DumpStopped at the first record that does not decode. Chains are not checked here
    (that is ``verify_segments``' job); this shows what is on disk.
    """
    found = list_segments(wal_dir)
    from_value = from_lsn.value
    start = 0
    for i, (first, _) in enumerate(found):
        if first <= from_value:
            start = i
    body_max = DEFAULT_LIMITS.record_bytes_max
    for i in range(start, len(found)):
        path = found[i][1]
        buf = path.read_bytes()
        try:
            SegmentHeader.decode(buf, path)
        except CorruptionError as exc:
            raise DumpStopped(damage_from(exc, path), i == len(found) - 1) from exc
        view = memoryview(buf)
        offset = SEGMENT_HEADER_BYTES
        while offset < len(buf):
            if buf[offset] == 0 and zero_tail(buf, offset):
                break  # preallocated space after the last record
            try:
                rec = decode_record(view, offset, body_max)
            except (RecordIncomplete, RecordInvalid) as exc:
                raise DumpStopped(Damage(str(path), offset, str(exc)), i == len(found) - 1) from exc
            if rec.lsn >= from_value:
                yield path, offset, rec
            offset += len(rec.raw)
