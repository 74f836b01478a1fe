"""The state a store's collaborators share, in one explicit object.

``StoreCore`` holds what the write path, the follower apply, the reads, the checkpoints and
merges, the rewinds and the stats all work on: the store lock, the WAL, the memtables, the
parts and the manifest, the entity versions, tenant positions and consumer table, and the
counters a node reports. The collaborators (the other modules of this package) hold the core,
never each other's insides; the ``Store`` facade (``facade.py``) wires them together.

Locks, outermost first: ``checkpoint_lock`` and ``compaction_lock`` (one checkpoint, one
merge at a time), ``manifest_lock`` (manifest rewrites), ``lock`` (everything in memory).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from walship.dirlock import DataDirLock
from walship.errors import StorageFull, Unavailable
from walship.events import StoredEvent, format_timestamp, format_uuid
from walship.limits import DEFAULT_LIMITS, Limits
from walship.metrics import StoreMetrics
from walship.position import Lsn
from walship.storage.alarm import CheckpointAlarm
from walship.storage.consumers import ConsumerTable
from walship.storage.fallback import FallbackThreshold
from walship.storage.id_index import IdIndexFiles
from walship.storage.manifest import CheckpointManifest
from walship.storage.memtable import Memtable
from walship.storage.parquet import PartInfo, PartReader
from walship.storage.part_worker import PartWorker
from walship.storage.positions import TenantPositions
from walship.storage.visibility import VisibleBound
from walship.storage.write_amp import WriteAmplification
from walship.wal import FsyncPolicy, Wal
from walship.wire import Receipt

# called with (kind, part, replaced parts, manifest) after each local checkpoint or merge
PartHook = Callable[[str, PartInfo, list[PartInfo], CheckpointManifest], None]


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


class StoreCore:
    """A store's shared state; its collaborators read and change it under ``lock``."""

    wal: Wal

    def __init__(self, config: StoreConfig, metrics: StoreMetrics | None) -> None:
        self.config = config
        # the data dir, its WAL and its lock belong to the process that opened it: a child
        # forked with the store open inherits the object, not the dir (see ``Store.close``)
        self.owner_pid = os.getpid()
        self.limits = config.limits
        self.metrics = metrics or StoreMetrics()
        self.data_dir = config.data_dir
        self.wal_dir = config.data_dir / "wal"
        self.checkpoint_dir = config.data_dir / "checkpoints"
        self.parts_dir = self.checkpoint_dir / "parts"
        self.id_index = IdIndexFiles(self.checkpoint_dir / "ids")  # parts' id hashes, mapped
        self.lock = threading.RLock()
        self.checkpoint_done = threading.Condition(self.lock)
        self.checkpoint_lock = threading.Lock()
        self.manifest_lock = threading.Lock()  # serializes manifest rewrites
        self.compaction_lock = threading.Lock()
        self.versions: dict[str, int] = {}
        self.positions = TenantPositions(self.limits.tenant_position_index_stride)
        self.consumers = ConsumerTable()
        self.active = Memtable()
        self.frozen: Memtable | None = None
        self.parts: list[PartReader] = []
        self.manifest = CheckpointManifest()
        self.retention_floor: Callable[[], int | None] = lambda: None
        self.closed = False
        # set by appends when the memtable is full, by checkpoints when there is a new part
        self.kick = threading.Event()
        self.compact_kick = threading.Event()
        self.checkpointing = False  # the background checkpointer runs (appends may wait on it)
        self.compaction_held = False
        self.pins: dict[str, int] = {}
        self.garbage: set[str] = set()
        self.checkpoints_taken = 0
        self.compactions = 0
        # Parquet encodes this node did itself (checkpoints and merges); a physical follower
        # installs the leader's parts instead (replication/physical.py) and keeps it at 0
        self.parquet_encodes = 0
        self.parts_adopted = 0
        # set while a leader ships its parts here: no local checkpoints or merges, until the
        # memtable outgrows its fallback threshold (``fallback``; ``Checkpoints.due``)
        self.parts_from_leader = False
        self.fallback = FallbackThreshold(self.limits)  # how long it waits for them
        self.own_parts: set[str] = set()  # parts in the manifest this node encoded itself
        # a physical follower merges its own parts only up to here: past it the leader's parts
        # over them are still to come (storage/realign.py)
        self.own_merges_through = 0
        # and keeps its WAL past here, where the leader's parts received so far end
        self.leader_parts_through = 0
        # a follower's: the leader's durable lsn bounds what it shows (storage/visibility.py)
        self.visible_bound = VisibleBound()
        self.began_first_term = False  # this process began term 1 (restart_term.py)
        # called after each local checkpoint or merge is in the manifest, from the thread
        # that made it (a leader ships it on)
        self.on_part: PartHook | None = None
        self.write_amp = WriteAmplification()
        self.part_worker = PartWorker() if config.part_worker else None
        self.alarm = CheckpointAlarm(
            self.limits.checkpoint_retry_ms_min,
            self.limits.checkpoint_retry_ms_max,
            self.limits.checkpoint_failure_log_interval_ms,
        )
        self.dir_lock: DataDirLock | None = None

    @property
    def visible_lsn(self) -> int:
        """The highest lsn readers may see: what the WAL has written, and on a follower no
        more than its leader holds durably (``storage/visibility.py``)."""
        return self.visible_bound.cap(self.wal.written_lsn.value)

    @property
    def visible(self) -> Lsn:
        """``visible_lsn`` as a typed value."""
        return Lsn(self.visible_lsn)

    def check_writable(self) -> None:
        if self.closed:
            raise Unavailable("the store is closed")
        self.check_owner()
        failed = self.wal.failed
        if failed is not None:
            if isinstance(failed, StorageFull):
                raise StorageFull(failed.message)  # passes; a fresh error each time
            raise failed

    def check_owner(self) -> None:
        if os.getpid() != self.owner_pid:
            # its WAL writer thread did not survive the fork: an append would wait for ever
            raise Unavailable(
                f"this store was opened by pid {self.owner_pid}: a forked process cannot "
                "write to it (open the data dir in the process that writes)"
            )

    def find_id_locked(self, event_id: bytes) -> StoredEvent | None:
        """The stored event with this id (memtables, then parts newest first); None if none."""
        found = self.active.find_id(event_id)
        if found is None and self.frozen is not None:
            found = self.frozen.find_id(event_id)
        if found is None:
            for part in reversed(self.parts):
                found = part.find_id(event_id)
                if found is not None:
                    break
        return found

    def memtable_size(self) -> tuple[int, int]:
        """Events and bytes in the memtables (the active one and one being checkpointed)."""
        with self.lock:
            n = len(self.active) + (len(self.frozen) if self.frozen else 0)
            b = self.active.bytes + (self.frozen.bytes if self.frozen else 0)
        return n, b

    def update_memtable_gauges(self) -> None:
        n, b = self.memtable_size()
        self.metrics.memtable_events.set(n)
        self.metrics.memtable_bytes.set(b)

    def reset_memory(self) -> None:
        """Forget what is in memory before it is recovered again from the files."""
        self.versions = {}
        self.active = Memtable()
        self.frozen = None
        self.parts = []
        self.own_parts.clear()  # recovered parts (or a snapshot's) may be the leader's


def receipt_of(ev: StoredEvent, *, duplicate: bool = False) -> Receipt:
    """The receipt an append of ``ev`` was (or would have been) answered with."""
    return Receipt(
        format_uuid(ev.id),
        ev.lsn,
        ev.term,
        ev.version,
        format_timestamp(ev.timestamp_us),
        duplicate=duplicate,
        position=ev.tenant_position,
    )
