"""``walship wal verify`` and ``walship wal dump``: look at a WAL without changing it.

The reading and checking are library code (``wal/offline.py``, ``storage/offline_check.py``):
they never write and take no data-dir lock, so they can look at a running node's WAL and never
keep a node from starting; ``verify`` says when the dir is in use, since the node may then be
writing the last records as they are read. This module parses the arguments and prints.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from walship.cli.output import console, fail, say, warn
from walship.errors import InvalidInput
from walship.events import decode_body
from walship.position import Lsn
from walship.storage.offline_check import verify_wal
from walship.wal.offline import (
    DumpStopped,
    VerifyReport,
    WalLocation,
    find_wal,
    iter_wal_records,
)
from walship.wal.record import Record

app = typer.Typer(
    name="wal",
    help="Inspect a write-ahead log without changing it (verify, dump).",
    no_args_is_help=True,
)


def locate_wal(directory: Path) -> WalLocation:
    """Accept a data dir (holding ``wal/``) or the ``wal/`` directory itself; exit 1 with a
    message when ``directory`` holds no WAL segments either way."""
    try:
        return find_wal(directory)
    except InvalidInput as exc:
        fail(exc.message)


# ---------------------------------------------------------------------- verify


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
            str(seg.first_lsn.value),
            str(seg.last_lsn.value) if seg.records else "-",
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
        first = report.segments[0].first_lsn.value if report.segments else 0
        span = f"lsn {first}..{report.last_lsn.value}" if records else "no records"
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
        for _, _, rec in iter_wal_records(location.wal_dir, Lsn(from_lsn)):
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
