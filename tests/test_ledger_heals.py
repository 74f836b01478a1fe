"""The degradation ledger heals: a range of writes answered ``degraded`` stays *at risk* until
as many followers as the ack mode asks for hold it, then it is *since replicated* -- with
when, and to whom -- persisted like the ledger itself; ``GET /api/v1/replication/degraded``
answers what is still at risk (``all=true``: every range with its healing), and the metrics
count the at-risk writes.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from tests.cluster import (
    Cluster,
    event,
    get_json,
    http,
    post_event,
    replication_address,
    wait_caught_up,
    wait_until,
    write_events,
)
from walship.events import now_us
from walship.replication.acks import DegradationLedger
from walship.replication.ledger import LedgerRange
from walship.testing.process import NodeProcess


def metric(node: NodeProcess, name: str) -> float | None:
    text = http().get(f"{node.url}/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return None if m is None else float(m.group(1))


def degraded(node: NodeProcess, **params: str) -> dict[str, object]:
    body: dict[str, object] = get_json(node, "/api/v1/replication/degraded", **params)
    return body


# ---------------------------------------------------------------------- the ledger alone


def test_a_range_heals_once_enough_followers_hold_it_whole(tmp_path: Path) -> None:
    ledger = DegradationLedger(tmp_path / "degraded.json")
    ledger.record(10, 12, "timeout", 1)
    ledger.record(20, 20, "timeout", 2)
    assert ledger.at_risk_writes == 2 and ledger.at_risk_ranges == 2
    # one follower past the first range, none past the second; two are needed
    assert ledger.heal({"f1": 15, "f2": 11}, 2, 100) == []
    healed = ledger.heal({"f1": 15, "f2": 12, "f3": 3}, 2, 200)
    assert [(r.first_lsn, r.replicated_ts_us, r.replicated_to) for r in healed] == [
        (10, 200, ["f1", "f2"])
    ]
    assert ledger.at_risk_writes == 1 and ledger.at_risk_ranges == 1
    # healing is recorded once: a later heal does not move its time or followers
    ledger.heal({"f1": 30, "f2": 30, "f3": 30}, 2, 300)
    assert [(r.replicated_ts_us, r.replicated_to) for r in ledger.ranges] == [
        (200, ["f1", "f2"]),
        (300, ["f1", "f2", "f3"]),
    ]
    # a degraded write next to a healed range starts a range of its own, at risk
    ledger.record(21, 21, "timeout", 4)
    assert [(r.first_lsn, r.last_lsn, r.state) for r in ledger.ranges] == [
        (10, 12, "since_replicated"),
        (20, 20, "since_replicated"),
        (21, 21, "at_risk"),
    ]
    assert [r["first_lsn"] for r in ledger.to_list(at_risk_only=True)] == [21]
    ledger.flush()
    again = DegradationLedger.load(ledger.path)
    assert again.ranges == ledger.ranges


def test_a_ledger_saved_before_healing_existed_loads_at_risk(tmp_path: Path) -> None:
    path = tmp_path / "degraded.json"
    old = [
        {"first_lsn": 5, "last_lsn": 9, "writes": 2, "first_ts_us": 1, "last_ts_us": 2,
         "reason": "timeout"}
    ]  # fmt: skip
    path.write_bytes(msgspec.json.encode(old))
    ledger = DegradationLedger.load(path)
    assert ledger.ranges == [LedgerRange(5, 9, 2, 1, 2, "timeout")]
    assert ledger.ranges[0].state == "at_risk" and ledger.at_risk_writes == 2


# ---------------------------------------------------------------------- a real cluster


def test_degraded_range_turns_since_replicated_when_the_follower_returns(tmp_path: Path) -> None:
    """A follower stopped, writes degrade (at risk, counted, kept over a leader restart); the
    follower returns and catches up: the range is since replicated, with the time and the
    follower's id, the at-risk count is 0 again, and that too survives a restart."""
    with Cluster(tmp_path) as cluster:
        leader = cluster.start_leader(
            "n1", args=["--ack-mode", "semi-sync", "--ack-timeout-ms", "300"]
        )
        address = replication_address(leader)
        port = int(address.rsplit(":", 1)[1])
        f1 = cluster.start_follower("f1", address)
        write_events(leader, 20)
        wait_caught_up(leader, f1)
        assert degraded(leader) == {
            "ranges": [],
            "writes": 0,
            "at_risk": {"writes": 0, "ranges": 0},
            "total": {"writes": 0, "ranges": 0},
        }

        f1.stop()
        before_us = now_us()
        receipts = [post_event(leader, event(100 + i)).json() for i in range(3)]
        assert {r["durability"] for r in receipts} == {"degraded"}, receipts
        first, last = receipts[0]["lsn"], receipts[-1]["lsn"]
        at_risk = degraded(leader)
        assert [(r["first_lsn"], r["last_lsn"], r["state"]) for r in at_risk["ranges"]] == [
            (first, last, "at_risk")
        ]
        assert at_risk["ranges"][0]["replicated_ts_us"] is None
        assert at_risk["at_risk"] == {"writes": 3, "ranges": 1}
        assert metric(leader, "walship_replication_at_risk_writes") == 3
        assert metric(leader, "walship_replication_at_risk_ranges") == 1
        assert get_json(leader, "/health")["replication"]["degraded"] == {
            "writes": 3,
            "ranges": 1,
            "at_risk_writes": 3,
            "at_risk_ranges": 1,
        }

        # the leader restarts while the follower is away: still at risk
        leader.stop()
        cluster.restart(leader, replication_port=port)
        assert degraded(leader)["at_risk"] == {"writes": 3, "ranges": 1}
        assert metric(leader, "walship_replication_at_risk_writes") == 3

        cluster.restart(f1)
        wait_caught_up(leader, f1)
        wait_until(
            lambda: degraded(leader)["at_risk"] == {"writes": 0, "ranges": 0},
            30,
            "the degraded range to heal",
        )
        assert degraded(leader)["ranges"] == []  # nothing at risk
        (healed,) = degraded(leader, all="true")["ranges"]
        assert (healed["first_lsn"], healed["last_lsn"], healed["writes"]) == (first, last, 3)
        assert healed["state"] == "since_replicated"
        assert healed["replicated_to"] == ["f1"]
        assert before_us < healed["last_ts_us"] <= healed["replicated_ts_us"] <= now_us()
        assert metric(leader, "walship_replication_at_risk_writes") == 0
        assert metric(leader, "walship_replication_at_risk_ranges") == 0
        assert metric(leader, "walship_replication_degraded_writes") == 3

        # healing is persisted: the same after a restart
        leader.stop()
        cluster.restart(leader, replication_port=port)
        assert degraded(leader, all="true")["ranges"] == [healed]
        assert metric(leader, "walship_replication_at_risk_writes") == 0

        bad = http().get(f"{leader.url}/api/v1/replication/degraded", params={"all": "perhaps"})
        assert bad.status_code == 400 and "error" in bad.json()
