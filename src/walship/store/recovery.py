"""Opening a store: the manifest and parts, entity versions and tenant positions from the
parts, then the WAL replayed after the checkpoint into the memtable.

A snapshot install that crashed midway (``INSTALL_MARKER`` present) is finished first
(``finish_install``); part files no manifest names are left-overs of a crash and removed.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

from walship.errors import CorruptionError
from walship.events import now_us
from walship.fsutil import fsync_dir
from walship.position import Term
from walship.storage.consumers import ConsumerTable
from walship.storage.manifest import INSTALL_MARKER, load_manifest
from walship.storage.parquet import PartReader
from walship.storage.pins import sweep_stale_pins
from walship.storage.positions import TenantPositions
from walship.storage.query import entity_key
from walship.store.apply import apply_bodies
from walship.store.core import StoreCore
from walship.wal import Record, Wal

log = logging.getLogger(__name__)


def recover(core: StoreCore, on_rollback: Callable[[int], None]) -> None:
    """Load the checkpoint and recover the WAL into ``core`` (``on_rollback``: the WAL's
    rollback listener). CorruptionError when the WAL does not continue the checkpoint."""
    if (core.data_dir / INSTALL_MARKER).exists():
        finish_install(core)
    core.parts_dir.mkdir(parents=True, exist_ok=True)
    for stale in core.parts_dir.glob("*.tmp"):
        stale.unlink()
    core.manifest = load_manifest(core.checkpoint_dir)
    core.consumers = ConsumerTable(core.manifest.consumers)
    referenced = {p.file for p in core.manifest.parts}
    for orphan in core.parts_dir.glob("*.parquet"):
        if orphan.name not in referenced:
            # written by a checkpoint or compaction that crashed before its manifest swap,
            # or replaced by a compaction that crashed before deleting it
            orphan.unlink()
    core.id_index.sweep(referenced)
    sweep_stale_pins(core.data_dir)
    core.parts = [
        PartReader(core.parts_dir / p.file, p, core.id_index) for p in core.manifest.parts
    ]
    core.positions = TenantPositions(core.limits.tenant_position_index_stride)
    for part in core.parts:
        recover_positions(core, part)
    for part in core.parts:
        table = part.entity_versions()
        tenants = table.column("tenant_id").to_pylist()
        entities = table.column("entity_id").to_pylist()
        versions = table.column("version_max").to_pylist()
        for t, e, v in zip(tenants, entities, versions, strict=True):
            key = entity_key(t, e)
            if v > core.versions.get(key, 0):
                core.versions[key] = v
    m = core.manifest
    checkpointed = m.last_lsn
    core.active.created_us = now_us()

    def replay(rec: Record) -> None:
        if rec.lsn > checkpointed:
            apply_bodies(core, ((rec.lsn, rec.term, rec.body),), None)

    core.wal = Wal.open(
        core.wal_dir,
        fsync=core.config.fsync,
        limits=core.limits,
        start=(m.last_lsn, m.last_term, m.chain_bytes),
        on_record=replay,
        on_commit=core.metrics.on_commit,
        on_rollback=on_rollback,
    )
    core.metrics.wal_failed.set_function(lambda: 0.0 if core.wal.failed is None else 1.0)
    if core.wal.torn_tail:
        log.warning("WAL recovery truncated a torn tail: %s", core.wal.torn_tail)
    first = core.wal.first_lsn().value
    last = core.wal.last_position.lsn.value
    if first > checkpointed + 1 or last < checkpointed:
        core.wal.close()
        raise CorruptionError(
            f"{core.wal_dir}: the WAL holds lsn {first}..{last} but the checkpoint ends at "
            f"{checkpointed}: records {checkpointed + 1}..{first - 1} are missing"
        )
    if core.wal.terms.current == Term(0):
        core.wal.begin_term(Term(1))
        core.began_first_term = True  # a new log (restart_term.py)
    core.metrics.last_lsn.set(last)
    core.update_memtable_gauges()


def recover_positions(core: StoreCore, part: PartReader) -> None:
    """Tenant positions and position-index anchors from a part (parts in lsn order)."""
    table = part.tenant_positions()
    if table is None or table.num_rows == 0:
        return
    import pyarrow as pa

    stride = core.positions.stride
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
        core.positions.observe_anchor(t, p, lsn)
    last = table.group_by("tenant_id").aggregate([("tenant_position", "max"), ("lsn", "max")])
    # positions grow with lsn within a tenant: the highest position is at the highest lsn
    for t, p, lsn in zip(
        last.column("tenant_id").to_pylist(),
        last.column("tenant_position_max").to_pylist(),
        last.column("lsn_max").to_pylist(),
        strict=True,
    ):
        core.positions.observe_last(t, p, lsn)


def finish_install(core: StoreCore) -> None:
    """Swap ``install/`` in for ``wal/`` and ``checkpoints/``; safe to repeat after a crash."""
    new = core.data_dir / "install"
    trash = core.data_dir / "install-trash"
    trash.mkdir(exist_ok=True)
    for name in ("wal", "checkpoints"):
        if (new / name).exists():
            if (core.data_dir / name).exists():
                shutil.rmtree(trash / name, ignore_errors=True)
                os.replace(core.data_dir / name, trash / name)
            os.replace(new / name, core.data_dir / name)
    fsync_dir(core.data_dir)
    (core.data_dir / INSTALL_MARKER).unlink(missing_ok=True)
    fsync_dir(core.data_dir)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)
