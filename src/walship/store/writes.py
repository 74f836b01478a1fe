"""The write path: appends validated, checked against stored ids and entity versions, and
handed to the WAL in one call.

Appends are validated outside any lock, then, under the store lock, checked against stored
ids (idempotency) and entity versions (``expected_version``), given their versions and tenant
positions and handed to the WAL in one call, which assigns their lsns. Events go into the
active memtable at once but are only visible to readers once the WAL has written them. While
the memtables hold twice their budget (checkpoints are behind), appends wait.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from walship.errors import (
    IdConflict,
    InvalidInput,
    LimitExceeded,
    Unavailable,
    VersionConflict,
    invariant,
)
from walship.events import (
    SYSTEM_PREFIX,
    EventIn,
    StoredEvent,
    TrackingIn,
    encode_body_fields,
    encode_body_tuple,
    format_timestamp,
    format_uuid,
    new_event_ids,
    now_us,
    same_content,
    validate_event_type,
    validate_tracking,
)
from walship.intake import prepare_batch
from walship.position import Lsn
from walship.storage.consumers import (
    ConsumerPosition,
    repeated_batch,
    tracking_body,
    tracking_conflict,
)
from walship.storage.memtable import size_of as memtable_size
from walship.storage.query import entity_key
from walship.store.core import StoreCore, receipt_of
from walship.wal.log import WriteOutcome
from walship.wire import Receipt, TrackingReceipt


@dataclass
class PendingAppend:
    """Receipts of an append whose records are queued in the WAL; ``done`` resolves on write."""

    receipts: list[Receipt]
    done: Future[WriteOutcome] | None
    last_lsn: int
    waits_on: list[Future[WriteOutcome]] = field(default_factory=list)

    synced_lsn: int = 0
    tracking: TrackingReceipt | None = None  # the batch's tracking record, when it had one

    def finish(self, outcome: WriteOutcome | None) -> list[Receipt]:
        """Receipts with durability set from the WAL outcome (``local`` only when fsynced)."""
        synced = outcome.synced if outcome is not None else self.synced_lsn >= self.max_lsn
        if not synced:
            for r in self.answers:
                r.durability = "buffered"
        return self.receipts

    @property
    def answers(self) -> list[Receipt | TrackingReceipt]:
        """Every receipt of the append, its tracking's included."""
        out: list[Receipt | TrackingReceipt] = list(self.receipts)
        if self.tracking is not None:
            out.append(self.tracking)
        return out

    @property
    def max_lsn(self) -> int:
        return max((r.lsn for r in self.answers), default=0)

    @property
    def min_lsn(self) -> int:
        return min((r.lsn for r in self.answers), default=0)


class WritePath:
    """The store's write entrance: ``submit`` queues, ``append``/``append_batch`` wait."""

    def __init__(self, core: StoreCore) -> None:
        self.core = core

    def append(self, event: EventIn) -> Receipt:
        """Append one event and wait until it is as durable as the fsync policy makes it."""
        return self.append_batch([event])[0]

    def append_batch(
        self, events: Sequence[EventIn], *, tracking: TrackingIn | None = None
    ) -> list[Receipt]:
        """Append events all-or-nothing and wait for durability; receipts in input order.

        ``tracking``: a consumer's position stored in the same append (see ``submit``)."""
        pending = self.submit(events, tracking=tracking)
        outcome = None
        for fut in pending.waits_on:
            outcome = fut.result()
        if pending.done is not None:
            outcome = pending.done.result()
        return pending.finish(outcome)

    def submit(
        self,
        events: Sequence[EventIn],
        *,
        json_checked: bool = False,
        tracking: TrackingIn | None = None,
    ) -> PendingAppend:
        """Validate and queue events without waiting for the disk.

        All-or-nothing: a validation error or a version conflict anywhere queues nothing.
        Events whose id is already stored are answered with their original receipt.
        ``json_checked``: the events were decoded from JSON, so their payload and metadata
        need no second parse (the HTTP routes); a caller's own ``Raw`` is parsed.
        ``tracking``: a consumer's position, stored in the same WAL append (``events`` may
        then be empty); TrackingConflict, and nothing queued, unless it is above the stored one
        or the batch repeats the one that stored it (answered as a duplicate, ``_repeat_locked``).
        """
        limits = self.core.limits
        if tracking is not None:
            validate_tracking(tracking, limits)
        elif not events:
            raise InvalidInput("a batch needs at least one event (or a tracking)")
        if len(events) > limits.batch_events_max:
            raise LimitExceeded(
                f"batch of {len(events)} events exceeds the limit of {limits.batch_events_max}",
                limit=limits.batch_events_max,
            )
        prepared = prepare_batch(events, limits, json_checked=json_checked)
        self.core.check_owner()  # before any lock: one a lost thread held at the fork never frees
        self.core.metrics.append_requests.inc()
        with self.core.lock:
            self.core.check_writable()
            self.throttle_locked()
            if tracking is not None:
                # before anything queues; a tracking equal to the stored one passes only as
                # an exact repeat of its batch (a retry after a lost answer): a duplicate
                repeat_of = self.core.consumers.check(
                    tracking, limits.consumers_max, limits.consumers_per_tenant_max
                )
                if repeat_of is not None:
                    return self._repeat_locked(tracking, prepared, repeat_of)
            ts = now_us()
            timestamp = format_timestamp(ts)
            # the store lock serializes every append, so the WAL will assign exactly these
            next_lsn = self.core.wal.last_position.lsn.value + 1
            term = self.core.wal.terms.current.value
            receipts: list[Receipt] = []
            bodies: list[bytes] = []
            # the new events' columns for the memtable (``MEM_SCHEMA``; term and time are
            # the same for all): no object per event
            c_lsn: list[int] = []
            c_id: list[bytes] = []
            c_tenant: list[str] = []
            c_entity: list[str] = []
            c_type: list[str] = []
            c_version: list[int] = []
            c_payload: list[bytes] = []
            c_meta: list[bytes | None] = []
            c_pos: list[int] = []
            c_bin: list[bool] = []
            batch_versions: dict[str, int] = {}
            batch_positions: dict[str, int] = {}  # tenant -> the next position it gets
            batch_ids: dict[bytes, tuple[int, int]] = {}  # id -> its receipt, its new event
            waits_on: list[Future[WriteOutcome]] = []
            generated = new_event_ids(len(events))
            for n, ((given_id, tenant, entity, etype, payload, meta, binary), ev) in enumerate(
                zip(prepared, events, strict=True)
            ):
                event_id = given_id or generated[n]
                if ev.id is not None:
                    if event_id in batch_ids:
                        first, at = batch_ids[event_id]
                        earlier = StoredEvent(
                            c_lsn[at],
                            term,
                            c_id[at],
                            c_tenant[at],
                            c_entity[at],
                            c_type[at],
                            ts,
                            c_version[at],
                            c_payload[at],
                            c_meta[at],
                            c_pos[at],
                            c_bin[at],
                        )
                        if not same_content(earlier, tenant, entity, etype, payload, meta, binary):
                            raise IdConflict(
                                f"event id {format_uuid(event_id)} appears twice in the batch "
                                f"(at {first} and {n}) with different contents",
                                event_id=format_uuid(event_id),
                                index=n,
                                first_index=first,
                            )
                        receipts.append(receipts[first])
                        continue
                    existing = self.core.find_id_locked(event_id)
                    if existing is not None:
                        if not same_content(existing, tenant, entity, etype, payload, meta, binary):
                            raise IdConflict(
                                f"event id {format_uuid(event_id)} is already stored at lsn "
                                f"{existing.lsn} as {existing.event_type!r} of entity "
                                f"{existing.entity_id!r} with other contents: a new event "
                                "needs a new id",
                                event_id=format_uuid(event_id),
                                stored={
                                    "lsn": existing.lsn,
                                    "term": existing.term,
                                    "tenant_id": existing.tenant_id,
                                    "entity_id": existing.entity_id,
                                    "event_type": existing.event_type,
                                    "version": existing.version,
                                    "timestamp": format_timestamp(existing.timestamp_us),
                                },
                                **({"index": n} if len(events) > 1 else {}),
                            )
                        self.core.metrics.duplicates.inc()
                        receipts.append(receipt_of(existing, duplicate=True))
                        if existing.lsn > self.core.wal.written_lsn.value:
                            waits_on.append(self.core.wal.append_future())
                        continue
                    batch_ids[event_id] = (len(receipts), len(c_lsn))
                key = entity_key(tenant, entity)
                current = batch_versions.get(key)
                if current is None:
                    current = self.core.versions.get(key, 0)
                if ev.expected_version is not None and ev.expected_version != current:
                    self.core.metrics.conflicts.inc()
                    raise VersionConflict(
                        f"entity {entity!r} is at version {current}, "
                        f"expected {ev.expected_version}",
                        entity_id=entity,
                        tenant_id=tenant,
                        expected_version=ev.expected_version,
                        current_version=current,
                    )
                version = current + 1
                batch_versions[key] = version
                # under the store lock like lsns: a batch's positions are consecutive per
                # tenant, and a refused batch (raised above or below) takes none
                position = batch_positions.get(tenant) or self.core.positions.next_position(tenant)
                batch_positions[tenant] = position + 1
                lsn = next_lsn + len(c_lsn)
                c_lsn.append(lsn)
                c_id.append(event_id)
                c_tenant.append(tenant)
                c_entity.append(entity)
                c_type.append(etype)
                c_version.append(version)
                c_payload.append(payload)
                c_meta.append(meta)
                c_pos.append(position)
                c_bin.append(binary)
                fields = (event_id, tenant, entity, etype, ts, version, payload, meta, position)
                bodies.append(
                    encode_body_tuple(fields)
                    if position and not binary
                    else encode_body_fields(*fields, payload_binary=binary)
                )
                receipts.append(
                    Receipt(format_uuid(event_id), lsn, term, version, timestamp, position=position)
                )
            track: ConsumerPosition | None = None
            if tracking is not None:
                # last in the append: it commits with (never before) the events it follows
                track = ConsumerPosition(
                    tracking.tenant_id,
                    tracking.consumer,
                    tracking.position,
                    next_lsn + len(c_lsn),
                )
                bodies.append(tracking_body(tracking, ts))
            if not bodies:
                return PendingAppend(
                    receipts, None, 0, waits_on, synced_lsn=self.core.wal.synced_lsn.value
                )
            size = sum(map(len, bodies))
            if size > limits.append_bytes_max:
                # every follower holds an append in memory until its last record arrives
                raise LimitExceeded(
                    f"the batch's records take {size} bytes, over the limit of "
                    f"{limits.append_bytes_max} for one atomic append",
                    limit=limits.append_bytes_max,
                )
            result = self.core.wal.append(bodies)
            invariant(
                result.first_lsn.value == next_lsn and result.term.value == term,
                f"WAL assigned lsn {result.first_lsn.value}, the store expected {next_lsn}",
            )
            n = len(c_lsn)
            cols: list[list[Any]] = [
                c_lsn,
                [term] * n,
                c_id,
                c_tenant,
                c_entity,
                c_type,
                [ts] * n,
                c_version,
                c_payload,
                c_meta,
                c_pos,
                c_bin,
            ]
            self.core.active.extend(cols, memtable_size(cols))
            self.core.versions.update(batch_versions)
            observe = self.core.positions.observe
            for tenant_id, position, lsn in zip(c_tenant, c_pos, c_lsn, strict=True):
                observe(tenant_id, position, lsn)
            if track is not None:
                self.core.consumers.apply(track, self.core.wal.written_lsn.value)
            self.core.metrics.appends.inc(len(bodies))
            self.core.metrics.last_lsn.set(result.last_lsn.value)
        pending = PendingAppend(receipts, result.done, result.last_lsn.value, waits_on)
        if track is not None:
            pending.tracking = TrackingReceipt(
                track.consumer, track.tenant_id, track.position, track.lsn, term
            )
        return pending

    def _repeat_locked(
        self,
        tracking: TrackingIn,
        prepared: list[tuple[bytes, str, str, str, bytes, bytes | None, bool]],
        stored: ConsumerPosition,
    ) -> PendingAppend:
        """The answer to a batch whose tracking equals the stored one: its original receipts
        and tracking receipt marked duplicate, nothing queued; TrackingConflict unless it is
        an exact repeat of the batch that stored it (``repeated_batch``)."""
        found = repeated_batch(prepared, stored, self.core.find_id_locked)
        if found is None:
            raise tracking_conflict(tracking, stored)
        self.core.metrics.duplicates.inc(len(found))
        receipts = [receipt_of(ev, duplicate=True) for ev in found]
        term = self.core.wal.terms.term_at(Lsn(stored.lsn)).value
        waits_on: list[Future[WriteOutcome]] = []
        if stored.lsn > self.core.wal.written_lsn.value:  # the original is still being written
            waits_on.append(self.core.wal.append_future())
        pending = PendingAppend(
            receipts, None, 0, waits_on, synced_lsn=self.core.wal.synced_lsn.value
        )
        pending.tracking = TrackingReceipt(
            stored.consumer, stored.tenant_id, stored.position, stored.lsn, term, duplicate=True
        )
        return pending

    def would_block(self) -> bool:
        """True when ``submit`` would wait for a checkpoint (memtables over twice their budget)
        or for WAL space; an event loop should then call it from a thread."""
        limits = self.core.limits
        return self.core.wal.backlogged() or (
            len(self.core.active) >= 2 * limits.memtable_events_max
            or self.core.active.bytes >= 2 * limits.memtable_bytes_max
        )

    def throttle_locked(self) -> None:
        """Wake the checkpointer when the active memtable is full; block appends while it holds
        twice its budget (checkpoints are behind), so memory stays bounded."""
        limits = self.core.limits
        if (
            len(self.core.active) >= limits.memtable_events_max
            or self.core.active.bytes >= limits.memtable_bytes_max
        ):
            self.core.kick.set()
        deadline = time.monotonic() + 30
        while self.core.checkpointing and (
            len(self.core.active) >= 2 * limits.memtable_events_max
            or self.core.active.bytes >= 2 * limits.memtable_bytes_max
        ):
            self.core.kick.set()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = self.core.alarm.state(time.monotonic())
                raise Unavailable(
                    "checkpointing is behind; try again"
                    if failure is None
                    else f"checkpoints are failing ({failure.error}); the memtable is full",
                    retry_after_ms=1000,
                )
            self.core.checkpoint_done.wait(min(remaining, 0.1))

    def append_system(self, event_type: str, payload: bytes) -> int:
        """Append a record of walship's own (``_system.*``, e.g. the first record of a new
        term) and wait for its write; returns its lsn. Readers never see it; followers store
        it like any record."""
        invariant(event_type.startswith(SYSTEM_PREFIX), f"{event_type} is not a system type")
        validate_event_type(event_type, self.core.limits, system=True)
        with self.core.lock:
            self.core.check_writable()
            body = encode_body_fields(
                new_event_ids(1)[0], "default", "_system", event_type, now_us(), 0, payload, None
            )
            result = self.core.wal.append([body])
            self.core.metrics.last_lsn.set(result.last_lsn.value)
        result.done.result()
        return result.last_lsn.value
