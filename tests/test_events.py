from __future__ import annotations

import uuid

from walship.events import (
    EventBody,
    decode_body,
    encode_body,
    encode_body_fields,
    format_timestamp,
    format_uuid,
    new_event_ids,
    parse_timestamp,
)


def test_body_fields_encode_exactly_like_the_struct() -> None:
    fields = (b"\x01" * 16, "default", "acct-1", "acct.opened", 123, 2, b'{"a":1}', None)
    assert encode_body_fields(*fields) == encode_body(EventBody(*fields))
    assert decode_body(encode_body_fields(*fields)) == EventBody(*fields)


def test_generated_ids_are_distinct_uuid7() -> None:
    ids = new_event_ids(1000)
    assert len(set(ids)) == 1000
    parsed = [uuid.UUID(bytes=i) for i in ids]
    assert {u.version for u in parsed} == {7}
    assert {u.variant for u in parsed} == {uuid.RFC_4122}
    assert [format_uuid(i) for i in ids] == [str(u) for u in parsed]


def test_timestamps_round_trip() -> None:
    us = 1_764_147_600_123_456
    text = format_timestamp(us)
    assert text.endswith("Z")
    assert parse_timestamp(text) == us
    assert parse_timestamp("2026-01-01T01:00:00+01:00") == parse_timestamp("2026-01-01T00:00:00")
    assert parse_timestamp("2026-01-01T01:00:00 01:00") == parse_timestamp("2026-01-01T00:00:00Z")
