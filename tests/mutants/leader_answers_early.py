"""Mutant: a leader answers a write ``local`` before its WAL has written it.

The answer does not wait for the group commit (and the writer is made late, ``_delay``), so a
leader killed in that window comes back without writes it had acknowledged. ``walship verify``
must catch it (checks ``acks_durable_at_crash`` and ``acknowledged_survive``). Run it with
``--ack-mode async``: with a replicated mode the answer would still wait for the followers,
which can only ship what is written.
"""

from __future__ import annotations

from concurrent.futures import Future

from tests.mutants import _delay
from walship import write_path
from walship.wal.log import WriteOutcome


async def _answer_at_once(fut: Future[WriteOutcome]) -> WriteOutcome:
    return WriteOutcome(0, True)  # the lie: "written and fsynced", without waiting


_delay.install()
_delay.delay_wal_writes()
write_path.wait_written = _answer_at_once

if __name__ == "__main__":
    from walship.cli.main import main

    main()
