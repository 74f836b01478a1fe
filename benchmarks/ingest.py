"""Single-node ingest and query benchmark (issue 2).

Measures, with ``fsync always`` and ~1 KB events:
  (a) in-process batch append (batches of 1,000, a few in flight)
  (b) HTTP batches of 1,000 events (4 concurrent connections)
  (c) HTTP single events from 64 concurrent clients (wrk)
  (d) query by entity with 1,000,000 events stored: p50/p99
  (e) peak RSS of a process ingesting 1,000,000 events

Run: ``python benchmarks/ingest.py [--events N] [--quick]``. Results go to
``benchmarks/results/ingest.json``; ``benchmarks/report.py`` renders the table of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).parent))
from common import event, percentile, save, server, wrk_single

TARGETS = {
    "inprocess_batch_events_per_s": 150_000,
    "http_batch_events_per_s": 60_000,
    "http_single_events_per_s": 7_000,
    "query_entity_p50_ms": 10.0,
    "peak_rss_mb": 500,
}


def in_process(n: int, data_dir: Path) -> dict[str, Any]:
    """Embedded Store, batches of 1,000 submitted with up to 4 in flight; fsync always."""
    from walship.events import EventIn
    from walship.runtime import tune_allocator
    from walship.store import Store, StoreConfig

    tune_allocator()  # as `walship serve` does
    store = Store.open(StoreConfig(data_dir))
    # a pool of decoded batches, reused: the store assigns every event a new id and lsn, and
    # the load generator's own memory stays out of the RSS figure
    pool = [
        [
            msgspec.json.decode(msgspec.json.encode(event(b * 1000 + i)), type=EventIn)
            for i in range(1000)
        ]
        for b in range(16)
    ]
    t0 = time.perf_counter()
    inflight = []
    for b in range(n // 1000):
        inflight.append(store.submit(pool[b % len(pool)], json_checked=True))  # decoded above
        if len(inflight) >= 4:
            p = inflight.pop(0)
            assert p.done is not None
            p.done.result()
    for p in inflight:
        assert p.done is not None
        p.done.result()
    elapsed = time.perf_counter() - t0
    # steady state: let background compaction finish merging the checkpointed parts
    deadline = time.monotonic() + 120
    while store.compact() is not None and time.monotonic() < deadline:
        pass
    # query by entity over everything stored (Parquet parts + memtable)
    from walship.storage.query import QueryFilter

    times = []
    for i in range(300):
        q0 = time.perf_counter()
        res = store.query(QueryFilter(entity_id=f"account-{(i * 37) % 10_000}"), limit=100)
        times.append((time.perf_counter() - q0) * 1000)
        assert res.events
    stats = store.stats()
    store.close()
    return {
        "events": n,
        "seconds": round(elapsed, 3),
        "inprocess_batch_events_per_s": round(n / elapsed),
        "query_entity_p50_ms": round(percentile(times, 50), 3),
        "query_entity_p99_ms": round(percentile(times, 99), 3),
        "stored_events": stats["events"],
        "parquet_parts": stats["parquet_parts"],
        # each event written to Parquet by its checkpoint and again by each merge (issue 15)
        "write_amplification": stats["write_amplification"],
        "compaction_rewrites_per_event": stats["compaction_rewrites_per_event"],
    }


def peak_rss(n: int, data_dir: Path) -> dict[str, Any]:
    """Ingest ``n`` events in a fresh process and report its peak RSS."""
    code = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from ingest import in_process
from pathlib import Path
r = in_process({n}, Path({str(data_dir)!r}))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"peak_rss_mb": round(int(out.stdout.strip().splitlines()[-1]) / 1024, 1)}


async def _http_batches(url: str, n: int, concurrency: int = 4) -> float:
    bodies = [
        msgspec.json.encode({"events": [event(b * 1000 + i) for i in range(1000)]})
        for b in range(n // 1000)
    ]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while not queue.empty():
                body = queue.get_nowait()
                r = await client.post(
                    "/api/v1/events/batch",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


def http_batch(n: int, data_dir: Path) -> dict[str, Any]:
    with server(data_dir) as url:
        elapsed = asyncio.run(_http_batches(url, n))
    return {"http_batch_events": n, "http_batch_events_per_s": round(n / elapsed)}


def http_single(data_dir: Path, seconds: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        return {"http_single_error": "wrk not installed (apt-get install wrk)"}
    with server(data_dir) as url:
        found = wrk_single(url, seconds)
    return {f"http_single_{k}": v for k, v in found.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--http-events", type=int, default=300_000)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--tiny", action="store_true", help="seconds of load: proves it runs")
    # scripts/bench passes its arguments to both benchmarks: the peer is replication.py's
    ap.add_argument("--peer", choices=["postgres", "none"], help="(replication.py only)")
    ap.add_argument("--no-part-worker", action="store_true",
                    help="nodes write Parquet parts themselves, not in workers")  # fmt: skip
    ap.add_argument("--physical-followers", action="store_true", help="(replication.py only)")
    args = ap.parse_args()
    if args.no_part_worker:
        os.environ["WALSHIP_PART_WORKER"] = "0"  # inherited by `walship serve` below
    if args.quick:
        args.events, args.http_events, args.seconds = 50_000, 20_000, 3
    if args.tiny:
        args.events, args.http_events, args.seconds = 10_000, 2_000, 1  # 10,000 entities
    results: dict[str, Any] = {"targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="walship-bench-") as tmp:
        root = Path(tmp)
        print("in-process batch ingest + query ...", flush=True)
        results.update(in_process(args.events, root / "a"))
        print("peak RSS ...", flush=True)
        results.update(peak_rss(args.events, root / "rss"))
        print("HTTP batches ...", flush=True)
        results.update(http_batch(args.http_events, root / "b"))
        print("HTTP single events (64 clients, wrk) ...", flush=True)
        results.update(http_single(root / "c", args.seconds))
    path = save("ingest", results)
    print(json.dumps(results, indent=2))
    print(f"written to {path}")
    _ = resource


if __name__ == "__main__":
    main()
