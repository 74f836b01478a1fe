"""Role-bound Prometheus series follow a node's role: a follower promoted to leader stops
reporting a leader it no longer follows (lag, ``connected``, lsns), and a leader repointed to
follow drops its per-follower series (session figures and retention forecasts) and counts.

Before, both kept their last values for as long as the process ran: a promoted leader showed
the lsns of a stream long gone, and a deposed leader a follower that had left it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import http, replication_address, wait_caught_up, wait_until, write_events
from tests.failover_cluster import FailoverCluster, promote, repoint
from tests.test_prometheus import samples
from walship.testing.process import NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FOLLOWER_SIDE = (
    "walship_replication_connected",
    "walship_replication_durable_lsn",
    "walship_replication_applied_lsn",
    "walship_replication_leader_lsn",
    "walship_replication_lag_records",
    "walship_replication_lag_seconds",
)


def scrape(node: NodeProcess) -> dict[str, float]:
    return samples(http().get(f"{node.url}/metrics").text)


def per_follower(found: dict[str, float], node_id: str) -> list[str]:
    return [k for k in found if k.startswith("walship_replication_follower_") and node_id in k]


def test_promotion_and_repointing_clear_the_series_of_the_role_left(tmp_path: Path) -> None:
    with FailoverCluster(tmp_path / "cluster") as cluster:
        n1 = cluster.start_leader("n1")
        n2 = cluster.start_follower("n2", replication_address(n1))
        write_events(n1, 20)
        wait_caught_up(n1, n2)

        def leader_sees_n2() -> dict[str, float] | None:
            found = scrape(n1)
            retention = "walship_replication_follower_retention_bytes{node_id=n2}"
            return found if retention in found and found["walship_replication_followers"] else None

        before = wait_until(leader_sees_n2, 20, "n1 to publish its follower n2")
        assert per_follower(before, "n2"), before
        follower = scrape(n2)
        assert follower["walship_replication_connected"] == 1
        assert follower["walship_replication_leader_lsn"] >= 20
        assert follower["walship_replication_durable_lsn"] >= 20

        # the leader steps down (to follow an address where nobody listens): nothing of its
        # follower n2 remains
        repoint(n1, "127.0.0.1:9")
        after = scrape(n1)
        assert per_follower(after, "n2") == [], after
        assert after["walship_replication_followers"] == 0
        assert after["walship_replication_in_sync"] == 0
        assert after["walship_is_leader"] == 0

        # n2, cut off, is promoted: it reports no leader's stream any more
        wait_until(
            lambda: scrape(n2)["walship_replication_connected"] == 0 or None,
            20,
            "n2 to see its leader gone",
        )
        promote(n2, force=True)
        promoted = scrape(n2)
        assert promoted["walship_is_leader"] == 1
        stale = {name: promoted[name] for name in FOLLOWER_SIDE if promoted[name] != 0}
        assert stale == {}, f"follower-side series kept on the promoted leader: {stale}"
