"""The `walship` commands that README.md and docs/*.md tell an operator to run exist, with the
flags they are shown with: each ``walship SUB [SUB] ... --flag`` line in a code block or inline
code is checked against the CLI's own definition (no process started, no network).

A runbook read at 3 a.m. with a flag that was renamed is worse than none; this is what keeps
the reference in step with ``walship … --help``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.main

from walship.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE_RE = re.compile(r"^[ \t]*```[a-z]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
_INLINE_RE = re.compile(r"`([^`\n]+)`")
# at the start of a command: the line's, or after `sudo [VAR=value ...]`, `&&`, `;` or `|`
_COMMAND_RE = re.compile(
    r"(?:^|&&\s*|;\s*|\|\s*|sudo\s+(?:\S+=\S+\s+)*)walship ((?:[a-z][a-z-]*(?:\s+|$))+)(.*)"
)


def cli() -> Any:
    """The CLI's command tree (typer's own click: a group has ``commands``)."""
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    return group


def commands(text: str) -> list[str]:
    """Every ``walship …`` command line in ``text``'s code: fenced blocks (``\\`` continuations
    joined, comments dropped) and inline code."""
    found = []
    for body in _FENCE_RE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", body)
        found += [re.sub(r"\s#\s.*$", "", line) for line in joined.splitlines()]
    found = [" ".join(line.split()) for line in found]
    fences_out = _FENCE_RE.sub("", text)
    found += [" ".join(code.split()) for code in _INLINE_RE.findall(fences_out)]
    return [line for line in found if _COMMAND_RE.search(line)]


def problems(line: str, group: Any) -> list[str]:
    """What is wrong with one ``walship …`` line: an unknown subcommand or flag."""
    match = _COMMAND_RE.search(line)
    assert match is not None
    words, rest = match.group(1).split(), match.group(2)
    command = group
    for i, word in enumerate(words):
        if not hasattr(command, "commands"):
            rest = " ".join(words[i:]) + " " + rest
            break
        sub = command.commands.get(word)
        if sub is None:
            under = "" if command is group else f" under {command.name!r}"
            return [f"{line}: no command {word!r}{under}"]
        command = sub
    if hasattr(command, "commands"):
        return []  # `walship wal verify|dump`: a group named in prose
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    known |= {"--help"}
    own = re.split(r" \| | && |; ", rest)[0]  # not the flags of a command piped to
    flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", own)
    return [f"{line}: {command.name} has no {flag}" for flag in flags if flag not in known]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_walship_command_shown_exists_with_its_flags(path: Path) -> None:
    group = cli()
    found = [p for line in commands(path.read_text()) for p in problems(line, group)]
    assert found == []


def test_the_check_sees_a_stale_flag_and_command() -> None:
    group = cli()
    text = (
        "```bash\nwalship serve --data-dir d \\\n"
        "    --no-such-flag 1   # a comment --ignored\n```\n"
        "`walship repoint URL --leader H:P` `walship frobnicate` "
        "`walship lost-found replay F --to U`"
    )
    lines = commands(text)
    assert len(lines) == 4
    assert [p for line in lines for p in problems(line, group)] == [
        "walship serve --data-dir d --no-such-flag 1: serve has no --no-such-flag",
        "walship frobnicate: no command 'frobnicate'",
    ]
