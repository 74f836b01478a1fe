"""``walship sql``: query a data dir's Parquet history with DuckDB; ``walship checkpoint``:
write a node's memtable to Parquet now.

``sql`` pins one checkpoint (``walship.history``), so it never fails or counts a row twice
while the node that owns the data dir checkpoints and compacts; it needs the ``sql`` extra
(DuckDB). ``checkpoint`` asks a running node through its admin endpoint, or opens a stopped
node's data dir itself.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from walship.admin_client import AdminError, admin_call
from walship.cli.admin import TokenFile, admin_access
from walship.cli.connect import AllowInsecureAdmin, ApiKeyFile, CaFile, ClientCert, ClientKey
from walship.cli.output import fail, say
from walship.errors import WalshipError

SQL_EXTRA_HINT = "pip install 'walship[sql]' (or pip install duckdb)"
_BATCH_ROWS = 8_192


class OutputFormat(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"


def sql_command(
    data_dir: Annotated[Path, typer.Argument(help="A node's data dir (the node may be running).")],
    query: Annotated[
        str, typer.Argument(help='SQL over the view "events", e.g. "SELECT count(*) FROM events".')
    ],
    output: Annotated[
        OutputFormat,
        typer.Option("--format", help="table (for people), csv, or json (one object a line)."),
    ] = OutputFormat.TABLE,
    max_rows: Annotated[
        int, typer.Option("--max-rows", min=1, help="Rows a table shows before it elides.")
    ] = 40,
) -> None:
    """Run DuckDB SQL over the checkpointed history of a data dir, as the view "events".

    The view holds exactly the events up to the last checkpoint (`walship checkpoint` writes
    newer ones out first), each once, while the node goes on checkpointing and compacting.
    """
    try:
        import duckdb
    except ImportError:
        fail(f"walship sql needs DuckDB: {SQL_EXTRA_HINT}")
    from walship.history import open_snapshot

    try:
        snap = open_snapshot(data_dir)
    except WalshipError as exc:
        fail(exc.message)
    with snap:
        con = duckdb.connect()
        try:
            snap.duckdb_view(con)
            relation = con.sql(query)
            if relation is not None:
                _print(relation, output, max_rows)
        except duckdb.Error as exc:
            fail(f"query failed: {_first_line(exc)}")
        finally:
            con.close()
    if output is OutputFormat.TABLE:
        typer.echo(
            f"-- history up to lsn {snap.last_lsn} ({snap.events} events in Parquet)", err=True
        )


def _print(relation: Any, output: OutputFormat, max_rows: int) -> None:
    if output is OutputFormat.TABLE:
        relation.show(max_rows=max_rows)
        return
    reader = (
        relation.to_arrow_reader(_BATCH_ROWS)
        if hasattr(relation, "to_arrow_reader")
        else relation.fetch_record_batch(_BATCH_ROWS)  # duckdb < 1.4
    )
    out = sys.stdout.buffer
    if output is OutputFormat.CSV:
        import pyarrow.csv as pacsv

        with pacsv.CSVWriter(out, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
    else:
        for batch in reader:
            for row in batch.to_pylist():
                out.write(orjson.dumps(row, default=str, option=orjson.OPT_APPEND_NEWLINE))
    out.flush()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def checkpoint_command(
    url: Annotated[
        str | None, typer.Argument(help="HTTP URL of a running node.", show_default=False)
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="A stopped node's data dir, checkpointed in place."),
    ] = None,
    admin_token_file: TokenFile = None,
    api_key_file: ApiKeyFile = None,
    ca_file: CaFile = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    allow_insecure_admin: AllowInsecureAdmin = False,
) -> None:
    """Write a node's memtable to a Parquet part now, so history readers see every event."""
    if (url is None) == (data_dir is None):
        fail("give the URL of a running node or --data-dir of a stopped one (one of them)", 2)
    if url is not None:
        try:
            access = admin_access(
                admin_token_file,
                api_key_file,
                ca_file,
                client_cert,
                client_key,
                allow_insecure_admin,
            )
            answer = admin_call(url, "/internal/checkpoint", access)
        except AdminError as exc:
            fail(f"checkpoint failed: {exc}")
    else:
        assert data_dir is not None
        answer = _checkpoint_offline(data_dir)
    _say_checkpoint(answer)


def _checkpoint_offline(data_dir: Path) -> dict[str, Any]:
    from walship.store import Store, StoreConfig

    if not (data_dir / "wal").is_dir():
        fail(f"{data_dir} is not a walship data dir (it has no wal/)")
    try:
        # no background threads: this store lives for one checkpoint
        store = Store.open(StoreConfig(data_dir, checkpoints=False))
    except WalshipError as exc:
        fail(exc.message)
    # which WAL the node's followers still need is in its retention slots, which only the
    # running leader weighs: remove no segment here ("lsn 1 is still needed"); the node
    # removes them at its next checkpoint
    store.set_retention_floor(lambda: 1)
    try:
        part = store.checkpoint()
        manifest = store.manifest
    except WalshipError as exc:
        fail(f"checkpoint failed: {exc.message}")
    finally:
        store.close()
    return {
        "node_id": str(data_dir),
        "part": None if part is None else part.file,
        "events_written": 0 if part is None else part.events,
        "checkpoint_lsn": manifest.last_lsn,
        "events": manifest.events,
    }


def _say_checkpoint(answer: dict[str, Any]) -> None:
    covers = (
        f"the Parquet history covers lsn <= {answer['checkpoint_lsn']} ({answer['events']} events)"
    )
    if answer.get("part"):
        say(
            f"{answer['node_id']}: checkpointed {answer['events_written']} events into "
            f"{answer['part']}; {covers}"
        )
    else:
        say(f"{answer['node_id']}: nothing new to checkpoint; {covers}")
