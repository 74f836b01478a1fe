"""A subscription and a log cut that happen at once: the cut record (``LogCuts``) brackets the
cut like a sequence lock, so a page read while the log was cut is dropped and read again, and
a stream that had already sent past the cut ends with a ``CutNotice``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from walship.events import EventIn
from walship.http.stream import CutNotice, SharedPage, Subscriptions
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.position import Lsn
from walship.sse import ResumePoint
from walship.storage.cuts import LogCuts
from walship.storage.query import QueryFilter
from walship.wal import FsyncPolicy

LIMITS = Limits(subscription_heartbeat_ms=200)


def events(tag: str, count: int) -> list[EventIn]:
    return [
        EventIn(entity_id=f"e-{i}", event_type="t.x", payload=msgspec.Raw(b'"%s"' % tag.encode()))
        for i in range(count)
    ]


def test_log_cuts_report_the_lowest_cut_a_reader_missed() -> None:
    cuts = LogCuts()
    seen = cuts.seq
    assert cuts.lowest_since(seen) is None
    with cuts.cutting(70):
        assert cuts.seq % 2 == 1 and cuts.lowest_since(seen) == 70
        during = cuts.seq
    assert cuts.lowest_since(during) == 70  # seen while it ran: still missed
    with cuts.cutting(40):
        pass
    assert cuts.lowest_since(seen) == 40
    assert cuts.lowest_since(during + 1) == 40
    assert cuts.lowest_since(cuts.seq) is None


def pages_of(got: Any) -> list[str]:
    out = []
    for page in got:
        if isinstance(page, CutNotice):
            continue
        evs = page.events if isinstance(page, SharedPage) else page
        out += [msgspec.json.decode(e.payload) for e in evs]
    return out


@pytest.mark.parametrize("after_cut", [False, True])
def test_a_page_read_while_the_log_is_cut_is_never_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_cut: bool
) -> None:
    """50 events, read; 10 more are written; the read of those 10 overlaps a repair that cuts
    them away and writes 5 others in their place. The stream sends the 5, never the 10. A
    stream that had already sent the 10 ends with a CutNotice instead."""
    node = Node.open(NodeConfig(tmp_path / "d", fsync=FsyncPolicy.parse("never"), limits=LIMITS))
    store = node.store
    try:
        store.append_batch(events("kept", 50))

        async def run() -> list[Any]:
            subscriptions = Subscriptions(node)
            gen = subscriptions.pages(QueryFilter(), ResumePoint(0), store.cuts.seq)
            got = [await anext(gen)]
            store.append_batch(events("cut", 10))
            if after_cut:
                got.append(await anext(gen))  # the stream sends the 10
            query = store.query
            recent = store.recent_events  # the live tail's read, on the loop
            calls = []

            def cut_after(read: Any, from_lsn: int) -> Any:
                if not calls:  # the first read overlaps the repair
                    with store.cuts.cutting(50):
                        store.truncate_after(Lsn(50))
                    store.append_batch(events("new", 5))
                calls.append(from_lsn)
                return read

            def cut_during(flt: Any, limit: Any = None, cursor: Any = None) -> Any:
                return cut_after(query(flt, limit, cursor), flt.from_lsn)

            def cut_during_recent(after: int, to_lsn: int, limit: int, **kw: Any) -> Any:
                return cut_after(recent(after, to_lsn, limit, **kw), after + 1)

            monkeypatch.setattr(store, "query", cut_during)
            monkeypatch.setattr(store, "recent_events", cut_during_recent)
            if after_cut:
                store.append_batch(events("more", 1))  # wakes the stream into the cut read
            while True:
                page = await asyncio.wait_for(anext(gen), 10)
                got.append(page)
                if isinstance(page, CutNotice) or pages_of(got).count("new") == 5:
                    break
            await gen.aclose()
            return got

        got = asyncio.run(run())
    finally:
        node.close()
    if after_cut:
        assert isinstance(got[-1], CutNotice)
        assert got[-1].error.details == {"kept_lsn": 50, "last_event_lsn": 60}
        assert pages_of(got[:-1]) == ["kept"] * 50 + ["cut"] * 10
    else:
        assert pages_of(got) == ["kept"] * 50 + ["new"] * 5, got[-1]
