"""Replication benchmark (issue 3): a leader and two followers on loopback, fsync always.

Measures:
  (a) batch ingest (HTTP, batches of 1,000) per ack mode, and the same without followers
  (b) replication lag p50/p99 (the leader's ``lag_ms`` per follower, sampled every 10 ms)
      under steady load at half the async rate
  (c) catch-up of an empty follower through the WAL (records/s) and through a snapshot (MB/s),
      started once the leader has finished checkpointing and compacting what it ingested
  (d) single-write latency p50/p99 per ack mode (one client, sequential, on a raw socket:
      httpx would add ~0.5 ms of its own to each request), and single writes from 64 wrk
      clients per ack mode (events/s)
  (e) with ``--peer postgres`` (the default): the same figures from PostgreSQL, a primary and
      two streaming standbys (``pg_peer.py``), and the ratio walship / PostgreSQL per figure
      against the issue-15 targets (``PEER_TARGETS``)

All three nodes share the machine's two cores, so (a) is the whole machine's work per event.
Run: ``python benchmarks/replication.py [--quick | --tiny] [--peer none]``; results in
results/replication.json. ``--tiny`` only proves that everything runs (seconds of load, no
meaningful figure); real figures need the default sizes on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).parent))
import pg_peer
from common import RawHttp, event, percentile, save, wrk_single
from walship.testing.process import NodeProcess

TARGETS = {
    "sync_batch_events_per_s": 42_000,
    "lag_p99_ms": 10.0,
    "catchup_wal_records_per_s": 100_000,
    "catchup_snapshot_mb_per_s": 200.0,
    "semi_sync_single_p50_ms": 0.75,
}
MODES = ["async", "semi-sync", "quorum:2", "sync"]
# issue 15: walship / PostgreSQL, each from this run. (label, walship key, PostgreSQL key,
# op, target ratio, unit); for times the ratio must stay at or under the target.
PEER_TARGETS = [
    ("batch ingest, no replicas", "none_batch_events_per_s", "pg_none_batch_events_per_s",
     ">=", None, "events/s"),
    ("batch ingest, async (2 replicas)", "async_batch_events_per_s",
     "pg_async_batch_events_per_s", ">=", 1.5, "events/s"),
    ("batch ingest, semi-sync / ANY 1", "semi-sync_batch_events_per_s",
     "pg_semi_sync_batch_events_per_s", ">=", None, "events/s"),
    ("batch ingest, sync / ANY 2", "sync_batch_events_per_s", "pg_sync_batch_events_per_s",
     ">=", 1.5, "events/s"),
    ("single writes, 64 clients, semi-sync / ANY 1", "semi_sync_single64_events_per_s",
     "pg_semi_sync_single64_events_per_s", ">=", 1.5, "events/s"),
    ("single write p50, semi-sync / ANY 1", "semi_sync_single_p50_ms",
     "pg_semi_sync_single_p50_ms", "<=", 1.0, "ms"),
    ("single write p50, sync / ANY 2", "sync_single_p50_ms", "pg_sync_single_p50_ms",
     "<=", None, "ms"),
    ("replication lag p99 at half load (walship async; PG ANY 2 flush_lag)", "lag_p99_ms",
     "pg_lag_p99_ms", "<=", 1.0, "ms"),
    ("catch-up of a stopped replica through the log", "catchup_wal_records_per_s",
     "pg_catchup_wal_records_per_s", ">=", 2.0, "events/s"),
    ("catch-up of an empty replica from a base copy", "catchup_snapshot_records_per_s",
     "pg_base_copy_records_per_s", ">=", None, "events/s"),
]  # fmt: skip

JSON_HEADERS = {"content-type": "application/json"}


class Cluster:
    """A leader and N followers as real processes under ``root``."""

    def __init__(self, root: Path, mode: str, followers: int = 2, *extra: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.secret = root / "secret"
        self.secret.write_text(secrets.token_hex(16))
        os.chmod(self.secret, 0o600)
        self.stack = ExitStack()
        try:
            self._start(root, mode, followers, extra)
        except BaseException:
            self.stack.close()  # a node that did start must not outlive a failed start
            raise

    def _start(self, root: Path, mode: str, followers: int, extra: tuple[str, ...]) -> None:
        self.leader = NodeProcess(
            root / "leader",
            node_id="leader",
            extra_args=[
                "--replication-port", "0", "--replication-secret-file", str(self.secret),
                "--ack-mode", mode, "--log-level", "warning", *extra,
            ],
        )  # fmt: skip
        self.stack.enter_context(self.leader)
        self.leader.start()
        self.replication = self.leader.start_line.split("replication=")[1].split()[0]
        self.followers = [self.add_follower(f"follower-{i + 1}") for i in range(followers)]

    def add_follower(self, name: str, start: bool = True) -> NodeProcess:
        node = NodeProcess(
            self.root / name,
            node_id=name,
            extra_args=[
                "--role", "follower", "--leader", self.replication,
                "--replication-secret-file", str(self.secret), "--log-level", "warning",
            ],
        )  # fmt: skip
        self.stack.enter_context(node)
        if start:
            node.start()
        return node

    def wait_in_sync(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            health = httpx.get(self.leader.url + "/health").json()
            if health["replication"]["in_sync_count"] >= count:
                return
            time.sleep(0.05)
        raise RuntimeError("followers did not get in sync")

    def close(self) -> None:
        self.stack.close()


def batches(n: int, offset: int = 0) -> list[bytes]:
    return [
        msgspec.json.encode({"events": [event(offset + b * 1000 + i) for i in range(1000)]})
        for b in range(n // 1000)
    ]


async def post_batches(url: str, bodies: list[bytes], concurrency: int = 4) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while not queue.empty():
                r = await client.post(
                    "/api/v1/events/batch",
                    content=queue.get_nowait(),
                    headers={"content-type": "application/json"},
                )
                r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


def throughput(root: Path, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ["none", *MODES]:
        cluster = Cluster(root / f"tp-{mode.replace(':', '')}", "async" if mode == "none" else mode,
                          0 if mode == "none" else 2)  # fmt: skip
        try:
            if mode != "none":
                cluster.wait_in_sync(2)
            elapsed = asyncio.run(post_batches(cluster.leader.url, batches(n)))
            out[f"{mode}_batch_events_per_s"] = round(n / elapsed)
            # Parquet writes per event on each node (checkpoints + merges) after this ingest
            for node in [cluster.leader, *cluster.followers]:
                stats = httpx.get(node.url + "/api/v1/stats").json()
                key = f"{mode}_{node.node_id.replace('-', '_')}_write_amplification"
                out[key] = stats.get("write_amplification")
        finally:
            cluster.close()
        print(f"  {mode}: {out[f'{mode}_batch_events_per_s']} events/s", flush=True)
    base = out["none_batch_events_per_s"]
    for mode in MODES:
        out[f"{mode}_ratio_to_no_followers"] = round(out[f"{mode}_batch_events_per_s"] / base, 3)
    out["sync_batch_events_per_s"] = out["sync_batch_events_per_s"]
    return out


def lag(root: Path, rate: float, seconds: float) -> dict[str, Any]:
    """Pace batches of 100 at ``rate`` events/s; sample the leader's per-follower lag_ms."""
    cluster = Cluster(root / "lag", "async")
    samples: list[float] = []
    stop = threading.Event()

    def sampler() -> None:
        with httpx.Client(base_url=cluster.leader.url, timeout=5) as client:
            while not stop.is_set():
                for f in client.get("/health").json()["replication"]["followers"]:
                    samples.append(float(f["lag_ms"]))
                time.sleep(0.01)

    try:
        cluster.wait_in_sync(2)
        thread = threading.Thread(target=sampler)
        thread.start()
        body_events = 100
        interval = body_events / rate
        with httpx.Client(base_url=cluster.leader.url, timeout=30) as client:
            t_end = time.monotonic() + seconds
            next_at = time.monotonic()
            i = 0
            while time.monotonic() < t_end:
                body = msgspec.json.encode(
                    {"events": [event(i * body_events + k) for k in range(body_events)]}
                )
                client.post(
                    "/api/v1/events/batch", content=body, headers=JSON_HEADERS
                ).raise_for_status()
                i += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        stop.set()
        thread.join()
    finally:
        stop.set()
        cluster.close()
    return {
        "lag_rate_events_per_s": round(rate),
        "lag_samples": len(samples),
        "lag_p50_ms": round(percentile(samples, 50), 3),
        "lag_p99_ms": round(percentile(samples, 99), 3),
    }


def _time_catch_up(leader: NodeProcess, node: NodeProcess, last: int) -> tuple[float, float]:
    """Start ``node`` and wait until it has applied ``last``: (seconds from the moment the
    leader sees it connect, seconds from process start). The first is the catch-up itself;
    the second adds the ~1 s a Python process takes to import and open its store."""
    t0 = time.perf_counter()
    node.spawn()
    connected = None
    with httpx.Client(timeout=5) as client:
        while connected is None:
            followers = client.get(leader.url + "/health").json()["replication"]["followers"]
            if any(f["node_id"] == node.node_id for f in followers):
                connected = time.perf_counter()
            else:
                time.sleep(0.005)
        node.wait_ready()
        while client.get(node.url + "/health").json()["replication"]["applied_lsn"] < last:
            time.sleep(0.01)
    done = time.perf_counter()
    return done - connected, done - t0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_settled(node: NodeProcess, timeout_s: float = 180) -> tuple[dict[str, Any], float]:
    """Wait until ``node`` is idle after an ingest: under 5 % of a CPU over each of two
    consecutive seconds, i.e. no checkpoint or compaction still running. Returns its stats and
    the seconds waited. A follower that starts while the leader still merges parts shares the
    two cores with that merge, which made the catch-up figures depend on when the previous step
    happened to end (snapshot: 153 to 243 MB/s in three runs of one build); a merge can run
    for several seconds without any counter in the stats moving, hence the CPU clock."""
    assert node.process is not None
    pid = node.process.pid
    t0 = time.monotonic()
    quiet = 0
    while quiet < 2 and time.monotonic() - t0 < timeout_s:
        before = _cpu_seconds(pid)
        time.sleep(1.0)
        quiet = quiet + 1 if _cpu_seconds(pid) - before < 0.05 else 0
    stats: dict[str, Any] = httpx.get(node.url + "/api/v1/stats").json()
    return stats, round(time.monotonic() - t0, 1)


def catch_up(root: Path, n: int) -> dict[str, Any]:
    """An empty follower catching up n events through the WAL, and another through a snapshot."""
    out: dict[str, Any] = {}
    # WAL: a follower that connected once holds a retention slot from lsn 0, so the WAL stays
    cluster = Cluster(root / "catchup-wal", "async", 0, "--wal-retention-bytes-max", str(8 << 30))
    try:
        follower = cluster.add_follower("wal-follower")
        cluster.wait_in_sync(1)
        follower.stop()
        asyncio.run(post_batches(cluster.leader.url, batches(n)))
        stats, out["catchup_wal_leader_settle_s"] = wait_settled(cluster.leader)
        last = stats["last_lsn"]
        elapsed, with_start = _time_catch_up(cluster.leader, follower, last)
        out["catchup_wal_seconds"] = round(elapsed, 3)
        out["catchup_wal_seconds_with_start"] = round(with_start, 3)
        out["catchup_wal_records_per_s"] = round(last / elapsed)
    finally:
        cluster.close()
    # snapshot: checkpoints remove the early WAL; a new follower needs the Parquet snapshot
    cluster = Cluster(
        root / "catchup-snap", "async", 0,
        "--segment-bytes-max", str(16 << 20), "--checkpoint-interval-ms", "1000",
    )  # fmt: skip
    try:
        asyncio.run(post_batches(cluster.leader.url, batches(n)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = httpx.get(cluster.leader.url + "/api/v1/stats").json()
            if stats["checkpoint_lsn"] >= stats["last_lsn"] - 1000 and stats["wal_first_lsn"] > 1:
                break
            time.sleep(0.2)
        stats, out["catchup_snapshot_leader_settle_s"] = wait_settled(cluster.leader)
        last = stats["last_lsn"]
        follower = cluster.add_follower("snapshot-follower", start=False)
        elapsed, with_start = _time_catch_up(cluster.leader, follower, last)
        fstats = httpx.get(follower.url + "/api/v1/stats").json()
        health = httpx.get(follower.url + "/health").json()["replication"]
        mb = fstats["parquet_bytes"] / 1e6
        out["catchup_snapshot_seconds"] = round(elapsed, 3)
        out["catchup_snapshot_seconds_with_start"] = round(with_start, 3)
        out["catchup_snapshot_records_per_s"] = round(last / elapsed)
        out["catchup_snapshot_parquet_mb"] = round(mb, 1)
        out["catchup_snapshot_mb_per_s"] = round(mb / elapsed, 1)
        out["catchup_snapshot_received"] = health["snapshots_received"]
        out["catchup_snapshot_wal_records_after"] = last - fstats["checkpoint_lsn"]
    finally:
        cluster.close()
    return out


def latency(root: Path, count: int, seconds: float) -> dict[str, Any]:
    """Per ack mode: one client's write latency, then 64 wrk clients' events/s."""
    out: dict[str, Any] = {}
    for mode in MODES:
        cluster = Cluster(root / f"lat-{mode.replace(':', '')}", mode)
        try:
            cluster.wait_in_sync(2)
            times: list[float] = []
            body = msgspec.json.encode(event(1))
            client = RawHttp(cluster.leader.url)
            try:
                for _ in range(count):
                    t0 = time.perf_counter()
                    status, answer = client.post("/api/v1/events", body)
                    times.append((time.perf_counter() - t0) * 1000)
                    if status != 200:
                        raise RuntimeError(f"{mode}: {status} {answer[:200]!r}")
            finally:
                client.close()
            key = mode.replace("-", "_").replace(":", "")
            out[f"{key}_single_p50_ms"] = round(percentile(times, 50), 3)
            out[f"{key}_single_p99_ms"] = round(percentile(times, 99), 3)
            many = wrk_single(cluster.leader.url, seconds)
            for k in ("events_per_s", "p50_ms", "p99_ms", "errors"):
                out[f"{key}_single64_{k}"] = many[k]
            print(f"  {mode}: p50 {out[f'{key}_single_p50_ms']} ms, 64 clients "
                  f"{many['events_per_s']} events/s", flush=True)  # fmt: skip
        finally:
            cluster.close()
    return out


def peer_ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """docs/benchmarks.md's walship-vs-PostgreSQL rows: both figures, their ratio, the target."""
    rows = []
    for label, key, pg_key, op, target, unit in PEER_TARGETS:
        ours, theirs = results.get(key), results.get(pg_key)
        ratio = round(ours / theirs, 3) if ours is not None and theirs else None
        met = None
        if ratio is not None and target is not None:
            met = ratio >= target if op == ">=" else ratio <= target
        rows.append({"figure": label, "walship": ours, "postgres": theirs, "ratio": ratio,
                     "op": op, "target_ratio": target, "unit": unit, "met": met})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--catchup-events", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--tiny", action="store_true", help="seconds of load: proves it runs")
    ap.add_argument("--peer", choices=["postgres", "none"], default="postgres",
                    help="also measure PostgreSQL streaming replication (pg_peer.py)")  # fmt: skip
    ap.add_argument("--no-part-worker", action="store_true",
                    help="nodes write Parquet parts themselves, not in workers")  # fmt: skip
    ap.add_argument("--physical-followers", action="store_true",
                    help="followers install the leader's parts (default off)")  # fmt: skip
    args = ap.parse_args()
    if args.no_part_worker:
        os.environ["WALSHIP_PART_WORKER"] = "0"  # inherited by every node started below
    if args.physical_followers:
        os.environ["WALSHIP_PHYSICAL_FOLLOWERS"] = "1"  # likewise
    lag_s, latency_count, single_s = 15.0, 2000, 10.0
    if args.quick:
        args.events, args.catchup_events = 20_000, 50_000
        lag_s, latency_count, single_s = 5.0, 300, 3.0
    if args.tiny:
        args.events, args.catchup_events = 2_000, 5_000
        lag_s, latency_count, single_s = 1.0, 50, 1.0
    if args.peer == "postgres":
        pg_peer.pg_bindir()  # fail before walship's part when PostgreSQL is missing
        pg_peer.PgCluster.check_driver()
    results: dict[str, Any] = {"targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="walship-repl-bench-") as tmp:
        root = Path(tmp)
        print("throughput per mode ...", flush=True)
        results.update(throughput(root, args.events))
        print("lag at half the async rate ...", flush=True)
        results.update(lag(root, results["async_batch_events_per_s"] / 2, lag_s))
        print("single-write latency ...", flush=True)
        results.update(latency(root, latency_count, single_s))
        print("catch-up ...", flush=True)
        results.update(catch_up(root, args.catchup_events))
    if args.peer == "postgres":
        print("PostgreSQL peer ...", flush=True)
        found = pg_peer.run(args.events, args.catchup_events, lag_seconds=lag_s,
                            latency_count=latency_count, single_seconds=single_s)  # fmt: skip
        results.update(found)
        results["peer"] = peer_ratios(results)
    results["part_worker"] = os.environ.get("WALSHIP_PART_WORKER", "1") not in ("0", "false")
    results["physical_followers"] = os.environ.get("WALSHIP_PHYSICAL_FOLLOWERS", "0") not in (
        "0",
        "false",
    )
    if args.tiny:
        results["note"] = "--tiny: proves the benchmark runs; the figures mean nothing"
    path = save("replication", results)
    print(json.dumps(results, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
