"""``walship status``: ask each node's ``/health`` and show the cluster as tables.

One row per URL given (a node that does not answer is a row saying why, never a traceback),
then, for every leader among them, its own view of each follower: what it sent, what the
follower confirmed, whether it is in the in-sync set, and how far a snapshot transfer got.
A follower's lag is shown twice when both ends answered: the follower's own view (records the
leader wrote, as far as it has heard, that it has not applied) and the leader's (records the
follower has not acknowledged as durable); the two differ by what is in flight.

The reports come from ``node_reports.py`` (library code); the renderables here are built from
their plain health documents, so ``walship demo`` and tests reuse them without a terminal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import httpx
import typer
from rich import box
from rich.console import Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from walship.cli.connect import CaFile, ClientCert, ClientKey, tls_verify
from walship.cli.output import (
    available_width,
    console,
    fail,
    natural_width,
    print_renderable,
)
from walship.errors import InvalidInput
from walship.node_reports import NodeReport, collect, make_client
from walship.peers import normalize_url

_BAR_WIDTH = 10
_CARD_INDENT = 3
_CARD_LABEL_WIDTH = len("lag (leader)")

Layout = Literal["auto", "wide", "narrow"]
LAYOUTS: tuple[Layout, ...] = ("auto", "wide", "narrow")


# ---------------------------------------------------------------------- formatting cells


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return "? ms"
    if value >= 10_000:
        return f"{value / 1000:.0f} s"
    if value >= 1000:
        return f"{value / 1000:.1f} s"
    return f"{value:.0f} ms" if value >= 10 or value == 0 else f"{value:.1f} ms"


def format_lag(view: dict[str, Any], sep: str = ", ") -> str:
    """``3 rec, 12 ms``: records not confirmed and how long ago the oldest was written."""
    records = view.get("lag_records")
    shown = "?" if records is None else str(records)
    return f"{shown} rec{sep}{format_ms(view.get('lag_ms'))}"


def format_snapshot(progress: Any, sep: str = " ") -> Text:
    """A bar, the percentage and bytes done/total of a running snapshot transfer; once every
    byte is there, ``installing`` and the size until the follower has installed it."""
    if not isinstance(progress, dict):
        return _dash()
    done, total = int(progress.get("bytes_done") or 0), int(progress.get("bytes_total") or 0)
    if progress.get("state") == "installing":
        return Text(f"installing{sep}{format_bytes(total)}", style="cyan")
    fraction = min(done / total, 1.0) if total > 0 else 0.0
    filled = round(fraction * _BAR_WIDTH)
    text = Text()
    text.append("█" * filled, style="cyan")
    text.append("░" * (_BAR_WIDTH - filled), style="dim")
    text.append(f" {fraction:4.0%}{sep}{format_bytes(done)}/{format_bytes(total)}")
    source = progress.get("source")
    if isinstance(source, str) and source != "leader":  # cascading: a follower sends it
        text.append(f"{sep}from {source}", style="dim")
    return text


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _dash() -> Text:
    return Text("-", style="dim")


def _status_text(report: NodeReport) -> Text:
    if report.health is None:
        return Text(report.error or "no answer", style="bold red")
    status = str(report.health.get("status", "?"))
    return Text(status, style="green" if status == "healthy" else "bold yellow")


def _role_text(health: dict[str, Any]) -> Text:
    """The role; a leader that takes no writes says why in a word (fenced, unconfirmed)."""
    role = str(health.get("role", "?"))
    leadership = health.get("leadership")
    confirming = isinstance(leadership, dict) and leadership.get("state") == "confirming"
    if role == "leader" and health.get("fenced"):
        return Text("leader (fenced)", style="bold yellow")
    if role == "leader" and confirming:
        return Text("leader (unconfirmed)", style="bold yellow")
    return Text(role)


def _yes_no(value: Any) -> Text:
    if value is True:
        return Text("yes", style="green")
    if value is False:
        return Text("no", style="bold yellow")
    return _dash()


def _node_cell(report: NodeReport) -> Text:
    """The node's name over its address (the scheme left out: it is always there)."""
    text = Text()
    text.append(report.node_id, style="bold")
    text.append("\n" + report.url.removeprefix("http://"), style="dim")
    return text


# ---------------------------------------------------------------------- leader's view


def _leader_view(reports: Sequence[NodeReport], follower: NodeReport) -> dict[str, Any] | None:
    """The session a leader among ``reports`` holds for ``follower``.

    ``{}`` when the follower's own leader answered but has no session for it (it is not
    connected); None when no leader that could know it answered.
    """
    own_leader = follower.replication.get("leader")
    seen_by_its_leader = False
    for report in reports:
        if report.role != "leader":
            continue
        for session in report.replication.get("followers") or []:
            if isinstance(session, dict) and session.get("node_id") == follower.node_id:
                return session
        if own_leader is not None and report.replication.get("listening") == own_leader:
            seen_by_its_leader = True
    return {} if seen_by_its_leader else None


def _leader_cells(report: NodeReport, sep: str = "\n") -> dict[str, RenderableType]:
    """The leader's cells; ``sep`` joins the two parts of a cell (a line break in the table)."""
    repl = report.replication
    if not repl:
        return {}
    followers = [f for f in repl.get("followers") or [] if isinstance(f, dict)]
    count = int(repl.get("in_sync_count") or 0)
    floor = int(repl.get("min_in_sync") or 0)
    listening = repl.get("listening")
    ledger = repl.get("degraded") or {}
    writes, ranges = int(ledger.get("writes") or 0), int(ledger.get("ranges") or 0)
    states = [f["snapshot"].get("state") for f in followers if isinstance(f.get("snapshot"), dict)]
    installing = states.count("installing")
    sending = len(states) - installing
    transfers = ", ".join(
        f"{verb} {n}" for verb, n in (("sending", sending), ("installing", installing)) if n
    )
    return {
        "in sync": Text(
            f"{count}/{len(followers)} (min {floor})",
            style="green" if count >= floor else "bold yellow",
        ),
        "replication": f"{repl.get('mode', '?')}{sep}"
        + (f"listening on {listening}" if listening else "not listening"),
        "degraded": Text("0")
        if writes == 0
        else Text(
            f"{_plural(writes, 'write')}{sep}{_plural(ranges, 'range')}", style="bold yellow"
        ),
        "snapshot": Text(transfers, style="cyan") if transfers else _dash(),
    }


def _follower_cells(
    reports: Sequence[NodeReport], report: NodeReport, sep: str = "\n"
) -> dict[str, RenderableType]:
    repl = report.replication
    if not repl:
        return {}
    session = _leader_view(reports, report)
    cells: dict[str, RenderableType] = {"lag (own)": format_lag(repl, sep)}
    if session == {}:
        cells["lag (leader)"] = Text("not connected", style="bold yellow")
        cells["in sync"] = _yes_no(False)
    elif session is not None:
        cells["lag (leader)"] = format_lag(session, sep)
        cells["in sync"] = _yes_no(session.get("in_sync"))
    state, leader = str(repl.get("state", "?")), repl.get("leader", "?")
    if repl.get("connected"):
        cells["replication"] = f"{state}{sep}from {leader}"
    else:
        error = repl.get("last_error")
        cells["replication"] = Text(
            f"{state}{sep}not connected to {leader}" + (f": {error}" if error else ""),
            style="bold yellow",
        )
    progress = repl.get("snapshot") or (session or {}).get("snapshot")
    cells["snapshot"] = format_snapshot(progress, "\n" if sep == "\n" else " ")
    return cells


# ---------------------------------------------------------------------- tables


# (name, justify, wraps): the columns that may wrap give way first on a narrow terminal
_NODE_COLUMNS: tuple[tuple[str, JustifyMethod, bool], ...] = (
    ("node", "left", False),
    ("role", "left", False),
    ("status", "left", True),
    ("term", "right", False),
    ("last lsn", "right", False),
    ("lag (own)", "right", True),
    ("lag (leader)", "right", True),
    ("in sync", "left", True),
    ("replication", "left", True),
    ("degraded", "right", True),
    ("snapshot", "left", True),
)


def nodes_table(reports: Sequence[NodeReport]) -> Table:
    """One row per URL: who answered, its role and position, and its replication state.

    The snapshot column is there only while a transfer runs.
    """
    table = Table(
        title="cluster",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        caption="lag: records behind and for how long; (own) as the follower sees it "
        "(not applied), (leader) as its leader does (not acknowledged)",
        caption_justify="left",
    )
    rows: list[dict[str, RenderableType]] = []
    for report in reports:
        health = report.health
        cells: dict[str, RenderableType] = {"node": _node_cell(report)}
        cells["status"] = _status_text(report)
        if health is not None:
            cells["role"] = _role_text(health)
            cells["term"] = str(health.get("term", "?"))
            cells["last lsn"] = str(health.get("last_lsn", "?"))
            if report.role == "leader":
                cells |= _leader_cells(report)
            elif report.role == "follower":
                cells |= _follower_cells(reports, report)
        rows.append(cells)
    snapshots = any(
        isinstance(row.get("snapshot"), Text) and str(row["snapshot"]) != "-" for row in rows
    )
    names = [c for c in _NODE_COLUMNS if c[0] != "snapshot" or snapshots]
    for name, justify, wraps in names:
        table.add_column(name, justify=justify, no_wrap=not wraps, overflow="fold")
    for row in rows:
        table.add_row(*(row.get(name, _dash()) for name, _, _ in names))
    return table


def followers_table(leader: NodeReport) -> Table:
    """The leader's view of each follower session, plus known followers not connected now."""
    repl = leader.replication
    table = Table(
        title=f"followers of {leader.node_id} (leader's view)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for name in ("follower", "address", "state", "sent", "durable", "applied", "lag", "in sync"):
        right = name in ("sent", "durable", "applied", "lag")
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    sessions = [s for s in repl.get("followers") or [] if isinstance(s, dict)]
    if any(s.get("snapshot") for s in sessions):
        table.add_column("snapshot", no_wrap=True)
    for session in sessions:
        row: list[RenderableType] = [
            Text(str(session.get("node_id", "?")), style="bold"),
            str(session.get("address", "?")),
            str(session.get("state", "?")),
            str(session.get("sent_lsn", "?")),
            str(session.get("durable_lsn", "?")),
            str(session.get("applied_lsn", "?")),
            format_lag(session),
            _yes_no(session.get("in_sync")),
        ]
        if len(table.columns) > len(row):
            row.append(format_snapshot(session.get("snapshot")))
        table.add_row(*row)
    # a retention slot outlives the connection: WAL is kept for a follower that went away
    slots = repl.get("retention_slots")
    seen = {s.get("node_id") for s in sessions}
    for node_id, slot_lsn in sorted(slots.items()) if isinstance(slots, dict) else []:
        if node_id in seen:
            continue
        row = [
            Text(str(node_id), style="bold"),
            _dash(),
            Text("not connected", style="bold yellow"),
            _dash(),
            f"{slot_lsn} (slot)",
            _dash(),
            _dash(),
            _yes_no(False),
        ]
        table.add_row(*row, *[_dash()] * (len(table.columns) - len(row)))
    return table


# ---------------------------------------------------------------------- narrow: cards


def _card(head: Text, fields: Sequence[tuple[str, RenderableType]]) -> RenderableType:
    """A headline, then one ``label value`` row per field under it; a value too long for the
    line wraps by words inside its own column, so nothing is ever cut letter by letter."""
    grid = Table.grid(padding=(0, 2))
    # one label width for every card, so the values line up down the page
    grid.add_column(style="dim", no_wrap=True, min_width=_CARD_LABEL_WIDTH)
    grid.add_column(overflow="fold")
    for label, value in fields:
        grid.add_row(label, value)
    return Group(head, Padding(grid, (0, 0, 0, _CARD_INDENT)))


def _head(name: str, *words: str | Text) -> Text:
    text = Text(name, style="bold")
    for word in words:
        text.append("  ")
        text.append(word if isinstance(word, Text) else Text(word))
    return text


def _node_card(reports: Sequence[NodeReport], report: NodeReport) -> RenderableType:
    address = Text(report.url.removeprefix("http://"), style="dim")
    health = report.health
    if health is None:
        return _card(_head(report.node_id, address), [("status", _status_text(report))])
    head = _head(report.node_id, str(health.get("role", "?")), _status_text(report), address)
    fields: list[tuple[str, RenderableType]] = [
        ("position", f"term {health.get('term', '?')}, last lsn {health.get('last_lsn', '?')}")
    ]
    if report.role == "leader":
        cells = _leader_cells(report, ", ")
    elif report.role == "follower":
        cells = _follower_cells(reports, report, ", ")
    else:
        cells = {}
    for name, _, _ in _NODE_COLUMNS:
        value = cells.get(name)
        # an empty snapshot cell is noise on a card: the column only exists during a transfer
        if value is not None and not (name == "snapshot" and str(value) == "-"):
            fields.append((name, value))
    return _card(head, fields)


def nodes_cards(reports: Sequence[NodeReport]) -> Group:
    """``nodes_table`` for a narrow terminal: a card per URL, the table's cells as its rows."""
    parts: list[RenderableType] = [Text("cluster", style="italic")]
    parts.extend(_node_card(reports, report) for report in reports)
    parts.append(
        Text(
            "lag: records behind and for how long; (own) as the follower sees it, "
            "(leader) as its leader does",
            style="dim",
        )
    )
    return Group(*parts)


def followers_cards(leader: NodeReport) -> Group:
    """``followers_table`` for a narrow terminal: a card per follower session or slot."""
    repl = leader.replication
    parts: list[RenderableType] = [
        Text(f"followers of {leader.node_id} (leader's view)", style="italic")
    ]
    sessions = [s for s in repl.get("followers") or [] if isinstance(s, dict)]
    for session in sessions:
        head = _head(
            str(session.get("node_id", "?")),
            str(session.get("state", "?")),
            Text(str(session.get("address", "?")), style="dim"),
        )
        fields: list[tuple[str, RenderableType]] = [
            (
                "lsns",
                f"sent {session.get('sent_lsn', '?')}, durable {session.get('durable_lsn', '?')}, "
                f"applied {session.get('applied_lsn', '?')}",
            ),
            ("lag", format_lag(session)),
            ("in sync", _yes_no(session.get("in_sync"))),
        ]
        if session.get("snapshot"):
            fields.append(("snapshot", format_snapshot(session.get("snapshot"))))
        parts.append(_card(head, fields))
    slots = repl.get("retention_slots")
    seen = {s.get("node_id") for s in sessions}
    for node_id, slot_lsn in sorted(slots.items()) if isinstance(slots, dict) else []:
        if node_id not in seen:
            head = _head(str(node_id), Text("not connected", style="bold yellow"))
            parts.append(_card(head, [("durable", f"{slot_lsn} (slot)"), ("in sync", "no")]))
    return Group(*parts)


# ---------------------------------------------------------------------- the whole picture


def render_status(
    reports: Sequence[NodeReport],
    *,
    heading: str | None = None,
    width: int | None = None,
    layout: Layout = "auto",
) -> Group:
    """The whole picture: an optional heading, the nodes, each leader's followers.

    ``wide`` is a table per part, a column per figure; ``narrow`` a card per node, a row per
    figure, for terminals too narrow for the tables (at 80 columns the tables would fold every
    cell letter by letter). ``auto`` takes the tables when they fit in ``width`` (None: no
    limit, as in a pipe) and the cards otherwise.
    """
    if layout not in LAYOUTS:
        raise InvalidInput(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    leaders = [r for r in reports if r.role == "leader" and r.replication]
    tables: list[RenderableType] = [nodes_table(reports), *map(followers_table, leaders)]
    narrow = layout == "narrow" or (
        layout == "auto" and width is not None and natural_width(Group(*tables)) > width
    )
    parts: list[RenderableType] = [Text(heading, style="dim")] if heading else []
    if narrow:
        parts.append(nodes_cards(reports))
        parts.extend(Group(Text(""), followers_cards(r)) for r in leaders)
    else:
        parts.extend(tables)
    return Group(*parts)


def _heading(reports: Sequence[NodeReport], interval_s: float | None) -> str:
    answered = sum(r.answered for r in reports)
    line = f"{time.strftime('%H:%M:%S')}  {answered}/{len(reports)} nodes answered"
    if interval_s is not None:
        line += f"  (every {interval_s:g} s, Ctrl-C to stop)"
    return line


def _print_json(reports: Sequence[NodeReport], *, compact: bool) -> None:
    docs = [r.as_json() for r in reports]
    typer.echo(json.dumps(docs, separators=(",", ":")) if compact else json.dumps(docs, indent=2))


def status_command(
    urls: Annotated[
        list[str],
        typer.Argument(
            help="Node URLs (http://HOST:PORT, or HOST:PORT). Give the leader too for its "
            "view of each follower.",
            show_default=False,
        ),
    ],
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh in place until Ctrl-C.")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="Seconds between refreshes (--watch).")
    ] = 2.0,
    count: Annotated[
        int | None,
        typer.Option("--count", min=1, help="Stop after N refreshes (implies --watch)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the raw health documents as JSON (with --watch: one line per refresh).",
        ),
    ] = False,
    layout: Annotated[
        str,
        typer.Option(
            "--layout",
            help="wide (tables, a column per figure), narrow (a card per node, a row per "
            "figure) or auto: the tables when they fit the terminal (or COLUMNS in a pipe).",
        ),
    ] = "auto",
    ca_file: CaFile = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
) -> None:
    """Show each node's role, term, lsn, lag, in-sync state, degraded writes and snapshots.

    Exits 1 when no URL answered (in the last refresh, with --watch).
    """
    if layout not in LAYOUTS:
        fail(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}", 2)
    targets = [normalize_url(u) for u in urls]
    watching = watch or count is not None
    limit = count if count is not None else (None if watching else 1)
    every = interval if watching else None
    latest: list[NodeReport] = []

    def show(reports: list[NodeReport]) -> None:
        latest[:] = reports
        if as_json:
            _print_json(reports, compact=watching)
            return
        # forced wide in a pipe: the tables at their full width, whatever COLUMNS says
        width = None if layout == "wide" else available_width(console)
        picture = render_status(
            reports, heading=_heading(reports, every), width=width, layout=layout
        )
        print_renderable(console, picture, width)

    with make_client(tls_verify(ca_file, client_cert, client_key)) as client:
        try:
            if watching and not as_json and console.is_terminal:
                _live_loop(client, targets, limit, interval, latest, layout)
            else:
                # a pipe or a file: each refresh printed below the previous one
                _loop(client, targets, limit, interval, show)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how --watch ends
    if not any(r.answered for r in latest):
        raise typer.Exit(1)


def _loop(
    client: httpx.Client,
    targets: list[str],
    limit: int | None,
    interval_s: float,
    show: Callable[[list[NodeReport]], None],
) -> None:
    """Collect and show ``limit`` times (None: until interrupted), ``interval_s`` apart."""
    done = 0
    while limit is None or done < limit:
        if done:
            time.sleep(interval_s)
        show(collect(client, targets))
        done += 1


def _live_loop(
    client: httpx.Client,
    targets: list[str],
    limit: int | None,
    interval_s: float,
    latest: list[NodeReport],
    layout: Layout,
) -> None:
    """On a terminal: redraw the tables in place (the layout follows a resized terminal)."""
    with Live(console=console, auto_refresh=False, redirect_stdout=False) as live:

        def show(reports: list[NodeReport]) -> None:
            latest[:] = reports
            heading = _heading(reports, interval_s)
            picture = render_status(reports, heading=heading, width=console.width, layout=layout)
            live.update(picture, refresh=True)

        _loop(client, targets, limit, interval_s, show)
