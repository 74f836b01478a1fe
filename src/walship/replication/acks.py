"""Acknowledgement modes, the tracker that waits for a write's own lsn, and the history of
what this node answered ``replicated`` (the degradation ledger is in ``ledger.py``).

``AckTracker`` lives on the leader's event loop. Followers' sessions report each durable lsn
with ``update``; a write waits with ``wait(lsn, ...)`` for its *own* lsn (not "the last
shipped offset", the reference's bug): the condition is checked when the wait starts and on
every update and in-sync change, so a wake-up cannot be missed. Only the acks of the
*counting* followers (``insync.py``: members of an in-sync set every member has stored) meet
a mode; ``acked_by`` on a receipt still names every follower that held the write.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from walship.errors import InvalidInput
from walship.fsutil import atomic_write
from walship.limits import QUORUM_FOLLOWERS_MAX
from walship.replication.ledger import DegradationLedger, LedgerRange

__all__ = [
    "AckHistory",
    "AckMode",
    "AckOutcome",
    "AckTracker",
    "DegradationLedger",  # re-exported: the ledger moved to ledger.py
    "LedgerRange",
]


@dataclass(frozen=True, slots=True)
class AckMode:
    """``async`` (0 followers), ``semi-sync`` (1), ``quorum:N`` (N) or ``sync`` (every in-sync)."""

    kind: str
    count: int = 0

    @classmethod
    def parse(cls, text: str) -> AckMode:
        text = text.strip().lower()
        if text in ("async", "none"):
            return cls("async", 0)
        if text in ("semi-sync", "semisync", "semi_sync"):
            return cls("semi-sync", 1)
        if text in ("sync", "all"):
            return cls("sync", 0)
        kind, _, n = text.partition(":")
        if kind == "quorum" and n.isdigit() and n.isascii():
            if len(n) > 6 or not 1 <= int(n) <= QUORUM_FOLLOWERS_MAX:
                raise InvalidInput(
                    f"ack mode quorum:N needs 1 <= N <= {QUORUM_FOLLOWERS_MAX}, not {n[:20]!r}",
                    field="ack_mode",
                )
            return cls("quorum", int(n))
        raise InvalidInput(
            f"ack mode must be async, semi-sync, quorum:N or sync, not {text[:40]!r}",
            field="ack_mode",
        )

    def __str__(self) -> str:
        return f"quorum:{self.count}" if self.kind == "quorum" else self.kind

    @property
    def waits(self) -> bool:
        return self.kind != "async"

    def required(self, in_sync_count: int, min_in_sync: int = 1) -> int:
        """How many follower acks this mode needs with ``in_sync_count`` followers in sync."""
        if self.kind == "sync":
            return max(in_sync_count, min_in_sync, 1)
        return self.count

    def followers_asked(self, min_in_sync: int = 1) -> int:
        """The fewest followers this mode can be met with (``sync``: the in-sync floor)."""
        return max(min_in_sync, 1) if self.kind == "sync" else self.count

    def stricter(self, other: AckMode, in_sync_count: int) -> AckMode:
        """The stricter of two modes (a request may only raise the server's level)."""
        return other if other.required(in_sync_count) > self.required(in_sync_count) else self


@dataclass(frozen=True, slots=True)
class AckOutcome:
    """Which followers held the lsn when the wait ended, and whether the mode was met."""

    satisfied: bool
    acked_by: list[str]
    required: int
    reason: str | None = None


@dataclass
class _Waiter:
    lsn: int
    mode: AckMode
    future: asyncio.Future[str | tuple[list[str], int]]  # met: (acked_by, required); else why not
    min_in_sync: int


class AckTracker:
    """Durable lsn per follower and the writes waiting on them. Event-loop confined."""

    def __init__(self) -> None:
        self._durable: dict[str, int] = {}
        self._in_sync: set[str] = set()  # the counting followers
        self._pending = False  # a change of the counting set is on its way
        self._waiters: list[_Waiter] = []
        self._closed: str | None = None  # set by fail_all: no wait can succeed any more

    @property
    def followers(self) -> dict[str, int]:
        return dict(self._durable)

    @property
    def in_sync(self) -> set[str]:
        return set(self._in_sync)

    def update(self, node_id: str, durable_lsn: int) -> None:
        """A follower has durably written up to ``durable_lsn`` (never moves backwards)."""
        if durable_lsn > self._durable.get(node_id, -1):
            self._durable[node_id] = durable_lsn
            self._wake()

    def set_counting(self, members: set[str], pending: bool = False) -> None:
        """The followers whose acks meet a mode from now on (the in-sync set every member has
        stored); ``pending`` while a change of that set is on its way, so a wait below the
        floor waits for it instead of failing at once."""
        self._pending = pending
        if members != self._in_sync:
            self._in_sync = set(members)
            self._wake()

    def set_in_sync(self, node_id: str, in_sync: bool) -> None:
        """One follower joins or leaves the counting set."""
        members = self._in_sync | {node_id} if in_sync else self._in_sync - {node_id}
        self.set_counting(members, self._pending)

    def forget(self, node_id: str) -> None:
        self._durable.pop(node_id, None)
        self._in_sync.discard(node_id)
        self._wake()

    def acked_by(self, lsn: int) -> list[str]:
        return sorted(n for n, d in self._durable.items() if d >= lsn)

    def _met(self, w: _Waiter) -> bool:
        acked = [n for n in self._in_sync if self._durable.get(n, -1) >= w.lsn]
        if w.mode.kind == "sync":
            return len(self._in_sync) >= max(w.min_in_sync, 1) and all(
                self._durable.get(n, -1) >= w.lsn for n in self._in_sync
            )
        return len(acked) >= w.mode.count

    def _wake(self) -> None:
        still = []
        for w in self._waiters:
            if w.future.done():
                continue
            if self._met(w):
                # the receipt reports the set that met the mode, taken now: by the time the
                # waiting write runs again the in-sync set may have changed
                need = w.mode.required(len(self._in_sync), w.min_in_sync)
                w.future.set_result((self.acked_by(w.lsn), need))
            else:
                still.append(w)
        self._waiters = still

    async def wait(
        self, lsn: int, mode: AckMode, timeout_s: float, min_in_sync: int = 1
    ) -> AckOutcome:
        """Wait until ``mode`` is met for ``lsn`` or ``timeout_s`` passes.

        Returns at once, unsatisfied, when fewer followers are in sync than ``min_in_sync``
        (the floor): waiting could not help.
        """
        required = mode.required(len(self._in_sync), min_in_sync)
        if not mode.waits:
            return AckOutcome(True, self.acked_by(lsn), required)
        if len(self._in_sync) < min_in_sync and not self._pending:
            return AckOutcome(
                False,
                self.acked_by(lsn),
                required,
                f"{len(self._in_sync)} followers in sync, below the floor of {min_in_sync}",
            )
        if self._closed is not None:
            return AckOutcome(False, self.acked_by(lsn), required, self._closed)
        waiter = _Waiter(lsn, mode, asyncio.get_running_loop().create_future(), min_in_sync)
        if self._met(waiter):
            return AckOutcome(True, self.acked_by(lsn), required)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                failed = await waiter.future
        except TimeoutError:
            need = mode.required(len(self._in_sync), min_in_sync)
            return AckOutcome(
                False,
                self.acked_by(lsn),
                need,
                f"not confirmed by {need} followers within {int(timeout_s * 1000)} ms",
            )
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
        if isinstance(failed, str):
            return AckOutcome(False, self.acked_by(lsn), required, failed)
        acked, need = failed
        return AckOutcome(True, acked, need)

    def fail_all(self, reason: str) -> None:
        """Answer every waiter, unsatisfied with ``reason``, and every later wait too
        (shutdown, demotion, fencing): they report what was acked so far."""
        self._closed = reason
        for w in self._waiters:
            if not w.future.done():
                w.future.set_result(reason)
        self._waiters = []


class AckHistory:
    """For each term this node led: the highest lsn it answered ``replicated``; persisted.

    Divergence repair reads it to say, for each record it cuts, whether the client was ever
    told ``replicated``. Updates are flushed at most every ``flush_interval_s`` (the leader's
    monitor calls ``flush``) and when the leader stops, so after a crash the last few
    ``replicated`` answers may be reported as ``local_or_unanswered``; a new term is written
    at once.
    """

    def __init__(self, path: Path, flush_interval_s: float = 0.1) -> None:
        self.path = path
        self.flush_interval_s = flush_interval_s
        self.terms: dict[int, int] = {}
        if path.exists():
            raw = msgspec.json.decode(path.read_bytes(), type=dict[str, int])
            self.terms = {int(t): lsn for t, lsn in raw.items()}
        self._dirty = False
        self._last_flush = 0.0

    def led(self, term: int) -> None:
        """This node leads ``term`` (persisted before returning)."""
        if term not in self.terms:
            self.terms[term] = 0
            self._dirty = True
            self.flush()

    def replicated(self, term: int, lsn: int) -> None:
        """Everything up to ``lsn`` of ``term`` was answered ``replicated`` (or is older)."""
        if lsn > self.terms.get(term, 0):
            self.terms[term] = lsn
            self._dirty = True
            if time.monotonic() - self._last_flush >= self.flush_interval_s:
                self.flush()

    def flush_due(self) -> None:
        """Flush when an update has waited ``flush_interval_s``."""
        if self._dirty and time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, msgspec.json.encode({str(t): v for t, v in self.terms.items()}))
            self._dirty = False
            self._last_flush = time.monotonic()

    def level(self, term: int, lsn: int, ledger: DegradationLedger) -> str:
        """How this node acknowledged record ``lsn`` of ``term``: ``replicated``,
        ``degraded`` (in the ledger), ``local_or_unanswered`` (it led that term, and either
        answered ``local``/``buffered`` or never answered), or ``not_led_here`` (another
        leader wrote it; this node never answered for it)."""
        if term not in self.terms:
            return "not_led_here"
        if lsn <= self.terms[term]:
            return "replicated"
        if any(r.first_lsn <= lsn <= r.last_lsn for r in ledger.ranges):
            return "degraded"
        return "local_or_unanswered"
