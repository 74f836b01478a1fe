"""One process per data dir (DESIGN invariant 9): whoever opens a data dir holds its lock.

In one process: a second ``Store`` on an open dir is refused naming this pid, ``close`` (and a
failed open) releases the lock. With real ``walship serve`` processes: a second server on the
same dir exits 1 with one line naming the first one's pid, and every write the first
acknowledged is there after a restart; an embedded ``Store.open`` of a running server's dir
is refused; a server killed with ``kill -9`` leaves no lock behind.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import query_all, write_events
from walship.dirlock import LOCK_FILE, DataDirLock, holder_pid
from walship.errors import CorruptionError, DataDirLocked
from walship.store import Store, StoreConfig
from walship.testing.process import NodeProcess
from walship.wal import FsyncPolicy

from .conftest import make_event


def open_store(path: Path) -> Store:
    return Store.open(StoreConfig(path, fsync=FsyncPolicy.parse("never")))


# ---------------------------------------------------------------------------------- in process


def test_a_second_store_on_an_open_data_dir_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first = open_store(data)
    receipt = first.append(make_event())
    assert (data / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert holder_pid(data) == os.getpid()
    mine = f"in use by an open Store of this process \\(pid {os.getpid()}\\)"
    with pytest.raises(DataDirLocked, match=mine) as caught:
        open_store(data)
    assert caught.value.details["pid"] == os.getpid()
    assert first.entity_version("acct-1") == 1  # the refused opener touched nothing
    first.close()
    assert holder_pid(data) is None
    assert (data / LOCK_FILE).read_text() == ""  # no pid of a process that holds nothing
    with open_store(data) as again:
        assert again.wal.written_lsn.value == receipt.lsn


def test_a_store_that_fails_to_open_leaves_the_data_dir_unlocked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "checkpoints").mkdir(parents=True)
    (data / "checkpoints" / "manifest.json").write_text("not json")
    with pytest.raises(CorruptionError):
        open_store(data)
    assert holder_pid(data) is None
    (data / "checkpoints" / "manifest.json").unlink()
    open_store(data).close()


def test_a_lock_taken_first_is_handed_to_the_store_and_released_by_close(tmp_path: Path) -> None:
    """``walship serve`` locks the dir before it binds its port, then hands the lock over."""
    data = tmp_path / "data"
    lock = DataDirLock.acquire(data)
    with pytest.raises(DataDirLocked):
        DataDirLock.acquire(data)
    store = Store.open(StoreConfig(data), dir_lock=lock)
    assert holder_pid(data) == os.getpid()
    store.close()
    assert not lock.held and holder_pid(data) is None


def test_a_close_interrupted_in_its_checkpoint_closes_the_wal_before_the_lock_goes(
    tmp_path: Path,
) -> None:
    """Ctrl-C while a clean stop checkpoints: the close ends with the WAL closed (its writer
    stopped) before the lock is released, so the next opener is never a second writer of a
    WAL that this store may still be writing."""
    data = tmp_path / "data"
    store = Store.open(StoreConfig(data, fsync=FsyncPolicy.parse("never"), checkpoints=True))
    receipt = store.append(make_event())

    def interrupted() -> None:
        raise KeyboardInterrupt

    store.checkpoint = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        store.close()
    assert store.wal.closing, "the lock was released with the WAL still open"
    assert holder_pid(data) is None
    with open_store(data) as again:
        assert again.wal.written_lsn.value == receipt.lsn


def test_a_look_at_the_lock_does_not_keep_a_store_from_opening(tmp_path: Path) -> None:
    """``holder_pid`` (``walship wal verify`` on the dir) holds a shared lock while it looks;
    an opener that comes just then waits the look out instead of failing to start."""
    data = tmp_path / "data"
    open_store(data).close()
    looking = os.open(data / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(looking, fcntl.LOCK_SH)  # what holder_pid holds for a moment
    done_looking = threading.Timer(0.05, os.close, [looking])
    done_looking.start()
    try:
        with open_store(data):
            assert holder_pid(data) == os.getpid()
    finally:
        done_looking.join()
    with open_store(data), pytest.raises(DataDirLocked):
        open_store(data)  # while the dir is open, a second opener is still refused


# ---------------------------------------------------------------------------------- processes


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path / "data", log_path=tmp_path / "first.log") as node:
        yield node.start()


def pid_of(node: NodeProcess) -> int:
    assert node.process is not None
    return node.process.pid


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_second_server_on_the_same_data_dir_is_refused_and_the_first_keeps_every_write(
    tmp_path: Path, server: NodeProcess
) -> None:
    acked = write_events(server, 300)
    second = NodeProcess(server.data_dir, node_id="second", log_path=tmp_path / "second.log")
    with second:
        second.spawn()
        assert second.wait_exit(30) == 1
    lines = [line for line in second.log().splitlines() if line.strip()]
    assert lines == [
        f"walship: cannot start: data dir {server.data_dir.resolve()} is in use by pid "
        f"{pid_of(server)}: one process per data dir; stop it first"
    ]
    acked += write_events(server, 200, start=300)  # the first server never noticed
    assert server.stop() == 0
    with NodeProcess(server.data_dir, log_path=tmp_path / "restart.log") as restarted:
        restarted.start()
        assert [e["lsn"] for e in query_all(restarted)] == acked == list(range(1, 501))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_embedded_store_cannot_open_a_running_servers_data_dir(
    server: NodeProcess,
) -> None:
    write_events(server, 10)
    with pytest.raises(DataDirLocked, match=f"in use by pid {pid_of(server)}") as caught:
        open_store(server.data_dir)
    assert caught.value.details["pid"] == pid_of(server)
    assert holder_pid(server.data_dir) == pid_of(server)
    assert len(write_events(server, 10, start=10)) == 10


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_server_killed_with_sigkill_leaves_no_lock_behind(
    tmp_path: Path, server: NodeProcess
) -> None:
    acked = write_events(server, 100)  # fsync always: each acknowledged write is on disk
    server.kill()
    assert (server.data_dir / LOCK_FILE).read_text() == f"{pid_of(server)}\n"  # a dead pid
    assert holder_pid(server.data_dir) is None  # the kernel dropped the lock with the process
    with NodeProcess(server.data_dir, log_path=tmp_path / "after-kill.log") as restarted:
        restarted.start()
        assert holder_pid(server.data_dir) == pid_of(restarted)
        assert [e["lsn"] for e in query_all(restarted)] == acked
