"""The ``walship`` entry point: one typer app with every subcommand."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover (older typer on click)
    from click.exceptions import ClickException, UsageError  # type: ignore[assignment]

from walship import __version__
from walship.cli import admin, demo, history, keys, lostfound, serve, status, wal
from walship.cli.output import error
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
app.add_typer(keys.app, name="keys")
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
    """Console-script entry point (``walship``) and ``python -m walship``.

    A usage error (an unknown flag, a value of the wrong type) is one line on stderr and exit
    2, like the commands' own errors, instead of click's usage box; everything else is as
    click does it.
    """
    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        if exc.ctx is None or type(exc).__name__ == "NoArgsIsHelpError":
            if exc.ctx is not None:
                typer.echo(exc.ctx.get_help())  # `walship` or `walship wal` alone
            sys.exit(exc.exit_code)
        path = exc.ctx.command_path
        sub = path.partition(" ")[2]
        message = " ".join(exc.format_message().split())
        error(f"{sub + ': ' if sub else ''}{message} (see {path} --help)")
        sys.exit(exc.exit_code)
    except ClickException as exc:
        error(" ".join(exc.format_message().split()))
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
