"""A ``Client`` given every node's URL keeps writing and reading through a real failover:
three ``walship serve`` processes, kill -9 of the leader, ``walship failover``.

Writers each own a Client (reads from followers, read-your-writes) and an entity; every
write has its own event id. Checked afterwards on the new leader: no writer saw an error,
every write answered ``replicated`` is there, every write answered after the failover is
there, no event id is stored twice, and each writer read its own write back every time. At
least one write was in flight across the failover and was carried to the new leader.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.client_writer import ClientWriter, check_held
from tests.cluster import health, query_all, replication, replication_address, wait_until
from tests.failover_cluster import FailoverCluster
from walship.cli.main import app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

runner = CliRunner()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FailoverCluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")  # shown when a test fails
    with FailoverCluster(root) as c:
        yield c


def test_client_with_every_url_writes_and_reads_through_kill_9_and_failover(
    cluster: FailoverCluster,
) -> None:
    leader = cluster.start_leader(args=["--ack-mode", "quorum:1", "--ack-timeout-ms", "5000"])
    address = replication_address(leader)
    f1 = cluster.start_follower("f1", address)
    f2 = cluster.start_follower("f2", address)
    urls = [f1.url, leader.url, f2.url]  # the leader is not first: it must be found
    writers = [ClientWriter(urls, f"writer-{n}").start() for n in range(3)]
    wait_until(lambda: all(w.count() >= 30 for w in writers), 60, "writes before the kill")

    leader.kill()
    killed = time.monotonic()
    for f in (f1, f2):
        wait_until(lambda f=f: not replication(f)["connected"], 15, f"{f.node_id} to notice")
    nodes = ",".join(urls)
    result = runner.invoke(
        app, ["failover", "--nodes", nodes, "--admin-token-file", str(cluster.token_file)]
    )
    assert result.exit_code == 0, result.output
    new_leader = next(f for f in (f1, f2) if health(f)["role"] == "leader")
    failed_over = time.monotonic()
    wait_until(lambda: all(w.count(term=2) >= 20 for w in writers), 60, "writes after failover")
    for w in writers:
        w.join()

    stored = query_all(new_leader)
    check_held(writers, stored)
    written = [x for w in writers for x in w.written]
    # a write in flight at the kill was retried until the new leader answered it (stored
    # there anew, or answered duplicate when it had been replicated before the kill)
    # (answered by the new leader: the moment `walship failover` returns is no bound, as the
    # new leader may answer before the CLI has repointed the other follower and returned)
    carried = [
        x
        for x in written
        if x.started < killed < x.ended and (x.receipt.term >= 2 or x.receipt.duplicate)
    ]
    assert carried, "no write was in flight across the failover"
    print(
        f"{len(written)} writes, {len(carried)} carried across a failover of "
        f"{failed_over - killed:.1f} s, {sum(x.receipt.duplicate for x in written)} answered "
        "duplicate"
    )
