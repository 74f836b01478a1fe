"""The in-sync set without processes: the clean-promotion rule, the publisher's records and
confirmations, and that only the counting followers' acks meet a mode."""

from __future__ import annotations

import asyncio
from pathlib import Path

from walship.replication.acks import AckMode, AckTracker
from walship.replication.insync import (
    InSyncFile,
    InSyncPublisher,
    InSyncRecord,
    Witness,
    decode_record,
    unclean_reason,
)


def rec(version: int, *members: str, term: int = 1, lsn: int = 100) -> InSyncRecord:
    return InSyncRecord(term, version, lsn, tuple(members), "semi-sync", "leader")


def w(node_id: str, lsn: int, record: InSyncRecord | None, term: int = 1) -> Witness:
    return Witness(node_id, (term, lsn), record)


def test_a_candidate_is_clean_only_when_every_member_of_the_newest_set_answers() -> None:
    both, only_f1 = rec(3, "f1", "f2"), rec(4, "f1", lsn=150)
    # f2 was dropped; it still holds the set naming f1, which does not answer: refused
    reason = unclean_reason(w("f2", 120, both), [])
    assert reason is not None and "f1 of the last in-sync set" in reason
    # f1 answers with the newer set, in which f2 is not: f1 is the clean candidate
    assert unclean_reason(w("f1", 300, only_f1), [w("f2", 120, both)]) is None
    # f2 is not, whoever answers: f1 is further ahead
    assert "further ahead" in (unclean_reason(w("f2", 160, both), [w("f1", 300, only_f1)]) or "")
    assert "before lsn 150" in (unclean_reason(w("f2", 120, both), [w("f1", 300, only_f1)]) or "")
    # a newer set from elsewhere (etcd) wins over the candidate's own
    reason = unclean_reason(w("f2", 400, both), [], [only_f1])
    assert reason is not None and "f1" in reason


def test_a_candidate_that_lacks_the_sets_lsn_or_knows_no_set_is_refused() -> None:
    assert "before lsn 200" in (unclean_reason(w("f1", 150, rec(5, "f1", lsn=200)), []) or "")
    assert unclean_reason(w("f1", 200, rec(5, "f1", lsn=200)), []) is None
    # a set naming nobody: a follower may have joined since, unseen by every node here
    empty = rec(6, lsn=200)
    assert "names no follower" in (unclean_reason(w("f1", 900, empty), [w("f2", 5, None)]) or "")
    assert "no in-sync set" in (unclean_reason(w("f1", 10, None), [w("f2", 5, None)]) or "")


def test_records_survive_a_restart_and_only_a_newer_one_replaces_them(tmp_path: Path) -> None:
    file = InSyncFile(tmp_path)
    assert file.store(rec(2, "f1")) and not file.store(rec(1, "f1", "f2"))
    assert InSyncFile(tmp_path).record == rec(2, "f1")
    assert file.store(rec(1, term=2))  # a new term's first record is newer
    raw = {"term": 2, "version": 1, "lsn": 100, "members": [], "ack_mode": "sync"}
    assert decode_record(raw) == InSyncRecord(2, 1, 100, (), "sync")
    assert decode_record({"term": "x"}) is None and decode_record(None) is None


def test_a_follower_counts_only_once_every_member_stored_the_set_naming_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        tracker = AckTracker()
        published: list[InSyncRecord] = []

        async def hook(record: InSyncRecord) -> None:
            published.append(record)

        file = InSyncFile(tmp_path)
        file.store(rec(7, "f9"))  # this leader's own term: versions continue above it
        end = [40]
        pub = InSyncPublisher(
            file,
            leader_id="leader",
            term=1,
            ack_mode="semi-sync",
            end_lsn=lambda: end[0],
            on_change=tracker.set_counting,
        )
        pub.hook = hook
        first = await pub.publish_due()
        assert first is not None and (first.version, first.members) == (8, ())
        pub.want("f1", True)
        pub.want("f2", True)
        end[0] = 50
        both = await pub.publish_due()
        assert both is not None and both.members == ("f1", "f2") and both.lsn == 50
        assert published == [first, both] and file.record == both
        tracker.update("f1", 60)
        # published, not yet stored by its members: f1's ack does not count, the write waits
        waiting = asyncio.create_task(tracker.wait(60, AckMode.parse("semi-sync"), 2.0))
        await asyncio.sleep(0.02)
        assert not waiting.done()
        pub.confirm("f1", 1, 9)
        await asyncio.sleep(0.02)
        assert not waiting.done()  # f2 has not stored it: a failover could not see f1's ack
        pub.confirm("f2", 1, 9)
        outcome = await waiting
        assert outcome.satisfied and outcome.acked_by == ["f1"]
        # f2 leaves: it stops counting at once, before the next record is even made
        pub.want("f2", False)
        assert tracker.in_sync == {"f1"}
        tracker.update("f2", 70)
        assert not (await tracker.wait(70, AckMode.parse("quorum:2"), 0.05)).satisfied

    asyncio.run(scenario())
