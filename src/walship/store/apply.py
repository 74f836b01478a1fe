"""Applying records another node wrote, and taking back records a full disk rolled back.

A follower's frames arrive verified (``wal/frame.py``); ``FollowerApply.apply_frame`` writes
one to the WAL as one buffer and indexes its records in the memtable, the entity versions,
the tenant positions and the consumer table from views of it. Recovery replays the WAL
through the same ``apply_bodies``. ``forget_after`` is the WAL's rollback listener: the
events after the last written lsn leave the memtables, and their entities' versions,
positions and trackings are as if they were never appended.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from walship.events import SYSTEM_PREFIX, decode_body
from walship.storage.consumers import TRACKING_TYPE, ConsumerPosition, decode_tracking_payload
from walship.storage.memtable import COLUMNS as MEM_COLUMNS
from walship.storage.memtable import size_of as memtable_size
from walship.storage.query import entity_key
from walship.store.core import StoreCore
from walship.wal.frame import VerifiedFrame
from walship.wal.log import WriteOutcome

log = logging.getLogger(__name__)


def apply_bodies(
    core: StoreCore,
    records: Iterable[tuple[int, int, bytes | memoryview]],
    written_lsn: int | None,
) -> None:
    """Add WAL records, each as ``(lsn, term, body)`` (recovery or replication), to the
    memtable and versions, and tracking records to the consumer table (``written_lsn``: what
    the WAL has written, None in recovery). The caller holds the store lock or is alone."""
    cols: list[list[Any]] = [[] for _ in range(MEM_COLUMNS)]
    (
        c_lsn,
        c_term,
        c_id,
        c_tenant,
        c_entity,
        c_type,
        c_ts,
        c_version,
        c_payload,
        c_meta,
        c_pos,
        c_bin,
    ) = cols
    decode = decode_body
    for lsn, term, raw in records:
        body = decode(raw)
        etype = body.event_type
        if not etype.startswith(SYSTEM_PREFIX):
            # the memtable's columns, filled per record: this runs for every record a
            # follower applies
            c_lsn.append(lsn)
            c_term.append(term)
            c_id.append(body.id)
            c_tenant.append(body.tenant_id)
            c_entity.append(body.entity_id)
            c_type.append(etype)
            c_ts.append(body.timestamp_us)
            c_version.append(body.version)
            c_payload.append(body.payload)
            c_meta.append(body.metadata)
            c_pos.append(body.tenant_position)
            c_bin.append(body.payload_binary)
        elif etype == TRACKING_TYPE:
            position = decode_tracking_payload(body.payload)
            entry = ConsumerPosition(body.tenant_id, body.entity_id, position, lsn)
            core.consumers.apply(entry, written_lsn)
    if not c_lsn:
        return
    versions = core.versions
    observe = core.positions.observe
    for tenant_id, entity_id, version, position, lsn in zip(
        c_tenant, c_entity, c_version, c_pos, c_lsn, strict=True
    ):
        key = f"{tenant_id}\x00{entity_id}"  # entity_key, inlined (per record)
        if version > versions.get(key, 0):
            versions[key] = version
        # taken from the record the leader wrote, never assigned here
        observe(tenant_id, position, lsn)
    core.active.extend(cols, memtable_size(cols))


class FollowerApply:
    """A follower's entrance: frames of records its leader wrote, and the WAL's rollbacks."""

    def __init__(self, core: StoreCore) -> None:
        self.core = core

    def apply_frame(self, frame: VerifiedFrame) -> Future[WriteOutcome]:
        """Append a verified frame of whole appends another node wrote (``wal/frame.py``):
        written to the WAL as one buffer, indexed from views of it; returns the write."""
        with self.core.lock:
            self.core.check_writable()
            written = self.core.visible_lsn  # the consumer table's undo log keeps the rest
            fut = self.core.wal.append_frame(frame)
            if frame.record_count:
                apply_bodies(self.core, frame.entries(), written)
                self.core.metrics.appends.inc(frame.record_count)
                self.core.metrics.last_lsn.set(frame.last_lsn)
        return fut

    def forget_after(self, lsn: int) -> None:
        """WAL rollback listener (writer thread): drop the events after ``lsn`` from the
        memtables, and put their entities' versions back to what they were before them."""
        wal = self.core.wal
        while not self.core.lock.acquire(timeout=0.05):
            if wal.closing:
                # closed under the store lock (a snapshot install or a cut), which waits for
                # this thread: the memtables are rebuilt from the files, which are already cut
                return
        try:
            removed = self.core.active.truncate_after(lsn)
            if self.core.frozen is not None:
                removed += self.core.frozen.truncate_after(lsn)
            lowest: dict[str, int] = {}
            lowest_positions: dict[str, int] = {}
            for ev in removed:
                key = entity_key(ev.tenant_id, ev.entity_id)
                lowest[key] = min(ev.version, lowest.get(key, ev.version))
                if ev.tenant_position > 0:
                    was = lowest_positions.get(ev.tenant_id, ev.tenant_position)
                    lowest_positions[ev.tenant_id] = min(was, ev.tenant_position)
            # the rolled-back positions are given again, as the lsns are
            self.core.positions.forget_after(lsn, lowest_positions)
            self.core.consumers.forget_after(lsn)
            for key, version in lowest.items():
                # an entity's versions run 1, 2, 3 ... in lsn order: the removed ones are its last
                if version > 1:
                    self.core.versions[key] = version - 1
                else:
                    self.core.versions.pop(key, None)
            self.core.metrics.last_lsn.set(lsn)
        finally:
            self.core.lock.release()
        if removed:
            log.info(
                "forgot %d events after lsn %d (rolled back by a full disk)", len(removed), lsn
            )
        self.core.update_memtable_gauges()
