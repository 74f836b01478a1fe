"""``walship lost-found list`` shows every file's whole name, whatever the width: the name is
what an operator copies into the next command (``export``, ``grep``), so it is never cut to
``…`` or folded, at 80 columns as at 200."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from walship.cli.main import app
from walship.replication.lostfound import LostRecord, write_lost_found

runner = CliRunner()


def lost_files(data_dir: Path) -> list[str]:
    """Two lost-and-found files as divergence repair writes them: names of 48 characters."""
    names = []
    for first, count, term in ((101, 3, 1), (4000, 2, 2)):
        records = [
            LostRecord(
                lsn,
                term,
                "degraded" if lsn % 2 else "local_or_unanswered",
                "wal",
                msgspec.Raw(json.dumps({"id": f"ev-{lsn}", "entity_id": "e"}).encode()),
            )
            for lsn in range(first, first + count)
        ]
        written = write_lost_found(data_dir, records)
        assert written is not None
        names.append(written[0].name)
    return names


def test_lost_found_list_at_80_columns_shows_whole_file_names(tmp_path: Path) -> None:
    names = lost_files(tmp_path)
    result = runner.invoke(app, ["lost-found", "list", str(tmp_path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in names:
        assert name in lines, f"{name} not on a line of its own in:\n{result.output}"
    assert "…" not in result.output
    assert max(len(line) for line in lines[1:]) <= 80, result.output  # the heading is a path
    assert "records       3, lsns 101..103, terms 1" in result.output
    assert "acknowledged  2 degraded, 1 local_or_unanswered" in result.output
    assert "5 records in 2 files" in result.output


def test_lost_found_list_is_a_table_when_it_fits(tmp_path: Path) -> None:
    names = lost_files(tmp_path)
    result = runner.invoke(app, ["lost-found", "list", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "acknowledged" in line)
    cells = [cell.strip() for cell in header.strip("┃ ").split("┃")]
    assert cells == ["file", "records", "lsns", "terms", "acknowledged"]
    for name in names:
        row = next(line for line in result.output.splitlines() if name in line)
        assert "degraded" in row  # the name and its figures on one row


@pytest.mark.parametrize("columns", ["", "30"])
def test_lost_found_list_never_cuts_a_name(tmp_path: Path, columns: str) -> None:
    """A pipe has no width (rich alone would assume 80 and cut the names to ``…``); a
    terminal narrower than a name gets the name whole on its line all the same."""
    names = lost_files(tmp_path)
    result = runner.invoke(app, ["lost-found", "list", str(tmp_path)], env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    for name in names:
        assert any(name in line for line in result.output.splitlines()), result.output
    assert "…" not in result.output
