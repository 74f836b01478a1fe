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
- a consumer's tracked position (a ``_system.tracking`` record) goes back *with the events of
  its batch*, in one atomic append, under the leader's usual rule: a position not above the
  consumer's stored one refuses the whole batch (``tracking_conflict``: listed, nothing of it
  stored), unless the leader holds exactly that batch already (a second replay: answered
  ``already_stored``). The batch is the records of the tracking's atomic append (the file's
  ``batch_left``; in a file written before it, the records just before the tracking with its
  term and timestamp, which one append shares);
- walship's other own records (a term's first record) are skipped.

Records go in batches in their log order; a batch the leader refuses for a conflict is sent
again one record at a time, so one conflict holds back no other record (a tracked batch is
never split). A dry run asks the leader instead (event by id, the entity's version, the
consumer's position) and says what a replay would do.
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
from walship.errors import (
    IdConflict,
    InvalidInput,
    NotFound,
    TrackingConflict,
    VersionConflict,
)
from walship.events import SYSTEM_PREFIX
from walship.replication.lostfound import LostRecord, read_file
from walship.storage.consumers import TRACKING_TYPE, decode_tracking_payload

REPLAY_BATCH_EVENTS = 100
"""Records per request: few enough that re-sending a refused batch one by one is cheap."""


class Outcome(Enum):
    STORED = "stored"
    ALREADY_STORED = "already_stored"
    WOULD_STORE = "would_store"  # dry run
    VERSION_CONFLICT = "version_conflict"  # the entity moved on: listed, not forced
    ID_CONFLICT = "id_conflict"  # the id is stored with other contents
    TRACKING_CONFLICT = "tracking_conflict"  # the consumer is at or past the batch's position
    SKIPPED = "skipped"  # a leader's own record (``_system.``) other than a tracking


CONFLICTS = (Outcome.VERSION_CONFLICT, Outcome.ID_CONFLICT, Outcome.TRACKING_CONFLICT)


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
    timestamp: str | None = None  # one append's records share it (groups old files' batches)


@dataclass(frozen=True)
class ReplayRecord:
    lsn: int
    term: int
    event: LostEvent
    batch_left: int | None = None  # records after it in its atomic append (None: not known)

    @property
    def system(self) -> bool:
        return self.event.event_type.startswith(SYSTEM_PREFIX)

    @property
    def tracking(self) -> bool:
        return self.event.event_type == TRACKING_TYPE

    def tracking_request(self) -> dict[str, Any]:
        """A tracking record as a batch's ``tracking`` (the consumer is its entity id)."""
        ev = self.event
        position = decode_tracking_payload(bytes(ev.payload))
        return {"consumer": ev.entity_id, "position": position, "tenant_id": ev.tenant_id}

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
    if event.event_type == TRACKING_TYPE:
        try:
            position = decode_tracking_payload(bytes(event.payload))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidInput(f"{where}: not a tracking record: {exc}") from exc
        if position < 1:
            raise InvalidInput(f"{where}: tracked position {position} is not a position")
    return ReplayRecord(rec.lsn, rec.term, event, rec.batch_left)


def tracked_batches(records: Sequence[ReplayRecord]) -> dict[int, list[ReplayRecord]]:
    """The events that went in one atomic append with each tracking record (the record's lsn
    -> the events before it, in order; none for a tracking stored alone).

    From ``batch_left`` when the file has it: the append is the run of records that ends
    with the tracking (always last in its append). Otherwise (files written before it), the
    events just before the tracking with consecutive lsns, its term and its timestamp, which
    the store takes once per append."""
    out: dict[int, list[ReplayRecord]] = {}
    for i, rec in enumerate(records):
        if not rec.tracking:
            continue
        batch: list[ReplayRecord] = []
        j = i - 1
        while j >= 0:
            prev = records[j]
            if prev.lsn != records[j + 1].lsn - 1 or prev.term != rec.term or prev.system:
                break
            if rec.batch_left is not None and prev.batch_left is not None:
                if prev.batch_left == 0:  # the end of an earlier append
                    break
            elif prev.event.timestamp is None or prev.event.timestamp != rec.event.timestamp:
                break
            batch.append(prev)
            j -= 1
        batch.reverse()
        out[rec.lsn] = batch
    return out


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
    wrote instead. A tracking record goes with the events of its append (``tracked_batches``)
    as one batch, stored or refused whole. ``advance(n)`` is called as each ``n`` records are
    done (a progress bar). Errors other than the conflicts (the leader unreachable, a key
    without write access, a record the leader finds invalid) propagate: the records before
    them are stored, and replaying the file again stores each of those nothing twice.
    """
    state = _Replay(client, advance)
    tracked = tracked_batches(records)
    with_tracking = {r.lsn for batch in tracked.values() for r in batch}
    todo: list[ReplayRecord] = []
    for rec in records:
        if rec.lsn in with_tracking:
            continue  # sent (or asked about) with its tracking, the record that ends its batch
        if rec.tracking:
            if dry_run:
                state.dry_run_tracked(tracked[rec.lsn], rec)
                continue
            if todo:  # in log order: what came before the batch goes first
                state.send(todo)
                todo = []
            state.send_tracked(tracked[rec.lsn], rec)
            continue
        held = state.held_back(rec)
        if held is not None or dry_run:
            state.results.append(held or state.dry_run_one(rec))
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
        if rec.system and not rec.tracking:
            return ReplayResult(rec, Outcome.SKIPPED)
        first = self.blocked.get(_key(rec))
        if first is None:
            return None
        return ReplayResult(rec, Outcome.VERSION_CONFLICT, detail={"after_conflict_lsn": first})

    def _held_batch(self, events: list[ReplayRecord], track: ReplayRecord) -> bool:
        """A tracked batch with an event of an entity held back: held back whole (its
        tracking must not go without its events). True when it was."""
        first = min((self.blocked[_key(r)] for r in events if _key(r) in self.blocked), default=0)
        if not first:
            return False
        self._refuse([*events, track], Outcome.VERSION_CONFLICT, {"after_conflict_lsn": first})
        return True

    def _refuse(self, unit: list[ReplayRecord], outcome: Outcome, why: dict[str, Any]) -> None:
        """Every record of a tracked batch refused whole, with the same reason; the later
        records of its events' entities are held back."""
        detail = {**why, "batch_lsns": [unit[0].lsn, unit[-1].lsn]}
        for rec in unit:
            if not rec.tracking:  # the consumer's name is no entity of the tenant's
                self.blocked.setdefault(_key(rec), rec.lsn)
            self.results.append(ReplayResult(rec, outcome, detail=detail))
        self.advance(len(unit))

    def send_tracked(self, events: list[ReplayRecord], track: ReplayRecord) -> None:
        """A tracking and the events of its append, as one batch: stored or refused whole."""
        if self._held_batch(events, track):
            return
        tracking = track.tracking_request()
        try:
            answer = self.client.append_batch([r.request() for r in events], tracking=tracking)
        except TrackingConflict as exc:
            stored = {"stored_position": exc.details.get("stored_position")}
            self._refuse([*events, track], Outcome.TRACKING_CONFLICT, stored)
            return
        except VersionConflict as exc:
            why = {k: exc.details.get(k) for k in ("entity_id", "current_version")}
            self._refuse([*events, track], Outcome.VERSION_CONFLICT, why)
            return
        except IdConflict as exc:
            self._refuse(
                [*events, track], Outcome.ID_CONFLICT, {"stored": exc.details.get("stored")}
            )
            return
        for rec, r in zip(events, answer.receipts, strict=True):
            outcome = Outcome.ALREADY_STORED if r.duplicate else Outcome.STORED
            self.results.append(ReplayResult(rec, outcome, r.lsn))
        receipt = answer.tracking or {}
        repeated = bool(receipt.get("duplicate"))
        outcome = Outcome.ALREADY_STORED if repeated else Outcome.STORED
        self.results.append(ReplayResult(track, outcome, receipt.get("lsn")))
        self.advance(len(events) + 1)

    def dry_run_tracked(self, events: list[ReplayRecord], track: ReplayRecord) -> None:
        """What ``send_tracked`` would do: the consumer's position asked, the events as
        ``dry_run_one`` finds them; a conflict of any refuses the batch whole."""
        if self._held_batch(events, track):
            return
        tracking = track.tracking_request()
        try:
            found = self.client.consumer_position(
                tracking["consumer"], tenant_id=tracking["tenant_id"]
            )
            stored: int | None = found.position
        except NotFound:
            stored = None
        versions = dict(self.versions)  # put back if the batch is refused
        per = [self.dry_run_one(r) for r in events]
        unit = [*events, track]
        if stored is not None and stored >= tracking["position"]:
            if stored == tracking["position"] and all(
                r.outcome is Outcome.ALREADY_STORED for r in per
            ):  # the batch that stored it: answered as a duplicate
                self.results.extend([*per, ReplayResult(track, Outcome.ALREADY_STORED)])
                self.advance(len(unit))
                return
            self.versions = versions
            self._refuse(unit, Outcome.TRACKING_CONFLICT, {"stored_position": stored})
            return
        conflict = next((r for r in per if r.outcome in CONFLICTS), None)
        if conflict is not None:
            self.versions = versions
            self._refuse(unit, conflict.outcome, conflict.detail)
            return
        self.results.extend([*per, ReplayResult(track, Outcome.WOULD_STORE)])
        self.advance(len(unit))

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
