"""Every relative link in README.md and docs/*.md leads somewhere: the file exists and, when the
link names a heading (``file.md#anchor`` or ``#anchor``), the file has that heading (as GitHub
makes anchors of headings) or an explicit ``<a id=…>``. Pure file reading: no network, ~0.1 s.

The reference moved from the README into docs/ and keeps moving; a link left pointing at a
section that went elsewhere is what this catches.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE_RE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", re.DOTALL | re.MULTILINE)
_CODE_RE = re.compile(r"`[^`\n]*`")
_LINK_RE = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING_RE = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_ANCHOR_TAG_RE = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def prose(text: str) -> str:
    """``text`` without fenced code blocks (whose ``#`` lines are not headings)."""
    return _FENCE_RE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces as -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of ``path``: its headings' (a repeated one gets -1, -2, …) and ``<a id>``s."""
    text = prose(path.read_text())
    found: set[str] = set(_ANCHOR_TAG_RE.findall(text))
    seen: dict[str, int] = {}
    for heading in _HEADING_RE.findall(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    """The targets of ``path``'s Markdown links outside code."""
    text = _CODE_RE.sub("", prose(path.read_text()))
    return _LINK_RE.findall(text)


def broken(path: Path) -> list[str]:
    """The relative links of ``path`` whose file or anchor does not exist, each with why."""
    out = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        shown = os.path.relpath(dest, path.parent)
        if not dest.exists():
            out.append(f"{target}: no file {shown}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{target}: no heading #{anchor} in {shown}")
    return out


def test_the_docs_exist() -> None:
    names = {p.name for p in DOCS}
    assert {"README.md", "configuration.md", "operations.md", "failover.md"} <= names
    assert len(links(ROOT / "README.md")) > 20, "the link pattern misses the README's links"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(path: Path) -> None:
    assert broken(path) == []


def test_the_checker_sees_a_broken_link_and_anchor(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing heading, a heading in code, and the
    anchors GitHub makes of headings with code, punctuation and repeats."""
    (tmp_path / "other.md").write_text("# Other\n\n## Status page: `/ui`\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```bash\n# not a heading\n```\n"
        "[a](other.md#status-page-ui) [b](other.md#twice-1) [c](#page) "
        "[d](missing.md) [e](other.md#nowhere) [f](#not-a-heading) `[g](ignored.md)` "
        "[h](https://example.com/x.md)\n"
    )
    assert broken(page) == [
        "missing.md: no file missing.md",
        "other.md#nowhere: no heading #nowhere in other.md",
        "#not-a-heading: no heading #not-a-heading in page.md",
    ]
