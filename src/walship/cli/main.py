"""The ``walship`` entry point: one typer app with every subcommand."""

from __future__ import annotations

from typing import Annotated

import typer

from walship import __version__
from walship.cli import admin, demo, history, lostfound, serve, status, wal
from walship.cli.verify import verify_command

app = typer.Typer(
    name="walship",
    help="walship: a replicated event store. A durable WAL, shipped to followers, "
    "history checkpointed to Parquet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("serve")(serve.serve_command)
app.add_typer(wal.app, name="wal")
app.command("status")(status.status_command)
app.command("demo")(demo.demo_command)
app.command("promote")(admin.promote_command)
app.command("repoint")(admin.repoint_command)
app.command("failover")(admin.failover_command)
app.command("forget-follower")(admin.forget_follower_command)
app.command("checkpoint")(history.checkpoint_command)
app.command("sql")(history.sql_command)
app.add_typer(lostfound.app, name="lost-found")
app.command("verify")(verify_command)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"walship {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """walship: a replicated event store."""


def main() -> None:
    """Console-script entry point (``walship``) and ``python -m walship``."""
    app()
