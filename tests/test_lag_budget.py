"""The recovery-point budget (``--max-replication-lag-ms``): under more ingest than a slow
follower can take, the leader slows writes -- never fails them -- so the in-sync follower's
lag stays within the budget; without the budget the lag grows without bound.

Real processes; the follower reaches the leader through a proxy that delays every chunk.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import (
    Cluster,
    Writers,
    follower_session,
    health,
    http,
    replication,
    replication_address,
    wait_caught_up,
    wait_until,
    write_events,
)
from walship.replication.config import parse_address
from walship.replication.lagbudget import AckRate, held_to_ms
from walship.testing.proxy import FaultProxy

BUDGET_MS = 1_500
WRITE_S = 6.0


def overload(root: Path, budget_ms: int) -> tuple[list[float], int, dict[str, Any]]:
    """Writers flood an async leader whose follower's link delays each chunk by 40 ms; the
    follower's lag as the leader sees it, sampled while they write, the events written,
    and the leader's replication health at the end."""
    args = ["--ack-mode", "async", "--max-lag-ms", "60000"]
    if budget_ms:
        args += ["--max-replication-lag-ms", str(budget_ms)]
    with Cluster(root) as cluster:
        leader = cluster.start_leader("n1", args=args)
        with FaultProxy(parse_address(replication_address(leader))) as link:
            f1 = cluster.start_follower("f1", f"127.0.0.1:{link.port}")
            write_events(leader, 100)
            wait_caught_up(leader, f1)
            wait_until(lambda: replication(leader)["in_sync_count"] == 1, 15, "f1 in sync")
            link.set_delay_ms(40)
            writers = Writers(leader.url, threads=4, batch=400).start()
            lags: list[float] = []
            end = time.monotonic() + WRITE_S
            try:
                while time.monotonic() < end:
                    session = follower_session(leader, "f1")
                    assert session is not None and session["in_sync"], session
                    lags.append(float(session["lag_ms"]))
                    time.sleep(0.1)
            finally:
                written = len(writers.stop())
            status = replication(leader)
            metrics = http().get(f"{leader.url}/metrics").text
            link.set_delay_ms(0)
            wait_caught_up(leader, f1, timeout_s=60)
            assert health(leader)["status"] == "healthy"
    status["metrics"] = metrics
    return lags, written, status


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def test_a_follower_is_held_to_the_lag_its_backlog_will_make() -> None:
    rate = AckRate(window_s=2.0)
    assert rate.per_s(0.0) is None
    rate.note(100, 0.0)
    rate.note(300, 1.0)  # 200 records a second
    assert rate.per_s(1.0) == 200
    assert rate.per_s(3.5) is None  # nothing acknowledged for a whole window
    # 600 records behind at 200/s: 3 s of lag to come, though the oldest is 50 ms old
    assert held_to_ms(50.0, 600, 200.0) == 3000.0
    assert held_to_ms(5000.0, 600, 200.0) == 5000.0  # its lag now, when that is higher
    assert held_to_ms(50.0, 600, None) == 50.0  # rate unknown: its lag now
    assert held_to_ms(80.0, 0, 200.0) == 0.0  # caught up


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_budget_keeps_lag_within_it_by_slowing_writes_and_without_it_lag_grows(
    tmp_path: Path,
) -> None:
    lags, written, status = overload(tmp_path / "budget", BUDGET_MS)
    budget = status["lag_budget"]
    print(f"with the budget: p99 lag {p99(lags):.0f} ms, {written} events, {budget}")
    assert p99(lags) <= BUDGET_MS, lags
    # the writes were slowed, none failed (Writers.stop raises on any failed write)
    assert budget["budget_ms"] == BUDGET_MS and budget["throttled_writes"] > 0, budget
    assert budget["throttled_seconds"] > 1.0 and budget["wait_timeouts"] == 0, budget
    assert f"walship_replication_lag_budget_seconds {BUDGET_MS / 1000}" in status["metrics"]
    assert "walship_replication_lag_budget_wait_seconds_count" in status["metrics"]

    free_lags, free_written, free_status = overload(tmp_path / "free", 0)
    print(f"without: p99 lag {p99(free_lags):.0f} ms, max {max(free_lags):.0f}, {free_written}")
    assert free_status["lag_budget"]["throttled_writes"] == 0
    # the lag runs away: far past the budget by the end, and still rising
    assert max(free_lags) > 2 * BUDGET_MS, free_lags
    half = len(free_lags) // 2
    assert max(free_lags[half:]) > max(free_lags[:half]), free_lags
    assert free_written > written  # the budget slowed ingest
