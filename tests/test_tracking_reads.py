"""A consumer's tracked position read while writes go on (review of the tracking read path)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.conftest import make_event
from tests.test_tracking import append, open_store, track
from walship.storage.consumers import ConsumerPosition
from walship.store import StoreCore


def test_a_consumer_read_racing_writes_never_loses_the_consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader takes the visible lsn, then (before it looks at the table) the consumer
    tracks again and a later tracking trims the undo log: the consumer was answered as
    unknown (a 404), which a worker takes as "start from the beginning"."""
    store = open_store(tmp_path)
    try:
        append(store, [make_event(tenant_id="t1")], track(1))
        took_visible = threading.Event()
        writes_done = threading.Event()
        real = StoreCore.visible_lsn.fget
        assert real is not None

        def visible_lsn(self: StoreCore) -> int:
            value = real(self)
            if threading.current_thread().name == "reader" and not took_visible.is_set():
                took_visible.set()
                # read under the store lock, the writes below wait for this reader instead
                writes_done.wait(1.0)
            return value

        monkeypatch.setattr(StoreCore, "visible_lsn", property(visible_lsn))
        answers: list[ConsumerPosition | None] = []
        reader = threading.Thread(
            target=lambda: answers.append(store.consumer_position("t1", "proj")), name="reader"
        )
        reader.start()
        assert took_visible.wait(10)
        append(store, [], track(2))
        append(store, [], track(1, consumer="other"))  # its apply trims the undo log
        writes_done.set()
        reader.join(10)
        (found,) = answers
        assert found is not None and found.consumer == "proj" and found.position in (1, 2)
    finally:
        store.close()
