"""The figures a store reports (``GET /api/v1/stats``, ``walship status``)."""

from __future__ import annotations

import time
from typing import Any

from walship.store.core import StoreCore


def store_stats(core: StoreCore) -> dict[str, Any]:
    """WAL, memtable, Parquet and checkpoint figures, read together under the store lock."""
    wal = core.wal.status()
    with core.lock:
        mem_events = len(core.active) + (len(core.frozen) if core.frozen else 0)
        mem_bytes = core.active.bytes + (core.frozen.bytes if core.frozen else 0)
        m = core.manifest
        return {
            "node_id": core.config.node_id,
            "last_lsn": wal.last_lsn,
            "term": core.wal.terms.current.value,
            "visible_lsn": core.visible_lsn,
            "synced_lsn": wal.synced_lsn,
            "events": m.events + mem_events,
            "entities": len(core.versions),
            "memtable_events": mem_events,
            "memtable_bytes": mem_bytes,
            "checkpoint_lsn": m.last_lsn,
            "parquet_parts": len(m.parts),
            "parquet_events": m.events,
            "parquet_bytes": sum(p.bytes for p in m.parts),
            "checkpoints_taken": core.checkpoints_taken,
            "compactions": core.compactions,
            "parquet_encodes": core.parquet_encodes,
            "parts_adopted": core.parts_adopted,
            "parts_from_leader": core.parts_from_leader,
            "compaction_held": core.compaction_held,
            "checkpoint_failing": core.alarm.state(time.monotonic()) is not None,
            "wal_first_lsn": core.wal.first_lsn().value,
            "wal_segments": wal.segments,
            "wal_bytes": wal.bytes,
            "fsync": str(core.config.fsync),
            "wal_failed": wal.failed,
            **core.write_amp.as_stats(),
        }
