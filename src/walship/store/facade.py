"""The ``Store`` facade: one face over a node's event store and its collaborators.

A store appends through the WAL and reads from memtables and Parquet parts. Its jobs live
in collaborators that share one ``StoreCore`` (``core.py``): the write path
(``writes.py``), a follower's apply (``apply.py``), reads (``reads.py``), checkpoints
(``checkpoints.py``), merges and part files (``parts.py``), the background threads
(``background.py``), snapshot installs and cuts (``rewind.py``), opening and recovery
(``recovery.py``) and the figures (``stats.py``). Its narrow entrances are ``writes``,
``reads`` and ``log`` (the replicated log, ``replicated_log.py``); the thin methods here
delegate to them for the many callers that hold a ``Store``. An open store holds its data
dir's lock (``dirlock.py``): no other process, and no other ``Store`` in this one, opens that
dir until ``close``.

Usable embedded::

    store = Store.open(StoreConfig(Path("data")))
    receipt = store.append(EventIn(entity_id="order-1", event_type="order.placed", payload=...))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from walship.dirlock import DataDirLock
from walship.errors import invariant
from walship.events import EventIn, StoredEvent, TrackingIn
from walship.metrics import StoreMetrics
from walship.position import Lsn, Position
from walship.replicated_log import ReplicatedLog
from walship.storage.alarm import CheckpointFailure
from walship.storage.consumers import ConsumerPosition
from walship.storage.cuts import LogCuts
from walship.storage.entity_reads import EntityReader, ReadView
from walship.storage.manifest import CheckpointManifest
from walship.storage.parquet import PartInfo
from walship.storage.query import QueryFilter
from walship.storage.write_amp import WriteAmplification
from walship.store.apply import FollowerApply
from walship.store.background import Background
from walship.store.checkpoints import Checkpoints
from walship.store.core import PartHook, StoreConfig, StoreCore
from walship.store.parts import Parts
from walship.store.reads import QueryResult, Reads
from walship.store.recovery import recover
from walship.store.rewind import Rewinds
from walship.store.stats import store_stats
from walship.store.writes import PendingAppend, WritePath
from walship.wal import Wal
from walship.wal.frame import VerifiedFrame
from walship.wal.log import WriteOutcome
from walship.wire import EntityState, Receipt

log = logging.getLogger(__name__)


class Store:
    """A node's events. Thread-safe; ``append`` blocks, ``submit`` does not."""

    def __init__(self, config: StoreConfig, metrics: StoreMetrics | None) -> None:
        core = StoreCore(config, metrics)
        self.core = core
        self.config = config
        self.limits = core.limits
        self.metrics = core.metrics
        self.data_dir = core.data_dir
        self.wal_dir = core.wal_dir
        self.checkpoint_dir = core.checkpoint_dir
        self.parts_dir = core.parts_dir
        self.writes = WritePath(core)  # the write path's entrance
        self.reads = Reads(core)  # the reads' entrance
        self.follower = FollowerApply(core)  # a follower's entrance for its leader's frames
        self.checkpoints = Checkpoints(core)
        self.parts = Parts(core)
        self.background = Background(core, self.checkpoints, self.parts)
        self.rewinds = Rewinds(core, self.background, self.follower.forget_after)
        self.cuts = LogCuts()  # divergence-repair cuts, for subscriptions following the log
        # a follower's: what it shows is bounded by its leader's durable lsn (a replication
        # entrance, like ``cuts``; storage/visibility.py)
        self.visible_bound = core.visible_bound
        self.log = ReplicatedLog(self)  # replication's front door to the WAL (not ``wal``)
        self.entities = EntityReader(self.read_view)  # stream reads by version, reads by id

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        config: StoreConfig,
        metrics: StoreMetrics | None = None,
        *,
        dir_lock: DataDirLock | None = None,
    ) -> Store:
        """Open or create the store in ``config.data_dir`` and recover it.

        First takes the data dir's lock (or adopts ``dir_lock``, already taken for that dir);
        ``close`` releases it. Loads the checkpoint manifest and parts, rebuilds entity
        versions, then recovers the WAL and replays records after the checkpoint into the
        memtable. Raises DataDirLocked (naming the holder's pid) when the dir is open elsewhere,
        CorruptionError (naming file and offset) when stored data is damaged beyond a torn WAL
        tail; the lock is released when opening fails.
        """
        if dir_lock is None:
            dir_lock = DataDirLock.acquire(config.data_dir)
        invariant(
            dir_lock.held and dir_lock.data_dir.resolve() == config.data_dir.resolve(),
            f"{dir_lock!r} is not a held lock of {config.data_dir}",
        )
        try:
            store = cls(config, metrics)
            store.core.dir_lock = dir_lock
            recover(store.core, store.follower.forget_after)
            store.background.start()
        except BaseException:
            dir_lock.release()
            raise
        return store

    def close(self) -> None:
        """Stop the background threads, checkpoint the memtable, close the WAL, release the
        data dir's lock. Idempotent.

        The checkpoint (when checkpoints are on) leaves every event of a clean stop in Parquet,
        where outside readers see it and the next start need not replay it; when it cannot be
        written the WAL still holds the events, so the stop goes on and says why. The WAL is
        closed however the checkpoint ends (an interrupt included), and the lock goes only
        once nothing of this store can write to the dir any more: a close interrupted before
        that keeps it until the process ends.
        """
        if os.getpid() != self.core.owner_pid:
            # a forked child leaving a ``with Store.open(...)`` block: the parent still writes
            # the dir, and a checkpoint or the WAL's close (which cuts the segment to the end
            # this copy knows) from here would destroy what the parent wrote since the fork
            self.core.closed = True
            return
        with self.core.lock:
            if self.core.closed:
                return
            self.core.closed = True
        self.background.stop()
        if self.core.part_worker is not None:
            self.core.part_worker.stopping()
        try:
            # every node, a physical follower too: a clean stop leaves the whole history in
            # Parquet for outside readers (``walship sql``, DuckDB). A physical follower's own
            # part for its tail is replaced when the leader's merge of that range comes in
            if self.core.config.checkpoints:
                self._checkpoint_at_close()
        finally:
            if self.core.part_worker is not None:
                self.core.part_worker.close()  # the checkpointer and compactor have stopped
            self.core.wal.close()
            if self.core.dir_lock is not None:
                self.core.dir_lock.release()

    def _checkpoint_at_close(self) -> None:
        if self.core.wal.failed is not None:
            log.warning("no checkpoint at close: the WAL has failed (%s)", self.core.wal.failed)
            return
        try:
            part = self.checkpoint()
        except Exception as exc:
            # the events are in the WAL already; the next start replays them
            log.warning("no checkpoint at close (the WAL keeps the events): %s", exc)
            return
        if part is not None:
            log.info("checkpointed %d events up to lsn %d at close", part.events, part.last_lsn)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_retention_floor(self, floor: Callable[[], int | None]) -> None:
        """Hook for replication: the lowest lsn some follower still needs (None: no need)."""
        self.core.retention_floor = floor

    # ------------------------------------------------------------------ state

    @property
    def wal(self) -> Wal:
        """The WAL; replication uses ``log`` instead (the store replaces it on a rewind)."""
        return self.core.wal

    @property
    def manifest(self) -> CheckpointManifest:
        with self.core.lock:
            return self.core.manifest

    def manifest_position(self) -> Position:
        """The position the checkpoint manifest covers up to."""
        return self.reads.manifest_position()

    @property
    def checkpoints_taken(self) -> int:
        return self.core.checkpoints_taken

    @property
    def compactions(self) -> int:
        return self.core.compactions

    @property
    def parquet_encodes(self) -> int:
        return self.core.parquet_encodes

    @property
    def parts_adopted(self) -> int:
        return self.core.parts_adopted

    @property
    def write_amp(self) -> WriteAmplification:
        return self.core.write_amp

    @property
    def began_first_term(self) -> bool:
        """This process began the log's first term (a new log: ``restart_term.py``)."""
        return self.core.began_first_term

    @property
    def parts_from_leader(self) -> bool:
        """True while a leader ships its parts here (no local checkpoints or merges until the
        memtable outgrows ``physical_fallback_percent`` of its budget)."""
        return self.core.parts_from_leader

    @parts_from_leader.setter
    def parts_from_leader(self, value: bool) -> None:
        self.core.parts_from_leader = value

    @property
    def on_part(self) -> PartHook | None:
        """Called with (kind, part, replaced parts, manifest) after each local checkpoint or
        merge is in the manifest, from the thread that made it (a leader ships it on)."""
        return self.core.on_part

    @on_part.setter
    def on_part(self, hook: PartHook | None) -> None:
        self.core.on_part = hook

    @property
    def checkpoint_failure(self) -> CheckpointFailure | None:
        """Why checkpoints fail now; None when the last one worked (or none has failed)."""
        return self.checkpoints.checkpoint_failure

    def stats(self) -> dict[str, Any]:
        return store_stats(self.core)

    # ------------------------------------------------------------------ writing (``writes``)

    def append(self, event: EventIn) -> Receipt:
        """Append one event and wait until it is as durable as the fsync policy makes it."""
        return self.writes.append(event)

    def append_batch(
        self, events: Sequence[EventIn], *, tracking: TrackingIn | None = None
    ) -> list[Receipt]:
        """``WritePath.append_batch``: all-or-nothing, waits for durability."""
        return self.writes.append_batch(events, tracking=tracking)

    def submit(
        self,
        events: Sequence[EventIn],
        *,
        json_checked: bool = False,
        tracking: TrackingIn | None = None,
    ) -> PendingAppend:
        """``WritePath.submit``: validate and queue without waiting for the disk."""
        return self.writes.submit(events, json_checked=json_checked, tracking=tracking)

    def append_system(self, event_type: str, payload: bytes) -> int:
        """``WritePath.append_system``: a record of walship's own; returns its lsn."""
        return self.writes.append_system(event_type, payload)

    def apply_frame(self, frame: VerifiedFrame) -> Future[WriteOutcome]:
        """``FollowerApply.apply_frame``: a verified frame of the leader's records."""
        return self.follower.apply_frame(frame)

    # ------------------------------------------------------------------ reading (``reads``)

    @property
    def visible_lsn(self) -> int:
        """The highest lsn readers may see: what the WAL has written."""
        return self.core.visible_lsn

    @property
    def last_position(self) -> Position:
        return self.core.wal.last_position

    def read_view(self) -> ReadView:
        return self.reads.read_view()

    def recent_events(
        self, after: int, to_lsn: int, limit: int, *, wait: bool = True
    ) -> list[StoredEvent] | None:
        return self.reads.recent_events(after, to_lsn, limit, wait=wait)

    def query(
        self, flt: QueryFilter, limit: int | None = None, cursor: str | None = None
    ) -> QueryResult:
        return self.reads.query(flt, limit, cursor)

    def tenant_position(self, tenant_id: str) -> tuple[int, int]:
        return self.reads.tenant_position(tenant_id)

    def consumer_position(self, tenant_id: str, consumer: str) -> ConsumerPosition | None:
        return self.reads.consumer_position(tenant_id, consumer)

    def entity_state(
        self,
        entity_id: str,
        tenant_id: str = "default",
        as_of_us: int | None = None,
        as_of_lsn: int | None = None,
    ) -> EntityState:
        return self.reads.entity_state(entity_id, tenant_id, as_of_us, as_of_lsn)

    def entity_version(self, entity_id: str, tenant_id: str = "default") -> int:
        return self.reads.entity_version(entity_id, tenant_id)

    # ------------------------------------------------------------------ parts

    def checkpoint(self) -> PartInfo | None:
        """``Checkpoints.checkpoint``: the memtable to a Parquet part now (None: nothing)."""
        return self.checkpoints.checkpoint()

    def checkpoint_through(self, lsn: Lsn) -> PartInfo | None:
        """``Checkpoints.checkpoint_through``: exactly the events up to ``lsn``."""
        return self.checkpoints.checkpoint_through(lsn)

    def compact(self) -> PartInfo | None:
        """``Parts.compact``: merge the next run of small parts (None: none to merge)."""
        return self.parts.compact()

    def pin_parts(self, names: Sequence[str]) -> list[str]:
        return self.parts.pin_parts(names)

    def unpin_parts(self, names: Sequence[str]) -> None:
        self.parts.unpin_parts(names)

    def hold_compaction(self, held: bool) -> None:
        self.parts.hold_compaction(held)

    # ------------------------------------------------------------------ rewinds

    def install_snapshot(
        self, staged: Path, manifest: CheckpointManifest, terms: list[tuple[int, int]]
    ) -> None:
        self.rewinds.install_snapshot(staged, manifest, terms)

    def truncate_after(self, lsn: Lsn) -> None:
        """``Rewinds.truncate_after``: cut the log after ``lsn`` (divergence repair)."""
        self.rewinds.truncate_after(lsn)

    def reset_to_empty(self) -> None:
        self.rewinds.reset_to_empty()

    def __repr__(self) -> str:
        state = "CLOSED" if self.core.closed else "OPEN"
        return f"<Store {self.config.node_id} {state} {self.data_dir}>"
