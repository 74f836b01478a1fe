"""``walship demo``: a leader and two followers on loopback, written to, read from, stopped.

Everything goes through the interfaces an operator and an application would use: three
``walship serve`` processes (ports chosen at run time, read back from their start lines) and
the HTTP API. The script shows durability receipts, a per-write stricter ack mode, a
read-your-writes read on a follower, the 409 a follower answers to a write, a follower catching
up from the leader's WAL after a restart, and the cluster table of ``walship status``. Every
node is stopped when the demo ends, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from walship.cli.output import console, fail, print_renderable, say
from walship.cli.status import render_status
from walship.node_reports import collect, make_client
from walship.testing.process import NodeProcess, NodeStartError

REQUEST_TIMEOUT_S = 10.0
IN_SYNC_TIMEOUT_S = 20.0
SECRET_FILE_NAME = "replication.secret"  # noqa: S105 - the file name, not a secret
LEADER_ID = "walship-1"
FOLLOWER_IDS = ("walship-2", "walship-3")
BATCH_EVENTS = 25


class DemoError(RuntimeError):
    """A step of the demo did not give what it should; the message says which."""


@dataclass
class DemoCluster:
    """The demo's nodes; every one is stopped (or killed) when the cluster closes."""

    root: Path
    secret_file: Path
    fsync: str = "always"
    nodes: list[NodeProcess] = field(default_factory=list)

    def _add(self, node_id: str, args: list[str]) -> NodeProcess:
        node = NodeProcess(
            self.root / node_id,
            node_id=node_id,
            fsync=self.fsync,
            extra_args=[
                "--cluster-id",
                "walship-demo",
                "--replication-secret-file",
                str(self.secret_file),
                *args,
            ],
            log_path=self.root / f"{node_id}.log",
        )
        self.nodes.append(node)
        return node

    def add_leader(self, node_id: str, ack_mode: str) -> NodeProcess:
        # replication port 0: the kernel picks a free one and the start line says which
        args = ["--role", "leader", "--replication-port", "0", "--ack-mode", ack_mode]
        return self._add(node_id, args)

    def add_follower(self, node_id: str, leader_address: str) -> NodeProcess:
        return self._add(node_id, ["--role", "follower", "--leader", leader_address])

    @property
    def leader(self) -> NodeProcess:
        return self.nodes[0]

    @property
    def followers(self) -> list[NodeProcess]:
        return self.nodes[1:]

    def start_all(self, nodes: list[NodeProcess]) -> None:
        """Start several nodes at once (each takes a second or so to import and recover)."""
        for node in nodes:
            node.spawn()
        for node in nodes:
            node.wait_ready()

    def stop_all(self, nodes: list[NodeProcess]) -> dict[str, int]:
        """SIGTERM several nodes at once and wait for each; their exit codes by node id."""
        if not nodes:
            return {}
        with ThreadPoolExecutor(len(nodes)) as pool:
            codes = list(pool.map(lambda node: node.stop(), nodes))
        return {node.node_id: code for node, code in zip(nodes, codes, strict=True)}

    def close(self) -> None:
        """Stop followers first (a leader stopping first sends them into reconnect loops)."""
        try:
            self.stop_all([n for n in self.followers if n.running])
            self.stop_all([n for n in self.nodes[:1] if n.running])
        finally:
            for node in self.nodes:
                node.kill()


def write_secret(root: Path) -> Path:
    """The cluster's shared secret in ``root`` (mode 0600); an existing one is reused."""
    path = root / SECRET_FILE_NAME
    if path.exists():
        path.chmod(0o600)
        return path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def _event_type(step: int) -> str:
    """An order's life: placed, a few items, paid, shipped, then notes."""
    if step == 0:
        return "order.placed"
    if step <= 3:
        return "order.item_added"
    return {4: "order.paid", 5: "order.shipped"}.get(step, "order.note_added")


def sample_events(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` order events over ~20 orders; each order's events are in a sensible order."""
    rng = random.Random(seed)
    events = []
    progress: dict[str, int] = {}
    for _ in range(count):
        order = f"order-{rng.randrange(1, 21):04d}"
        step = progress.get(order, 0)
        etype = _event_type(step)
        progress[order] = step + 1
        payload: dict[str, Any]
        if etype == "order.placed":
            payload = {"customer": f"cust-{rng.randrange(100):03d}", "status": "placed"}
        elif etype == "order.item_added":
            payload = {"sku": f"sku-{rng.randrange(1000):04d}", "qty": rng.randrange(1, 5)}
        elif etype == "order.paid":
            payload = {"status": "paid", "amount": round(rng.uniform(5, 500), 2)}
        elif etype == "order.shipped":
            payload = {"status": "shipped", "carrier": rng.choice(["ups", "dhl", "post"])}
        else:
            payload = {"note": rng.choice(["gift wrap", "leave at door", "call first"])}
        events.append(
            {
                "entity_id": order,
                "event_type": etype,
                "payload": payload,
                "metadata": {"source": "walship-demo"},
            }
        )
    return events


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise DemoError(
            f"{response.request.method} {response.request.url.path} -> "
            f"{response.status_code}: {response.text[:300]}"
        )
    return response.json()


@dataclass
class Written:
    """A write and its receipt, for the receipts table."""

    event: dict[str, Any]
    receipt: dict[str, Any]
    how: str


@dataclass
class WriteSummary:
    batches: int = 0
    singles: int = 0
    shown: list[Written] = field(default_factory=list)
    durability: dict[str, int] = field(default_factory=dict)
    last_lsn: int = 0

    def note(self, event: dict[str, Any], receipt: dict[str, Any]) -> None:
        level = str(receipt.get("durability"))
        self.durability[level] = self.durability.get(level, 0) + 1
        self.last_lsn = max(self.last_lsn, int(receipt["lsn"]))

    def levels(self) -> str:
        return ", ".join(f"{n} {level}" for level, n in sorted(self.durability.items()))


def write_events(client: httpx.Client, events: list[dict[str, Any]]) -> WriteSummary:
    """Write ~3/4 of ``events`` in batches and the rest one by one; keep a few receipts."""
    split = len(events) * 3 // 4
    summary = WriteSummary()
    for i in range(0, split, BATCH_EVENTS):
        chunk = events[i : min(i + BATCH_EVENTS, split)]
        receipts = _check(client.post("/api/v1/events/batch", json={"events": chunk}))["receipts"]
        if len(receipts) != len(chunk):
            raise DemoError(f"a batch of {len(chunk)} answered {len(receipts)} receipts")
        for ev, receipt in zip(chunk, receipts, strict=True):
            summary.note(ev, receipt)
        if summary.batches == 0:
            how = f"batch of {len(chunk)}"
            summary.shown += [
                Written(ev, r, how) for ev, r in zip(chunk[:2], receipts[:2], strict=True)
            ]
        summary.batches += 1
    for n, ev in enumerate(events[split:]):
        receipt = _check(client.post("/api/v1/events", json=ev))
        summary.note(ev, receipt)
        summary.singles += 1
        if n < 2:
            summary.shown.append(Written(ev, receipt, "single"))
    return summary


def _names(ids: Any) -> str:
    return ", ".join(str(i) for i in ids) if ids else "none"


def receipts_table(written: list[Written], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("write", "lsn", "term", "entity", "event_type", "durability", "required"):
        table.add_column(name, justify="right" if name in ("lsn", "term", "required") else "left")
    table.add_column("acked_by")
    for w in written:
        level = str(w.receipt.get("durability"))
        table.add_row(
            w.how,
            str(w.receipt["lsn"]),
            str(w.receipt.get("term", "?")),
            str(w.event["entity_id"]),
            str(w.event["event_type"]),
            f"[green]{level}[/]" if level == "replicated" else f"[yellow]{level}[/]",
            str(w.receipt.get("required", "-")),
            _names(w.receipt.get("acked_by")),
        )
    return table


def events_table(events: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("lsn", justify="right", no_wrap=True)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("event_type", no_wrap=True)
    table.add_column("payload", overflow="fold")
    table.add_column("time (UTC)", no_wrap=True)
    for ev in events:
        table.add_row(
            str(ev["lsn"]),
            str(ev["version"]),
            ev["event_type"],
            json.dumps(ev["payload"], separators=(",", ":")),
            str(ev["timestamp"])[11:23],
        )
    return table


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = IN_SYNC_TIMEOUT_S) -> float:
    """Poll ``check`` until true; the seconds it took. DemoError naming ``what`` on timeout."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def _followers_in_sync(client: httpx.Client, leader: NodeProcess, ids: set[str]) -> bool:
    repl = _check(client.get(f"{leader.url}/health")).get("replication") or {}
    in_sync = {f["node_id"] for f in repl.get("followers", []) if f.get("in_sync")}
    return ids <= in_sync


def _applied_lsn(client: httpx.Client, node: NodeProcess) -> int:
    health = _check(client.get(f"{node.url}/health"))
    return int((health.get("replication") or {}).get("applied_lsn") or 0)


def _all_at(client: httpx.Client, nodes: list[NodeProcess], lsn: int) -> bool:
    return all(int(_check(client.get(f"{n.url}/health"))["last_lsn"]) >= lsn for n in nodes)


def run_demo(root: Path, events: int, fsync: str, ack_mode: str) -> None:
    """The demo script proper; raises on any failure (the caller turns it into an exit code)."""
    cluster = DemoCluster(root, write_secret(root), fsync=fsync)
    try:
        _run_steps(cluster, events, ack_mode)
    finally:
        cluster.close()


def _run_steps(cluster: DemoCluster, events: int, ack_mode: str) -> None:
    t_start = time.perf_counter()
    leader = cluster.add_leader(LEADER_ID, ack_mode)
    with console.status(f"starting {LEADER_ID} (leader) ..."):
        leader.start()
    say(leader.start_line)
    address = leader.replication_address
    if address is None:
        raise DemoError(f"{LEADER_ID} is not listening for followers: {leader.start_line}")
    followers = [cluster.add_follower(node_id, address) for node_id in FOLLOWER_IDS]
    with console.status(f"starting {' and '.join(FOLLOWER_IDS)} (followers of {address}) ..."):
        cluster.start_all(followers)
    for node in followers:
        say(node.start_line)
    follower_a, follower_b = followers
    secret_mode = cluster.secret_file.stat().st_mode & 0o777
    say(f"shared replication secret: {cluster.secret_file} (mode {secret_mode:04o})")
    say(
        "HTTP API keys and TLS are off in this demo (--auth none): the nodes listen on "
        "127.0.0.1 only; see docs/security.md to turn them on"
    )

    with httpx.Client(base_url=leader.url, timeout=REQUEST_TIMEOUT_S) as client:
        took = wait_for(
            "both followers to join the in-sync set",
            lambda: _followers_in_sync(client, leader, set(FOLLOWER_IDS)),
        )
        say(f"both followers connected and in sync after {took * 1000:.0f} ms")

        # 1. writes to the leader: each answer is a durability receipt
        t0 = time.perf_counter()
        written = write_events(client, sample_events(events))
        elapsed = time.perf_counter() - t0
        say(
            f"\nwrote {events} events to {LEADER_ID} in {elapsed * 1000:.0f} ms: "
            f"{written.batches} batch(es) of up to {BATCH_EVENTS} and {written.singles} single "
            f"writes, ack mode {ack_mode}; receipts: {written.levels()}"
        )
        # one write may ask for more than the server's default
        strict_event = {
            "entity_id": "order-0001",
            "event_type": "order.note_added",
            "payload": {"note": "asked for sync"},
        }
        strict = _check(
            client.post("/api/v1/events", json=strict_event, headers={"X-Walship-Ack-Mode": "sync"})
        )
        shown = [*written.shown, Written(strict_event, strict, "single, X-Walship-Ack-Mode: sync")]
        print_renderable(console, receipts_table(shown, "a few receipts"))

        # 2. read-your-writes on a follower: min_lsn waits until it has applied that lsn
        entity = "order-0007"
        fresh = _check(
            client.post(
                "/api/v1/events",
                json={"entity_id": entity, "event_type": "order.note_added", "payload": {"n": 1}},
            )
        )
        page = _check(
            client.get(
                f"{follower_b.url}/api/v1/events/query",
                params={"entity_id": entity, "min_lsn": fresh["lsn"], "limit": 1000},
            )
        )
        if fresh["event_id"] not in {ev["id"] for ev in page["events"]}:
            raise DemoError(f"{follower_b.node_id} did not return event lsn {fresh['lsn']}")
        say(
            f"\nwrote lsn {fresh['lsn']} to {LEADER_ID} and read it straight back from "
            f"{follower_b.node_id} with min_lsn={fresh['lsn']} (read-your-writes): "
            f"{len(page['events'])} events of {entity}, the last ones:"
        )
        print_renderable(
            console, events_table(page["events"][-4:], f"{entity} on {follower_b.node_id}")
        )

        # 3. followers are read-only and say where the leader is
        refused = client.post(
            f"{follower_a.url}/api/v1/events",
            json={"entity_id": entity, "event_type": "order.note_added", "payload": {}},
        )
        body = refused.json() if refused.status_code == 409 else {}
        if refused.status_code != 409 or body.get("error") != "read_only":
            raise DemoError(
                f"a write to {follower_a.node_id} answered {refused.status_code}: "
                f"{refused.text[:200]}"
            )
        say(
            f"a write to {follower_a.node_id} answers {refused.status_code} "
            f"{body['error']}, leader={body.get('leader')} (write to {body.get('leader_url')})"
        )

        # 4. a follower that was away catches up from the leader's WAL
        before = _applied_lsn(client, follower_b)
        codes = cluster.stop_all([follower_b])
        more = sample_events(BATCH_EVENTS, seed=8)
        receipts = _check(client.post("/api/v1/events/batch", json={"events": more}))["receipts"]
        away = receipts[-1]
        say(
            f"\nstopped {follower_b.node_id} at lsn {before} (exit code "
            f"{codes[follower_b.node_id]}); wrote {len(more)} more events while it was away: "
            f"durability {away['durability']}, acked_by {_names(away.get('acked_by'))}"
        )
        if away["durability"] == "degraded":
            say(
                f"  ({ack_mode} could not be met with one follower down: the write waited "
                "--ack-timeout-ms, was answered degraded, and its lsn range went to the "
                "degradation ledger)"
            )
        t0 = time.perf_counter()
        cluster.start_all([follower_b])
        wait_for(
            f"{follower_b.node_id} to catch up to lsn {away['lsn']}",
            lambda: _applied_lsn(client, follower_b) >= away["lsn"],
        )
        say(
            f"restarted {follower_b.node_id}: it resubscribed from its durable lsn {before} and "
            f"got lsn {before + 1}..{away['lsn']} from the leader's WAL (process start and "
            f"catch-up: {(time.perf_counter() - t0) * 1000:.0f} ms)"
        )
        last = int(_check(client.get("/health"))["last_lsn"])
        wait_for(f"every node to reach lsn {last}", lambda: _all_at(client, cluster.nodes, last))
        wait_for(
            "both followers to be back in sync",
            lambda: _followers_in_sync(client, leader, set(FOLLOWER_IDS)),
        )

    # 5. the cluster as `walship status` shows it
    with make_client() as status_client:
        reports = collect(status_client, [n.url for n in cluster.nodes])
    say("")
    print_renderable(
        console,
        render_status(reports, heading=f"walship status {' '.join(n.url for n in cluster.nodes)}"),
    )
    lsns = {r.node_id: r.health.get("last_lsn") if r.health else None for r in reports}
    if len(set(lsns.values())) != 1:
        raise DemoError(f"the nodes disagree on the last lsn: {lsns}")

    # followers first, so none of them logs a lost leader
    codes = cluster.stop_all(cluster.followers)
    codes |= cluster.stop_all([leader])
    shown_codes = ", ".join(f"{node_id} {code}" for node_id, code in codes.items())
    say(f"\nstopped all three nodes (exit codes: {shown_codes})")
    if any(codes.values()):
        raise DemoError(f"a node did not exit cleanly: {codes}")
    say(f"demo finished in {time.perf_counter() - t_start:.1f} s")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` that stops the nodes still runs."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (e.g. under a test runner): nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def demo_command(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Put the nodes' data dirs, logs and secret here and keep them "
            "(default: a temp dir, removed afterwards unless --keep).",
        ),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the temp dir (data, logs) for inspection.")
    ] = False,
    events: Annotated[int, typer.Option("--events", min=4, max=10_000)] = 200,
    fsync: Annotated[str, typer.Option("--fsync", help="always, never or interval:MS")] = "always",
    ack_mode: Annotated[
        str,
        typer.Option("--ack-mode", help="The leader's ack mode: async, semi-sync, quorum:N, sync"),
    ] = "semi-sync",
) -> None:
    """Start a leader and two followers on 127.0.0.1, write, read from a follower, show status.

    All three are real ``walship serve`` processes with their own data dirs; they are stopped
    at the end, also on an error or Ctrl-C.
    """
    temp = data_dir is None
    if data_dir is None:
        root = Path(tempfile.mkdtemp(prefix="walship-demo-"))
    else:
        root = data_dir
        root.mkdir(parents=True, exist_ok=True)
    kept = keep or not temp
    try:
        with _sigterm_as_interrupt():
            run_demo(root.resolve(), events, fsync, ack_mode)
    except (NodeStartError, DemoError, httpx.HTTPError, OSError) as exc:
        kept = True  # the nodes' logs say what went wrong
        fail(f"demo failed: {exc}\nnode logs and data kept in {root}")
    except KeyboardInterrupt:
        fail("demo interrupted; all nodes stopped", 130)
    finally:
        if not kept:
            shutil.rmtree(root, ignore_errors=True)
    if kept:
        say(f"data, logs and secret kept in {root}")
