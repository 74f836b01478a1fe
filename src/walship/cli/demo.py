"""``walship demo``: start a node as a real server, write to it, query it, stop it.

Everything goes through the public interfaces an application would use: the ``walship serve``
process and the HTTP API. The nodes live in a ``DemoCluster`` (one node today); replication
turns it into a leader and two followers by adding nodes to the cluster and a step that waits
for them to catch up, without changing the rest of the script.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from walship.cli.output import console, fail, say
from walship.cli.process import NodeProcess, NodeStartError

REQUEST_TIMEOUT_S = 10.0


@dataclass
class DemoCluster:
    """The demo's nodes; every one is stopped (or killed) when the cluster closes."""

    root: Path
    fsync: str = "always"
    nodes: list[NodeProcess] = field(default_factory=list)

    def add_node(self, node_id: str) -> NodeProcess:
        node = NodeProcess(
            self.root / node_id,
            node_id=node_id,
            fsync=self.fsync,
            log_path=self.root / f"{node_id}.log",
        )
        self.nodes.append(node)
        return node

    @property
    def leader(self) -> NodeProcess:
        return self.nodes[0]

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            finally:
                node.kill()


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
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} -> "
            f"{response.status_code}: {response.text[:300]}"
        )
    return response.json()


def _receipts(answer: Any) -> list[dict[str, Any]]:
    if isinstance(answer, dict):
        found = answer.get("receipts") or answer.get("events") or []
        return list(found)
    return list(answer)


@dataclass
class WriteSummary:
    batches: int = 0
    singles: int = 0
    durability: set[str] = field(default_factory=set)


def write_events(client: httpx.Client, events: list[dict[str, Any]]) -> WriteSummary:
    """Write ~3/4 of ``events`` in batches of 25 and the rest one by one."""
    split = len(events) * 3 // 4
    summary = WriteSummary()
    for i in range(0, split, 25):
        chunk = events[i : min(i + 25, split)]
        receipts = _receipts(_check(client.post("/api/v1/events/batch", json={"events": chunk})))
        if len(receipts) != len(chunk):
            raise RuntimeError(f"batch of {len(chunk)} answered {len(receipts)} receipts")
        summary.batches += 1
        summary.durability.update(r["durability"] for r in receipts)
    for ev in events[split:]:
        summary.durability.add(_check(client.post("/api/v1/events", json=ev))["durability"])
        summary.singles += 1
    return summary


def status_table(cluster: DemoCluster) -> Table:
    table = Table(title="nodes", title_justify="left")
    for name in ("node", "role", "status", "term", "last lsn", "events", "parquet parts"):
        left = name in ("node", "role", "status")
        table.add_column(name, justify="left" if left else "right", no_wrap=True)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        for node in cluster.nodes:
            if not node.running:
                table.add_row(node.node_id, "-", "stopped", "-", "-", "-", "-")
                continue
            health = _check(client.get(f"{node.url}/health"))
            stats = _check(client.get(f"{node.url}/api/v1/stats"))
            table.add_row(
                node.node_id,
                str(health.get("role", "?")),
                str(health.get("status", "?")),
                str(health.get("term", "?")),
                str(health.get("last_lsn", "?")),
                str(stats.get("events", "?")),
                str(stats.get("parquet_parts", "?")),
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


def run_demo(root: Path, events: int, fsync: str) -> None:
    """The demo script proper; raises on any failure (the caller turns it into an exit code)."""
    cluster = DemoCluster(root, fsync=fsync)
    try:
        leader = cluster.add_node("walship-1")
        with console.status("starting walship-1 ..."):
            leader.start()
        say(leader.start_line)
        with httpx.Client(base_url=leader.url, timeout=REQUEST_TIMEOUT_S) as client:
            t0 = time.perf_counter()
            written = write_events(client, sample_events(events))
            elapsed = time.perf_counter() - t0
            say(
                f"wrote {events} events ({written.batches} batches of up to 25, "
                f"{written.singles} single writes) in {elapsed * 1000:.0f} ms; fsync={fsync}, "
                f"receipts say durability={'/'.join(sorted(written.durability))}"
            )
            console.print(status_table(cluster))
            entity = "order-0001"
            page = _check(
                client.get("/api/v1/events/query", params={"entity_id": entity, "limit": 8})
            )
            console.print(events_table(page["events"], f"first events of {entity}"))
            state = _check(client.get(f"/api/v1/entities/{entity}/state"))
            say(f"state of {entity}: {state.get('state')} (version {state.get('version')})")
            paid = _check(
                client.get("/api/v1/events/query", params={"event_type": "order.paid", "limit": 5})
            )
            say(f"orders paid (first 5): {', '.join(e['entity_id'] for e in paid['events'])}")
            last_lsn = _check(client.get("/health"))["last_lsn"]
        code = leader.stop()
        say(f"stopped walship-1 (exit code {code}); restarting it on the same data dir ...")
        leader.start()
        with httpx.Client(base_url=leader.url, timeout=REQUEST_TIMEOUT_S) as client:
            recovered = _check(client.get("/health"))["last_lsn"]
        if recovered != last_lsn:
            raise RuntimeError(f"restart recovered lsn {recovered}, expected {last_lsn}")
        say(f"recovered every event: last lsn {recovered}")
        console.print(status_table(cluster))
        code = leader.stop()
        say(f"stopped walship-1 (exit code {code})")
    finally:
        cluster.close()


def demo_command(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", help="Keep the demo's data here (default: a temp dir, removed after)."
        ),
    ] = None,
    events: Annotated[int, typer.Option("--events", min=1, max=10_000)] = 200,
    fsync: Annotated[str, typer.Option("--fsync", help="always, never or interval:MS")] = "always",
) -> None:
    """Start a node as a server process, write sample events over HTTP, query them, stop it."""
    temp = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="walship-demo-")) if data_dir is None else data_dir
    try:
        run_demo(root.resolve(), events, fsync)
    except (NodeStartError, RuntimeError, httpx.HTTPError) as exc:
        fail(f"demo failed: {exc}")
    except KeyboardInterrupt:
        fail("demo interrupted", 130)
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)
    if not temp:
        say(f"data and logs kept in {root}")
