"""One process per data dir (DESIGN invariant 9): an exclusive ``flock`` on ``walship.lock``.

Whatever opens a data dir for writing — ``walship serve``, an embedded ``Store.open`` — takes
the lock first and keeps it until it closes; a second opener, in another process or in the
same one, fails at once with ``DataDirLocked`` naming the holder's pid, which the holder
writes into the lock file. The kernel drops a ``flock`` when its file is closed, so a process
that is killed (``kill -9``, a crash, the OOM killer) releases the dir with it: there is no
stale lock to clean up, and a pid left in the file by a dead holder is never believed. A
child forked by the holder closes its copies of the lock files at once, so the lock goes when
the holder releases it (not when the last forked worker ends).

Read-only commands (``walship wal verify|dump``, ``walship lost-found list|export``) take no
lock, so they can look at a running node's dir and never keep a node from starting;
``holder_pid`` lets them say that the dir is in use (its shared lock lasts a moment, and an
opener that meets only such a look waits it out). The lock is advisory: it keeps walship
processes apart, not other programs. On file systems without working ``flock`` (some network
file systems) it keeps nothing apart; keep data dirs on local disks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import weakref
from pathlib import Path
from types import TracebackType

from walship.errors import DataDirLocked, StorageError

LOCK_FILE = "walship.lock"

# The holder writes its pid just after it took the lock; a reader that lost the race for the
# lock may look in between and find the file empty.
_PID_WAIT_S = 0.5
# ``holder_pid`` holds a shared lock for the microseconds of its look; an opener that meets
# only such looks tries again for this long (a real holder is refused at once)
_LOOK_WAIT_S = 1.0


class DataDirLock:
    """The exclusive lock on one data dir, held until ``release()`` (or the process ends)."""

    def __init__(self, data_dir: Path, fd: int) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = fd

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<DataDirLock {self.data_dir} {state}>"

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Create ``data_dir`` if needed, lock it and write this process's pid into the lock.

        DataDirLocked (naming the holder's pid) when another process, or another open store
        in this process, holds it; StorageError when the lock file cannot be opened or locked.
        Never waits.
        """
        path = data_dir / LOCK_FILE
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            # O_CLOEXEC: a child the holder starts must not keep the dir locked after it exits
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open the lock file {path}: {exc}") from exc
        try:
            taken = _lock_exclusive(fd)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot lock {path}: {exc}") from exc
        if not taken:
            os.close(fd)
            raise _locked_error(data_dir, _read_pid(path, _PID_WAIT_S))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)  # and with it the lock
            raise StorageError(f"cannot write the lock file {path}: {exc}") from exc
        lock = cls(data_dir, fd)
        _HELD.add(lock)
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Clear the pid and drop the lock; later calls do nothing."""
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # while still held: nobody reads a pid that no longer holds
        # Unlock the open file itself, not just this fd: a child forked a moment ago shares
        # it and may not have closed its copy yet (its at-fork hook runs when it is scheduled).
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


# every lock this process holds, so that a forked child can let go of its copies
_HELD: weakref.WeakSet[DataDirLock] = weakref.WeakSet()


def _forget_in_child() -> None:
    """In a child just forked: close its copies of the parent's lock files, held no more.

    A ``flock`` belongs to the open file, which a fork shares: were the child to keep its
    copy, the dir would stay locked after the parent released it, for as long as the child
    (a worker pool, say) lives; were it to release it, it would clear the parent's pid.
    """
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # the parent's copy keeps the lock
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _lock_exclusive(fd: int) -> bool:
    """Take the exclusive lock on ``fd``; False when another opener holds it. Never waits for
    an opener, only (``_LOOK_WAIT_S`` at most) for a ``holder_pid`` look: its shared lock
    lasts a moment, and a node must not fail to start because someone looked just then."""
    deadline = time.monotonic() + _LOOK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # an exclusive holder: the dir is open elsewhere
        fcntl.flock(fd, fcntl.LOCK_UN)  # only looks hold it: try again in a moment
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def holder_pid(data_dir: Path) -> int | None:
    """The pid of the process holding ``data_dir``'s lock; None when nobody holds it.

    Takes (and drops at once) a shared lock to find out, so it answers None for a lock file
    left by a process that died. 0 when the dir is held but the holder's pid is unreadable.
    """
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: never opened by this version, or not a data dir
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(data_dir / LOCK_FILE, _PID_WAIT_S) or 0
    except OSError:
        return None
    finally:
        os.close(fd)  # drops the shared lock when it was taken
    return None


def _read_pid(path: Path, wait_s: float) -> int | None:
    """The pid in the lock file, waiting up to ``wait_s`` for the holder to write it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        if text.isdigit():
            return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _locked_error(data_dir: Path, pid: int | None) -> DataDirLocked:
    if pid == os.getpid():
        who = f"an open Store of this process (pid {pid})"
    elif pid is not None:
        who = f"pid {pid}"
    else:
        who = "another process (its pid is not in the lock file yet)"
    return DataDirLocked(
        f"data dir {data_dir} is in use by {who}: one process per data dir; stop it first",
        pid=pid,
        lock_file=str(data_dir / LOCK_FILE),
    )
