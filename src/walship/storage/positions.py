"""Tenant positions: the last one each tenant was given, and where a position is in the log.

Every event gets, besides its node-wide lsn, a gapless position within its tenant (1, 2, 3
...), assigned by the leader under the store lock and stored in the record; followers and
recovery only observe them (never recompute). Within a tenant, positions grow with lsn, so
a position maps to an lsn by bisection: this index keeps a sparse anchor ``(position, lsn)``
every ``stride`` positions per tenant (16 bytes per ``stride`` events), which turns a range
of positions into an lsn window that holds at most ``stride`` events of the tenant beyond the
range. The exact bound is then a ``tenant_position`` predicate in the query filter.
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass, field


@dataclass
class _Tenant:
    last_position: int = 0
    last_lsn: int = 0  # 0: not known here (after a rollback; the store looks it up)
    anchor_positions: array[int] = field(default_factory=lambda: array("q"))
    anchor_lsns: array[int] = field(default_factory=lambda: array("q"))


class TenantPositions:
    """Per tenant: the last position and a sparse position→lsn index. Not thread-safe: the
    store locks around it."""

    def __init__(self, stride: int) -> None:
        self.stride = stride
        self._tenants: dict[str, _Tenant] = {}

    def __len__(self) -> int:
        return len(self._tenants)

    def last(self, tenant_id: str) -> tuple[int, int]:
        """``(position, lsn)`` of the tenant's last event seen here; ``(0, 0)`` for none."""
        t = self._tenants.get(tenant_id)
        return (0, 0) if t is None else (t.last_position, t.last_lsn)

    def next_position(self, tenant_id: str) -> int:
        t = self._tenants.get(tenant_id)
        return 1 if t is None else t.last_position + 1

    def observe(self, tenant_id: str, position: int, lsn: int) -> None:
        """An event at ``position`` of the tenant was appended at ``lsn`` (lsn order).

        Position 0 (an event written before positions existed) is not indexed; a position not
        above the last one seen moves nothing (the caller checks gaplessness where it assigns).
        """
        if position <= 0:
            return
        t = self._tenants.get(tenant_id)
        if t is None:
            t = self._tenants[tenant_id] = _Tenant()
        if position <= t.last_position:
            return
        t.last_position, t.last_lsn = position, lsn
        if (position - 1) % self.stride == 0:
            t.anchor_positions.append(position)
            t.anchor_lsns.append(lsn)

    def observe_anchor(self, tenant_id: str, position: int, lsn: int) -> None:
        """An anchor read back from a Parquet part (recovery), in position order."""
        t = self._tenants.get(tenant_id)
        if t is None:
            t = self._tenants[tenant_id] = _Tenant()
        if not t.anchor_positions or position > t.anchor_positions[-1]:
            t.anchor_positions.append(position)
            t.anchor_lsns.append(lsn)

    def observe_last(self, tenant_id: str, position: int, lsn: int) -> None:
        """The highest position a Parquet part holds for the tenant (recovery)."""
        t = self._tenants.get(tenant_id)
        if t is None:
            t = self._tenants[tenant_id] = _Tenant()
        if position > t.last_position:
            t.last_position, t.last_lsn = position, lsn

    def forget_after(self, lsn: int, lowest_removed: dict[str, int]) -> None:
        """A WAL group rolled back past ``lsn``: ``lowest_removed`` is each tenant's lowest
        position among the events removed; they will be assigned again."""
        for tenant_id, position in lowest_removed.items():
            t = self._tenants.get(tenant_id)
            if t is None:
                continue
            cut = bisect.bisect_right(t.anchor_lsns, lsn)
            del t.anchor_positions[cut:]
            del t.anchor_lsns[cut:]
            t.last_position = position - 1
            t.last_lsn = 0  # unknown without a read; rare (a full disk)

    def lsn_window(
        self, tenant_id: str, from_position: int, to_position: int | None
    ) -> tuple[int, int | None]:
        """An lsn range ``(lo, hi)`` (inclusive, hi None: open) holding every event of the
        tenant with ``from_position <= position <= to_position``."""
        t = self._tenants.get(tenant_id)
        if t is None:
            return 1, None
        positions = t.anchor_positions
        lo = 1
        i = bisect.bisect_right(positions, from_position) - 1
        if i >= 0:
            lo = t.anchor_lsns[i]
        hi: int | None = None
        if to_position is not None:
            j = bisect.bisect_right(positions, to_position)
            if j < len(positions):
                hi = t.anchor_lsns[j] - 1
        return lo, hi
