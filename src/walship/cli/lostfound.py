"""``walship lost-found list|export DIR`` and ``replay FILE --to URL``: the records
divergence repair cut from a node.

``DIR`` is a node's data dir or its ``lost-found/`` directory. ``list`` shows one row per
file (how many records, their lsn range and terms, and how they were acknowledged), with the
file's whole name, on a terminal of any width; ``export``
writes every record, with the file it came from, as JSON lines or one JSON array. ``replay``
puts one file's records back on the current leader (``walship.replay`` does the work).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.padding import Padding
from rich.table import Table

from walship.cli.connect import CaFile, ClientCert, ClientKey, read_api_key, tls_verify
from walship.cli.output import (
    available_width,
    console,
    fail,
    natural_width,
    print_renderable,
    progress_bar,
    say,
)
from walship.client import Client
from walship.errors import InvalidInput, WalshipError
from walship.replay import CONFLICTS, Outcome, ReplayResult, counts, load_records, replay
from walship.replication.lostfound import find_files, read_file, summarize, to_builtins

app = typer.Typer(
    name="lost-found",
    help="Show, export and replay records cut from a node's log by divergence repair.",
    no_args_is_help=True,
)

Dir = Annotated[Path, typer.Argument(help="A node's data dir, or its lost-found directory.")]


def _files(where: Path) -> list[Path]:
    try:
        return find_files(where)
    except InvalidInput as exc:
        fail(exc.message)


@dataclass(frozen=True)
class _FileRow:
    name: str
    records: int
    lsns: str
    terms: str
    acknowledged: str


def _summary(path: Path) -> _FileRow:
    summary = summarize(path)
    if summary.error is not None:
        fail(summary.error)
    return _FileRow(
        name=summary.name,
        records=summary.records,
        lsns="-" if summary.first_lsn is None else f"{summary.first_lsn}..{summary.last_lsn}",
        terms=",".join(str(t) for t in summary.terms) or "-",
        acknowledged=", ".join(f"{n} {level}" for level, n in sorted(summary.acknowledged.items()))
        or "-",
    )


def _table(summaries: list[_FileRow]) -> Table:
    table = Table()
    for column in ("file", "records", "lsns", "terms", "acknowledged"):
        # the file name is what one copies into the next command: never cut or folded
        table.add_column(
            column, justify="right" if column == "records" else "left", no_wrap=column == "file"
        )
    for f in summaries:
        table.add_row(f.name, str(f.records), f.lsns, f.terms, f.acknowledged)
    return table


def _print_rows(summaries: list[_FileRow], width: int) -> None:
    """For a narrow terminal: each file's whole name on a line of its own (longer than the
    terminal, it runs on rather than being cut), its figures in rows under it."""
    for f in summaries:
        say(f.name, style="bold")
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(overflow="fold")  # a word longer than the line is folded, never cut
        grid.add_row("records", f"{f.records}, lsns {f.lsns}, terms {f.terms}")
        grid.add_row("acknowledged", f.acknowledged)
        print_renderable(console, Padding(grid, (0, 0, 0, 3)), width)


@app.command("list")
def list_command(directory: Dir) -> None:
    """One row per lost-and-found file, its whole name first (a table when it fits)."""
    files = _files(directory)
    if not files:
        say(f"no lost-and-found records under {directory}")
        return
    summaries = [_summary(path) for path in files]
    say(f"lost-and-found in {directory}", style="italic")
    table = _table(summaries)
    width = available_width(console)
    if width is None or natural_width(table) <= width:
        print_renderable(console, table)
    else:
        _print_rows(summaries, width)
    say(f"{sum(f.records for f in summaries)} records in {len(files)} files")


@app.command("export")
def export_command(
    directory: Dir,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of standard output.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="jsonl (one record a line) or json (one array).")
    ] = "jsonl",
) -> None:
    """Every record of every file, oldest first, each with the file it came from."""
    if fmt not in ("jsonl", "json"):
        fail(f"--format must be jsonl or json, not {fmt!r}", 2)
    records: list[dict[str, Any]] = []
    for path in _files(directory):
        try:
            records.extend(to_builtins(rec, path) for rec in read_file(path))
        except InvalidInput as exc:
            fail(exc.message)
    if fmt == "json":
        text = json.dumps(records, indent=2) + "\n"
    else:
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        say(f"wrote {len(records)} records to {out}", style=None)


@app.command("replay")
def replay_command(
    file: Annotated[
        Path,
        typer.Argument(help="One lost-and-found file (or `export --format jsonl` output)."),
    ],
    to: Annotated[
        str,
        typer.Option("--to", help="A node of the cluster (the leader, or a node that names it)."),
    ],
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Ask the leader what a replay would do; write nothing."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            envvar="WALSHIP_API_KEY_FILE",
            help="File holding an API key (wsk_…) that may write the records' tenants.",
        ),
    ] = None,
    ca_file: CaFile = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
) -> None:
    """Re-append a file's cut records to the current leader with their original ids and
    versions: nothing is stored twice, and a record whose entity has moved on is listed,
    not forced. Exit 0 when every record is back, 1 when conflicts are listed, 2 on bad
    input or when the leader cannot be reached."""
    try:
        records = load_records(file)
    except InvalidInput as exc:
        fail(exc.message, 2)
    verify = tls_verify(ca_file, client_cert, client_key)
    key = read_api_key(api_key_file) if api_key_file is not None else None
    # the records go in order and every one is idempotent; a failover mid-way is retried
    # with the same bytes by the client, within its usual deadline
    with Client(to, api_key=key, verify=verify) as client:
        try:
            client.health()  # a node that does not answer is one line now, not after retries
        except WalshipError as exc:
            fail(f"cannot reach {to}: {exc.message}", 2)
        try:
            with progress_bar(len(records), "dry run" if dry_run else "replay") as bar:
                results = replay(client, records, dry_run=dry_run, advance=bar.advance)
        except WalshipError as exc:
            fail(
                f"replay stopped: {exc.message} (records sent before it are stored; "
                "replaying the file again stores none of them twice)",
                2,
            )
    _report(file, to, dry_run, results, as_json)
    conflicts = [r for r in results if r.outcome in CONFLICTS]
    raise typer.Exit(1 if conflicts else 0)


def _report(file: Path, to: str, dry_run: bool, results: list[ReplayResult], as_json: bool) -> None:
    tally = counts(results)
    if as_json:
        body = {
            "file": str(file),
            "to": to,
            "dry_run": dry_run,
            "counts": tally,
            "records": [r.to_dict() for r in results],
        }
        sys.stdout.write(json.dumps(body) + "\n")
        return
    done = "would store" if dry_run else "stored"
    n = tally[Outcome.WOULD_STORE.value] if dry_run else tally[Outcome.STORED.value]
    say(
        f"{'dry run: ' if dry_run else ''}{len(results)} records of {file.name}: {n} {done}, "
        f"{tally['already_stored']} already stored, {tally['version_conflict']} version "
        f"conflicts, {tally['id_conflict']} id conflicts, {tally['tracking_conflict']} "
        f"tracking conflicts, {tally['skipped']} skipped"
    )
    conflicts = [r for r in results if r.outcome in CONFLICTS]
    if not conflicts:
        return
    say("not replayed (the leader holds something else there; nothing was forced):")
    table = Table()
    for column in ("lost lsn", "id", "entity", "version", "why"):
        table.add_column(column, no_wrap=column == "id")
    for r in conflicts:
        ev = r.record.event
        why = _why(r)
        entity = ev.entity_id if ev.tenant_id == "default" else f"{ev.tenant_id}/{ev.entity_id}"
        if r.record.tracking:
            entity = f"consumer {entity}"
        table.add_row(str(r.record.lsn), str(ev.id), entity, str(ev.version), why)
    print_renderable(console, table)


def _why(r: ReplayResult) -> str:
    """Why a record was not replayed, in the report's words."""
    if "after_conflict_lsn" in r.detail:
        why = f"follows lost lsn {r.detail['after_conflict_lsn']}, not replayed"
    elif r.outcome is Outcome.TRACKING_CONFLICT:
        why = (
            f"consumer at position {r.detail.get('stored_position')} now, not below the "
            "batch's tracking"
        )
    elif r.outcome is Outcome.VERSION_CONFLICT:
        entity = r.detail.get("entity_id")
        of = f" ({entity})" if entity is not None and "batch_lsns" in r.detail else ""
        why = f"entity moved on{of}: at version {r.detail.get('current_version')} now"
    else:
        stored = r.detail.get("stored") or {}
        why = f"id stored with other contents at lsn {stored.get('lsn')}"
    batch = r.detail.get("batch_lsns")
    if batch is not None:
        why = f"{why}; its tracked batch (lost lsns {batch[0]}..{batch[1]}) is refused whole"
    return why
