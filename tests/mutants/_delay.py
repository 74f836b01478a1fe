"""Shared by the mutants: make the WAL writer thread late, so an early answer is observable.

A process killed with SIGKILL keeps what it had ``write``-n (the kernel holds it), so acking
"before fsync" alone cannot be seen without a machine crash. The mutants therefore answer
before the records are even written, and this delay keeps them unwritten long enough for a
kill to land in between.
"""

from __future__ import annotations

import time
from typing import Any

from walship.wal.log import Wal

WRITE_DELAY_S = 0.3
_state = {"on": False}


def delay_wal_writes() -> None:
    """From now on every group commit of this process waits ``WRITE_DELAY_S`` first."""
    _state["on"] = True


def install() -> None:
    write_batch = Wal._write_batch

    def late_write_batch(self: Wal, *args: Any) -> Any:
        if _state["on"]:
            time.sleep(WRITE_DELAY_S)
        return write_batch(self, *args)

    Wal._write_batch = late_write_batch  # type: ignore[method-assign]
