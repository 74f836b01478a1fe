from __future__ import annotations

import time
import uuid

from walship.events import (
    EventBody,
    decode_body,
    encode_body,
    encode_body_fields,
    encode_body_tuple,
    format_timestamp,
    format_uuid,
    new_event_ids,
    parse_timestamp,
)


def test_body_fields_encode_exactly_like_the_struct() -> None:
    fields = (b"\x01" * 16, "default", "acct-1", "acct.opened", 123, 2, b'{"a":1}', None)
    assert encode_body_fields(*fields) == encode_body(EventBody(*fields))
    assert decode_body(encode_body_fields(*fields)) == EventBody(*fields)


def test_a_body_tuple_with_a_position_encodes_like_its_fields() -> None:
    """The store's append loop encodes a JSON event's fields with its position directly."""
    fields = (b"\x01" * 16, "t", "acct-1", "acct.opened", 123, 2, b'{"a":1}', b"{}", 7)
    assert encode_body_tuple(fields) == encode_body_fields(*fields)
    assert decode_body(encode_body_tuple(fields)) == EventBody(*fields)


def test_generated_ids_are_distinct_uuid7() -> None:
    before_ms = time.time_ns() // 1_000_000
    ids = new_event_ids(1000)
    after_ms = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000
    assert {len(i) for i in ids} == {16}
    parsed = [uuid.UUID(bytes=i) for i in ids]
    assert {u.version for u in parsed} == {7}
    assert {u.variant for u in parsed} == {uuid.RFC_4122}
    # the first 48 bits are the time in ms, the same for the whole call
    stamps = {int.from_bytes(i[:6], "big") for i in ids}
    assert len(stamps) == 1 and before_ms <= stamps.pop() <= after_ms
    # the other bits are random: every random bit position takes both values
    rand = [u.int & ~((1 << 128) - (1 << 80)) & ~(0xF << 76) & ~(0x3 << 62) for u in parsed]
    assert all(any(r >> b & 1 for r in rand) for b in range(76) if b not in (62, 63))
    assert [format_uuid(i) for i in ids] == [str(u) for u in parsed]


def test_timestamps_round_trip() -> None:
    us = 1_764_147_600_123_456
    text = format_timestamp(us)
    assert text.endswith("Z")
    assert parse_timestamp(text) == us
    assert parse_timestamp("2026-01-01T01:00:00+01:00") == parse_timestamp("2026-01-01T00:00:00")
    assert parse_timestamp("2026-01-01T01:00:00 01:00") == parse_timestamp("2026-01-01T00:00:00Z")
