"""The role a node was switched to at run time, persisted so a restart keeps it.

``promote`` and ``repoint`` change a node's role and leader while it runs; without a record a
restart would go back to its command-line flags -- a promoted leader would follow its dead
predecessor again, a demoted one would lead again. ``DATA_DIR/replication/role.json`` holds
the last switch (and the highest term this node has heard of, so a later promotion goes above
it); when present it wins over ``--role``/``--leader``, and the start line says so.

It also keeps the cluster's ack settings as this node last heard them from a leader, so a
promoted follower -- also after a restart with its original flags -- leads with the
cluster's write guarantee, not with its own flags' defaults.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from walship.errors import CorruptionError
from walship.events import now_us
from walship.fsutil import atomic_write
from walship.replication.config import AckSettings

FILE_NAME = "role.json"


class RoleRecord(msgspec.Struct):
    role: str | None = None  # "leader" / "follower"; None: as the flags say
    leader: str | None = None  # a follower's leader (replication HOST:PORT)
    term_seen: int = 0
    changed_us: int = 0
    ack_settings: AckSettings | None = None  # the last leader's, as its Welcome said


class RoleState:
    """Load and save ``role.json`` (tmp → fsync → rename)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "replication" / FILE_NAME
        self.record = RoleRecord()
        if self.path.exists():
            try:
                self.record = msgspec.json.decode(self.path.read_bytes(), type=RoleRecord)
            except msgspec.DecodeError as exc:
                raise CorruptionError(f"unreadable role state {self.path}: {exc}") from exc

    def switched(self, role: str, leader: str | None, term_seen: int) -> None:
        """Record a switch to ``role`` (following ``leader``), persisted before returning."""
        term = max(term_seen, self.record.term_seen)
        self._save(RoleRecord(role, leader, term, now_us(), self.record.ack_settings))

    def saw_term(self, term: int) -> None:
        """Remember the highest term heard of (persisted when it rises)."""
        if term > self.record.term_seen:
            self._save(msgspec.structs.replace(self.record, term_seen=term))

    def learned(self, settings: AckSettings) -> bool:
        """Keep the cluster's ack settings (persisted when they change); True when they did."""
        if settings == self.record.ack_settings:
            return False
        self._save(msgspec.structs.replace(self.record, ack_settings=settings))
        return True

    def _save(self, record: RoleRecord) -> None:
        """Persist ``record``, then hold it: when the write fails, the record stays as it was
        on disk, so the next call writes again."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, msgspec.json.encode(record))
        self.record = record
