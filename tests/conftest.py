from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from walship.events import EventIn
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy


def make_event(entity: str = "acct-1", etype: str = "acct.credited", **kw: object) -> EventIn:
    payload = kw.pop("payload", {"amount": 1})
    return EventIn(
        entity_id=entity,
        event_type=etype,
        payload=msgspec.Raw(msgspec.json.encode(payload)),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(StoreConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never")))
    try:
        yield s
    finally:
        s.close()
