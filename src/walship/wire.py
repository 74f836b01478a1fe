"""The HTTP API's answers, defined once: the server encodes these, the client decodes them.

Each shape here is what a route sends (field order is the JSON's key order, so these classes
*are* the byte format: ``tests/test_wire.py`` pins it). The server builds them directly; the
client (``client.py``) decodes into frozen subclasses that inherit every field and only
re-declare the few whose value reads differently on its side: an event's ``payload`` and
``metadata`` are the stored JSON text (``msgspec.Raw``) on the way out and decoded values on
the way in (a base64 ``bytes`` payload becomes ``bytes`` again), a page's events are the
client's ``Event``, a ``position`` missing from an older server reads as 0, a batch's
``tracking`` stays the plain dict it always was. A field added here reaches both sides at once.

The server's values are mutable where they always were (the node fills in a receipt's
durability once the acknowledgement mode is met); the client's subclasses are all frozen.

The class names and docstrings of ``Receipt``, ``TrackingReceipt``, ``BatchReceipts``,
``EventOut``, ``QueryPage`` and ``EntityState`` are also the OpenAPI document's schema
components (their titles and descriptions): renaming one changes the published schema.

Nothing here imports the rest of walship: the store, the node, the HTTP routes and the client
all sit above it.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "BatchReceipts",
    "ConsumerAnswer",
    "EntityEvents",
    "EntityState",
    "EntityVersion",
    "EventOut",
    "QueryPage",
    "Receipt",
    "TenantPosition",
    "TrackingReceipt",
]


# ---------------------------------------------------------------------- writes


class Receipt(msgspec.Struct):
    """The answer to a write: where it is in the log and how durable it is."""

    event_id: str
    lsn: int
    term: int
    version: int
    timestamp: str
    durability: str = "local"
    required: int = 0
    acked_by: list[str] = msgspec.field(default_factory=list)
    duplicate: bool = False
    position: int = 0  # the event's position in its tenant (0: written before positions)


class TrackingReceipt(msgspec.Struct):
    """The answer for a batch's tracking: the consumer's new position and its record's lsn."""

    consumer: str
    tenant_id: str
    position: int
    lsn: int
    term: int
    durability: str = "local"
    required: int = 0
    acked_by: list[str] = msgspec.field(default_factory=list)
    duplicate: bool = False  # a repeat of the batch that stored it: nothing stored again


class BatchReceipts(msgspec.Struct, omit_defaults=True):
    """The answer to a batch append: one receipt per event, in input order (and the receipt
    of its tracking, when it had one)."""

    receipts: list[Receipt]
    count: int
    first_lsn: int
    last_lsn: int
    tracking: TrackingReceipt | None = None


# ---------------------------------------------------------------------- reads


class EventOut(msgspec.Struct, omit_defaults=True):
    """An event as the API returns it: every model field plus ``lsn`` and ``term``.

    A binary payload is its base64 text with ``payload_encoding: "base64"`` (the field is left
    out for JSON payloads)."""

    id: str
    tenant_id: str
    entity_id: str
    event_type: str
    payload: msgspec.Raw
    metadata: msgspec.Raw | None
    timestamp: str
    version: int
    lsn: int
    term: int
    position: int
    payload_encoding: str | None = None


class QueryPage(msgspec.Struct):
    """One page of a query, in lsn order; pass ``next_cursor`` back as ``cursor`` for more."""

    events: list[EventOut]
    next_cursor: str | None
    count: int


class EntityEvents(msgspec.Struct):
    """A page of one entity's events by version; ``next_version`` continues in its direction."""

    tenant_id: str
    entity_id: str
    version: int  # the entity's current version on this node
    direction: str
    events: list[EventOut]
    count: int
    next_version: int | None


class EntityVersion(msgspec.Struct):
    tenant_id: str
    entity_id: str
    version: int  # 0: no event of this entity is visible here


class EntityState(msgspec.Struct, frozen=True, omit_defaults=True):
    """An entity's payloads merged in lsn order (``state_encoding`` only when it is bytes)."""

    tenant_id: str
    entity_id: str
    version: int
    state: Any
    last_lsn: int
    updated: str | None
    events: int
    # "base64" when the last event's payload was bytes: ``state`` is those bytes (a binary
    # payload replaces the state, as any non-object does), base64 text in a JSON answer
    state_encoding: str | None = None


# ---------------------------------------------------------------------- positions


class TenantPosition(msgspec.Struct):
    tenant_id: str
    position: int  # of the tenant's last event visible on this node; 0: none
    lsn: int  # that event's lsn (0: none)


class ConsumerAnswer(msgspec.Struct):
    consumer: str
    tenant_id: str
    position: int  # the last position the consumer tracked (visible on this node)
    lsn: int  # the lsn of the append that tracked it
