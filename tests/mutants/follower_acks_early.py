"""Mutant: a follower acknowledges a batch as durable as soon as it has received it.

Its WAL write happens later (``_delay``), so the leader's receipts say ``replicated`` with this
follower in ``acked_by`` while the records exist only in the follower's memory. ``walship
verify`` must catch it: a follower killed in that window comes back without writes it had
confirmed (check ``acks_durable_at_crash``).
"""

from __future__ import annotations

from concurrent.futures import Future

from tests.mutants import _delay
from walship.replication.follower import Follower
from walship.replication.protocol import WalBatch
from walship.wal.log import WriteOutcome

_decode_and_apply = Follower._decode_and_apply


def _ack_on_receipt(
    self: Follower, batch: WalBatch
) -> tuple[int, int, Future[WriteOutcome] | None]:
    _delay.delay_wal_writes()
    count, last_lsn, written = _decode_and_apply(self, batch)  # the real write, still queued
    if written is None:
        return count, last_lsn, None
    done: Future[WriteOutcome] = Future()
    done.set_result(WriteOutcome(last_lsn, True))  # the lie: "durable" already
    return count, last_lsn, done


_delay.install()
Follower._decode_and_apply = _ack_on_receipt  # type: ignore[method-assign]

if __name__ == "__main__":
    from walship.cli.main import main

    main()
