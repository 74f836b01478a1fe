"""The history of a verify run: every write request, every fault, every crash image.

Times are seconds since the run started, from one monotonic clock in the verify process, so
"answered before the kill" is a comparison of two numbers taken in the same process: an answer
recorded at ``finished`` left its node before a signal sent at ``at > finished``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class Outcome(StrEnum):
    """How a write request ended, as the client saw it."""

    PENDING = "pending"
    OK = "ok"  # 200 with receipts
    REJECTED = "rejected"  # an HTTP error answer: the node said it did not (fully) take it
    UNREACHABLE = "unreachable"  # the connection was refused: nothing was sent
    TIMEOUT = "timeout"  # no answer in time: the write may or may not have happened
    BROKEN = "broken"  # the connection broke mid-request: may or may not have happened


@dataclass
class WriteOp:
    """One HTTP write request (a single event or a batch) and what came back."""

    op_id: int
    writer: int
    attempt: int  # 1 for the first try of these event ids, 2.. for retries of the same ids
    node_id: str
    event_ids: list[str]
    entity_ids: list[str]
    started: float
    finished: float | None = None
    outcome: Outcome = Outcome.PENDING
    status: int | None = None
    error: str | None = None
    receipts: list[dict[str, Any]] = field(default_factory=list)

    def brief(self) -> str:
        """One line for a violation's history excerpt."""
        when = f"{self.started:8.3f}-{'?' if self.finished is None else f'{self.finished:.3f}'}"
        ids = ",".join(i[:8] for i in self.event_ids)
        head = f"{when} op {self.op_id} w{self.writer}#{self.attempt} → {self.node_id} [{ids}]"
        if self.outcome is Outcome.OK:
            levels = sorted({r["durability"] for r in self.receipts})
            lsns = [r["lsn"] for r in self.receipts]
            terms = sorted({r["term"] for r in self.receipts})
            dup = " duplicate" if any(r.get("duplicate") for r in self.receipts) else ""
            acked = sorted({a for r in self.receipts for a in r.get("acked_by", [])})
            return (
                f"{head}: ok {'/'.join(levels)}{dup} lsn {min(lsns)}..{max(lsns)} term "
                f"{'/'.join(map(str, terms))} acked_by {acked}"
            )
        detail = f" {self.status}" if self.status is not None else ""
        return f"{head}: {self.outcome}{detail} {self.error or ''}".rstrip()


@dataclass
class FaultRecord:
    """One step of a fault: injected, healed, or something the harness did around it."""

    at: float
    kind: str
    target: str
    phase: str  # inject | heal | note
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # facts a check reads back

    def brief(self) -> str:
        return f"{self.at:8.3f} fault {self.kind} {self.phase} {self.target} {self.detail}".rstrip()


@dataclass
class CrashImage:
    """What a node's disk held right after it was killed with SIGKILL (read while it was down).

    ``records`` maps lsn to ``(term, event id)`` (``""`` for a system record); lsns below
    ``wal_first_lsn`` were checkpointed to Parquet and removed from the WAL.
    """

    node_id: str
    at: float
    role: str
    wal_first_lsn: int
    records: dict[int, tuple[int, str]]
    error: str | None = None  # the WAL could not be read (that is itself a violation)

    @property
    def last_lsn(self) -> int:
        return max(self.records, default=self.wal_first_lsn - 1)


@dataclass
class Rejoin:
    """A deposed leader that came back as a follower (the ``rejoin`` fault): its crash image,
    and how far the new leader's WAL reached back when it did. ``wal_removed``: the WAL at
    its end of log was gone, so only the new leader's term history could tell its tail
    apart."""

    node_id: str
    image: CrashImage
    new_leader: str
    new_wal_first_lsn: int

    @property
    def wal_removed(self) -> bool:
        return self.new_wal_first_lsn > self.image.last_lsn + 1


class History:
    """Everything recorded during one run, in the order it happened."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.ops: list[WriteOp] = []
        self.faults: list[FaultRecord] = []
        self.crashes: list[CrashImage] = []
        self.rejoins: list[Rejoin] = []
        self._next_op = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def begin(
        self, writer: int, attempt: int, node_id: str, event_ids: list[str], entities: list[str]
    ) -> WriteOp:
        self._next_op += 1
        op = WriteOp(self._next_op, writer, attempt, node_id, event_ids, entities, self.now())
        self.ops.append(op)
        return op

    def end(
        self,
        op: WriteOp,
        outcome: Outcome,
        *,
        status: int | None = None,
        error: str | None = None,
        receipts: Iterable[dict[str, Any]] = (),
    ) -> None:
        op.finished = self.now()
        op.outcome = outcome
        op.status = status
        op.error = error
        op.receipts = list(receipts)

    def fault(self, kind: str, target: str, phase: str, detail: str = "") -> FaultRecord:
        record = FaultRecord(self.now(), kind, target, phase, detail)
        self.faults.append(record)
        return record

    def answered(self) -> Iterator[tuple[WriteOp, dict[str, Any]]]:
        """Every receipt of every 200 answer, with its request."""
        for op in self.ops:
            if op.outcome is Outcome.OK:
                for receipt in op.receipts:
                    yield op, receipt

    def ops_for(self, event_ids: set[str]) -> list[WriteOp]:
        """Every request that carried one of ``event_ids``."""
        return [op for op in self.ops if event_ids.intersection(op.event_ids)]

    def excerpt(
        self, event_ids: set[str], *, around_s: float = 2.0, lines_max: int = 30
    ) -> list[str]:
        """The minimal history around a violation: the requests that carried ``event_ids``
        and the faults from ``around_s`` before the first to ``around_s`` after the last."""
        ops = self.ops_for(event_ids)
        if not ops:
            return []
        lo = min(op.started for op in ops) - around_s
        hi = max(op.finished if op.finished is not None else op.started for op in ops) + around_s
        entries: list[tuple[float, str]] = [(op.started, op.brief()) for op in ops]
        entries += [(f.at, f.brief()) for f in self.faults if lo <= f.at <= hi]
        entries.sort(key=lambda e: e[0])
        out = [text for _, text in entries]
        if len(out) > lines_max:
            out = [
                *out[: lines_max // 2],
                f"... {len(out) - lines_max} more ...",
                *out[-lines_max // 2 :],
            ]
        return out

    def write_jsonl(self, path: Path) -> None:
        """The whole history, one JSON object per line in time order: every request
        (``"type": "write"``) and every fault step (``"type": "fault"``)."""
        entries: list[tuple[float, dict[str, Any]]] = [
            (op.started, {"type": "write", **asdict(op)}) for op in self.ops
        ]
        entries += [(f.at, {"type": "fault", **asdict(f)}) for f in self.faults]
        entries.sort(key=lambda e: e[0])
        with open(path, "w") as f:
            for _, entry in entries:
                f.write(json.dumps(entry) + "\n")
