"""Cascading catch-up: caught-up followers serve snapshots, so the leader does not have to.

A snapshot costs its sender a read of every Parquet part and a chunked send; a cluster that
adds or rebuilds followers pays it on the leader, beside the writes. A follower started with
``--serve-snapshots`` listens on its replication port and serves its own latest checkpoint
to other followers (``SnapshotServer``), through the very code the leader sends its own with
(``snapshot_send.py``), after the very handshake (shared secret, TLS). It serves only while
it is streaming from its leader and under ``max_lag_ms``; asked for a snapshot reaching an
lsn its checkpoint does not, it checkpoints first.

The joining follower (``Follower``) fetches one (``fetch_snapshot``) when its leader answers
``SnapshotRedirect`` (the leader names its in-sync followers that serve, and the lowest lsn
it can stream on from), or from ``--catch-up-from HOST:PORT`` first. The files are staged and
sha256-checked as any snapshot (``staging.py``), but *not installed*: the follower subscribes
to the leader at the staged position (``Subscribe.staged``) and installs only when the leader
answers ``SnapshotConfirmed`` -- the leader found that very record (lsn, term, chain) in its
own log and has its WAL after it -- with the leader's term history, not the source's. A
source that is down, refuses, lags, sends a snapshot that ends too early or one the leader
does not vouch for is given up: the follower asks the leader again without taking a redirect
and the leader sends its own (a fallback, counted). So a serving follower cannot hand out a
position, chain or term history the leader would not; what it can still hand out is its own
Parquet parts for that position, which it wrote from a log it verified record by record.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from walship.errors import (
    AuthenticationError,
    ProtocolError,
    ReplicationError,
    Unavailable,
    WalshipError,
)
from walship.position import Lsn, Position, Term
from walship.replication.config import ReplicationConfig, parse_address
from walship.replication.handshake import (
    HandshakeGate,
    authenticate_follower,
    authenticate_to,
    open_admitted,
)
from walship.replication.metrics import ReplicationMetrics
from walship.replication.protocol import (
    REDIRECT_ANY,
    REDIRECT_AUTO,
    REDIRECT_NO,
    Refused,
    SnapshotChunk,
    SnapshotConfirmed,
    SnapshotEnd,
    SnapshotResume,
    SnapshotStart,
    Subscribe,
    make_welcome,
)
from walship.replication.snapshot_send import SnapshotProgress, send_snapshot
from walship.replication.staging import SnapshotStaging
from walship.replication.stream import MessageStream
from walship.storage.manifest import CheckpointManifest
from walship.store import Store

log = logging.getLogger(__name__)


class SnapshotRedirected(ReplicationError):
    """The leader answered Subscribe with SnapshotRedirect: fetch the snapshot elsewhere."""

    code = "snapshot_redirected"
    retriable = True


class SourceUnusable(ReplicationError):
    """A snapshot source could not give a snapshot the leader will vouch for (down, lagging,
    refused, too old, or not on the leader's history): the follower falls back."""

    code = "snapshot_source_unusable"
    retriable = True


@dataclass
class StagedSnapshot:
    """A snapshot fetched whole from a serving follower, verified file by file, not installed."""

    source: str
    staging: SnapshotStaging
    manifest: CheckpointManifest
    terms: list[tuple[int, int]]

    @property
    def position(self) -> Position:
        return Position(Term(self.manifest.last_term), Lsn(self.manifest.last_lsn))

    def __repr__(self) -> str:
        return f"<StagedSnapshot from {self.source} up to lsn {self.manifest.last_lsn}>"


# ---------------------------------------------------------------------- the serving side


class SnapshotServer:
    """A follower's listener that serves its latest checkpoint to other followers.

    ``not_ready`` says why this node must not serve now (None: it may): a follower that is
    not streaming from its leader, or lags past ``max_lag_ms``, could hand out a snapshot the
    leader cannot continue.
    """

    def __init__(
        self,
        store: Store,
        config: ReplicationConfig,
        metrics: ReplicationMetrics,
        not_ready: Callable[[], str | None],
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.not_ready = not_ready
        self.handshakes = HandshakeGate(store.limits.unauthenticated_connections_max)
        self.port: int | None = None
        self.served = 0  # snapshots sent whole
        self.refused = 0  # asked while not ready, or without a checkpoint far enough
        self.active: dict[str, SnapshotProgress] = {}  # node id -> transfer in progress
        self._server: asyncio.Server | None = None
        self._listen_sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<SnapshotServer port={self.port} served={self.served} active={len(self.active)}>"

    @property
    def address(self) -> str | None:
        """``HOST:PORT`` other followers reach this server at (None: not listening)."""
        return None if self.port is None else self.config.published_address(self.port)

    def adopt_listener(self, sock: socket.socket) -> None:
        """Listen on ``sock`` (bound and listening) when started, instead of binding then
        (``walship serve`` binds first, so a port in use is a one-line start-up error)."""
        self._listen_sock = sock

    async def start(self) -> None:
        """Listen: on the adopted socket, else on the configured host and port."""
        config = self.config
        sock, self._listen_sock = self._listen_sock, None
        where: dict[str, Any] = (
            {"sock": sock} if sock is not None else {"host": config.host, "port": config.port}
        )
        self._server = await asyncio.start_server(
            self._accept,
            **where,
            ssl=self.config.server_ssl,
            ssl_handshake_timeout=(
                self.store.limits.handshake_timeout_ms / 1000
                if self.config.server_ssl is not None
                else None
            ),
            limit=1 << 20,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("replication: serving snapshots to other followers at %s", self.address)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self.port = None

    def status(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "snapshots_served": self.served,
            "refused": self.refused,
            "sending": {node: p.status() for node, p in self.active.items()},
        }

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self.store.limits
        admitted = await open_admitted(reader, writer, limits, self.handshakes, self.metrics)
        if admitted is None:
            return
        stream, slot = admitted
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        node_id = "?"
        try:
            assert self.config.secret is not None
            hello, challenge = await authenticate_follower(
                stream, limits, self.config.cluster_id, self.config.secret
            )
            slot.release()
            node_id = hello.node_id
            await stream.send(
                make_welcome(
                    self.config.secret,
                    hello,
                    challenge,
                    leader_node_id=self.store.config.node_id,
                    term=self.store.log.current_term.value,
                    leader_last_lsn=self.store.log.written_lsn.value,
                )
            )
            await self._serve(stream, node_id)
        except AuthenticationError as exc:
            self.metrics.auth_failures.inc()
            log.warning("replication: %s from %s (snapshot server)", exc.message, stream.peer)
            await stream.refuse(exc.code, exc.message)
        except WalshipError as exc:
            log.info("replication: not serving a snapshot to %s: %s", node_id, exc.message)
            await stream.refuse(exc.code, exc.message)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            slot.release()
            self.active.pop(node_id, None)
            await stream.close()
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, stream: MessageStream, node_id: str) -> None:
        timeout_s = self.store.limits.read_timeout_ms / 1000
        sub = await stream.expect(Subscribe, timeout_s)
        reason = self.not_ready()
        if reason is None and self.store.manifest.last_lsn < sub.snapshot_min_lsn:
            if self.store.visible_lsn >= sub.snapshot_min_lsn:
                # a checkpoint older than the leader's WAL is of no use: make a new one
                await asyncio.to_thread(self.store.checkpoint)
            if self.store.manifest.last_lsn < sub.snapshot_min_lsn:
                reason = (
                    f"its checkpoint reaches lsn {self.store.manifest.last_lsn}, not "
                    f"{sub.snapshot_min_lsn}"
                )
        if reason is not None:
            self.refused += 1
            raise Unavailable(f"{self.store.config.node_id} cannot serve a snapshot: {reason}")
        manifest = self.store.manifest
        await send_snapshot(
            self.store,
            manifest,
            stream,
            lambda: stream.expect(SnapshotResume, timeout_s),
            self.metrics,
            lambda progress: self.active.__setitem__(node_id, progress),
        )
        self.served += 1
        log.info("replication: served snapshot up to lsn %d to %s", manifest.last_lsn, node_id)
        # the receiver closes once it has the files; wait for that (or its silence)
        with contextlib.suppress(WalshipError, TimeoutError, ConnectionError, OSError):
            await stream.recv(timeout_s)


# ---------------------------------------------------------------------- the fetching side


class CascadeClient:
    """A follower's side of cascading: how it subscribes, the snapshot it fetched from a
    serving follower (staged until the leader vouches for it), and when it falls back.

    One per ``Follower``, used from its event loop. ``failed`` (a source failed: the next
    snapshot comes from the leader) is cleared by any snapshot installed.
    """

    def __init__(
        self, store: Store, config: ReplicationConfig, metrics: ReplicationMetrics, node_id: str
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.node_id = node_id
        self.serve_address = ""  # where this node serves snapshots (set by the node)
        self.snapshot_source: str | None = None  # who sent the last snapshot installed
        self.fallbacks = 0
        self.staged: StagedSnapshot | None = None
        self.staged_sent = False  # this session subscribed at the staged position
        self.failed = False
        self._fetching: tuple[str, SnapshotStaging] | None = None

    def __repr__(self) -> str:
        return f"<CascadeClient staged={self.staged!r} failed={self.failed}>"

    def subscription(self, http_url: str) -> Subscribe:
        """Where a session starts: the durable (or already queued) end of log, re-read from
        the WAL on every connect -- or the staged snapshot, for the leader to vouch for."""
        if self.failed:
            redirect = REDIRECT_NO  # a source failed: this snapshot comes from the leader
        else:
            redirect = REDIRECT_ANY if self.config.catch_up_from else REDIRECT_AUTO
        staged = self.staged
        self.staged_sent = staged is not None
        if staged is not None:
            position, chain = staged.position, staged.manifest.chain_bytes
        else:
            end = self.store.log.last_point
            position, chain = end.position, end.chain
        return Subscribe.at(
            position,
            chain,
            http_url,
            redirect=redirect,
            serve_address=self.serve_address,
            staged=staged is not None,
        )

    async def fetch(self, redirect: SnapshotRedirected, known_term: int) -> str | None:
        """Fetch the snapshot from ``--catch-up-from``, else the sources the leader named, in
        order, and stage it; None when staged, else why none served one (a fallback: the
        next snapshot comes from the leader)."""
        min_lsn = int(redirect.details["min_lsn"])
        sources = [self.config.catch_up_from or "", *redirect.details["sources"]]
        tried: list[str] = []
        for source in dict.fromkeys(s for s in sources if s and s != self.serve_address):
            try:
                staged = await fetch_snapshot(
                    source,
                    store=self.store,
                    config=self.config,
                    node_id=self.node_id,
                    known_term=known_term,
                    min_lsn=min_lsn,
                    on_staging=functools.partial(self._on_fetching, source),
                )
            except (WalshipError, OSError, TimeoutError) as exc:
                why = exc.message if isinstance(exc, WalshipError) else repr(exc)
                tried.append(f"{source}: {why}")
                log.warning("replication: no snapshot from %s: %s", source, why)
                continue
            self.staged = staged
            log.info(
                "replication: fetched snapshot %s up to lsn %d from %s; asking the leader "
                "to vouch for it",
                staged.staging.snapshot_id,
                staged.manifest.last_lsn,
                source,
            )
            return None
        self.give_up()
        return "no follower served a snapshot: " + ("; ".join(tried) or "none named")

    def _on_fetching(self, source: str, staging: SnapshotStaging | None) -> None:
        self._fetching = None if staging is None else (source, staging)

    def give_up(self) -> None:
        """The next snapshot comes from the leader: a source failed or none was usable."""
        self.failed = True
        self.fallbacks += 1
        self.metrics.snapshot_fallbacks.inc()
        log.warning("replication: falling back to the leader for a snapshot")

    def drop_staged(self, why: str) -> None:
        """Forget the staged snapshot and delete its files."""
        staged, self.staged, self.staged_sent = self.staged, None, False
        if staged is not None:
            log.info("replication: dropping the snapshot from %s: %s", staged.source, why)
            staged.staging.discard()

    def refused(self, reason: str) -> SourceUnusable:
        """The leader answered the staged position with Diverged: the source is given up
        (this node's own log is not in question, so no repair)."""
        source = "?" if self.staged is None else self.staged.source
        self.drop_staged(f"not on the leader's history ({reason})")
        self.give_up()
        return SourceUnusable(f"the leader does not vouch for the snapshot from {source}: {reason}")

    def confirmed(self, msg: SnapshotConfirmed) -> tuple[StagedSnapshot, list[tuple[int, int]]]:
        """The staged snapshot the leader vouched for, and the term history to install it
        with: the leader's. ProtocolError when the leader names another position;
        SourceUnusable (the snapshot dropped) when the source's history differs from it."""
        staged = self.staged
        if staged is None or not self.staged_sent:
            raise ProtocolError("SnapshotConfirmed without a staged snapshot")
        manifest = staged.manifest
        if (msg.lsn, msg.last_term, msg.chain) != (
            manifest.last_lsn,
            manifest.last_term,
            manifest.chain_bytes,
        ):
            raise ProtocolError("SnapshotConfirmed names another position than the staged one")
        terms = [(int(t), int(lsn)) for t, lsn in msg.term_history]
        upto = manifest.last_lsn
        if [e for e in staged.terms if e[1] <= upto] != [e for e in terms if e[1] <= upto]:
            self.drop_staged("its term history differs from the leader's")
            self.give_up()
            raise SourceUnusable(
                f"the snapshot from {staged.source} carries another term history than the "
                "leader's up to its lsn"
            )
        return staged, terms

    def installed(self, source: str) -> None:
        """A snapshot from ``source`` (``leader`` or a serving follower) was installed."""
        self.snapshot_source = source
        self.failed = False
        if source != "leader":
            self.staged, self.staged_sent = None, False
            self.metrics.snapshots_from_followers.inc()

    def transfer_status(self, installing: bool) -> dict[str, Any] | None:
        """The fetch in progress, or the staged snapshot waiting for the leader."""
        if self._fetching is not None:
            source, staging = self._fetching
            done, state = staging.bytes_done, "receiving"
        elif self.staged is not None:
            source, staging = self.staged.source, self.staged.staging
            done, state = staging.bytes_total, "installing" if installing else "confirming"
        else:
            return None
        return {
            "id": staging.snapshot_id,
            "state": state,
            "source": source,
            "bytes_done": done,
            "bytes_total": staging.bytes_total,
        }


async def fetch_snapshot(
    source: str,
    *,
    store: Store,
    config: ReplicationConfig,
    node_id: str,
    known_term: int,
    min_lsn: int,
    on_staging: Callable[[SnapshotStaging | None], None],
) -> StagedSnapshot:
    """Fetch and stage (not install) the snapshot a serving follower at ``source`` sends.

    Checked as any snapshot: it must reach ``min_lsn`` and this node's own end of log, be of
    no term above ``known_term``, and every file must match its sha256. SourceUnusable (or
    the error of the link) when it cannot be had; what was staged stays for a resume.
    """
    assert config.secret is not None
    limits = store.limits
    timeout_s = limits.read_timeout_ms / 1000
    host, port = parse_address(source, "snapshot source")
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=config.client_ssl,
            server_hostname=host if config.client_ssl is not None else None,
        )
    stream = MessageStream(
        reader,
        writer,
        limits.frame_bytes_max,
        handshake_frame_bytes_max=limits.handshake_frame_bytes_max,
    )
    staging: SnapshotStaging | None = None
    try:
        welcome = await authenticate_to(
            stream, config.secret, config.cluster_id, node_id, timeout_s
        )
        if welcome.term < known_term:
            raise SourceUnusable(
                f"{source} is at term {welcome.term}, behind term {known_term} known here"
            )
        end = store.log.last_point
        local_end = end.lsn.value
        await stream.send(Subscribe.at(end.position, end.chain, snapshot_min_lsn=min_lsn))
        first = await stream.recv(timeout_s)
        if isinstance(first, Refused):
            raise SourceUnusable(f"{source} refused ({first.code}): {first.message}")
        if not isinstance(first, SnapshotStart):
            raise ProtocolError(f"{source} sent {type(first).__name__}, not SnapshotStart")
        start = first
        if start.last_lsn < max(min_lsn, local_end):
            raise SourceUnusable(
                f"{source}'s snapshot ends at lsn {start.last_lsn}, before lsn "
                f"{max(min_lsn, local_end)} that it must reach"
            )
        if start.last_term > known_term:
            raise SourceUnusable(
                f"{source}'s snapshot is of term {start.last_term}, above term {known_term}"
            )
        staging = await asyncio.to_thread(SnapshotStaging.open, store.data_dir, start)
        on_staging(staging)
        await stream.send(staging.resume)
        while True:
            msg = await stream.recv(timeout_s)
            if isinstance(msg, SnapshotChunk):
                await asyncio.to_thread(staging.write, msg)
            elif isinstance(msg, SnapshotEnd) and msg.snapshot_id == start.snapshot_id:
                break
            else:
                raise ProtocolError(f"{source} sent {type(msg).__name__} inside a snapshot")
        manifest, terms = await asyncio.to_thread(staging.finish)
        staging.close()
        return StagedSnapshot(source, staging, manifest, terms)
    except BaseException:
        if staging is not None:
            staging.close()  # what is staged stays, for a resume
        raise
    finally:
        on_staging(None)
        await stream.close()
