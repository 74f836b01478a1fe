"""The checkpoint alarm: a checkpoint that keeps failing is raised, not retried in silence.

While checkpoints fail the memtable and the WAL grow (writes are throttled, then refused, at
twice the memtable budget), so a failure must reach the operator: the store keeps the state
here, ``/health`` and the ``walship_checkpoint_failing`` metric show it, and the log says it
when it starts, when the error changes, every ``checkpoint_failure_log_interval_ms`` while it
lasts, and when it ends -- not at every retry. Retries back off exponentially between
``checkpoint_retry_ms_min`` and ``checkpoint_retry_ms_max``.

Pure state with the clock passed in, so tests need no sleeping.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CheckpointFailure:
    """Why checkpoints fail now: the last error, since when, and how many attempts failed."""

    error: str
    since_s: float  # wall clock (time.time) of the first failure in this run
    failures: int
    retry_in_ms: int

    def to_dict(self) -> dict[str, object]:
        return {
            "error": self.error,
            "since_s": round(self.since_s, 3),
            "failures": self.failures,
            "retry_in_ms": self.retry_in_ms,
        }


class CheckpointAlarm:
    """Consecutive checkpoint failures, when to retry and when to say so. Thread-safe."""

    def __init__(self, retry_ms_min: int, retry_ms_max: int, log_interval_ms: int) -> None:
        self.retry_ms_min = retry_ms_min
        self.retry_ms_max = retry_ms_max
        self.log_interval_ms = log_interval_ms
        self._lock = threading.Lock()
        self._error: str | None = None
        self._since_s = 0.0
        self._failures = 0
        self._retry_at = 0.0  # monotonic
        self._logged_at = 0.0  # monotonic

    def failed(self, error: str, now: float, wall: float) -> bool:
        """Note a failed checkpoint at monotonic ``now``; True when this one should be logged
        (the first, one with a new error, or the first after ``log_interval_ms``)."""
        with self._lock:
            first = self._error is None
            changed = error != self._error
            if first:
                self._since_s = wall
            self._error = error
            self._failures += 1
            delay_ms = min(self.retry_ms_max, self.retry_ms_min << min(self._failures - 1, 30))
            self._retry_at = now + delay_ms / 1000
            due = first or changed or (now - self._logged_at) * 1000 >= self.log_interval_ms
            if due:
                self._logged_at = now
            return due

    def succeeded(self) -> int:
        """Note a checkpoint that worked; how many failures it ends (0: none were failing)."""
        with self._lock:
            ended = self._failures
            self._error = None
            self._failures = 0
            self._retry_at = 0.0
            return ended

    def retry_due(self, now: float) -> bool:
        """Whether the checkpointer may try again at monotonic ``now``."""
        with self._lock:
            return now >= self._retry_at

    def state(self, now: float) -> CheckpointFailure | None:
        """The failure in progress, or None when the last checkpoint worked."""
        with self._lock:
            if self._error is None:
                return None
            retry_ms = max(0, int((self._retry_at - now) * 1000))
            return CheckpointFailure(self._error, self._since_s, self._failures, retry_ms)
