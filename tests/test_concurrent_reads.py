"""Queries from many threads at once over Parquet parts, while checkpoints and merges run.

pyarrow's ``ParquetFile`` is not safe to read from several threads: one shared reader per part
answered 500s (``ReadRangeCache did not find matching cache entry``) and then crashed the
whole node with a segmentation fault within a second under eight concurrent query clients.
These tests hammer a real ``walship serve`` and a real embedded ``Store`` the same way.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import event, post_batch, query_all, wait_until
from tests.conftest import make_event
from walship.limits import Limits
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.testing.process import NodeProcess
from walship.wal import FsyncPolicy

READERS = 8
READ_FOR_S = 6.0


@pytest.fixture
def busy_node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node that checkpoints every 250 events and merges every few parts, started empty."""
    args = ["--memtable-events-max", "250", "--checkpoint-interval-ms", "500"]
    args += ["--compaction-fanin-min", "2"]
    with NodeProcess(tmp_path / "data", fsync="never", extra_args=args) as node:
        node.start()
        yield node


def _hammer(url: str, stop: threading.Event, seen: Counter[str], errors: list[str], n: int) -> None:
    """Query in a loop until ``stop``: the whole log from the start, one entity, one type."""
    params: list[dict[str, Any]] = [
        {"from_lsn": 1, "limit": 100},
        {"entity_id": f"acct-{n % 16:03d}", "limit": 200},
        {"event_type": "acct.debited", "from_lsn": 500, "limit": 100},
    ]
    with httpx.Client(timeout=30.0) as client:
        i = 0
        while not stop.is_set():
            try:
                response = client.get(f"{url}/api/v1/events/query", params=params[i % 3])
            except httpx.HTTPError as exc:  # the node died under us
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            seen[str(response.status_code)] += 1
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")
            i += 1


def test_concurrent_queries_over_parts_never_crash_a_node(busy_node: NodeProcess) -> None:
    """Eight clients query at once while a writer makes checkpoints and merges happen: every
    answer is a 200 and the node is still alive and serving at the end."""
    node = busy_node
    with httpx.Client(timeout=30.0) as client:
        for first in range(0, 3_000, 500):
            post_batch(client, node.url, [event(i) for i in range(first, first + 500)])
    wait_until(
        lambda: client_stats(node)["parquet_parts"] >= 2, 30, "the first checkpoints to land"
    )
    stop = threading.Event()
    seen: Counter[str] = Counter()
    errors: list[str] = []
    readers = [
        threading.Thread(target=_hammer, args=(node.url, stop, seen, errors, n))
        for n in range(READERS)
    ]
    for thread in readers:
        thread.start()
    written = 3_000
    try:
        # keep checkpointing (and so merging) while the readers run
        deadline = time.monotonic() + READ_FOR_S
        with httpx.Client(timeout=30.0) as client:
            while time.monotonic() < deadline and not errors:
                post_batch(client, node.url, [event(i) for i in range(written, written + 250)])
                written += 250
    finally:
        stop.set()
        for thread in readers:
            thread.join(60)
    assert node.running, f"the node died: {node.log()[-2000:]}"
    assert not errors, f"{len(errors)} failed queries ({dict(seen)}), first: {errors[0]}"
    assert seen["200"] > 0
    after = client_stats(node)
    assert after["checkpoints_taken"] >= 4 and after["compactions"] >= 1, after
    # and the answers are still right: every event, once, in order
    assert [e["lsn"] for e in query_all(node)] == list(range(1, written + 1))


def client_stats(node: NodeProcess) -> dict[str, Any]:
    with httpx.Client(timeout=30.0) as client:
        body: dict[str, Any] = client.get(f"{node.url}/api/v1/stats").json()
    return body


def test_store_reads_one_part_from_many_threads(tmp_path: Path) -> None:
    """The embedded store: threads querying the same parts at once, while checkpoints and
    compaction replace them, all get the right events."""
    limits = Limits(memtable_events_max=200, compaction_fanin_min=2, parquet_row_group_rows=64)
    store = Store.open(
        StoreConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never"), limits=limits)
    )
    try:
        store.append_batch([make_event(f"e{i % 5}", payload={"i": i}) for i in range(1_000)])
        store.checkpoint()
        errors: list[BaseException] = []
        stop = threading.Event()

        def read(n: int) -> None:
            flt = [QueryFilter(), QueryFilter(entity_id=f"e{n % 5}"), QueryFilter(from_lsn=300)]
            try:
                while not stop.is_set():
                    result = store.query(flt[n % 3], 1_000)
                    lsns = [ev.lsn for ev in result.events]
                    assert lsns == sorted(set(lsns)) and lsns, lsns[:5]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(n,)) for n in range(READERS)]
        for thread in threads:
            thread.start()
        try:
            for round_ in range(8):
                if errors:
                    break
                base = 1_000 + round_ * 100
                store.append_batch([make_event("e1", payload={"i": base + i}) for i in range(100)])
                store.checkpoint()
                store.compact()
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert not errors, repr(errors[0])
        assert store.compactions >= 1
        assert [ev.lsn for ev in store.query(QueryFilter(), 10_000).events] == list(range(1, 1_801))
    finally:
        store.close()
