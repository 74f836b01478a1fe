"""Consumers' tracked positions: the last position each (tenant, consumer) committed.

A batch may carry ``tracking: {consumer, position, tenant_id}``; the store writes it as a
``_system.tracking`` record in the same WAL append as the batch's events (so both are stored
or neither), after checking, under the store lock, that the position is above the one stored.
A batch at the stored position that repeats the one which stored it (a client's retry after a
lost answer: the same ids, contents and tracking) is answered as a duplicate, storing nothing.
The record consumes no tenant position and no reader of events sees it.

The table lives in memory, rebuilt at recovery from the checkpoint manifest (which holds the
table as of its lsn: checkpoints, compactions, WAL retention cuts and snapshot installs keep it)
and from the tracking records of the WAL after it. Entries not yet written by the WAL keep
what they replaced in an undo log, so a read answers only what is visible, and a WAL group
rolled back (a full disk) puts the previous entries back.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence

import msgspec

from walship.errors import LimitExceeded, TrackingConflict
from walship.events import (
    StoredEvent,
    TrackingIn,
    decode_body,
    encode_body_fields,
    new_event_ids,
    same_content,
)

TRACKING_TYPE = "_system.tracking"


class ConsumerPosition(msgspec.Struct, frozen=True):
    """A consumer's tracked position, with the lsn of the record that stored it."""

    tenant_id: str
    consumer: str
    position: int
    lsn: int


class TrackingPayload(msgspec.Struct, frozen=True):
    """The payload of a ``_system.tracking`` record (tenant and consumer are the record's
    tenant_id and entity_id)."""

    position: int


_payload_decoder = msgspec.json.Decoder(TrackingPayload)


def encode_tracking_payload(position: int) -> bytes:
    return msgspec.json.encode(TrackingPayload(position))


def decode_tracking_payload(data: bytes) -> int:
    return _payload_decoder.decode(data).position


_Key = tuple[str, str]


class ConsumerTable:
    """(tenant, consumer) → last tracked position. Not thread-safe: the store locks."""

    def __init__(self, entries: list[ConsumerPosition] | None = None) -> None:
        self._entries: dict[_Key, ConsumerPosition] = {}
        # (lsn, key, the entry it replaced) for entries the WAL may not have written yet
        self._undo: deque[tuple[int, _Key, ConsumerPosition | None]] = deque()
        self._per_tenant: Counter[str] = Counter()  # consumers of each tenant
        for entry in entries or ():
            self._entries[(entry.tenant_id, entry.consumer)] = entry
            self._per_tenant[entry.tenant_id] += 1

    def __len__(self) -> int:
        return len(self._entries)

    def stored(self, tenant_id: str, consumer: str) -> ConsumerPosition | None:
        """The last entry appended (written or not): what a new tracking must be above."""
        return self._entries.get((tenant_id, consumer))

    def visible(self, tenant_id: str, consumer: str, visible_lsn: int) -> ConsumerPosition | None:
        """The last entry with lsn <= ``visible_lsn``; None when there is none."""
        key = (tenant_id, consumer)
        entry = self._entries.get(key)
        if entry is None or entry.lsn <= visible_lsn:
            return entry
        for lsn, k, previous in reversed(self._undo):
            if k == key and lsn == entry.lsn:
                entry = previous
                if entry is None or entry.lsn <= visible_lsn:
                    return entry
        return None  # not reached: every unwritten entry has an undo record

    def apply(self, entry: ConsumerPosition, written_lsn: int | None) -> None:
        """Take a tracking record (lsn order). ``written_lsn``: what the WAL has written, for
        the undo log; None when replaying a written log (recovery)."""
        key = (entry.tenant_id, entry.consumer)
        previous = self._entries.get(key)
        if previous is not None and previous.lsn >= entry.lsn:
            return  # seen already (a replay over a manifest that covers it)
        self._entries[key] = entry
        if previous is None:
            self._per_tenant[entry.tenant_id] += 1
        if written_lsn is None:
            return
        undo = self._undo
        while undo and undo[0][0] <= written_lsn:
            undo.popleft()
        if entry.lsn > written_lsn:
            undo.append((entry.lsn, key, previous))

    def check(
        self, tracking: TrackingIn, entries_max: int, per_tenant_max: int
    ) -> ConsumerPosition | None:
        """None when ``tracking`` is above the consumer's stored position (or the consumer is
        new); the stored entry when it equals it (only an exact repeat of the batch that stored
        it may pass: see ``repeated_batch``); TrackingConflict when it is below; LimitExceeded
        for a new consumer past ``entries_max`` (or ``per_tenant_max`` of its tenant). Under
        the store lock."""
        stored = self.stored(tracking.tenant_id, tracking.consumer)
        if stored is None:
            if self._per_tenant[tracking.tenant_id] >= per_tenant_max:
                raise LimitExceeded(
                    f"tenant {tracking.tenant_id!r} has {self._per_tenant[tracking.tenant_id]} "
                    "tracked consumers, the most a tenant may have",
                    limit=per_tenant_max,
                )
            if len(self._entries) >= entries_max:
                raise LimitExceeded(
                    f"{len(self._entries)} consumers are tracked, the most this node keeps",
                    limit=entries_max,
                )
            return None
        if tracking.position < stored.position:
            raise tracking_conflict(tracking, stored)
        return stored if tracking.position == stored.position else None

    def forget_after(self, lsn: int) -> None:
        """A WAL group rolled back past ``lsn``: entries after it return to what they were."""
        undo = self._undo
        while undo and undo[-1][0] > lsn:
            _, key, previous = undo.pop()
            if previous is None:
                if self._entries.pop(key, None) is not None:
                    self._per_tenant[key[0]] -= 1
            else:
                self._entries[key] = previous

    def entries(self) -> list[ConsumerPosition]:
        """Every entry, ordered (for the checkpoint manifest)."""
        return [self._entries[k] for k in sorted(self._entries)]


def table_at(
    base: Sequence[ConsumerPosition], records: Iterable[tuple[int, bytes]], lsn: int
) -> list[ConsumerPosition]:
    """The consumer table as of ``lsn``: ``base`` (a checkpoint's table) with the tracking
    records among ``records`` ((lsn, body) of the WAL after that checkpoint, in lsn order)
    applied up to ``lsn``. A physical follower checkpointing exactly a refused part's range
    needs it when consumers tracked after that range (the live table is past it)."""
    table = ConsumerTable(list(base))
    for rec_lsn, raw in records:
        if rec_lsn > lsn:
            break
        body = decode_body(raw)
        if body.event_type == TRACKING_TYPE:
            position = decode_tracking_payload(body.payload)
            table.apply(ConsumerPosition(body.tenant_id, body.entity_id, position, rec_lsn), None)
    return table.entries()


def tracking_conflict(tracking: TrackingIn, stored: ConsumerPosition) -> TrackingConflict:
    """The 409 for a tracking not above ``stored``: nothing of its batch is stored."""
    return TrackingConflict(
        f"consumer {tracking.consumer!r} of tenant {tracking.tenant_id!r} is at "
        f"position {stored.position}; a tracked position must be above it: nothing "
        "of the batch was stored",
        consumer=tracking.consumer,
        tenant_id=tracking.tenant_id,
        position=tracking.position,
        stored_position=stored.position,
        stored_lsn=stored.lsn,
    )


def repeated_batch(
    prepared: Sequence[tuple[bytes, str, str, str, bytes, bytes | None, bool]],
    stored: ConsumerPosition,
    find: Callable[[bytes], StoredEvent | None],
) -> list[StoredEvent] | None:
    """The stored events of a batch whose tracking equals ``stored``, when the batch is an
    exact repeat of one already stored (a client retrying after a lost answer, with the same
    ids); None otherwise.

    A repeat gives every event an id already stored with the same content, at or before the
    tracking record: the original batch's new events went in its append just before the
    record, the ones it repeated were older still. An event without an id, or with one not
    stored, is new work under an old position (another worker took the same notification):
    a conflict, not a retry. ``prepared``: the events as ``events.prepare`` returns them;
    ``find``: the stored event with an id (under the store lock)."""
    found: list[StoredEvent] = []
    for event_id, tenant, entity, etype, payload, meta, binary in prepared:
        existing = find(event_id) if event_id else None
        if (
            existing is None
            or existing.lsn > stored.lsn
            or not same_content(existing, tenant, entity, etype, payload, meta, binary)
        ):
            return None
        found.append(existing)
    return found


def tracking_body(tracking: TrackingIn, timestamp_us: int) -> bytes:
    """The WAL body of a tracking record: a system record in the consumer's tenant, its
    entity id the consumer, no tenant position."""
    return encode_body_fields(
        new_event_ids(1)[0],
        tracking.tenant_id,
        tracking.consumer,
        TRACKING_TYPE,
        timestamp_us,
        0,
        encode_tracking_payload(tracking.position),
        None,
    )
