"""Consumers' tracked positions: the last position each (tenant, consumer) committed.

A batch may carry ``tracking: {consumer, position, tenant_id}``; the store writes it as a
``_system.tracking`` record in the same WAL append as the batch's events (so both are stored
or neither), after checking, under the store lock, that the position is above the one stored.
The record consumes no tenant position and no reader of events sees it.

The table lives in memory, rebuilt at recovery from the checkpoint manifest (which holds the
table as of its lsn: checkpoints, compactions, WAL retention cuts and snapshot installs keep it)
and from the tracking records of the WAL after it. Entries not yet written by the WAL keep
what they replaced in an undo log, so a read answers only what is visible, and a WAL group
rolled back (a full disk) puts the previous entries back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import msgspec

from walship.errors import LimitExceeded, TrackingConflict
from walship.events import StoredEvent, TrackingIn, encode_body_fields, new_event_ids

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
        for entry in entries or ():
            self._entries[(entry.tenant_id, entry.consumer)] = entry

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
        if written_lsn is None:
            return
        undo = self._undo
        while undo and undo[0][0] <= written_lsn:
            undo.popleft()
        if entry.lsn > written_lsn:
            undo.append((entry.lsn, key, previous))

    def check(self, tracking: TrackingIn, entries_max: int) -> None:
        """TrackingConflict unless ``tracking`` is above the consumer's stored position;
        LimitExceeded for a new consumer past ``entries_max``. Under the store lock."""
        stored = self.stored(tracking.tenant_id, tracking.consumer)
        if stored is None:
            if len(self._entries) >= entries_max:
                raise LimitExceeded(
                    f"{len(self._entries)} consumers are tracked, the most this node keeps",
                    limit=entries_max,
                )
            return
        if tracking.position <= stored.position:
            raise TrackingConflict(
                f"consumer {tracking.consumer!r} of tenant {tracking.tenant_id!r} is at "
                f"position {stored.position}; a tracked position must be above it: nothing "
                "of the batch was stored",
                consumer=tracking.consumer,
                tenant_id=tracking.tenant_id,
                position=tracking.position,
                stored_position=stored.position,
                stored_lsn=stored.lsn,
            )

    def forget_after(self, lsn: int) -> None:
        """A WAL group rolled back past ``lsn``: entries after it return to what they were."""
        undo = self._undo
        while undo and undo[-1][0] > lsn:
            _, key, previous = undo.pop()
            if previous is None:
                self._entries.pop(key, None)
            else:
                self._entries[key] = previous

    def entries(self) -> list[ConsumerPosition]:
        """Every entry, ordered (for the checkpoint manifest)."""
        return [self._entries[k] for k in sorted(self._entries)]


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


def is_retry_of(
    stored: ConsumerPosition | None, tracking: TrackingIn, found: Sequence[StoredEvent | None]
) -> bool:
    """Whether a tracked batch refused for its position is that very append sent again (a
    client retrying with the same ids after its answer was lost): every event is stored with
    its id and content (``found``), and the consumer is at this position by the tracking
    record of their append (written right after its events). A batch of no events cannot
    tell, and stays refused."""
    if stored is None or stored.position != tracking.position or not found:
        return False
    lsns = [ev.lsn for ev in found if ev is not None]
    return len(lsns) == len(found) and stored.lsn == max(lsns) + 1
