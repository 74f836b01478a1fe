"""``eventsourcing``'s recorders over a walship ``Backend``.

The mapping (one tenant per application, see the package docstring):

- ``originator_id`` is the entity id (a UUID in its canonical text), ``topic`` the event type
  (a topic walship's event types cannot spell is stored as ``-`` + its base64url), ``state``
  the binary payload, the same bytes back;
- an originator version is walship's entity version when they are equal (an aggregate whose
  versions start at 1), else it is kept in the event's metadata (``originator_version``);
- a notification id is the event's tenant position (1, 2, 3 … per tenant, gapless), and a
  tracking object is the consumer position stored in the same atomic append as the events.

Optimistic concurrency is walship's ``expected_version``: each originator's first event in a
batch names the entity's walship version it follows, which the recorder knows from its last
read or write of that entity (an LRU of them). When it does not know (or knew wrongly, because
another process wrote), the append is refused as a whole, the recorder reads the entity's last
event and tries again; a version that is then already taken is eventsourcing's
``IntegrityError``, as is a tracking position not above the stored one.
"""

from __future__ import annotations

import base64
import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    DatabaseError,
    DataError,
    IntegrityError,
    ListenNotifySubscription,
    Notification,
    OperationalError,
    ProcessRecorder,
    ShutDown,
    StoredEvent,
    Subscription,
    Tracking,
    TrackingRecorder,
)

from walship.errors import Conflict, InvalidInput, Unavailable, VersionConflict, WalshipError
from walship.events import validate_event_type
from walship.eventsourcing.backend import Appended, Backend, NewEvent, Row, RowStream
from walship.limits import DEFAULT_LIMITS

# Entities whose last (walship version, originator version) a recorder remembers, so that an
# append names its expected version without reading first.
VERSIONS_CACHED_MAX = 100_000
# Events one read asks the backend for at a time.
READ_PAGE_EVENTS = 1_000
# How often an append is tried again after a version conflict caused by a stale memory of
# the entity (each try reads the entity's last event first): then it is an IntegrityError.
CONFLICT_RETRIES_MAX = 3
# An idle subscription asks whether its tenant moved at least this often.
SUBSCRIPTION_WAIT_S = 1.0

_ENCODED_TOPIC = "-"


def event_type_of(topic: str) -> str:
    """The event type a topic is stored as: itself when walship takes it, else ``-`` + its
    base64url (a Python topic never starts with ``-``, so the two cannot be confused)."""
    if not topic.startswith(_ENCODED_TOPIC):
        try:
            return validate_event_type(topic, DEFAULT_LIMITS)
        except InvalidInput:
            pass
    encoded = base64.urlsafe_b64encode(topic.encode()).rstrip(b"=").decode("ascii")
    return validate_event_type(_ENCODED_TOPIC + encoded, DEFAULT_LIMITS)


def topic_of(event_type: str) -> str:
    if not event_type.startswith(_ENCODED_TOPIC):
        return event_type
    text = event_type[len(_ENCODED_TOPIC) :]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


@contextmanager
def translated() -> Iterator[None]:
    """walship's errors as eventsourcing's persistence errors (conflicts are the caller's)."""
    try:
        yield
    except Conflict as exc:
        raise IntegrityError(exc.message) from exc
    except Unavailable as exc:
        raise OperationalError(exc.message) from exc
    except InvalidInput as exc:
        raise DataError(exc.message) from exc
    except WalshipError as exc:
        raise DatabaseError(exc.message) from exc


def refuse_repeated_tracking(
    events: Sequence[NewEvent], tracking: Tracking | None, appended: Appended
) -> None:
    """IntegrityError for a tracking object recorded again on its own.

    walship answers a tracked batch that repeats the consumer's stored position as the
    duplicate of the batch that stored it (a client's retry after a lost answer). With events
    that can only be that retry (this module gives every event a fresh id); without, it is the
    same tracking object recorded twice, which the library refuses (a retry after a lost
    answer is then refused too, the position being stored)."""
    if tracking is not None and not events and appended.tracking_repeated:
        raise IntegrityError(
            f"tracking {tracking.application_name}:{tracking.notification_id} is already recorded"
        )


class WalshipRecorder:
    """What every walship recorder has: a backend and the tenant it writes to."""

    def __init__(self, backend: Backend, tenant_id: str, *, originator_id_type: str = "uuid"):
        self.backend = backend
        self.tenant_id = tenant_id
        self.originator_id_type = originator_id_type

    def _originator_id(self, entity_id: str) -> UUID | str:
        if self.originator_id_type == "uuid":
            try:
                return UUID(entity_id)
            except ValueError:
                return entity_id  # not written by this module: left as it is
        return entity_id

    def _append(self, events: Sequence[NewEvent], tracking: Tracking | None) -> Appended:
        track = None if tracking is None else (tracking.application_name, tracking.notification_id)
        with translated():
            appended = self.backend.append(self.tenant_id, events, track)
        refuse_repeated_tracking(events, tracking, appended)
        return appended


class WalshipAggregateRecorder(WalshipRecorder, AggregateRecorder):
    """Aggregate events (``contiguous``: an originator's versions are consecutive, which
    lets a version range be read directly) or snapshots (versions with gaps, increasing)."""

    def __init__(
        self,
        backend: Backend,
        tenant_id: str,
        *,
        contiguous: bool = True,
        originator_id_type: str = "uuid",
    ):
        super().__init__(backend, tenant_id, originator_id_type=originator_id_type)
        self.contiguous = contiguous
        # entity id -> (walship version, originator version) of an event of it, the latest seen
        self._known: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._known_lock = threading.Lock()

    # -------------------------------------------------------------- what is known of entities

    def _remember(self, entity_id: str, version: int, originator_version: int) -> None:
        with self._known_lock:
            was = self._known.get(entity_id)
            if was is None or was[0] < version:
                self._known[entity_id] = (version, originator_version)
            self._known.move_to_end(entity_id)
            while len(self._known) > VERSIONS_CACHED_MAX:
                self._known.popitem(last=False)

    def _recall(self, entity_id: str) -> tuple[int, int] | None:
        with self._known_lock:
            return self._known.get(entity_id)

    def _look_up(self, entity_id: str) -> tuple[int, int] | None:
        """Read the entity's last event; its (walship version, originator version) or None.

        What is read replaces what was remembered (which may be wrong either way), unless
        another thread remembered a later version while the read was under way: that one is
        newer than the read, and overwriting it would leave every later plan of this entity
        one version behind (refused here, without asking the node, for as long as nothing
        newer is read)."""
        with self._known_lock:
            before = self._known.get(entity_id)
        with translated():
            rows = self.backend.entity_events(
                self.tenant_id, entity_id, 1, None, backward=True, limit=1
            )
        read = (rows[0].version, rows[0].originator_version) if rows else None
        with self._known_lock:
            now = self._known.get(entity_id)
            if now is not None and now is not before and (read is None or now[0] > read[0]):
                return now
            self._known.pop(entity_id, None)
        if read is None:
            return None
        self._remember(entity_id, *read)
        return read

    # ---------------------------------------------------------------------------- writing

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        self._insert(stored_events, kwargs.get("tracking"))
        return None

    def _runs(self, stored_events: Sequence[StoredEvent]) -> dict[str, list[StoredEvent]]:
        runs: dict[str, list[StoredEvent]] = {}
        for se in stored_events:
            runs.setdefault(str(se.originator_id), []).append(se)
        for entity_id, run in runs.items():
            for a, b in itertools.pairwise(run):
                step = b.originator_version - a.originator_version
                if step != 1 and (self.contiguous or step <= 0):
                    raise IntegrityError(
                        f"the versions of {entity_id} in one insert must be "
                        f"{'consecutive' if self.contiguous else 'increasing'}: "
                        f"{a.originator_version} then {b.originator_version}"
                    )
        return runs

    def _plan(
        self, stored_events: Sequence[StoredEvent], runs: dict[str, list[StoredEvent]]
    ) -> list[NewEvent]:
        """The events to append, each originator's first naming the version it follows."""
        base: dict[str, int] = {}
        for entity_id, run in runs.items():
            known = self._recall(entity_id)
            first = run[0].originator_version
            if known is None:
                base[entity_id] = 0  # taken as new: refused (and looked up) when it is not
                continue
            version, last = known
            if first <= last:
                raise IntegrityError(
                    f"version {first} of {entity_id} is already recorded (it is at {last})"
                )
            if self.contiguous and first != last + 1:
                raise IntegrityError(
                    f"version {first} of {entity_id} does not follow its last version {last}: "
                    "walship keeps an aggregate's versions consecutive"
                )
            base[entity_id] = version
        out: list[NewEvent] = []
        seen: dict[str, int] = {}
        for se in stored_events:
            entity_id = str(se.originator_id)
            n = seen.get(entity_id, 0)
            seen[entity_id] = n + 1
            version = base[entity_id] + n + 1
            out.append(
                NewEvent(
                    entity_id,
                    event_type_of(se.topic),
                    se.state,
                    None if se.originator_version == version else se.originator_version,
                    base[entity_id] if n == 0 else None,
                )
            )
        return out

    def _insert(self, stored_events: Sequence[StoredEvent], tracking: Tracking | None) -> list[int]:
        if not stored_events and tracking is None:
            return []
        runs = self._runs(stored_events)
        for attempt in range(CONFLICT_RETRIES_MAX + 1):
            try:
                events = self._plan(stored_events, runs)
            except IntegrityError:
                # refused on what is remembered: read what the node has before saying so, as
                # a memory that is wrong (behind, or ahead after a failover cut a tail) would
                # otherwise refuse every later insert of the entity without asking
                for entity_id in runs:
                    self._look_up(entity_id)
                events = self._plan(stored_events, runs)
            try:
                try:
                    appended = self._append(events, tracking)
                except IntegrityError as exc:
                    if not isinstance(exc.__cause__, VersionConflict):
                        raise
                    if attempt == CONFLICT_RETRIES_MAX:
                        raise
                    for entity_id in runs:
                        self._look_up(entity_id)
                    continue
            except IntegrityError:
                for entity_id in runs:
                    with self._known_lock:
                        self._known.pop(entity_id, None)
                raise
            placed = appended.placed
            for se, (version, _) in zip(stored_events, placed, strict=True):
                self._remember(str(se.originator_id), version, se.originator_version)
            self.backend.notify()
            return [position for _, position in placed]
        raise AssertionError("unreachable")  # the last attempt returns or raises

    # ---------------------------------------------------------------------------- reading

    def _stored(self, row: Row, originator_id: UUID | str) -> StoredEvent:
        return StoredEvent(
            originator_id=originator_id,
            originator_version=row.originator_version,
            topic=topic_of(row.event_type),
            state=row.payload,
        )

    def _pages(self, entity_id: str, lo: int, hi: int | None, *, desc: bool) -> Iterator[list[Row]]:
        """The entity's events with walship versions lo..hi, a page at a time."""
        while hi is None or lo <= hi:
            with translated():
                rows = self.backend.entity_events(
                    self.tenant_id, entity_id, lo, hi, backward=desc, limit=READ_PAGE_EVENTS
                )
            if rows:
                top = max(rows, key=lambda r: r.version)
                self._remember(entity_id, top.version, top.originator_version)
                yield rows
            if len(rows) < READ_PAGE_EVENTS:
                return
            if desc:
                hi = rows[-1].version - 1
            else:
                lo = rows[-1].version + 1

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        entity_id = str(originator_id)
        lo, hi = 1, None
        if self.contiguous and (gt is not None or lte is not None):
            known = self._recall(entity_id) or self._look_up(entity_id)
            if known is None:
                return []
            offset = known[1] - known[0]  # originator version - walship version
            if gt is not None:
                lo = max(1, gt - offset + 1)
            if lte is not None:
                hi = lte - offset
        out: list[StoredEvent] = []
        for rows in self._pages(entity_id, lo, hi, desc=desc):
            for row in rows:
                v = row.originator_version
                # exact for snapshots (versions with gaps), a no-op for contiguous versions
                if desc:
                    if lte is not None and v > lte:
                        continue
                    if gt is not None and v <= gt:
                        return out
                else:
                    if gt is not None and v <= gt:
                        continue
                    if lte is not None and v > lte:
                        return out
                out.append(self._stored(row, originator_id))
                if limit is not None and len(out) >= limit:
                    return out
        return out


class WalshipApplicationRecorder(WalshipAggregateRecorder, ApplicationRecorder):
    """Aggregate events with notification ids: the tenant's positions."""

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        return self._insert(stored_events, kwargs.get("tracking"))

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        lo = 1 if start is None else (start if inclusive_of_start else start + 1)
        lo = max(lo, 1)
        if limit <= 0 or (stop is not None and stop < lo):
            return []
        wanted = {event_type_of(t) for t in topics}
        # one topic is filtered by the node; several are filtered here, page by page
        event_type = next(iter(wanted)) if len(wanted) == 1 else None
        out: list[Notification] = []
        while len(out) < limit:
            ask = limit - len(out) if not wanted or event_type else READ_PAGE_EVENTS
            with translated():
                rows = self.backend.by_position(self.tenant_id, lo, stop, ask, event_type)
            for row in rows:
                if wanted and row.event_type not in wanted:
                    continue
                out.append(self.notification(row))
                if len(out) >= limit:
                    break
            if len(rows) < ask:
                break
            lo = rows[-1].position + 1
        return out

    def notification(self, row: Row) -> Notification:
        return Notification(
            id=row.position,
            originator_id=self._originator_id(row.entity_id),
            originator_version=row.originator_version,
            topic=topic_of(row.event_type),
            state=row.payload,
        )

    def follow(self, after: int, topics: Sequence[str]) -> RowStream | None:
        """The backend's stream of the tenant's events after ``after`` (one topic filtered
        by the node, several by the subscription); None when it has none."""
        wanted = {event_type_of(t) for t in topics}
        with translated():
            return self.backend.follow(
                self.tenant_id, after, next(iter(wanted)) if len(wanted) == 1 else None
            )

    def max_notification_id(self) -> int | None:
        with translated():
            return self.backend.tenant_position(self.tenant_id) or None

    def subscribe(
        self, gt: int | None = None, topics: Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        return WalshipSubscription(self, gt=gt, topics=topics)

    def wait_for_more(self, after: int, wake: threading.Event) -> None:
        with translated():
            self.backend.wait_for_more(self.tenant_id, after, SUBSCRIPTION_WAIT_S, wake)


class WalshipSubscription(ListenNotifySubscription[WalshipApplicationRecorder]):
    """Notifications after ``gt``: what is stored, then each new one as it is appended.

    Over HTTP, one event stream from the node (``Backend.follow``): each event is handed on
    as the node sends it, and ``stop`` closes the stream at once. Embedded, the library's
    pull loop, woken by the backend (an append in this process, or at least every
    ``SUBSCRIPTION_WAIT_S``) instead of a listener."""

    def __init__(
        self,
        recorder: WalshipApplicationRecorder,
        gt: int | None = None,
        topics: Sequence[str] = (),
    ) -> None:
        # before the base class starts the pull thread, which sets it
        self._stream: RowStream | None = None
        super().__init__(recorder, gt=gt, topics=topics)

    def stop(self) -> None:
        super().stop()
        stream = self._stream  # the pull thread checks the flag after setting it: one of
        if stream is not None:  # the two closes the stream
            stream.close()

    def _loop_on_pull(self) -> None:
        try:
            stream = self._recorder.follow(self._last_notification_id or 0, self._topics)
            if stream is None:
                self._pull_pages()
            else:
                self._stream = stream
                if self._has_been_stopped:
                    stream.close()
                self._pull_stream(stream)
        except BaseException as exc:
            if self._thread_error is None:
                self._thread_error = exc
            self.stop()

    def _pull_stream(self, stream: RowStream) -> None:
        wanted = {event_type_of(t) for t in self._topics}
        with translated():
            for row in stream:
                if wanted and row.event_type not in wanted:
                    continue
                notification = self._recorder.notification(row)
                try:
                    self._notifications_queue.put([notification])
                except ShutDown:
                    return
                self._last_notification_id = notification.id
        if not self._has_been_stopped:  # a stream ends only when closed
            raise OperationalError("the node's event stream ended")

    def _pull_pages(self) -> None:
        self._pull()
        while not self._has_been_stopped:
            self._recorder.wait_for_more(self._last_notification_id or 0, self._has_been_notified)
            self._pull()


class WalshipTrackingRecorder(WalshipRecorder, TrackingRecorder):
    """Consumer positions (``Tracking``) of the tenant."""

    def insert_tracking(self, tracking: Tracking) -> None:
        self._append([], tracking)

    def max_tracking_id(self, application_name: str) -> int | None:
        with translated():
            return self.backend.consumer_position(self.tenant_id, application_name)


class WalshipProcessRecorder(WalshipTrackingRecorder, WalshipApplicationRecorder, ProcessRecorder):
    """Events and the tracking object that caused them, in one atomic append."""
