"""Operator commands: `walship wal verify`, `walship wal dump`, and the flag checks of `serve`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import make_event
from tests.walfiles import (
    cut_inside_last_record,
    flip_bit,
    flip_bit_in_record_body,
    record_offsets,
    segments,
    write_store,
)
from walship.cli.main import app
from walship.dirlock import holder_pid
from walship.store import Store, StoreConfig
from walship.wal.record import HEADER_BYTES

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    write_store(d)
    return d


def test_verify_clean_wal_exits_zero(data_dir: Path) -> None:
    files = segments(data_dir)
    assert len(files) >= 3
    result = runner.invoke(app, ["wal", "verify", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "WAL OK: 60 records, lsn 1..60" in result.output
    for path in files:
        assert path.name in result.output


def test_verify_accepts_the_wal_subdirectory(data_dir: Path) -> None:
    result = runner.invoke(app, ["wal", "verify", str(data_dir / "wal")])
    assert result.exit_code == 0, result.output
    assert "WAL OK" in result.output


def test_verify_of_a_data_dir_in_use_says_so_and_leaves_the_lock_alone(data_dir: Path) -> None:
    """Read-only commands take no lock: they work beside a running node and say it is there."""
    with Store.open(StoreConfig(data_dir)) as store:
        result = runner.invoke(app, ["wal", "verify", str(data_dir)])
        assert result.exit_code == 0, result.output
        assert f"{data_dir} is in use by pid {os.getpid()}" in result.output
        assert runner.invoke(app, ["wal", "dump", str(data_dir), "--limit", "1"]).exit_code == 0
        assert holder_pid(data_dir) == os.getpid()
        assert store.append(make_event()).lsn == 61
    result = runner.invoke(app, ["wal", "verify", str(data_dir)])
    assert "in use" not in result.output


def test_verify_reports_torn_tail_without_failing_or_truncating(data_dir: Path) -> None:
    last = segments(data_dir)[-1]
    offset = cut_inside_last_record(last)
    size = last.stat().st_size
    result = runner.invoke(app, ["wal", "verify", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert f"torn tail at {last} offset {offset}: would be truncated on start" in result.output
    assert "WAL OK: 59 records" in result.output
    assert last.stat().st_size == size  # verify changes nothing


def test_verify_reports_bit_flip_with_file_and_offset(data_dir: Path) -> None:
    first = segments(data_dir)[0]
    offset = flip_bit_in_record_body(first, 3)
    result = runner.invoke(app, ["wal", "verify", str(data_dir)])
    assert result.exit_code == 1, result.output
    assert f"corrupt: {first} at offset {offset}:" in result.output
    assert "CRC mismatch" in result.output


def test_verify_reports_flip_in_last_segment_followed_by_valid_records(data_dir: Path) -> None:
    """Damage with whole records after it is corruption even in the last segment."""
    last = segments(data_dir)[-1]
    offsets = record_offsets(last)
    assert len(offsets) >= 3
    flip_bit(last, offsets[0] + HEADER_BYTES)
    result = runner.invoke(app, ["wal", "verify", str(data_dir)])
    assert result.exit_code == 1, result.output
    assert f"corrupt: {last} at offset {offsets[0]}:" in result.output


def test_verify_reports_a_missing_segment(data_dir: Path) -> None:
    files = segments(data_dir)
    assert len(files) >= 3
    files[1].unlink()
    result = runner.invoke(app, ["wal", "verify", str(data_dir)])
    assert result.exit_code == 1, result.output
    assert "gap in the log" in result.output


def test_verify_of_a_directory_without_wal_fails_clearly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["wal", "verify", str(tmp_path)])
    assert result.exit_code == 1
    assert "no WAL segments" in result.output


def test_dump_from_lsn_prints_one_line_per_record(data_dir: Path) -> None:
    result = runner.invoke(app, ["wal", "dump", str(data_dir), "--from-lsn", "55"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert [int(line.split()[0]) for line in lines] == list(range(55, 61))
    fields = lines[0].split()
    assert fields[1] == "1"  # term
    assert len(fields[2]) == 16  # chain, hex
    assert fields[4] == "acct.credited"
    assert fields[5] == "acct-2"  # event 55 is i=54


def test_dump_json_with_limit(data_dir: Path) -> None:
    result = runner.invoke(app, ["wal", "dump", str(data_dir), "--from-lsn", "10", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["lsn"] for r in rows] == list(range(10, 61))
    assert {r["entity_id"] for r in rows} == {"acct-0", "acct-1", "acct-2", "acct-3"}
    assert all(r["event_type"] == "acct.credited" and r["term"] == 1 for r in rows)
    assert [r["position"] for r in rows] == list(range(10, 61))  # one tenant: lsn order
    limited = runner.invoke(app, ["wal", "dump", str(data_dir), "--json", "--limit", "3"])
    assert [json.loads(line)["lsn"] for line in limited.stdout.splitlines()] == [1, 2, 3]


def test_dump_stops_with_error_at_corruption(data_dir: Path) -> None:
    first = segments(data_dir)[0]
    offset = flip_bit_in_record_body(first, 2)
    result = runner.invoke(app, ["wal", "dump", str(data_dir), "--json"])
    assert result.exit_code == 1
    assert [json.loads(line)["lsn"] for line in result.stdout.splitlines()] == [1, 2]
    assert f"{first} at offset {offset}" in result.output


@pytest.mark.parametrize("value", ["sometimes", "interval:", "interval:0", "interval:x"])
def test_serve_rejects_bad_fsync_policy(tmp_path: Path, value: str) -> None:
    data = tmp_path / "data"
    result = runner.invoke(
        app, ["serve", "--data-dir", str(data), "--http-port", "0", "--fsync", value]
    )
    assert result.exit_code == 2
    assert "fsync policy must be always, never or interval:MS" in " ".join(result.output.split())
    assert not data.exists()  # nothing was created before the flags were checked


def test_serve_reads_flags_from_environment(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["serve", "--http-port", "0"],
        env={"WALSHIP_FSYNC": "bogus", "WALSHIP_DATA_DIR": str(tmp_path / "d")},
    )
    assert result.exit_code == 2
    assert "bogus" in result.output


def test_serve_refuses_a_data_dir_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = runner.invoke(app, ["serve", "--data-dir", str(blocker / "data"), "--http-port", "0"])
    assert result.exit_code == 1
    assert "cannot create data dir" in result.output
    assert "Traceback" not in result.output


def test_serve_refuses_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(
            app, ["serve", "--data-dir", str(tmp_path / "d"), "--http-port", str(port)]
        )
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


@pytest.mark.parametrize("command", ["serve", "promote"])
def test_an_admin_token_file_that_is_not_utf8_is_a_one_line_error(
    tmp_path: Path, command: str
) -> None:
    """It was a UnicodeDecodeError traceback from serve (and from the admin commands)."""
    token = tmp_path / "admin.token"
    token.write_bytes(b"\xff\xfe tok\n")
    if command == "serve":
        args = ["serve", "--data-dir", str(tmp_path / "data"), "--check"]
    else:
        args = ["promote", "http://127.0.0.1:9"]
    result = runner.invoke(app, [*args, "--admin-token-file", str(token)])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1, result.output
    assert f"admin token file {token}" in result.output and "UTF-8" in result.output
