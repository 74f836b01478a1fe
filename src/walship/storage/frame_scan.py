"""Pages of subscription frames for a stream that takes every event (no filter).

``Store.query`` answers a page as ``StoredEvent``s, which the subscription then encodes one
by one: for an unfiltered catch-up that per-event Python was nearly all of its cost. Here a
page is read as frames instead: from Parquet parts, spans of each slab's frames, built once
per slab with Arrow kernels (``event_frames``); from memtables (the recent tail), each event
encoded as before. The same view as ``Store.query`` (parts first, then memtables past what the
parts hold, nothing past ``to_lsn``), so the events are the same, in the same order.
"""

from __future__ import annotations

import dataclasses

from walship.event_frames import EventFrames, FrameSpan
from walship.storage.entity_reads import ReadView
from walship.storage.query import QueryFilter


@dataclasses.dataclass(frozen=True, slots=True)
class FramePage:
    """Frames of consecutive events in lsn order; ``full``: the page stopped at its limit
    (more may follow after ``last_lsn``)."""

    spans: list[FrameSpan]
    count: int
    last_lsn: int
    full: bool


def frame_page(view: ReadView, from_lsn: int, to_lsn: int, limit: int) -> FramePage:
    """Every event from ``from_lsn`` through ``to_lsn`` (capped at what ``view`` shows),
    at most ``limit``, as frames."""
    to_lsn = min(to_lsn, view.visible)
    spans: list[FrameSpan] = []
    count = 0
    flt = QueryFilter(from_lsn=from_lsn, to_lsn=to_lsn)
    for part in view.parts:
        if count >= limit:
            break
        if part.could_match(flt, view.visible):
            for span in part.scan_frames(from_lsn, to_lsn, limit - count):
                spans.append(span)
                count += span.count
    for mem in view.memtables:
        if count >= limit:
            break
        with view.lock:
            got = mem.select(flt, view.visible, limit - count)
        # a memtable being checkpointed may already be in a part: skip what parts hold
        events = [ev for ev in got if ev.lsn > view.checkpointed]
        if events:
            spans.append(EventFrames.of_events(events).span(0, len(events)))
            count += len(events)
    last = spans[-1].last_lsn if spans else 0
    return FramePage(spans, count, last, count >= limit)
