"""The recorders' backend over HTTP (``WALSHIP_URLS``), through ``walship.Client``.

The client finds the leader, follows it through a failover and sends a write again with the
same event ids (a write stored before the failure is answered as a duplicate, never stored
twice), so the recorders inherit that. Payloads travel as base64 with
``payload_encoding: "base64"`` and come back the same bytes. Subscriptions are one event
stream each (``GET /api/v1/events/stream`` from a tenant position, ``Client.subscribe``): the
node pushes each new event of the tenant, and the stream resumes after the last one
delivered through a dropped connection or a failover.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import orjson

from walship.client import Client, Event
from walship.errors import NotFound
from walship.eventsourcing.backend import ORIGINATOR_VERSION_KEY, Appended, NewEvent, Row
from walship.subscriber import Subscription

# The most events one request asks for (the server's ``query_limit_max`` is 10,000).
_PAGE_EVENTS_MAX = 1_000


def row_of(event: Event) -> Row:
    """An event as the recorders read it (a JSON payload is its JSON text)."""
    payload = event.payload if isinstance(event.payload, bytes) else orjson.dumps(event.payload)
    originator_version = event.version
    if event.metadata is not None:
        originator_version = int(event.metadata.get(ORIGINATOR_VERSION_KEY, event.version))
    return Row(
        event.entity_id,
        event.version,
        originator_version,
        event.event_type,
        payload,
        event.position,
        event.lsn,
    )


def _event_json(tenant_id: str, ev: NewEvent) -> dict[str, Any]:
    out: dict[str, Any] = {
        # a fresh id per call: the client sends the same id again through a failover
        "id": str(uuid.uuid4()),
        "tenant_id": tenant_id,
        "entity_id": ev.entity_id,
        "event_type": ev.event_type,
        "payload": ev.payload,  # bytes: a binary payload
    }
    if ev.originator_version is not None:
        out["metadata"] = {ORIGINATOR_VERSION_KEY: ev.originator_version}
    if ev.expected_version is not None:
        out["expected_version"] = ev.expected_version
    return out


class _EventRows:
    """A subscription's events as the recorders read them; ``close`` ends it from any
    thread."""

    def __init__(self, events: Subscription[Event]) -> None:
        self._events = events

    def __iter__(self) -> Iterator[Row]:
        return (row_of(event) for event in self._events)

    def close(self) -> None:
        self._events.close()


class HttpBackend:
    """``Backend`` over one or more walship nodes; ``client`` does the work (it retries
    through a failover, and its subscriptions resume after one)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def append(
        self, tenant_id: str, events: Sequence[NewEvent], tracking: tuple[str, int] | None
    ) -> Appended:
        track = None
        if tracking is not None:
            track = {"consumer": tracking[0], "position": tracking[1], "tenant_id": tenant_id}
        answer = self.client.append_batch(
            [_event_json(tenant_id, ev) for ev in events], tracking=track
        )
        repeated = bool(answer.tracking and answer.tracking.get("duplicate"))
        return Appended([(r.version, r.position) for r in answer.receipts], repeated)

    def entity_events(
        self,
        tenant_id: str,
        entity_id: str,
        from_version: int,
        to_version: int | None,
        *,
        backward: bool,
        limit: int,
    ) -> list[Row]:
        page = self.client.entity_events(
            entity_id,
            tenant_id=tenant_id,
            from_version=from_version,
            to_version=to_version,
            direction="backward" if backward else "forward",
            limit=min(limit, _PAGE_EVENTS_MAX),
        )
        return [row_of(ev) for ev in page.events]

    def by_position(
        self,
        tenant_id: str,
        from_position: int,
        to_position: int | None,
        limit: int,
        event_type: str | None,
    ) -> list[Row]:
        out: list[Row] = []
        filters: dict[str, Any] = {"tenant_id": tenant_id}
        if to_position is not None:
            filters["to_position"] = to_position
        if event_type is not None:
            filters["event_type"] = event_type
        while len(out) < limit:
            page = self.client.query(
                from_position=from_position,
                limit=min(limit - len(out), _PAGE_EVENTS_MAX),
                **filters,
            )
            rows = [row_of(ev) for ev in page.events]
            out.extend(rows)
            if page.next_cursor is None or not rows:
                break
            from_position = rows[-1].position + 1
        return out

    def tenant_position(self, tenant_id: str) -> int:
        return self.client.tenant_position(tenant_id).position

    def consumer_position(self, tenant_id: str, consumer: str) -> int | None:
        try:
            return self.client.consumer_position(consumer, tenant_id=tenant_id).position
        except NotFound:
            return None

    def follow(self, tenant_id: str, after_position: int, event_type: str | None) -> _EventRows:
        filters: dict[str, Any] = {"tenant_id": tenant_id, "from_position": after_position + 1}
        if event_type is not None:
            filters["event_type"] = event_type
        return _EventRows(self.client.subscribe(**filters))

    def wait_for_more(
        self, tenant_id: str, after_position: int, timeout_s: float, wake: threading.Event
    ) -> None:
        """Not asked by subscriptions, which ``follow`` the node's stream: waits on ``wake``."""
        wake.wait(timeout_s)

    def notify(self) -> None:
        """Nothing to do: the node pushes every writer's events to each stream."""

    def close(self) -> None:
        self.client.close()
