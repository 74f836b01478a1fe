"""Retention slots and their forecast: the WAL a leader keeps for each known follower, and when
each slot will hit ``--wal-retention-bytes-max`` at the current ingest rate and lag.

A slot holds the WAL from its follower's last acknowledged lsn to the end, measured as the
leader enforces the cap (``slot_bytes``: whole segments from the one holding the follower's
next record). Past the cap that WAL may be removed and the follower needs a snapshot.

The forecast samples, about once a second, each follower's lag in records. Over the last
``window_s`` that lag grows at (ingest rate - the follower's own rate) records a second; at
the WAL's mean record size that is how fast its slot grows in bytes, so the slot is full in
``(cap - slot bytes) / growth`` seconds. A follower keeping up (its lag not growing, or 0)
has no forecast (None; +Inf in the metric). Under ``warn_s`` the leader logs a warning, once, and
says so again when the follower is clear of it.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from walship.fsutil import atomic_write
from walship.replication.metrics import ReplicationMetrics

log = logging.getLogger(__name__)


class RetentionSlots:
    """The last durable lsn of each known follower, persisted, so WAL they need is kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.slots: dict[str, int] = {}
        if path.exists():
            self.slots = msgspec.json.decode(path.read_bytes(), type=dict[str, int])
        self._saved = dict(self.slots)
        self._last_save = 0.0

    def update(self, node_id: str, durable_lsn: int, *, force: bool = False) -> None:
        self.slots[node_id] = max(durable_lsn, self.slots.get(node_id, 0))
        if force or time.monotonic() - self._last_save > 1.0:
            self.save()

    def drop(self, node_id: str) -> None:
        if self.slots.pop(node_id, None) is not None:
            self.save()

    def save(self) -> None:
        if self.slots != self._saved:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, msgspec.json.encode(self.slots))
            self._saved = dict(self.slots)
        self._last_save = time.monotonic()


Segments = Sequence[tuple[int, Any, int]]
"""``(first_lsn, path, bytes)`` of each WAL segment, oldest first (``segment_infos``)."""


def slot_bytes(segments: Segments, durable_lsn: int) -> int:
    """Bytes of WAL a follower at ``durable_lsn`` holds back: every segment from the one with
    its next record to the end (what the retention cap is compared with)."""
    if not segments:
        return 0
    firsts = [first for first, _, _ in segments]
    i = max(bisect.bisect_right(firsts, durable_lsn + 1) - 1, 0)
    return sum(size for _, _, size in segments[i:])


@dataclass(frozen=True)
class SlotForecast:
    node_id: str
    slot_lsn: int  # the follower's last acknowledged lsn: WAL after it is kept
    slot_bytes: int
    lag_records: int
    growth_bytes_per_s: float | None  # None until two samples span a second
    exhaustion_s: float | None  # None: not growing; 0: at the cap already

    def status(self) -> dict[str, Any]:
        return {
            "slot_lsn": self.slot_lsn,
            "slot_bytes": self.slot_bytes,
            "lag_records": self.lag_records,
            "growth_bytes_per_s": _round(self.growth_bytes_per_s),
            "exhaustion_s": _round(self.exhaustion_s),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class RetentionForecaster:
    """Per follower: its slot's size, how fast it grows, and when it hits the cap."""

    def __init__(
        self,
        bytes_max: int,
        metrics: ReplicationMetrics,
        *,
        warn_s: float,
        window_s: float = 30.0,
        sample_interval_s: float = 1.0,
    ) -> None:
        self.bytes_max = bytes_max
        self.metrics = metrics
        self.warn_s = warn_s
        self.window_s = window_s
        self.sample_interval_s = sample_interval_s
        self.forecasts: dict[str, SlotForecast] = {}
        self._lags: dict[str, deque[tuple[float, int]]] = {}
        self._warned: set[str] = set()
        self._last_sample = -math.inf
        metrics.retention_bytes_max.set(bytes_max)

    def sample(
        self, slots: dict[str, int], written_lsn: int, segments: Segments, now: float
    ) -> None:
        """Take a sample (at most every ``sample_interval_s``) of every slot (node id →
        durable lsn) and forecast each; forget followers whose slot is gone."""
        if now - self._last_sample < self.sample_interval_s:
            return
        self._last_sample = now
        record_bytes = _mean_record_bytes(segments, written_lsn)
        for node_id in set(self.forecasts) - set(slots):
            self._forget(node_id)
        for node_id, durable in slots.items():
            lag = max(written_lsn - durable, 0)
            lags = self._lags.setdefault(node_id, deque())
            lags.append((now, lag))
            while len(lags) > 2 and lags[1][0] <= now - self.window_s:
                lags.popleft()
            growth = None
            t0, lag0 = lags[0]
            if lag == 0:
                growth = 0.0  # caught up: whatever the window saw, its slot is not growing
            elif now - t0 >= 1.0:
                growth = (lag - lag0) / (now - t0) * record_bytes
            size = slot_bytes(segments, durable)
            if size >= self.bytes_max:
                exhaustion: float | None = 0.0
            elif growth is not None and growth > 0:
                exhaustion = (self.bytes_max - size) / growth
            else:
                exhaustion = None
            forecast = SlotForecast(node_id, durable, size, lag, growth, exhaustion)
            self.forecasts[node_id] = forecast
            self._publish(forecast)
            self._warn(forecast)

    def _warn(self, f: SlotForecast) -> None:
        soon = f.exhaustion_s is not None and f.exhaustion_s < self.warn_s
        if soon and f.node_id not in self._warned:
            self._warned.add(f.node_id)
            log.warning(
                "replication: the retention slot of %s (%d bytes, from lsn %d) reaches "
                "--wal-retention-bytes-max %d in %.0f s at the current ingest rate and lag; "
                "then it needs a snapshot",
                f.node_id,
                f.slot_bytes,
                f.slot_lsn + 1,
                self.bytes_max,
                f.exhaustion_s,
            )
        elif not soon and f.node_id in self._warned:
            self._warned.discard(f.node_id)
            log.info(
                "replication: the retention slot of %s is no longer forecast to fill within %.0f s",
                f.node_id,
                self.warn_s,
            )

    def _publish(self, f: SlotForecast) -> None:
        self.metrics.follower_retention_bytes.labels(f.node_id).set(f.slot_bytes)
        seconds = math.inf if f.exhaustion_s is None else f.exhaustion_s
        self.metrics.follower_retention_exhaustion_seconds.labels(f.node_id).set(seconds)

    def _forget(self, node_id: str) -> None:
        self.forecasts.pop(node_id, None)
        self._lags.pop(node_id, None)
        self._warned.discard(node_id)
        for gauge in (
            self.metrics.follower_retention_bytes,
            self.metrics.follower_retention_exhaustion_seconds,
        ):
            try:
                gauge.remove(node_id)
            except KeyError:
                pass

    def status(self) -> dict[str, Any]:
        """For ``/health``: the cap and each follower's forecast."""
        return {
            "bytes_max": self.bytes_max,
            "warn_s": self.warn_s,
            "followers": {n: f.status() for n, f in sorted(self.forecasts.items())},
        }


def _mean_record_bytes(segments: Segments, written_lsn: int) -> float:
    """The WAL's mean bytes per record, over what is on disk (segment headers included)."""
    if not segments:
        return 0.0
    records = written_lsn - segments[0][0] + 1
    return sum(size for _, _, size in segments) / records if records > 0 else 0.0
