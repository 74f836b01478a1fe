"""Clusters restarted with their original command lines: every port chosen once, at run time,
and kept for the life of the test (a node that comes back on another port is not the node
its peers remember), on any loopback address (``127.0.0.2``..: they need no setup) or bound
to a wildcard and advertising one.

``AnyNodeWriter`` is the simplest failover-aware client: it sends each batch to every node in
turn and keeps who answered what, so a test sees which nodes took writes and when.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.cluster import event
from tests.failover_cluster import FailoverCluster
from walship.testing.process import NodeProcess


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (the node binds it a moment later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Ports:
    http: int
    replication: int


class FixedCluster(FailoverCluster):
    """A ``FailoverCluster`` whose nodes keep their ports (and command lines) across restarts."""

    def add(
        self,
        node_id: str,
        args: Sequence[str],
        *,
        bind: str = "127.0.0.1",
        ports: Ports | None = None,
        fsync: str = "never",
    ) -> tuple[NodeProcess, Ports]:
        """A node (not started) bound to ``bind`` on fixed ports, with the secret and token."""
        ports = ports or Ports(free_port(bind), free_port(bind))
        proc = NodeProcess(
            self.data_dir(node_id),
            node_id=node_id,
            host=bind,
            port=ports.http,
            fsync=fsync,
            extra_args=[
                "--replication-host",
                bind,
                "--replication-port",
                str(ports.replication),
                "--replication-secret-file",
                str(self.secret_file),
                *self.admin_args(args),
            ],
            log_path=self.root / f"{node_id}.log",
        )
        self.nodes.append(proc)
        return proc, ports


def start_all(nodes: Sequence[NodeProcess], timeout_s: float = 60.0) -> None:
    """Spawn every node at once, then wait until each answers (they may need each other)."""
    for node in nodes:
        node.spawn()
    for node in nodes:
        node.wait_ready(timeout_s)


@dataclass
class Answer:
    url: str
    at: float
    status: int
    body: dict[str, Any]


@dataclass
class AnyNodeWriter:
    """A thread that sends batches to each of ``urls`` in turn until stopped, keeping every
    answer (a connection error is an answer with status 0)."""

    urls: list[str]
    batch: int = 10
    first: int = 10**7
    answers: list[Answer] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> AnyNodeWriter:
        self._thread = threading.Thread(target=self._run, name="any-node-writer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        i = self.first
        with httpx.Client(timeout=10) as client:
            while not self.stop_event.is_set():
                for url in list(self.urls):
                    events = [event(n) for n in range(i, i + self.batch)]
                    i += self.batch
                    try:
                        r = client.post(f"{url}/api/v1/events/batch", json={"events": events})
                        answer = Answer(url, time.monotonic(), r.status_code, r.json())
                    except (httpx.HTTPError, ValueError) as exc:
                        answer = Answer(url, time.monotonic(), 0, {"error": repr(exc)})
                    with self._lock:
                        self.answers.append(answer)
                time.sleep(0.01)

    def accepted(self, since: float = 0.0) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.status == 200 and a.at >= since]

    def receipts(self) -> list[dict[str, Any]]:
        return [r for a in self.accepted() for r in a.body["receipts"]]

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the writer did not finish"
