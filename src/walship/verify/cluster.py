"""The cluster under test: ``walship serve`` processes on 127.0.0.1 and their faulty links.

Every node has its own data dir and a ``Link``: a ``FaultProxy`` that it reaches its leader
through whenever it follows. A link's target is the current leader's replication listener, so
when the leader changes (a failover) or moves (a leader restarted on a new port) the links are
retargeted and the followers keep their addresses. Every method here is blocking and is called
by one task at a time (the fault scheduler, then the final phase); the workload only reads
``write_target``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx

from walship.events import SYSTEM_PREFIX, decode_body, format_uuid
from walship.http.auth import ROUTE_ACCESS
from walship.replication.config import parse_address
from walship.testing.process import NodeProcess, NodeStartError
from walship.testing.proxy import FaultProxy
from walship.verify.config import VerifyConfig
from walship.verify.history import CrashImage, History
from walship.wal.offline import DumpStopped, iter_wal_records
from walship.wal.segment import list_segments

HTTP_TIMEOUT_S = 5.0
QUERY_PAGE_EVENTS = 10_000
READY_TIMEOUT_S = 60.0


class ClusterError(RuntimeError):
    """The harness could not bring the cluster into the state a step needs."""


def failover_available() -> bool:
    """True when this build's nodes serve the promote and repoint endpoints the harness calls
    (issue 4's failover); read from the route table, so ``verify`` needs nothing of the CLI."""
    return {"POST /internal/promote", "POST /internal/repoint"} <= ROUTE_ACCESS.keys()


class ServerProcess(NodeProcess):
    """A ``NodeProcess`` running ``python -m MODULE serve`` (MODULE: walship or a mutant)."""

    def __init__(self, data_dir: Path, *, module: str, **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.module = module

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("-m") + 1] = self.module
        return cmd


class NodeState(StrEnum):
    UP = "up"
    DOWN = "down"
    PAUSED = "paused"


class Link:
    """One node's replication link to the leader, through a fault-injecting proxy."""

    def __init__(self, node_id: str, target: tuple[str, int], seed: int) -> None:
        self.node_id = node_id
        self.proxy = FaultProxy(target, seed=seed)
        self.proxy.start()

    @property
    def address(self) -> str:
        """What the follower is told its leader is: the proxy's ``HOST:PORT``."""
        return f"127.0.0.1:{self.proxy.port}"

    def retarget(self, target: tuple[str, int]) -> None:
        """Forward new connections to ``target`` and cut the open ones (they reconnect)."""
        self.proxy.target = target
        self.proxy.cut()

    def heal(self) -> None:
        self.proxy.heal()
        self.proxy.state.flips_pending.update(up=0, down=0)

    def close(self) -> None:
        self.proxy.stop()


@dataclass
class VerifyNode:
    """A node as the harness sees it."""

    node_id: str
    process: ServerProcess
    link: Link
    role: str
    state: NodeState = NodeState.DOWN
    deposed: bool = False  # a killed leader another node replaced: repoint it when it is back

    @property
    def url(self) -> str:
        return self.process.url


@dataclass
class NodeFinal:
    """One node's state after the run, read through its API and then from its files."""

    node_id: str
    role: str = "?"
    term: int = 0
    last_lsn: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    wal: list[tuple[int, int, bytes, str]] = field(default_factory=list)  # lsn, term, chain, id
    wal_first_lsn: int = 1
    wal_error: str | None = None
    lost_found: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: tuple[int, int, str] = (0, 0, "")  # manifest: last lsn, its term, chain hex
    error: str | None = None


class VerifyCluster:
    """The nodes, their links and the harness's view of who leads."""

    def __init__(
        self, config: VerifyConfig, root: Path, history: History, *, failover: bool
    ) -> None:
        self.config = config
        self.root = root
        self.history = history
        self.failover = failover  # a killed leader is replaced rather than restarted
        self.admin = failover_available()
        self.start_errors: dict[str, str] = {}
        self.secret_file = root / "replication.secret"
        self.token_file = root / "admin.token"
        self.nodes: list[VerifyNode] = []
        self.leader: VerifyNode | None = None
        self.write_target = ("", "")
        """``(node id, URL)`` the workload writes to: the current leader (one tuple, so a
        reader never sees one node's id with another's URL)."""
        self._http = httpx.Client(timeout=HTTP_TIMEOUT_S)

    # ------------------------------------------------------------------ start and stop

    def _args(self, role: str, leader: str | None) -> list[str]:
        cfg = self.config
        args = [
            "--role",
            role,
            "--replication-port",
            "0",  # every node: a promoted follower listens on a port chosen then
            "--replication-secret-file",
            str(self.secret_file),
            "--ack-mode",
            cfg.ack_mode,
            "--ack-timeout-ms",
            str(cfg.ack_timeout_ms),
            "--max-lag-ms",
            str(cfg.ack_timeout_ms),
            "--segment-bytes-max",
            str(cfg.segment_bytes_max),
            "--memtable-events-max",
            str(cfg.memtable_events_max),
            "--checkpoint-interval-ms",
            str(cfg.checkpoint_interval_ms),
        ]
        if leader is not None:
            args += ["--leader", leader]
        if self.admin:
            args += ["--admin-token-file", str(self.token_file)]
        return args

    def _process(self, node_id: str, role: str, leader: str | None) -> ServerProcess:
        env = {**self.config.server_env}
        return ServerProcess(
            self.root / node_id,
            module=self.config.server_module,
            node_id=node_id,
            fsync=self.config.fsync,
            extra_args=self._args(role, leader),
            log_path=self.root / f"{node_id}.log",
            env=env,
        )

    def start(self) -> None:
        """Start the leader, then every follower behind its own link; wait until they stream."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.secret_file.write_text(secrets.token_hex(16) + "\n")
        self.secret_file.chmod(0o600)
        self.token_file.write_text(secrets.token_hex(16) + "\n")
        self.token_file.chmod(0o600)
        leader_proc = self._process("n1", "leader", None)
        leader_proc.start(READY_TIMEOUT_S)
        target = self._replication_target(leader_proc)
        seed = self.config.seed
        leader = VerifyNode("n1", leader_proc, Link("n1", target, seed), "leader", NodeState.UP)
        self.nodes.append(leader)
        self._set_leader(leader)
        followers: list[VerifyNode] = []
        for n in range(2, self.config.nodes + 1):
            node_id = f"n{n}"
            link = Link(node_id, target, seed * 100 + n)
            proc = self._process(node_id, "follower", link.address)
            node = VerifyNode(node_id, proc, link, "follower")
            self.nodes.append(node)
            followers.append(node)
            proc.spawn()
        for node in followers:
            node.process.wait_ready(READY_TIMEOUT_S)
            node.state = NodeState.UP
        if followers:
            self.wait_in_sync(len(followers), 30.0)

    def _replication_target(self, proc: NodeProcess) -> tuple[str, int]:
        address = proc.replication_address
        if address is None:
            raise ClusterError(f"{proc.node_id} does not listen for followers: {proc.start_line}")
        return parse_address(address)

    def _set_leader(self, node: VerifyNode) -> None:
        self.leader = node
        self.write_target = (node.node_id, node.url)

    def wait_in_sync(self, count: int, timeout_s: float) -> None:
        """Wait until the leader counts ``count`` followers in sync; ClusterError otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.health(self.require_leader())
            if status is not None and status["replication"].get("in_sync_count", 0) >= count:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{count} followers were not in sync after {timeout_s} s")
            time.sleep(0.1)

    def close(self) -> None:
        """Stop every node (SIGKILL any that hangs) and every link. Idempotent."""
        with contextlib.suppress(Exception):
            self.stop_all()
        for node in self.nodes:
            node.process.kill()
            node.link.close()
        self._http.close()

    def stop_all(self) -> None:
        """SIGCONT then SIGTERM every running node, all at once (WALs flushed and closed)."""
        running = [n for n in self.nodes if n.process.running]
        for node in running:
            self._signal(node, signal.SIGCONT)
            node.state = NodeState.UP
        if running:
            with ThreadPoolExecutor(len(running)) as pool:
                list(pool.map(lambda n: n.process.stop(), running))
        for node in running:
            node.state = NodeState.DOWN

    # ------------------------------------------------------------------ looking at nodes

    def require_leader(self) -> VerifyNode:
        if self.leader is None:
            raise ClusterError("no leader")
        return self.leader

    def followers(self) -> list[VerifyNode]:
        return [n for n in self.nodes if n is not self.leader]

    def node(self, node_id: str) -> VerifyNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def health(self, node: VerifyNode) -> dict[str, Any] | None:
        """The node's ``/health`` document (also when it says unhealthy); None when it does
        not answer."""
        if node.state is not NodeState.UP or not node.url:
            return None
        try:
            response = self._http.get(f"{node.url}/health", timeout=2.0)
            body: dict[str, Any] = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        return body

    # ------------------------------------------------------------------ faults on processes

    def kill(self, node: VerifyNode) -> CrashImage:
        """SIGKILL the node, then read what its disk holds (it stays down)."""
        self._signal(node, signal.SIGCONT)  # a stopped process dies of SIGKILL too; be sure
        at = self.history.now()
        node.process.kill()
        node.state = NodeState.DOWN
        image = read_crash_image(node.node_id, self.root / node.node_id, at, node.role)
        self.history.crashes.append(image)
        return image

    def stop(self, node: VerifyNode) -> int:
        """SIGTERM: a clean shutdown; returns the exit code."""
        code = node.process.stop()
        node.state = NodeState.DOWN
        return code

    def restart(self, node: VerifyNode) -> None:
        """Start a node that is down on its data dir; a leader's links follow its new port,
        and a deposed leader is repointed to the current one."""
        node.process.start(READY_TIMEOUT_S)
        node.state = NodeState.UP
        if node is self.leader:
            self.write_target = (node.node_id, node.url)
            target = self._replication_target(node.process)
            for other in self.nodes:
                other.link.retarget(target)
        elif node.deposed:
            self.repoint(node)
            node.deposed = False

    def pause(self, node: VerifyNode) -> None:
        self._signal(node, signal.SIGSTOP)
        node.state = NodeState.PAUSED

    def resume(self, node: VerifyNode) -> None:
        self._signal(node, signal.SIGCONT)
        node.state = NodeState.UP

    @staticmethod
    def _signal(node: VerifyNode, sig: signal.Signals) -> None:
        proc = node.process.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    # ------------------------------------------------------------------ failover

    def _admin(self, node: VerifyNode, path: str, **params: str) -> httpx.Response:
        token = self.token_file.read_text().strip()
        return self._http.post(
            f"{node.url}{path}",
            params=params,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
        )

    def wait_disconnected(self, nodes: list[VerifyNode]) -> dict[str, dict[str, Any] | None]:
        """Wait until none of ``nodes`` thinks it is connected to the (dead) leader, which
        would refuse its promotion; their ``/health`` documents by node id."""
        deadline = time.monotonic() + 15.0
        while True:
            views = {n.node_id: self.health(n) for n in nodes}
            if all(v is not None and not v["replication"].get("connected") for v in views.values()):
                return views
            if time.monotonic() > deadline:
                raise ClusterError(f"followers still think they are connected: {views}")
            time.sleep(0.05)

    def try_promote(self, node: VerifyNode, peers: list[VerifyNode]) -> httpx.Response:
        """Ask ``node`` to promote itself, comparing with ``peers``, without forcing."""
        urls = ",".join(n.url for n in peers if n is not node)
        return self._admin(node, "/internal/promote", peers=urls, force="false")

    def promote_best(self) -> tuple[VerifyNode, str]:
        """With the leader down: promote the most caught-up live follower by (term, lsn),
        point every link at it and repoint the other followers. Returns the new leader and
        what was done."""
        live = [n for n in self.followers() if n.state is NodeState.UP]
        if not live:
            raise ClusterError("no live follower to promote")
        views = self.wait_disconnected(live)

        def position(n: VerifyNode) -> tuple[int, int, str]:
            view = views[n.node_id]
            assert view is not None
            # node id reversed in the key: ties go to the lowest id
            return (int(view["last_term"]), int(view["last_lsn"]), "~" + n.node_id)

        best = max(live, key=position)
        peers = ",".join(n.url for n in live if n is not best)
        response = self._admin(best, "/internal/promote", peers=peers, force="false")
        forced = False
        if response.status_code == 409:
            # refused for safety (a peer moved on meanwhile): say so, then take it anyway; the
            # checker will see whatever that costs
            forced = True
            response = self._admin(best, "/internal/promote", peers=peers, force="true")
        if response.status_code != 200:
            raise ClusterError(f"promote {best.node_id}: {response.status_code} {response.text}")
        answer: dict[str, Any] = response.json()
        self.adopt(best, answer)
        position_text = f"{answer.get('term')}/{answer.get('first_lsn')}"
        return best, f"term/first lsn {position_text}{' (forced)' if forced else ''}"

    def adopt(self, best: VerifyNode, answer: dict[str, Any]) -> None:
        """``best`` was promoted (its promote ``answer``): it leads, the old leader is deposed,
        every link points at it and every other live follower is repointed."""
        old = self.require_leader()
        address = answer.get("replication_address")
        if not address:
            raise ClusterError(f"promoted {best.node_id} does not listen: {answer}")
        target = parse_address(str(address))
        old.deposed = True
        old.role = "follower"
        best.role = "leader"
        self._set_leader(best)
        for other in self.nodes:
            other.link.retarget(target)
        for other in self.followers():
            if other is not old and other.state is NodeState.UP:
                self.repoint(other)

    def repoint(self, node: VerifyNode) -> None:
        """Make ``node`` follow the current leader through its own link."""
        response = self._admin(node, "/internal/repoint", leader=node.link.address)
        if response.status_code != 200:
            raise ClusterError(f"repoint {node.node_id}: {response.status_code} {response.text}")
        node.role = "follower"

    def forget_follower(self, leader: VerifyNode, node_id: str) -> bool:
        """Have ``leader`` forget follower ``node_id`` (its retention slot holds no WAL back
        any more); False when it knew no such follower."""
        response = self._admin(leader, "/internal/forget-follower", node_id=node_id)
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise ClusterError(
                f"forget {node_id} on {leader.node_id}: {response.status_code} {response.text}"
            )
        return True

    def wal_first_lsn(self, node: VerifyNode) -> int | None:
        """The first lsn still in the node's WAL (older ones are only in Parquet); None when
        it does not answer."""
        if node.state is not NodeState.UP or not node.url:
            return None
        try:
            response = self._http.get(f"{node.url}/api/v1/stats", timeout=2.0)
            return int(response.json()["wal_first_lsn"])
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    # ------------------------------------------------------------------ the end of the run

    def heal_all(self) -> None:
        """Heal every link, resume paused nodes and start the ones that are down."""
        for node in self.nodes:
            node.link.heal()
            node.link.proxy.set_refuse(False)
            if node.state is NodeState.PAUSED:
                self.resume(node)
        leader = self.require_leader()
        for node in [leader, *self.followers()]:
            if node.state is NodeState.DOWN:
                try:
                    self.restart(node)
                except (NodeStartError, ClusterError) as exc:
                    self.start_errors[node.node_id] = str(exc)
                    self.history.fault("heal", node.node_id, "note", f"could not start: {exc}")

    def wait_converged(self, timeout_s: float) -> float | None:
        """Seconds until every follower holds the leader's last lsn and term, streaming;
        None when ``timeout_s`` passed first."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        stable = 0
        while time.monotonic() < deadline:
            leader = self.health(self.require_leader())
            views = [self.health(n) for n in self.followers()]
            if leader is not None and all(
                v is not None
                and v["last_lsn"] == leader["last_lsn"]
                and v["last_term"] == leader["last_term"]
                and v["replication"].get("connected")
                for v in views
            ):
                stable += 1
                if stable >= 3:  # the same answer three polls in a row
                    return time.monotonic() - t0
            else:
                stable = 0
            time.sleep(0.1)
        return None

    def collect_final(self) -> list[NodeFinal]:
        """Read every node's events through its API, stop every node cleanly, then read
        their WALs, lost-and-found files and checkpoint manifests from disk."""
        finals: list[NodeFinal] = []
        for node in self.nodes:
            final = NodeFinal(node.node_id)
            view = self.health(node)
            if view is None:
                final.error = self.start_errors.get(
                    node.node_id, "did not answer /health after the heal"
                )
            else:
                final.role, final.term = str(view["role"]), int(view["term"])
                final.last_lsn = int(view["last_lsn"])
                try:
                    final.events = self.query_all(node)
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    final.error = f"query failed: {exc!r}"
            finals.append(final)
        self.stop_all()
        for node, final in zip(self.nodes, finals, strict=True):
            read_node_files(self.root / node.node_id, final)
        return finals

    def query_all(self, node: VerifyNode) -> list[dict[str, Any]]:
        """Every event the node serves, in lsn order: (id, lsn, term, entity_id, version)."""
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": QUERY_PAGE_EVENTS}
            if cursor is not None:
                params["cursor"] = cursor
            response = self._http.get(
                f"{node.url}/api/v1/events/query", params=params, timeout=60.0
            )
            response.raise_for_status()
            page = response.json()
            out.extend(
                {k: e[k] for k in ("id", "lsn", "term", "entity_id", "version")}
                for e in page["events"]
            )
            cursor = page.get("next_cursor")
            if not cursor:
                return out


def _event_id(body: bytes) -> str:
    decoded = decode_body(body)
    return "" if decoded.event_type.startswith(SYSTEM_PREFIX) else format_uuid(decoded.id)


def read_crash_image(node_id: str, data_dir: Path, at: float, role: str) -> CrashImage:
    """What a stopped node's WAL holds, read without changing anything. A torn record at the
    very end is where the log ends (the node cuts it on start); damage anywhere else is kept
    as ``error``."""
    wal_dir = data_dir / "wal"
    segments = list_segments(wal_dir) if wal_dir.is_dir() else []
    first = segments[0][0] if segments else 1
    records: dict[int, tuple[int, str]] = {}
    error = None
    try:
        for _, _, rec in iter_wal_records(wal_dir):
            records[rec.lsn] = (rec.term, _event_id(rec.body))
    except DumpStopped as exc:
        if not exc.in_last_segment:
            error = f"damaged WAL: {exc.damage}"
    except OSError as exc:
        error = f"unreadable WAL: {exc}"
    return CrashImage(node_id, at, role, first, records, error)


def read_node_files(data_dir: Path, final: NodeFinal) -> None:
    """Fill ``final`` from a stopped node's WAL, lost-and-found and manifest."""
    import json

    wal_dir = data_dir / "wal"
    segments = list_segments(wal_dir) if wal_dir.is_dir() else []
    final.wal_first_lsn = segments[0][0] if segments else 1
    try:
        for _, _, rec in iter_wal_records(wal_dir):
            final.wal.append((rec.lsn, rec.term, rec.chain, _event_id(rec.body)))
    except DumpStopped as exc:
        final.wal_error = f"damaged WAL after a clean stop: {exc.damage}"
    except OSError as exc:
        final.wal_error = f"unreadable WAL: {exc}"
    # lost-and-found (DATA_DIR/lost-found/*.jsonl, one JSON object per cut record)
    lost_dir = data_dir / "lost-found"
    if lost_dir.is_dir():
        for path in sorted(lost_dir.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    entry["file"] = path.name
                    final.lost_found.append(entry)
    manifest = data_dir / "checkpoints" / "manifest.json"
    if manifest.exists():
        doc = json.loads(manifest.read_text())
        final.checkpoint = (int(doc["last_lsn"]), int(doc["last_term"]), str(doc["chain"]))


def python_env_for(module: str) -> dict[str, str]:
    """Environment for a server module outside the installed package (a mutant in tests/):
    the current directory on PYTHONPATH, so ``python -m tests.mutants.X`` resolves."""
    if module == "walship" or module.startswith("walship."):
        return {}
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(paths)}
