"""Checkpoints and merges in a worker process (issue 15, item 4): the worker writes the part
and the store installs it; a worker killed before or while it writes fails that checkpoint or
merge cleanly -- the manifest, the files, the memtable and every answer stay as they were --
and the next one runs in a new worker; a worker whose node was killed exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from tests.conftest import make_event
from tests.test_storage_faults import small_disk  # noqa: F401  (the fixture: an 8 MiB tmpfs)
from walship.errors import IdConflict, StorageError
from walship.limits import Limits
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(
        StoreConfig(
            tmp_path / "data",
            fsync=FsyncPolicy.parse("never"),
            limits=Limits(compaction_fanin_min=2, parquet_row_group_rows=32),
            checkpoints=False,  # no background compactor: the test merges
            part_worker=True,
        )
    )
    try:
        yield s
    finally:
        s.close()


def _parts(store: Store, count: int, events: int) -> None:
    for p in range(count):
        store.append_batch(
            [make_event(f"e{i % 7}", payload={"p": p, "i": i}) for i in range(events)]
        )
        store.checkpoint()


def _answers(store: Store) -> list[object]:
    out: list[object] = []
    cursor = None
    while True:
        page = store.query(QueryFilter(), limit=10_000, cursor=cursor)
        out.extend(msgspec.to_builtins(e) for e in page.events)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def _files(store: Store) -> set[str]:
    return {p.name for p in store.parts_dir.iterdir()}


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def test_the_worker_process_writes_the_merged_part(store: Store) -> None:
    _parts(store, 3, 40)
    before = _answers(store)
    worker = store.core.part_worker
    assert worker is not None
    pid = worker.pid()
    assert pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) > os.getpriority(os.PRIO_PROCESS, 0)
    # checkpoints have a worker of their own, at the node's priority (see the test below)
    checkpointer = worker.pid("checkpoint")
    assert checkpointer not in (pid, os.getpid())
    assert os.getpriority(os.PRIO_PROCESS, checkpointer) == os.getpriority(os.PRIO_PROCESS, 0)
    merged = store.compact()
    assert merged is not None and merged.events == 120
    assert [p.file for p in store.manifest.parts] == [merged.file]
    assert _files(store) == {merged.file}
    assert _answers(store) == before
    assert store.stats()["compaction_events_written"] == 120
    # the store's id index of the merged part came along: a reused id is still found
    first = store.query(QueryFilter(), limit=1).events[0]
    with pytest.raises(IdConflict):
        store.append(make_event("another", id=uuid.UUID(bytes=first.id)))


def test_a_killed_worker_fails_one_merge_and_the_next_runs_in_a_new_one(store: Store) -> None:
    _parts(store, 3, 40)
    before, manifest, files = _answers(store), store.manifest, _files(store)
    worker = store.core.part_worker
    assert worker is not None
    first = worker.pid()
    _kill(first)
    with pytest.raises(StorageError, match="worker process died"):
        store.compact()
    assert store.manifest == manifest
    assert _files(store) == files
    assert _answers(store) == before
    merged = store.compact()
    assert merged is not None and merged.events == 120
    assert worker.pid() != first
    assert _answers(store) == before
    assert _files(store) == {merged.file}


def _kill_while_it_writes(
    store: Store, action: Callable[[], object], lane: str = "merge"
) -> BaseException:
    """Run ``action`` in a thread, SIGKILL the ``lane`` worker once a ``.tmp`` part appears,
    and return what ``action`` raised."""
    worker = store.core.part_worker
    assert worker is not None
    pid = worker.pid(lane)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(n.endswith(".tmp") for n in _files(store)) and thread.is_alive():
        assert time.monotonic() < deadline, "the worker never started writing"
        time.sleep(0.001)
    assert thread.is_alive(), "the part was written before the worker could be killed"
    _kill(pid)
    thread.join(60)
    assert len(failure) == 1, failure
    return failure[0]


def test_a_worker_killed_while_it_merges_leaves_no_file_and_no_change(store: Store) -> None:
    """The merge fails, the half-written file is gone, the manifest and the answers are
    unchanged; the merge then succeeds in a new worker."""
    _parts(store, 4, 3_000)
    before, manifest, files = _answers(store), store.manifest, _files(store)
    assert isinstance(_kill_while_it_writes(store, store.compact), StorageError)
    assert store.manifest == manifest
    assert _files(store) == files
    assert _answers(store) == before
    while store.compact() is not None:
        pass
    assert len(store.manifest.parts) == 1
    assert _answers(store) == before


def test_a_worker_killed_while_it_checkpoints_keeps_the_events_in_memory(store: Store) -> None:
    """The checkpoint fails and its events stay in the memtable (every answer unchanged, no
    file left); the next checkpoint writes them through a new worker."""
    _parts(store, 1, 100)
    for b in range(3):
        store.append_batch(
            [make_event(f"e{i % 7}", payload={"b": b, "i": i}) for i in range(4_000)]
        )
    before, manifest, files = _answers(store), store.manifest, _files(store)
    assert isinstance(_kill_while_it_writes(store, store.checkpoint, "checkpoint"), StorageError)
    assert store.manifest == manifest
    assert _files(store) == files
    assert store.stats()["memtable_events"] == 12_000
    assert _answers(store) == before
    part = store.checkpoint()
    assert part is not None and part.events == 12_000
    assert store.stats()["memtable_events"] == 0
    assert _answers(store) == before
    assert store.checkpoint_failure is None


def test_the_worker_exits_when_its_node_is_killed(tmp_path: Path) -> None:
    """``kill -9`` of the node cannot stop the worker; the worker notices and exits."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from walship.store import Store, StoreConfig\n"
        "s = Store.open(StoreConfig(Path(sys.argv[1]), checkpoints=False, part_worker=True))\n"
        "print(s.core.part_worker.pid(), flush=True)\n"
        "time.sleep(600)\n"
    )
    node = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "data")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert node.stdout is not None
        worker = int(node.stdout.readline())
        os.kill(worker, 0)  # it runs
    finally:
        node.kill()
        node.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the Parquet worker outlived its node by 30 s")


@pytest.mark.parametrize("part_worker", [False, True], ids=["in-process", "worker"])
def test_a_checkpoint_or_merge_on_a_full_disk_changes_nothing_and_leaves_no_file(
    small_disk: Path,  # noqa: F811  (the fixture imported above)
    part_worker: bool,
) -> None:
    """A full disk fails a checkpoint written by the worker as it fails one written by the
    node itself: the error reaches the caller and ``checkpoint_failure``, the events stay in
    the memtable (every answer unchanged), nothing is left in the parts directory to hold
    the space, and the checkpoint is written once space is back; a merge likewise fails with
    nothing changed and no half-written part left (pyarrow removes a checkpoint's own, not a
    merge's), and is done once space is back."""
    store = Store.open(
        StoreConfig(
            small_disk / "data",
            fsync=FsyncPolicy.parse("never"),
            limits=Limits(segment_bytes_max=1 << 20, compaction_fanin_min=2),
            checkpoints=False,
            part_worker=part_worker,
        )
    )
    filler = small_disk / "filler"
    try:
        _append_random(store, 3)  # ~2.5 MB of WAL
        before, manifest, files = _answers(store), store.manifest, _files(store)
        _fill_disk(filler)
        with pytest.raises(OSError, match="No space left"):
            store.checkpoint()
        failure = store.checkpoint_failure
        assert failure is not None and "No space left" in failure.error
        assert store.manifest == manifest
        assert _files(store) == files  # nothing half-written holds the space
        assert store.stats()["memtable_events"] == 3000
        assert _answers(store) == before
        filler.unlink()
        part = store.checkpoint()
        assert part is not None and part.events == 3000
        assert store.checkpoint_failure is None
        assert _answers(store) == before

        _append_random(store, 3)  # a part of the first one's size: the two merge
        store.checkpoint()
        before, manifest, files = _answers(store), store.manifest, _files(store)
        assert len(manifest.parts) == 2
        _fill_disk(filler)
        with pytest.raises(OSError, match="No space left"):
            store.compact()
        assert store.manifest == manifest
        assert _files(store) == files
        assert _answers(store) == before
        filler.unlink()
        merged = store.compact()
        assert merged is not None and merged.events == 6000
        assert _answers(store) == before
    finally:
        store.close()


def _append_random(store: Store, batches: int) -> None:
    """Batches of 1,000 events of ~800 bytes that hardly compress."""
    for _ in range(batches):
        store.append_batch(
            [make_event(f"e{i % 7}", payload={"r": os.urandom(400).hex()}) for i in range(1000)]
        )


def _fill_disk(filler: Path) -> None:
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\x01" * (16 << 10)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def _gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def test_a_clean_stop_ends_both_workers_and_checkpoints_without_starting_one(
    tmp_path: Path,
) -> None:
    """Closing the store waits for the workers and ends them; its last checkpoint is written
    in the node itself when no checkpoint worker runs (no process started just to stop), and
    through the worker when one does."""
    config = StoreConfig(tmp_path / "a", fsync=FsyncPolicy.parse("never"), part_worker=True)
    store = Store.open(config)
    worker = store.core.part_worker
    assert worker is not None
    store.append_batch([make_event(f"e{i % 3}") for i in range(50)])
    store.close()
    assert not any(lane.running for lane in worker._lanes.values())
    again = Store.open(StoreConfig(tmp_path / "a", fsync=FsyncPolicy.parse("never")))
    try:
        assert again.manifest.last_lsn == 50 and again.stats()["memtable_events"] == 0
    finally:
        again.close()

    store = Store.open(
        StoreConfig(tmp_path / "b", fsync=FsyncPolicy.parse("never"), part_worker=True)
    )
    worker = store.core.part_worker
    assert worker is not None
    pids = [worker.pid("checkpoint"), worker.pid("merge")]
    store.append_batch([make_event(f"e{i % 3}") for i in range(50)])
    store.close()
    assert all(_gone(pid) for pid in pids), pids
    again = Store.open(StoreConfig(tmp_path / "b", fsync=FsyncPolicy.parse("never")))
    try:
        assert again.manifest.last_lsn == 50
    finally:
        again.close()
