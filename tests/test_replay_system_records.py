"""Lost-and-found files hold walship's own records too (a consumer's tracking, a term's first
record: version 0), because divergence repair cuts whole WAL records: replay must read them."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tests.cluster import Cluster, query_all, wal_records
from tests.conftest import make_event
from walship.cli.main import app
from walship.events import TrackingIn
from walship.replication.lostfound import event_of, lost_record, write_lost_found
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

runner = CliRunner()


def test_replay_reads_a_file_with_a_tracking_record_and_skips_it(tmp_path: Path) -> None:
    # a deposed leader's tail as repair writes it: two events and the tracking of their batch
    cut_dir = tmp_path / "cut"
    with Store.open(StoreConfig(cut_dir, fsync=FsyncPolicy.parse("never"))) as store:
        store.append_batch(
            [make_event("acct-1"), make_event("acct-2")],
            tracking=TrackingIn(consumer="proj", position=7),
        )
    records = [lost_record(event_of(r), "degraded", "wal") for r in wal_records(cut_dir)]
    assert [r.lsn for r in records] == [1, 2, 3]
    written = write_lost_found(tmp_path / "old-leader", records)
    assert written is not None
    lost_file, _ = written

    with Cluster(tmp_path / "cluster") as cluster:
        node = cluster.start_leader()
        result = runner.invoke(
            app, ["lost-found", "replay", str(lost_file), "--to", node.url, "--json"]
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["counts"]["stored"] == 2 and report["counts"]["skipped"] == 1, report
        held = query_all(node)
        assert sorted(e["entity_id"] for e in held) == ["acct-1", "acct-2"]
