"""Checkpoints: the memtable written to a Parquet part, the manifest advanced past it, and
the WAL segments it covers removed once replication has released them.

One checkpoint at a time (``checkpoint_lock``). The active memtable is frozen under the store
lock and a fresh one takes new appends; the frozen one stays readable until its part is in
the manifest. A failure puts its events back in front of anything appended meanwhile, and is
kept by the alarm (``checkpoint_failure``) until a checkpoint works again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from walship.errors import StorageFull, WalFailed, invariant
from walship.events import format_timestamp, now_us
from walship.position import Lsn, Position, Term
from walship.storage.alarm import CheckpointFailure
from walship.storage.consumers import table_at
from walship.storage.manifest import CheckpointManifest, save_manifest
from walship.storage.memtable import Memtable, fixed_bytes
from walship.storage.memtable import rows_table as memtable_rows
from walship.storage.parquet import PartInfo, PartReader, id_hashes_of_bytes, write_part_rows
from walship.store.core import StoreCore

log = logging.getLogger(__name__)


def announce(
    core: StoreCore,
    kind: str,
    part: PartInfo,
    replaced: list[PartInfo],
    manifest: CheckpointManifest,
) -> None:
    """Tell the ``on_part`` hook (a leader shipping parts) of a new part; never raises."""
    hook = core.on_part
    if hook is not None:
        try:
            hook(kind, part, replaced, manifest)
        except Exception:
            log.exception("shipping %s part %s failed", kind, part.file)


class Checkpoints:
    """Memtables to Parquet parts, on demand or when due (``Background`` asks)."""

    def __init__(self, core: StoreCore) -> None:
        self.core = core

    def checkpoint(self) -> PartInfo | None:
        """Write everything visible in memtables to a Parquet part now.

        Returns the part written, or None when there was nothing to checkpoint. A failure is
        raised to the caller and also kept as ``checkpoint_failure`` until one works.
        """
        with self.core.checkpoint_lock:
            try:
                part = self.checkpoint_once()
            except (WalFailed, StorageFull):
                raise  # the WAL's own state says it (a full disk's rollback retries at once)
            except Exception as exc:
                self._checkpoint_failed(exc)
                raise
        ended = self.core.alarm.succeeded()
        self.core.metrics.checkpoint_failing.set(0)
        if ended:
            log.warning("checkpoints work again after %d failed attempts", ended)
        return part

    def _checkpoint_failed(self, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        self.core.metrics.checkpoint_failures.inc()
        self.core.metrics.checkpoint_failing.set(1)
        if self.core.alarm.failed(error, time.monotonic(), time.time()):
            failure = self.core.alarm.state(time.monotonic())
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
        return self.core.alarm.state(time.monotonic())

    def checkpoint_through(self, upto: Lsn) -> PartInfo | None:
        """Checkpoint exactly the events up to ``upto`` (written here already): a physical
        follower rebuilding from its own WAL the range of a leader's part it refused, so that
        the next part lines up again, with the consumer table as of ``upto`` (rebuilt from the
        last checkpoint's and the WAL when consumers tracked after it)."""
        lsn = upto.value
        with self.core.checkpoint_lock:
            if lsn <= self.core.manifest.last_lsn:
                return None
            return self.checkpoint_once(through=lsn)

    def _split_at(self, lsn: int) -> tuple[Position, bytes, list[Any]] | None:
        """Position, chain and consumer table at ``lsn`` for a checkpoint through it; None
        when ``lsn`` is not written here."""
        if lsn > self.core.wal.written_lsn.value:
            return None
        consumers = self.core.consumers.entries()
        if any(c.lsn > lsn for c in consumers):
            # consumers tracked after ``lsn``: their table then is the checkpoint's plus the
            # tracking records the WAL holds up to ``lsn`` (a whole checkpoint instead would
            # overshoot the leader's next part, and every later part would be refused too)
            after = self.core.manifest.last_lsn + 1
            records = ((r.lsn, r.body) for r in self.core.wal.read_from(Lsn(after)))
            consumers = table_at(self.core.manifest.consumers, records, lsn)
        for rec in self.core.wal.read_from(Lsn(lsn)):
            return Position(Term(rec.term), Lsn(lsn)), rec.chain, consumers
        return None

    def checkpoint_once(self, through: int | None = None) -> PartInfo | None:
        t0 = time.perf_counter()
        split = None
        bounded = self.core.visible_bound.lsn is not None
        if bounded:
            # a follower: a part holds only what it shows, what its leader holds durably
            # (storage/visibility.py); the rest waits in the memtable and the WAL
            visible = self.core.visible_lsn
            if through is None or through > visible:
                if visible <= self.core.manifest.last_lsn:
                    return None
                through = visible
        if through is not None and through < self.core.wal.last_position.lsn.value:
            split = self._split_at(through)
            if split is None and bounded:
                return None
        with self.core.lock:
            if len(self.core.active) == 0:
                return None
            frozen = self.core.active
            if split is not None:
                assert through is not None
                upto, chain, consumers = split
                # two new memtables, the old one left as it is: a reader's view holds it
                frozen, rest = frozen.split_at(through)
                if len(frozen) == 0:
                    return None
                self.core.active = rest
            else:
                self.core.active = Memtable()
                self.core.active.created_us = now_us()
                upto = self.core.wal.last_position
                chain = self.core.wal.last_chain
                consumers = self.core.consumers.entries()  # as of ``upto``, like the memtable
            self.core.frozen = frozen
            rollback_seq = self.core.wal.rollback_seq
            batches, tail = frozen.contents()  # made one table outside the lock
        try:
            self.core.wal.sync()
            if rollback_seq % 2 or self.core.wal.rollback_seq != rollback_seq:
                # a full disk rolled back some of what was frozen: its lsns may have been
                # taken again since, by events that are not in ``frozen``
                raise StorageFull("a full disk rolled back events being checkpointed; retrying")
            last = frozen.last_lsn
            invariant(
                last is not None and last <= upto.lsn.value,
                "memtable holds records past the WAL's end",
            )
            table = memtable_rows(batches, tail)
            del batches, tail
            first = self.core.manifest.last_lsn + 1
            rows = self.core.limits.parquet_row_group_rows
            if self.core.part_worker is not None:
                part = self.core.part_worker.checkpoint(
                    self.core.parts_dir, table, first, upto.lsn.value, rows
                )
            else:
                part = write_part_rows(self.core.parts_dir, table, first, upto.lsn.value, rows)
            arr = id_hashes_of_bytes(fixed_bytes(table.column("id")))
            del table
            self.core.parquet_encodes += 1
            reader = PartReader(self.core.parts_dir / part.file, part, self.core.id_index)
            arr.sort()
            reader.set_id_hashes(arr)
            with self.core.manifest_lock:
                manifest = self.core.manifest.advanced(
                    part, upto.lsn.value, upto.term.value, chain, now_us(), consumers
                )
                save_manifest(self.core.checkpoint_dir, manifest)
                with self.core.lock:
                    self.core.manifest = manifest
                    self.core.parts.append(reader)
                    self.core.frozen = None
        except BaseException:
            with self.core.lock:
                # put the events back in front of anything appended meanwhile
                self.core.active = Memtable.joined(frozen, self.core.active)
                self.core.frozen = None
                self.core.checkpoint_done.notify_all()
            raise
        self.core.write_amp.checkpointed(part)
        with self.core.lock:
            self.core.checkpoints_taken += 1
            self.core.own_parts.add(part.file)
            self.core.checkpoint_done.notify_all()
        announce(self.core, "checkpoint", part, [], manifest)
        self.core.compact_kick.set()
        self.core.metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
        self.core.metrics.checkpoint_events.inc(len(frozen))
        self.core.update_memtable_gauges()
        self.remove_checkpointed_wal()
        return part

    def remove_checkpointed_wal(self) -> list[Path]:
        """Remove WAL segments covered by the checkpoint and released by the retention hook."""
        upto = self.core.manifest.last_lsn
        floor = self.core.retention_floor()
        if floor is not None:
            upto = min(upto, floor - 1)
        if self.core.parts_from_leader:
            # a physical follower keeps the records the leader's parts still to come end at:
            # one that comes after its own checkpoint is checked against them before it is
            # held (storage/realign.py); without them it could not be, and was not
            upto = min(upto, self.core.leader_parts_through)
        return self.core.wal.remove_segments_through(Lsn(max(upto, 0)))

    def memtable_fill_percent(self) -> float:
        """How full the active memtable is, in percent of its budget (events or bytes)."""
        with self.core.lock:
            events, size = len(self.core.active), self.core.active.bytes
        limits = self.core.limits
        return 100 * max(events / limits.memtable_events_max, size / limits.memtable_bytes_max)

    def due(self) -> bool:
        with self.core.lock:
            active = self.core.active
            if len(active) == 0:
                return False
            age_ms = (now_us() - active.created_us) / 1000
            limits = self.core.limits
            # while the leader's parts arrive, wait for them up to a larger budget: past it
            # they stopped coming (or lag), and memory is bounded by checkpointing here
            scale = self.core.fallback.scale if self.core.parts_from_leader else 1
            return (
                len(active) >= limits.memtable_events_max * scale
                or active.bytes >= limits.memtable_bytes_max * scale
                or age_ms >= limits.checkpoint_interval_ms * scale
            )
