"""One ``Client`` shared by 100 threads against a real ``walship serve`` (issue 13 item 6):
no transport error (the issue saw ``EBADF`` from a shared connection pool), and every event
written is stored exactly once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from walship.client import Client
from walship.testing.process import NodeProcess

THREADS = 100
WRITES_PER_THREAD = 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path / "node", fsync="never", extra_args=["--role", "leader"]) as node:
        node.start()
        yield node


def test_a_client_shared_by_100_threads_stores_every_event_once(server: NodeProcess) -> None:
    errors: list[BaseException] = []
    written: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    with Client(server.url) as client:

        def work(n: int) -> None:
            try:
                start.wait(30)
                for i in range(WRITES_PER_THREAD):
                    event_id = str(uuid.uuid4())
                    client.append(f"t{n}", "load.written", {"i": i}, event_id=event_id)
                    with lock:
                        written.append(event_id)
                    if i % 5 == 0:  # reads share the pool too
                        client.entity_version(f"t{n}")
            except BaseException as exc:  # collected and reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert errors == [], errors[:3]
        stored = [e.id for e in client.iter_query(limit=1000)]
    assert len(stored) == THREADS * WRITES_PER_THREAD
    assert sorted(stored) == sorted(written)


def test_each_thread_has_its_own_pool_and_ended_threads_give_theirs_back() -> None:
    client = Client("http://127.0.0.1:9")
    pools: list[object] = []
    for _ in range(3):
        t = threading.Thread(target=lambda: pools.append(client._http))
        t.start()
        t.join()
    main = client._http
    assert len({id(p) for p in [*pools, main]}) == 4 and main is client._http
    assert all(p.is_closed for p in pools)  # type: ignore[attr-defined]
    client.close()
    assert main.is_closed
    refused: list[BaseException] = []

    def late() -> None:
        try:
            client._http  # noqa: B018 -- a new thread asks for its pool
        except RuntimeError as exc:
            refused.append(exc)

    t = threading.Thread(target=late)
    t.start()
    t.join()
    assert refused
