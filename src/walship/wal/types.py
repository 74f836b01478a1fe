"""The WAL's value types: fsync policy, what a write did, what an append got, status."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum

from walship.errors import InvalidInput
from walship.position import Lsn, Term


class FsyncMode(Enum):
    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class FsyncPolicy:
    """When the writer fsyncs: after every group commit, at most every ``interval_ms``, or never."""

    mode: FsyncMode = FsyncMode.ALWAYS
    interval_ms: int = 0

    @classmethod
    def parse(cls, text: str) -> FsyncPolicy:
        """Parse ``always``, ``never`` or ``interval:MS``."""
        if text == "always":
            return cls(FsyncMode.ALWAYS)
        if text == "never":
            return cls(FsyncMode.NEVER)
        kind, _, ms = text.partition(":")
        if kind == "interval" and ms.isdigit() and int(ms) > 0:
            return cls(FsyncMode.INTERVAL, int(ms))
        raise InvalidInput(f"fsync policy must be always, never or interval:MS, not {text!r}")

    def __str__(self) -> str:
        if self.mode is FsyncMode.INTERVAL:
            return f"interval:{self.interval_ms}"
        return str(self.mode.value)


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What the writer did for a group: up to ``lsn`` written, and whether it was fsynced."""

    lsn: int
    synced: bool


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Lsns assigned to one append, and the future of their group commit."""

    first_lsn: Lsn
    last_lsn: Lsn
    term: Term
    chains: list[bytes]
    done: Future[WriteOutcome]


@dataclass(frozen=True, slots=True)
class WalStatus:
    last_lsn: int
    last_term: int
    written_lsn: int
    synced_lsn: int
    segments: int
    bytes: int
    failed: str | None


@dataclass(frozen=True, slots=True)
class RecentWrite:
    """Records the writer just wrote to one segment, kept in memory for cursors tailing the
    log: ``data`` is exactly the bytes at ``end_offset - len(data)`` of segment
    ``segment_first``, whole atomic appends ``first_lsn..last_lsn``."""

    first_lsn: int
    last_lsn: int
    last_term: int
    last_chain: bytes
    data: bytes
    segment_first: int
    end_offset: int


def _first_lsn(write: RecentWrite) -> int:
    return write.first_lsn


WalListener = Callable[[int], None]
"""Called from the writer thread with the new written lsn after each group commit."""

RollbackListener = Callable[[int], None]
"""Called from the writer thread after a full disk rolled back everything after this lsn
(the last written one), before any append can take those lsns again."""
