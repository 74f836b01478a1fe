"""What the ``eventsourcing`` recorders need from walship, as one narrow interface.

Two implementations: ``EmbeddedBackend`` (a ``Store`` opened in this process) and
``HttpBackend`` (nodes over HTTP through ``walship.Client``). The recorders speak only this
interface, so the library's own test cases run unchanged against both.

Everything here is in walship's terms: entity ids, walship versions (1, 2, 3 … per entity),
event types, tenant positions (1, 2, 3 … per tenant) and consumers. The mapping to
``eventsourcing``'s originator versions, topics and notification ids is the recorders' job.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

# The metadata key holding an event's originator version when it differs from its walship
# version (an aggregate whose first version is 0, or snapshots taken at versions with gaps).
ORIGINATOR_VERSION_KEY = "originator_version"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event to append."""

    entity_id: str
    event_type: str
    payload: bytes
    originator_version: int | None  # None: equal to the walship version it gets
    expected_version: int | None  # the entity's walship version before it (None: unchecked)


@dataclass(frozen=True, slots=True)
class Row:
    """One stored event as the recorders read it."""

    entity_id: str
    version: int  # walship's version of the entity after this event
    originator_version: int
    event_type: str
    payload: bytes
    position: int  # the event's position in its tenant
    lsn: int


@dataclass(frozen=True, slots=True)
class Appended:
    """What an append stored: each event's ``(walship version, tenant position)`` in order,
    and whether its tracking repeated the consumer's stored position (the batch that stored
    it sent again: nothing was stored again)."""

    placed: list[tuple[int, int]]
    tracking_repeated: bool = False


class RowStream(Protocol):
    """A tenant's events, history then live, as one open stream: iterate it from one thread;
    ``close`` (from any thread) ends the iteration at once."""

    def __iter__(self) -> Iterator[Row]: ...
    def close(self) -> None: ...


class Backend(Protocol):
    """The operations the recorders use; every one may raise a ``WalshipError``."""

    def append(
        self, tenant_id: str, events: Sequence[NewEvent], tracking: tuple[str, int] | None
    ) -> Appended:
        """Append ``events`` (and the consumer position ``tracking``) in one atomic append.
        VersionConflict or a ``tracking_conflict`` Conflict when refused (then nothing is
        stored)."""
        ...

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
        """At most ``limit`` of the entity's events with walship versions in the range."""
        ...

    def by_position(
        self,
        tenant_id: str,
        from_position: int,
        to_position: int | None,
        limit: int,
        event_type: str | None,
    ) -> list[Row]:
        """At most ``limit`` of the tenant's events from ``from_position`` on, in order."""
        ...

    def tenant_position(self, tenant_id: str) -> int:
        """The tenant's last position (0: no event)."""
        ...

    def consumer_position(self, tenant_id: str, consumer: str) -> int | None:
        """The consumer's tracked position in the tenant (None: never tracked)."""
        ...

    def follow(
        self, tenant_id: str, after_position: int, event_type: str | None
    ) -> RowStream | None:
        """The tenant's events after ``after_position`` (of ``event_type`` only, when given)
        as the node pushes them; None when this backend has no such stream, and subscriptions
        read pages, waiting with ``wait_for_more`` between them."""
        ...

    def wait_for_more(
        self, tenant_id: str, after_position: int, timeout_s: float, wake: threading.Event
    ) -> None:
        """Return when the tenant may have passed ``after_position``, when ``wake`` is set, or
        after about ``timeout_s`` (whichever first); a caller re-reads in any case."""
        ...

    def notify(self) -> None:
        """This process appended: wake the waits of ``wait_for_more`` at once."""
        ...

    def close(self) -> None: ...
