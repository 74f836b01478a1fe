"""Failover probes on top of ``tests.cluster``: admin calls, writers that keep every receipt,
and checks that a history survived a change of leader.

``FailoverCluster`` starts every node with the same admin token and, for followers, a
replication listener port chosen at run time once they are promoted (``--replication-port
0``), so a promotion needs no port picked in advance.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.cluster import HTTP_TIMEOUT_S, Cluster, event, health, http, query_all, wait_until
from walship.replication.lostfound import find_files, read_file, to_builtins
from walship.testing.process import NodeProcess

TOKEN = "walship-test-admin-token"


class FailoverCluster(Cluster):
    """A ``Cluster`` whose nodes all accept the admin token ``TOKEN``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.token_file = root / "admin.token"
        self.token_file.write_text(TOKEN + "\n")

    def admin_args(self, args: Sequence[str] = ()) -> list[str]:
        return ["--admin-token-file", str(self.token_file), *args]

    def start_leader(  # type: ignore[override]
        self, node_id: str = "leader", *, args: Sequence[str] = (), fsync: str = "never"
    ) -> NodeProcess:
        return super().start_leader(node_id, args=self.admin_args(args), fsync=fsync)

    def start_follower(  # type: ignore[override]
        self, node_id: str, leader: str, *, args: Sequence[str] = (), fsync: str = "never"
    ) -> NodeProcess:
        args = self.admin_args(["--replication-port", "0", *args])
        return super().start_follower(node_id, leader, args=args, fsync=fsync)


def admin_post(
    node: NodeProcess, path: str, *, token: str | None = TOKEN, **params: Any
) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return http().post(f"{node.url}{path}", params=params, headers=headers)


def promote(
    node: NodeProcess, *, force: bool = False, peers: Sequence[NodeProcess] = ()
) -> dict[str, Any]:
    """Promote ``node`` (AssertionError unless 200); the answer."""
    params: dict[str, Any] = {"force": str(force).lower()}
    if peers:
        params["peers"] = ",".join(p.url for p in peers)
    response = admin_post(node, "/internal/promote", **params)
    assert response.status_code == 200, f"promote {node.node_id}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def repoint(node: NodeProcess, leader: str) -> dict[str, Any]:
    response = admin_post(node, "/internal/repoint", leader=leader)
    assert response.status_code == 200, f"repoint {node.node_id}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def pause(node: NodeProcess) -> None:
    assert node.process is not None
    os.kill(node.process.pid, signal.SIGSTOP)


def resume(node: NodeProcess) -> None:
    assert node.process is not None
    os.kill(node.process.pid, signal.SIGCONT)


@dataclass
class ReceiptWriters:
    """Threads appending batches to ``url`` until ``stop``; every receipt is kept. Errors
    (the leader killed under them) end a thread and are kept too, not raised."""

    url: str
    threads: int = 3
    batch: int = 20
    first: int = 0
    receipts: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next: int = 0

    def start(self) -> ReceiptWriters:
        self._next = self.first
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"rwriter-{n}", daemon=True)
            self._workers.append(worker)
            worker.start()
        return self

    def _run(self) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
            while not self.stop_event.is_set():
                with self._lock:
                    ids = range(self._next, self._next + self.batch)
                    self._next += self.batch
                try:
                    response = client.post(
                        f"{self.url}/api/v1/events/batch",
                        json={"events": [event(i) for i in ids]},
                    )
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.errors.append(repr(exc))
                    return
                with self._lock:
                    if response.status_code == 200:
                        self.receipts.extend(response.json()["receipts"])
                    else:
                        self.errors.append(f"{response.status_code} {response.text[:200]}")

    def count(self, durability: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.receipts if durability in (None, r["durability"]))

    def wait_for(self, durability: str, count: int, timeout_s: float = 20.0) -> None:
        wait_until(
            lambda: self.count(durability) >= count,
            timeout_s,
            f"{count} receipts saying {durability}",
        )

    def stop(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        self.stop_event.set()
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.join(max(deadline - time.monotonic(), 0.1))
            assert not worker.is_alive(), f"{worker.name} did not finish"
        return list(self.receipts)


def events_by_id(node: NodeProcess) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in query_all(node)}


def assert_receipts_held(node: NodeProcess, receipts: Sequence[dict[str, Any]]) -> int:
    """Every receipt is an event ``node`` holds at the same lsn and term; how many."""
    held = events_by_id(node)
    for r in receipts:
        found = held.get(r["event_id"])
        assert found is not None, f"{r} is not on {node.node_id}"
        assert (found["lsn"], found["term"]) == (r["lsn"], r["term"]), (found, r)
    return len(receipts)


def lost_found(data_dir: Path) -> list[dict[str, Any]]:
    """Every record in the node's lost-and-found files, oldest file first."""
    return [to_builtins(rec, path) for path in find_files(data_dir) for rec in read_file(path)]


def wait_role(node: NodeProcess, role: str, timeout_s: float = 10.0) -> dict[str, Any]:
    return wait_until(
        lambda: (h := health(node))["role"] == role and h,
        timeout_s,
        f"{node.node_id} to be a {role}",
    )
