"""Lost-and-found files hold walship's own records too (a consumer's tracking, a term's first
record: version 0), because divergence repair cuts whole WAL records. Replay puts a tracking
back with the events of its batch, in one atomic append, under the leader's rule for trackings:
a position not above the consumer's stored one refuses the batch whole (listed, nothing of it
stored); a second replay of the same batch stores nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from tests.cluster import Cluster, http, query_all, wal_records
from tests.conftest import make_event
from walship.cli.main import app
from walship.events import TrackingIn
from walship.replication.lostfound import LostRecord, event_of, lost_record, write_lost_found
from walship.store import Store, StoreConfig
from walship.testing.process import NodeProcess
from walship.wal import FsyncPolicy

runner = CliRunner()


def lost_file(tmp_path: Path, *, with_batch_left: bool = True) -> Path:
    """A deposed leader's tail as repair writes it: an event of an append of its own, then a
    batch of two events with the tracking ``proj`` at 7 (lsns 1, then 2..4)."""
    cut_dir = tmp_path / "cut"
    with Store.open(StoreConfig(cut_dir, fsync=FsyncPolicy.parse("never"))) as store:
        store.append_batch([make_event("acct-0")])
        time.sleep(0.002)  # the next append takes another timestamp (old files group by it)
        store.append_batch(
            [make_event("acct-1"), make_event("acct-2")],
            tracking=TrackingIn(consumer="proj", position=7),
        )
    records = [
        lost_record(event_of(r), "degraded", "wal", r.batch_left if with_batch_left else None)
        for r in wal_records(cut_dir)
    ]
    assert [r.lsn for r in records] == [1, 2, 3, 4]
    written = write_lost_found(tmp_path / "old-leader", records)
    assert written is not None
    return written[0]


def replay(path: Path, node: NodeProcess, *more: str) -> tuple[int, dict[str, Any]]:
    args = ["lost-found", "replay", str(path), "--to", node.url, "--json", *more]
    result = runner.invoke(app, args)
    assert result.exit_code in (0, 1), result.output
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return result.exit_code, report


def consumer_position(node: NodeProcess, name: str) -> int | None:
    r = http().get(f"{node.url}/api/v1/consumers/{name}")
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    position: int = r.json()["position"]
    return position


def outcomes(report: dict[str, Any]) -> dict[int, str]:
    return {rec["lost_lsn"]: rec["outcome"] for rec in report["records"]}


@pytest.mark.parametrize("with_batch_left", [True, False], ids=["batch_left", "older-file"])
def test_replay_puts_a_tracking_back_with_its_batch_and_twice_stores_nothing(
    tmp_path: Path, with_batch_left: bool
) -> None:
    """The tracking goes back in the same append as the two events of its batch (a file
    written before ``batch_left`` finds the batch by term and timestamp); a second replay is
    answered as a duplicate, the consumer's position unchanged."""
    path = lost_file(tmp_path, with_batch_left=with_batch_left)
    with Cluster(tmp_path / "cluster") as cluster:
        node = cluster.start_leader()
        code, dry = replay(path, node, "--dry-run")
        assert code == 0 and dry["counts"]["would_store"] == 4, dry
        assert consumer_position(node, "proj") is None  # the dry run wrote nothing

        code, report = replay(path, node)
        assert code == 0, report
        assert outcomes(report) == {1: "stored", 2: "stored", 3: "stored", 4: "stored"}
        assert consumer_position(node, "proj") == 7
        held = query_all(node)
        assert sorted(e["entity_id"] for e in held) == ["acct-0", "acct-1", "acct-2"]
        # atomic with its events: the tracking record right after them, in one append
        lsns = {rec["lost_lsn"]: rec["lsn"] for rec in report["records"]}
        assert lsns[3] == lsns[2] + 1 and lsns[4] == lsns[3] + 1, lsns

        code, again = replay(path, node)
        assert code == 0, again
        assert set(outcomes(again).values()) == {"already_stored"}, again
        assert consumer_position(node, "proj") == 7
        assert len(query_all(node)) == 3


def test_replay_refuses_a_tracked_batch_whole_when_the_consumer_moved_on(
    tmp_path: Path,
) -> None:
    """The new leader's consumer ``proj`` is at 9 already: the batch tracked at 7 is refused
    whole -- its events and its tracking listed as ``tracking_conflict``, none stored, the
    consumer left at 9 -- while the record of another append goes back; exit 1."""
    path = lost_file(tmp_path)
    with Cluster(tmp_path / "cluster") as cluster:
        node = cluster.start_leader()
        body = {"events": [event("acct-9")], "tracking": {"consumer": "proj", "position": 9}}
        r = http().post(f"{node.url}/api/v1/events/batch", json=body)
        assert r.status_code == 200, r.text

        code, dry = replay(path, node, "--dry-run")
        assert code == 1, dry
        assert outcomes(dry) == {
            1: "would_store",
            2: "tracking_conflict",
            3: "tracking_conflict",
            4: "tracking_conflict",
        }

        code, report = replay(path, node)
        assert code == 1, report
        assert outcomes(report) == {
            1: "stored",
            2: "tracking_conflict",
            3: "tracking_conflict",
            4: "tracking_conflict",
        }
        refused = [rec for rec in report["records"] if rec["lost_lsn"] > 1]
        assert all(rec["stored_position"] == 9 for rec in refused), refused
        assert all(rec["batch_lsns"] == [2, 4] for rec in refused), refused
        assert consumer_position(node, "proj") == 9
        assert sorted(e["entity_id"] for e in query_all(node)) == ["acct-0", "acct-9"]

        # the text report names the consumer and says why
        result = runner.invoke(app, ["lost-found", "replay", str(path), "--to", node.url])
        assert result.exit_code == 1, result.output
        assert "consumer at position 9 now" in result.output, result.output


def test_replay_refuses_a_file_whose_tracking_record_is_not_one(tmp_path: Path) -> None:
    """A tracking record without a position is bad input: one line, exit 2, nothing sent."""
    path = lost_file(tmp_path)
    lines = path.read_bytes().splitlines()
    rec = msgspec.json.decode(lines[-1], type=LostRecord)
    event = msgspec.json.decode(rec.event)
    event["payload"] = {"offset": 7}
    rec.event = msgspec.Raw(msgspec.json.encode(event))
    path.write_bytes(b"\n".join([*lines[:-1], msgspec.json.encode(rec)]) + b"\n")
    result = runner.invoke(app, ["lost-found", "replay", str(path), "--to", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert "not a tracking record" in result.output, result.output


def event(entity: str) -> dict[str, Any]:
    return {"entity_id": entity, "event_type": "acct.credited", "payload": {"amount": 1}}
