"""The event store of one node: appends through the WAL, reads from memtables and Parquet.

Appends are validated outside any lock, then, under the store lock, checked against stored
ids (idempotency) and entity versions (``expected_version``), given their versions and handed
to the WAL in one call, which assigns their lsns. Events go into the active memtable at once
but are only visible to readers once the WAL has written them (``visible_lsn``). When a full
disk makes the WAL roll a group back, the WAL calls ``_forget_after`` before any append can
take those lsns again: the events after the last written lsn leave the memtables, and their
entities' versions and ids are as if they were never appended. A background
thread checkpoints full or old memtables to Parquet parts and removes WAL segments that are
checkpointed and released by the retention hook. An open store holds its data dir's lock
(``dirlock.py``): no other process, and no other ``Store`` in this one, opens that dir until
``close``.

Usable embedded::

    store = Store.open(StoreConfig(Path("data")))
    receipt = store.append(EventIn(entity_id="order-1", event_type="order.placed", payload=...))
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import orjson

from walship.dirlock import DataDirLock
from walship.errors import (
    IdConflict,
    InvalidInput,
    StorageFull,
    Unavailable,
    VersionConflict,
    WalFailed,
    invariant,
)
from walship.events import (
    SYSTEM_PREFIX,
    EventIn,
    StoredEvent,
    TrackingIn,
    decode_body,
    encode_body_fields,
    encode_body_tuple,
    format_timestamp,
    format_uuid,
    new_event_ids,
    now_us,
    same_content,
    validate_tracking,
)
from walship.fsutil import atomic_write, fsync_dir
from walship.intake import prepare_batch
from walship.limits import DEFAULT_LIMITS, LSN_MAX, Limits
from walship.metrics import StoreMetrics
from walship.position import Lsn, Position, Term
from walship.replicated_log import ReplicatedLog
from walship.storage.alarm import CheckpointAlarm, CheckpointFailure
from walship.storage.compaction import merge_parts, pick_run
from walship.storage.consumers import (
    TRACKING_TYPE,
    ConsumerPosition,
    ConsumerTable,
    decode_tracking_payload,
    repeated_batch,
    table_at,
    tracking_body,
    tracking_conflict,
)
from walship.storage.cuts import LogCuts
from walship.storage.entity_reads import EntityReader, ReadView
from walship.storage.manifest import (
    INSTALL_MARKER,
    CheckpointManifest,
    load_manifest,
    save_manifest,
)
from walship.storage.memtable import Memtable
from walship.storage.parquet import PartInfo, PartReader, id_hashes, write_part
from walship.storage.part_worker import PartWorker
from walship.storage.pins import sweep_stale_pins
from walship.storage.positions import TenantPositions
from walship.storage.query import QueryFilter, entity_key
from walship.storage.write_amp import WriteAmplification
from walship.wal import FsyncPolicy, Record, Wal
from walship.wal.frame import VerifiedFrame
from walship.wal.log import WriteOutcome
from walship.wal.record import VerifiedRun
from walship.wal.segment import SegmentHeader, create_segment
from walship.wal.terms import FILE_NAME as TERMS_FILE
from walship.wal.truncate import truncate_wal
from walship.wire import EntityState, Receipt, TrackingReceipt

log = logging.getLogger(__name__)

_READERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="walship-parquet")


@dataclass(frozen=True)
class StoreConfig:
    """Where and how a store keeps its data."""

    data_dir: Path
    node_id: str = "walship-1"
    fsync: FsyncPolicy = field(default_factory=FsyncPolicy)
    limits: Limits = DEFAULT_LIMITS
    checkpoints: bool = True
    # checkpoint and merge parts in a worker process, off this process's GIL
    # (storage.part_worker); it is started with ``spawn``, which imports the program's main
    # module again: a script embedding the store keeps its own work under
    # ``if __name__ == "__main__":``, as multiprocessing asks
    part_worker: bool = False


class QueryResult(msgspec.Struct):
    events: list[StoredEvent]
    next_cursor: str | None


@dataclass
class PendingAppend:
    """Receipts of an append whose records are queued in the WAL; ``done`` resolves on write."""

    receipts: list[Receipt]
    done: Future[WriteOutcome] | None
    last_lsn: int
    waits_on: list[Future[WriteOutcome]] = field(default_factory=list)

    synced_lsn: int = 0
    tracking: TrackingReceipt | None = None  # the batch's tracking record, when it had one

    def finish(self, outcome: WriteOutcome | None) -> list[Receipt]:
        """Receipts with durability set from the WAL outcome (``local`` only when fsynced)."""
        synced = outcome.synced if outcome is not None else self.synced_lsn >= self.max_lsn
        if not synced:
            for r in self.answers:
                r.durability = "buffered"
        return self.receipts

    @property
    def answers(self) -> list[Receipt | TrackingReceipt]:
        """Every receipt of the append, its tracking's included."""
        out: list[Receipt | TrackingReceipt] = list(self.receipts)
        if self.tracking is not None:
            out.append(self.tracking)
        return out

    @property
    def max_lsn(self) -> int:
        return max((r.lsn for r in self.answers), default=0)

    @property
    def min_lsn(self) -> int:
        return min((r.lsn for r in self.answers), default=0)


class Store:
    """A node's events. Thread-safe; ``append`` blocks, ``submit`` does not."""

    def __init__(self, config: StoreConfig, metrics: StoreMetrics | None) -> None:
        self.config = config
        # the data dir, its WAL and its lock belong to the process that opened it: a child
        # forked with the store open inherits the object, not the dir (see ``close``)
        self._owner_pid = os.getpid()
        self.limits = config.limits
        self.metrics = metrics or StoreMetrics()
        self.data_dir = config.data_dir
        self.wal_dir = config.data_dir / "wal"
        self.checkpoint_dir = config.data_dir / "checkpoints"
        self.parts_dir = self.checkpoint_dir / "parts"
        self._lock = threading.RLock()
        self._checkpoint_done = threading.Condition(self._lock)
        self._applied = threading.Condition(threading.Lock())
        self._versions: dict[str, int] = {}
        self._positions = TenantPositions(self.limits.tenant_position_index_stride)
        self._consumers = ConsumerTable()
        self._active = Memtable()
        self._frozen: Memtable | None = None
        self._parts: list[PartReader] = []
        self._manifest = CheckpointManifest()
        self.cuts = LogCuts()  # divergence-repair cuts, for subscriptions following the log
        self.log = ReplicatedLog(self)  # replication's front door to the WAL (not ``wal``)
        self._retention_floor: Callable[[], int | None] = lambda: None
        self._closed = False
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_lock = threading.Lock()
        self._manifest_lock = threading.Lock()  # serializes manifest rewrites
        self._compaction_lock = threading.Lock()
        self._compactor: threading.Thread | None = None
        self._compact_kick = threading.Event()
        self._compaction_held = False
        self._pins: dict[str, int] = {}
        self._garbage: set[str] = set()
        self.checkpoints_taken = 0
        self.compactions = 0
        # Parquet encodes this node did itself (checkpoints and merges); a physical follower
        # installs the leader's parts instead (replication/physical.py) and keeps it at 0
        self.parquet_encodes = 0
        self.parts_adopted = 0
        # set while a leader ships its parts here: no local checkpoints or merges, until the
        # memtable outgrows ``physical_fallback_percent`` of its budget (``_due_for_checkpoint``)
        self.parts_from_leader = False
        # called with (kind, part, replaced parts, manifest) after each local checkpoint or
        # merge is in the manifest, from the thread that made it (a leader ships it on)
        self.on_part: Callable[[str, PartInfo, list[PartInfo], CheckpointManifest], None] | None = (
            None
        )
        self.write_amp = WriteAmplification()
        self._part_worker = PartWorker() if config.part_worker else None
        self._alarm = CheckpointAlarm(
            self.limits.checkpoint_retry_ms_min,
            self.limits.checkpoint_retry_ms_max,
            self.limits.checkpoint_failure_log_interval_ms,
        )
        self.wal: Wal
        self._dir_lock: DataDirLock | None = None
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
            store._dir_lock = dir_lock
            store._recover()
            store._start_background()
        except BaseException:
            dir_lock.release()
            raise
        return store

    def _start_background(self) -> None:
        """Start the checkpointer and the compactor (when checkpoints are on)."""
        self._stop = threading.Event()
        if self.config.checkpoints:
            self._checkpointer = threading.Thread(
                target=self._run_checkpointer, name="walship-checkpointer", daemon=True
            )
            self._checkpointer.start()
            self._compactor = threading.Thread(
                target=self._run_compactor, name="walship-compactor", daemon=True
            )
            self._compactor.start()

    def _stop_background(self) -> None:
        """Stop the checkpointer and the compactor and wait for them. Never call it holding a
        store lock: either thread may be waiting for one, and would never end."""
        self._stop.set()
        self._kick.set()
        self._compact_kick.set()
        for thread in (self._checkpointer, self._compactor):
            if thread is not None:
                thread.join()
        self._checkpointer = self._compactor = None

    def _recover(self) -> None:
        if (self.data_dir / INSTALL_MARKER).exists():
            self._finish_install()
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.parts_dir.glob("*.tmp"):
            stale.unlink()
        self._manifest = load_manifest(self.checkpoint_dir)
        self._consumers = ConsumerTable(self._manifest.consumers)
        referenced = {p.file for p in self._manifest.parts}
        for orphan in self.parts_dir.glob("*.parquet"):
            if orphan.name not in referenced:
                # written by a checkpoint or compaction that crashed before its manifest swap,
                # or replaced by a compaction that crashed before deleting it
                orphan.unlink()
        sweep_stale_pins(self.data_dir)
        self._parts = [PartReader(self.parts_dir / p.file, p) for p in self._manifest.parts]
        self._positions = TenantPositions(self.limits.tenant_position_index_stride)
        for part in self._parts:
            self._recover_positions(part)
        for part in self._parts:
            table = part.entity_versions()
            tenants = table.column("tenant_id").to_pylist()
            entities = table.column("entity_id").to_pylist()
            versions = table.column("version_max").to_pylist()
            for t, e, v in zip(tenants, entities, versions, strict=True):
                key = entity_key(t, e)
                if v > self._versions.get(key, 0):
                    self._versions[key] = v
        m = self._manifest
        checkpointed = m.last_lsn
        self._active.created_us = now_us()

        def replay(rec: Record) -> None:
            if rec.lsn > checkpointed:
                self._apply_record(rec)

        self.wal = Wal.open(
            self.wal_dir,
            fsync=self.config.fsync,
            limits=self.limits,
            start=(m.last_lsn, m.last_term, m.chain_bytes),
            on_record=replay,
            on_commit=self.metrics.on_commit,
            on_rollback=self._forget_after,
        )
        self.metrics.wal_failed.set_function(lambda: 0.0 if self.wal.failed is None else 1.0)
        if self.wal.torn_tail:
            log.warning("WAL recovery truncated a torn tail: %s", self.wal.torn_tail)
        first = self.wal.first_lsn().value
        last = self.wal.last_position.lsn.value
        if first > checkpointed + 1 or last < checkpointed:
            self.wal.close()
            from walship.errors import CorruptionError

            raise CorruptionError(
                f"{self.wal_dir}: the WAL holds lsn {first}..{last} but the checkpoint ends at "
                f"{checkpointed}: records {checkpointed + 1}..{first - 1} are missing"
            )
        if self.wal.terms.current == Term(0):
            self.wal.begin_term(Term(1))
        self.metrics.last_lsn.set(last)
        self._update_memtable_gauges()

    def _recover_positions(self, part: PartReader) -> None:
        """Tenant positions and position-index anchors from a part (parts in lsn order)."""
        table = part.tenant_positions()
        if table is None or table.num_rows == 0:
            return
        import pyarrow as pa

        stride = self._positions.stride
        positions = table.column("tenant_position").to_numpy()
        anchors = table.filter(pa.array((positions - 1) % stride == 0)).sort_by(
            [("tenant_id", "ascending"), ("tenant_position", "ascending")]
        )
        for t, p, lsn in zip(
            anchors.column("tenant_id").to_pylist(),
            anchors.column("tenant_position").to_pylist(),
            anchors.column("lsn").to_pylist(),
            strict=True,
        ):
            self._positions.observe_anchor(t, p, lsn)
        last = table.group_by("tenant_id").aggregate([("tenant_position", "max"), ("lsn", "max")])
        # positions grow with lsn within a tenant: the highest position is at the highest lsn
        for t, p, lsn in zip(
            last.column("tenant_id").to_pylist(),
            last.column("tenant_position_max").to_pylist(),
            last.column("lsn_max").to_pylist(),
            strict=True,
        ):
            self._positions.observe_last(t, p, lsn)

    # ------------------------------------------------------------------ snapshots

    def install_snapshot(
        self, staged: Path, manifest: CheckpointManifest, terms: list[tuple[int, int]]
    ) -> None:
        """Replace everything this store holds with a snapshot (a follower catching up).

        ``staged`` holds the manifest's part files, already verified. The new state is built
        beside the old one and swapped in by renames behind a marker file, so a crash midway
        is finished on the next open; afterwards the WAL continues at ``manifest.last_lsn + 1``.
        """

        for part in manifest.parts:
            if not (staged / part.file).is_file():
                raise InvalidInput(f"snapshot part {part.file} is missing from {staged}")
        self._stop_background()  # before the locks: a thread may be waiting for one of them
        with self._checkpoint_lock, self._compaction_lock, self._lock:
            # carried over to the new WAL: the node's commit pulse wakes read-your-writes
            # waiters and subscriptions, which otherwise fall back to polling
            listeners = self.wal.listeners
            self.wal.close()
            new = self.data_dir / "install"
            shutil.rmtree(new, ignore_errors=True)
            (new / "checkpoints" / "parts").mkdir(parents=True)
            (new / "wal").mkdir()
            for part in manifest.parts:
                os.replace(staged / part.file, new / "checkpoints" / "parts" / part.file)
            save_manifest(new / "checkpoints", manifest)
            kept = [(t, lsn) for t, lsn in terms if lsn <= manifest.last_lsn] or [
                (max(manifest.last_term, 1), max(manifest.last_lsn, 1))
            ]
            atomic_write(new / "wal" / TERMS_FILE, msgspec.json.encode(kept))
            create_segment(
                new / "wal",
                SegmentHeader(manifest.last_lsn + 1, manifest.last_term, manifest.chain_bytes),
            )
            fsync_dir(new / "checkpoints" / "parts")
            fsync_dir(new)
            atomic_write(self.data_dir / INSTALL_MARKER, b"installing snapshot\n")
            self._finish_install()
            self._versions = {}
            self._active = Memtable()
            self._frozen = None
            self._parts = []
            self._recover()
            for listener in listeners:
                self.wal.add_listener(listener)
        self._start_background()

    def _finish_install(self) -> None:
        """Swap ``install/`` in for ``wal/`` and ``checkpoints/``; safe to repeat after a crash."""
        new = self.data_dir / "install"
        trash = self.data_dir / "install-trash"
        trash.mkdir(exist_ok=True)
        for name in ("wal", "checkpoints"):
            if (new / name).exists():
                if (self.data_dir / name).exists():
                    shutil.rmtree(trash / name, ignore_errors=True)
                    os.replace(self.data_dir / name, trash / name)
                os.replace(new / name, self.data_dir / name)
        fsync_dir(self.data_dir)
        (self.data_dir / INSTALL_MARKER).unlink(missing_ok=True)
        fsync_dir(self.data_dir)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(new, ignore_errors=True)

    # ------------------------------------------------------------------ divergence repair

    def truncate_after(self, lsn: int) -> None:
        """Cut the log after ``lsn`` (divergence repair): WAL records, term history, memtable
        and entity versions, all re-derived from what is left on disk.

        The caller has stopped everything that appends. InvalidInput when ``lsn`` is below the
        checkpoint (Parquet parts are not cut: use ``reset_to_empty`` and a snapshot instead).
        """

        self._stop_background()  # before the locks: a thread may be waiting for one of them
        try:
            with self._checkpoint_lock, self._lock:
                if lsn < self._manifest.last_lsn:
                    raise InvalidInput(
                        f"cannot cut after lsn {lsn}: the checkpoint covers up to "
                        f"{self._manifest.last_lsn}"
                    )
                if lsn >= self.wal.last_position.lsn.value:
                    return
                self._reopen(lambda: truncate_wal(self.wal_dir, lsn, self.limits.record_bytes_max))
        finally:
            self._start_background()

    def reset_to_empty(self) -> None:
        """Drop everything this store holds (divergence repair below the checkpoint: the
        leader then sends it all again). Crash-safe like ``install_snapshot``."""
        empty = self.data_dir / "install-empty"
        shutil.rmtree(empty, ignore_errors=True)
        empty.mkdir()
        self.install_snapshot(empty, CheckpointManifest(), [])  # listeners carried over
        shutil.rmtree(empty, ignore_errors=True)

    def _reopen(self, change: Callable[[], None]) -> None:
        """Close the WAL, apply ``change`` to the files, recover again (listeners carried
        over). Called with both store locks held and the background threads stopped."""
        listeners = self.wal.listeners
        self.wal.close()
        change()
        self._versions = {}
        self._active = Memtable()
        self._frozen = None
        self._parts = []
        self._recover()
        for listener in listeners:
            self.wal.add_listener(listener)

    def append_system(self, event_type: str, payload: bytes) -> int:
        """Append a record of walship's own (``_system.*``, e.g. the first record of a new
        term) and wait for its write; returns its lsn. Readers never see it; followers store
        it like any record."""
        from walship.events import validate_event_type

        invariant(event_type.startswith(SYSTEM_PREFIX), f"{event_type} is not a system type")
        validate_event_type(event_type, self.limits, system=True)
        with self._lock:
            self._check_writable()
            body = encode_body_fields(
                new_event_ids(1)[0], "default", "_system", event_type, now_us(), 0, payload, None
            )
            result = self.wal.append([body])
            self.metrics.last_lsn.set(result.last_lsn.value)
        result.done.result()
        return result.last_lsn.value

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
        if os.getpid() != self._owner_pid:
            # a forked child leaving a ``with Store.open(...)`` block: the parent still writes
            # the dir, and a checkpoint or the WAL's close (which cuts the segment to the end
            # this copy knows) from here would destroy what the parent wrote since the fork
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop_background()
        try:
            # every node, a physical follower too: a clean stop leaves the whole history in
            # Parquet for outside readers (``walship sql``, DuckDB). A physical follower's own
            # part for its tail is replaced when the leader's merge of that range comes in
            if self.config.checkpoints:
                self._checkpoint_at_close()
        finally:
            if self._part_worker is not None:
                self._part_worker.close()  # the checkpointer and compactor have stopped
            self.wal.close()
            if self._dir_lock is not None:
                self._dir_lock.release()

    def _checkpoint_at_close(self) -> None:
        if self.wal.failed is not None:
            log.warning("no checkpoint at close: the WAL has failed (%s)", self.wal.failed)
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
        self._retention_floor = floor

    # ------------------------------------------------------------------ writing

    def append(self, event: EventIn) -> Receipt:
        """Append one event and wait until it is as durable as the fsync policy makes it."""
        return self.append_batch([event])[0]

    def append_batch(
        self, events: Sequence[EventIn], *, tracking: TrackingIn | None = None
    ) -> list[Receipt]:
        """Append events all-or-nothing and wait for durability; receipts in input order.

        ``tracking``: a consumer's position stored in the same append (see ``submit``)."""
        pending = self.submit(events, tracking=tracking)
        outcome = None
        for fut in pending.waits_on:
            outcome = fut.result()
        if pending.done is not None:
            outcome = pending.done.result()
        return pending.finish(outcome)

    def submit(
        self,
        events: Sequence[EventIn],
        *,
        json_checked: bool = False,
        tracking: TrackingIn | None = None,
    ) -> PendingAppend:
        """Validate and queue events without waiting for the disk.

        All-or-nothing: a validation error or a version conflict anywhere queues nothing.
        Events whose id is already stored are answered with their original receipt.
        ``json_checked``: the events were decoded from JSON, so their payload and metadata
        need no second parse (the HTTP routes); a caller's own ``Raw`` is parsed.
        ``tracking``: a consumer's position, stored in the same WAL append (``events`` may
        then be empty); TrackingConflict, and nothing queued, unless it is above the stored one
        or the batch repeats the one that stored it (answered as a duplicate, ``_repeat_locked``).
        """
        limits = self.limits
        if tracking is not None:
            validate_tracking(tracking, limits)
        elif not events:
            raise InvalidInput("a batch needs at least one event (or a tracking)")
        if len(events) > limits.batch_events_max:
            from walship.errors import LimitExceeded

            raise LimitExceeded(
                f"batch of {len(events)} events exceeds the limit of {limits.batch_events_max}",
                limit=limits.batch_events_max,
            )
        prepared = prepare_batch(events, limits, json_checked=json_checked)
        self._check_owner()  # before any lock: one a lost thread held at the fork never frees
        self.metrics.append_requests.inc()
        with self._lock:
            self._check_writable()
            self._throttle_locked()
            if tracking is not None:
                # before anything queues; a tracking equal to the stored one passes only as
                # an exact repeat of its batch (a retry after a lost answer): a duplicate
                repeat_of = self._consumers.check(
                    tracking, limits.consumers_max, limits.consumers_per_tenant_max
                )
                if repeat_of is not None:
                    return self._repeat_locked(tracking, prepared, repeat_of)
            ts = now_us()
            timestamp = format_timestamp(ts)
            # the store lock serializes every append, so the WAL will assign exactly these
            next_lsn = self.wal.last_position.lsn.value + 1
            term = self.wal.terms.current.value
            receipts: list[Receipt] = []
            bodies: list[bytes] = []
            new_events: list[StoredEvent] = []
            batch_versions: dict[str, int] = {}
            batch_positions: dict[str, int] = {}  # tenant -> the next position it gets
            batch_ids: dict[bytes, tuple[int, int]] = {}  # id -> its receipt, its new event
            waits_on: list[Future[WriteOutcome]] = []
            generated = new_event_ids(len(events))
            for n, ((given_id, tenant, entity, etype, payload, meta, binary), ev) in enumerate(
                zip(prepared, events, strict=True)
            ):
                event_id = given_id or generated[n]
                if ev.id is not None:
                    if event_id in batch_ids:
                        first, at = batch_ids[event_id]
                        if not same_content(
                            new_events[at], tenant, entity, etype, payload, meta, binary
                        ):
                            raise IdConflict(
                                f"event id {format_uuid(event_id)} appears twice in the batch "
                                f"(at {first} and {n}) with different contents",
                                event_id=format_uuid(event_id),
                                index=n,
                                first_index=first,
                            )
                        receipts.append(receipts[first])
                        continue
                    existing = self._find_id_locked(event_id)
                    if existing is not None:
                        if not same_content(existing, tenant, entity, etype, payload, meta, binary):
                            raise IdConflict(
                                f"event id {format_uuid(event_id)} is already stored at lsn "
                                f"{existing.lsn} as {existing.event_type!r} of entity "
                                f"{existing.entity_id!r} with other contents: a new event "
                                "needs a new id",
                                event_id=format_uuid(event_id),
                                stored={
                                    "lsn": existing.lsn,
                                    "term": existing.term,
                                    "tenant_id": existing.tenant_id,
                                    "entity_id": existing.entity_id,
                                    "event_type": existing.event_type,
                                    "version": existing.version,
                                    "timestamp": format_timestamp(existing.timestamp_us),
                                },
                                **({"index": n} if len(events) > 1 else {}),
                            )
                        self.metrics.duplicates.inc()
                        receipts.append(self._receipt_of(existing, duplicate=True))
                        if existing.lsn > self.wal.written_lsn.value:
                            waits_on.append(self.wal.append_future())
                        continue
                    batch_ids[event_id] = (len(receipts), len(new_events))
                key = entity_key(tenant, entity)
                current = batch_versions.get(key)
                if current is None:
                    current = self._versions.get(key, 0)
                if ev.expected_version is not None and ev.expected_version != current:
                    self.metrics.conflicts.inc()
                    raise VersionConflict(
                        f"entity {entity!r} is at version {current}, "
                        f"expected {ev.expected_version}",
                        entity_id=entity,
                        tenant_id=tenant,
                        expected_version=ev.expected_version,
                        current_version=current,
                    )
                version = current + 1
                batch_versions[key] = version
                # under the store lock like lsns: a batch's positions are consecutive per
                # tenant, and a refused batch (raised above or below) takes none
                position = batch_positions.get(tenant) or self._positions.next_position(tenant)
                batch_positions[tenant] = position + 1
                lsn = next_lsn + len(new_events)
                fields = (event_id, tenant, entity, etype, ts, version, payload, meta, position)
                new_events.append(StoredEvent(lsn, term, *fields, payload_binary=binary))
                bodies.append(
                    encode_body_tuple(fields)
                    if position and not binary
                    else encode_body_fields(*fields, payload_binary=binary)
                )
                receipts.append(
                    Receipt(format_uuid(event_id), lsn, term, version, timestamp, position=position)
                )
            track: ConsumerPosition | None = None
            if tracking is not None:
                # last in the append: it commits with (never before) the events it follows
                track = ConsumerPosition(
                    tracking.tenant_id,
                    tracking.consumer,
                    tracking.position,
                    next_lsn + len(new_events),
                )
                bodies.append(tracking_body(tracking, ts))
            if not bodies:
                return PendingAppend(
                    receipts, None, 0, waits_on, synced_lsn=self.wal.synced_lsn.value
                )
            size = sum(map(len, bodies))
            if size > limits.append_bytes_max:
                from walship.errors import LimitExceeded

                # every follower holds an append in memory until its last record arrives
                raise LimitExceeded(
                    f"the batch's records take {size} bytes, over the limit of "
                    f"{limits.append_bytes_max} for one atomic append",
                    limit=limits.append_bytes_max,
                )
            result = self.wal.append(bodies)
            invariant(
                result.first_lsn.value == next_lsn and result.term.value == term,
                f"WAL assigned lsn {result.first_lsn.value}, the store expected {next_lsn}",
            )
            self._active.add_all(new_events)
            self._versions.update(batch_versions)
            observe = self._positions.observe
            for stored in new_events:
                observe(stored.tenant_id, stored.tenant_position, stored.lsn)
            if track is not None:
                self._consumers.apply(track, self.wal.written_lsn.value)
            self.metrics.appends.inc(len(bodies))
            self.metrics.last_lsn.set(result.last_lsn.value)
        pending = PendingAppend(receipts, result.done, result.last_lsn.value, waits_on)
        if track is not None:
            pending.tracking = TrackingReceipt(
                track.consumer, track.tenant_id, track.position, track.lsn, term
            )
        return pending

    def _repeat_locked(
        self,
        tracking: TrackingIn,
        prepared: list[tuple[bytes, str, str, str, bytes, bytes | None, bool]],
        stored: ConsumerPosition,
    ) -> PendingAppend:
        """The answer to a batch whose tracking equals the stored one: its original receipts
        and tracking receipt marked duplicate, nothing queued; TrackingConflict unless it is
        an exact repeat of the batch that stored it (``repeated_batch``)."""
        found = repeated_batch(prepared, stored, self._find_id_locked)
        if found is None:
            raise tracking_conflict(tracking, stored)
        self.metrics.duplicates.inc(len(found))
        receipts = [self._receipt_of(ev, duplicate=True) for ev in found]
        term = self.wal.terms.term_at(Lsn(stored.lsn)).value
        waits_on: list[Future[WriteOutcome]] = []
        if stored.lsn > self.wal.written_lsn.value:  # the original is still being written
            waits_on.append(self.wal.append_future())
        pending = PendingAppend(receipts, None, 0, waits_on, synced_lsn=self.wal.synced_lsn.value)
        pending.tracking = TrackingReceipt(
            stored.consumer, stored.tenant_id, stored.position, stored.lsn, term, duplicate=True
        )
        return pending

    def would_block(self) -> bool:
        """True when ``submit`` would wait for a checkpoint (memtables over twice their budget)
        or for WAL space; an event loop should then call it from a thread."""
        limits = self.limits
        return self.wal.backlogged() or (
            len(self._active) >= 2 * limits.memtable_events_max
            or self._active.bytes >= 2 * limits.memtable_bytes_max
        )

    def _check_writable(self) -> None:
        if self._closed:
            raise Unavailable("the store is closed")
        self._check_owner()
        failed = self.wal.failed
        if failed is not None:
            if isinstance(failed, StorageFull):
                raise StorageFull(failed.message)  # passes; a fresh error each time
            raise failed

    def _check_owner(self) -> None:
        if os.getpid() != self._owner_pid:
            # its WAL writer thread did not survive the fork: an append would wait for ever
            raise Unavailable(
                f"this store was opened by pid {self._owner_pid}: a forked process cannot "
                "write to it (open the data dir in the process that writes)"
            )

    def _throttle_locked(self) -> None:
        """Wake the checkpointer when the active memtable is full; block appends while it holds
        twice its budget (checkpoints are behind), so memory stays bounded."""
        limits = self.limits
        if (
            len(self._active) >= limits.memtable_events_max
            or self._active.bytes >= limits.memtable_bytes_max
        ):
            self._kick.set()
        deadline = time.monotonic() + 30
        while self._checkpointer is not None and (
            len(self._active) >= 2 * limits.memtable_events_max
            or self._active.bytes >= 2 * limits.memtable_bytes_max
        ):
            self._kick.set()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = self.checkpoint_failure
                raise Unavailable(
                    "checkpointing is behind; try again"
                    if failure is None
                    else f"checkpoints are failing ({failure.error}); the memtable is full",
                    retry_after_ms=1000,
                )
            self._checkpoint_done.wait(min(remaining, 0.1))

    def _receipt_of(self, ev: StoredEvent, *, duplicate: bool = False) -> Receipt:
        return Receipt(
            format_uuid(ev.id),
            ev.lsn,
            ev.term,
            ev.version,
            format_timestamp(ev.timestamp_us),
            duplicate=duplicate,
            position=ev.tenant_position,
        )

    def _find_id_locked(self, event_id: bytes) -> StoredEvent | None:
        found = self._active.by_id.get(event_id)
        if found is None and self._frozen is not None:
            found = self._frozen.by_id.get(event_id)
        if found is None:
            for part in reversed(self._parts):
                found = part.find_id(event_id)
                if found is not None:
                    break
        return found

    def _forget_after(self, lsn: int) -> None:
        """WAL rollback listener (writer thread): drop the events after ``lsn`` from the
        memtables, and put their entities' versions back to what they were before them."""
        wal = self.wal
        while not self._lock.acquire(timeout=0.05):
            if wal.closing:
                # closed under the store lock (a snapshot install or a cut), which waits for
                # this thread: the memtables are rebuilt from the files, which are already cut
                return
        try:
            removed = self._active.truncate_after(lsn)
            if self._frozen is not None:
                removed += self._frozen.truncate_after(lsn)
            lowest: dict[str, int] = {}
            lowest_positions: dict[str, int] = {}
            for ev in removed:
                key = entity_key(ev.tenant_id, ev.entity_id)
                lowest[key] = min(ev.version, lowest.get(key, ev.version))
                if ev.tenant_position > 0:
                    was = lowest_positions.get(ev.tenant_id, ev.tenant_position)
                    lowest_positions[ev.tenant_id] = min(was, ev.tenant_position)
            # the rolled-back positions are given again, as the lsns are
            self._positions.forget_after(lsn, lowest_positions)
            self._consumers.forget_after(lsn)
            for key, version in lowest.items():
                # an entity's versions run 1, 2, 3 ... in lsn order: the removed ones are its last
                if version > 1:
                    self._versions[key] = version - 1
                else:
                    self._versions.pop(key, None)
            self.metrics.last_lsn.set(lsn)
        finally:
            self._lock.release()
        if removed:
            log.info(
                "forgot %d events after lsn %d (rolled back by a full disk)", len(removed), lsn
            )
        self._update_memtable_gauges()

    # ------------------------------------------------------------------ applying shipped records

    def _apply_record(self, rec: Record) -> None:
        """Add a WAL record (recovery) to the memtable and versions."""
        self._apply_records((rec,), None)

    def _apply_records(self, records: Sequence[Record], written_lsn: int | None) -> None:
        """Add WAL records (recovery or replication) to the memtable and versions, and
        tracking records to the consumer table (``written_lsn``: what the WAL has written,
        None in recovery)."""
        self._apply_bodies([(rec.lsn, rec.term, rec.body) for rec in records], written_lsn)

    def _apply_bodies(
        self, records: Iterable[tuple[int, int, bytes | memoryview]], written_lsn: int | None
    ) -> None:
        """``_apply_records`` from each record's ``(lsn, term, body)``."""
        events: list[StoredEvent] = []
        add = events.append
        decode = decode_body
        for lsn, term, raw in records:
            body = decode(raw)
            if not body.event_type.startswith(SYSTEM_PREFIX):
                # stored_from_body, inlined: this runs for every record a follower applies
                add(
                    StoredEvent(
                        lsn,
                        term,
                        body.id,
                        body.tenant_id,
                        body.entity_id,
                        body.event_type,
                        body.timestamp_us,
                        body.version,
                        body.payload,
                        body.metadata,
                        body.tenant_position,
                        body.payload_binary,
                    )
                )
            elif body.event_type == TRACKING_TYPE:
                position = decode_tracking_payload(body.payload)
                entry = ConsumerPosition(body.tenant_id, body.entity_id, position, lsn)
                self._consumers.apply(entry, written_lsn)
        self._active.add_all(events)
        versions = self._versions
        observe = self._positions.observe
        for ev in events:
            tenant_id, version = ev.tenant_id, ev.version
            key = f"{tenant_id}\x00{ev.entity_id}"  # entity_key, inlined (per record)
            if version > versions.get(key, 0):
                versions[key] = version
            # taken from the record the leader wrote, never assigned here
            observe(tenant_id, ev.tenant_position, ev.lsn)

    def apply_frame(self, frame: VerifiedFrame) -> Future[WriteOutcome]:
        """``apply_run`` for a verified frame of whole appends (``wal/frame.py``): written to
        the WAL as one buffer, indexed from views of it."""
        with self._lock:
            self._check_writable()
            written = self.wal.written_lsn.value
            fut = self.wal.append_frame(frame)
            if frame.record_count:
                self._apply_bodies(frame.entries(), written)
                self.metrics.appends.inc(frame.record_count)
                self.metrics.last_lsn.set(frame.last_lsn)
        return fut

    def apply_run(self, run: VerifiedRun) -> Future[WriteOutcome]:
        """Append records another node wrote (a follower) and index them; returns the write."""
        records = run.records
        with self._lock:
            self._check_writable()
            written = self.wal.written_lsn.value
            fut = self.wal.append_run(run)
            self._apply_records(records, written)
            if records:
                self.metrics.appends.inc(len(records))
                self.metrics.last_lsn.set(records[-1].lsn)
        return fut

    # ------------------------------------------------------------------ reading

    @property
    def visible_lsn(self) -> int:
        """The highest lsn readers may see: what the WAL has written."""
        return self.wal.written_lsn.value

    @property
    def last_position(self) -> Position:
        return self.wal.last_position

    def term_at(self, lsn: int) -> int:
        """The term that wrote ``lsn`` by this node's term history (0 for lsn 0); meaningful
        for an lsn this node holds (at most ``last_position``)."""
        return self.wal.terms.term_at(Lsn(lsn)).value

    def read_view(self) -> ReadView:
        """What a read may see now: parts, memtables, checkpointed and visible lsn."""
        with self._lock:
            memtables = [m for m in (self._frozen, self._active) if m is not None]
            # read under the lock, after the parts: every part listed was written (synced)
            # before it was added, so it holds nothing past this
            visible = self.visible_lsn
            return ReadView(
                list(self._parts),
                memtables,
                self._manifest.last_lsn,
                visible,
                self._lock,
                self._versions,
            )

    def recent_events(
        self, after: int, to_lsn: int, limit: int, *, wait: bool = True
    ) -> list[StoredEvent] | None:
        """The visible events after lsn ``after`` through ``to_lsn``, at most ``limit``, when
        the memtables hold them all (the live tail's read). None when some may be only in a
        Parquet part (``query`` reads those), or when ``wait`` is False and an append holds
        the store lock: the event loop reads here only when it need not wait, since handing
        the read to a worker thread costs two GIL hand-offs (each up to the switch interval
        on a busy loop, ``runtime.py``)."""
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            if after < self._manifest.last_lsn:
                return None
            to_lsn = min(to_lsn, self.visible_lsn)
            flt = QueryFilter(from_lsn=after + 1, to_lsn=to_lsn)
            out: list[StoredEvent] = []
            for mem in (self._frozen, self._active):
                if mem is not None and len(out) < limit:
                    out.extend(mem.select(flt, to_lsn, limit - len(out)))
            return out
        finally:
            self._lock.release()

    def query(
        self, flt: QueryFilter, limit: int | None = None, cursor: str | None = None
    ) -> QueryResult:
        """Matching events in lsn order, at most ``limit``; ``next_cursor`` when more may follow.

        The cursor is the last lsn returned; pass it back to continue after it.
        """
        lim = self.limits.query_limit_default if limit is None else limit
        if not 1 <= lim <= self.limits.query_limit_max:
            raise InvalidInput(f"limit must be 1..{self.limits.query_limit_max}", field="limit")
        if flt.entity_id is not None and flt.tenant_id is None:
            flt = _replace(flt, tenant_id="default")
        for name, lsn in (("from_lsn", flt.from_lsn), ("to_lsn", flt.to_lsn)):
            # the Parquet lsn column is int64: pyarrow cannot even compare it with a larger int
            if lsn is not None and not 0 <= lsn <= LSN_MAX:
                raise InvalidInput(f"{name} must be 0..{LSN_MAX}", field=name)
        if cursor is not None:
            try:
                after = int(cursor)
            except ValueError as exc:
                raise InvalidInput(f"invalid cursor {cursor!r}", field="cursor") from exc
            if not 0 <= after < LSN_MAX:
                raise InvalidInput(f"invalid cursor {cursor!r}", field="cursor")
            flt = _replace(flt, from_lsn=max(flt.from_lsn, after + 1))
        if flt.by_position:
            flt = self._narrow_by_position(flt)
        visible = self.visible_lsn
        with self._lock:
            parts = list(self._parts)
            memtables = [m for m in (self._frozen, self._active) if m is not None]
            checkpointed = self._manifest.last_lsn
        want = lim + 1
        out: list[StoredEvent] = []
        candidates = [p for p in parts if p.could_match(flt, visible)]
        if flt.entity_id is not None and len(candidates) > 1:
            # an entity touches one row group per part: read the parts in parallel (pyarrow
            # releases the GIL while decoding), then keep lsn order
            for found in _READERS.map(lambda p: p.select(flt, want), candidates):
                out.extend(found[: want - len(out)])
        else:
            for part in candidates:
                out.extend(part.select(flt, want - len(out)))
                if len(out) >= want:
                    break
        if len(out) < want:
            for mem in memtables:
                with self._lock:
                    got = mem.select(flt, visible, want - len(out))
                # a memtable being checkpointed may already be in a part: skip what parts hold
                out.extend(ev for ev in got if ev.lsn > checkpointed)
                if len(out) >= want:
                    break
        more = len(out) > lim
        out = out[:lim]
        return QueryResult(out, str(out[-1].lsn) if more and out else None)

    def _narrow_by_position(self, flt: QueryFilter) -> QueryFilter:
        """``flt`` with its lsn bounds narrowed to the window the position index gives for
        its tenant positions (the position predicates stay: they are exact)."""
        if flt.tenant_id is None:
            raise InvalidInput(
                "from_position/to_position count within one tenant: name tenant_id",
                field="tenant_id",
            )
        for name, pos in (("from_position", flt.from_position), ("to_position", flt.to_position)):
            if pos is not None and not 0 <= pos <= LSN_MAX:
                raise InvalidInput(f"{name} must be 0..{LSN_MAX}", field=name)
        with self._lock:
            lo, hi = self._positions.lsn_window(
                flt.tenant_id, flt.from_position or 0, flt.to_position
            )
        to_lsn = flt.to_lsn if hi is None or (flt.to_lsn is not None and flt.to_lsn < hi) else hi
        return _replace(flt, from_lsn=max(flt.from_lsn, lo), to_lsn=to_lsn)

    def tenant_position(self, tenant_id: str) -> tuple[int, int]:
        """``(position, lsn)`` of the tenant's last event visible here; ``(0, 0)`` for none.

        The last one assigned may not be written yet: then the last visible one is read
        through the position index (a few of the tenant's events at most)."""
        with self._lock:
            position, lsn = self._positions.last(tenant_id)
        if position == 0 or (lsn != 0 and lsn <= self.visible_lsn):
            return position, lsn
        visible = self.visible_lsn
        lo = max(1, position - self.limits.tenant_position_index_stride)
        found = self._last_event(QueryFilter(tenant_id=tenant_id, from_position=lo, to_lsn=visible))
        if found is None and lo > 1:
            # none visible in the last stride: older writes still in flight (rare)
            found = self._last_event(
                QueryFilter(tenant_id=tenant_id, from_position=1, to_position=lo, to_lsn=visible)
            )
        return (0, 0) if found is None else (found.tenant_position, found.lsn)

    def consumer_position(self, tenant_id: str, consumer: str) -> ConsumerPosition | None:
        """The consumer's last tracked position visible here; None when it has none."""
        with self._lock:
            # under the lock: the undo log is trimmed (under it) only below what the WAL had
            # written then, so an entry past this visible lsn still has its undo record; read
            # before the lock, a tracking written and trimmed meanwhile hid the consumer (404)
            return self._consumers.visible(tenant_id, consumer, self.visible_lsn)

    def _last_event(self, flt: QueryFilter) -> StoredEvent | None:
        """The last event ``flt`` matches, read page by page; None when none does."""
        last: StoredEvent | None = None
        cursor: str | None = None
        while True:
            page = self.query(flt, self.limits.query_limit_max, cursor)
            if page.events:
                last = page.events[-1]
            if page.next_cursor is None:
                return last
            cursor = page.next_cursor

    def entity_state(
        self,
        entity_id: str,
        tenant_id: str = "default",
        as_of_us: int | None = None,
        as_of_lsn: int | None = None,
    ) -> EntityState:
        """Payloads of the entity's events merged in order (objects merge, others replace).

        ``as_of_us``/``as_of_lsn`` stop at that time or lsn. Raises NotFound for an entity
        with no events in range.
        """
        from walship.errors import NotFound

        flt = QueryFilter(tenant_id=tenant_id, entity_id=entity_id, until_us=None, to_lsn=as_of_lsn)
        if as_of_us is not None:
            flt = _replace(flt, until_us=as_of_us + 1)
        state: Any = None
        version = 0
        last_lsn = 0
        count = 0
        updated: str | None = None
        cursor: str | None = None
        while True:
            page = self.query(flt, self.limits.query_limit_max, cursor)
            for ev in page.events:
                value = ev.payload if ev.payload_binary else orjson.loads(ev.payload)
                if isinstance(value, dict) and isinstance(state, dict):
                    state = {**state, **value}
                else:
                    state = value
                version, last_lsn, count = ev.version, ev.lsn, count + 1
                updated = format_timestamp(ev.timestamp_us)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        if count == 0:
            raise NotFound(f"entity {entity_id!r} has no events", entity_id=entity_id)
        encoding = "base64" if isinstance(state, bytes) else None
        return EntityState(tenant_id, entity_id, version, state, last_lsn, updated, count, encoding)

    def entity_version(self, entity_id: str, tenant_id: str = "default") -> int:
        with self._lock:
            return self._versions.get(entity_key(tenant_id, entity_id), 0)

    def stats(self) -> dict[str, Any]:
        wal = self.wal.status()
        with self._lock:
            mem_events = len(self._active) + (len(self._frozen) if self._frozen else 0)
            mem_bytes = self._active.bytes + (self._frozen.bytes if self._frozen else 0)
            m = self._manifest
            return {
                "node_id": self.config.node_id,
                "last_lsn": wal.last_lsn,
                "term": self.wal.terms.current.value,
                "visible_lsn": wal.written_lsn,
                "synced_lsn": wal.synced_lsn,
                "events": m.events + mem_events,
                "entities": len(self._versions),
                "memtable_events": mem_events,
                "memtable_bytes": mem_bytes,
                "checkpoint_lsn": m.last_lsn,
                "parquet_parts": len(m.parts),
                "parquet_events": m.events,
                "parquet_bytes": sum(p.bytes for p in m.parts),
                "checkpoints_taken": self.checkpoints_taken,
                "compactions": self.compactions,
                "parquet_encodes": self.parquet_encodes,
                "parts_adopted": self.parts_adopted,
                "parts_from_leader": self.parts_from_leader,
                "compaction_held": self._compaction_held,
                "checkpoint_failing": self.checkpoint_failure is not None,
                "wal_first_lsn": self.wal.first_lsn().value,
                "wal_segments": wal.segments,
                "wal_bytes": wal.bytes,
                "fsync": str(self.config.fsync),
                "wal_failed": wal.failed,
                **self.write_amp.as_stats(),
            }

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> PartInfo | None:
        """Write everything visible in memtables to a Parquet part now.

        Returns the part written, or None when there was nothing to checkpoint. A failure is
        raised to the caller and also kept as ``checkpoint_failure`` until one works.
        """
        with self._checkpoint_lock:
            try:
                part = self._checkpoint_once()
            except (WalFailed, StorageFull):
                raise  # the WAL's own state says it (a full disk's rollback retries at once)
            except Exception as exc:
                self._checkpoint_failed(exc)
                raise
        ended = self._alarm.succeeded()
        self.metrics.checkpoint_failing.set(0)
        if ended:
            log.warning("checkpoints work again after %d failed attempts", ended)
        return part

    def _checkpoint_failed(self, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        self.metrics.checkpoint_failures.inc()
        self.metrics.checkpoint_failing.set(1)
        if self._alarm.failed(error, time.monotonic(), time.time()):
            failure = self._alarm.state(time.monotonic())
            assert failure is not None
            log.error(
                "checkpoint failing (%d attempts since %s; next in %d ms): %s -- every event "
                "is still in the WAL, but the memtable grows until writes are refused; see "
                "docs/operations.md, 'Checkpoints failing'",
                failure.failures,
                format_timestamp(int(failure.since_s * 1_000_000)),
                failure.retry_in_ms,
                error,
                exc_info=failure.failures == 1,
            )

    @property
    def checkpoint_failure(self) -> CheckpointFailure | None:
        """Why checkpoints fail now; None when the last one worked (or none has failed)."""
        return self._alarm.state(time.monotonic())

    def checkpoint_through(self, lsn: int) -> PartInfo | None:
        """Checkpoint exactly the events up to ``lsn`` (written here already): a physical
        follower rebuilding from its own WAL the range of a leader's part it refused, so that
        the next part lines up again, with the consumer table as of ``lsn`` (rebuilt from the
        last checkpoint's and the WAL when consumers tracked after it)."""
        with self._checkpoint_lock:
            if lsn <= self._manifest.last_lsn:
                return None
            return self._checkpoint_once(through=lsn)

    def _split_at(self, lsn: int) -> tuple[Position, bytes, list[Any]] | None:
        """Position, chain and consumer table at ``lsn`` for a checkpoint through it; None
        when ``lsn`` is not written here."""
        if lsn > self.wal.written_lsn.value:
            return None
        consumers = self._consumers.entries()
        if any(c.lsn > lsn for c in consumers):
            # consumers tracked after ``lsn``: their table then is the checkpoint's plus the
            # tracking records the WAL holds up to ``lsn`` (a whole checkpoint instead would
            # overshoot the leader's next part, and every later part would be refused too)
            after = self._manifest.last_lsn + 1
            records = ((r.lsn, r.body) for r in self.wal.read_from(Lsn(after)))
            consumers = table_at(self._manifest.consumers, records, lsn)
        for rec in self.wal.read_from(Lsn(lsn)):
            return Position(Term(rec.term), Lsn(lsn)), rec.chain, consumers
        return None

    def _checkpoint_once(self, through: int | None = None) -> PartInfo | None:
        t0 = time.perf_counter()
        split = None
        if through is not None and through < self.wal.last_position.lsn.value:
            split = self._split_at(through)
        with self._lock:
            if len(self._active) == 0:
                return None
            frozen = self._active
            if split is not None:
                assert through is not None
                upto, chain, consumers = split
                # two new memtables, the old one left as it is: a reader's view holds it
                events = frozen.events
                cut = bisect.bisect_right(events, through, key=_lsn_of)
                if cut == 0:
                    return None
                frozen, rest = Memtable(), Memtable()
                frozen.created_us = rest.created_us = self._active.created_us
                frozen.add_all(events[:cut])
                rest.add_all(events[cut:])
                self._active = rest
            else:
                self._active = Memtable()
                self._active.created_us = now_us()
                upto = self.wal.last_position
                chain = self.wal.last_chain
                consumers = self._consumers.entries()  # as of ``upto``, like the memtable
            self._frozen = frozen
            rollback_seq = self.wal.rollback_seq
        try:
            self.wal.sync()
            if rollback_seq % 2 or self.wal.rollback_seq != rollback_seq:
                # a full disk rolled back some of what was frozen: its lsns may have been
                # taken again since, by events that are not in ``frozen``
                raise StorageFull("a full disk rolled back events being checkpointed; retrying")
            events = frozen.events
            invariant(events[-1].lsn <= upto.lsn.value, "memtable holds records past the WAL's end")
            first = self._manifest.last_lsn + 1
            rows = self.limits.parquet_row_group_rows
            if self._part_worker is not None:
                part = self._part_worker.checkpoint(
                    self.parts_dir, events, first, upto.lsn.value, rows
                )
            else:
                part = write_part(self.parts_dir, events, first, upto.lsn.value, rows)
            self.parquet_encodes += 1
            reader = PartReader(self.parts_dir / part.file, part)
            arr = id_hashes([ev.id for ev in events])
            arr.sort()
            reader.set_id_hashes(arr)
            with self._manifest_lock:
                manifest = self._manifest.advanced(
                    part, upto.lsn.value, upto.term.value, chain, now_us(), consumers
                )
                save_manifest(self.checkpoint_dir, manifest)
                with self._lock:
                    self._manifest = manifest
                    self._parts.append(reader)
                    self._frozen = None
        except BaseException:
            with self._lock:
                # put the events back in front of anything appended meanwhile
                merged = Memtable()
                merged.created_us = frozen.created_us
                merged.add_all(frozen.events)
                merged.add_all(self._active.events)
                self._active = merged
                self._frozen = None
                self._checkpoint_done.notify_all()
            raise
        self.write_amp.checkpointed(part)
        with self._lock:
            self.checkpoints_taken += 1
            self._checkpoint_done.notify_all()
        self._announce("checkpoint", part, [], manifest)
        self._compact_kick.set()
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
        self.metrics.checkpoint_events.inc(len(events))
        self._update_memtable_gauges()
        self.remove_checkpointed_wal()
        return part

    # ------------------------------------------------------------------ compaction

    def compact(self) -> PartInfo | None:
        """Merge the next run of small consecutive parts into one; None when there is none."""
        with self._compaction_lock:
            with self._lock:
                parts = list(self._parts)
            run = pick_run(
                [p.info for p in parts],
                self.limits.compaction_fanin_min,
                self.limits.compaction_events_max,
            )
            if run is None:
                return None
            t0 = time.perf_counter()
            inputs = parts[run[0] : run[1]]
            rows = self.limits.parquet_row_group_rows
            if self._part_worker is not None:
                info, hashes = self._part_worker.merge(self.parts_dir, inputs, rows)
            else:
                info, hashes = merge_parts(self.parts_dir, inputs, rows)
            self.parquet_encodes += 1
            reader = PartReader(self.parts_dir / info.file, info)
            reader.set_id_hashes(hashes)
            manifest = self.replace_parts({p.info.file for p in inputs}, info, reader)
            self.compactions += 1
            self.write_amp.compacted(info)
            self._announce("merge", info, [p.info for p in inputs], manifest)
            self._collect_garbage()
            # the pins of outside readers that have ended hold parts merged away: free them
            sweep_stale_pins(self.data_dir)
            log.info(
                "compacted %d parts (%d events) into %s in %.2f s",
                len(inputs),
                info.events,
                info.file,
                time.perf_counter() - t0,
            )
            return info

    def _announce(
        self, kind: str, part: PartInfo, replaced: list[PartInfo], manifest: CheckpointManifest
    ) -> None:
        hook = self.on_part
        if hook is not None:
            try:
                hook(kind, part, replaced, manifest)
            except Exception:
                log.exception("shipping %s part %s failed", kind, part.file)

    def pin_parts(self, names: Sequence[str]) -> list[str]:
        """Keep these part files on disk until ``unpin_parts`` (a snapshot being sent)."""
        with self._lock:
            for name in names:
                self._pins[name] = self._pins.get(name, 0) + 1
        return list(names)

    def unpin_parts(self, names: Sequence[str]) -> None:
        with self._lock:
            for name in names:
                left = self._pins.get(name, 0) - 1
                if left <= 0:
                    self._pins.pop(name, None)
                else:
                    self._pins[name] = left
        self._collect_garbage()

    def replace_parts(
        self, names: set[str], info: PartInfo, reader: PartReader
    ) -> CheckpointManifest:
        """Put the part ``info`` (read by ``reader``) where the parts ``names`` stand in the
        manifest, in their place: the manifest saved, then parts and readers swapped under the
        lock, and the old files left to ``_collect_garbage``. A merge of this node's and a
        merge taken from the leader (``storage/adopt.py``) both go through here; the caller
        holds the compaction lock."""
        with self._manifest_lock:
            current = self._manifest
            kept = [p for p in current.parts if p.file not in names]
            at = next(i for i, p in enumerate(current.parts) if p.file in names)
            kept.insert(at, info)
            manifest = msgspec.structs.replace(current, parts=kept, created_us=now_us())
            save_manifest(self.checkpoint_dir, manifest)
            with self._lock:
                self._manifest = manifest
                readers = [p for p in self._parts if p.info.file not in names]
                readers.insert(at, reader)
                self._parts = readers
                self._garbage.update(names)
        return manifest

    def _collect_garbage(self) -> None:
        """Delete replaced part files that no snapshot transfer still reads."""
        with self._lock:
            doomed = [n for n in self._garbage if n not in self._pins]
            self._garbage.difference_update(doomed)
        for name in doomed:
            (self.parts_dir / name).unlink(missing_ok=True)
        if doomed:
            fsync_dir(self.parts_dir)

    def hold_compaction(self, held: bool) -> None:
        """Hold background compaction back (a follower catching up), or let it go again.

        Like a bulk load into RocksDB: merging parts while a follower replays a long stretch of
        WAL competes with the replay for the same cores, and merges parts that the next
        checkpoints would soon merge again. While held, compaction runs only once the parts
        pile up to ``compaction_held_parts_max``, so queries never face an unbounded count.
        Explicit ``compact()`` calls are not affected.
        """
        self._compaction_held = held
        if not held:
            self._compact_kick.set()

    def _may_compact(self) -> bool:
        if self.parts_from_leader:
            return False  # the leader's merges arrive as parts (replication/physical.py)
        # no lock: len() of the list is atomic, and a stale count costs one pass at most
        return not self._compaction_held or (
            len(self._parts) >= self.limits.compaction_held_parts_max
        )

    def _run_compactor(self) -> None:
        swept_at = time.monotonic()
        while not self._stop.is_set():
            self._compact_kick.wait(1.0)
            self._compact_kick.clear()
            if self._stop.is_set():
                return
            if time.monotonic() - swept_at >= self.limits.pin_sweep_interval_ms / 1000:
                # a merge sweeps too, but an idle node may not merge again for days, while a
                # dead reader's pin holds the space of every part merged away under it
                swept_at = time.monotonic()
                try:
                    sweep_stale_pins(self.data_dir)
                except OSError as exc:
                    log.warning("could not sweep the pins of ended readers: %s", exc)
            try:
                while (
                    not self._stop.is_set() and self._may_compact() and self.compact() is not None
                ):
                    pass
            except Exception:
                log.exception("compaction failed; will retry")
                self._stop.wait(5.0)

    def remove_checkpointed_wal(self) -> list[Path]:
        """Remove WAL segments covered by the checkpoint and released by the retention hook."""
        upto = self._manifest.last_lsn
        floor = self._retention_floor()
        if floor is not None:
            upto = min(upto, floor - 1)
        return self.wal.remove_segments_through(Lsn(max(upto, 0)))

    def _due_for_checkpoint(self) -> bool:
        with self._lock:
            active = self._active
            if len(active) == 0:
                return False
            age_ms = (now_us() - active.created_us) / 1000
            limits = self.limits
            # while the leader's parts arrive, wait for them up to a larger budget: past it
            # they stopped coming (or lag), and memory is bounded by checkpointing here
            scale = limits.physical_fallback_percent / 100 if self.parts_from_leader else 1
            return (
                len(active) >= limits.memtable_events_max * scale
                or active.bytes >= limits.memtable_bytes_max * scale
                or age_ms >= limits.checkpoint_interval_ms * scale
            )

    def _run_checkpointer(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(0.1)
            self._kick.clear()
            if self._stop.is_set():
                return
            if self.wal.failed is not None:
                continue
            if self._due_for_checkpoint() and self._alarm.retry_due(time.monotonic()):
                try:
                    self.checkpoint()
                except WalFailed:
                    log.error("checkpoint skipped: the WAL has failed")
                except StorageFull as exc:
                    log.warning("checkpoint skipped: %s", exc.message)
                except Exception:
                    pass  # logged and kept by the alarm; retried after its backoff
            self._update_memtable_gauges()

    def _update_memtable_gauges(self) -> None:
        with self._lock:
            n = len(self._active) + (len(self._frozen) if self._frozen else 0)
            b = self._active.bytes + (self._frozen.bytes if self._frozen else 0)
        self.metrics.memtable_events.set(n)
        self.metrics.memtable_bytes.set(b)

    def manifest_position(self) -> Position:
        """The position the checkpoint manifest covers up to."""
        m = self.manifest
        return Position(Term(m.last_term), Lsn(m.last_lsn))

    @property
    def manifest(self) -> CheckpointManifest:
        with self._lock:
            return self._manifest

    def __repr__(self) -> str:
        state = "CLOSED" if self._closed else "OPEN"
        return f"<Store {self.config.node_id} {state} {self.data_dir}>"


def _lsn_of(ev: StoredEvent) -> int:
    return ev.lsn


def _replace(flt: QueryFilter, **changes: Any) -> QueryFilter:
    import dataclasses

    return dataclasses.replace(flt, **changes)
