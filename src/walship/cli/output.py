"""Console output shared by the commands: rich consoles and the one way to fail cleanly."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def say(message: str, *, style: str | None = None) -> None:
    """One line on stdout, never wrapped (paths and offsets must stay greppable)."""
    console.print(message, style=style, soft_wrap=True, markup=False)


def warn(message: str) -> None:
    """One warning line on stderr."""
    err_console.print(f"warning: {message}", style="yellow", soft_wrap=True, markup=False)


def error(message: str) -> None:
    """Print ``walship: message`` on stderr, one line whatever the terminal's width."""
    err_console.print(f"walship: {message}", style="bold red", soft_wrap=True, markup=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``walship: message`` on stderr and exit with ``code`` (no traceback)."""
    error(message)
    raise typer.Exit(code)
