"""Subscription benchmark (issue 13): one ``walship serve`` on loopback, fsync always.

Measures:
  (a) catch-up: one subscriber reads ``GET /api/v1/events/stream`` from lsn 0 through N
      stored events (~1 KB each, as the ingest benchmark writes them), events/s
  (b) live delivery latency: a writer paces batches of 50 at ``--live-rate`` events/s; for
      each event, the time from the write's answer (at the writer) to its arrival at a
      subscriber in another process (CLOCK_MONOTONIC is one clock for both), p50/p99
  (c) ingest (HTTP batches of 1,000, 4 connections) with 100 live subscribers reading every
      event, as a ratio to the same ingest without subscribers
  (d) the server's RSS with 1,000 idle subscribers (a tenant nobody writes), and before them

Subscribers run in child processes (raw HTTP/1.1 on asyncio), so their parsing does not take
the writer's GIL; all of it shares the machine's cores with the server.
Run: ``python benchmarks/subscriptions.py [--quick] [--events N]``; results in
results/subscriptions.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import resource
import socket
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).parent))
from common import RawHttp, event, percentile, save
from walship.limits import Limits
from walship.storage.compaction import pick_run
from walship.storage.manifest import read_manifest
from walship.testing.process import NodeProcess

TARGETS = {
    "catchup_events_per_s": 100_000,
    "live_latency_p99_ms": 5.0,
    "ingest_ratio_100_live": 0.8,
}
STREAM = "/api/v1/events/stream"
ID_LINE = re.compile(rb"\nid: (\d+):")
FDS_WANTED = 4_096
READ_BUFFER_BYTES = 1 << 20  # a live subscriber's reads (events here are ~1 KB)
PARTS = ("catchup", "live", "ingest", "idle")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < FDS_WANTED:
        top = FDS_WANTED if hard == resource.RLIM_INFINITY else min(FDS_WANTED, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


def start_node(root: Path, name: str, fanin: int | None = None) -> NodeProcess:
    """A node; ``fanin``: its ``--compaction-fanin-min`` (small: merged parts at fewer events)."""
    extra = ["--log-level", "warning"]
    if fanin is not None:
        extra += ["--compaction-fanin-min", str(fanin)]
    node = NodeProcess(root / name, node_id=name, fsync="always", extra_args=extra)
    return node.start()


def rss_mb(node: NodeProcess) -> float:
    assert node.process is not None
    with open(f"/proc/{node.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_times(node: NodeProcess) -> tuple[float, float]:
    """CPU seconds the node's process has used, (user, system): figures the other load on a
    shared machine disturbs far less than a rate."""
    assert node.process is not None
    with open(f"/proc/{node.process.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_s(node: NodeProcess) -> float:
    """CPU seconds the node's process has used (user + system)."""
    return sum(cpu_times(node))


def timed_load(node: NodeProcess, n: int, offset: int) -> tuple[float, float, float]:
    """Load ``n`` events: (events/s, the node's CPU µs per event, of which system µs)."""
    user, system = cpu_times(node)
    rate = load(node.url, n, offset)
    user2, system2 = cpu_times(node)
    return rate, (user2 + system2 - user - system) * 1e6 / n, (system2 - system) * 1e6 / n


def batches(n: int, offset: int = 0, size: int = 1_000) -> list[bytes]:
    return [
        msgspec.json.encode({"events": [event(offset + b * size + i) for i in range(size)]})
        for b in range(n // size)
    ]


async def post_batches(url: str, bodies: list[bytes], concurrency: int = 4) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while not queue.empty():
                r = await client.post("/api/v1/events/batch", content=queue.get_nowait(),
                                      headers={"content-type": "application/json"})  # fmt: skip
                r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


def load(url: str, n: int, offset: int = 0) -> float:
    """Write ``n`` events in batches of 1,000 over 4 connections; events/s."""
    elapsed = asyncio.run(post_batches(url, batches(n, offset)))
    return n / elapsed


def last_lsn(url: str) -> int:
    return int(httpx.get(f"{url}/health").json()["last_lsn"])


# ---------------------------------------------------------------- subscribers (child processes)


async def _open(url: str, query: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 22)
    writer.write(f"GET {STREAM}?{query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"subscription refused: {head[:200]!r}")
    return reader, writer


async def _read_through(
    reader: asyncio.StreamReader, last: int, times: dict[int, float] | None
) -> int:
    """Read frames until the event at ``last``; events read. With ``times``, each lsn's
    arrival time (the chunk's) is noted.

    Without ``times`` the ids are counted with ``bytes.count`` and only the last one is
    parsed: a regex over every byte cost this reader ~15 µs of CPU an event, more than the
    node spent sending it. (The node cuts its chunks where frames end, so no chunk header of
    the HTTP body falls inside an ``id:`` line.)
    """
    tail = b""
    count = 0
    seen = 0
    while seen < last:
        chunk = await reader.read(1 << 20)
        if not chunk:
            raise RuntimeError(f"the stream ended at lsn {seen}")
        now = time.monotonic()
        data = tail + chunk
        cut = data.rfind(b"\n")
        # what came before ``done`` ended with a newline: put it back, so an id at its start
        # is found as ``\nid: `` too
        done, tail = b"\n" + data[: cut + 1], data[cut + 1 :]
        if times is not None:
            ids = ID_LINE.findall(done)
            for lsn in ids:
                times[int(lsn)] = now
            if ids:
                count += len(ids)
                seen = int(ids[-1])
            continue
        found = done.count(b"\nid: ")
        if found:
            count += found
            at = done.rfind(b"\nid: ") + 5
            seen = int(done[at : done.index(b":", at)])
    return count


def catch_up_child(url: str, last: int, out: Connection) -> None:
    """The raw reader: counts ``id:`` lines with a regex (C speed), parses no JSON."""

    async def run() -> tuple[int, float, float]:
        t0 = time.perf_counter()
        c0 = time.process_time()
        reader, writer = await _open(url, "from_lsn=1")
        count = await _read_through(reader, last, None)
        elapsed = time.perf_counter() - t0
        writer.close()
        return count, elapsed, time.process_time() - c0

    out.send(asyncio.run(run()))


def client_catch_up_child(url: str, last: int, out: Connection) -> None:
    """The reader an application would use: ``walship.Client.subscribe`` (each event's
    JSON decoded into an ``Event``)."""
    from walship import Client

    t0 = time.perf_counter()
    c0 = time.process_time()
    count = 0
    with Client(url) as client:
        for ev in client.subscribe(from_lsn=1):
            count += 1
            if ev.lsn >= last:
                break
    out.send((count, time.perf_counter() - t0, time.process_time() - c0))


def live_child(url: str, from_lsn: int, last_conn: Connection, ready: Any, out: Connection) -> None:
    """One subscriber from ``from_lsn``; sends back each lsn's arrival time once it has read
    the lsn the parent sends when its writes are done."""

    async def run() -> dict[int, float]:
        reader, writer = await _open(url, f"from_lsn={from_lsn}")
        ready.set()
        times: dict[int, float] = {}
        loop = asyncio.get_running_loop()
        waiter = loop.run_in_executor(None, last_conn.recv)
        reading = asyncio.ensure_future(_read_through(reader, 1 << 62, times))
        last = await waiter
        while not times or max(times) < last:
            await asyncio.sleep(0.05)
        reading.cancel()
        writer.close()
        return times

    out.send(asyncio.run(run()))


async def _open_socket(url: str, query: str) -> tuple[socket.socket, bytes]:
    """A subscription on a raw non-blocking socket: (the socket, body bytes read with the head)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, int(port)))
    await loop.sock_sendall(sock, f"GET {STREAM}?{query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        got = await loop.sock_recv(sock, 1 << 16)
        if not got:
            raise RuntimeError("the subscription closed before its answer")
        head += got
    head, _, rest = head.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"subscription refused: {head[:200]!r}")
    return sock, rest


async def _count_through(sock: socket.socket, first: bytes, last: int) -> int:
    """Read a stream until the event at ``last``; events read.

    Each read lands in one buffer (``recv_into``) where the ``id:`` lines are counted in
    place, and only the last one is parsed: the reader touches every byte the node sent once
    after the kernel, so a hundred of them in four processes cost the machine little more
    than the copies out of the socket. (The asyncio ``StreamReader`` this used before copied
    each byte five times; its readers could not keep up with the node, fell behind the live
    tail and made the node read its history once per stream.)"""
    loop = asyncio.get_running_loop()
    buf = bytearray(READ_BUFFER_BYTES)
    view = memoryview(buf)
    keep = len(first) + 1
    buf[0] = ord("\n")  # the first frame follows the stream's opening comment
    buf[1:keep] = first
    count = seen = 0
    while seen < last:
        got = await loop.sock_recv_into(sock, view[keep:])
        if not got:
            raise RuntimeError(f"the stream ended at lsn {seen}")
        end = keep + got
        # whole lines only: an ``id:`` line cut by this read is counted with the next one
        cut = buf.rfind(b"\n", 0, end)
        if cut < 0:
            raise RuntimeError("a line longer than the read buffer")
        found = buf.count(b"\nid: ", 0, cut)
        if found:
            count += found
            at = buf.rfind(b"\nid: ", 0, cut) + 5
            seen = int(buf[at : buf.index(b":", at)])
        keep = end - cut
        buf[:keep] = buf[cut:end]
    return count


def many_child(url: str, count: int, query: str, ready: Any, done: Any, out: Connection) -> None:
    """``count`` subscriptions on one loop; with ``from_lsn``, each reads through the lsn
    ``done`` carries (a Connection) and the child answers the events each got."""
    raise_fd_limit()

    async def run() -> list[int]:
        streams = [await _open_socket(url, query) for _ in range(count)]
        ready.set()
        last = await asyncio.get_running_loop().run_in_executor(None, done.recv)
        if last <= 0:  # idle subscribers: hold them until told, read nothing
            got = [0] * count
        else:
            got = await asyncio.gather(*(_count_through(s, rest, last) for s, rest in streams))
        for sock, _ in streams:
            sock.close()
        return list(got)

    out.send(asyncio.run(run()))


# ---------------------------------------------------------------- the measurements


def _timed_reader(node: NodeProcess, target: Any, last: int) -> tuple[int, float, float, float]:
    """Run one catch-up reader in a child: (events, seconds, reader CPU s, node CPU s)."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=target, args=(node.url, last, send))
    node_cpu = cpu_s(node)
    child.start()
    count, elapsed, reader_cpu = recv.recv()
    node_cpu = cpu_s(node) - node_cpu
    child.join()
    return count, elapsed, reader_cpu, node_cpu


def settled_parts(node: NodeProcess, fanin: int | None, timeout_s: float = 300.0) -> list[int]:
    """The part sizes once the node has no merge left to run (a merge of ~460,000 events
    running during the catch-up took its CPU, and the node's CPU per event with it)."""
    limits = Limits() if fanin is None else Limits(compaction_fanin_min=fanin)
    deadline = time.monotonic() + timeout_s
    while True:
        manifest = read_manifest(node.data_dir / "checkpoints")
        parts = [] if manifest is None else list(manifest.parts)
        due = pick_run(parts, limits.compaction_fanin_min, limits.compaction_events_max)
        if due is None or time.monotonic() > deadline:
            return [part.events for part in parts]
        time.sleep(1.0)


def catch_up(root: Path, n: int, fanin: int | None = None) -> dict[str, Any]:
    """One subscriber from lsn 0 through ``n`` events, read twice: by the raw reader (what
    the node can send) and by ``walship.Client.subscribe`` (what an application gets). The
    CPU each side spent per event says which side limits."""
    node = start_node(root, "catchup", fanin)
    try:
        rate = load(node.url, n)
        last = last_lsn(node.url)
        print(f"  loaded {n:,} events ({rate:,.0f} events/s)", flush=True)
        time.sleep(2.0)  # let the last checkpoint and merges settle: they would take the cores
        parts = settled_parts(node, fanin)
        print(f"  parts (events): {parts}", flush=True)
        count, elapsed, reader_cpu, node_cpu = _timed_reader(node, catch_up_child, last)
        if count != n:
            raise RuntimeError(f"catch-up read {count} events of {n}")
        print(f"  raw reader: {n / elapsed:,.0f} events/s", flush=True)
        c_count, c_elapsed, c_reader_cpu, c_node_cpu = _timed_reader(
            node, client_catch_up_child, last
        )
        if c_count != n:
            raise RuntimeError(f"Client.subscribe read {c_count} events of {n}")
        print(f"  Client.subscribe: {n / c_elapsed:,.0f} events/s", flush=True)
    finally:
        node.stop()
    return {"catchup_events": n, "catchup_parts_events": parts,
            "catchup_seconds": round(elapsed, 3),
            "catchup_events_per_s": round(n / elapsed),
            "catchup_node_cpu_us_per_event": round(node_cpu * 1e6 / n, 2),
            "catchup_reader_cpu_us_per_event": round(reader_cpu * 1e6 / n, 2),
            "catchup_client_events_per_s": round(n / c_elapsed),
            "catchup_client_node_cpu_us_per_event": round(c_node_cpu * 1e6 / n, 2),
            "catchup_client_cpu_us_per_event": round(c_reader_cpu * 1e6 / n, 2)}  # fmt: skip


def live_latency(root: Path, rate: float, seconds: float) -> dict[str, Any]:
    node = start_node(root, "latency")
    ctx = multiprocessing.get_context("fork")
    try:
        load(node.url, 1_000)
        start = last_lsn(node.url) + 1
        last_recv, last_send = ctx.Pipe(duplex=False)
        out_recv, out_send = ctx.Pipe(duplex=False)
        ready = ctx.Event()
        child = ctx.Process(target=live_child, args=(node.url, start, last_recv, ready, out_send))
        child.start()
        if not ready.wait(30):
            raise RuntimeError("the subscriber did not start")
        per_batch = 50
        interval = per_batch / rate
        answered: dict[int, float] = {}
        client = RawHttp(node.url)
        try:
            t_end = time.monotonic() + seconds
            next_at = time.monotonic()
            i = 0
            while time.monotonic() < t_end:
                body = msgspec.json.encode(
                    {"events": [event(10**6 + i * per_batch + k) for k in range(per_batch)]}
                )
                status, answer = client.post("/api/v1/events/batch", body)
                now = time.monotonic()
                if status != 200:
                    raise RuntimeError(f"{status} {answer[:200]!r}")
                for receipt in msgspec.json.decode(answer)["receipts"]:
                    answered[receipt["lsn"]] = now
                i += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        finally:
            client.close()
        last_send.send(max(answered))
        arrived: dict[int, float] = out_recv.recv()
        child.join()
    finally:
        node.stop()
    lat = [(arrived[lsn] - at) * 1000 for lsn, at in answered.items() if lsn in arrived]
    if len(lat) != len(answered):
        raise RuntimeError(f"{len(answered) - len(lat)} events never reached the subscriber")
    span = max(answered) - min(answered) + 1
    return {
        "live_rate_events_per_s": round(rate),
        "live_events": len(lat),
        "live_events_written_span": span,
        # negative: the event reached the subscriber before the writer had read its answer
        "live_latency_p50_ms": round(percentile(lat, 50), 3),
        "live_latency_p99_ms": round(percentile(lat, 99), 3),
        "live_latency_max_ms": round(max(lat), 3),
    }


def _subscribers(url: str, count: int, query: str, per_child: int = 50) -> tuple[list[Any], Any]:
    """Start ``count`` subscriptions in child processes; (children, their pipes)."""
    ctx = multiprocessing.get_context("fork")
    kids = []
    for first in range(0, count, per_child):
        n = min(per_child, count - first)
        done_recv, done_send = ctx.Pipe(duplex=False)
        out_recv, out_send = ctx.Pipe(duplex=False)
        ready = ctx.Event()
        proc = ctx.Process(target=many_child, args=(url, n, query, ready, done_recv, out_send))
        proc.start()
        kids.append((proc, ready, done_send, out_recv))
    for _, ready, _, _ in kids:
        if not ready.wait(120):
            raise RuntimeError("subscribers did not start")
    return kids, ctx


def _finish(kids: list[Any], last: int) -> list[int]:
    got: list[int] = []
    for _, _, done_send, _ in kids:
        done_send.send(last)
    for proc, _, _, out_recv in kids:
        got += out_recv.recv()
        proc.join()
    return got


def ingest_ratio(root: Path, n: int, live: int) -> dict[str, Any]:
    node = start_node(root, "ingest")
    try:
        load(node.url, 1_000)  # warm up
        alone, alone_cpu, alone_sys = timed_load(node, n, 10**7)
        print(f"  no subscribers: {alone:,.0f} events/s, node CPU {alone_cpu:.1f} µs an event "
              f"({alone_sys:.1f} system)", flush=True)  # fmt: skip
        start = last_lsn(node.url) + 1
        kids, _ = _subscribers(node.url, live, f"from_lsn={start}", per_child=25)
        watched, watched_cpu, watched_sys = timed_load(node, n, 2 * 10**7)
        last = last_lsn(node.url)
        # subscribers that fell behind the live tail read the store on their own (main has
        # no such figure: -1)
        fell_behind = (
            httpx.get(f"{node.url}/api/v1/stats").json().get("subscriptions_fell_behind", -1)
        )
        got = _finish(kids, last)
        print(f"  {live} live subscribers: {watched:,.0f} events/s, node CPU {watched_cpu:.1f} "
              f"µs an event ({watched_sys:.1f} system); {fell_behind} times a subscriber fell "
              "behind the live tail", flush=True)  # fmt: skip
    finally:
        node.stop()
    if got != [n] * live:
        raise RuntimeError(f"live subscribers read {sorted(set(got))} events, not {n}")
    return {"ingest_events": n, "ingest_no_subscribers_events_per_s": round(alone),
            "ingest_live_subscribers": live, "ingest_live_events_per_s": round(watched),
            "ingest_ratio_100_live": round(watched / alone, 3),
            "node_cpu_us_per_event_no_subscribers": round(alone_cpu, 1),
            "node_system_cpu_us_per_event_no_subscribers": round(alone_sys, 1),
            "node_cpu_us_per_event_live_subscribers": round(watched_cpu, 1),
            "node_system_cpu_us_per_event_live_subscribers": round(watched_sys, 1),
            "ingest_live_fell_behind_tail": fell_behind}  # fmt: skip


def idle_rss(root: Path, idle: int) -> dict[str, Any]:
    node = start_node(root, "idle")
    try:
        load(node.url, 1_000)  # warm up
        alone, alone_cpu, _ = timed_load(node, 10_000, 4 * 10**7)
        before = rss_mb(node)
        kids, _ = _subscribers(node.url, idle, "tenant_id=quiet", per_child=250)
        deadline = time.monotonic() + 60
        while httpx.get(f"{node.url}/api/v1/stats").json()["subscriptions"] < idle:
            if time.monotonic() > deadline:
                raise RuntimeError("the idle subscriptions did not all open")
            time.sleep(0.1)
        time.sleep(1.0)
        with_idle = rss_mb(node)
        # every commit wakes them all
        with_idle_rate, with_idle_cpu, _ = timed_load(node, 10_000, 3 * 10**7)
        _finish(kids, 0)
    finally:
        node.stop()
    return {"idle_subscribers": idle, "rss_before_idle_mb": round(before, 1),
            "rss_idle_subscribers_mb": round(with_idle, 1),
            "rss_per_idle_subscriber_kb": round((with_idle - before) * 1024 / max(idle, 1), 1),
            "ingest_before_idle_events_per_s": round(alone),
            "ingest_with_idle_events_per_s": round(with_idle_rate),
            "ingest_ratio_idle": round(with_idle_rate / alone, 3),
            "node_cpu_us_per_event_before_idle": round(alone_cpu, 1),
            "node_cpu_us_per_event_with_idle": round(with_idle_cpu, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000, help="catch-up size")
    ap.add_argument("--ingest-events", type=int, default=200_000)
    ap.add_argument("--live-rate", type=float, default=10_000.0, help="events/s")
    ap.add_argument("--live-seconds", type=float, default=15.0)
    ap.add_argument("--live-subscribers", type=int, default=100)
    ap.add_argument("--idle-subscribers", type=int, default=1_000)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    ap.add_argument("--catch-up-only", action="store_true", help="only (a), the catch-up")
    ap.add_argument("--only", action="append", choices=list(PARTS),
                    help="run only this part (repeatable); results are not saved")  # fmt: skip
    ap.add_argument("--compaction-fanin-min", type=int, default=None,
                    help="the catch-up node's merge fan-in (e.g. 4: merged parts of >100,000 "
                    "events from 300,000 on, as the default makes from ~460,000)")  # fmt: skip
    # scripts/bench passes its arguments to every benchmark: --tiny is --quick here, and the
    # peer and the part worker are replication.py's and ingest.py's
    ap.add_argument("--tiny", action="store_true", help="the same as --quick")
    ap.add_argument("--peer", choices=["postgres", "none"], help="(replication.py only)")
    ap.add_argument("--no-part-worker", action="store_true", help="(ingest/replication only)")
    ap.add_argument("--physical-followers", action="store_true", help="(replication only)")
    args = ap.parse_args()
    args.quick = args.quick or args.tiny
    if args.quick:
        args.events, args.ingest_events, args.live_seconds = 20_000, 10_000, 2.0
        args.live_subscribers, args.idle_subscribers = 10, 100
    parts = set(args.only or (["catchup"] if args.catch_up_only else PARTS))
    raise_fd_limit()
    results: dict[str, Any] = {"targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="walship-sub-bench-") as tmp:
        root = Path(tmp)
        if "catchup" in parts:
            print("catch-up ...", flush=True)
            results.update(catch_up(root, args.events, args.compaction_fanin_min))
            print(f"  {results['catchup_events_per_s']:,} events/s", flush=True)
        if "live" in parts:
            print("live latency ...", flush=True)
            results.update(live_latency(root, args.live_rate, args.live_seconds))
            print(f"  p50 {results['live_latency_p50_ms']} ms, "
                  f"p99 {results['live_latency_p99_ms']} ms", flush=True)  # fmt: skip
        if "ingest" in parts:
            print("ingest with live subscribers ...", flush=True)
            results.update(ingest_ratio(root, args.ingest_events, args.live_subscribers))
        if "idle" in parts:
            print("idle subscribers ...", flush=True)
            results.update(idle_rss(root, args.idle_subscribers))
    print(json.dumps(results, indent=2))
    if parts == set(PARTS):  # a partial run would overwrite the figures it did not measure
        print(f"written to {save('subscriptions', results)}")


if __name__ == "__main__":
    main()
