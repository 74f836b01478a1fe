"""The degradation ledger: lsn ranges a leader committed without the acknowledgements their
mode required, and -- once enough followers have durably written a range after all -- when
and to whom it was replicated.

A range is *at risk* until that happens: its writes live on the leader alone (or on fewer
followers than the mode asked for), so losing the leader loses them. ``heal`` is what turns a
range *since replicated*: the leader calls it with the durable lsn of every follower it knows
(connected or holding a retention slot) and the number of followers its mode needs. Healing
is recorded, not recomputed: it persists with the ledger (``replication/degraded.json``), so
"which writes are at risk now" survives a restart and needs no lsn arithmetic by hand.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from walship.events import now_us
from walship.fsutil import atomic_write
from walship.replication.metrics import ReplicationMetrics

log = logging.getLogger(__name__)

AT_RISK = "at_risk"
SINCE_REPLICATED = "since_replicated"


class LedgerRange(msgspec.Struct):
    first_lsn: int
    last_lsn: int
    writes: int
    first_ts_us: int
    last_ts_us: int
    reason: str
    # trailing, with defaults: ledgers saved before healing was recorded still load
    replicated_ts_us: int | None = None  # when enough followers held the whole range
    replicated_to: list[str] = msgspec.field(default_factory=list)  # which ones, then

    @property
    def at_risk(self) -> bool:
        return self.replicated_ts_us is None

    @property
    def state(self) -> str:
        return AT_RISK if self.at_risk else SINCE_REPLICATED


@dataclass
class DegradationLedger:
    """Lsn ranges committed without the acknowledgements their mode required; persisted.

    ``record`` and ``heal`` change the ledger in memory; the leader saves it (``encode`` +
    ``write``, one save covering every change made meanwhile) -- before a degraded write's
    answer leaves, so after a crash no write answered ``degraded`` is missing from it.
    """

    path: Path
    ranges: list[LedgerRange] = field(default_factory=list)
    version: int = 0  # bumped by every change; what a save covered is up to its caller
    saved_version: int = 0

    @classmethod
    def load(cls, path: Path) -> DegradationLedger:
        ledger = cls(path)
        if path.exists():
            ledger.ranges = msgspec.json.decode(path.read_bytes(), type=list[LedgerRange])
        return ledger

    @property
    def degraded_writes(self) -> int:
        return sum(r.writes for r in self.ranges)

    @property
    def at_risk_writes(self) -> int:
        return sum(r.writes for r in self.ranges if r.at_risk)

    @property
    def at_risk_ranges(self) -> int:
        return sum(1 for r in self.ranges if r.at_risk)

    def record(self, first_lsn: int, last_lsn: int, reason: str, now_us: int) -> None:
        last = self.ranges[-1] if self.ranges else None
        if (
            last is not None
            and last.at_risk  # a healed range stays as it was healed: a new one starts
            and first_lsn <= last.last_lsn + 1
            and last_lsn >= last.first_lsn
        ):
            last.first_lsn = min(last.first_lsn, first_lsn)
            last.last_lsn = max(last.last_lsn, last_lsn)
            last.writes += 1
            last.last_ts_us = now_us
            last.reason = reason
        else:
            self.ranges.append(LedgerRange(first_lsn, last_lsn, 1, now_us, now_us, reason))
        self.version += 1

    def heal(self, durable: dict[str, int], need: int, now_us: int) -> list[LedgerRange]:
        """Mark ``since replicated`` every at-risk range that at least ``need`` (>= 1) of the
        followers in ``durable`` (node id → durable lsn) hold whole; returns those ranges.

        ``replicated_to`` names every follower holding the range at that moment.
        """
        healed = []
        for r in self.ranges:
            if not r.at_risk:
                continue
            holders = sorted(n for n, lsn in durable.items() if lsn >= r.last_lsn)
            if len(holders) >= max(need, 1):
                r.replicated_ts_us = now_us
                r.replicated_to = holders
                healed.append(r)
        if healed:
            self.version += 1
        return healed

    def encode(self) -> bytes:
        """The ledger as saved (take it where ``record`` runs, then ``write`` it anywhere)."""
        return msgspec.json.encode(self.ranges)

    def write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, data)

    def flush(self) -> None:
        """Save now if anything changed since the last save (same thread as ``record``)."""
        if self.saved_version != self.version:
            version = self.version
            self.write(self.encode())
            self.saved_version = version

    def to_list(self, *, at_risk_only: bool = False) -> list[dict[str, object]]:
        """The ranges as JSON-ready dicts, each with its ``state`` (``at_risk`` or
        ``since_replicated``); only those still at risk with ``at_risk_only``."""
        return [
            {**msgspec.to_builtins(r), "state": r.state}
            for r in self.ranges
            if r.at_risk or not at_risk_only
        ]

    def truncate_after(self, lsn: int) -> None:
        """Forget ranges above ``lsn`` (divergence repair cut those records; the lost-and-found
        file keeps what the ledger said about them) and persist."""
        kept = [r for r in self.ranges if r.first_lsn <= lsn]
        for r in kept:
            r.last_lsn = min(r.last_lsn, lsn)
        self.ranges = kept
        self.version += 1
        self.flush()


class LedgerKeeper:
    """The leader's ledger on its event loop: records degraded ranges and heals them, saves
    every change (in a worker thread, one save at a time) and publishes the metrics."""

    def __init__(self, path: Path, metrics: ReplicationMetrics) -> None:
        self.ledger = DegradationLedger.load(path)
        self.metrics = metrics
        self._lock = asyncio.Lock()  # one save at a time; waiters share the next one
        self.publish()

    async def record(self, first_lsn: int, last_lsn: int, reason: str) -> None:
        """Add the range to the ledger and save it before returning (so before the write's
        answer leaves).

        Saves run in a worker thread, one at a time, and a save covers every change made
        before it began: under a burst of degraded writes, one file write answers many. The
        save is shielded: a request cancelled meanwhile (its client gone) neither stops it
        nor lets the next save start while its thread still writes the file. A save that
        fails is logged and counted; the answer still says ``degraded``, and the next save
        (or the leader's stop) writes the range.
        """
        self.ledger.record(first_lsn, last_lsn, reason, now_us())
        self.publish()
        await asyncio.shield(self.save(self.ledger.version))

    async def heal(self, durable: dict[str, int], need: int) -> None:
        """Turn the at-risk ranges ``need`` followers now hold (``durable``: node id →
        durable lsn) into ``since replicated``, and save that."""
        if not any(r.at_risk for r in self.ledger.ranges):
            return
        healed = self.ledger.heal(durable, need, now_us())
        if not healed:
            return
        for r in healed:
            log.info(
                "replication: degraded range %d..%d (%d writes) since replicated to %s",
                r.first_lsn,
                r.last_lsn,
                r.writes,
                ", ".join(r.replicated_to),
            )
        self.publish()
        await asyncio.shield(self.save(self.ledger.version))

    async def save(self, wanted: int) -> None:
        async with self._lock:
            if self.ledger.saved_version >= wanted:
                return  # a save that began after this change covered it
            version, data = self.ledger.version, self.ledger.encode()
            try:
                await asyncio.to_thread(self.ledger.write, data)
            except OSError as exc:
                self.metrics.ledger_save_failures.inc()
                log.error("replication: could not save the degradation ledger: %s", exc)
                return
            self.ledger.saved_version = max(self.ledger.saved_version, version)

    async def flush(self) -> None:
        """Save whatever is unsaved, now (the leader stops)."""
        async with self._lock:
            self.ledger.flush()

    def publish(self) -> None:
        ledger = self.ledger
        self.metrics.degraded_writes.set(ledger.degraded_writes)
        self.metrics.degraded_ranges.set(len(ledger.ranges))
        self.metrics.at_risk_writes.set(ledger.at_risk_writes)
        self.metrics.at_risk_ranges.set(ledger.at_risk_ranges)

    def summary(self) -> dict[str, int]:
        """The counts ``/health`` shows."""
        ledger = self.ledger
        return {
            "writes": ledger.degraded_writes,
            "ranges": len(ledger.ranges),
            "at_risk_writes": ledger.at_risk_writes,
            "at_risk_ranges": ledger.at_risk_ranges,
        }
