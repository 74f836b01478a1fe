"""``walship lost-found replay FILE --to URL``: the records divergence repair cut from a deposed
leader go back to the new leader with their original ids and versions -- each exactly once,
however often the file is replayed -- and a record whose entity has moved on is listed as a
conflict, never forced; a dry run writes nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.cluster import (
    event,
    http,
    last_lsn,
    post_batch,
    post_event,
    query_all,
    replication,
    replication_address,
    wait_caught_up,
    wait_until,
)
from tests.failover_cluster import FailoverCluster, promote
from walship.cli.main import app
from walship.replication.config import parse_address
from walship.replication.lostfound import find_files
from walship.testing.proxy import FaultProxy

runner = CliRunner()
FAST_ACKS = ["--ack-timeout-ms", "300", "--max-lag-ms", "1000"]
ENTITIES = 4


def replay(*args: str) -> tuple[int, dict[str, Any]]:
    result = runner.invoke(app, ["lost-found", "replay", *args, "--json"])
    assert result.exit_code in (0, 1), result.output
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return result.exit_code, report


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_replay_after_a_forced_divergence_puts_every_cut_record_back_exactly_once(
    tmp_path: Path,
) -> None:
    """The leader, cut off from its follower, answers 12 writes ``degraded`` (over 4
    entities) and is killed; the follower is promoted and writes once more to one of those
    entities; the old leader rejoins and cuts its 12 records into lost-and-found. Replaying
    the file stores the 9 whose entities did not move on, at their old versions, lists the
    3 of the entity that did, and a second replay stores nothing."""
    with FailoverCluster(tmp_path / "cluster") as cluster:
        leader = cluster.start_leader(args=["--ack-mode", "semi-sync", *FAST_ACKS])
        address = replication_address(leader)
        with FaultProxy(parse_address(address)) as link:
            f1 = cluster.start_follower("f1", f"127.0.0.1:{link.port}")
            post_batch(http(), leader.url, [event(i, ENTITIES) for i in range(20)])
            wait_caught_up(leader, f1)
            link.set_refuse(True)
            wait_until(lambda: replication(leader)["in_sync_count"] == 0, 15, "f1 to leave")
            tail = post_batch(http(), leader.url, [event(i, ENTITIES) for i in range(100, 112)])[
                "receipts"
            ]
            assert {r["durability"] for r in tail} == {"degraded"}
            leader.kill()
        wait_until(lambda: not replication(f1)["connected"], 15, "f1 to notice")
        answer = promote(f1, force=True)
        new_address = answer["replication_address"]
        # the new leader moves one of the tail's entities on: acct-001 gets another event
        moved = post_event(f1, {**event(1, ENTITIES), "entity_id": "acct-001"}).json()
        assert moved["version"] == 6  # 5 of the 20 shared events, then this one

        old = cluster.start_follower("leader", new_address)
        wait_until(lambda: replication(old)["repairs"] == 1, 30, "the old leader's repair")
        (lost_file,) = find_files(cluster.data_dir("leader"))
        end = last_lsn(f1)

        # a dry run says what would happen and writes nothing
        code, dry = replay(str(lost_file), "--to", f1.url, "--dry-run")
        assert code == 1  # conflicts listed
        assert dry["counts"]["would_store"] == 9 and dry["counts"]["version_conflict"] == 3
        assert last_lsn(f1) == end

        # to a follower's URL: the client finds the leader itself
        code, first = replay(str(lost_file), "--to", old.url)
        assert code == 1
        assert first["counts"]["stored"] == 9 and first["counts"]["version_conflict"] == 3
        conflicts = [r for r in first["records"] if r["outcome"] == "version_conflict"]
        assert {r["entity_id"] for r in conflicts} == {"acct-001"}
        # the first is refused by the leader (its entity is at version 6 now); the later
        # ones follow it, so they are held back rather than stacked on the new event
        assert conflicts[0]["current_version"] == 6
        assert {r["after_conflict_lsn"] for r in conflicts[1:]} == {conflicts[0]["lost_lsn"]}

        stored = {r["event_id"]: r for r in tail}
        held = query_all(f1)
        times = Counter(e["id"] for e in held)
        for r in first["records"]:
            if r["outcome"] == "stored":
                assert times[r["id"]] == 1, r
                original = stored[r["id"]]
                (ev,) = (e for e in held if e["id"] == r["id"])
                assert ev["version"] == original["version"], (ev, original)
            else:
                assert times[r["id"]] == 0, r
        assert sum(times.values()) == len(held)  # no id twice anywhere

        # a second replay stores nothing
        end = last_lsn(f1)
        code, second = replay(str(lost_file), "--to", f1.url)
        assert code == 1
        assert second["counts"]["stored"] == 0
        assert second["counts"]["already_stored"] == 9
        assert second["counts"]["version_conflict"] == 3
        assert last_lsn(f1) == end
        wait_caught_up(f1, old)

        # the human report lists the conflicts by id, whole
        text = runner.invoke(app, ["lost-found", "replay", str(lost_file), "--to", f1.url])
        assert text.exit_code == 1
        assert "0 stored, 9 already stored, 3 version conflicts" in text.stdout
        for r in conflicts:
            assert r["id"] in text.stdout
        # and the progress bar, on stderr, went through every record
        bars = [line for line in text.output.splitlines() if line.startswith("replay ")]
        assert len(bars) == 1 and "12/12" in bars[0] and "100%" in bars[0], text.output


def test_replay_refuses_bad_input_in_one_line_before_sending_anything(tmp_path: Path) -> None:
    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["lost-found", "replay", *args])
        return result.exit_code, result.output

    # nothing listens there: nothing may be sent before the file is checked
    nowhere = "http://127.0.0.1:9"
    code, out = run(str(tmp_path / "missing.jsonl"), "--to", nowhere)
    assert code == 2 and "no such file" in out and len(out.strip().splitlines()) == 1
    code, out = run(str(tmp_path), "--to", nowhere)
    assert code == 2 and "is a directory" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"lsn": 1, "term": 1, "acknowledged": "degraded", "source": "wal"\n')
    code, out = run(str(bad), "--to", nowhere)
    assert code == 2 and "line 1" in out and len(out.strip().splitlines()) == 1
    no_id = tmp_path / "no-id.jsonl"
    record = {"lsn": 7, "term": 1, "acknowledged": "degraded", "source": "wal"}
    no_id.write_text(json.dumps({**record, "event": {"entity_id": "e", "version": 1}}) + "\n")
    code, out = run(str(no_id), "--to", nowhere)
    assert code == 2 and "lsn 7" in out and "id" in out
    # a good file, and nobody there: one line saying so
    good = tmp_path / "good.jsonl"
    ev = {
        "id": "0b9a8f0e-5c43-4a53-9d1e-6f1f1c0d2e3a",
        "tenant_id": "default",
        "entity_id": "e",
        "event_type": "t.x",
        "version": 1,
        "payload": {},
        "metadata": None,
        "timestamp": "2026-12-01T00:00:00Z",
    }
    good.write_text(json.dumps({**record, "event": ev}) + "\n")
    code, out = run(str(good), "--to", nowhere)
    assert code == 2 and "cannot reach http://127.0.0.1:9" in out
    assert len(out.strip().splitlines()) == 1, out
