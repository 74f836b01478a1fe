"""A test hook that holds the WAL writer between its write and its fsync.

Shipping records before the leader's own fsync is safe only if a follower never shows, and
never keeps, what the leader may still lose (README, "Shipping before the leader's fsync").
Tests prove that by holding the leader's fsync open: while the file named by
``WALSHIP_TEST_HOLD_FSYNC`` exists, the writer waits after writing a group and before its
``fdatasync``, so the group is in the leader's file (and may be shipped) but not durable.
A test then kills the leader and cuts its WAL back to what was synced, as a power loss
would. Nothing sets the variable but tests; unset, the hook costs one attribute check.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Final

HOLD_FSYNC_ENV: Final = "WALSHIP_TEST_HOLD_FSYNC"
POLL_S: Final = 0.005


class FsyncHold:
    """Waits before each fsync of a group while ``path`` exists (None: never waits)."""

    __slots__ = ("path",)

    def __init__(self, path: Path | None) -> None:
        self.path = path

    @classmethod
    def from_env(cls) -> FsyncHold:
        value = os.environ.get(HOLD_FSYNC_ENV, "")
        return cls(Path(value) if value else None)

    def wait(self) -> None:
        """Block while the hold file exists (returns at once when no hold is set)."""
        path = self.path
        if path is None:
            return
        while path.exists():
            time.sleep(POLL_S)
