"""Sustained ingest (issue 15): 10,000,000 events in ``sync`` mode, a leader and two followers.

Starts the cluster of ``replication.py`` (real processes on loopback, fsync always, ack mode
``sync``), ingests ``--events`` ~1 KB events in HTTP batches of 1,000 from ``--connections``
keep-alive connections (the events are made as they are sent: 10 GB of bodies do not fit in
memory), and records:

  - the throughput of each window of ``--window`` events (default a tenth of the run: one
    million of 10,000,000) and the ratio last window / second window (target >= 0.9: the
    first holds the start-up, the last shows whether checkpoints, merges, indexes or memory
    slow the store down as it grows)
  - per node: write amplification (``/api/v1/stats``: events and bytes written by checkpoints
    and by merges), peak RSS (the kernel's ``VmHWM``, and ``VmRSS`` polled each second with
    the node's part-worker children), disk used at the end (WAL and Parquet), CPU per event
    per node and per thread (``/proc/PID/task/TID``; the nodes load ``threadnames/`` so each
    thread carries its Python name) over the ingest, and per window per node
  - that the followers end with the leader's log: the same last lsn, term and chain hash (the
    chain covers every record before it), byte-identical records over the lsns all three WALs
    still hold (checkpoints remove older segments), the same event and entity counts

Results in ``results/sustained.json`` (``report.py`` prints the table of docs/benchmarks.md).
The run stops by itself: the ingest ends at ``--time-limit`` seconds (the windows done so far
are reported and the results say so), every later wait is bounded, and a watchdog ends the
process ``--time-limit`` + 10 minutes after it started. The nodes and the data directory are
removed on every exit, Ctrl-C and SIGTERM included (``--keep`` keeps the data). Run:
``python benchmarks/sustained.py [--events N] [--dir PARENT]`` or ``scripts/bench
--sustained``; ``--tiny`` (100,000 events) and ``--quick`` (1,000,000) only prove it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).parent))
from common import event, save
from replication import Cluster, wait_settled
from walship.position import Lsn
from walship.testing.process import NodeProcess
from walship.wal.offline import iter_wal_records

TARGETS = {"last_to_second_window_ratio": 0.9}
THREAD_NAMES = Path(__file__).parent / "threadnames"  # sitecustomize for the nodes
CLK_TCK = os.sysconf("SC_CLK_TCK")
# disk a node needs per event, for the check before the run: ~1.1 KB of WAL until a checkpoint
# covers it (a few segments), ~0.26 KB of Parquet, merge inputs and outputs side by side
DISK_BYTES_PER_EVENT = 700
STATS_FIELDS = (
    "write_amplification", "compaction_rewrites_per_event", "checkpoint_events_written",
    "compaction_events_written", "checkpoint_bytes_written", "compaction_bytes_written",
    "parquet_parts", "parquet_bytes", "wal_bytes", "wal_segments", "memtable_events",
    "checkpoints_taken", "compactions",
)  # fmt: skip


class Interrupted(Exception):
    """SIGTERM (or the watchdog): unwind through every ``finally`` like Ctrl-C."""


# ------------------------------------------------------------------------------ /proc readers


def _stat_fields(path: str) -> list[str]:
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()


def _cpu_of(path: str) -> float:
    fields = _stat_fields(path)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (a node's part worker), from every thread's list."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    found.extend(int(x) for x in f.read().split())
            except OSError:
                continue
    except OSError:
        pass
    return found


@dataclass
class ProcWatch:
    """One process's CPU per thread and memory, sampled from ``/proc``.

    A thread's CPU is cumulative, so the last sample of each thread id is kept: a thread that
    exits keeps what it used. The process's own total also holds threads that exited between
    two samples, which ``threads_s`` cannot name (reported as ``exited``).
    """

    pid: int
    main_name: str = "main"
    with_children: bool = True  # a node's part worker; not the benchmark's own nodes
    threads: dict[int, tuple[str, float]] = field(default_factory=dict)  # tid -> (name, cpu s)
    children: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (comm, cpu)
    peak_rss_kb: int = 0
    peak_children_rss_kb: int = 0

    def sample(self) -> None:
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        for tid_s in tids:
            tid = int(tid_s)
            try:
                cpu = _cpu_of(f"/proc/{self.pid}/task/{tid}/stat")
                with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
            except (OSError, IndexError, ValueError):
                continue
            self.threads[tid] = (self.main_name if tid == self.pid else name, cpu)
        children_rss = 0
        for child in _children(self.pid) if self.with_children else []:
            try:
                cpu = _cpu_of(f"/proc/{child}/stat")
                with open(f"/proc/{child}/comm") as f:
                    comm = f.read().strip()
                children_rss += _status_kb(child, "VmRSS")
            except (OSError, IndexError, ValueError):
                continue
            self.children[child] = (comm, cpu)
        try:
            rss = _status_kb(self.pid, "VmRSS")
        except OSError:
            return
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_children_rss_kb = max(self.peak_children_rss_kb, children_rss)

    def total_s(self) -> float:
        """CPU of the process (every thread, living or not) and of its sampled children."""
        return self.own_s() + sum(cpu for _, cpu in self.children.values())

    def own_s(self) -> float:
        """CPU of the process alone (the serving one: without its part worker)."""
        try:
            return _cpu_of(f"/proc/{self.pid}/stat")
        except OSError:
            return sum(cpu for _, cpu in self.threads.values())

    def hwm_kb(self) -> int:
        try:
            return _status_kb(self.pid, "VmHWM")
        except OSError:
            return self.peak_rss_kb

    def snapshot(self) -> dict[str, Any]:
        return {
            "total": self.total_s(),
            "own": self.own_s(),
            "threads": dict(self.threads),
            "children": dict(self.children),
        }


def by_thread_us(before: dict[str, Any], after: dict[str, Any], events: int) -> dict[str, float]:
    """µs of CPU per event per thread name between two snapshots (threads of one name summed:
    the pools' ``asyncio_0``, ``asyncio_1``... stay apart, so the busiest one shows)."""
    used: dict[str, float] = {}
    for tid, (name, cpu) in after["threads"].items():
        start = before["threads"].get(tid, (name, 0.0))[1]
        used[name] = used.get(name, 0.0) + cpu - start
    for pid, (comm, cpu) in after["children"].items():
        start = before["children"].get(pid, (comm, 0.0))[1]
        key = f"child:{comm}"
        used[key] = used.get(key, 0.0) + cpu - start
    named = sum(used.values())
    used["exited"] = max(0.0, after["total"] - before["total"] - named)
    out = {k: round(v * 1e6 / events, 2) for k, v in used.items() if v * 1e6 / events >= 0.01}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (as ``du``: blocks, not apparent sizes)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


# --------------------------------------------------------------------------------- the run


@dataclass
class Progress:
    """Shared between the ingest (event loop) and the sampler thread."""

    window: int
    acked: int = 0
    boundaries: list[float] = field(default_factory=list)  # monotonic time of each window end
    stopped: str | None = None
    ended_window: threading.Event = field(default_factory=threading.Event)  # wakes the sampler
    # (window index, seconds) of each batch, from its POST to its answer: a stall of a node
    # (a GIL held by Parquet work, a pause) shows in the tail
    latencies: list[tuple[int, float]] = field(default_factory=list)


class Sampler(threading.Thread):
    """Every ``interval`` s: /proc of every node; at each window end also each node's stats
    and CPU, so the figures can be read per window."""

    def __init__(self, nodes: list[NodeProcess], progress: Progress, interval: float) -> None:
        super().__init__(name="sustained-sampler", daemon=True)
        self.nodes = nodes
        self.progress = progress
        self.interval = interval
        self.watch = {n.node_id: ProcWatch(n.process.pid) for n in nodes if n.process}
        self.me = ProcWatch(os.getpid(), with_children=False)
        self.windows: list[dict[str, Any]] = []
        self.start_row: dict[str, Any] = {}  # as window_row, when the ingest starts
        self.died: str | None = None
        self.stop = threading.Event()
        self._client = httpx.Client(timeout=10, verify=False)

    def run(self) -> None:
        while not self.stop.is_set():
            # a window's row is read as soon as it ends, not up to ``interval`` later
            self.progress.ended_window.wait(self.interval)
            self.progress.ended_window.clear()
            if not self.stop.is_set():
                self.tick()

    def close(self) -> None:
        self.stop.set()
        self.progress.ended_window.set()
        if self.is_alive():
            self.join(timeout=30)
        self._client.close()

    def tick(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None:
                self.died = f"{node.node_id} exited with {node.process.returncode}"
        for watch in self.watch.values():
            watch.sample()
        self.me.sample()
        while len(self.windows) < len(self.progress.boundaries):
            self.windows.append(self.window_row(len(self.windows)))

    def window_row(self, index: int) -> dict[str, Any]:
        """CPU, RSS and store figures of each node as window ``index`` ended (read now)."""
        row: dict[str, Any] = {"acked": self.progress.acked}
        for node in self.nodes:
            watch = self.watch[node.node_id]
            entry: dict[str, Any] = {"cpu_s": watch.total_s(), "own_cpu_s": watch.own_s()}
            try:
                entry["rss_mb"] = round(_status_kb(watch.pid, "VmRSS") / 1024, 1)
                stats = self._client.get(node.url + "/api/v1/stats").json()
                entry.update({k: stats.get(k) for k in STATS_FIELDS})
            except (OSError, httpx.HTTPError, ValueError):
                pass
            row[node.node_id] = entry
        return row


async def ingest(url: str, total: int, connections: int, batch: int, progress: Progress,
                 deadline: float, sampler: Sampler) -> float:  # fmt: skip
    """POST ``total`` events in batches of ``batch`` from ``connections`` connections; stops
    at ``deadline`` (monotonic) or when a node dies. Returns the seconds it took."""
    next_batch = 0
    batches = total // batch

    async def worker() -> None:
        nonlocal next_batch
        headers = {"content-type": "application/json"}
        limits = httpx.Limits(max_connections=1)
        # plain HTTP on loopback: verify=False spares each client loading the CA bundle
        # (~0.15 s of CPU here), which would land in the load generator's CPU per event
        async with httpx.AsyncClient(
            base_url=url, timeout=120, limits=limits, verify=False
        ) as client:
            while next_batch < batches and progress.stopped is None:
                if time.monotonic() > deadline:
                    progress.stopped = "time limit"
                    return
                if sampler.died:
                    progress.stopped = sampler.died
                    return
                b = next_batch
                next_batch += 1
                body = msgspec.json.encode({"events": [event(b * batch + i) for i in range(batch)]})
                sent = time.monotonic()
                try:
                    r = await client.post("/api/v1/events/batch", content=body, headers=headers)
                except httpx.HTTPError as exc:  # a timeout, a node gone: report what was done
                    progress.stopped = f"{type(exc).__name__}: {exc}"
                    return
                if r.status_code != 200:
                    progress.stopped = f"HTTP {r.status_code}: {r.text[:300]}"
                    return
                progress.acked += batch
                progress.latencies.append((len(progress.boundaries), time.monotonic() - sent))
                while progress.acked >= progress.window * (len(progress.boundaries) + 1):
                    progress.boundaries.append(time.monotonic())
                    progress.ended_window.set()

    t0 = time.monotonic()
    progress.boundaries.clear()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return time.monotonic() - t0


def compare_logs(leader: NodeProcess, followers: list[NodeProcess]) -> dict[str, Any]:
    """The followers' WALs against the leader's, on the stopped nodes (as ``assert_same_wal``
    in tests/cluster.py, but streamed: a long run's WAL may not fit in memory). Over the lsns
    every node still holds each record must be the same bytes; the last records (lsn, term,
    running chain hash) must be equal, which covers everything before them."""
    out: dict[str, Any] = {}
    ok = True
    firsts = {}
    for node in [leader, *followers]:
        first = next(iter_wal_records(node.data_dir / "wal"), None)
        firsts[node.node_id] = first[2].lsn if first else None
    start = max((f for f in firsts.values() if f is not None), default=1)
    mine = _last_record(leader, start)
    for node in followers:
        compared, last, problem = _compare_one(leader, node, start)
        same_end = last is not None and last == mine
        out[node.node_id] = {
            "wal_first_lsn": firsts[node.node_id],
            "records_compared": compared,
            "same_last_record": same_end,
            "problem": problem,
        }
        ok = ok and problem is None and same_end and compared > 0
    end = mine
    out["leader"] = {
        "wal_first_lsn": firsts[leader.node_id],
        "last_lsn": end[0] if end else None,
        "last_term": end[1] if end else None,
        "last_chain": end[2].hex() if end else None,
    }
    out["identical"] = ok
    return out


def _last_record(node: NodeProcess, start: int) -> tuple[int, int, bytes] | None:
    last = None
    for _path, _off, rec in iter_wal_records(node.data_dir / "wal", Lsn(start)):
        last = (rec.lsn, rec.term, rec.chain)
    return last


def _compare_one(leader: NodeProcess, follower: NodeProcess, start: int) -> tuple[int, Any, Any]:
    mine = iter_wal_records(leader.data_dir / "wal", Lsn(start))
    theirs = iter_wal_records(follower.data_dir / "wal", Lsn(start))
    compared = 0
    last = None
    expected = start
    while True:
        # not zip(): it would drop the leader's next record when the follower's log ends first
        x, y = next(mine, None), next(theirs, None)
        if x is None and y is None:
            return compared, last, None
        if x is None or y is None:
            name, extra = ("follower", y) if x is None else ("leader", x)
            return compared, last, f"the {name}'s WAL goes on at lsn {extra[2].lsn}"
        a, b = x[2], y[2]
        if a.lsn != expected or b.lsn != expected:
            return compared, last, f"gap: lsn {expected} expected, leader {a.lsn}, follower {b.lsn}"
        if (a.term, a.chain) != (b.term, b.chain) or a.raw != b.raw:
            return compared, last, f"record {a.lsn} differs"
        compared += 1
        expected += 1
        last = (a.lsn, a.term, a.chain)


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + args.time_limit
    window = args.window or max(args.events // 10, args.batch)
    progress = Progress(window)
    results: dict[str, Any] = {
        "targets": TARGETS,
        "events_requested": args.events,
        "window_events": window,
        "connections": args.connections,
        "batch_events": args.batch,
        "ack_mode": "sync",
        "followers": 2,
        "part_worker": os.environ.get("WALSHIP_PART_WORKER", "1") not in ("0", "false"),
        "physical_followers": os.environ.get("WALSHIP_PHYSICAL_FOLLOWERS", "0")
        not in ("0", "false"),
    }
    cluster = Cluster(root, "sync", 2)
    sampler: Sampler | None = None
    try:
        cluster.wait_in_sync(2, timeout_s=60)
        nodes = [cluster.leader, *cluster.followers]
        sampler = Sampler(nodes, progress, args.sample_s)
        sampler.tick()
        sampler.start_row = {
            "acked": 0,
            **{
                n.node_id: {
                    "cpu_s": sampler.watch[n.node_id].total_s(),
                    "own_cpu_s": sampler.watch[n.node_id].own_s(),
                }
                for n in nodes
            },
        }
        before = {n.node_id: sampler.watch[n.node_id].snapshot() for n in nodes}
        me_before = sampler.me.snapshot()
        sampler.start()
        print(f"ingesting {args.events:,} events in sync mode (windows of {window:,}) ...",
              flush=True)  # fmt: skip
        t0 = time.monotonic()
        reporter = threading.Thread(target=_report_progress, args=(progress, t0, sampler),
                                    daemon=True)  # fmt: skip
        reporter.start()
        elapsed = asyncio.run(
            ingest(
                cluster.leader.url,
                args.events,
                args.connections,
                args.batch,
                progress,
                deadline,
                sampler,
            )
        )
        sampler.stop.set()
        progress.ended_window.set()
        sampler.join(timeout=30)
        sampler.tick()  # the last window's row, and /proc as the ingest ended
        after = {n.node_id: sampler.watch[n.node_id].snapshot() for n in nodes}
        me_after = sampler.me.snapshot()
        acked = progress.acked
        if acked == 0:
            raise RuntimeError(
                f"no event was acknowledged (the ingest stopped: {progress.stopped})"
            )
        results["events"] = acked
        results["stopped_early"] = progress.stopped
        results["ingest_seconds"] = round(elapsed, 1)
        results["events_per_s"] = round(acked / elapsed) if elapsed else None
        results["windows"] = windows(progress, sampler, t0, [n.node_id for n in nodes])
        results["batch_latency_ms"] = latency_ms([s for _, s in progress.latencies])
        rates = [w["events_per_s"] for w in results["windows"]]
        if len(rates) >= 3:
            results["second_window_events_per_s"] = rates[1]
            results["last_window_events_per_s"] = rates[-1]
            ratio = round(rates[-1] / rates[1], 3)
            results["last_to_second_window_ratio"] = ratio
        # CPU over the ingest: per node, per thread, and the load generator's own
        total_us = 0.0
        nodes_out: dict[str, dict[str, Any]] = {}
        for node in nodes:
            b, a = before[node.node_id], after[node.node_id]
            us = (a["total"] - b["total"]) * 1e6 / max(acked, 1)
            total_us += us
            nodes_out[node.node_id] = {
                "cpu_us_per_event": round(us, 2),
                "serving_cpu_us_per_event": round((a["own"] - b["own"]) * 1e6 / max(acked, 1), 2),
                "cpu_us_per_event_by_thread": by_thread_us(b, a, max(acked, 1)),
            }
        me_us = (me_after["total"] - me_before["total"]) * 1e6 / max(acked, 1)
        results["load_generator_cpu_us_per_event"] = round(me_us, 2)
        results["load_generator_cpu_us_per_event_by_thread"] = by_thread_us(
            me_before, me_after, max(acked, 1)
        )
        results["load_generator_peak_rss_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        )
        results["cpu_us_per_event_all_nodes"] = round(total_us, 2)
        results["cpu_us_per_event_with_load_generator"] = round(total_us + me_us, 2)
        # settle: followers applied everything, no checkpoint or merge still running
        print("waiting for the nodes to settle ...", flush=True)
        last = httpx.get(cluster.leader.url + "/api/v1/stats", timeout=30).json()["last_lsn"]
        _wait_applied(cluster.followers, last, max(30.0, deadline - time.monotonic()))
        for node in nodes:
            remaining = max(30.0, min(300.0, deadline + 300 - time.monotonic()))
            stats, settle_s = wait_settled(node, timeout_s=remaining)
            watch = sampler.watch[node.node_id]
            watch.sample()
            out = nodes_out[node.node_id]
            out["settle_seconds"] = settle_s
            out["cpu_us_per_event_with_settle"] = round(
                (watch.total_s() - before[node.node_id]["total"]) * 1e6 / max(acked, 1), 2
            )
            out["peak_rss_mb"] = round(watch.hwm_kb() / 1024, 1)  # the kernel's high-water mark
            out["peak_rss_sampled_mb"] = round(watch.peak_rss_kb / 1024, 1)
            if watch.peak_children_rss_kb:
                out["peak_children_rss_mb"] = round(watch.peak_children_rss_kb / 1024, 1)
            for key in ("last_lsn", "events", "entities", *STATS_FIELDS):
                out[key] = stats.get(key)
            written = (stats.get("checkpoint_bytes_written") or 0) + (
                stats.get("compaction_bytes_written") or 0
            )
            out["parquet_bytes_written_per_event"] = round(written / max(acked, 1), 1)
        for node in nodes:
            node.stop()
        for node in nodes:
            out = nodes_out[node.node_id]
            out["disk_bytes"] = disk_bytes(node.data_dir)
            out["disk_wal_bytes"] = disk_bytes(node.data_dir / "wal")
            out["disk_parquet_bytes"] = disk_bytes(node.data_dir / "checkpoints")
            out["disk_bytes_per_event"] = round(out["disk_bytes"] / max(acked, 1), 1)
        results["nodes"] = nodes_out
        for node_id, out in nodes_out.items():  # flat keys for report.py's table
            key = node_id.replace("-", "_")
            for name in ("write_amplification", "compaction_rewrites_per_event",
                         "peak_rss_mb", "cpu_us_per_event", "serving_cpu_us_per_event",
                         "disk_bytes_per_event"):  # fmt: skip
                results[f"{key}_{name}"] = out.get(name)
        print("comparing the logs ...", flush=True)
        check = compare_logs(cluster.leader, cluster.followers)
        counts = {(o["last_lsn"], o["events"], o["entities"]) for o in nodes_out.values()}
        check["same_counts"] = len(counts) == 1
        check["identical"] = check["identical"] and check["same_counts"]
        results["logs"] = check
        results["followers_identical"] = check["identical"]
    finally:
        if sampler is not None:
            sampler.close()
        cluster.close()
    return results


def windows(
    progress: Progress, sampler: Sampler, t0: float, ids: list[str]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    prev_t, prev_row = t0, sampler.start_row
    for i, t in enumerate(progress.boundaries):
        row = sampler.windows[i] if i < len(sampler.windows) else {}
        out: dict[str, Any] = {
            "window": i + 1,
            "seconds": round(t - prev_t, 2),
            "events_per_s": round(progress.window / (t - prev_t)) if t > prev_t else None,
        }
        for node_id in ids:
            now = row.get(node_id, {})
            then = prev_row.get(node_id, {})
            acked = row.get("acked", 0) - prev_row.get("acked", 0)
            if "cpu_s" in now and "cpu_s" in then and acked > 0:
                used = now["cpu_s"] - then["cpu_s"]
                out[f"{node_id}_cpu_us_per_event"] = round(used * 1e6 / acked, 2)
                own = now["own_cpu_s"] - then["own_cpu_s"]  # the serving process alone
                out[f"{node_id}_serving_cpu_us_per_event"] = round(own * 1e6 / acked, 2)
            for key in ("rss_mb", "write_amplification", "parquet_parts", "memtable_events"):
                if key in now:
                    out[f"{node_id}_{key}"] = now[key]
        out["batch_latency_ms"] = latency_ms([s for w, s in progress.latencies if w == i])
        rows.append(out)
        prev_t, prev_row = t, row
    return rows


def latency_ms(seconds: list[float]) -> dict[str, float] | None:
    """p50, p99 and max of batch latencies, in ms; None for none."""
    if not seconds:
        return None
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(ordered[-1] * 1000, 1)}


def _wait_applied(followers: list[NodeProcess], last: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=10) as client:
        for node in followers:
            while client.get(node.url + "/health").json()["replication"]["applied_lsn"] < last:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.node_id} did not apply lsn {last} in time")
                time.sleep(0.1)


def _report_progress(progress: Progress, t0: float, sampler: Sampler) -> None:
    shown = 0
    while not sampler.stop.wait(1.0):
        while shown < len(progress.boundaries):
            t = progress.boundaries[shown]
            prev = progress.boundaries[shown - 1] if shown else t0
            rate = progress.window / (t - prev) if t > prev else 0
            done = (shown + 1) * progress.window
            print(f"  window {shown + 1}: {rate:,.0f} events/s "
                  f"({done:,} events, {t - t0:,.0f} s)", flush=True)  # fmt: skip
            shown += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument(
        "--window",
        type=int,
        default=0,
        help="events per throughput window (default: a tenth of --events)",
    )
    ap.add_argument("--connections", type=int, default=4, help="HTTP connections sending")
    ap.add_argument("--batch", type=int, default=1000, help="events per HTTP batch")
    ap.add_argument(
        "--time-limit",
        type=float,
        default=7200.0,
        help="seconds; the ingest stops then and the rest is bounded too",
    )
    ap.add_argument("--sample-s", type=float, default=1.0, help="/proc sampling interval")
    ap.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="parent of the run's data directory (default: the system's temp)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the nodes' data directories")
    ap.add_argument("--quick", action="store_true", help="1,000,000 events")
    ap.add_argument("--tiny", action="store_true", help="100,000 events: proves it runs")
    ap.add_argument("--peer", choices=["postgres", "none"], help="(replication.py only)")
    ap.add_argument("--no-part-worker", action="store_true",
                    help="nodes write Parquet parts themselves, not in workers")  # fmt: skip
    ap.add_argument("--physical-followers", action="store_true",
                    help="followers install the leader's parts (default off)")  # fmt: skip
    args = ap.parse_args()
    if args.quick:
        args.events = 1_000_000
    if args.tiny:
        args.events = 100_000
    if args.events < args.batch * 3 or args.batch < 1 or args.connections < 1:
        ap.error("--events must be at least three batches, --batch and --connections >= 1")
    if args.no_part_worker:
        os.environ["WALSHIP_PART_WORKER"] = "0"  # inherited by every node started below
    if args.physical_followers:
        os.environ["WALSHIP_PHYSICAL_FOLLOWERS"] = "1"  # likewise
    # the nodes name their threads (threadnames/sitecustomize.py) for CPU per thread
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(THREAD_NAMES), os.environ.get("PYTHONPATH", "")) if p
    )
    parent = args.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    need = args.events * DISK_BYTES_PER_EVENT * 3
    free = shutil.disk_usage(parent).free
    if free < need:
        sys.exit(f"sustained: {free / 1e9:.1f} GB free under {parent}, the run needs about "
                 f"{need / 1e9:.1f} GB: pass --dir on a larger disk or fewer --events")  # fmt: skip

    def on_term(signum: int, _frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C stops the run even when a shell started it in the background with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    watchdog = threading.Timer(args.time_limit + 600, os.kill, (os.getpid(), signal.SIGTERM))
    watchdog.daemon = True
    watchdog.start()
    root = Path(tempfile.mkdtemp(prefix="walship-sustained-", dir=parent))
    try:
        results = run(args, root)
    except (KeyboardInterrupt, Interrupted) as exc:
        sys.exit(f"sustained: interrupted ({str(exc) or 'Ctrl-C'}); nodes stopped, nothing saved")
    except RuntimeError as exc:
        sys.exit(f"sustained: {exc}; nodes stopped, nothing saved")
    finally:
        watchdog.cancel()
        if args.keep:
            print(f"data kept in {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if results["stopped_early"]:
        results["note"] = (f"stopped early ({results['stopped_early']}) after "
                           f"{results['events']:,} of {args.events:,} events")  # fmt: skip
    elif args.tiny or args.quick or args.events < 10_000_000:
        results["note"] = (f"{results['events']:,} events: proves the benchmark runs; the issue's "
                           "figure needs 10,000,000 on an otherwise idle machine")  # fmt: skip
    path = save("sustained", results)
    print(json.dumps({k: v for k, v in results.items() if k != "windows"}, indent=2))
    print(f"written to {path}")
    if not results.get("followers_identical"):
        sys.exit("sustained: the followers' logs differ from the leader's (see results)")


if __name__ == "__main__":
    main()
