"""Fault tier: real ``walship serve`` processes killed with SIGKILL mid-stream, and damaged WALs.

The promise under test: every write that got a 200 survives a crash exactly once, at the lsn
and version its receipt named; the log stays gapless; new writes continue after it.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.walfiles import cut_inside_last_record, flip_bit_in_record_body, segments, write_store
from walship.events import decode_body
from walship.testing.process import NodeProcess
from walship.wal.offline import iter_wal_records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ENTITIES = [f"acct-{i:02d}" for i in range(20)]
WRITERS = 8


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    proc = NodeProcess(tmp_path / "data", fsync="always", log_path=tmp_path / "node.log")
    try:
        yield proc
    finally:
        proc.kill()


ACKED_BEFORE_KILL_MIN = 50


@dataclass
class Acked:
    """A write the server answered 200: what its receipt said."""

    event_id: str
    entity_id: str
    lsn: int
    version: int


@dataclass
class Writers:
    """Threads appending singles and small batches until stopped, keeping every 200 receipt."""

    url: str
    seed: int
    acked: list[Acked] = field(default_factory=list)
    attempted: set[str] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for n in range(WRITERS):
            t = threading.Thread(target=self._run, args=(n,), daemon=True)
            self._threads.append(t)
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(15)
            assert not t.is_alive(), "a writer thread hung"

    def _run(self, n: int) -> None:
        rng = random.Random(self.seed * 100 + n)
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while not self.stop.is_set():
                events: list[dict[str, Any]] = [
                    {
                        "id": str(uuid.uuid4()),
                        "entity_id": rng.choice(ENTITIES),
                        "event_type": "acct.credited",
                        "payload": {"writer": n, "amount": rng.randrange(1, 100)},
                    }
                    for _ in range(1 if rng.random() < 0.5 else rng.randrange(2, 6))
                ]
                with self._lock:
                    self.attempted.update(e["id"] for e in events)
                try:
                    if len(events) == 1:
                        resp = client.post("/api/v1/events", json=events[0])
                        receipts = [resp.json()] if resp.status_code == 200 else []
                    else:
                        resp = client.post("/api/v1/events/batch", json={"events": events})
                        receipts = resp.json()["receipts"] if resp.status_code == 200 else []
                except (httpx.HTTPError, ValueError) as exc:
                    with self._lock:
                        self.errors[type(exc).__name__] += 1
                    time.sleep(0.01)
                    continue
                if resp.status_code != 200:
                    with self._lock:
                        self.errors[f"http {resp.status_code}"] += 1
                    continue
                got = [
                    Acked(r["event_id"], e["entity_id"], r["lsn"], r["version"])
                    for e, r in zip(events, receipts, strict=True)
                ]
                assert all(a.event_id == e["id"] for a, e in zip(got, events, strict=True))
                with self._lock:
                    self.acked.extend(got)


def all_events(url: str) -> list[dict[str, Any]]:
    """Every event the node serves, in lsn order, following cursors."""
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    with httpx.Client(base_url=url, timeout=30.0) as client:
        while True:
            params: dict[str, Any] = {"limit": 10_000}
            if cursor is not None:
                params["cursor"] = cursor
            resp = client.get("/api/v1/events/query", params=params)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            out.extend(page["events"])
            cursor = page["next_cursor"]
            if cursor is None:
                return out


def check_log(node: NodeProcess, acked: list[Acked], attempted: set[str]) -> int:
    """Assert the durability invariants on a restarted node; returns its last lsn."""
    events = all_events(node.url)
    lsns = [e["lsn"] for e in events]
    with httpx.Client(base_url=node.url, timeout=10.0) as client:
        last = client.get("/health").json()["last_lsn"]
    # the WAL on disk holds exactly lsn 1..last, every record an event the API also serves
    wal = [
        (rec.lsn, decode_body(rec.body)) for _, _, rec in iter_wal_records(node.data_dir / "wal")
    ]
    assert [lsn for lsn, _ in wal] == list(range(1, last + 1))
    event_lsns = [lsn for lsn, body in wal if not body.event_type.startswith("_system.")]
    assert lsns == event_lsns, "the API and the WAL disagree"

    ids = [e["id"] for e in events]
    duplicates = [i for i, c in Counter(ids).items() if c > 1]
    assert not duplicates, f"events stored twice: {duplicates[:5]}"
    assert set(ids) <= attempted, "events nobody wrote"
    by_id = {e["id"]: e for e in events}
    lost = [a for a in acked if a.event_id not in by_id]
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}"
    for a in acked:
        stored = by_id[a.event_id]
        assert (stored["lsn"], stored["version"], stored["entity_id"]) == (
            a.lsn,
            a.version,
            a.entity_id,
        ), f"receipt {a} but stored {stored}"

    versions: dict[str, list[int]] = defaultdict(list)
    for e in events:
        versions[e["entity_id"]].append(e["version"])
    for entity, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), f"versions of {entity}: {seen}"
    return int(last)


def write_then_kill(node: NodeProcess, seed: int, run_s: float) -> Writers:
    writers = Writers(node.url, seed)
    writers.start()
    try:
        # at least run_s of writes, and enough of them answered: a loaded machine may answer
        # none in the first second (then the kill would test nothing)
        time.sleep(run_s)
        deadline = time.monotonic() + 60
        while len(writers.acked) <= ACKED_BEFORE_KILL_MIN and time.monotonic() < deadline:
            time.sleep(0.05)
        # the crash: no chance to flush or close anything
        node.kill()
    finally:
        writers.join()
    assert len(writers.acked) > ACKED_BEFORE_KILL_MIN, (
        f"too few writes before the kill: {writers.errors}"
    )
    # shown only when the test fails: how much was in flight at the kill
    print(f"acked {len(writers.acked)} of {len(writers.attempted)}; errors {dict(writers.errors)}")
    return writers


def test_acknowledged_writes_survive_repeated_kill_9(node: NodeProcess) -> None:
    node.start()
    acked: list[Acked] = []
    attempted: set[str] = set()
    last = 0
    for round_no, run_s in enumerate((1.5, 1.0)):
        round_writers = write_then_kill(node, seed=round_no, run_s=run_s)
        acked += round_writers.acked
        attempted |= round_writers.attempted
        node.start()
        last = check_log(node, acked, attempted)
        assert last >= len(acked)

    # the log continues right after the recovered end
    with httpx.Client(base_url=node.url, timeout=10.0) as client:
        entity = ENTITIES[0]
        version = max([a.version for a in acked if a.entity_id == entity], default=0)
        resp = client.post(
            "/api/v1/events",
            json={"entity_id": entity, "event_type": "acct.debited", "payload": {"amount": 1}},
        )
        assert resp.status_code == 200, resp.text
        receipt = resp.json()
    assert receipt["lsn"] == last + 1
    assert receipt["version"] >= version + 1
    assert receipt["durability"] == "local"
    assert node.stop() == 0, node.log()
    assert "WAL flushed and closed" in node.log()


def test_start_refuses_a_bit_flip_in_an_earlier_record(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_store(data)
    damaged = segments(data)[0]
    offset = flip_bit_in_record_body(damaged, 5)
    proc = NodeProcess(data, log_path=tmp_path / "node.log")
    try:
        proc.spawn()
        code = proc.wait_exit(30)
    finally:
        proc.kill()
    log = proc.log()
    assert code == 2, log
    assert f"{damaged} at offset {offset}" in log
    assert "Traceback" not in log


def test_start_recovers_a_torn_last_record_and_serves(node: NodeProcess) -> None:
    write_store(node.data_dir, events=60)
    offset = cut_inside_last_record(segments(node.data_dir)[-1])
    node.start()
    events = all_events(node.url)
    assert [e["lsn"] for e in events] == list(range(1, 60))
    assert "torn tail" in node.log() and f"offset {offset}" in node.log()
    with httpx.Client(base_url=node.url, timeout=10.0) as client:
        resp = client.post(
            "/api/v1/events",
            json={"entity_id": "acct-3", "event_type": "acct.credited", "payload": {}},
        )
    assert resp.status_code == 200, resp.text
    assert resp.json()["lsn"] == 60
    assert resp.json()["version"] == 15  # acct-3 had lsn 4, 8, ..., 60 and lsn 60 was cut
