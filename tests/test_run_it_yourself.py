"""The README's "Run it yourself" path, command by command, as a reader runs it.

The commands are read from the README (``tests/readme_blocks.py``) and run in a temp dir with
this checkout's ``walship`` on PATH, the README's ports swapped for ports chosen at run time.
Each ``walship serve`` runs in the background as if in its own terminal; Ctrl-C is SIGINT.
Checked: a single node serves and stops; the three-node cluster replicates a write, survives
`walship failover` after its leader is stopped (the admin token is on every node), and the
old leader, restarted with its original command, rejoins as a follower with exactly one
leader left. The install commands
themselves (pipx) are run by ``tests/test_deploy.py``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import wait_until
from tests.readme_blocks import BIN, Reader

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[Reader]:
    if not (BIN / "walship").exists():
        pytest.skip(f"no walship command beside {sys.executable}")
    cwd = tmp_path / "reader"
    cwd.mkdir()
    r = Reader(cwd)
    try:
        yield r
    finally:
        r.stop_all()


def receipt(output: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(output)
    return body


def test_a_single_node_serves_the_readme_commands(reader: Reader) -> None:
    (version,) = reader.block("install")
    assert version.startswith("walship ")
    write, status = reader.block("single")
    assert receipt(write)["lsn"] == 1
    assert "walship-1" in status and "leader" in status
    assert reader.terminals["walship-1"].ctrl_c() == 0


def test_the_three_node_cluster_fails_over_and_takes_its_old_leader_back(reader: Reader) -> None:
    *_, status, write = reader.block("cluster")  # after making the secret and the token
    for name in ("walship-1", "walship-2", "walship-3"):
        assert name in status
    first = receipt(write)
    assert first["durability"] == "replicated", first
    assert first["acked_by"], first

    # Ctrl-C in walship-1's terminal, then the failover block
    assert reader.terminals["walship-1"].ctrl_c() == 0
    failover, write = reader.block("failover")
    assert "promoting walship-2" in failover, failover
    second = receipt(write)
    assert second["term"] == 2 and second["durability"] == "replicated", second
    assert second["acked_by"] == ["walship-3"], second  # semi-sync kept by the new leader

    (status,) = reader.block("rejoin")
    nodes = reader.running()
    assert len(nodes) == 3
    # its original command: it learns the newer term from its peers and follows by itself
    want = {"walship-1": "follower", "walship-2": "leader", "walship-3": "follower"}
    wait_until(
        lambda: {t.node_id: t.health()["role"] for t in nodes} == want,
        30,
        "the old leader to follow the new one",
    )
    assert "walship-1" in status
    wait_until(
        lambda: len({t.health()["last_lsn"] for t in nodes}) == 1,
        30,
        "every node at the same lsn",
    )
    for terminal in nodes:
        events = httpx.get(f"{terminal.url}/api/v1/events/query", timeout=5).json()["events"]
        assert [e["event_type"] for e in events] == ["order.placed", "order.paid"]
    deadline = time.monotonic() + 30
    for terminal in nodes:
        assert terminal.ctrl_c() == 0
        assert time.monotonic() < deadline
