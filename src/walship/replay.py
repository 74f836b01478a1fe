"""Putting lost-and-found records back: re-append the records divergence repair cut from a
node's log to the cluster's current leader, with their original ids.

Replay is idempotent and never forces anything:

- every record is sent with its original event id, so one the leader already holds (an
  earlier replay, or a client that retried the write on the new leader) is answered
  ``duplicate`` and stored nothing twice;
- every record is sent with ``expected_version`` one below the version it had, so it lands
  at that same version of its entity -- or, when the entity has moved on since (the new
  leader took other writes for it), the leader refuses it with ``version_conflict`` and the
  record is *listed*, with the entity's version now, for the operator to decide;
- an id the leader holds with other contents is refused (``id_conflict``) and listed too;
- walship's own records (``_system.`` types: a term's first record, a consumer's tracked
  position) are skipped.

Records go in batches in their log order; a batch the leader refuses for a conflict is sent
again one record at a time, so one conflict holds back no other record. A dry run asks the
leader instead (event by id, the entity's version) and says what a replay would do.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec

from walship.client import Client
from walship.errors import IdConflict, InvalidInput, NotFound, VersionConflict
from walship.events import SYSTEM_PREFIX
from walship.replication.lostfound import LostRecord, read_file

REPLAY_BATCH_EVENTS = 100
"""Records per request: few enough that re-sending a refused batch one by one is cheap."""


class Outcome(Enum):
    STORED = "stored"
    ALREADY_STORED = "already_stored"
    WOULD_STORE = "would_store"  # dry run
    VERSION_CONFLICT = "version_conflict"  # the entity moved on: listed, not forced
    ID_CONFLICT = "id_conflict"  # the id is stored with other contents
    SKIPPED = "skipped"  # a leader's own record (``_system.``)


CONFLICTS = (Outcome.VERSION_CONFLICT, Outcome.ID_CONFLICT)


def _null() -> msgspec.Raw:
    return msgspec.Raw(b"null")


class LostEvent(msgspec.Struct):
    """The event of a lost-and-found record, as ``lost_record`` wrote it."""

    id: uuid.UUID
    entity_id: str
    event_type: str
    version: int
    payload: msgspec.Raw
    tenant_id: str = "default"
    metadata: msgspec.Raw = msgspec.field(default_factory=_null)
    payload_encoding: str | None = None  # binary payloads: sent back as they were written


@dataclass(frozen=True)
class ReplayRecord:
    lsn: int
    term: int
    event: LostEvent

    @property
    def system(self) -> bool:
        return self.event.event_type.startswith(SYSTEM_PREFIX)

    def request(self) -> dict[str, Any]:
        """The event as the leader's batch endpoint takes it, pinned to its old version."""
        ev = self.event
        out: dict[str, Any] = {
            "id": str(ev.id),
            "tenant_id": ev.tenant_id,
            "entity_id": ev.entity_id,
            "event_type": ev.event_type,
            "payload": ev.payload,
            "metadata": ev.metadata,
            "expected_version": ev.version - 1,
        }
        if ev.payload_encoding is not None:
            out["payload_encoding"] = ev.payload_encoding
        return out


@dataclass(frozen=True)
class ReplayResult:
    record: ReplayRecord
    outcome: Outcome
    lsn: int | None = None  # where the leader holds it (stored or already stored)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        ev = self.record.event
        return {
            "lost_lsn": self.record.lsn,
            "lost_term": self.record.term,
            "id": str(ev.id),
            "tenant_id": ev.tenant_id,
            "entity_id": ev.entity_id,
            "event_type": ev.event_type,
            "version": ev.version,
            "outcome": self.outcome.value,
            "lsn": self.lsn,
            **self.detail,
        }


_event_decoder = msgspec.json.Decoder(LostEvent)


def load_records(path: Path) -> list[ReplayRecord]:
    """Every record of a lost-and-found file (or of ``lost-found export --format jsonl``),
    checked before anything is sent: InvalidInput naming the file and line otherwise."""
    if path.is_dir():
        raise InvalidInput(f"{path} is a directory: give one file (walship lost-found list)")
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    out: list[ReplayRecord] = []
    try:
        for n, rec in enumerate(read_file(path), start=1):
            out.append(_record(path, n, rec))
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path} is not a lost-and-found file: {exc}") from exc
    return out


def _record(path: Path, n: int, rec: LostRecord) -> ReplayRecord:
    # read_file skips blank lines, so ``n`` counts records; the lsn names the line better
    where = f"{path} record {n} (lsn {rec.lsn})"
    try:
        event = _event_decoder.decode(rec.event)
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"{where}: not a lost event: {exc}") from exc
    # walship's own records (a consumer's tracking, a term's first record) have version 0:
    # repair cuts whole WAL records, so a file holds them too, and replay skips them
    if event.version < 1 and not event.event_type.startswith(SYSTEM_PREFIX):
        raise InvalidInput(f"{where}: version {event.version} is not a stored version")
    return ReplayRecord(rec.lsn, rec.term, event)


def replay(
    client: Client,
    records: Sequence[ReplayRecord],
    *,
    dry_run: bool = False,
    batch_events: int = REPLAY_BATCH_EVENTS,
    advance: Callable[[int], None] = lambda n: None,
) -> list[ReplayResult]:
    """Replay ``records`` (in order) through ``client`` to the leader; one result each.

    Once a record of an entity is not replayed (a conflict), no later record of that entity
    is either: it followed the one held back, and would land after whatever the new leader
    wrote instead. ``advance(n)`` is called as each ``n`` records are done (a progress bar).
    Errors other than the conflicts (the leader unreachable, a key without write access, a
    record the leader finds invalid) propagate: the records before them are stored, and
    replaying the file again stores each of those nothing twice.
    """
    state = _Replay(client, advance)
    if dry_run:
        for rec in records:
            state.results.append(state.held_back(rec) or state.dry_run_one(rec))
            advance(1)
        return state.results
    todo: list[ReplayRecord] = []
    for rec in records:
        held = state.held_back(rec)
        if held is not None:
            state.results.append(held)
            advance(1)
            continue
        todo.append(rec)
        if len(todo) >= batch_events:
            state.send(todo)
            todo = []
    if todo:
        state.send(todo)
    state.results.sort(key=lambda r: r.record.lsn)
    return state.results


def _key(rec: ReplayRecord) -> tuple[str, str]:
    return rec.event.tenant_id, rec.event.entity_id


class _Replay:
    """One replay's progress: its results and the entities held back by a conflict."""

    def __init__(self, client: Client, advance: Callable[[int], None]) -> None:
        self.client = client
        self.advance = advance
        self.results: list[ReplayResult] = []
        self.blocked: dict[tuple[str, str], int] = {}  # entity -> lsn of its first conflict
        self.versions: dict[tuple[str, str], int] = {}  # dry run: each entity's version

    def held_back(self, rec: ReplayRecord) -> ReplayResult | None:
        """The result of a record that is not sent: a system record, or one of an entity
        an earlier conflict held back."""
        if rec.system:
            return ReplayResult(rec, Outcome.SKIPPED)
        first = self.blocked.get(_key(rec))
        if first is None:
            return None
        return ReplayResult(rec, Outcome.VERSION_CONFLICT, detail={"after_conflict_lsn": first})

    def _note(self, result: ReplayResult) -> ReplayResult:
        if result.outcome in CONFLICTS:
            self.blocked.setdefault(_key(result.record), result.record.lsn)
        return result

    def send(self, batch: list[ReplayRecord]) -> None:
        try:
            answer = self.client.append_batch([r.request() for r in batch])
        except (VersionConflict, IdConflict):
            # one record holds the batch back: each on its own, so only the conflicts (and
            # the later records of their entities) stay out
            for rec in batch:
                self.results.append(self.held_back(rec) or self._note(self.send_one(rec)))
                self.advance(1)
            return
        self.advance(len(batch))
        for rec, r in zip(batch, answer.receipts, strict=True):
            outcome = Outcome.ALREADY_STORED if r.duplicate else Outcome.STORED
            self.results.append(ReplayResult(rec, outcome, r.lsn))

    def send_one(self, rec: ReplayRecord) -> ReplayResult:
        try:
            (receipt,) = self.client.append_batch([rec.request()]).receipts
        except VersionConflict as exc:
            now = exc.details.get("current_version")
            return ReplayResult(rec, Outcome.VERSION_CONFLICT, detail={"current_version": now})
        except IdConflict as exc:
            stored = exc.details.get("stored")
            return ReplayResult(rec, Outcome.ID_CONFLICT, detail={"stored": stored})
        outcome = Outcome.ALREADY_STORED if receipt.duplicate else Outcome.STORED
        return ReplayResult(rec, outcome, receipt.lsn)

    def dry_run_one(self, rec: ReplayRecord) -> ReplayResult:
        """What a replay would do with ``rec``, given the leader's state and the records
        before it that a replay would store."""
        ev = rec.event
        try:
            held = self.client.event(ev.id)
        except NotFound:
            held = None
        if held is not None:
            ours = (ev.tenant_id, ev.entity_id, ev.event_type)
            if (held.tenant_id, held.entity_id, held.event_type) == ours:
                return ReplayResult(rec, Outcome.ALREADY_STORED, held.lsn)
            stored = {"lsn": held.lsn, "entity_id": held.entity_id, "event_type": held.event_type}
            return self._note(ReplayResult(rec, Outcome.ID_CONFLICT, detail={"stored": stored}))
        key = _key(rec)
        if key not in self.versions:
            self.versions[key] = self.client.entity_version(ev.entity_id, tenant_id=ev.tenant_id)
        if self.versions[key] != ev.version - 1:
            detail = {"current_version": self.versions[key]}
            return self._note(ReplayResult(rec, Outcome.VERSION_CONFLICT, detail=detail))
        self.versions[key] = ev.version
        return ReplayResult(rec, Outcome.WOULD_STORE)


def counts(results: Sequence[ReplayResult]) -> dict[str, int]:
    """How many records had each outcome (every outcome named, 0 included)."""
    out = {o.value: 0 for o in Outcome}
    for r in results:
        out[r.outcome.value] += 1
    return out
