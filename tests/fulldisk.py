"""A full disk for the WAL, simulated in-process (see tests/test_wal_full_disk.py)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any


class FullDisk:
    """Stands in for the ``os`` module inside ``walship.wal.log``. While ``full`` (or once
    ``writes_left`` more ``pwrite`` calls have succeeded), ``pwrite`` and ``posix_fallocate``
    (the free-space probe) fail with ``errno``; with ``partial`` set, the first failing
    ``pwrite`` writes two thirds of its bytes first (a record and a piece of the next), as a
    real write that runs out of space midway does. ``hold()`` makes ``pwrite`` wait for
    ``release()``: appends made meanwhile queue up as the next group. With ``only_under``,
    only files below that directory run out of space (a leader and a follower in one
    process)."""

    def __init__(self, only_under: Path | None = None) -> None:
        self.only_under = only_under
        self.full = False
        self.writes_left: int | None = None
        self.errno = errno.ENOSPC
        self.partial = False
        self.fsyncs = 0
        self._hold: threading.Event | None = None
        self.held = threading.Event()

    def is_full(self, fd: int) -> bool:
        if self.only_under is not None:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if not path.is_relative_to(self.only_under):
                return False
        return self.full or self.writes_left == 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _no_space(self) -> OSError:
        return OSError(self.errno, os.strerror(self.errno))

    def hold(self) -> None:
        self.held.clear()
        self._hold = threading.Event()

    def release(self) -> None:
        assert self._hold is not None
        hold, self._hold = self._hold, None
        hold.set()

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        hold = self._hold
        if hold is not None:
            self.held.set()
            assert hold.wait(5)
        if self.is_full(fd):
            if self.partial and len(data) > 1:
                self.partial = False
                return os.pwrite(fd, bytes(data[: len(data) * 2 // 3]), offset)
            raise self._no_space()
        if self.writes_left is not None:
            self.writes_left -= 1
        return os.pwrite(fd, data, offset)

    def posix_fallocate(self, fd: int, offset: int, size: int) -> None:
        if self.is_full(fd):
            raise self._no_space()
        os.posix_fallocate(fd, offset, size)

    def fdatasync(self, fd: int) -> None:
        self.fsyncs += 1
        os.fdatasync(fd)
