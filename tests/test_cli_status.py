"""`walship status` against a real leader and follower, and `walship demo` end to end.

The pair is two `walship serve` children on 127.0.0.1 (every port chosen at run time), shared
by the status tests and stopped whatever happens. The rendering of states a live pair does not
reach on its own (a snapshot transfer halfway, a follower its leader has no session for) is
tested on health documents shaped like the real ones.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from walship.cli.main import app
from walship.cli.status import render_status
from walship.errors import InvalidInput
from walship.node_reports import NodeReport
from walship.testing.process import NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

runner = CliRunner()
DEAD_URL = "http://127.0.0.1:1"  # nothing listens on port 1, and nothing unprivileged can


@dataclass
class Pair:
    leader: NodeProcess
    follower: NodeProcess


def _leader_sees_in_sync(leader: NodeProcess, follower_id: str, lsn: int) -> bool:
    health = httpx.get(f"{leader.url}/health", timeout=5).json()
    return any(
        f["node_id"] == follower_id and f["in_sync"] and f["durable_lsn"] >= lsn
        for f in health["replication"]["followers"]
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("status")
    secret = root / "replication.secret"
    secret.write_text("status-test-secret\n")
    secret.chmod(0o600)
    common = ["--replication-secret-file", str(secret), "--cluster-id", "status-test"]
    with ExitStack() as stack:
        leader = stack.enter_context(
            NodeProcess(
                root / "lead-1",
                node_id="lead-1",
                fsync="never",
                extra_args=[*common, "--replication-port", "0", "--ack-mode", "semi-sync"],
            )
        )
        leader.start()
        assert leader.replication_address is not None
        follower = stack.enter_context(
            NodeProcess(
                root / "follow-1",
                node_id="follow-1",
                fsync="never",
                extra_args=[*common, "--role", "follower", "--leader", leader.replication_address],
            )
        )
        follower.start()
        with httpx.Client(base_url=leader.url, timeout=10) as client:
            events = [
                {"entity_id": f"e-{i % 3}", "event_type": "t", "payload": {}} for i in range(5)
            ]
            answer = client.post("/api/v1/events/batch", json={"events": events})
            assert answer.status_code == 200, answer.text
            last = answer.json()["receipts"][-1]["lsn"]
        deadline = time.monotonic() + 20
        while not _leader_sees_in_sync(leader, "follow-1", last):
            assert time.monotonic() < deadline, "the follower never caught up"
            time.sleep(0.05)
        yield Pair(leader, follower)


def test_process_reads_the_replication_address_from_the_start_line(pair: Pair) -> None:
    assert re.fullmatch(r"127\.0\.0\.1:\d+", pair.leader.replication_address or "")
    assert pair.follower.replication_address is None  # a follower prints leader=, not this
    assert f"leader={pair.leader.replication_address}" in pair.follower.start_line


def test_status_shows_leader_and_follower_with_the_leaders_view(pair: Pair) -> None:
    result = runner.invoke(app, ["status", pair.leader.url, pair.follower.url])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "2/2 nodes answered" in out
    for expected in (
        "lead-1",
        "follow-1",
        "leader",
        "follower",
        "healthy",
        "semi-sync",
        f"listening on {pair.leader.replication_address}",
        f"from {pair.leader.replication_address}",
        "1/1 (min 1)",  # the leader's in-sync set
        "followers of lead-1 (leader's view)",
        "streaming",
        "0 rec, 0 ms",  # the leader's view of the caught-up follower
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"
    # a row per node, the follower's in-sync cell filled from the leader's view
    follower_line = next(line for line in out.splitlines() if "follow-1" in line)
    assert "yes" in follower_line
    assert "…" not in out  # nothing cut short: a pipe gets the table at its natural width


def test_status_shows_an_unreachable_node_as_a_row(pair: Pair) -> None:
    result = runner.invoke(app, ["status", pair.leader.url, DEAD_URL, "127.0.0.1:1"])
    assert result.exit_code == 0, result.output
    assert "1/3 nodes answered" in result.output
    assert result.output.count("unreachable") == 2
    assert "127.0.0.1:1" in result.output
    assert "Traceback" not in result.output


def test_status_exits_1_when_no_node_answers() -> None:
    result = runner.invoke(app, ["status", DEAD_URL])
    assert result.exit_code == 1, result.output
    assert "unreachable" in result.output
    assert "Traceback" not in result.output


def test_status_json_prints_the_health_documents(pair: Pair) -> None:
    result = runner.invoke(app, ["status", "--json", pair.leader.url, pair.follower.url, DEAD_URL])
    assert result.exit_code == 0, result.output
    docs = json.loads(result.output)
    assert [d["url"] for d in docs] == [pair.leader.url, pair.follower.url, DEAD_URL]
    leader, follower, dead = (d.get("health") for d in docs)
    assert leader is not None and leader["role"] == "leader"
    assert leader["replication"]["mode"] == "semi-sync"
    assert [f["node_id"] for f in leader["replication"]["followers"]] == ["follow-1"]
    assert follower is not None and follower["role"] == "follower"
    assert follower["replication"]["connected"] is True
    assert dead is None and docs[2]["error"].startswith("unreachable")


def test_status_watch_stops_after_count_refreshes(pair: Pair) -> None:
    result = runner.invoke(
        app, ["status", "--count", "3", "--interval", "0.05", pair.leader.url, pair.follower.url]
    )
    assert result.exit_code == 0, result.output
    # not a terminal: each refresh is printed below the previous one
    assert result.output.count("2/2 nodes answered") == 3
    assert "every 0.05 s" in result.output


def test_status_watch_json_prints_one_line_per_refresh(pair: Pair) -> None:
    result = runner.invoke(
        app, ["status", "--json", "--count", "2", "--interval", "0.05", pair.leader.url]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)[0]["health"]["node_id"] == "lead-1" for line in lines)


# ------------------------------------------------------------------ rendering, no processes

LEADER_URL, FOLLOWER_URL = "http://127.0.0.1:3900", "http://127.0.0.1:3901"


def _leader_health(**session_extra: Any) -> dict[str, Any]:
    session = {
        "node_id": "walship-2",
        "address": "127.0.0.1:50000",
        "state": "snapshot",
        "sent_lsn": 0,
        "durable_lsn": 0,
        "applied_lsn": 0,
        "lag_records": 120_000,
        "lag_ms": 5300.0,
        "in_sync": False,
        **session_extra,
    }
    return {
        "status": "healthy",
        "role": "leader",
        "node_id": "walship-1",
        "term": 2,
        "last_lsn": 120_000,
        "replication": {
            "mode": "quorum:1",
            "listening": "127.0.0.1:3910",
            "followers": [session],
            "in_sync_count": 0,
            "min_in_sync": 1,
            "degraded": {"writes": 4, "ranges": 2},
            "retention_slots": {"walship-2": 0, "walship-9": 77},
        },
    }


def _follower_health(**repl_extra: Any) -> dict[str, Any]:
    return {
        "status": "healthy",
        "role": "follower",
        "node_id": "walship-2",
        "term": 2,
        "last_lsn": 0,
        "replication": {
            "leader": "127.0.0.1:3910",
            "connected": True,
            "state": "snapshot",
            "durable_lsn": 0,
            "applied_lsn": 0,
            "leader_lsn": 120_000,
            "lag_records": 120_000,
            "lag_ms": None,
            "reconnects": 0,
            "snapshots_received": 0,
            "frames_rejected": 0,
            "last_error": None,
            "snapshot": None,
            **repl_extra,
        },
    }


def _text(reports: list[NodeReport]) -> str:
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(render_status(reports))
    return console.export_text()


def test_snapshot_progress_shows_bytes_done_of_total() -> None:
    progress = {"id": "snap-1", "bytes_done": 36 * 1024 * 1024, "bytes_total": 100 * 1024 * 1024}
    text = _text(
        [
            NodeReport(LEADER_URL, _leader_health(snapshot=progress), http_status=200),
            NodeReport(FOLLOWER_URL, _follower_health(snapshot=progress), http_status=200),
        ]
    )
    assert "snapshot" in text.splitlines()[2]  # the column is there while a transfer runs
    assert text.count("36%") == 2  # the follower's row and the leader's view of it
    assert "36.0 MiB/100.0 MiB" in text
    assert "sending 1" in text
    assert "4 writes" in text and "2 ranges" in text  # the degradation ledger
    assert "0/1 (min 1)" in text
    assert "walship-9" in text and "77 (slot)" in text  # known, not connected, WAL kept


def test_snapshot_being_installed_shows_installing_not_a_full_bar() -> None:
    """Every byte sent, the follower installing: the leader's row says so, not "sending"."""
    total = 100 * 1024 * 1024
    progress = {"id": "snap-1", "state": "installing", "bytes_done": total, "bytes_total": total}
    text = _text([NodeReport(LEADER_URL, _leader_health(snapshot=progress), http_status=200)])
    assert "installing 1" in text
    assert "sending" not in text
    assert "installing 100.0 MiB" in text
    assert "100%" not in text


def test_a_snapshot_from_a_serving_follower_names_its_source() -> None:
    """Cascading: the follower fetches from another follower, and its row says which."""
    progress = {
        "id": "snap-1",
        "state": "receiving",
        "source": "127.0.0.2:3911",
        "bytes_done": 10 * 1024 * 1024,
        "bytes_total": 40 * 1024 * 1024,
    }
    text = _text([NodeReport(FOLLOWER_URL, _follower_health(snapshot=progress), http_status=200)])
    assert "25%" in text
    assert "from 127.0.0.2:3911" in text


def test_no_snapshot_column_without_a_transfer() -> None:
    text = _text([NodeReport(FOLLOWER_URL, _follower_health(state="streaming"), http_status=200)])
    assert "snapshot" not in text.splitlines()[2]
    assert "%" not in text


def test_follower_its_leader_has_no_session_for_is_not_connected() -> None:
    leader = _leader_health()
    leader["replication"]["followers"] = []
    follower = _follower_health(
        connected=False, state="connecting", last_error="connection refused"
    )
    text = _text(
        [
            NodeReport(LEADER_URL, leader, http_status=200),
            NodeReport(FOLLOWER_URL, follower, http_status=200),
        ]
    )
    row = next(line for line in text.splitlines() if "walship-2" in line)
    assert "not connected" in row
    assert "no" in row.split()
    assert "connection refused" in text


# ------------------------------------------------------------------ fitting the terminal


def _render(reports: list[NodeReport], width: int, layout: str = "auto") -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(render_status(reports, width=width, layout=layout))  # type: ignore[arg-type]
    return console.export_text()


def _troubled_cluster() -> list[NodeReport]:
    """A leader sending a snapshot, its follower installing it, and a node that is down."""
    progress = {"id": "snap-1", "bytes_done": 36 * 1024 * 1024, "bytes_total": 100 * 1024 * 1024}
    return [
        NodeReport(LEADER_URL, _leader_health(snapshot=progress), http_status=200),
        NodeReport(FOLLOWER_URL, _follower_health(snapshot=progress), http_status=200),
        NodeReport(DEAD_URL, error="unreachable: [Errno 111] Connection refused"),
    ]


# every figure, each as one piece: folded letter by letter, none would be found
WHOLE_FIGURES = (
    "walship-1",
    "127.0.0.1:3900",
    "healthy",
    "0/1 (min 1)",
    "quorum:1",
    "listening on 127.0.0.1:3910",
    "4 writes",
    "2 ranges",
    "sending 1",
    "120000 rec",
    "5.3 s",
    "from 127.0.0.1:3910",
    "36.0 MiB/100.0 MiB",
    "unreachable: [Errno 111] Connection refused",
    "followers of walship-1 (leader's view)",
    "127.0.0.1:50000",
    "77 (slot)",
    "walship-9",
)


def test_status_at_80_columns_wraps_by_rows_not_by_letters() -> None:
    """At 80 columns the tables would fold every cell letter by letter ("st/at/us"); the
    cards put one figure per row instead, and every figure stays whole on its line."""
    text = _render(_troubled_cluster(), 80)
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    for figure in WHOLE_FIGURES:
        assert any(figure in line for line in lines), f"{figure!r} not whole in:\n{text}"
    # a row per figure under each node's headline
    head = next(line for line in lines if line.startswith("walship-2"))
    assert head.split()[:3] == ["walship-2", "follower", "healthy"]
    assert any(line.split()[:3] == ["lag", "(leader)", "120000"] for line in lines)
    assert "…" not in text


def test_status_uses_the_tables_when_the_terminal_is_wide_enough() -> None:
    text = _render(_troubled_cluster(), 250)
    header = next(line for line in text.splitlines() if "last lsn" in line)
    for column in ("node", "role", "status", "term", "lag (own)", "lag (leader)", "in sync"):
        assert column in header, header
    assert not any(line.startswith("   position") for line in text.splitlines())


def test_status_layout_can_be_forced() -> None:
    cards = _render(_troubled_cluster(), 250, "narrow")
    assert "   position" in cards and "last lsn" not in cards.splitlines()[1]
    with pytest.raises(InvalidInput, match="layout must be one of"):
        _render(_troubled_cluster(), 80, "tall")


def test_status_in_a_pipe_fits_COLUMNS_and_is_wide_without_it(pair: Pair) -> None:
    urls = [pair.leader.url, pair.follower.url]
    narrow = runner.invoke(app, ["status", *urls], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.output
    assert max(len(line) for line in narrow.output.splitlines()) <= 80, narrow.output
    for figure in ("lead-1", "follow-1", "1/1 (min 1)", "0 rec, 0 ms", "semi-sync"):
        assert figure in narrow.output, f"{figure!r} not in:\n{narrow.output}"
    assert f"listening on {pair.leader.replication_address}" in narrow.output
    wide = runner.invoke(app, ["status", "--layout", "wide", *urls], env={"COLUMNS": "80"})
    assert wide.exit_code == 0, wide.output
    assert max(len(line) for line in wide.output.splitlines()) > 80  # the tables, whole
    assert "lag (leader)" in next(line for line in wide.output.splitlines() if "term" in line)


def test_status_refuses_an_unknown_layout_in_one_line() -> None:
    result = runner.invoke(app, ["status", "--layout", "tall", DEAD_URL])
    assert result.exit_code == 2
    assert "--layout must be one of auto, wide, narrow, not 'tall'" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ the demo


def test_demo_runs_a_leader_and_two_followers_and_stops_them(tmp_path: Path) -> None:
    """The README's main job: exit 0, every step shown, nothing left behind."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "200"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "walship", "demo", "--events", "80"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env=env,
    )
    elapsed = time.monotonic() - t0
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    for node in ("walship-1", "walship-2", "walship-3"):
        assert f"walship {node} serving http://127.0.0.1:" in out
    assert "role=leader" in out and out.count("role=follower") == 2
    assert "mode 0600" in out
    assert "API keys and TLS are off in this demo" in out  # and the nodes are on loopback
    assert "receipts: 80 replicated" in out
    assert "walship-2, walship-3" in out  # the write that asked for sync
    assert "(read-your-writes)" in out
    assert "answers 409 read_only, leader=127.0.0.1:" in out
    assert "(write to http://127.0.0.1:" in out  # the leader's HTTP URL, from its welcome
    assert "from the leader's WAL" in out
    assert "followers of walship-1 (leader's view)" in out
    assert "exit codes: walship-2 0, walship-3 0, walship-1 0" in out
    assert list(tmp_path.iterdir()) == []  # the temp dir is gone without --keep
    assert elapsed < 60
