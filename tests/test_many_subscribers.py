"""One ``walship serve`` holding 1,000 idle and 100 live subscriptions at once: every live one
gets every event written meanwhile, in lsn order; the node keeps answering reads and writes;
its memory stays bounded (recorded, with a generous ceiling: the machine may be loaded, so
nothing here asserts a time).

The subscribers are raw HTTP/1.1 connections on one asyncio loop in the test process, so the
test costs sockets, not threads; the process's open-file limit is raised for them (the node,
started after, inherits it)."""

from __future__ import annotations

import asyncio
import json
import re
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, rss_bytes, stats, wait_until
from walship.testing.process import NodeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

STREAM = "/api/v1/events/stream"
IDLE = 1_000
LIVE = 100
EVENTS = 2_000
BATCH = 100
FDS_NEEDED = 2 * (IDLE + LIVE) + 256  # both ends of every stream live in this test's reach
RSS_GROWTH_MAX = 256 * 1024 * 1024  # ~230 KiB per subscriber: far above what one costs
ID_LINE = re.compile(rb"^id: (\d+):\d+$", re.MULTILINE)


@pytest.fixture
def enough_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < FDS_NEEDED:
        if hard != resource.RLIM_INFINITY and hard < FDS_NEEDED:
            pytest.skip(f"the open-file limit ({hard}) is below the {FDS_NEEDED} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (FDS_NEEDED, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Stream:
    """One subscription on a raw connection; ``lsns`` holds the ids of the events read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.lsns: list[int] = []
        self.ended = False

    @classmethod
    async def open(cls, host: str, port: int, query: str) -> Stream:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {STREAM}?{query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        return cls(reader, writer)

    async def read_until(self, lsn: int) -> None:
        """Read frames until the event at ``lsn``; the chunked framing is skipped over, as
        chunk-size lines never look like an ``id:`` line."""
        buffer = b""
        while not self.lsns or self.lsns[-1] < lsn:
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                self.ended = True
                return
            buffer += chunk
            done, _, buffer = buffer.rpartition(b"\n\n")
            self.lsns.extend(int(m) for m in ID_LINE.findall(done))

    def close(self) -> None:
        self.writer.close()


def write_batches(url: str, first: int) -> list[int]:
    lsns: list[int] = []
    with httpx.Client(timeout=60) as client:
        for start in range(first, first + EVENTS, BATCH):
            events = [
                {"entity_id": f"e-{i % 50}", "event_type": "t.live", "payload": {"i": i}}
                for i in range(start, start + BATCH)
            ]
            response = client.post(f"{url}/api/v1/events/batch", json={"events": events})
            assert response.status_code == 200, response.text
            lsns += [r["lsn"] for r in response.json()["receipts"]]
    return lsns


async def hold_subscribers(node: NodeProcess) -> dict[str, int]:
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    rss: dict[str, int] = {"before": rss_bytes(node)}
    # idle: a tenant nobody writes to (history read, then nothing to send but keepalives)
    idle = [await Stream.open(host, int(port), "tenant_id=quiet") for _ in range(IDLE)]
    live = [await Stream.open(host, int(port), "from_lsn=1") for _ in range(LIVE)]
    try:
        wait_until(lambda: stats(node)["subscriptions"] == IDLE + LIVE, 30, "every stream open")
        rss["idle"] = rss_bytes(node)
        lsns = await asyncio.to_thread(write_batches, node.url, 0)
        await asyncio.wait_for(asyncio.gather(*(s.read_until(lsns[-1]) for s in live)), 120)
        for stream in live:
            assert stream.lsns == lsns, (stream.ended, stream.lsns[-3:])
        rss["live"] = rss_bytes(node)
        # still serving reads while every stream is open
        answer = httpx.get(f"{node.url}/api/v1/events/query", params={"limit": 5}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["events"]) == 5
        assert not any(s.ended for s in idle)
    finally:
        for stream in idle + live:
            stream.close()
    return rss


def test_a_node_holds_a_thousand_idle_and_a_hundred_live_subscribers(
    tmp_path: Path, enough_files: None
) -> None:
    with Cluster(tmp_path) as cluster:
        node = cluster.start_leader()
        t0 = time.monotonic()
        rss = asyncio.run(hold_subscribers(node))
        elapsed = time.monotonic() - t0
        wait_until(lambda: stats(node)["subscriptions"] == 0, 30, "the streams to be released")
        record = {
            "idle": IDLE,
            "live": LIVE,
            "events": EVENTS,
            "rss_before_mib": round(rss["before"] / 2**20, 1),
            "rss_idle_mib": round(rss["idle"] / 2**20, 1),
            "rss_live_mib": round(rss["live"] / 2**20, 1),
            "seconds": round(elapsed, 1),
        }
        print("many subscribers:", json.dumps(record))
        (tmp_path / "many_subscribers.json").write_text(json.dumps(record))
        assert rss["live"] - rss["before"] < RSS_GROWTH_MAX, record


def test_a_node_started_under_a_low_open_file_limit_raises_it(
    tmp_path: Path, enough_files: None
) -> None:
    """Started with a soft limit of 256 descriptors (as systems with 1,024 start services,
    scaled down), ``walship serve`` raises it to the hard limit and holds 400 streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1_024:
        pytest.skip(f"the hard open-file limit ({hard}) leaves nothing to raise")
    with Cluster(tmp_path) as cluster:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            node = cluster.start_leader()  # inherits the low limit
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        host, port = node.url.removeprefix("http://").rsplit(":", 1)

        async def hold() -> None:
            streams = [await Stream.open(host, int(port), "tenant_id=quiet") for _ in range(400)]
            try:
                wait_until(lambda: stats(node)["subscriptions"] == 400, 30, "400 open streams")
                assert write_batches(node.url, 0)[-1] == EVENTS
            finally:
                for stream in streams:
                    stream.close()

        asyncio.run(hold())
