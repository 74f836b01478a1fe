"""The sustained benchmark's own checks (benchmarks/sustained.py): the log comparison that
decides whether the followers ended with the leader's log, the thread names its CPU per
thread relies on, and that a cluster whose start fails leaves no node running."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest

from walship.events import EventIn
from walship.store import Store, StoreConfig
from walship.testing.process import NodeProcess
from walship.wal import FsyncPolicy

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import replication  # noqa: E402
import sustained  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def _write_log(data_dir: Path, events: int) -> None:
    store = Store.open(StoreConfig(data_dir, fsync=FsyncPolicy.parse("never")))
    try:
        store.append_batch(
            [
                EventIn(
                    entity_id=f"e-{i % 7}",
                    event_type="bench.test",
                    payload=msgspec.Raw(msgspec.json.encode({"i": i})),
                )
                for i in range(events)
            ]
        )
    finally:
        store.close()


def _nodes(tmp_path: Path) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
    return (
        NodeProcess(tmp_path / "leader", node_id="leader"),
        NodeProcess(tmp_path / "follower-1", node_id="follower-1"),
        NodeProcess(tmp_path / "follower-2", node_id="follower-2"),
    )


def test_compare_logs_accepts_copies_and_names_the_follower_that_differs(tmp_path: Path) -> None:
    leader, same, other = _nodes(tmp_path)
    _write_log(leader.data_dir, 50)
    shutil.copytree(leader.data_dir, same.data_dir)
    shutil.copytree(leader.data_dir, other.data_dir)

    found = sustained.compare_logs(leader, [same, other])
    assert found["identical"] is True
    assert found["leader"]["last_lsn"] == 50
    assert found["follower-1"]["records_compared"] == 50
    assert found["follower-2"]["problem"] is None

    # a follower with a log of the same length but other records (other ids and times)
    shutil.rmtree(other.data_dir)
    _write_log(other.data_dir, 50)
    found = sustained.compare_logs(leader, [same, other])
    assert found["identical"] is False
    assert found["follower-1"]["problem"] is None
    assert found["follower-2"]["problem"] == "record 1 differs"
    assert found["follower-2"]["same_last_record"] is False


def test_compare_logs_refuses_a_follower_that_ends_early(tmp_path: Path) -> None:
    leader, short, _ = _nodes(tmp_path)
    _write_log(leader.data_dir, 30)
    shutil.copytree(leader.data_dir, short.data_dir)
    _write_log(leader.data_dir, 1)  # the leader went on; the follower stopped at lsn 30

    found = sustained.compare_logs(leader, [short])
    assert found["identical"] is False
    assert found["follower-1"]["problem"] == "the leader's WAL goes on at lsn 31"


def test_threads_carry_their_python_names_in_proc(tmp_path: Path) -> None:
    """The nodes load benchmarks/threadnames/sitecustomize.py: a thread's kernel name is its
    Python name without ``walship-`` (15 bytes), which is what CPU per thread is keyed by."""
    code = textwrap.dedent(
        """
        import threading
        names = []
        def read():
            tid = threading.get_native_id()
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        for name in ("walship-wal-writer", "walship-checkpointer", "asyncio_0"):
            t = threading.Thread(target=read, name=name)
            t.start()
            t.join()
        print(",".join(names))
        """
    )
    env = {"PYTHONPATH": str(BENCHMARKS / "threadnames"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "wal-writer,checkpointer,asyncio_0"


def test_by_thread_us_keeps_exited_threads_apart() -> None:
    before = {"total": 1.0, "threads": {1: ("main", 0.5), 2: ("wal-writer", 0.1)}, "children": {}}
    after = {
        "total": 3.0,
        "threads": {1: ("main", 1.5), 2: ("wal-writer", 0.3), 3: ("asyncio_0", 0.2)},
        "children": {9: ("python", 0.4)},
    }
    # 1,000,000 events: µs per event equals seconds of CPU
    found = sustained.by_thread_us(before, after, 1_000_000)
    assert found == {
        "main": 1.0,
        "exited": 0.2,  # 2.0 s in all, less the 1.8 s the sampled threads and child account for
        "child:python": 0.4,
        "wal-writer": 0.2,
        "asyncio_0": 0.2,
    }


def test_a_cluster_whose_start_fails_stops_the_nodes_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[NodeProcess] = []
    real_start = NodeProcess.start

    def start(self: NodeProcess, timeout_s: float = 30.0) -> NodeProcess:
        real_start(self, timeout_s)
        started.append(self)
        return self

    def add_follower(self: replication.Cluster, name: str, start: bool = True) -> NodeProcess:
        raise RuntimeError("the follower did not start")

    monkeypatch.setattr(NodeProcess, "start", start)
    monkeypatch.setattr(replication.Cluster, "add_follower", add_follower)
    with pytest.raises(RuntimeError, match="the follower did not start"):
        replication.Cluster(tmp_path / "c", "sync", 2)
    assert [n.node_id for n in started] == ["leader"]
    assert not started[0].running
