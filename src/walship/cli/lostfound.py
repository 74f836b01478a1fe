"""``walship lost-found list|export DIR``: the records divergence repair cut from a node.

``DIR`` is a node's data dir or its ``lost-found/`` directory. ``list`` shows one row per
file (how many records, their lsn range and terms, and how they were acknowledged), with the
file's whole name, on a terminal of any width; ``export``
writes every record, with the file it came from, as JSON lines or one JSON array.
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

from walship.cli.output import available_width, console, fail, natural_width, print_renderable, say
from walship.errors import InvalidInput
from walship.replication.lostfound import find_files, read_file, summarize, to_builtins

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
