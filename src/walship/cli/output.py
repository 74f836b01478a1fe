"""Console output shared by the commands: rich consoles and the one way to fail cleanly."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Iterator
from typing import NoReturn

import typer
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

_NATURAL_WIDTH_MAX = 400


def available_width(out: Console) -> int | None:
    """The columns output to ``out`` may use: the terminal's width; for a pipe or a file,
    ``COLUMNS`` when it is set, else None (no limit: a log line can be as long as it needs)."""
    if out.is_terminal:
        return out.width
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


def natural_width(renderable: RenderableType) -> int:
    """How wide ``renderable`` is when nothing makes it wrap (at most 400 columns)."""
    probe = Console(width=_NATURAL_WIDTH_MAX, file=io.StringIO())
    return probe.measure(renderable).maximum


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


def print_renderable(out: Console, renderable: RenderableType, width: int | None = None) -> None:
    """Print to a terminal as rich does; elsewhere at ``width`` (None: the natural width),
    lines right-stripped.

    A pipe or a log file has no width: rich would assume 80 columns and cut the table's cells
    to ``…``, which is useless in CI logs and greps. Tables pad every line to their width,
    which only makes diffs and logs noisy.
    """
    if out.is_terminal:
        out.print(renderable)
        return
    if width is None:
        width = max(out.width, natural_width(renderable))
    buffer = io.StringIO()
    # Console.print clamps a width argument to the console's own, so: a console that wide
    sized = Console(
        file=buffer,
        width=width,
        color_system=out.color_system,  # type: ignore[arg-type]  # rich returns the name as str
        highlight=False,
    )
    sized.print(renderable)
    out.file.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))
    out.file.flush()


@contextlib.contextmanager
def progress_bar(total: float, description: str, *, unit: str = "") -> Iterator[Bar]:
    """A rich progress bar on stderr (so stdout stays the report), of ``total`` steps.

    On a terminal it redraws in place; elsewhere (a pipe, CI) rich prints it once, as it
    stands when it ends, so a log gets one line, not a frame per step.
    """
    columns: list[str | ProgressColumn] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn()
        if not unit
        else TextColumn(f"{{task.completed:.0f}}/{{task.total:.0f}} {unit}"),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err_console, transient=False) as progress:
        yield Bar(progress, progress.add_task(description, total=total))


@dataclasses.dataclass(frozen=True)
class Bar:
    """The one task of a ``progress_bar``."""

    progress: Progress
    task: TaskID

    def advance(self, steps: float = 1) -> None:
        self.progress.advance(self.task, steps)

    def update(self, *, completed: float | None = None, description: str | None = None) -> None:
        self.progress.update(self.task, completed=completed, description=description)
