"""Clean failover with real processes: a promotion that could lose writes answered
``replicated`` is refused unless asked for by name (``--unclean``).

The double fault of issue 17 (4): f2 is cut off longer than ``--max-lag-ms`` so writes are
acknowledged by f1 alone, then f1 is paused and the leader killed. f2, the only follower that
answers, does not hold what f1 acknowledged; it knows the last in-sync set it stored names
f1, so ``walship failover`` refuses it. Once f1 answers again it is promoted normally, with
every ``replicated`` write; or ``--unclean`` promotes f2 and says what is lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.cluster import health, replication, replication_address, wait_caught_up, wait_until
from tests.failover_cluster import (
    FailoverCluster,
    ReceiptWriters,
    admin_post,
    assert_receipts_held,
    events_by_id,
    pause,
    resume,
)
from walship.cli.main import app
from walship.replication.config import parse_address
from walship.testing.proxy import FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

runner = CliRunner()
FAST_ACKS = ["--ack-timeout-ms", "1000", "--max-lag-ms", "1000"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FailoverCluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")  # shown when a test fails
    with FailoverCluster(root) as c:
        yield c
    problems = c.log_problems()
    if problems:
        pytest.fail("unhandled errors in the node logs:\n" + "\n".join(problems), pytrace=False)


def in_sync_members(node: object) -> list[str]:
    record = replication(node)["in_sync_set"]["record"]  # type: ignore[arg-type]
    return [] if record is None else list(record["members"])


@pytest.mark.parametrize(("mode", "ending"), [("sync", "member_returns"), ("semi-sync", "unclean")])
def test_failover_refuses_a_candidate_that_lacks_writes_a_paused_member_acknowledged(
    cluster: FailoverCluster, mode: str, ending: str
) -> None:
    leader = cluster.start_leader(args=["--ack-mode", mode, *FAST_ACKS])
    address = replication_address(leader)
    with FaultProxy(parse_address(address)) as link2:
        f1 = cluster.start_follower("f1", address)
        f2 = cluster.start_follower("f2", f"127.0.0.1:{link2.port}")
        wait_until(lambda: replication(leader)["in_sync_count"] == 2, 20, "both in sync")
        # f2 stored the set that names both before it is cut off
        wait_until(
            lambda: (health(f2)["in_sync_set"] or {}).get("members") == ["f1", "f2"],
            10,
            "f2 to store the in-sync set {f1, f2}",
        )

        writers = ReceiptWriters(leader.url).start()
        writers.wait_for("replicated", 200)
        link2.set_refuse(True)  # f2 falls behind; f1 alone acknowledges from now on
        wait_until(lambda: in_sync_members(leader) == ["f1"], 20, "f2 to leave the set")
        mark = writers.count("replicated")
        writers.wait_for("replicated", mark + 300)
        pause(f1)
        leader.kill()
        receipts = writers.stop()
    replicated = [r for r in receipts if r["durability"] == "replicated"]
    held_by_f2 = events_by_id(f2)
    only_f1 = [r for r in replicated if r["event_id"] not in held_by_f2]
    assert only_f1, "the scenario needs writes acknowledged by f1 alone"
    wait_until(lambda: not replication(f2)["connected"], 15, "f2 to lose its leader")

    nodes = ",".join(n.url for n in (leader, f1, f2))
    token = ["--admin-token-file", str(cluster.token_file)]
    refused = runner.invoke(app, ["failover", "--nodes", nodes, *token])
    assert refused.exit_code == 1, refused.output
    assert "promoting f2" in refused.output
    assert "promotion refused, nothing changed" in refused.output
    assert "f1 of the last in-sync set" in refused.output and "unreachable" in refused.output
    assert "--unclean" in refused.output
    assert health(f2)["role"] == "follower" and health(f2)["term"] == 1
    # by hand too, and with the admin endpoint's own default peers (none): refused
    r = admin_post(f2, "/internal/promote")
    assert r.status_code == 409 and r.json()["unclean"], r.text

    if ending == "member_returns":
        # the in-sync member answers again: it is the candidate, promoted as usual
        resume(f1)
        wait_until(lambda: not replication(f1)["connected"], 15, "f1 to lose its leader")
        result = runner.invoke(app, ["failover", "--nodes", nodes, *token])
        assert result.exit_code == 0, result.output
        assert "promoting f1" in result.output and "unclean" not in result.output
        assert health(f1)["role"] == "leader" and health(f1)["term"] == 2
        assert_receipts_held(f1, replicated)
        wait_caught_up(f1, f2)
        assert_receipts_held(f2, replicated)
        return

    forced = runner.invoke(app, ["failover", "--nodes", nodes, "--unclean", *token])
    assert forced.exit_code == 0, forced.output
    assert "unclean promotion of f2" in forced.output
    assert "f1 of the last in-sync set" in forced.output and "lost" in forced.output
    assert health(f2)["role"] == "leader" and health(f2)["term"] == 2
    # what the warning named is indeed gone from the new leader
    after = events_by_id(f2)
    assert all(r["event_id"] not in after for r in only_f1)
    resume(f1)
