"""The in-sync set: the followers a ``replicated`` receipt may depend on, published so that a
failover can refuse a candidate that cannot prove it holds every ``replicated`` write.

Kafka keeps its ISR in the controller and by default refuses an *unclean* leader election (a
replica outside the ISR); Patroni promotes only the synchronous standby it recorded in its
DCS. walship does the same with an ``InSyncRecord``:

* The leader (``InSyncPublisher``) makes a new record -- ``(term, version)``, its end of log
  ``lsn`` at that moment, the ``members`` -- whenever a follower joins or leaves the set,
  saves it in its own data dir, hands it to the coordinator (etcd, when used), and sends it
  to every follower (``InSyncSet``). A follower stores it durably (a member only once it
  holds ``lsn``, so every member of a record holds every write answered before it) and
  confirms (``InSyncStored``).
* Acks count towards ``replicated`` only from *counting* members: the members of the newest
  record every member has confirmed (*effective*), and of the newest one published, both. So
  when a write is answered ``replicated``, each follower that acked it has stored a record
  naming it, and so has every other member of that record.
* A candidate is *clean* (``unclean_reason`` returns None) when, with ``R`` the newest record
  it or any node it can reach (or etcd) knows: ``R`` names a follower, every member of ``R``
  answers, the candidate is at least as far as each node that answers, and it holds
  ``R.lsn``. Then each ``replicated`` write is at or below ``R.lsn``, or was acked by a
  member of ``R`` under ``R``, or under a newer record -- which every member of ``R`` that
  the newer one keeps has stored, so it would have been seen, unless it dropped them all.
  A record that names nobody proves nothing about later ones: a follower may have joined
  without any node here hearing of it.

Without etcd the records live only on the nodes: members dropped from the set while they
could hear nothing (paused, cut off) still hold the older record that names them, and if
every node that knows a newer one is gone too, nothing tells them. etcd closes that gap: a
record counts only once etcd has it, and an election reads it there. The ack-mode table of
docs/replication.md ("What each mode promises") says what each mode promises.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from walship.errors import CorruptionError
from walship.events import now_us
from walship.fsutil import atomic_write
from walship.replication.protocol import InSyncSet, InSyncStored

log = logging.getLogger(__name__)

FILE_NAME = "in_sync.json"


class InSyncRecord(msgspec.Struct, frozen=True):
    """One version of a leader's in-sync set."""

    term: int
    version: int
    lsn: int  # the leader's end of log when made: every write answered before is at or below
    members: tuple[str, ...]
    ack_mode: str
    leader: str = ""
    published_us: int = 0

    @property
    def order(self) -> tuple[int, int]:
        return self.term, self.version

    def describe(self) -> str:
        names = ", ".join(self.members) if self.members else "no follower"
        return f"term {self.term} version {self.version}, from lsn {self.lsn}: {names}"

    def to_wire(self) -> InSyncSet:
        return InSyncSet(self.term, self.version, self.lsn, list(self.members), self.ack_mode)

    @classmethod
    def from_wire(cls, msg: InSyncSet, leader: str) -> InSyncRecord:
        return cls(
            msg.term, msg.version, msg.lsn, tuple(msg.members), msg.ack_mode, leader, now_us()
        )


def newest(records: Iterable[InSyncRecord | None]) -> InSyncRecord | None:
    """The highest ``(term, version)`` among ``records`` (None when there is none)."""
    found = [r for r in records if r is not None]
    return max(found, key=lambda r: r.order) if found else None


def decode_record(raw: object) -> InSyncRecord | None:
    """A record from JSON-like data (``/health``, etcd); None when absent or malformed."""
    if raw is None:
        return None
    try:
        data = raw if isinstance(raw, bytes) else msgspec.json.encode(raw)
        return msgspec.json.decode(data, type=InSyncRecord)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
        return None


class InSyncFile:
    """``DATA_DIR/replication/in_sync.json``: the newest record this node has made or stored."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "replication" / FILE_NAME
        self.record: InSyncRecord | None = None
        self._lock = threading.Lock()  # a stopping follower's store may overlap a new leader's
        if self.path.exists():
            try:
                self.record = msgspec.json.decode(self.path.read_bytes(), type=InSyncRecord)
            except msgspec.DecodeError as exc:
                raise CorruptionError(f"unreadable in-sync set {self.path}: {exc}") from exc

    def store(self, record: InSyncRecord) -> bool:
        """Persist ``record`` (tmp → fsync → rename) unless an equal or newer one is held;
        True when it was written. Blocking: call it from a worker thread on a loop."""
        with self._lock:
            held = self.record
            if held is not None and held.order >= record.order:
                return False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, msgspec.json.encode(record))
            self.record = record
            return True


# ---------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class Witness:
    """What failover knows of one node that answers: its end of log and its newest record."""

    node_id: str
    position: tuple[int, int]  # (term of the last record, last lsn)
    record: InSyncRecord | None


def unclean_reason(
    candidate: Witness, others: Sequence[Witness], extra: Iterable[InSyncRecord | None] = ()
) -> str | None:
    """Why promoting ``candidate`` could lose a write answered ``replicated`` (None: it
    cannot). ``others`` are the nodes that answered; ``extra`` records from elsewhere (etcd).
    """
    answered = {candidate.node_id, *(w.node_id for w in others)}
    latest = newest([candidate.record, *(w.record for w in others), *extra])
    if latest is None:
        return (
            "no in-sync set is known (no node that answers ever stored one): which followers "
            "hold the writes answered replicated cannot be told"
        )
    if not latest.members:
        # no follower counted then; one that joined later without this node hearing of it
        # may hold writes answered replicated (as Kafka, whose ISR shrank to the dead leader)
        return (
            f"the last in-sync set known ({latest.describe()}) names no follower: one that "
            "joined it later may hold writes answered replicated that no node here has"
        )
    missing = [m for m in latest.members if m not in answered]
    if missing:
        return (
            f"{', '.join(missing)} of the last in-sync set ({latest.describe()}) "
            f"{'is' if len(missing) == 1 else 'are'} unreachable and may hold writes answered "
            f"replicated after lsn {candidate.position[1]}, the end of {candidate.node_id}'s log"
        )
    if candidate.position < (latest.term, latest.lsn):
        term, lsn = candidate.position
        return (
            f"{candidate.node_id} ends at {term}/{lsn}, before lsn {latest.lsn} of term "
            f"{latest.term} that every member of the last in-sync set ({latest.describe()}) "
            "holds: writes answered replicated up to it may be missing"
        )
    ahead = [w for w in others if w.position > candidate.position]
    if ahead:
        best = max(ahead, key=lambda w: w.position)
        return f"{best.node_id} is further ahead ({best.position[0]}/{best.position[1]})"
    return None


def may_lose(candidate: Witness, reason: str) -> str:
    """The warning an unclean promotion of ``candidate`` carries."""
    term, lsn = candidate.position
    return (
        f"unclean promotion of {candidate.node_id} at {term}/{lsn}: {reason}. Any write "
        f"answered replicated after lsn {lsn} that only those nodes hold is lost to clients "
        "(a node that held it keeps it in its lost-and-found when it rejoins)"
    )


# --------------------------------------------------------------------------- the leader


Hook = Callable[[InSyncRecord], Awaitable[None]]


class InSyncPublisher:
    """The leader's side: which followers are wanted in the set, the records made from it,
    their confirmations, and the counting members fed to the ``AckTracker``.

    Event-loop confined. ``want`` and ``confirm`` are cheap; ``publish_due`` (awaited by the
    leader's publishing task) makes, saves and hands out the next record.
    """

    def __init__(
        self,
        file: InSyncFile,
        *,
        leader_id: str,
        term: int,
        ack_mode: str,
        end_lsn: Callable[[], int],
        on_change: Callable[[set[str], bool], None],
    ) -> None:
        self.file = file
        self.leader_id = leader_id
        self.term = term
        self.ack_mode = ack_mode
        self._end_lsn = end_lsn
        self._on_change = on_change  # (counting members, whether a change is pending)
        held = file.record
        self._version = held.version if held is not None and held.term == term else 0
        self.wanted: set[str] = set()
        self.current: InSyncRecord | None = None  # the newest record handed out
        self.effective: InSyncRecord | None = None  # the newest every member confirmed
        self.confirmed: dict[str, tuple[int, int]] = {}
        self.hook: Hook | None = None  # the coordinator's (etcd): awaited before hand-out
        self.changed = asyncio.Event()  # wakes the publishing task
        self.changed.set()  # the first record of this leader is due at once

    def new_term(self, term: int) -> None:
        """The leader began ``term`` (a leader start): its records are numbered from there,
        and the next one, due at once, names the members again."""
        if term <= self.term:
            return
        self.term = term
        self._version = 0
        self.current = None
        self.changed.set()

    @property
    def due(self) -> bool:
        current = self.current
        return current is None or set(current.members) != self.wanted

    def want(self, node_id: str, in_sync: bool) -> None:
        """The leader judged ``node_id`` in sync (or not); a new record follows if needed."""
        if (node_id in self.wanted) == in_sync:
            return
        if in_sync:
            self.wanted.add(node_id)
        else:
            self.wanted.discard(node_id)
        self.changed.set()
        self._publish_counting()

    def confirm(self, node_id: str, term: int, version: int) -> None:
        """``node_id`` durably stored record ``(term, version)``."""
        if (term, version) > self.confirmed.get(node_id, (0, 0)):
            self.confirmed[node_id] = (term, version)
            self._settle()

    def forget(self, node_id: str) -> None:
        self.confirmed.pop(node_id, None)

    async def publish_due(self) -> InSyncRecord | None:
        """Make, save and hand out the next record when the wanted set changed; the record,
        or None when nothing was due. The hook's error propagates (retry later)."""
        self.changed.clear()
        if not self.due:
            return None
        record = InSyncRecord(
            self.term,
            self._version + 1,
            self._end_lsn(),
            tuple(sorted(self.wanted)),
            self.ack_mode,
            self.leader_id,
            now_us(),
        )
        if self.hook is not None:
            await self.hook(record)  # etcd first: nobody acts on a record etcd lacks
        await asyncio.to_thread(self.file.store, record)
        if record.term != self.term:
            # the leader began a new term meanwhile (``new_term``): followers that know it
            # would refuse this record; the next one, of the new term, is due at once
            self.changed.set()
            return None
        self._version = record.version
        self.current = record
        log.info("replication: in-sync set %s", record.describe())
        self._settle()
        return record

    def _settle(self) -> None:
        current = self.current
        if current is not None and all(
            self.confirmed.get(m, (0, 0)) >= current.order for m in current.members
        ):
            self.effective = current
        self._publish_counting()

    def counting(self) -> set[str]:
        """The followers whose acks count now: members of the effective record that the
        newest record (and the wanted set) keep."""
        if self.effective is None or self.current is None:
            return set()
        return set(self.effective.members) & set(self.current.members) & self.wanted

    def _publish_counting(self) -> None:
        pending = self.due or self.effective is not self.current
        self._on_change(self.counting(), pending)

    def status(self) -> dict[str, object]:
        current = self.current
        return {
            "record": None if current is None else msgspec.to_builtins(current),
            "effective_version": None if self.effective is None else self.effective.version,
            "counting": sorted(self.counting()),
        }


def stored_message(record: InSyncRecord) -> InSyncStored:
    return InSyncStored(record.term, record.version)
