"""Rewinds: replacing what a store holds with a snapshot, cutting its log after a point
(divergence repair), or dropping everything.

Each stops the background threads first (before the locks: a thread may be waiting for one
of them), closes the WAL, changes the files, and recovers the store from them again. WAL
listeners (the node's commit pulse) are carried over to the new WAL. A snapshot install is
built beside the old state and swapped in by renames behind a marker file, so a crash midway
is finished on the next open (``recovery.finish_install``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import msgspec

from walship.errors import InvalidInput
from walship.fsutil import atomic_write, fsync_dir
from walship.position import Lsn
from walship.storage.manifest import INSTALL_MARKER, CheckpointManifest, save_manifest
from walship.store.background import Background
from walship.store.core import StoreCore
from walship.store.recovery import finish_install, recover
from walship.wal.segment import SegmentHeader, create_segment
from walship.wal.terms import FILE_NAME as TERMS_FILE
from walship.wal.truncate import truncate_wal


class Rewinds:
    """Snapshot installs, cuts and resets; the caller has stopped everything that appends."""

    def __init__(
        self, core: StoreCore, background: Background, on_rollback: Callable[[int], None]
    ) -> None:
        self.core = core
        self.background = background
        self.on_rollback = on_rollback

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
        self.background.stop()  # before the locks: a thread may be waiting for one of them
        with self.core.checkpoint_lock, self.core.compaction_lock, self.core.lock:
            # carried over to the new WAL: the node's commit pulse wakes read-your-writes
            # waiters and subscriptions, which otherwise fall back to polling
            listeners = self.core.wal.listeners
            self.core.wal.close()
            new = self.core.data_dir / "install"
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
            atomic_write(self.core.data_dir / INSTALL_MARKER, b"installing snapshot\n")
            finish_install(self.core)
            self.core.reset_memory()
            recover(self.core, self.on_rollback)
            for listener in listeners:
                self.core.wal.add_listener(listener)
        self.background.start()

    def truncate_after(self, cut: Lsn) -> None:
        """Cut the log after ``cut`` (divergence repair): WAL records, term history, memtable
        and entity versions, all re-derived from what is left on disk.

        The caller has stopped everything that appends. InvalidInput when ``cut`` is below the
        checkpoint (Parquet parts are not cut: use ``reset_to_empty`` and a snapshot instead).
        """

        lsn = cut.value
        self.background.stop()  # before the locks: a thread may be waiting for one of them
        try:
            with self.core.checkpoint_lock, self.core.lock:
                if lsn < self.core.manifest.last_lsn:
                    raise InvalidInput(
                        f"cannot cut after lsn {lsn}: the checkpoint covers up to "
                        f"{self.core.manifest.last_lsn}"
                    )
                if lsn >= self.core.wal.last_position.lsn.value:
                    return
                self._reopen(
                    lambda: truncate_wal(self.core.wal_dir, lsn, self.core.limits.record_bytes_max)
                )
        finally:
            self.background.start()

    def reset_to_empty(self) -> None:
        """Drop everything this store holds (divergence repair below the checkpoint: the
        leader then sends it all again). Crash-safe like ``install_snapshot``."""
        empty = self.core.data_dir / "install-empty"
        shutil.rmtree(empty, ignore_errors=True)
        empty.mkdir()
        self.install_snapshot(empty, CheckpointManifest(), [])  # listeners carried over
        shutil.rmtree(empty, ignore_errors=True)

    def _reopen(self, change: Callable[[], None]) -> None:
        """Close the WAL, apply ``change`` to the files, recover again (listeners carried
        over). Called with both store locks held and the background threads stopped."""
        listeners = self.core.wal.listeners
        self.core.wal.close()
        change()
        self.core.reset_memory()
        recover(self.core, self.on_rollback)
        for listener in listeners:
            self.core.wal.add_listener(listener)
