"""The recovery-point budget (``--max-replication-lag-ms``): a leader slows writes, never fails
them, so that its in-sync followers stay within the budget under overload.

Without it an overloaded follower falls further and further behind until it leaves the
in-sync set (``--max-lag-ms``) -- and from then on what it lacks is lost with the leader: the
recovery point degrades silently. With it, a write waits before it enters the WAL while an
in-sync follower is held to more than half the budget, and goes on as soon as the follower's
acks bring it under. A follower is held to the higher of its lag (how long ago the leader
wrote the oldest record it has not acknowledged) and the lag its backlog will make: records
not yet acknowledged over the rate it acknowledges them (``AckRate``). Lag alone reacts too
late: by the time it shows, a fast writer has queued seconds of work for a slow follower.
The half is the headroom for writes let in together just under it.

Only in-sync followers count. One that stops answering leaves the set at ``--max-lag-ms`` and
no longer holds writes (they degrade as its ack mode says); and no write waits longer than
``--max-lag-ms`` whatever happens, then it goes on (``timeouts`` counts those).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from walship.replication.metrics import ReplicationMetrics

RECHECK_S = 0.01
"""A waiting write looks again this often even without an ack (a follower leaving the set)."""


ACK_RATE_WINDOW_S = 2.0
"""The acknowledgements a follower's rate is measured over."""


class AckRate:
    """How many records a second a follower has been acknowledging, lately."""

    def __init__(self, window_s: float = ACK_RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._acks: deque[tuple[float, int]] = deque()

    def note(self, durable_lsn: int, now: float) -> None:
        acks = self._acks
        acks.append((now, durable_lsn))
        while len(acks) > 2 and acks[1][0] <= now - self.window_s:
            acks.popleft()

    def per_s(self, now: float) -> float | None:
        """Records a second over the window; None when too little is known (under 0.1 s of
        acks, or none for a whole window)."""
        acks = self._acks
        if len(acks) < 2 or acks[-1][0] <= now - self.window_s:
            return None
        (t0, lsn0), (t1, lsn1) = acks[0], acks[-1]
        return (lsn1 - lsn0) / (t1 - t0) if t1 - t0 >= 0.1 else None


def held_to_ms(lag_ms: float, lag_records: int, acks_per_s: float | None) -> float:
    """The lag a follower is held to: its lag now, or what its backlog will make at its
    acknowledgement rate, whichever is higher."""
    if lag_records <= 0:
        return 0.0
    if not acks_per_s or acks_per_s <= 0:
        return lag_ms
    return max(lag_ms, lag_records / acks_per_s * 1000)


class LagBudget:
    """The gate writes pass on a leader; ``budget_ms`` 0 turns it off."""

    def __init__(
        self,
        budget_ms: int,
        wait_max_ms: int,
        metrics: ReplicationMetrics,
        worst_lag_ms: Callable[[], float],
    ) -> None:
        self.budget_ms = budget_ms
        self.wait_max_ms = wait_max_ms
        self.metrics = metrics
        self.worst_lag_ms = worst_lag_ms  # the highest ``held_to_ms`` of in-sync followers
        self.waiting = 0
        self.throttled = 0  # writes that waited
        self.timeouts = 0  # writes that waited wait_max_ms and went on
        self.waited_s = 0.0
        self._changed = asyncio.Event()
        metrics.lag_budget_seconds.set(budget_ms / 1000)

    @property
    def threshold_ms(self) -> float:
        return self.budget_ms / 2

    def over(self) -> bool:
        return bool(self.budget_ms) and self.worst_lag_ms() > self.threshold_ms

    def acked(self) -> None:
        """A follower acknowledged something: waiting writes look again."""
        if self.waiting:
            self._changed.set()

    async def admit(self) -> bool:
        """Return when a write may enter the WAL: at once within the budget, else once the
        in-sync followers are back under its half (or after ``wait_max_ms``). True when
        the write waited."""
        if not self.over():
            return False
        t0 = time.monotonic()
        deadline = t0 + self.wait_max_ms / 1000
        self.waiting += 1
        self.metrics.lag_budget_waiting.set(self.waiting)
        try:
            while self.over():
                left = deadline - time.monotonic()
                if left <= 0:
                    self.timeouts += 1
                    break
                self._changed.clear()
                try:
                    async with asyncio.timeout(min(RECHECK_S, left)):
                        await self._changed.wait()
                except TimeoutError:
                    pass
        finally:
            self.waiting -= 1
            waited = time.monotonic() - t0
            self.throttled += 1
            self.waited_s += waited
            self.metrics.lag_budget_waiting.set(self.waiting)
            self.metrics.lag_budget_wait_seconds.observe(waited)
        return True

    def status(self) -> dict[str, Any]:
        """For ``/health``: the budget, the lag it is held against, what it held back."""
        return {
            "budget_ms": self.budget_ms,
            "throttle_above_ms": self.threshold_ms if self.budget_ms else None,
            "in_sync_lag_ms": round(self.worst_lag_ms(), 3),
            "throttling": self.over(),
            "waiting": self.waiting,
            "throttled_writes": self.throttled,
            "throttled_seconds": round(self.waited_s, 3),
            "wait_timeouts": self.timeouts,
        }
