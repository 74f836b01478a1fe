"""The store's background threads: the checkpointer (a part when the memtable is due) and
the compactor (merges, and sweeping the pins of readers that ended).

Both run only while checkpoints are on. ``stop`` is never called holding a store lock:
either thread may be waiting for one, and would never end.
"""

from __future__ import annotations

import logging
import threading
import time

from walship.errors import StorageFull, WalFailed
from walship.storage.memtable import Memtable, seal_tail
from walship.storage.pins import sweep_stale_pins
from walship.store.checkpoints import Checkpoints
from walship.store.core import StoreCore
from walship.store.parts import Parts

log = logging.getLogger(__name__)


class Background:
    """Starts, runs and stops the checkpointer and the compactor threads."""

    def __init__(self, core: StoreCore, checkpoints: Checkpoints, parts: Parts) -> None:
        self.core = core
        self.checkpoints = checkpoints
        self.parts = parts
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._compactor: threading.Thread | None = None

    def start(self) -> None:
        """Start the checkpointer and the compactor (when checkpoints are on)."""
        self._stop = threading.Event()
        if self.core.config.checkpoints:
            self._checkpointer = threading.Thread(
                target=self._run_checkpointer, name="walship-checkpointer", daemon=True
            )
            self._checkpointer.start()
            self.core.checkpointing = True
            self._compactor = threading.Thread(
                target=self._run_compactor, name="walship-compactor", daemon=True
            )
            self._compactor.start()

    def stop(self) -> None:
        """Stop the checkpointer and the compactor and wait for them. Never call it holding a
        store lock: either thread may be waiting for one, and would never end."""
        self._stop.set()
        self.core.kick.set()
        self.core.compact_kick.set()
        for thread in (self._checkpointer, self._compactor):
            if thread is not None:
                thread.join()
        self._checkpointer = self._compactor = None
        self.core.checkpointing = False

    def _run_checkpointer(self) -> None:
        while not self._stop.is_set():
            self.core.kick.wait(0.1)
            self.core.kick.clear()
            if self._stop.is_set():
                return
            if self.core.wal.failed is not None:
                continue
            self._seal()
            if self.checkpoints.due() and self.core.alarm.retry_due(time.monotonic()):
                try:
                    self.checkpoints.checkpoint()
                except WalFailed:
                    log.error("checkpoint skipped: the WAL has failed")
                except StorageFull as exc:
                    log.warning("checkpoint skipped: %s", exc.message)
                except Exception:
                    pass  # logged and kept by the alarm; retried after its backoff
            self.core.update_memtable_gauges()

    def _seal(self) -> None:
        """Seal the active memtable's tail into a batch: here, not on the write and apply
        paths (``storage/memtable.py``); never while a checkpoint runs."""
        core = self.core
        if core.checkpoint_lock.acquire(blocking=False):
            try:
                seal_tail(core.lock, self._active)
            finally:
                core.checkpoint_lock.release()

    def _active(self) -> Memtable:
        return self.core.active

    def _run_compactor(self) -> None:
        swept_at = time.monotonic()
        while not self._stop.is_set():
            self.core.compact_kick.wait(1.0)
            self.core.compact_kick.clear()
            if self._stop.is_set():
                return
            if time.monotonic() - swept_at >= self.core.limits.pin_sweep_interval_ms / 1000:
                # a merge sweeps too, but an idle node may not merge again for days, while a
                # dead reader's pin holds the space of every part merged away under it
                swept_at = time.monotonic()
                try:
                    sweep_stale_pins(self.core.data_dir)
                except OSError as exc:
                    log.warning("could not sweep the pins of ended readers: %s", exc)
            try:
                while (
                    not self._stop.is_set()
                    and self.parts.may_compact()
                    and self.parts.compact() is not None
                ):
                    pass
            except Exception:
                log.exception("compaction failed; will retry")
                self._stop.wait(5.0)
