"""A process that forks with a ``Store`` or a history pin open (a worker pool, a daemon that
forks): the child inherits the objects, never the data dir. It keeps no copy of the dir's
lock after the parent closes, it cannot cut the parent's WAL or checkpoint the parent's
memtable by leaving a ``with Store.open(...)`` block, and it cannot delete the parent's pin.

Each child is a real ``os.fork`` that does one thing and ``os._exit``s with what it saw.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import make_event
from walship import history
from walship.dirlock import holder_pid
from walship.errors import Unavailable
from walship.limits import Limits
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

CHILD_TIMEOUT_S = 60.0


def open_store(path: Path, *, checkpoints: bool = False) -> Store:
    return Store.open(
        StoreConfig(
            path,
            fsync=FsyncPolicy.parse("never"),
            checkpoints=checkpoints,
            limits=Limits(compaction_fanin_min=2),
        )
    )


def fork(child: Callable[[], int]) -> tuple[int, int, int]:
    """Fork; the child waits for a byte on a pipe, runs ``child`` and exits with its result.
    Returns (pid, the pipe's write end, a read end the child closes when it is done)."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child
        code = 1
        try:
            os.close(go_w)
            os.close(done_r)
            os.read(go_r, 1)
            code = child()
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(done_w)
    return pid, go_w, done_r


def finish(pid: int, go_w: int, done_r: int) -> int:
    """Let the child run; its exit code (AssertionError when it does not end in time)."""
    os.write(go_w, b"x")
    os.close(go_w)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            waited, status = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError(f"the forked child did not finish in {CHILD_TIMEOUT_S} s")
    finally:
        os.close(done_r)


def test_a_forked_child_keeps_no_copy_of_the_data_dir_lock(tmp_path: Path) -> None:
    """The child lives on (a worker) after the parent closed its store: the parent, or any
    other process, opens the dir again at once."""
    data = tmp_path / "data"
    store = open_store(data)
    store.append(make_event())
    pid, go_w, done_r = fork(lambda: 0)
    try:
        store.close()
        assert holder_pid(data) is None, "a forked child still holds the data dir's lock"
        with open_store(data) as again:
            assert again.wal.written_lsn.value == 1
    finally:
        assert finish(pid, go_w, done_r) == 0


def test_a_forked_child_leaving_the_store_does_not_touch_the_parents_dir(
    tmp_path: Path,
) -> None:
    """The child writes, then closes its copy of the store (the end of a ``with`` block),
    after the parent wrote more: its write is refused at once (no WAL writer survived the
    fork: it would wait for ever), and its close neither checkpoints nor closes the WAL,
    which would cut the segment back to the end the child knows."""
    data = tmp_path / "data"
    store = open_store(data)
    store.append_batch([make_event() for _ in range(5)])

    def child() -> int:
        try:
            store.append(make_event())
        except Unavailable as exc:
            refused = "a forked process cannot write" in exc.message
        else:
            return 2
        store.close()
        return 0 if refused else 3

    pid, go_w, done_r = fork(child)
    try:
        store.append_batch([make_event() for _ in range(7)])  # after the fork
        store.wal.sync()
    finally:
        assert finish(pid, go_w, done_r) == 0
    store.append_batch([make_event() for _ in range(3)])
    store.close()
    with open_store(data) as again:
        assert again.stats()["events"] == 15
        assert again.wal.written_lsn.value == 15


def test_a_forked_child_cannot_delete_the_parents_history_pin(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open_store(data) as store:
        for _ in range(2):
            store.append_batch([make_event() for _ in range(10)])
            store.checkpoint()
        snap = history.open_snapshot(data)
        try:

            def child() -> int:
                snap.close()
                return 0

            assert finish(*fork(child)) == 0
            assert all(f.exists() for f in snap.files), "the child deleted the parent's pin"
            assert store.compact() is not None  # deletes the parts' names in parts/
            assert snap.dataset().count_rows() == 20
        finally:
            snap.close()
        assert not snap.files[0].parent.exists()
