"""Real walship clusters for the replication tests: child processes on 127.0.0.1.

``Cluster`` starts a leader and followers as ``walship serve`` children (HTTP and replication
ports chosen at run time), shares one replication secret among them and stops every node it
started, whatever happens in the test. The rest are the probes the tests are made of: polling
with a deadline, writers that push load from threads, paging through every event, reading a
stopped node's WAL from disk, and a raw socket that speaks (or mangles) protocol v1.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from walship.replication.config import parse_address
from walship.replication.protocol import (
    PROTOCOL_VERSION,
    Challenge,
    FrameDecoder,
    Hello,
    Message,
    Refused,
    encode,
    make_hello_proof,
    make_nonce,
)
from walship.testing.process import NodeProcess
from walship.wal.offline import DumpStopped, iter_wal_records
from walship.wal.record import Record

T = TypeVar("T")

SECRET = "walship-test-secret"
HTTP_TIMEOUT_S = 15.0


# ---------------------------------------------------------------------------------- polling


def wait_until(
    probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something truthy; AssertionError naming ``what`` and
    the last thing seen (value or exception) when ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            value = probe()
        except (httpx.HTTPError, KeyError) as exc:  # a node still starting, a field not there
            value, last = None, exc
        else:
            last = value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last}")
        time.sleep(interval_s)


# ---------------------------------------------------------------------------------- HTTP


_client = httpx.Client(timeout=HTTP_TIMEOUT_S)


def http() -> httpx.Client:
    """The client of the test's main thread (``Writers`` threads make their own)."""
    return _client


def get_json(node: NodeProcess, path: str, **params: Any) -> Any:
    """GET ``path`` on ``node``; the decoded body of a 200 (AssertionError otherwise)."""
    response = _client.get(f"{node.url}{path}", params=params)
    assert response.status_code == 200, f"GET {path} on {node.node_id}: {response.text}"
    return response.json()


def health(node: NodeProcess) -> dict[str, Any]:
    body: dict[str, Any] = get_json(node, "/health")
    return body


def replication(node: NodeProcess) -> dict[str, Any]:
    """The ``replication`` part of ``/health``."""
    body: dict[str, Any] = health(node)["replication"]
    return body


def stats(node: NodeProcess) -> dict[str, Any]:
    body: dict[str, Any] = get_json(node, "/api/v1/stats")
    return body


def event(i: int, entities: int = 16) -> dict[str, Any]:
    """The ``i``-th test event: entities and types spread so queries have something to filter."""
    return {
        "entity_id": f"acct-{i % entities:03d}",
        "event_type": "acct.credited" if i % 3 else "acct.debited",
        "payload": {"i": i, "amount": i % 97, "note": "x" * (i % 40)},
        "metadata": {"writer": "test"},
    }


def post_event(
    node: NodeProcess, body: dict[str, Any], *, headers: dict[str, str] | None = None
) -> httpx.Response:
    return _client.post(f"{node.url}/api/v1/events", json=body, headers=headers)


def post_batch(client: httpx.Client, url: str, events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Append a batch; its receipts (AssertionError unless 200)."""
    response = client.post(f"{url}/api/v1/events/batch", json={"events": list(events)})
    assert response.status_code == 200, f"batch append: {response.status_code} {response.text}"
    body: dict[str, Any] = response.json()
    return body


def write_events(node: NodeProcess, count: int, *, start: int = 0, batch: int = 500) -> list[int]:
    """Append events ``start .. start+count-1`` in batches; their lsns, in order."""
    lsns: list[int] = []
    for first in range(start, start + count, batch):
        events = [event(i) for i in range(first, min(first + batch, start + count))]
        body = post_batch(_client, node.url, events)
        lsns.extend(r["lsn"] for r in body["receipts"])
    return lsns


def query_all(node: NodeProcess, **params: Any) -> list[dict[str, Any]]:
    """Every event matching ``params``, in lsn order, paging with the query cursor."""
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page_params = {**params, "limit": 10_000}
        if cursor is not None:
            page_params["cursor"] = cursor
        page = get_json(node, "/api/v1/events/query", **page_params)
        out.extend(page["events"])
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def assert_same_query_results(leader: NodeProcess, follower: NodeProcess) -> int:
    """Both nodes answer the same queries with the same events; returns how many events.

    Also checks the answers have no gap and no duplicate: lsns run 1..N without a hole and
    every event id appears once.
    """
    everything = query_all(leader)
    assert query_all(follower) == everything
    lsns = [e["lsn"] for e in everything]
    assert lsns == list(range(1, len(lsns) + 1)), "the leader's events are not gapless"
    assert len({e["id"] for e in everything}) == len(everything), "an event id repeats"
    for params in (
        {"entity_id": "acct-003"},
        {"event_type": "acct.debited"},
        {"from_lsn": max(len(lsns) - 1_000, 1)},
    ):
        assert query_all(follower, **params) == query_all(leader, **params), params
    for entity in ("acct-000", "acct-007"):
        path = f"/api/v1/entities/{entity}/state"
        assert get_json(follower, path) == get_json(leader, path), entity
    return len(everything)


# ---------------------------------------------------------------------------------- load


@dataclass
class Writers:
    """Threads appending batches to ``url`` as fast as they can until ``stop`` (or until they
    have written ``events_max`` events between them); every receipt's lsn is kept."""

    url: str
    threads: int = 3
    batch: int = 200
    first: int = 0
    events_max: int | None = None
    lsns: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next: int = 0

    def start(self) -> Writers:
        self._next = self.first
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"writer-{n}", daemon=True)
            self._workers.append(worker)
            worker.start()
        return self

    def _claim(self) -> range | None:
        with self._lock:
            if self.stop_event.is_set():
                return None
            first = self._next
            last = first + self.batch
            if self.events_max is not None:
                last = min(last, self.first + self.events_max)
            if last <= first:
                return None
            self._next = last
            return range(first, last)

    def _run(self) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
            while (ids := self._claim()) is not None:
                try:
                    body = post_batch(client, self.url, [event(i) for i in ids])
                except (AssertionError, httpx.HTTPError) as exc:
                    with self._lock:
                        self.errors.append(repr(exc))
                    return
                with self._lock:
                    self.lsns.extend(r["lsn"] for r in body["receipts"])

    @property
    def written(self) -> int:
        with self._lock:
            return len(self.lsns)

    def join(self, timeout_s: float = 60.0) -> list[int]:
        """Wait for every thread (after ``stop`` or once ``events_max`` is reached); the
        lsns written, sorted. AssertionError when a write failed or a thread hangs."""
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.join(max(deadline - time.monotonic(), 0.1))
            assert not worker.is_alive(), f"{worker.name} did not finish in {timeout_s} s"
        assert not self.errors, self.errors
        return sorted(self.lsns)

    def stop(self, timeout_s: float = 60.0) -> list[int]:
        self.stop_event.set()
        return self.join(timeout_s)


# ---------------------------------------------------------------------------------- nodes


def rss_bytes(node: NodeProcess) -> int:
    """The node's resident memory now (``VmRSS``)."""
    assert node.process is not None
    with open(f"/proc/{node.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def replication_address(node: NodeProcess) -> str:
    """``HOST:PORT`` of a leader's replication listener (AssertionError when it has none)."""
    address = node.replication_address
    assert address is not None, f"{node.node_id} does not listen: {node.start_line!r}"
    return address


class Cluster:
    """The nodes of one test, each with its own data dir under ``root``; all stopped by
    ``close`` (use as a context manager or a fixture)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.secret_file = root / "replication.secret"
        root.mkdir(parents=True, exist_ok=True)
        self.secret_file.write_text(SECRET + "\n")
        self.nodes: list[NodeProcess] = []

    def data_dir(self, node_id: str) -> Path:
        return self.root / node_id

    def node(self, node_id: str, args: Sequence[str], fsync: str) -> NodeProcess:
        proc = NodeProcess(
            self.data_dir(node_id),
            node_id=node_id,
            fsync=fsync,
            extra_args=list(args),
            log_path=self.root / f"{node_id}.log",
        )
        self.nodes.append(proc)
        return proc

    def start_leader(
        self,
        node_id: str = "leader",
        *,
        args: Sequence[str] = (),
        fsync: str = "never",
        replication_port: int = 0,
    ) -> NodeProcess:
        """Start a leader listening for followers on ``replication_port`` (0: a free one)."""
        proc = self.node(
            node_id,
            [
                "--role",
                "leader",
                "--replication-port",
                str(replication_port),
                "--replication-secret-file",
                str(self.secret_file),
                *args,
            ],
            fsync,
        )
        return proc.start()

    def start_follower(
        self,
        node_id: str,
        leader: str,
        *,
        args: Sequence[str] = (),
        fsync: str = "never",
    ) -> NodeProcess:
        """Start a follower of the replication listener at ``leader`` (``HOST:PORT``)."""
        proc = self.node(
            node_id,
            [
                "--role",
                "follower",
                "--leader",
                leader,
                "--replication-secret-file",
                str(self.secret_file),
                *args,
            ],
            fsync,
        )
        return proc.start()

    def stop_all(self, timeout_s: float = 15.0) -> dict[str, int]:
        """Stop every running node gracefully (WALs flushed), all at once; SIGKILL any that
        hangs. Returns each stopped node's exit code (0 for a clean stop)."""
        running = [n for n in self.nodes if n.process is not None and n.running]
        for node in running:
            assert node.process is not None
            with contextlib.suppress(ProcessLookupError):
                node.process.send_signal(signal.SIGCONT)  # one a test left stopped must wake
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int] = {}
        for node in running:
            assert node.process is not None
            try:
                codes[node.node_id] = node.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                node.process.kill()
                codes[node.node_id] = node.process.wait(10)
        return codes

    def close(self) -> None:
        try:
            self.stop_all()
        finally:
            for proc in self.nodes:
                proc.kill()

    def log_problems(self) -> list[str]:
        """The errors nobody handled in the nodes' logs (each traceback's exception, with the
        node's name): a node must handle every connection failure it meets."""
        problems: list[str] = []
        for proc in self.nodes:
            try:
                lines = proc.log_path.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                continue
            for i, line in enumerate(lines):
                if not line.startswith("Traceback"):
                    continue
                # the exception is the first unindented line after the frames; of a chain
                # ("During handling of the above exception...") only the last one is named
                j = next((k for k in range(i + 1, len(lines)) if lines[k][:1].strip()), None)
                if j is None:
                    continue
                after = next((x for x in lines[j + 1 :] if x.strip()), "")
                if not after.startswith(("The above exception", "During handling")):
                    problems.append(f"{proc.node_id}: {lines[j]}")
        return problems

    def restart(self, node: NodeProcess, *, replication_port: int | None = None) -> NodeProcess:
        """Start a stopped node again on its data dir (a leader on ``replication_port``)."""
        if replication_port is not None:
            args = node.extra_args
            args[args.index("--replication-port") + 1] = str(replication_port)
        return node.start()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def last_lsn(node: NodeProcess) -> int:
    value: int = health(node)["last_lsn"]
    return value


def wait_caught_up(leader: NodeProcess, *followers: NodeProcess, timeout_s: float = 30.0) -> int:
    """Wait until every follower has durably written and applied the leader's last lsn (as it
    is when the wait starts), and the leader has heard so; returns that lsn."""
    target = last_lsn(leader)
    for follower in followers:

        def applied(f: NodeProcess = follower) -> bool:
            r = replication(f)
            return bool(r["applied_lsn"] >= target and r["durable_lsn"] >= target)

        wait_until(applied, timeout_s, f"{follower.node_id} to apply lsn {target}")

    def leader_knows() -> bool:
        sessions = {f["node_id"]: f for f in replication(leader)["followers"]}
        return all(
            f.node_id in sessions and sessions[f.node_id]["durable_lsn"] >= target
            for f in followers
        )

    wait_until(leader_knows, timeout_s, f"{leader.node_id} to see the followers' acks")
    return target


def follower_session(leader: NodeProcess, node_id: str) -> dict[str, Any] | None:
    """The leader's view of follower ``node_id``; None while it is not connected."""
    for session in replication(leader)["followers"]:
        if session["node_id"] == node_id:
            found: dict[str, Any] = session
            return found
    return None


# ---------------------------------------------------------------------------------- WAL files


def wal_records(data_dir: Path, *, killed: bool = False) -> list[Record]:
    """Every record in a *stopped* node's WAL, read from its segment files (changes nothing).

    A node ``killed`` with SIGKILL may have been inside a write: a fatal signal cuts a large
    ``pwrite`` short between pages, leaving a torn record, or only the first records of an
    atomic append, at the end of the last segment. Its restart drops that append whole, so the
    records before it are returned, as the restarted node will hold them; a bad record anywhere
    else (or in a node that was not killed) still raises DumpStopped.
    """
    records: list[Record] = []
    try:
        records.extend(rec for _, _, rec in iter_wal_records(data_dir / "wal"))
    except DumpStopped as stopped:
        if not (killed and stopped.in_last_segment):
            raise
    if killed:
        while records and records[-1].batch_left > 0:  # an append that never finished
            records.pop()
    return records


def assert_same_wal(leader_dir: Path, follower_dir: Path, *, whole: bool = True) -> int:
    """The follower's WAL holds the leader's records byte for byte; returns how many compared.

    Both logs must be gapless and end at the same lsn. With ``whole`` both must start at lsn 1;
    otherwise (after a snapshot or checkpoints removed early segments) the lsns both still hold
    are compared, and there must be some.
    """
    mine = wal_records(leader_dir)
    theirs = wal_records(follower_dir)
    for name, records in (("leader", mine), ("follower", theirs)):
        assert records, f"the {name}'s WAL is empty"
        lsns = [r.lsn for r in records]
        assert lsns == list(range(lsns[0], lsns[0] + len(lsns))), f"the {name}'s WAL has a gap"
    assert theirs[-1].lsn == mine[-1].lsn, (
        f"the follower's WAL ends at {theirs[-1].lsn}, the leader's at {mine[-1].lsn}"
    )
    if whole:
        assert mine[0].lsn == 1 and theirs[0].lsn == 1
    first = max(mine[0].lsn, theirs[0].lsn)
    pairs = list(
        zip(
            (r for r in mine if r.lsn >= first),
            (r for r in theirs if r.lsn >= first),
            strict=True,
        )
    )
    assert pairs, "the two WALs share no lsn to compare"
    for a, b in pairs:
        assert (a.lsn, a.term, a.chain) == (b.lsn, b.term, b.chain), f"record {a.lsn} differs"
        assert a.raw == b.raw, f"record {a.lsn} differs in its bytes"
    return len(pairs)


# ---------------------------------------------------------------------------------- raw sockets


@contextlib.contextmanager
def raw_connection(address: str, timeout_s: float = 5.0) -> Iterator[socket.socket]:
    """A plain TCP connection to ``address``, for feeding the leader bytes by hand."""
    sock = socket.create_connection(parse_address(address), timeout=timeout_s)
    try:
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket, timeout_s: float = 5.0) -> list[Message]:
    """Everything the peer sends until it closes the connection, as messages.

    AssertionError when the peer keeps the connection open past ``timeout_s``; bytes that do
    not form whole frames are ignored (the peer may cut a Refused short when it aborts).
    """
    deadline = time.monotonic() + timeout_s
    decoder = FrameDecoder()
    messages: list[Message] = []
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the peer kept the connection open for {timeout_s} s"
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return messages
        if not data:
            return messages
        with contextlib.suppress(Exception):
            messages.extend(decoder.feed(data))


def recv_message(sock: socket.socket, timeout_s: float = 5.0) -> Message:
    """The next whole message from ``sock``."""
    decoder = FrameDecoder()
    sock.settimeout(timeout_s)
    while True:
        data = sock.recv(65536)
        assert data, "the peer closed the connection"
        got = decoder.feed(data)
        if got:
            return got[0]


def handshake_with_secret(sock: socket.socket, secret: bytes, node_id: str) -> Challenge:
    """Hello, then a HelloProof made with ``secret``; the leader's Challenge."""
    hello = Hello(PROTOCOL_VERSION, "walship", node_id, "follower", make_nonce())
    sock.sendall(encode(hello))
    challenge = recv_message(sock)
    assert isinstance(challenge, Challenge), challenge
    sock.sendall(encode(make_hello_proof(secret, hello, challenge)))
    return challenge


def refusal(messages: Sequence[Message]) -> Refused | None:
    """The Refused among ``messages``, if any."""
    for msg in messages:
        if isinstance(msg, Refused):
            return msg
    return None
