"""A writer thread with its own ``Client`` over every node's URL, for tests that fail a
cluster over while it writes: it appends, reads every third write back from a follower, and
keeps each receipt; ``check_held`` says what a cluster must still hold afterwards."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from walship.client import AppendReceipt, Client
from walship.client_routing import ReadFrom, RetryPolicy

# a generous write deadline: the failover below takes seconds on a loaded machine
THROUGH_FAILOVER = RetryPolicy(attempts_max=1_000, deadline_s=90.0, backoff_max_s=0.5)


@dataclass
class Written:
    event_id: str
    started: float
    ended: float
    receipt: AppendReceipt


@dataclass
class ClientWriter:
    """A thread with its own Client over every URL: append, and every third write read the
    entity back from a follower (it must hold the write)."""

    urls: list[str]
    name: str
    written: list[Written] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reads: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> ClientWriter:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        with Client(
            self.urls, timeout=10, read_from=ReadFrom.FOLLOWERS, retry=THROUGH_FAILOVER
        ) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                event_id = str(uuid.uuid4())
                started = time.monotonic()
                try:
                    receipt = client.append(self.name, "n.added", {"i": i}, event_id=event_id)
                    self.written.append(Written(event_id, started, time.monotonic(), receipt))
                    if i % 3 == 0:
                        page = client.query(entity_id=self.name, from_lsn=receipt.lsn)
                        if event_id not in {e.id for e in page.events}:
                            self.errors.append(f"write {event_id} at {receipt.lsn} not read back")
                        self.reads += 1
                except Exception as exc:  # kept for the assertion, not raised in a thread
                    self.errors.append(repr(exc))
                    return

    def join(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(120)
        assert not self.thread.is_alive(), f"{self.name} did not finish"

    def count(self, term: int | None = None) -> int:
        return sum(1 for w in list(self.written) if term in (None, w.receipt.term))


def check_held(writers: list[ClientWriter], stored: list[dict[str, Any]]) -> None:
    """No writer saw an error or missed its own write, no event id or payload is stored twice,
    and every write answered ``replicated`` or by a later term is in ``stored`` at its lsn."""
    assert [e for w in writers for e in w.errors] == []
    assert all(w.reads > 0 for w in writers)
    ids = Counter(e["id"] for e in stored)
    assert [i for i, n in ids.items() if n > 1] == [], "an event id is stored twice"
    names = {w.name for w in writers}
    sent = Counter((e["entity_id"], e["payload"]["i"]) for e in stored if e["entity_id"] in names)
    assert [k for k, n in sent.items() if n > 1] == [], "a write is stored twice"
    by_id = {e["id"]: e for e in stored}
    written = [x for w in writers for x in w.written]
    first_term = min((x.receipt.term for x in written), default=1)
    must_hold = [
        x for x in written if x.receipt.durability == "replicated" or x.receipt.term > first_term
    ]
    missing = [x.event_id for x in must_hold if x.event_id not in by_id]
    assert missing == [], f"{len(missing)} acknowledged writes lost"
    for x in must_hold:
        assert by_id[x.event_id]["lsn"] == x.receipt.lsn, x
