"""The store's Parquet parts after they are written: merges (compaction), putting a part in
place of others (``replace_parts``), pins held by snapshot transfers, and deleting the files
of replaced parts once nothing reads them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import msgspec

from walship.events import now_us
from walship.fsutil import fsync_dir
from walship.storage.compaction import merge_parts, pick_run
from walship.storage.manifest import CheckpointManifest, save_manifest
from walship.storage.parquet import PartInfo, PartReader
from walship.storage.pins import sweep_stale_pins
from walship.store.checkpoints import announce
from walship.store.core import StoreCore

log = logging.getLogger(__name__)


class Parts:
    """Merging, replacing, pinning and deleting parts; one merge at a time."""

    def __init__(self, core: StoreCore) -> None:
        self.core = core

    def compact(self) -> PartInfo | None:
        """Merge the next run of small consecutive parts into one; None when there is none."""
        with self.core.compaction_lock:
            with self.core.lock:
                parts = list(self.core.parts)
            run = pick_run(
                [p.info for p in parts],
                self.core.limits.compaction_fanin_min,
                self.core.limits.compaction_events_max,
            )
            if run is None:
                return None
            t0 = time.perf_counter()
            inputs = parts[run[0] : run[1]]
            rows = self.core.limits.parquet_row_group_rows
            if self.core.part_worker is not None:
                info, hashes = self.core.part_worker.merge(self.core.parts_dir, inputs, rows)
            else:
                info, hashes = merge_parts(self.core.parts_dir, inputs, rows)
            self.core.parquet_encodes += 1
            reader = PartReader(self.core.parts_dir / info.file, info, self.core.id_index)
            reader.set_id_hashes(hashes)
            manifest = self.replace_parts({p.info.file for p in inputs}, info, reader)
            self.core.compactions += 1
            self.core.write_amp.compacted(info)
            announce(self.core, "merge", info, [p.info for p in inputs], manifest)
            self.collect_garbage()
            # the pins of outside readers that have ended hold parts merged away: free them
            sweep_stale_pins(self.core.data_dir)
            log.info(
                "compacted %d parts (%d events) into %s in %.2f s",
                len(inputs),
                info.events,
                info.file,
                time.perf_counter() - t0,
            )
            return info

    def pin_parts(self, names: Sequence[str]) -> list[str]:
        """Keep these part files on disk until ``unpin_parts`` (a snapshot being sent)."""
        with self.core.lock:
            for name in names:
                self.core.pins[name] = self.core.pins.get(name, 0) + 1
        return list(names)

    def unpin_parts(self, names: Sequence[str]) -> None:
        with self.core.lock:
            for name in names:
                left = self.core.pins.get(name, 0) - 1
                if left <= 0:
                    self.core.pins.pop(name, None)
                else:
                    self.core.pins[name] = left
        self.collect_garbage()

    def replace_parts(
        self, names: set[str], info: PartInfo, reader: PartReader
    ) -> CheckpointManifest:
        """Put the part ``info`` (read by ``reader``) where the parts ``names`` stand in the
        manifest, in their place: the manifest saved, then parts and readers swapped under the
        lock, and the old files left to ``collect_garbage``. A merge of this node's and a
        merge taken from the leader (``storage/adopt.py``) both go through here; the caller
        holds the compaction lock."""
        with self.core.manifest_lock:
            current = self.core.manifest
            kept = [p for p in current.parts if p.file not in names]
            at = next(i for i, p in enumerate(current.parts) if p.file in names)
            kept.insert(at, info)
            manifest = msgspec.structs.replace(current, parts=kept, created_us=now_us())
            save_manifest(self.core.checkpoint_dir, manifest)
            with self.core.lock:
                self.core.manifest = manifest
                readers = [p for p in self.core.parts if p.info.file not in names]
                readers.insert(at, reader)
                self.core.parts = readers
                self.core.garbage.update(names)
        return manifest

    def collect_garbage(self) -> None:
        """Delete replaced part files that no snapshot transfer still reads."""
        with self.core.lock:
            doomed = [n for n in self.core.garbage if n not in self.core.pins]
            self.core.garbage.difference_update(doomed)
        for name in doomed:
            (self.core.parts_dir / name).unlink(missing_ok=True)
        self.core.id_index.remove(doomed)
        if doomed:
            fsync_dir(self.core.parts_dir)

    def hold_compaction(self, held: bool) -> None:
        """Hold background compaction back (a follower catching up), or let it go again.

        Like a bulk load into RocksDB: merging parts while a follower replays a long stretch of
        WAL competes with the replay for the same cores, and merges parts that the next
        checkpoints would soon merge again. While held, compaction runs only once the parts
        pile up to ``compaction_held_parts_max``, so queries never face an unbounded count.
        Explicit ``compact()`` calls are not affected.
        """
        self.core.compaction_held = held
        if not held:
            self.core.compact_kick.set()

    def may_compact(self) -> bool:
        if self.core.parts_from_leader:
            return False  # the leader's merges arrive as parts (replication/physical.py)
        # no lock: len() of the list is atomic, and a stale count costs one pass at most
        return not self.core.compaction_held or (
            len(self.core.parts) >= self.core.limits.compaction_held_parts_max
        )
