"""The filter a query applies, shared by the memtable and the Parquet parts."""

from __future__ import annotations

from dataclasses import dataclass

from walship.events import StoredEvent


def entity_key(tenant_id: str, entity_id: str) -> str:
    """One string per entity (tenant ids cannot contain NUL), cheap as a dict key."""
    return f"{tenant_id}\x00{entity_id}"


@dataclass(frozen=True, slots=True)
class QueryFilter:
    """Conjunction of optional predicates; lsn bounds are inclusive, times in µs since epoch."""

    tenant_id: str | None = None
    tenant_ids: frozenset[str] | None = None  # any of these (a key's tenants); None: any
    entity_id: str | None = None
    event_type: str | None = None
    event_type_prefix: str | None = None  # e.g. "order." for every order event type
    since_us: int | None = None
    until_us: int | None = None
    from_lsn: int = 1
    to_lsn: int | None = None
    # tenant positions, inclusive (with ``tenant_id``): the store narrows the lsn bounds to
    # the window its position index gives, these keep the exact range
    from_position: int | None = None
    to_position: int | None = None

    def matches(self, ev: StoredEvent) -> bool:
        return (
            ev.lsn >= self.from_lsn
            and (self.to_lsn is None or ev.lsn <= self.to_lsn)
            and (self.entity_id is None or ev.entity_id == self.entity_id)
            and (self.tenant_id is None or ev.tenant_id == self.tenant_id)
            and (self.tenant_ids is None or ev.tenant_id in self.tenant_ids)
            and (self.event_type is None or ev.event_type == self.event_type)
            and (self.event_type_prefix is None or ev.event_type.startswith(self.event_type_prefix))
            and (self.since_us is None or ev.timestamp_us >= self.since_us)
            and (self.until_us is None or ev.timestamp_us < self.until_us)
            and (self.from_position is None or ev.tenant_position >= self.from_position)
            and (self.to_position is None or ev.tenant_position <= self.to_position)
        )

    @property
    def by_position(self) -> bool:
        return self.from_position is not None or self.to_position is not None
