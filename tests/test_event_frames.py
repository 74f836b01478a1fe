"""Subscription frames built a slab at a time (``event_frames``, ``storage/frame_scan``) are
the bytes the per-event path writes, for every kind of event; the client's byte-level SSE
decoder gives the events the line decoder gives, however the bytes are cut."""

from __future__ import annotations

import base64
from pathlib import Path

import msgspec
import pytest

from tests.conftest import make_event
from walship.event_frames import EventFrames, frame_of, frames_of_table
from walship.events import EventIn
from walship.sse import SseDecoder
from walship.storage.frame_scan import frame_page
from walship.storage.parquet import _table
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

ENTITIES = ["plain", 'quote"d', "back\\slash", "ünïcode-✓", "line\u2028sep", "emoji-🚀", "x" * 128]


def mixed_events(count: int) -> list[EventIn]:
    """JSON and binary payloads, metadata null or not, awkward entity ids, three tenants,
    JSON spread over lines."""
    out = []
    for i in range(count):
        kind = i % 5
        kw: dict[str, object] = {"tenant_id": ("default", "t-a", "t_b")[i % 3]}
        if kind == 1:
            kw["payload"] = {"text": 'ünï "q" \\ \u2028 🚀', "n": i}
        if kind != 2:
            kw["metadata"] = msgspec.Raw(msgspec.json.encode({"trace": f"{i:x}", "é": [1, None]}))
        ev = make_event(ENTITIES[i % len(ENTITIES)], f"kind.e{kind}:v-1", **kw)
        if kind == 3:  # a binary payload (bytes that are not UTF-8 among them)
            raw = bytes([0, 255, 254, i % 256]) * (i % 7 + 1)
            ev = EventIn(
                entity_id=ev.entity_id,
                event_type=ev.event_type,
                payload=msgspec.Raw(msgspec.json.encode(base64.b64encode(raw).decode())),
                tenant_id=ev.tenant_id,
                metadata=ev.metadata,
                payload_encoding="base64",
            )
        if kind == 4:  # JSON as a client may send it: spread over lines (CR, LF)
            ev = EventIn(
                entity_id=ev.entity_id,
                event_type=ev.event_type,
                payload=msgspec.Raw(b'{\n "n": %d,\r\n "l": [1,\r2]\n\n}' % i),
                tenant_id=ev.tenant_id,
                metadata=msgspec.Raw(b'{"k":\n1}'),
            )
        out.append(ev)
    return out


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(StoreConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never")))
    yield s  # type: ignore[misc]
    s.close()


def per_event(store: Store, first: int, last: int) -> bytes:
    """What the subscription wrote for these lsns before frames were built in bulk."""
    from walship.storage.query import QueryFilter

    events = store.query(QueryFilter(from_lsn=first, to_lsn=last), 10_000).events
    return b"".join(frame_of(ev) for ev in events)


def test_vectorized_frames_are_the_per_event_bytes() -> None:
    """The builder over a part's table gives frame_of's bytes, event by event."""
    from walship.events import StoredEvent

    events = []
    for i, ev in enumerate(mixed_events(60)):
        binary = ev.payload_encoding == "base64"
        payload = base64.b64decode(msgspec.json.decode(ev.payload)) if binary else bytes(ev.payload)
        meta = bytes(ev.metadata)
        events.append(
            StoredEvent(
                i + 1,
                1 + i // 25,  # several terms
                bytes(range(i, i + 16)),
                ev.tenant_id,
                ev.entity_id,
                ev.event_type,
                1_764_147_600_123_456 + i * 999_999,
                i + 1,
                payload,
                None if meta == b"null" else meta,
                i // 3,
                payload_binary=binary,
            )
        )
    frames = frames_of_table(_table(events))
    assert frames is not None
    assert list(frames.lsns) == [ev.lsn for ev in events]
    for i, ev in enumerate(events):
        assert bytes(frames.span(i, i + 1).data) == frame_of(ev), ev
        assert frame_of(ev).count(b"\n") == 3 and b"\r" not in frame_of(ev)  # id, data, end
    assert bytes(frames.span(0, len(events)).data) == bytes(EventFrames.of_events(events).data)


def test_frame_pages_from_parts_and_memtables_match_the_query_path(store: Store) -> None:
    """A part (checkpointed), a memtable on top: pages of every size give the same bytes."""
    batch = mixed_events(120)
    store.append_batch(batch[:80])
    assert store.checkpoint() is not None
    store.append_batch(batch[80:])
    last = store.visible_lsn
    whole = frame_page(store.read_view(), 1, last, 10_000)
    assert whole.count == 120 and not whole.full and whole.last_lsn == last
    assert b"".join(bytes(s.data) for s in whole.spans) == per_event(store, 1, last)
    for size in (1, 7, 79, 80, 81):
        got, after = b"", 0
        while after < last:
            page = frame_page(store.read_view(), after + 1, last, size)
            assert page.count <= size
            got += b"".join(bytes(s.data) for s in page.spans)
            after = page.last_lsn if page.full else last
        assert got == per_event(store, 1, last), size
    # to_lsn cuts inside the part and inside the memtable
    for stop in (40, 100):
        page = frame_page(store.read_view(), 3, stop, 10_000)
        assert b"".join(bytes(s.data) for s in page.spans) == per_event(store, 3, stop)


def test_ids_not_in_canonical_form_fall_back_to_the_per_event_path() -> None:
    from walship.storage.parquet import to_events

    events_table = _table([])
    assert frames_of_table(events_table) is not None
    import pyarrow as pa

    from walship.events import StoredEvent

    ev = StoredEvent(
        1, 1, bytes([0xAB] * 16), "default", "e", "t", 1_764_147_600_000_000, 1, b"{}", None
    )
    table = _table([ev])
    upper = table.set_column(
        table.schema.get_field_index("id"),
        "id",
        pa.array([table.column("id")[0].as_py().upper()], pa.string()),
    )
    assert frames_of_table(upper) is None
    assert frame_of(to_events(upper, 1)[0]) == frame_of(ev)


STREAM = (
    b"retry: 1000\n: subscribed after lsn 0\n\n"
    b'id: 1:1\ndata: {"a":"\xc3\xbc"}\n\n'
    b": keepalive\n\n"
    b"id: 2:1\r\ndata: one\r\ndata: two\r\n\r\n"
    b"id: 3:2\rdata: cr\r\r"
    b'event: cut\ndata: {"error":"log_cut","kept_lsn":1}\n\n'
)


def test_the_byte_decoder_gives_the_line_decoders_events_wherever_the_bytes_are_cut() -> None:
    lines = STREAM.replace(b"\r\n", b"\n").replace(b"\r", b"\n").decode().split("\n")
    want = list(SseDecoder().feed_lines(iter(lines)))
    assert [e.id for e in want] == ["1:1", "2:1", "3:2", None]
    assert want[1].data == "one\ntwo" and want[3].event == "cut"
    for cut in range(len(STREAM) + 1):
        decoder = SseDecoder()
        got = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:])
        assert got == want, cut
    decoder = SseDecoder()
    assert [e for i in range(len(STREAM)) for e in decoder.feed(STREAM[i : i + 1])] == want


def test_the_byte_decoder_refuses_an_endless_line() -> None:
    from walship.sse import LINE_BYTES_MAX

    decoder = SseDecoder()
    with pytest.raises(ValueError):
        for _ in range(LINE_BYTES_MAX // (1 << 20) + 2):
            decoder.feed(b"d" * (1 << 20))


def test_pieces_of_a_span_hold_whole_frames(store: Store) -> None:
    """The HTTP body's chunks are cut where frames end, as when they were sent one by one."""
    store.append_batch(mixed_events(50))
    assert store.checkpoint() is not None
    (span,) = frame_page(store.read_view(), 1, store.visible_lsn, 100).spans
    for size in (1, 100, 1_000, 1 << 20):
        pieces = list(span.pieces(size))
        assert b"".join(pieces) == bytes(span.data)
        assert all(p.startswith(b"id: ") and p.endswith(b"\n\n") for p in pieces)
        assert len(pieces) == (50 if size == 1 else len(pieces))
