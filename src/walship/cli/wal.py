"""``walship wal verify`` and ``walship wal dump``: look at a WAL without changing it.

Both read the segment files directly (``scan_segment``/``decode_record``) instead of
``Wal.open``, because recovery truncates a torn tail and these commands must leave the
directory exactly as they found it: an operator runs them *before* deciding to start a node.
They take no data-dir lock (``dirlock.py``), so they can look at a running node's WAL and never
keep a node from starting; ``verify`` says when the dir is in use, since the node may then be
writing the last records as they are read.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from walship.cli.output import console, fail, say, warn
from walship.dirlock import holder_pid
from walship.errors import CorruptionError
from walship.events import decode_body
from walship.limits import DEFAULT_LIMITS
from walship.storage.manifest import load_manifest
from walship.wal.record import Record, RecordIncomplete, RecordInvalid, decode_record
from walship.wal.segment import (
    SEGMENT_HEADER_BYTES,
    SegmentHeader,
    list_segments,
    scan_segment,
    zero_tail,
)
from walship.wal.terms import TermHistory

app = typer.Typer(
    name="wal",
    help="Inspect a write-ahead log without changing it (verify, dump).",
    no_args_is_help=True,
)


# ---------------------------------------------------------------------- locating a WAL


@dataclass(frozen=True)
class WalLocation:
    """The WAL directory, and the node's data dir when it could be told."""

    wal_dir: Path
    data_dir: Path | None


def locate_wal(directory: Path) -> WalLocation:
    """Accept a data dir (holding ``wal/``) or the ``wal/`` directory itself.

    Exits 1 with a message when ``directory`` holds no WAL segments either way.
    """
    if not directory.is_dir():
        fail(f"{directory} is not a directory")
    if list_segments(directory):
        parent = directory.parent if directory.name == "wal" else None
        return WalLocation(directory, parent)
    nested = directory / "wal"
    if nested.is_dir() and list_segments(nested):
        return WalLocation(nested, directory)
    fail(f"no WAL segments (*.wal) in {directory} or {nested}")


# ---------------------------------------------------------------------- verify


@dataclass
class SegmentReport:
    """What verification found in one segment file."""

    path: Path
    first_lsn: int
    last_lsn: int
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
    def last_lsn(self) -> int:
        return self.segments[-1].last_lsn if self.segments else 0


def _damage_from(exc: CorruptionError, path: Path) -> Damage:
    file = str(exc.details.get("file", path))
    offset = int(exc.details.get("offset", 0))
    reason = exc.message
    for prefix in (f"{file} at offset {offset}: ", f"{file}: "):
        if reason.startswith(prefix):
            reason = reason[len(prefix) :]
            break
    return Damage(file, offset, reason)


def verify_wal(location: WalLocation) -> VerifyReport:
    """Verify every segment: CRC, lsn and chain continuity, term history, checkpoint coverage.

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
        seg = SegmentReport(path, first_lsn, first_lsn - 1, 0, path.stat().st_size)
        report.segments.append(seg)

        def count(rec: Record, seg: SegmentReport = seg) -> None:
            seg.records += 1
            seg.last_lsn = rec.lsn

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
            report.corruption.append(_damage_from(exc, path))
            chained = None
            continue
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
    if location.data_dir is not None:
        _verify_checkpoint(report)
        holder = holder_pid(location.data_dir)
        if holder is not None:
            report.notes.append(
                f"{location.data_dir} is in use by pid {holder or '?'}: it may be writing the "
                "last records as they are read (a torn tail is then expected)"
            )
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


def _verify_checkpoint(report: VerifyReport) -> None:
    assert report.location.data_dir is not None
    checkpoint_dir = report.location.data_dir / "checkpoints"
    try:
        manifest = load_manifest(checkpoint_dir)
    except CorruptionError as exc:
        report.problems.append(exc.message)
        return
    if not report.segments or report.corruption:
        return
    first = report.segments[0].first_lsn
    last = report.last_lsn
    checkpointed = manifest.last_lsn
    if checkpointed:
        report.notes.append(
            f"checkpoint covers lsn 1..{checkpointed} in {len(manifest.parts)} Parquet part(s)"
        )
    if first > checkpointed + 1:
        report.problems.append(
            f"the WAL starts at lsn {first} but the checkpoint ends at {checkpointed}: "
            f"records {checkpointed + 1}..{first - 1} are missing"
        )
    elif last < checkpointed:
        report.problems.append(
            f"the WAL ends at lsn {last} but the checkpoint already covers {checkpointed}"
        )


def render_verify(report: VerifyReport) -> None:
    table = Table(title=f"WAL {report.location.wal_dir}", title_justify="left")
    table.add_column("file")
    table.add_column("first lsn", justify="right")
    table.add_column("last lsn", justify="right")
    table.add_column("records", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("status")
    styles = {"ok": "green", "torn tail": "yellow", "corrupt": "bold red"}
    for seg in report.segments:
        table.add_row(
            seg.path.name,
            str(seg.first_lsn),
            str(seg.last_lsn) if seg.records else "-",
            str(seg.records),
            f"{seg.file_bytes:,}",
            f"[{styles.get(seg.status, '')}]{seg.status}[/]",
        )
    console.print(table)
    if report.terms:
        say("term history: " + ", ".join(f"term {t} from lsn {lsn}" for t, lsn in report.terms))
    for note in report.notes:
        say(note)
    if report.torn_tail is not None:
        cut = report.torn_tail
        warn(
            f"torn tail at {cut.file} offset {cut.offset}: would be truncated on start "
            f"({cut.reason})"
        )
    for bad in report.corruption:
        say(f"corrupt: {bad.file} at offset {bad.offset}: {bad.reason}", style="bold red")
    for problem in report.problems:
        say(f"corrupt: {problem}", style="bold red")
    records = sum(s.records for s in report.segments)
    if report.ok:
        first = report.segments[0].first_lsn if report.segments else 0
        span = f"lsn {first}..{report.last_lsn}" if records else "no records"
        torn = " (then a torn tail)" if report.torn_tail is not None else ""
        say(
            f"WAL OK: {records} records, {span}{torn}, {len(report.segments)} segment(s)",
            style="green",
        )
    else:
        n = len(report.corruption) + len(report.problems)
        say(f"WAL CORRUPT: {n} problem(s); a node will refuse to start on it", style="bold red")


@app.command("verify")
def verify_command(
    directory: Annotated[
        Path,
        typer.Argument(help="A node's data dir, or its wal/ subdirectory.", show_default=False),
    ],
) -> None:
    """Verify every WAL segment (CRC, lsn order, chain) without changing anything.

    Exit 0 when the log is whole (a torn tail, which start-up truncates, is only a warning),
    1 on corruption.
    """
    report = verify_wal(locate_wal(directory))
    render_verify(report)
    if not report.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------------- dump


class DumpStopped(Exception):
    """An undecodable record ended the dump."""

    def __init__(self, damage: Damage, in_last_segment: bool) -> None:
        super().__init__(damage.reason)
        self.damage = damage
        self.in_last_segment = in_last_segment


def iter_wal_records(wal_dir: Path, from_lsn: int = 1) -> Iterator[tuple[Path, int, Record]]:
    """``(segment, offset, record)`` for every CRC-valid record with lsn >= ``from_lsn``.

    Raises DumpStopped at the first record that does not decode. Chains are not checked here
    (that is ``verify``'s job); the dump shows what is on disk.
    """
    found = list_segments(wal_dir)
    start = 0
    for i, (first, _) in enumerate(found):
        if first <= from_lsn:
            start = i
    body_max = DEFAULT_LIMITS.record_bytes_max
    for i in range(start, len(found)):
        path = found[i][1]
        buf = path.read_bytes()
        try:
            SegmentHeader.decode(buf, path)
        except CorruptionError as exc:
            raise DumpStopped(_damage_from(exc, path), i == len(found) - 1) from exc
        view = memoryview(buf)
        offset = SEGMENT_HEADER_BYTES
        while offset < len(buf):
            if buf[offset] == 0 and zero_tail(buf, offset):
                break  # preallocated space after the last record
            try:
                rec = decode_record(view, offset, body_max)
            except (RecordIncomplete, RecordInvalid) as exc:
                raise DumpStopped(Damage(str(path), offset, str(exc)), i == len(found) - 1) from exc
            if rec.lsn >= from_lsn:
                yield path, offset, rec
            offset += len(rec.raw)


def describe_record(rec: Record) -> dict[str, Any]:
    """The dump fields of one record; the body decoded as an event when it is one."""
    out: dict[str, Any] = {
        "lsn": rec.lsn,
        "term": rec.term,
        "chain": rec.chain.hex(),
        "body_bytes": len(rec.body),
    }
    try:
        body = decode_body(rec.body)
    except (msgspec.DecodeError, ValueError):
        out.update(event_type=None, tenant_id=None, entity_id=None, event_id=None)
        return out
    out.update(
        event_type=body.event_type,
        tenant_id=body.tenant_id,
        entity_id=body.entity_id,
        event_id=str(uuid.UUID(bytes=body.id)) if len(body.id) == 16 else body.id.hex(),
        version=body.version,
        timestamp_us=body.timestamp_us,
        position=body.tenant_position,
    )
    return out


def _text_line(fields: dict[str, Any]) -> str:
    etype = fields["event_type"] or "<undecodable body>"
    entity = fields["entity_id"] or "-"
    if fields.get("tenant_id") not in (None, "default"):
        entity = f"{fields['tenant_id']}/{entity}"
    return (
        f"{fields['lsn']:>10} {fields['term']:>5} {fields['chain']} {fields['body_bytes']:>8} "
        f"{etype} {entity} {fields['event_id'] or '-'}"
    )


@app.command("dump")
def dump_command(
    directory: Annotated[
        Path,
        typer.Argument(help="A node's data dir, or its wal/ subdirectory.", show_default=False),
    ],
    from_lsn: Annotated[int, typer.Option("--from-lsn", min=1, help="First lsn to show.")] = 1,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Show at most this many records.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print one line per WAL record: lsn, term, chain, body size, event type, entity, event id.

    ``_system.`` records are shown too. Stops at the first undecodable record: exit 0 when it
    is in the last segment (a torn tail, say), 1 when it is earlier.
    """
    location = locate_wal(directory)
    out = sys.stdout
    shown = 0
    if not as_json:
        out.write("#      lsn  term chain              bytes event_type entity_id event_id\n")
    try:
        for _, _, rec in iter_wal_records(location.wal_dir, from_lsn):
            if limit is not None and shown >= limit:
                break
            fields = describe_record(rec)
            out.write((json.dumps(fields) if as_json else _text_line(fields)) + "\n")
            shown += 1
    except DumpStopped as stop:
        out.flush()
        bad = stop.damage
        message = f"{bad.file} at offset {bad.offset}: {bad.reason}"
        if stop.in_last_segment:
            warn(f"dump stopped at {message} (a torn tail? run `walship wal verify`)")
            return
        fail(f"corrupt: {message}")
    except BrokenPipeError:
        # `walship wal dump DIR | head`: the reader left; that is not an error
        raise typer.Exit(0) from None
    out.flush()
