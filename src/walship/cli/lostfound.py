"""``walship lost-found list|export DIR``: the records divergence repair cut from a node.

``DIR`` is a node's data dir or its ``lost-found/`` directory. ``list`` shows one row per
file (how many records, their lsn range and terms, and how they were acknowledged); ``export``
writes every record, with the file it came from, as JSON lines or one JSON array.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from walship.cli.output import console, fail, say
from walship.errors import InvalidInput
from walship.replication.lostfound import find_files, read_file, to_builtins

app = typer.Typer(
    name="lost-found",
    help="Show and export records cut from a node's log by divergence repair.",
    no_args_is_help=True,
)

Dir = Annotated[Path, typer.Argument(help="A node's data dir, or its lost-found directory.")]


def _files(where: Path) -> list[Path]:
    try:
        return find_files(where)
    except InvalidInput as exc:
        fail(exc.message)


@app.command("list")
def list_command(directory: Dir) -> None:
    """One row per lost-and-found file."""
    files = _files(directory)
    if not files:
        say(f"no lost-and-found records under {directory}")
        return
    table = Table(title=f"lost-and-found in {directory}")
    for column in ("file", "records", "lsns", "terms", "acknowledged"):
        table.add_column(column, justify="right" if column == "records" else "left")
    total = 0
    for path in files:
        try:
            records = list(read_file(path))
        except InvalidInput as exc:
            fail(exc.message)
        total += len(records)
        lsns = f"{records[0].lsn}..{records[-1].lsn}" if records else "-"
        terms = ",".join(str(t) for t in sorted({r.term for r in records})) or "-"
        acks = Counter(r.acknowledged for r in records)
        table.add_row(
            path.name,
            str(len(records)),
            lsns,
            terms,
            ", ".join(f"{n} {level}" for level, n in sorted(acks.items())) or "-",
        )
    console.print(table)
    say(f"{total} records in {len(files)} files")


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
