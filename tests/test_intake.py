"""``intake.prepare_batch`` answers exactly as ``events.prepare`` event by event: the same
prepared tuples for a valid batch, the same error (type, message, details, index) for the
first defect of an invalid one."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from walship.errors import InvalidInput
from walship.events import EventIn, prepare
from walship.intake import prepare_batch
from walship.limits import DEFAULT_LIMITS, Limits

# small limits, so that the strategies below reach every bound
SMALL = dataclasses.replace(
    DEFAULT_LIMITS,
    payload_bytes_max=48,
    metadata_bytes_max=24,
    entity_id_chars_max=10,
    event_type_chars_max=12,
)


JSON_TEXTS_BAD = [
    b'{"n":1e999}',
    b'{"n":1e99}',
    b"1" * 300,
    b'{"big":123456789012345678901234567890}',
    b"[" * 1100 + b"]" * 1100,
    b'"\\ud800"',
    b'"\xff"',
    b'"\xc3\xa9"',
    b"{not json",
    b' {"a":1}',
    b'{"a":"' + b"y" * 60 + b'"}',
    b"nullx",
    b"",
]
# every field's valid values, and for each field the values that may break it (or take the
# slow lane): an event is valid or has one defect, so each check decides some examples
VALID: dict[str, list[Any]] = {
    "tenant_id": ["default", "tenant-1"],
    "entity_id": ["acct-1", "a b", "x" * 10],
    "event_type": ["a.b", "Order:Placed", "ok-1"],
    "payload": [b'{"a":1}', b"1", b'"abc"', b"[1,2]", b'{"h":"e12e34"}', b"{}", b"null"],
    "metadata": [b"null", b'{"a":1}', b"{}", b'{"h":"e12e34"}'],
    "payload_encoding": ["json"],
    "expected_version": [None, 0, 3],
}
DEFECTS: dict[str, st.SearchStrategy[Any]] = {
    "tenant_id": st.sampled_from(["bad tenant", "", "x" * 65, "Ü"]),
    "entity_id": st.one_of(
        st.sampled_from([" ", "  ", "", "a\tb", "a\x7fb", "\x85", "x" * 11, "\ud800", "é-1"]),
        st.text(st.characters(min_codepoint=0, max_codepoint=0x9F), max_size=12),
        st.text(max_size=12),
    ),
    "event_type": st.sampled_from(["_system.x", ".a", "a..b", "x" * 13, "a b", "é"]),
    "payload": st.one_of(st.sampled_from(JSON_TEXTS_BAD), st.binary(max_size=20)),
    "metadata": st.sampled_from(
        [*JSON_TEXTS_BAD, b'{"k":"' + b"v" * 30 + b'"}', b"  null", b"[1]", b"1", b'"x"']
    ),
    "payload_encoding": st.sampled_from(["base64", "yaml"]),
    # "1": a Python caller's wrong type reaches prepare, which decides
    "expected_version": st.sampled_from([-1, "1"]),
}


@st.composite
def events_in(draw: st.DrawFn) -> EventIn:
    fields = {name: draw(st.sampled_from(values)) for name, values in VALID.items()}
    defect = draw(st.sampled_from([None, *DEFECTS]))
    if defect is not None:
        fields[defect] = draw(DEFECTS[defect])
    if fields["payload_encoding"] == "base64" and draw(st.booleans()):
        fields["payload"] = msgspec.json.encode(draw(st.binary(max_size=40)))
    return EventIn(
        entity_id=fields["entity_id"],
        event_type=fields["event_type"],
        payload=msgspec.Raw(fields["payload"]),
        tenant_id=fields["tenant_id"],
        metadata=msgspec.Raw(fields["metadata"]),
        id=draw(st.one_of(st.none(), st.builds(uuid.uuid4))),
        expected_version=fields["expected_version"],
        payload_encoding=fields["payload_encoding"],
    )


def warm_name_caches() -> None:
    """Prepare one valid event per valid tenant and type under the default limits: the names
    are then in the caches the fast lane reads (``x`` * 13 too, which SMALL refuses)."""
    for tenant in ("default", "tenant-1"):
        for etype in ("a.b", "Order:Placed", "ok-1", "x" * 13):
            ev = EventIn(
                entity_id="e", event_type=etype, payload=msgspec.Raw(b"1"), tenant_id=tenant
            )
            prepare(ev, DEFAULT_LIMITS)


def reference(
    events: list[EventIn], limits: Limits, json_checked: bool
) -> list[tuple[bytes, str, str, str, bytes, bytes | None, bool]]:
    """What ``Store.submit`` did before ``prepare_batch``: ``prepare`` in a loop."""
    out = []
    for i, ev in enumerate(events):
        try:
            out.append(prepare(ev, limits, json_checked=json_checked))
        except InvalidInput as exc:
            if len(events) > 1:
                exc.details["index"] = i
            raise
    return out


def answer(call: object) -> object:
    """The result, or the error's type, text and details (a Python caller's wrong type too)."""
    try:
        return ("ok", call())  # type: ignore[operator]
    except Exception as exc:
        return ("error", type(exc), str(exc), getattr(exc, "details", None))


def plain(**changes: Any) -> list[EventIn]:
    """A batch of one plainly valid event with ``changes``: each reaches one check of the
    fast lane (hypothesis finds them too, but not in every run)."""
    fields: dict[str, Any] = {name: values[0] for name, values in VALID.items()}
    fields.update(changes)
    fields["payload"] = msgspec.Raw(fields["payload"])
    fields["metadata"] = msgspec.Raw(fields["metadata"])
    return [EventIn(**fields)]


@settings(max_examples=250, deadline=None)
@example(events=plain(entity_id="a\tb"), json_checked=True, small=False)
@example(events=plain(entity_id="a\x7fb"), json_checked=True, small=False)
@example(events=plain(entity_id="   "), json_checked=True, small=False)
@example(events=plain(entity_id="x" * 11), json_checked=True, small=True)
@example(events=plain(event_type="x" * 13), json_checked=True, small=True)
@example(events=plain(payload=b'"\xff"'), json_checked=True, small=False)
@example(events=plain(payload=b'{"a":"' + b"y" * 60 + b'"}'), json_checked=True, small=True)
@example(events=plain(payload=b'{"n":1e999}'), json_checked=True, small=False)
@example(events=plain(metadata=b"[1]"), json_checked=True, small=False)
@example(events=plain(metadata=b'{"n":1e999}'), json_checked=True, small=False)
@example(events=plain(metadata=b'{"x":"\xff"}'), json_checked=True, small=False)
@example(events=plain(metadata=b'{"k":"' + b"v" * 30 + b'"}'), json_checked=True, small=True)
@example(events=plain(expected_version=-1), json_checked=True, small=False)
@example(events=plain(payload_encoding="yaml"), json_checked=True, small=False)
@given(
    events=st.lists(events_in(), min_size=1, max_size=4),
    json_checked=st.booleans(),
    small=st.booleans(),
)
def test_batch_preparation_answers_as_prepare_does(
    events: list[EventIn], json_checked: bool, small: bool
) -> None:
    limits = SMALL if small else DEFAULT_LIMITS
    warm_name_caches()
    # the reference first: it fills the caches of valid names that the fast lane reads
    expected = answer(lambda: reference(events, limits, json_checked))
    assert answer(lambda: prepare_batch(events, limits, json_checked=json_checked)) == expected


def test_plain_events_take_the_fast_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plainly valid event is prepared without ``prepare``: the lane this module exists
    for is the one taken (and still gives ``prepare``'s tuple)."""
    import walship.intake as intake

    ev = EventIn(
        entity_id="acct-1",
        event_type="a.b",
        payload=msgspec.Raw(b'{"a":1}'),
        metadata=msgspec.Raw(b'{"k":"v"}'),
    )
    expected = prepare(ev, DEFAULT_LIMITS, json_checked=True)
    calls: list[EventIn] = []

    def counting(event: EventIn, limits: Limits, *, json_checked: bool = False) -> object:
        calls.append(event)
        return prepare(event, limits, json_checked=json_checked)

    monkeypatch.setattr(intake, "prepare", counting)
    got = intake.prepare_batch([ev, ev], DEFAULT_LIMITS, json_checked=True)
    assert got == [expected, expected]
    assert calls == []
