"""Divergence repair on the follower: keep the records the leader's history shares, move the
rest to lost-and-found, cut the log back.

Run in a worker thread by the follower when the leader answers ``Diverged``, with nothing
appending. The order is what makes it safe: the cut records are written to a lost-and-found
file (fsynced) first, then the WAL is cut (crash-safe, see ``wal/truncate.py``). When the
cut falls below this node's checkpoint, Parquet parts are not rewritten: the checkpointed
records above the cut go to lost-and-found too and the store is emptied, so the leader sends
everything again (WAL or snapshot). Records at or below the cut are on the leader: nothing
the leader lacks is dropped untraced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from walship.errors import invariant
from walship.position import Lsn
from walship.replication.acks import AckHistory, DegradationLedger
from walship.replication.divergence import keep_point
from walship.replication.lostfound import LostRecord, event_of, lost_record, write_lost_found
from walship.storage.query import QueryFilter
from walship.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepairResult:
    kept_lsn: int
    cut_records: int
    highest_cut_term: int
    lost_found: Path | None
    reset: bool  # the cut fell below the checkpoint: the store was emptied


def replication_dir(store: Store) -> Path:
    return store.data_dir / "replication"


def repair_divergence(store: Store, common_term: int, common_lsn: int) -> RepairResult:
    """Cut this store back to where its log meets the leader's (``common_term``,
    ``common_lsn``, from ``Diverged``); the cut records go to lost-and-found first."""
    wal = store.log
    last = wal.last_position.lsn.value
    keep = keep_point(wal.term_history(), last, common_term, common_lsn)
    invariant(keep < last, f"divergence repair would cut nothing (keep {keep}, last {last})")
    checkpointed = store.manifest.last_lsn
    reset = keep < checkpointed
    repl = replication_dir(store)
    acks = AckHistory(repl / "acks.json")
    ledger = DegradationLedger.load(repl / "degraded.json")
    highest = 0

    def cut() -> Iterator[LostRecord]:
        nonlocal highest
        wal_first = wal.first_lsn().value
        if keep + 1 < wal_first:
            # only in Parquet now (the WAL after the checkpoint was removed): read them back
            flt = QueryFilter(from_lsn=keep + 1, to_lsn=wal_first - 1)
            cursor: str | None = None
            while True:
                page = store.query(flt, store.limits.query_limit_max, cursor)
                for ev in page.events:
                    highest = max(highest, ev.term)
                    yield lost_record(ev, acks.level(ev.term, ev.lsn, ledger), "checkpoint")
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
        for rec in wal.read_from(max(keep + 1, wal_first)):
            highest = max(highest, rec.term)
            ev = event_of(rec)
            level = acks.level(rec.term, rec.lsn, ledger)
            yield lost_record(ev, level, "wal", rec.batch_left)

    written = write_lost_found(store.data_dir, cut())
    path, count = written if written is not None else (None, 0)
    log.warning(
        "divergence repair: %d records after lsn %d (term %d) are not on the leader's history; "
        "moved to %s%s",
        count,
        keep,
        common_term,
        path,
        "; the checkpoint is past the cut, so the store is emptied and sent again" if reset else "",
    )
    # bracketed so that open subscriptions past ``keep`` end, telling their consumers, and
    # none sends a page it read from the records being cut
    with store.cuts.cutting(keep):
        if reset:
            store.reset_to_empty()
        else:
            store.truncate_after(Lsn(keep))
    ledger.truncate_after(keep)
    return RepairResult(keep, count, highest, path, reset)
