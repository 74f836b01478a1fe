#!/usr/bin/env python3
"""An outside fault probe for tenant positions, consumer tracking and live subscriptions.

Written independently of ``walship verify`` (it shares none of its checker): a leader and two
followers run as real ``walship serve`` processes on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (ports
chosen at run time), in ``semi-sync`` or ``sync``. One writer per tenant appends batches (every
third carries a ``tracking`` position of that tenant's consumer) and retries an unanswered
batch with the same ids until it gets an answer; one SSE subscriber per tenant follows
``/api/v1/events/stream`` by tenant position on a follower, resuming with ``Last-Event-ID``
wherever it can. Meanwhile a seeded schedule of faults runs: ``failover`` (kill -9 the leader,
``walship failover``, restart the old leader with its original command: it must end deposed),
``catchup`` (kill -9 a follower while it catches up), ``double`` (kill -9 the leader and a
follower at once), ``pause`` (SIGSTOP/SIGCONT a follower).

Checks at the end: every write answered ``replicated`` is on every node at its lsn, term,
tenant position and content; every node holds the same events; tenant positions run 1..N;
each consumer's stored position is the last tracking that survived (and every ``replicated``
one survived); each subscriber saw its tenant's events exactly once in position order;
``walship wal verify`` passes on every data dir; no node log holds a traceback or died
unexpectedly.

    python scripts/fault_probe.py --duration 30 --seed 7 --ack-mode sync [--followers logical]

Exit 0 when every check held, 1 with the violations otherwise (the data dir is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

from walship.cli.process import NodeProcess
from walship.sse import SseDecoder

TENANTS = ("acme", "globex", "initech")
FAULTS = ("failover", "catchup", "double", "pause", "isolate", "stale")
TOKEN = "fault-probe-admin-token"  # noqa: S105  a throwaway cluster's
SECRET = "fault-probe-replication-secret"  # noqa: S105
HTTP_TIMEOUT_S = 10.0
RETRY_409 = ("read_only", "fenced", "leadership_unconfirmed", "not_leader")  # ask the leader


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(probe: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise TimeoutError(f"{what} (last: {last!r})")


# ------------------------------------------------------------------------------ cluster


@dataclass
class Node:
    proc: NodeProcess
    host: str
    http_port: int
    repl_port: int
    expected_down: bool = False  # killed by the probe (a dead process is otherwise a crash)

    @property
    def name(self) -> str:
        return self.proc.node_id

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.proc.process is not None and self.proc.process.poll() is None


class Cluster:
    """Three ``walship serve`` processes with fixed (run-time chosen) ports, so a restart
    runs the node's original command line."""

    def __init__(self, root: Path, ack_mode: str, fsync: str, physical: bool, small: bool) -> None:
        self.root = root
        (root / "secret").write_text(SECRET + "\n")
        (root / "token").write_text(TOKEN + "\n")
        hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        ports = [(free_port(h), free_port(h)) for h in hosts]
        self.nodes: list[Node] = []
        for i, (host, (http_port, repl_port)) in enumerate(zip(hosts, ports, strict=True)):
            peers = ",".join(
                f"http://{h}:{p[0]}"
                for j, (h, p) in enumerate(zip(hosts, ports, strict=True))
                if j != i
            )
            args = [
                "--replication-port", str(repl_port),
                "--replication-secret-file", str(root / "secret"),
                "--admin-token-file", str(root / "token"),
                "--ack-mode", ack_mode,
                "--ack-timeout-ms", "1500",
                "--peers", peers,
            ]  # fmt: skip
            args.append("--physical-followers" if physical else "--no-physical-followers")
            if small:  # checkpoints, merges, removed segments and snapshots within seconds
                args += [
                    "--checkpoint-interval-ms", "1000",
                    "--memtable-events-max", "3000",
                    "--segment-bytes-max", "32768",
                    "--wal-retention-bytes-max", "65536",
                    "--compaction-fanin-min", "2",
                ]  # fmt: skip
            if i == 0:
                args += ["--role", "leader"]
            else:
                args += ["--role", "follower", "--leader", f"{hosts[0]}:{ports[0][1]}"]
            proc = NodeProcess(
                root / f"n{i + 1}",
                node_id=f"n{i + 1}",
                host=host,
                port=http_port,
                fsync=fsync,
                extra_args=args,
                log_path=root / f"n{i + 1}.log",
            )
            self.nodes.append(Node(proc, host, http_port, repl_port))

    def start_all(self) -> None:
        for node in self.nodes:
            node.proc.start(60)

    def health(self, node: Node) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{node.url}/health", timeout=3.0).json()
        return body

    def leader(self) -> Node | None:
        """The node that says it leads and takes writes (not fenced, not confirming)."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(httpx.HTTPError, ValueError):
                h = self.health(node)
                if h.get("role") == "leader" and not h.get("fenced"):
                    return node
        return None

    def kill(self, node: Node) -> None:
        node.expected_down = True
        if node.proc.process is not None:
            with contextlib.suppress(ProcessLookupError):
                node.proc.process.send_signal(signal.SIGCONT)
                node.proc.process.kill()
            node.proc.process.wait(10)

    def restart(self, node: Node) -> None:
        node.proc.start(60)
        node.expected_down = False

    def failover(self) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable, "-m", "walship", "failover",
            "--nodes", ",".join(n.url for n in self.nodes),
            "--admin-token-file", str(self.root / "token"),
        ]  # fmt: skip
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=90)

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.running:
                assert node.proc.process is not None
                node.proc.process.send_signal(signal.SIGCONT)
                node.expected_down = True
                node.proc.stop()

    def kill_all(self) -> None:
        for node in self.nodes:
            node.proc.kill()


# ------------------------------------------------------------------------------ workload


@dataclass
class Batch:
    tenant: str
    events: list[dict[str, Any]]
    tracking: int | None
    answer: dict[str, Any] | None = None  # the 200 body, once one came
    refusal: str = ""  # a definite 4xx other than the retry kind
    attempts: int = 0


@dataclass
class Writer:
    """Appends batches of one tenant to whichever node leads, retrying each until answered."""

    cluster: Cluster
    tenant: str
    rng: random.Random
    stop: threading.Event
    batches: list[Batch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _track: int = 0
    _seq: int = 0
    _leader: Node | None = None

    def consumer(self) -> str:
        return f"proj-{self.tenant}"

    def new_batch(self, count: int = 0, pad: int = 60) -> Batch:
        events = []
        for _ in range(count or self.rng.randint(1, 4)):
            self._seq += 1
            events.append(
                {
                    "id": str(uuid.UUID(int=self.rng.getrandbits(128))),
                    "tenant_id": self.tenant,
                    "entity_id": f"{self.tenant}-{self.rng.randint(0, 5)}",
                    "event_type": "probe.written",
                    "payload": {"seq": self._seq, "pad": "x" * self.rng.randint(0, pad)},
                    "metadata": {"writer": self.tenant},
                }
            )
        tracking = None
        if self._seq % 3 == 0:
            self._track += 1
            tracking = self._track
        return Batch(self.tenant, events, tracking)

    def run(self) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
            while not self.stop.is_set():
                batch = self.new_batch()
                self.batches.append(batch)
                self.send(client, batch, give_up_at=None)
                time.sleep(self.rng.uniform(0.0, 0.02))

    def ballast(self, until: threading.Event) -> None:
        """Big batches (its answers degrade while the followers are stopped) until ``until``:
        enough bytes that the followers' socket buffers cannot hold the leader's tail."""
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
            while not until.is_set():
                batch = self.new_batch(count=8, pad=400_000)
                self.batches.append(batch)
                self.send(client, batch, give_up_at=time.monotonic())

    def send(self, client: httpx.Client, batch: Batch, give_up_at: float | None) -> None:
        body: dict[str, Any] = {"events": batch.events}
        if batch.tracking is not None:
            body["tracking"] = {
                "consumer": self.consumer(),
                "position": batch.tracking,
                "tenant_id": self.tenant,
            }
        while True:
            if self.stop.is_set() and give_up_at is None:
                give_up_at = time.monotonic() + 40.0
            if give_up_at is not None and time.monotonic() > give_up_at and batch.attempts:
                self.notes.append(f"gave up on a batch after {batch.attempts} attempts")
                return
            leader = self._leader or self.cluster.leader()
            if leader is None:
                time.sleep(0.2)
                continue
            batch.attempts += 1
            try:
                r = client.post(f"{leader.url}/api/v1/events/batch", json=body)
            except httpx.HTTPError:
                self._leader = None
                time.sleep(0.1)
                continue
            self._leader = leader if r.status_code == 200 else None
            if r.status_code == 200:
                batch.answer = r.json()
                return
            try:
                err = r.json().get("error", "")
            except ValueError:
                err = ""
            if r.status_code == 503 or (r.status_code == 409 and err in RETRY_409):
                time.sleep(0.1)
                continue
            batch.refusal = f"{r.status_code} {r.text[:300]}"
            return


@dataclass
class Subscriber:
    """Follows one tenant's events over SSE on followers, resuming after every disconnect."""

    cluster: Cluster
    tenant: str
    rng: random.Random
    done: threading.Event
    seen: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    connects: int = 0
    _response: httpx.Response | None = None

    def target(self) -> Node | None:
        nodes = [n for n in self.cluster.nodes if n.running]
        followers = []
        for n in nodes:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if self.cluster.health(n).get("role") == "follower":
                    followers.append(n)
        pool = followers if followers and self.rng.random() < 0.7 else nodes
        return self.rng.choice(pool) if pool else None

    def run(self) -> None:
        while not self.done.is_set():
            node = self.target()
            if node is None:
                time.sleep(0.2)
                continue
            try:
                self.follow(node)
            except (httpx.HTTPError, msgspec.DecodeError, RuntimeError):
                pass
            time.sleep(0.1)

    def follow(self, node: Node) -> None:
        params: dict[str, Any] = {"tenant_id": self.tenant}
        headers = {}
        if self.seen:
            last = self.seen[-1]
            headers["Last-Event-ID"] = f"{last['lsn']}:{last['term']}"
        else:
            params["from_position"] = 1
        timeout = httpx.Timeout(5.0, read=3.0)  # keepalives are 15 s apart: reconnect instead
        with (
            httpx.Client(timeout=timeout) as client,
            client.stream(
                "GET", f"{node.url}/api/v1/events/stream", params=params, headers=headers
            ) as response,
        ):
            self.connects += 1
            if response.status_code == 409:
                body = json.loads(response.read() or b"{}")
                self.notes.append(f"resume at {headers} on {node.name}: 409 {body}")
                if body.get("error") == "log_cut":
                    self.drop_cut(body)
                return
            if response.status_code != 200:
                return
            decoder = SseDecoder()
            for line in response.iter_lines():
                ev = decoder.feed_line(line)
                if ev is None:
                    continue
                if ev.event == "cut":
                    body = msgspec.json.decode(ev.data)
                    self.notes.append(f"cut on {node.name}: {body}")
                    self.drop_cut(body)
                    return
                e = msgspec.json.decode(ev.data)
                self.accept(e, node)
                if self.done.is_set():
                    return

    def drop_cut(self, body: dict[str, Any]) -> None:
        """Forget what a repair cut: after ``kept_lsn`` when the node says, else the last event
        (a resume whose term differs says no ``kept_lsn``: step back until one matches)."""
        if "kept_lsn" in body:
            self.drop_after(int(body["kept_lsn"]))
        elif self.seen:
            self.seen.pop()

    def drop_after(self, kept_lsn: int) -> None:
        while self.seen and self.seen[-1]["lsn"] > kept_lsn:
            self.seen.pop()

    def accept(self, e: dict[str, Any], node: Node) -> None:
        expected = self.seen[-1]["position"] + 1 if self.seen else 1
        if e.get("tenant_id") != self.tenant:
            self.violations.append(
                f"{self.tenant}: got another tenant's event {e} from {node.name}"
            )
            return
        if e["position"] != expected:
            prev = self.seen[-1] if self.seen else None
            self.violations.append(
                f"{self.tenant} on {node.name}: position {e['position']} (lsn {e['lsn']}) "
                f"after {prev and (prev['position'], prev['lsn'], prev['term'])}, "
                f"expected {expected}"
            )
            if e["position"] <= (prev["position"] if prev else 0):
                return  # a repeat: keep the stream as it was
        self.seen.append(
            {k: e[k] for k in ("id", "lsn", "term", "position", "payload", "entity_id")}
        )


# ------------------------------------------------------------------------------ faults


class Faults:
    def __init__(
        self, cluster: Cluster, rng: random.Random, kinds: list[str], ballast: Writer
    ) -> None:
        self.ballast = ballast
        self.cluster = cluster
        self.rng = rng
        self.kinds = kinds
        self.done: list[str] = []
        self.violations: list[str] = []

    def followers(self) -> list[Node]:
        leader = self.cluster.leader()
        return [n for n in self.cluster.nodes if n is not leader and n.running]

    def run_one(self) -> None:
        kind = self.rng.choice(self.kinds)
        leader = self.cluster.leader()
        if leader is None:
            return
        getattr(self, f"do_{kind}")(leader)
        self.done.append(kind)

    def fail_over(self, old: Node) -> None:
        for attempt in range(5):
            out = self.cluster.failover()
            if out.returncode == 0:
                log(f"failover: {out.stdout.strip().splitlines()[:2]}")
                break
            log(f"failover attempt {attempt} refused: {(out.stdout + out.stderr).strip()[:300]}")
            time.sleep(1.0)
        else:
            self.violations.append(f"walship failover never succeeded after {old.name} died")
            return
        new = wait_for(self.cluster.leader, 30, "a new leader")
        log(f"new leader {new.name}; restarting {old.name} with its original command")
        self.cluster.restart(old)
        try:
            wait_for(
                lambda: self.cluster.health(old).get("role") == "follower",
                30,
                f"{old.name} to follow after its restart",
            )
        except TimeoutError as exc:
            h = self.cluster.health(old)
            self.violations.append(f"restarted old leader {old.name} not deposed: {exc}; {h}")

    def do_failover(self, leader: Node) -> None:
        log(f"fault failover: kill -9 leader {leader.name}")
        self.cluster.kill(leader)
        self.fail_over(leader)

    def do_double(self, leader: Node) -> None:
        follower = self.rng.choice(self.followers())
        log(f"fault double: kill -9 leader {leader.name} and follower {follower.name}")
        self.cluster.kill(leader)
        self.cluster.kill(follower)
        time.sleep(self.rng.uniform(0.2, 1.0))
        self.cluster.restart(follower)
        self.fail_over(leader)

    def do_catchup(self, leader: Node) -> None:
        follower = self.rng.choice(self.followers())
        log(f"fault catchup: kill -9 follower {follower.name}, let writes pile up, kill it again")
        self.cluster.kill(follower)
        time.sleep(self.rng.uniform(1.5, 5.0))
        self.cluster.restart(follower)
        time.sleep(self.rng.uniform(0.0, 0.5))
        self.cluster.kill(follower)
        time.sleep(0.3)
        self.cluster.restart(follower)

    def do_isolate(self, leader: Node) -> None:
        """Both followers stopped while the leader writes (its answers degrade), then the
        leader is killed: its unreplicated tail must go to lost-and-found when it rejoins."""
        followers = self.followers()
        hold = self.rng.uniform(2.0, 4.0)
        log(
            f"fault isolate: SIGSTOP {[f.name for f in followers]} {hold:.1f} s, "
            f"kill -9 {leader.name}"
        )
        for f in followers:
            assert f.proc.process is not None
            f.proc.process.send_signal(signal.SIGSTOP)
        until = threading.Event()
        threads = [threading.Thread(target=self.ballast.ballast, args=(until,)) for _ in range(2)]
        for th in threads:
            th.start()
        time.sleep(hold)
        self.cluster.kill(leader)
        until.set()
        for th in threads:
            th.join(30)
        for f in followers:
            assert f.proc.process is not None
            f.proc.process.send_signal(signal.SIGCONT)
        self.fail_over(leader)

    def do_stale(self, leader: Node) -> None:
        """The leader writes a tail nobody confirms, is stopped (not killed) while the others
        fail over, then wakes up: it must be fenced, and repointing it cuts the tail under
        any stream it serves (``event: cut``)."""
        followers = self.followers()
        hold = self.rng.uniform(1.5, 3.0)
        log(f"fault stale: SIGSTOP followers {hold:.1f} s, then leader {leader.name}; fail over")
        for f in followers:
            assert f.proc.process is not None
            f.proc.process.send_signal(signal.SIGSTOP)
        until = threading.Event()
        threads = [threading.Thread(target=self.ballast.ballast, args=(until,)) for _ in range(2)]
        for th in threads:
            th.start()
        time.sleep(hold)
        assert leader.proc.process is not None
        leader.proc.process.send_signal(signal.SIGSTOP)
        until.set()
        for f in followers:
            assert f.proc.process is not None
            f.proc.process.send_signal(signal.SIGCONT)
        for attempt in range(5):
            out = self.cluster.failover()
            if out.returncode == 0:
                break
            log(f"failover attempt {attempt} refused: {(out.stdout + out.stderr).strip()[:300]}")
            time.sleep(1.0)
        else:
            leader.proc.process.send_signal(signal.SIGCONT)
            self.violations.append(f"walship failover never succeeded with {leader.name} stopped")
            return
        new = wait_for(
            lambda: next(
                (n for n in followers if self.cluster.health(n)["role"] == "leader"), None
            ),
            30,
            "a new leader",
        )
        leader.proc.process.send_signal(signal.SIGCONT)
        for th in threads:
            th.join(30)
        time.sleep(self.rng.uniform(0.0, 1.5))
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "walship",
                "repoint",
                leader.url,
                "--leader",
                f"{new.host}:{new.repl_port}",
                "--admin-token-file",
                str(self.cluster.root / "token"),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        log(f"repoint {leader.name} to {new.name}: rc {out.returncode} {out.stdout.strip()[:200]}")
        try:
            wait_for(
                lambda: self.cluster.health(leader).get("role") == "follower",
                30,
                f"{leader.name} to follow after the repoint",
            )
        except TimeoutError as exc:
            self.violations.append(f"stale leader {leader.name} not deposed: {exc}")

    def do_pause(self, leader: Node) -> None:
        follower = self.rng.choice(self.followers())
        hold = self.rng.uniform(0.5, 3.0)
        log(f"fault pause: SIGSTOP follower {follower.name} for {hold:.1f} s")
        assert follower.proc.process is not None
        follower.proc.process.send_signal(signal.SIGSTOP)
        time.sleep(hold)
        follower.proc.process.send_signal(signal.SIGCONT)


# ------------------------------------------------------------------------------ checks


def query_tenant(node: Node, tenant: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"tenant_id": tenant, "limit": 10_000}
        if cursor:
            params["cursor"] = cursor
        page = httpx.get(f"{node.url}/api/v1/events/query", params=params, timeout=30).json()
        out.extend(page["events"])
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def check(
    cluster: Cluster, writers: list[Writer], subscribers: list[Subscriber]
) -> tuple[list[str], dict[str, Any]]:
    bad: list[str] = []
    stats: dict[str, Any] = {}
    leader = cluster.leader()
    if leader is None:
        return ["no leader at the end"], stats
    for w in writers:
        t = w.tenant
        per_node = {n.name: query_tenant(n, t) for n in cluster.nodes}
        final = per_node[leader.name]
        for name, evs in per_node.items():
            if evs != final:
                diff = next(
                    (i for i, (a, b) in enumerate(zip(evs, final, strict=False)) if a != b),
                    min(len(evs), len(final)),
                )
                bad.append(
                    f"{t}: {name} holds {len(evs)} events, {leader.name} {len(final)}; "
                    f"first difference at #{diff}"
                )
        positions = [e["position"] for e in final]
        if positions != list(range(1, len(final) + 1)):
            bad.append(f"{t}: positions are not 1..{len(final)}: {positions[:5]}...")
        by_id = {e["id"]: e for e in final}
        held_by_node = {name: {e["id"]: e for e in evs} for name, evs in per_node.items()}
        counts: dict[str, int] = {}
        tracked_surviving = 0
        for b in w.batches:
            if b.refusal:
                bad.append(f"{t}: batch refused {b.refusal}")
            present = sum(1 for sent in b.events if sent["id"] in by_id)
            if b.tracking is not None and present == len(b.events):
                tracked_surviving = max(tracked_surviving, b.tracking)
            if b.answer is None:
                counts["unanswered"] = counts.get("unanswered", 0) + 1
                continue
            receipts = b.answer["receipts"]
            durability = receipts[0]["durability"] if receipts else "?"
            counts[durability] = counts.get(durability, 0) + 1
            for sent, r in zip(b.events, receipts, strict=True):
                if r["durability"] != "replicated":
                    continue
                for n_name, held in held_by_node.items():
                    e = held.get(sent["id"])
                    if e is None:
                        bad.append(f"{t}: replicated {r} missing on {n_name}")
                    elif (
                        (e["lsn"], e["term"], e["position"]) != (r["lsn"], r["term"], r["position"])
                        or e["payload"] != sent["payload"]
                        or e["entity_id"] != sent["entity_id"]
                    ):
                        bad.append(f"{t}: replicated {r} differs on {n_name}: {e}")
            tr = b.answer.get("tracking")
            if tr and tr["durability"] == "replicated" and present < len(b.events):
                bad.append(f"{t}: replicated tracking {tr} lost")
        stats[t] = {"events": len(final), "batches": counts}
        for n in cluster.nodes:
            r = httpx.get(
                f"{n.url}/api/v1/consumers/{w.consumer()}", params={"tenant_id": t}, timeout=10
            )
            stored = r.json().get("position") if r.status_code == 200 else 0
            if stored != tracked_surviving:
                bad.append(
                    f"{t}: consumer {w.consumer()} on {n.name} at {stored}, "
                    f"expected {tracked_surviving}"
                )
        sub = next((s for s in subscribers if s.tenant == t), None)
        if sub is None:
            continue
        bad.extend(sub.violations)
        got = [(e["id"], e["lsn"], e["term"], e["position"]) for e in sub.seen]
        want = [(e["id"], e["lsn"], e["term"], e["position"]) for e in final]
        if got != want:
            diff = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            bad.append(
                f"{t}: subscriber saw {len(got)} events, the log has {len(want)}; first difference "
                f"at #{diff}: {got[diff : diff + 2]} vs {want[diff : diff + 2]}"
            )
        stats[t]["subscriber_connects"] = sub.connects
        stats[t]["subscriber_notes"] = sub.notes[:5]
    return bad, stats


def log_problems(cluster: Cluster) -> list[str]:
    out = []
    for n in cluster.nodes:
        text = n.proc.log_path.read_text(errors="replace") if n.proc.log_path.exists() else ""
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                tail = next((x for x in lines[i + 1 :] if x[:1].strip()), "?")
                out.append(f"{n.name} log: traceback ending {tail}")
    return out


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of writes under faults")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--ack-mode", default="semi-sync", choices=["semi-sync", "sync"])
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--fault-every", type=float, default=4.0, help="mean seconds between faults")
    ap.add_argument("--fsync", default="never")
    ap.add_argument(
        "--followers",
        choices=["physical", "logical"],
        default="physical",
        help="physical: followers install the leader's parts (the default of walship serve)",
    )
    ap.add_argument(
        "--storage",
        choices=["small", "default"],
        default="small",
        help="small: checkpoint every second, small segments and WAL retention (snapshots)",
    )
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    kinds = [k for k in args.faults.split(",") if k]
    for k in kinds:
        if k not in FAULTS:
            ap.error(f"unknown fault {k!r} (known: {', '.join(FAULTS)})")
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="walship-fault-probe-"))
    root.mkdir(parents=True, exist_ok=True)
    log(f"seed {seed}, ack mode {args.ack_mode}, faults {kinds}, {args.duration} s, in {root}")
    rng = random.Random(seed)
    cluster = Cluster(
        root, args.ack_mode, args.fsync, args.followers == "physical", args.storage == "small"
    )
    violations: list[str] = []
    stats: dict[str, Any] = {}
    stop, subs_done = threading.Event(), threading.Event()
    writers = [Writer(cluster, t, random.Random(rng.random()), stop) for t in TENANTS]
    subscribers = [Subscriber(cluster, t, random.Random(rng.random()), subs_done) for t in TENANTS]
    threads: list[threading.Thread] = []
    ballast = Writer(cluster, "ballast", random.Random(rng.random()), stop)
    faults = Faults(cluster, random.Random(rng.random()), kinds, ballast)
    try:
        cluster.start_all()
        wait_for(lambda: cluster.leader() is not None, 30, "the leader to take writes")
        runs: list[Callable[[], None]] = [w.run for w in writers] + [s.run for s in subscribers]
        for run in runs:
            th = threading.Thread(target=run, daemon=True)
            th.start()
            threads.append(th)
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            time.sleep(
                min(faults.rng.expovariate(1 / args.fault_every), max(end - time.monotonic(), 0))
            )
            if kinds and time.monotonic() < end:
                faults.run_one()
        log("healing: every node running, writers finishing")
        for node in cluster.nodes:
            if not node.running:
                cluster.restart(node)
        stop.set()
        for th in threads[: len(writers)]:
            th.join(90)
        violations += faults.violations
        leader = wait_for(cluster.leader, 60, "one leader after the heal")
        target = cluster.health(leader)["last_lsn"]

        def reached(n: Node) -> bool:
            h = cluster.health(n)
            return bool(
                h["last_lsn"] >= target and h["replication"].get("applied_lsn", target) >= target
            )

        for node in cluster.nodes:
            wait_for(functools.partial(reached, node), 60, f"{node.name} to reach lsn {target}")
        finals = {t: len(query_tenant(leader, t)) for t in TENANTS}

        def subscribers_caught_up() -> bool:
            return all(len(s.seen) >= finals[s.tenant] for s in subscribers)

        with contextlib.suppress(TimeoutError):
            wait_for(subscribers_caught_up, 30, "subscribers to catch up")
        subs_done.set()
        bad, stats = check(cluster, [*writers, ballast], subscribers)
        for n in cluster.nodes:  # physical followers: parts installed vs refused
            parts = cluster.health(n)["replication"].get("parts")
            if parts:
                stats.setdefault("parts", {})[n.name] = {
                    k: parts.get(k) for k in ("received", "installed", "refused")
                }
        violations += bad
        for n in cluster.nodes:
            if not n.running and not n.expected_down:
                violations.append(f"{n.name} died unexpectedly")
    except Exception as exc:  # the probe reports, whatever broke
        violations.append(f"probe stopped: {exc!r}")
    finally:
        stop.set()
        subs_done.set()
        cluster.stop_all()
        cluster.kill_all()
    for n in cluster.nodes:
        out = subprocess.run(
            [sys.executable, "-m", "walship", "wal", "verify", str(n.proc.data_dir)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            violations.append(f"wal verify {n.name}: {(out.stdout + out.stderr).strip()[-400:]}")
    violations += log_problems(cluster)
    for w in writers:
        stats.setdefault(w.tenant, {})["notes"] = w.notes[:3]
    report = {
        "seed": seed,
        "ack_mode": args.ack_mode,
        "followers": args.followers,
        "faults": faults.done,
        "stats": stats,
    }
    print(json.dumps(report, indent=1))
    if violations:
        print(f"FAIL seed {seed} ({len(violations)} violations), data in {root}:")
        for v in violations[:40]:
            print(f"  - {v}")
        return 1
    print(f"OK seed {seed}: {len(faults.done)} faults, every check held")
    if not args.keep and args.data_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
