"""Divergence repair on one store: the WAL cut (crash-safe), lost-and-found, and the fallback
when the cut falls below the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from walship.errors import InvalidInput
from walship.limits import Limits
from walship.position import Lsn, Term
from walship.replication.acks import AckHistory, DegradationLedger
from walship.replication.lostfound import find_files, read_file
from walship.replication.repair import repair_divergence
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy
from walship.wal.segment import list_segments
from walship.wal.truncate import MARKER

from .conftest import make_event

SMALL = Limits(segment_bytes_max=4096)


def open_store(path: Path, limits: Limits = SMALL) -> Store:
    return Store.open(
        StoreConfig(path, fsync=FsyncPolicy.parse("never"), limits=limits, checkpoints=False)
    )


def write(store: Store, count: int, start: int = 0) -> None:
    for i in range(start, start + count, 10):
        store.append_batch(
            [
                make_event(f"acct-{j % 5}", payload={"i": j})
                for j in range(i, min(i + 10, start + count))
            ]
        )


def lsns(store: Store) -> list[int]:
    return [e.lsn for e in store.query(QueryFilter(), limit=10_000).events]


def test_truncate_after_cuts_records_terms_and_versions(tmp_path: Path) -> None:
    store = open_store(tmp_path / "d")
    write(store, 100)
    store.wal.begin_term(Term(2))
    write(store, 60, start=100)
    assert len(list_segments(store.wal_dir)) > 2
    before = store.entity_version("acct-1")
    store.truncate_after(Lsn(90))
    assert store.wal.last_position.lsn.value == 90
    assert store.wal.terms.to_list() == [(1, 1)]
    assert lsns(store) == list(range(1, 91))
    assert store.entity_version("acct-1") == 18 < before
    receipt = store.append(make_event("acct-1"))
    assert (receipt.lsn, receipt.term, receipt.version) == (91, 1, 19)
    store.close()
    again = open_store(tmp_path / "d")
    assert lsns(again) == list(range(1, 92))
    again.close()


def test_an_interrupted_cut_is_finished_when_the_wal_opens(tmp_path: Path) -> None:
    """A crash after the intent was written and the newest segment removed, before the
    segment holding the cut was truncated: opening finishes the cut."""
    store = open_store(tmp_path / "d")
    write(store, 100)
    store.wal.begin_term(Term(3))
    write(store, 100, start=100)
    store.close()
    wal_dir = tmp_path / "d" / "wal"
    (wal_dir / MARKER).write_text("150")
    list_segments(wal_dir)[-1][1].unlink()
    again = open_store(tmp_path / "d")
    assert again.wal.last_position.lsn.value == 150
    assert again.wal.terms.to_list() == [(1, 1), (3, 101)]
    assert lsns(again) == list(range(1, 151))
    assert not (wal_dir / MARKER).exists()
    again.close()


def test_cut_below_the_checkpoint_is_refused_by_the_store(tmp_path: Path) -> None:
    store = open_store(tmp_path / "d")
    write(store, 50)
    store.checkpoint()
    with pytest.raises(InvalidInput):
        store.truncate_after(Lsn(10))
    store.close()


def test_repair_moves_the_tail_to_lost_and_found_with_its_acknowledgement(tmp_path: Path) -> None:
    data = tmp_path / "d"
    store = open_store(data)
    write(store, 100)
    acks = AckHistory(data / "replication" / "acks.json")
    acks.led(1)
    acks.replicated(1, 60)
    acks.flush()
    ledger = DegradationLedger.load(data / "replication" / "degraded.json")
    ledger.record(81, 90, "not confirmed", 1)
    ledger.flush()  # as the leader's record_degraded saves it before answering
    result = repair_divergence(store, common_term=1, common_lsn=70)
    assert (result.kept_lsn, result.cut_records, result.reset) == (70, 30, False)
    assert result.lost_found is not None and find_files(data) == [result.lost_found]
    cut = list(read_file(result.lost_found))
    assert [r.lsn for r in cut] == list(range(71, 101))
    levels = {r.lsn: r.acknowledged for r in cut}
    assert levels[71] == "local_or_unanswered" and levels[85] == "degraded"
    assert levels[100] == "local_or_unanswered"
    assert {r.source for r in cut} == {"wal"}
    assert lsns(store) == list(range(1, 71))
    assert DegradationLedger.load(data / "replication" / "degraded.json").ranges == []
    store.close()


def test_repair_below_the_checkpoint_empties_the_store_and_keeps_every_cut_record(
    tmp_path: Path,
) -> None:
    """The cut falls inside checkpointed history whose WAL is gone: those records are read
    back from Parquet into lost-and-found, the rest from the WAL, and the store is emptied so
    the leader sends everything again."""
    data = tmp_path / "d"
    store = open_store(data)
    write(store, 200)
    store.checkpoint()
    write(store, 50, start=200)
    wal_first = store.wal.first_lsn().value
    assert 120 < wal_first <= 201, "checkpointing should have removed early segments"
    result = repair_divergence(store, common_term=1, common_lsn=120)
    assert result.reset and result.cut_records == 130
    assert result.lost_found is not None
    cut = list(read_file(result.lost_found))
    assert [r.lsn for r in cut] == list(range(121, 251))
    assert {r.source for r in cut if r.lsn < wal_first} == {"checkpoint"}
    assert {r.source for r in cut if r.lsn >= wal_first} == {"wal"}
    assert {r.acknowledged for r in cut} == {"not_led_here"}
    assert store.wal.last_position.lsn.value == 0 and lsns(store) == []
    assert store.manifest.last_lsn == 0
    store.close()
    again = open_store(data)
    assert again.wal.last_position.lsn.value == 0
    again.close()


def test_ack_history_levels(tmp_path: Path) -> None:
    acks = AckHistory(tmp_path / "acks.json")
    ledger = DegradationLedger(tmp_path / "degraded.json")
    ledger.record(5, 6, "timeout", 1)
    acks.led(2)
    acks.replicated(2, 3)
    acks.flush()
    assert AckHistory(tmp_path / "acks.json").terms == {2: 3}
    assert acks.level(2, 3, ledger) == "replicated"
    assert acks.level(2, 5, ledger) == "degraded"
    assert acks.level(2, 9, ledger) == "local_or_unanswered"
    assert acks.level(1, 1, ledger) == "not_led_here"


def test_repair_keeps_each_records_place_in_its_atomic_append(tmp_path: Path) -> None:
    """Each cut WAL record says how many records of its append follow it (``batch_left``),
    so that replay puts a consumer's tracking back with the events of its batch."""
    from walship.events import TrackingIn

    data = tmp_path / "d"
    store = open_store(data)
    write(store, 10)
    store.append_batch(
        [make_event("acct-1"), make_event("acct-2")],
        tracking=TrackingIn(consumer="proj", position=3),
    )
    store.append(make_event("acct-3"))
    result = repair_divergence(store, common_term=1, common_lsn=10)
    assert result.lost_found is not None
    cut = list(read_file(result.lost_found))
    assert [(r.lsn, r.batch_left) for r in cut] == [(11, 2), (12, 1), (13, 0), (14, 0)]
    store.close()
