"""Per-key limits: a key over its rate or its requests in flight gets 429 with Retry-After,
at once, while another key's requests go on."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from statistics import median

import httpx
import pytest

from walship.apikeys import ApiKeyFile, Role
from walship.errors import RateLimited
from walship.http.ratelimit import RateLimiter, RateLimits
from walship.testing.process import NodeProcess


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_allows_bursts_then_the_rate_and_says_when_to_retry() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(rate_per_s=2, burst=4), clock=clock)
    for _ in range(4):
        limiter.admit("key a")
        limiter.release("key a")
    with pytest.raises(RateLimited) as refused:
        limiter.admit("key a")
    assert refused.value.details["retry_after_s"] == 1 and refused.value.http_status == 429
    limiter.admit("key b")  # another key has its own bucket
    clock.now += 0.5  # one token back at 2/s
    limiter.admit("key a")
    with pytest.raises(RateLimited):
        limiter.admit("key a")


def test_requests_in_flight_are_bounded_and_released() -> None:
    limiter = RateLimiter(RateLimits(concurrent=2), clock=FakeClock())
    limiter.admit("k")
    limiter.admit("k")
    with pytest.raises(RateLimited, match="in flight"):
        limiter.admit("k")
    limiter.release("k")
    limiter.admit("k")


def test_the_table_of_keys_stays_bounded() -> None:
    limiter = RateLimiter(RateLimits(rate_per_s=1), clock=FakeClock(), principals_max=10)
    for i in range(1_000):
        limiter.admit(f"token of {i}")
        limiter.release(f"token of {i}")
    assert len(limiter._buckets) <= 10


def _keys(path: Path) -> tuple[str, str]:
    f = ApiKeyFile(path)
    return f.create(Role.WRITE, None)[1], f.create(Role.WRITE, None)[1]


def test_a_flooding_key_gets_429_while_another_keys_writes_go_on(tmp_path: Path) -> None:
    hot, calm = _keys(tmp_path / "keys.json")
    node = NodeProcess(
        tmp_path / "data",
        fsync="never",
        extra_args=[
            "--api-keys-file",
            str(tmp_path / "keys.json"),
            "--rate-limit-per-key",
            "20",
            "--concurrent-per-key",
            "2",
        ],
    ).start()
    try:
        url = f"{node.url}/api/v1/events"
        event = {"entity_id": "e", "event_type": "t", "payload": 1}
        codes: list[int] = []
        retry_after: set[str] = set()
        calm_codes: list[int] = []
        stop = threading.Event()

        def flood() -> None:  # far above 20 a second: no pause between requests
            with httpx.Client(headers={"X-API-Key": hot}, timeout=30) as client:
                while not stop.is_set():
                    r = client.post(url, json=event)
                    codes.append(r.status_code)
                    if r.status_code == 429:
                        assert r.json()["error"] == "rate_limited"
                        retry_after.add(r.headers["retry-after"])

        def calm_writes(client: httpx.Client) -> list[float]:
            """Ten writes at 10 a second, within the calm key's limit: each one's latency."""
            took = []
            for _ in range(10):
                t0 = time.perf_counter()
                calm_codes.append(client.post(url, json=event).status_code)
                took.append(time.perf_counter() - t0)
                time.sleep(0.1)
            return took

        flooders = [threading.Thread(target=flood) for _ in range(2)]
        with httpx.Client(headers={"X-API-Key": calm}, timeout=30) as client:
            alone = calm_writes(client)  # the same connection, before the flood
            for t in flooders:
                t.start()
            flooded = calm_writes(client)
        stop.set()
        for t in flooders:
            t.join(30)
        assert calm_codes == [200] * 20
        # the other key's latency stays of its own order: a 429 costs the node little and
        # never waits (the flooders and this test share the node's two cores, hence the slack)
        assert median(flooded) < 4 * median(alone) + 0.025, (alone, flooded)
        assert max(flooded) < 2.0, flooded
        assert 429 in codes and 200 in codes
        ok = codes.count(200)
        # ~20/s plus the first second's burst over the test's ~1-2 s: far below what was sent
        assert ok < len(codes) / 2, (ok, len(codes))
        assert retry_after and all(v.isdigit() and int(v) >= 1 for v in retry_after)
        # the health checks are never limited
        assert httpx.get(f"{node.url}/health/ready").status_code in (200, 503)
    finally:
        assert node.stop() == 0


def test_a_key_with_its_requests_in_flight_is_refused_at_once(tmp_path: Path) -> None:
    slow, other = _keys(tmp_path / "keys.json")
    node = NodeProcess(
        tmp_path / "data",
        fsync="never",
        extra_args=["--api-keys-file", str(tmp_path / "keys.json"), "--concurrent-per-key", "1"],
    ).start()
    try:
        query = f"{node.url}/api/v1/events/query"
        answers: list[int] = []

        def wait_long() -> None:  # waits 3 s for an lsn that never comes (504)
            while not answers or answers[-1] == 429:  # our probe may hold the slot a moment
                r = httpx.get(
                    query,
                    params={"min_lsn": 10**9, "min_lsn_wait_ms": 3000},
                    headers={"X-API-Key": slow},
                    timeout=30,
                )
                answers.append(r.status_code)

        waiting = threading.Thread(target=wait_long)
        waiting.start()
        deadline = time.monotonic() + 20
        while True:  # until the slow request holds its one slot
            r = httpx.get(query, headers={"X-API-Key": slow}, timeout=30)
            if r.status_code == 429 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 429 and r.json()["limit"] == "concurrent", r.text
        assert r.headers["retry-after"] == "1"
        assert httpx.get(query, headers={"X-API-Key": other}).status_code == 200
        waiting.join(30)
        assert answers[-1] == 504
        assert httpx.get(query, headers={"X-API-Key": slow}).status_code == 200  # released
    finally:
        assert node.stop() == 0
