"""How long a physical follower waits for the leader's parts before checkpointing itself.

A physical follower (``replication/physical.py``) does not checkpoint at its memtable budget:
the leader's part over the same events comes a little later (the leader encodes it, then ships
it once the follower has the records), and the follower installs that instead. It waits up to
a threshold, then checkpoints itself so that its memory stays bounded. A fixed 150 % was too
little under sustained load: in the 10M-event run the leader's part came after the follower
held more than that (the leader's encode and the shipping took longer than half a memtable's
fill time), so the follower fell back at nearly every checkpoint and its layout left the
leader's.

So the threshold follows the leader's cadence: each leader checkpoint part that arrives says
how full this memtable was by then (the part's events and what came after it), and the
threshold is that with a quarter's headroom -- never below ``physical_fallback_percent``,
never above ``physical_fallback_percent_max`` (the memory bound). A part that arrives after
the follower already fell back raises it by half. It sinks back slowly (by 2 % a part) when
the parts come early again. Thread-safe enough: one float, written by the receiving thread,
read by the checkpointer.
"""

from __future__ import annotations

from typing import Final

from walship.limits import Limits

HEADROOM: Final = 1.25  # over the fill seen when a part arrived
LATE_STEP: Final = 1.5  # a part that came after a fallback: wait this much longer
DECAY: Final = 0.98  # per part that came in time: back towards the base, slowly


class FallbackThreshold:
    """The memtable fill (percent of its budget) at which a physical follower checkpoints
    itself instead of waiting for the leader's part."""

    def __init__(self, limits: Limits) -> None:
        self.base = float(limits.physical_fallback_percent)
        self.most = float(max(limits.physical_fallback_percent_max, self.base))
        self.percent = self.base
        self.late_parts = 0  # parts that came after this node had checkpointed their range
        self.last_fill_percent = 0.0  # the memtable's fill when the last part came in time

    def __repr__(self) -> str:
        return f"<FallbackThreshold {self.percent:.0f}% of the memtable budget>"

    def as_stats(self) -> dict[str, int]:
        return {
            "physical_fallback_percent": round(self.percent),
            "physical_late_parts": self.late_parts,
            "physical_last_fill_percent": round(self.last_fill_percent),
        }

    def part_in_time(self, fill_percent: float) -> None:
        """A leader's checkpoint part came while the memtable held ``fill_percent`` of its
        budget (the part's events included)."""
        self.last_fill_percent = fill_percent
        wanted = fill_percent * HEADROOM
        self.percent = min(self.most, max(self.base, wanted, self.percent * DECAY))

    def part_late(self) -> None:
        """A leader's checkpoint part came after this node checkpointed (part of) its range."""
        self.late_parts += 1
        self.percent = min(self.most, self.percent * LATE_STEP)

    @property
    def scale(self) -> float:
        """The threshold as a multiple of the memtable budget."""
        return self.percent / 100
