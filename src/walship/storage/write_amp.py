"""Write amplification: how many times the store writes each event into Parquet.

A checkpoint writes each event once; every merge that takes a part as input writes its events
again. ``write_amplification`` is all the events written by checkpoints and compactions over
the events checkpointed (1.0: nothing merged yet; 2.0: every event merged once), and
``compaction_rewrites_per_event`` is the merges' share alone -- the figure issue 15 measured at
~3 for the old size-tiered policy and asks to bring to about one (``compaction.pick_run``).
Counted since the store opened; parts installed from a snapshot count for neither.
"""

from __future__ import annotations

import threading
from typing import Any

from walship.storage.parquet import PartInfo


class WriteAmplification:
    """Counters of events and bytes written by checkpoints and by compactions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.checkpoint_events = 0
        self.checkpoint_bytes = 0
        self.compaction_events = 0
        self.compaction_bytes = 0

    def checkpointed(self, part: PartInfo) -> None:
        with self._lock:
            self.checkpoint_events += part.events
            self.checkpoint_bytes += part.bytes

    def compacted(self, part: PartInfo) -> None:
        with self._lock:
            self.compaction_events += part.events
            self.compaction_bytes += part.bytes

    def as_stats(self) -> dict[str, Any]:
        """The ``/api/v1/stats`` fields; the two ratios are None until a checkpoint wrote."""
        with self._lock:
            base = self.checkpoint_events
            return {
                "checkpoint_events_written": base,
                "checkpoint_bytes_written": self.checkpoint_bytes,
                "compaction_events_written": self.compaction_events,
                "compaction_bytes_written": self.compaction_bytes,
                "write_amplification": (
                    round((base + self.compaction_events) / base, 3) if base else None
                ),
                "compaction_rewrites_per_event": (
                    round(self.compaction_events / base, 3) if base else None
                ),
            }
