"""The recorders' backend over a ``Store`` opened in this process (``WALSHIP_DATA_DIR``).

A data dir can be open once per process (its lock), while ``eventsourcing`` makes one
infrastructure factory per application: the factories of one process share one ``Store`` per
data dir, opened by the first and closed with the last (``acquire_store``/``release``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import orjson

from walship.events import EventIn, StoredEvent, TrackingIn, base64_json
from walship.eventsourcing.backend import (
    ORIGINATOR_VERSION_KEY,
    Appended,
    NewEvent,
    Row,
    RowStream,
)
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

# An idle subscription looks at its tenant's position this often (in memory, cheap) for
# events appended by other writers of the store; this process's own appends wake it at once.
_POLL_INTERVAL_S = 0.02


@dataclass
class _Shared:
    store: Store
    users: int = 0
    waiting: set[threading.Event] = field(default_factory=set)


_shared: dict[Path, _Shared] = {}
_shared_lock = threading.Lock()


def acquire_store(data_dir: Path, fsync: str) -> _Shared:
    """The process's ``Store`` for ``data_dir``, opened on first use; pair with ``release``."""
    key = data_dir.resolve()
    with _shared_lock:
        found = _shared.get(key)
        if found is None:
            store = Store.open(StoreConfig(key, fsync=FsyncPolicy.parse(fsync)))
            found = _shared[key] = _Shared(store)
        found.users += 1
        return found


def release(shared: _Shared) -> None:
    """One user fewer; the last one closes the store."""
    with _shared_lock:
        shared.users -= 1
        if shared.users > 0:
            return
        for key, value in list(_shared.items()):
            if value is shared:
                del _shared[key]
    shared.store.close()


def row_of(ev: StoredEvent) -> Row:
    """A stored event as the recorders read it (a JSON payload is its JSON text)."""
    version = ev.version
    if ev.metadata is not None:
        meta = orjson.loads(ev.metadata)
        if isinstance(meta, dict):
            version = int(meta.get(ORIGINATOR_VERSION_KEY, version))
    return Row(
        ev.entity_id,
        ev.version,
        version,
        ev.event_type,
        ev.payload,
        ev.tenant_position,
        ev.lsn,
    )


def _metadata(ev: NewEvent) -> msgspec.Raw:
    if ev.originator_version is None:
        return msgspec.Raw(b"null")
    return msgspec.Raw(orjson.dumps({ORIGINATOR_VERSION_KEY: ev.originator_version}))


class EmbeddedBackend:
    """``Backend`` over this process's ``Store`` for a data dir."""

    def __init__(self, data_dir: Path, fsync: str = "always") -> None:
        self._shared = acquire_store(data_dir, fsync)
        self.store = self._shared.store
        self._closed = False

    def append(
        self, tenant_id: str, events: Sequence[NewEvent], tracking: tuple[str, int] | None
    ) -> Appended:
        batch = [
            EventIn(
                entity_id=ev.entity_id,
                event_type=ev.event_type,
                payload=msgspec.Raw(base64_json(ev.payload)),
                tenant_id=tenant_id,
                metadata=_metadata(ev),
                expected_version=ev.expected_version,
                payload_encoding="base64",
            )
            for ev in events
        ]
        track = None if tracking is None else TrackingIn(tracking[0], tracking[1], tenant_id)
        # ``append_batch`` without dropping the tracking's receipt: whether it repeated
        pending = self.store.submit(batch, tracking=track)
        outcome = None
        for fut in pending.waits_on:
            outcome = fut.result()
        if pending.done is not None:
            outcome = pending.done.result()
        receipts = pending.finish(outcome)
        self.notify()
        repeated = pending.tracking is not None and pending.tracking.duplicate
        return Appended([(r.version, r.position) for r in receipts], repeated)

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
        found, _ = self.store.entities.read(
            entity_id,
            tenant_id,
            from_version=from_version,
            to_version=to_version,
            backward=backward,
            limit=limit,
        )
        return [row_of(ev) for ev in found]

    def by_position(
        self,
        tenant_id: str,
        from_position: int,
        to_position: int | None,
        limit: int,
        event_type: str | None,
    ) -> list[Row]:
        flt = QueryFilter(
            tenant_id=tenant_id,
            event_type=event_type,
            from_position=from_position,
            to_position=to_position,
        )
        out: list[Row] = []
        cursor: str | None = None
        page_max = self.store.limits.query_limit_max
        while len(out) < limit:
            page = self.store.query(flt, min(limit - len(out), page_max), cursor)
            out.extend(row_of(ev) for ev in page.events)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        return out

    def tenant_position(self, tenant_id: str) -> int:
        return self.store.tenant_position(tenant_id)[0]

    def consumer_position(self, tenant_id: str, consumer: str) -> int | None:
        found = self.store.consumer_position(tenant_id, consumer)
        return None if found is None else found.position

    def follow(
        self, tenant_id: str, after_position: int, event_type: str | None
    ) -> RowStream | None:
        return None  # in this process: appends wake the page reads (``notify``)

    def wait_for_more(
        self, tenant_id: str, after_position: int, timeout_s: float, wake: threading.Event
    ) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = self._shared.waiting
        waiting.add(wake)
        try:
            while self.store.tenant_position(tenant_id)[0] <= after_position:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or wake.wait(min(remaining, _POLL_INTERVAL_S)):
                    return
        finally:
            waiting.discard(wake)

    def notify(self) -> None:
        for wake in list(self._shared.waiting):
            wake.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            release(self._shared)
