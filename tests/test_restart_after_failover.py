"""A deposed leader stays deposed (DESIGN invariant 10), with real processes.

Kill -9 the leader of a three-node semi-sync cluster, ``walship failover``, then restart every
node with its original command line while a client writes to all of them: the old leader
(which nobody could tell) asks the followers it knows before it takes any write, learns of
the newer term and follows; exactly one node takes writes; nothing answered ``replicated`` is
lost; ``walship status`` shows one leader; and the new leader keeps the cluster's ack mode
although its own command line never said it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.cluster import event, health, replication, wait_caught_up, wait_until
from tests.failover_cluster import ReceiptWriters, assert_receipts_held
from tests.fixed_cluster import AnyNodeWriter, FixedCluster, start_all
from walship.cli.main import app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

runner = CliRunner()
FAST_ACKS = ["--ack-timeout-ms", "1000", "--max-lag-ms", "2000"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FixedCluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")
    with FixedCluster(root) as c:
        yield c
    problems = c.log_problems()
    if problems:
        pytest.fail("unhandled errors in the node logs:\n" + "\n".join(problems), pytrace=False)


def leaders(urls: list[str]) -> list[str]:
    """The node ids whose ``walship status --json`` says they lead and are not fenced."""
    result = runner.invoke(app, ["status", *urls, "--json"])
    assert result.exit_code == 0, result.output
    docs = json.loads(result.output)
    return [
        d["health"]["node_id"]
        for d in docs
        if d.get("health") and d["health"]["role"] == "leader" and not d["health"]["fenced"]
    ]


def test_restart_every_node_after_failover_leaves_one_leader_and_keeps_the_ack_mode(
    cluster: FixedCluster,
) -> None:
    a, a_ports = cluster.add("a", ["--role", "leader", "--ack-mode", "semi-sync", *FAST_ACKS])
    a.start()
    a_address = f"127.0.0.1:{a_ports.replication}"
    b, _ = cluster.add("b", ["--role", "follower", "--leader", a_address])
    c, _ = cluster.add("c", ["--role", "follower", "--leader", a_address])
    start_all([b, c])
    wait_until(lambda: replication(a)["in_sync_count"] == 2, 20, "both followers in sync")
    urls = [a.url, b.url, c.url]

    writers = ReceiptWriters(a.url).start()
    writers.wait_for("replicated", 300)
    a.kill()
    receipts = writers.stop()
    wait_until(lambda: not replication(b)["connected"], 15, "b to lose its leader")
    wait_until(lambda: not replication(c)["connected"], 15, "c to lose its leader")

    failover = runner.invoke(
        app,
        ["failover", "--nodes", ",".join(urls), "--admin-token-file", str(cluster.token_file)],
    )
    assert failover.exit_code == 0, failover.output
    assert "is unreachable" in failover.output  # a: nobody could tell it
    new = next(n for n in (b, c) if health(n)["role"] == "leader")
    other = c if new is b else b
    assert health(new)["term"] == 2
    # the promoted follower leads with the cluster's ack mode, not its flags' default (async)
    assert replication(new)["mode"] == "semi-sync"
    after_failover = ReceiptWriters(new.url, first=10**6).start()
    after_failover.wait_for("replicated", 200)
    receipts += after_failover.stop()

    # every node goes down (the survivors killed too) and comes back with its command line
    # while a client writes to all three
    for node in (b, c):
        node.kill()
    writer = AnyNodeWriter(urls).start()
    restarted = time.monotonic()
    start_all([a, b, c])
    wait_until(lambda: health(a)["role"] == "follower", 30, "the old leader to follow")
    assert replication(a)["leader"] == health(new)["replication_address"]
    assert health(a)["term_seen"] >= 2
    wait_until(lambda: len(writer.accepted(restarted)) >= 30, 30, "writes after the restart")
    writer.stop()

    accepted_by = {ans.url for ans in writer.accepted(restarted)}
    assert accepted_by == {new.url}, f"writes were taken by {accepted_by}"
    refused = {a_.body.get("error") for a_ in writer.answers if a_.url == a.url and a_.status}
    assert refused <= {"leadership_unconfirmed", "fenced", "read_only"}, refused
    assert leaders(urls) == [new.node_id]
    assert replication(new)["mode"] == "semi-sync"  # restarted with its follower flags

    replicated = [r for r in receipts if r["durability"] == "replicated"]
    replicated += [r for r in writer.receipts() if r["durability"] == "replicated"]
    assert len(replicated) >= 500
    wait_caught_up(new, other, a)
    for node in (new, other, a):
        assert_receipts_held(node, replicated)


def test_a_leader_whose_peers_do_not_answer_takes_no_writes_until_one_does(
    cluster: FixedCluster,
) -> None:
    """What happens when no peer is reachable at start: 503 ``leadership_unconfirmed`` (and
    ``/health`` says why) for as long as it lasts; the first answer lets writes in."""
    b, b_ports = cluster.add("b", ["--role", "leader"])
    a, _ = cluster.add("a", ["--role", "leader", "--peers", f"http://127.0.0.1:{b_ports.http}"])
    a.start()
    r = httpx.post(f"{a.url}/api/v1/events", json=event(1), timeout=10)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "leadership_unconfirmed"
    assert "no answer from" in r.json()["message"]
    leadership = health(a)["leadership"]
    assert leadership["state"] == "confirming" and leadership["peers"][0]["error"]
    shown = runner.invoke(app, ["status", a.url])
    assert shown.exit_code == 0 and "leader (unconfirmed)" in shown.output, shown.output
    not_ready = httpx.get(f"{a.url}/health/ready", timeout=10)
    assert not_ready.status_code == 503
    assert any("takes no writes yet" in r for r in not_ready.json()["reasons"]), not_ready.text

    b.start()  # a peer of the same term answers: nobody knows a newer one
    wait_until(lambda: health(a)["leadership"]["state"] == "confirmed", 15, "a to be confirmed")
    r = httpx.post(f"{a.url}/api/v1/events", json=event(2), timeout=10)
    assert r.status_code == 200, r.text
