"""The retention forecast: for each follower, when its retention slot reaches
``--wal-retention-bytes-max`` at the current ingest rate and its lag -- in ``/health``, the
metrics and a log line under a threshold.

A real leader and follower over TCP (one event loop, as ``test_replication_unit``); the
follower is held back (stopped, its slot kept) while writes run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from pathlib import Path

import pytest

from walship.replication.metrics import ReplicationMetrics
from walship.replication.retention import RetentionForecaster, slot_bytes

from .test_replication_unit import (
    LIMITS,
    eventually,
    make_follower,
    metric,
    open_store,
    run,
    start_leader,
    stop_all,
    write,
)

CAP_BYTES = 4 << 20


def test_slot_bytes_counts_whole_segments_from_the_followers_next_record() -> None:
    segments = [(1, None, 100), (11, None, 200), (31, None, 50)]
    assert slot_bytes(segments, 0) == 350
    assert slot_bytes(segments, 9) == 350  # its next record, 10, is in the first segment
    assert slot_bytes(segments, 10) == 250
    assert slot_bytes(segments, 40) == 50
    assert slot_bytes([], 5) == 0


def test_forecast_from_samples_none_while_the_lag_does_not_grow() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    f = RetentionForecaster(1000, ReplicationMetrics(registry), warn_s=60, sample_interval_s=0)
    segments = [(1, None, 500)]  # 100 records of 5 bytes
    f.sample({"a": 100, "b": 50}, 100, segments, now=0.0)
    assert f.forecasts["a"].exhaustion_s is None  # one sample: no rate yet
    segments = [(1, None, 600)]  # 20 more records
    f.sample({"a": 120, "b": 50}, 120, segments, now=2.0)
    assert f.forecasts["a"].growth_bytes_per_s == 0 and f.forecasts["a"].exhaustion_s is None
    b = f.forecasts["b"]
    assert b.lag_records == 70 and b.growth_bytes_per_s == pytest.approx(50.0)
    assert b.exhaustion_s == pytest.approx((1000 - 600) / 50.0)
    assert (
        registry.get_sample_value(
            "walship_replication_follower_retention_exhaustion_seconds", {"node_id": "a"}
        )
        == math.inf
    )
    # a slot forgotten is gone from the forecast and the metrics
    f.sample({"a": 120}, 120, segments, now=3.0)
    assert set(f.forecasts) == {"a"}
    labels = {"node_id": "b"}
    assert registry.get_sample_value("walship_replication_follower_retention_bytes", labels) is None


def test_a_follower_held_back_while_writes_run_gets_a_falling_forecast(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # warn when the slot is forecast to fill within an hour: it will be, in seconds
    limits = dataclasses.replace(LIMITS, retention_exhaustion_warn_ms=3_600_000)

    async def scenario() -> None:
        lstore = open_store(tmp_path / "leader", "leader", limits)
        fstore = open_store(tmp_path / "f1", "f1", limits)
        leader = await start_leader(lstore, wal_retention_bytes_max=CAP_BYTES)
        assert leader.port is not None
        follower = make_follower(fstore, leader.port)
        try:
            await follower.start()
            last = await write(lstore, 200)
            await eventually(lambda: leader.durable_positions().get("f1") == last)

            def forecast() -> dict[str, object]:
                followers = leader.status()["retention"]["followers"]
                return followers.get("f1") or {}

            # caught up and idle: a slot, no forecast
            await eventually(lambda: forecast().get("slot_lsn") == last)
            await asyncio.sleep(1.2)
            await write(lstore, 10, start=200)
            await asyncio.sleep(1.2)
            await eventually(lambda: forecast().get("lag_records") == 0)
            assert forecast()["exhaustion_s"] is None

            # held back: the follower stops (its slot stays) while writes run
            await follower.stop()
            await eventually(lambda: "f1" not in leader.sessions)
            seen: list[tuple[int, float]] = []
            start = 300
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while len(seen) < 3 and loop.time() < deadline:
                await write(lstore, 150, start=start)
                start += 150
                await asyncio.sleep(0.25)
                f = forecast()
                if f.get("exhaustion_s") is not None:
                    size, eta = int(str(f["slot_bytes"])), float(str(f["exhaustion_s"]))
                    growth = float(str(f["growth_bytes_per_s"]))
                    # what is left of the cap, at the rate the slot grows
                    assert eta * growth == pytest.approx(CAP_BYTES - size, rel=0.01), f
                    if not seen or size > seen[-1][0] + 20_000:
                        seen.append((size, eta))
            assert len(seen) >= 3, seen
            sizes = [size for size, _ in seen]
            etas = [eta for _, eta in seen]
            assert sizes == sorted(sizes) and etas[-1] < etas[0], seen
            assert all(0 < eta < 3600 for eta in etas), seen
            assert all(size < CAP_BYTES for size in sizes)

            f1 = {"node_id": "f1"}
            gauge = metric(
                lstore, "walship_replication_follower_retention_exhaustion_seconds", **f1
            )
            assert gauge is not None and 0 < gauge < 3600
            held = metric(lstore, "walship_replication_follower_retention_bytes", **f1)
            assert held is not None and held >= sizes[0]
            assert metric(lstore, "walship_replication_retention_bytes_max") == CAP_BYTES
            warnings = [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.WARNING and "retention slot of f1" in r.getMessage()
            ]
            assert len(warnings) == 1, warnings  # once, not at every sample
            assert f"--wal-retention-bytes-max {CAP_BYTES}" in warnings[0]
        finally:
            await stop_all(leader, lstore, follower, fstore)

    with caplog.at_level(logging.INFO, logger="walship.replication.retention"):
        run(scenario)
