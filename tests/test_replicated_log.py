"""``store.log``: replication's narrow front door to the WAL (``walship.replicated_log``).

It answers what the WAL answers, follows the store to the new WAL it opens after a divergence
repair (a held WAL object would go stale), and replication reaches the WAL through it only.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import make_event
from walship.position import LogPoint, Lsn, Position, Term
from walship.replication import __file__ as replication_init
from walship.store import Store


def test_log_answers_what_the_wal_holds(store: Store) -> None:
    for i in range(5):
        store.append(make_event(entity=f"acct-{i}"))
    log, wal = store.log, store.wal
    assert log.written_lsn == wal.written_lsn == Lsn(5)
    assert log.synced_lsn == wal.synced_lsn
    assert log.last_position == wal.last_position == Position(wal.last_position.term, Lsn(5))
    assert log.last_chain == wal.last_chain
    assert log.last_point == LogPoint(wal.last_position.term, Lsn(5), wal.last_chain)
    assert log.first_lsn() == Lsn(1)
    assert log.current_term == wal.terms.current and isinstance(log.current_term, Term)
    assert log.term_history() == wal.terms.to_list()
    assert [rec.lsn for rec in log.read_from(3)] == [3, 4, 5]
    assert log.segment_infos() == wal.segment_infos()
    assert not log.backlogged()
    cursor = log.cursor(2)
    try:
        batch = cursor.read(1 << 20)
    finally:
        cursor.close()
    assert batch is not None and (batch.first_lsn, batch.last_lsn) == (2, 5)
    heard: list[int] = []
    log.add_listener(heard.append)
    store.append(make_event())
    log.remove_listener(heard.append)
    store.append(make_event())
    assert heard == [6]


def test_log_follows_the_wal_the_store_reopens_after_a_repair(store: Store) -> None:
    for _ in range(6):
        store.append(make_event())
    before = store.wal
    assert store.log.written_lsn == Lsn(6)  # asked before the repair too
    store.truncate_after(Lsn(4))
    assert store.wal is not before, "the repair opened a new WAL"
    assert store.log.written_lsn == Lsn(4)
    assert store.log.last_position.lsn == Lsn(4)
    assert store.log.last_point.chain == store.wal.last_chain != before.last_chain
    assert [rec.lsn for rec in store.log.read_from(1)] == [1, 2, 3, 4]


def test_replication_and_http_reach_the_wal_only_through_the_log() -> None:
    """No ``store.wal`` (or ``.store.wal``) attribute chain in walship/replication/ or http/."""
    reaches: list[str] = []
    package = Path(replication_init).parent.parent
    paths = [*package.glob("replication/*.py"), *package.glob("http/*.py")]
    for path in sorted(paths):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "wal"
                and isinstance(node.value, ast.Attribute | ast.Name)
                and (getattr(node.value, "attr", None) or getattr(node.value, "id", None))
                == "store"
            ):
                reaches.append(f"{path.name}:{node.lineno}")
    assert not reaches, f"replication reaches into store.wal at {reaches}"
