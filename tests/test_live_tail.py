"""The live tail that caught-up subscriptions share (``http/live_tail.py``), in one process:
each commit is read once and its frames built once per filter, whatever the number of
streams; every stream still gets exactly what its filter matches, in lsn order, once; a
stream whose filter a commit does not match is not woken for it; a stream that falls
further behind than the ring reads the store and joins the tail again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from walship.events import EventIn, StoredEvent
from walship.http.live_tail import LiveTail, Segment, TailPage
from walship.http.stream import CutNotice, Page, Subscriptions
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.sse import ResumePoint, encode_event
from walship.storage.query import QueryFilter
from walship.wal import FsyncPolicy

LIMITS = Limits(subscription_heartbeat_ms=30_000, subscription_page_events=50)
WAIT_S = 30.0  # a loaded machine is slow, never this slow


def batch(count: int, tenant: str = "default", entity: str = "e", start: int = 0) -> list[EventIn]:
    return [
        EventIn(
            entity_id=f"{entity}-{i % 3}",
            event_type="t.even" if i % 2 == 0 else "u.odd",
            tenant_id=tenant,
            payload=msgspec.Raw(b'{"i": %d}' % i),
        )
        for i in range(start, start + count)
    ]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node.open(NodeConfig(tmp_path / "d", fsync=FsyncPolicy.parse("never"), limits=LIMITS))
    try:
        yield n
    finally:
        n.close()


class Follower:
    """One subscription's pages, pulled by a task into ``lsns`` and ``frames``."""

    def __init__(self, subs: Subscriptions, flt: QueryFilter, after: int = 0) -> None:
        self.flt = flt
        self.after = after
        self.lsns: list[int] = []
        self.frames: list[bytes] = []  # what a tail page sent, piece by piece
        self.pages: AsyncGenerator[Page, None] = subs.pages(
            flt, ResumePoint(after), subs.node.store.cuts.seq, sse=True
        )
        self.task = asyncio.ensure_future(self._pull())

    async def _pull(self) -> None:
        async for page in self.pages:
            assert not isinstance(page, CutNotice)
            if isinstance(page, TailPage):
                self.frames += page.frames()
                self.lsns += [ev.lsn for ev in page.events]
            elif isinstance(page, list):
                self.lsns += [ev.lsn for ev in page]
            else:  # a history page of frames (unfiltered streams)
                for span in page.spans:
                    self.lsns += [
                        int(x.split(b":")[0]) for x in bytes(span.data).split(b"id: ")[1:]
                    ]

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.pages.aclose()


async def until(check: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def matching(node: Node, flt: QueryFilter) -> list[int]:
    return [ev.lsn for ev in node.store.query(flt, 10_000).events]


def test_streams_with_different_filters_get_exactly_their_matches_from_shared_frames(
    node: Node,
) -> None:
    """Twelve caught-up streams, three per filter (everything, a tenant, one entity, a type
    prefix), while batches for two tenants commit: each stream gets what a query with its
    filter returns, in order, once; streams with one filter are sent the same bytes (one
    object, built once), and the tail reads each commit once."""
    filters = [
        QueryFilter(),
        QueryFilter(tenant_id="blue"),
        QueryFilter(tenant_id="default", entity_id="e-1"),
        QueryFilter(event_type_prefix="u."),
    ]

    async def run() -> tuple[list[Follower], LiveTail]:
        await node.start()
        subs = Subscriptions(node)
        try:
            node.store.append_batch(batch(10))
            followers = [Follower(subs, flt) for flt in filters for _ in range(3)]
            await until(lambda: subs.tail.live == 12, "every stream to join the tail")
            reads = subs.tail.reads
            commits = 0
            for n in range(8):
                node.store.append_batch(batch(7, tenant="blue" if n % 2 else "default", start=n))
                commits += 1
                await asyncio.sleep(0.005 * (n % 3))  # some commits come together
            last = node.store.visible_lsn
            for f in followers:
                want = [lsn for lsn in matching(node, f.flt) if lsn <= last]
                await until(lambda f=f, want=want: f.lsns == want, f"the stream of {f.flt}")
            assert 1 <= subs.tail.reads - reads <= commits
            for f in followers:
                await f.close()
            return followers, subs.tail
        finally:
            await node.stop()

    followers, tail = asyncio.run(run())
    assert tail.live == 0
    for n, flt in enumerate(filters):
        same = followers[3 * n : 3 * n + 3]
        assert same[0].frames, flt
        for other in same[1:]:
            assert len(other.frames) == len(same[0].frames)
            # every stream with this filter got each piece of the tail as the same object
            assert all(a is b for a, b in zip(other.frames, same[0].frames, strict=True))


def test_a_stream_whose_filter_a_commit_does_not_match_is_not_woken(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fifty idle streams (a tenant nobody writes) wait while twenty commits go to another
    tenant: none of them is woken (the hub selects once for their filter and moves them past
    what it skipped); the first event of their tenant wakes all fifty, and each gets it."""
    wakes: list[int] = []
    take = LiveTail.take

    def counting(self: LiveTail, after: int, flt: QueryFilter, *args: Any) -> Any:
        if flt.tenant_id == "quiet":
            wakes.append(after)
        return take(self, after, flt, *args)

    monkeypatch.setattr(LiveTail, "take", counting)

    async def run() -> tuple[list[Follower], int]:
        await node.start()
        subs = Subscriptions(node)
        try:
            node.store.append_batch(batch(5))
            quiet = [Follower(subs, QueryFilter(tenant_id="quiet")) for _ in range(50)]
            loud = Follower(subs, QueryFilter(tenant_id="default"))
            await until(lambda: subs.tail.live == 51, "every stream to join the tail")
            await until(lambda: len(wakes) >= 50, "the quiet streams to wait")
            await asyncio.sleep(0.05)
            before = len(wakes)
            for n in range(20):
                node.store.append_batch(batch(3, start=n))
            visible = node.store.visible_lsn
            await until(lambda: loud.lsns[-1:] == [visible], "the loud stream")
            woken_by_others = len(wakes) - before
            (receipt,) = node.store.append_batch(batch(1, tenant="quiet"))
            for f in quiet:
                await until(lambda f=f: f.lsns == [receipt.lsn], "a quiet stream's event")
            for f in [*quiet, loud]:
                await f.close()
            return quiet, woken_by_others
        finally:
            await node.stop()

    quiet, woken_by_others = asyncio.run(run())
    assert woken_by_others == 0
    assert all(f.lsns == quiet[0].lsns for f in quiet)


def test_a_stream_behind_the_ring_reads_the_store_and_joins_the_tail_again(
    tmp_path: Path,
) -> None:
    """A ring of 30 events; one stream is not read from while 200 events commit in batches
    of 10 (another stream keeps the tail running): read again, it gets all 200 in order,
    once -- the part the ring dropped from the store -- and then follows the tail again."""
    limits = Limits(subscription_tail_events_max=30, subscription_page_events=10)
    node = Node.open(NodeConfig(tmp_path / "d", fsync=FsyncPolicy.parse("never"), limits=limits))

    async def run() -> tuple[list[int], list[int], bool]:
        await node.start()
        subs = Subscriptions(node)
        try:
            node.store.append_batch(batch(5))
            keeper = Follower(subs, QueryFilter())
            slow = subs.pages(QueryFilter(), ResumePoint(0), node.store.cuts.seq)
            got: list[int] = []
            while not got or got[-1] < 5:  # history
                page = await anext(slow)
                assert isinstance(page, list)
                got += [ev.lsn for ev in page]
            await until(lambda: subs.tail.live == 1, "the keeper to join")
            joined = asyncio.ensure_future(anext(slow))  # joins the tail, then waits
            await until(lambda: subs.tail.live == 2, "the slow stream to join")
            for n in range(20):
                node.store.append_batch(batch(10, start=n))
            await until(lambda: keeper.lsns[-1:] == [205], "the keeper to read everything")
            assert subs.tail.base > 5  # the ring has dropped what the slow stream needs
            assert subs.tail.fell_behind == 0
            page = await joined
            read_the_store = False
            while True:
                assert not isinstance(page, CutNotice)
                read_the_store = read_the_store or isinstance(page, list)
                got += [ev.lsn for ev in (page.events if isinstance(page, TailPage) else page)]
                if got[-1] == 205:
                    assert subs.tail.fell_behind == 1
                    break
                page = await asyncio.wait_for(anext(slow), WAIT_S)
            more = node.store.append_batch(batch(1))[0].lsn
            page = await asyncio.wait_for(anext(slow), WAIT_S)
            assert isinstance(page, TailPage) and [ev.lsn for ev in page.events] == [more]
            await slow.aclose()
            await keeper.close()
            return got, keeper.lsns, read_the_store
        finally:
            await node.stop()

    try:
        got, kept, read_the_store = asyncio.run(run())
    finally:
        node.close()
    assert got == list(range(1, 206))
    assert kept[:205] == list(range(1, 206))  # and maybe the last one, 206
    assert read_the_store


def test_streams_joining_while_writes_run_get_every_event_once(node: Node) -> None:
    """Streams start from several positions while a writer commits batches of every size:
    each gets exactly the events after its start, in lsn order, across its switch from the
    store to the tail."""

    async def run() -> list[tuple[int, list[int]]]:
        await node.start()
        subs = Subscriptions(node)
        try:
            node.store.append_batch(batch(40))
            writing = asyncio.ensure_future(
                asyncio.to_thread(
                    lambda: [node.store.append_batch(batch(1 + n % 60, start=n)) for n in range(60)]
                )
            )
            followers: list[Follower] = []
            while not writing.done():
                after = node.store.visible_lsn // 2
                followers.append(Follower(subs, QueryFilter(), after))
                await asyncio.sleep(0.01)
            await writing
            last = node.store.visible_lsn
            for f in followers:
                await until(lambda f=f: f.lsns[-1:] == [last], "a stream to reach the end")
                await f.close()
            return [(f.after, f.lsns) for f in followers]
        finally:
            await node.stop()

    got = asyncio.run(run())
    last = node.store.visible_lsn
    assert len(got) >= 2
    for after, lsns in got:
        assert lsns == list(range(after + 1, last + 1))


def test_a_segment_taken_from_inside_sends_only_what_follows() -> None:
    """A stream may join the tail at an lsn inside a segment (its own read of the store
    ended there): it is sent the frames after that lsn, and the segment's shared frames
    are left as they were for the streams that take it whole."""
    events = [
        StoredEvent(lsn, 1, bytes(16), "default", "e", "t.x", 0, lsn, b'{"n": %d}' % lsn, None)
        for lsn in range(11, 21)
    ]
    seg = Segment(10, 20, events)
    whole = seg.sse(QueryFilter())
    inside = TailPage([seg], QueryFilter(), 15)
    assert [ev.lsn for ev in inside.events] == list(range(16, 21))
    assert inside.frames() == [
        b"".join(encode_event(ev.lsn, 1, seg.json_of(ev)) for ev in events[5:])
    ]
    assert seg.sse(QueryFilter()) is whole
    assert whole == b"".join(encode_event(ev.lsn, 1, seg.json_of(ev)) for ev in events)
