"""The event model: what a client sends, what is stored in the WAL body, what is returned.

A client sends ``EventIn`` (JSON). The server validates it, sets ``timestamp`` and ``version``,
and stores an ``EventBody`` (msgpack, the WAL record body). With the record's lsn and term it
becomes a ``StoredEvent`` in the memtable, and ``EventOut`` on the way back out.

Payload and metadata stay JSON text end to end (``msgspec.Raw``): they are checked for syntax
and size but never re-encoded, which is also how the Parquet files hold them. A payload may
instead be bytes (``payload_encoding: "base64"`` in JSON, a msgpack ``bin`` in msgpack bodies):
it is stored as the bytes themselves with ``payload_binary`` set, and comes back out as the
same bytes (base64 in JSON answers, ``bin`` in msgpack ones).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import orjson

from walship.errors import LimitExceeded, MalformedJson, ValidationError
from walship.limits import LSN_MAX, Limits
from walship.wire import EventOut

SYSTEM_PREFIX = "_system."
_TENANT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# topic names such as ``bank.domain:Account.Opened`` or ``order-v2.placed``
_TYPE_RE = re.compile(r"[A-Za-z0-9._:-]+")
PAYLOAD_ENCODINGS = ("json", "base64")
_CONSUMER_RE = re.compile(r"[A-Za-z0-9._:-]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_JSON_WS = b" \t\r\n"
# where a JSON number might not fit a double: an exponent of 2+ digits, or 290+ digits in a
# row (a mantissa that long overflows with a 1-digit exponent). Inside strings it only costs
# the full parse that tells
_WIDE_NUMBER_RE = re.compile(rb"[eE]\+?\d\d|\d{290}")


def _json_null() -> msgspec.Raw:
    return msgspec.Raw(b"null")


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    """One event as a client sends it."""

    entity_id: str
    event_type: str
    payload: msgspec.Raw
    tenant_id: str = "default"
    # Not ``Raw | None``: msgspec cannot decode Raw inside a union (it would accept only null).
    # A missing or null metadata is the raw JSON ``null``, which ``prepare`` turns into None.
    metadata: msgspec.Raw = msgspec.field(default_factory=_json_null)
    id: uuid.UUID | None = None
    expected_version: int | None = None
    # "base64": ``payload`` is a JSON string holding the base64 of the payload's bytes
    payload_encoding: str = "json"


class TrackingIn(msgspec.Struct, forbid_unknown_fields=True):
    """A consumer's position, committed in the same atomic append as a batch's events."""

    consumer: str
    position: int
    tenant_id: str = "default"


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    """A batch: stored all together or not at all (its tracking too)."""

    events: list[EventIn] = msgspec.field(default_factory=list)
    tracking: TrackingIn | None = None


class EventBody(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """The WAL record body of an event (msgpack)."""

    id: bytes
    tenant_id: str
    entity_id: str
    event_type: str
    timestamp_us: int
    version: int
    payload: bytes
    metadata: bytes | None
    # trailing and defaulted: records written before positions existed still decode (as 0,
    # "no position"); the leader assigns it, followers take it from the record
    tenant_position: int = 0
    payload_binary: bool = False  # ``payload`` is the caller's bytes, not JSON text


class StoredEvent(msgspec.Struct, gc=False, frozen=True):
    """An event with its place in the log, as held in the memtable."""

    lsn: int
    term: int
    id: bytes
    tenant_id: str
    entity_id: str
    event_type: str
    timestamp_us: int
    version: int
    payload: bytes
    metadata: bytes | None
    tenant_position: int = 0  # gapless 1, 2, 3 ... within the tenant; 0: written before them
    payload_binary: bool = False

    @property
    def event_id(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.id)

    def size_bytes(self) -> int:
        """Approximate memory held by this event (for memtable accounting)."""
        meta = len(self.metadata) if self.metadata else 0
        return 200 + len(self.payload) + meta + len(self.entity_id) + len(self.event_type)


_body_encoder = msgspec.msgpack.Encoder()
_body_decoder = msgspec.msgpack.Decoder(EventBody)


def encode_body(body: EventBody) -> bytes:
    """The record body, without trailing fields at their defaults (see ``encode_body_fields``)."""
    return encode_body_fields(*msgspec.structs.astuple(body))


def encode_body_fields(
    event_id: bytes,
    tenant_id: str,
    entity_id: str,
    event_type: str,
    timestamp_us: int,
    version: int,
    payload: bytes,
    metadata: bytes | None,
    tenant_position: int = 0,
    payload_binary: bool = False,
) -> bytes:
    """The same bytes as ``encode_body(EventBody(...))`` without building the Struct.

    Trailing fields at their defaults are left out (the decoder fills them in; msgspec's
    ``omit_defaults`` does not trim arrays), so a JSON event's record is what it was before
    those fields existed."""
    fields: tuple[object, ...] = (
        event_id,
        tenant_id,
        entity_id,
        event_type,
        timestamp_us,
        version,
        payload,
        metadata,
    )
    if payload_binary:
        fields = (*fields, tenant_position, True)
    elif tenant_position:
        fields = (*fields, tenant_position)
    return _body_encoder.encode(fields)


# ``encode_body_fields`` of a JSON payload's fields with a position (never 0 on a leader's
# append), which it lays out as given: the store's append loop encodes its tuple directly
encode_body_tuple: Callable[[tuple[object, ...]], bytes] = _body_encoder.encode

# a record body (bytes or a view of a received frame) to its EventBody: the decoder's own
# method, without a Python wrapper around it (it runs for every record a node applies)
decode_body: Callable[[bytes | memoryview], EventBody] = _body_decoder.decode


def stored_from_body(lsn: int, term: int, body: EventBody) -> StoredEvent:
    return StoredEvent(
        lsn,
        term,
        body.id,
        body.tenant_id,
        body.entity_id,
        body.event_type,
        body.timestamp_us,
        body.version,
        body.payload,
        body.metadata,
        body.tenant_position,
        body.payload_binary,
    )


def _same_json(a: bytes | None, b: bytes | None) -> bool:
    if a == b:
        return True
    if a is None or b is None:
        return False
    # the same value written another way (spacing, key order) is the same event
    try:
        return bool(msgspec.json.decode(a) == msgspec.json.decode(b))
    except RecursionError:  # nested near the limit intake allows: told apart by bytes only
        return False


def same_content(
    ev: StoredEvent,
    tenant_id: str,
    entity_id: str,
    event_type: str,
    payload: bytes,
    metadata: bytes | None,
    payload_binary: bool = False,
) -> bool:
    """Whether an event sent again with ``ev``'s id says what ``ev`` says (a retry), rather
    than reusing the id for something else. JSON payloads and metadata compare as JSON
    values, binary payloads byte for byte (and never equal a JSON one)."""
    if ev.payload_binary != payload_binary:
        return False
    same_payload = ev.payload == payload if payload_binary else _same_json(ev.payload, payload)
    return (
        ev.tenant_id == tenant_id
        and ev.entity_id == entity_id
        and ev.event_type == event_type
        and same_payload
        and _same_json(ev.metadata, metadata)
    )


def format_uuid(raw: bytes) -> str:
    """The canonical text of a 16-byte UUID (faster than ``str(uuid.UUID(bytes=...))``)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# byte 6 of a UUIDv7 is its version (7) over 4 random bits, byte 8 its variant (0b10) over 6
_VERSION_7 = bytes(0x70 | (b & 0x0F) for b in range(256))
_VARIANT_RFC = bytes(0x80 | (b & 0x3F) for b in range(256))


def new_event_ids(count: int) -> list[bytes]:
    """``count`` fresh UUIDv7 ids (time-ordered, random tail) from one ``urandom`` call.

    The version and variant bits are set for all ids at once (a ``translate`` of every 16th
    byte) and the time prefix by strided slices: building each id from its pieces took
    ~3.5 µs an id on a batch of 1,000, this ~1."""
    ms = (time.time_ns() // 1_000_000).to_bytes(6, "big")
    buf = bytearray(os.urandom(16 * count))
    for k in range(6):
        buf[k::16] = ms[k : k + 1] * count
    buf[6::16] = buf[6::16].translate(_VERSION_7)
    buf[8::16] = buf[8::16].translate(_VARIANT_RFC)
    data = bytes(buf)
    return [data[i : i + 16] for i in range(0, 16 * count, 16)]


def base64_json(data: bytes) -> bytes:
    """``data`` as a JSON string of its base64 (what msgspec decodes back to ``bytes``)."""
    return _json_encoder.encode(data)


_json_encoder = msgspec.json.Encoder()


def to_out(ev: StoredEvent) -> EventOut:
    """The JSON answer form of a stored event (a binary payload as base64 text)."""
    if ev.payload_binary:
        payload, encoding = msgspec.Raw(base64_json(ev.payload)), "base64"
    else:
        payload, encoding = msgspec.Raw(ev.payload), None
    return EventOut(
        id=format_uuid(ev.id),
        tenant_id=ev.tenant_id,
        entity_id=ev.entity_id,
        event_type=ev.event_type,
        payload=payload,
        metadata=None if ev.metadata is None else msgspec.Raw(ev.metadata),
        timestamp=format_timestamp(ev.timestamp_us),
        version=ev.version,
        lsn=ev.lsn,
        term=ev.term,
        position=ev.tenant_position,
        payload_encoding=encoding,
    )


def to_plain(ev: StoredEvent) -> dict[str, object]:
    """The msgpack answer form of a stored event: ``to_out``'s fields with payload and
    metadata as values (a binary payload as ``bytes``, which msgpack sends as ``bin``)."""
    out = msgspec.structs.asdict(to_out(ev))
    del out["payload_encoding"]
    out["payload"] = ev.payload if ev.payload_binary else orjson.loads(ev.payload)
    out["metadata"] = None if ev.metadata is None else orjson.loads(ev.metadata)
    return out


def now_us() -> int:
    return time.time_ns() // 1000


def format_timestamp(us: int) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-26T09:00:00.123456Z``."""
    secs, micros = divmod(us, 1_000_000)
    return f"{_second_text(secs)}.{micros:06d}Z"


@functools.lru_cache(maxsize=4096)
def _second_text(secs: int) -> str:
    # events come in runs of the same second: strftime was half of encoding a stream's event
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))


def parse_timestamp(text: str, field: str = "time") -> int:
    """Parse an RFC 3339 / ISO 8601 time (naive means UTC) to microseconds since the epoch."""
    cleaned = text.strip().replace("Z", "+00:00")
    if " " in cleaned and "T" in cleaned:
        # a '+' in a query string arrives as a space: "...T10:00:00 02:00"
        cleaned = cleaned.replace(" ", "+")
    try:
        dt = datetime.fromisoformat(cleaned)
    except ValueError as exc:
        raise ValidationError(f"not an ISO 8601 time: {text!r}", field=field) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1_000_000)


_VALID_CACHE_MAX = 4096
_valid_tenants: set[str] = set()
_valid_types: set[str] = set()


def validate_tenant_id(tenant_id: str) -> str:
    if tenant_id in _valid_tenants:
        return tenant_id
    if not _TENANT_RE.fullmatch(tenant_id):
        raise ValidationError(
            "tenant_id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'", field="tenant_id"
        )
    if len(_valid_tenants) < _VALID_CACHE_MAX:
        _valid_tenants.add(tenant_id)
    return tenant_id


def validate_consumer_name(name: str, limits: Limits, field: str = "consumer") -> str:
    if not 1 <= len(name) <= limits.consumer_name_chars_max or not _CONSUMER_RE.fullmatch(name):
        raise ValidationError(
            f"a consumer name must be 1-{limits.consumer_name_chars_max} characters of "
            "A-Z, a-z, 0-9, '.', '_', ':' or '-'",
            field=field,
        )
    return name


def validate_tracking(tracking: TrackingIn, limits: Limits) -> None:
    """ValidationError naming the field of a bad ``tracking`` object."""
    validate_consumer_name(tracking.consumer, limits, "tracking.consumer")
    try:
        validate_tenant_id(tracking.tenant_id)
    except ValidationError as exc:
        exc.details["field"] = "tracking.tenant_id"
        raise
    if not 1 <= tracking.position <= LSN_MAX:
        raise ValidationError(f"tracking.position must be 1..{LSN_MAX}", field="tracking.position")


def validate_entity_id(entity_id: str, limits: Limits) -> str:
    if not entity_id or len(entity_id) > limits.entity_id_chars_max:
        raise ValidationError(
            f"entity_id must be 1-{limits.entity_id_chars_max} characters", field="entity_id"
        )
    if not entity_id.strip():
        raise ValidationError("entity_id must not be blank", field="entity_id")
    if _CONTROL_RE.search(entity_id):
        raise ValidationError("entity_id must not contain control characters", field="entity_id")
    if not entity_id.isascii():
        try:
            entity_id.encode()
        except UnicodeEncodeError:
            # only a Python caller can send one (a JSON decoder refuses a lone surrogate)
            raise ValidationError(
                "entity_id must be Unicode text UTF-8 can encode (no lone surrogate)",
                field="entity_id",
            ) from None
    return entity_id


def validate_event_type(event_type: str, limits: Limits, *, system: bool = False) -> str:
    if event_type in _valid_types and len(event_type) <= limits.event_type_chars_max:
        return event_type
    if len(event_type) > limits.event_type_chars_max or not _TYPE_RE.fullmatch(event_type):
        raise ValidationError(
            f"event_type must be 1-{limits.event_type_chars_max} characters "
            "of A-Z, a-z, 0-9, '.', '_', ':' or '-'",
            field="event_type",
        )
    if event_type.startswith(".") or event_type.endswith(".") or ".." in event_type:
        raise ValidationError(
            "event_type must not start or end with '.' or contain '..'", field="event_type"
        )
    if event_type.startswith(SYSTEM_PREFIX) and not system:
        raise ValidationError(
            f"event types starting with {SYSTEM_PREFIX!r} are reserved", field="event_type"
        )
    if not system and len(_valid_types) < _VALID_CACHE_MAX:
        _valid_types.add(event_type)
    return event_type


def _first_json_byte(raw: bytes) -> int:
    stripped = raw.lstrip(_JSON_WS)
    return stripped[0] if stripped else 0


def check_utf8(raw: bytes, field: str) -> None:
    """ValidationError naming ``field`` unless the JSON text ``raw`` is valid UTF-8.

    msgspec checks a ``Raw`` value's syntax and its escapes (a lone ``\\udc80`` is refused) but
    not the bytes inside its strings; one invalid byte stored made every checkpoint fail
    (Arrow string columns hold only valid UTF-8) and every reader of it fail too. Python's
    strict decoder refuses what Arrow refuses (overlong forms, encoded surrogates).
    """
    if raw.isascii():
        return
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"{field} is not valid UTF-8: {exc.reason} at byte {exc.start}", field=field
        ) from None


def check_numbers(raw: bytes, field: str) -> None:
    """ValidationError naming ``field`` when the JSON text ``raw`` holds a number past the
    range of a double (``1e999``, 400 digits).

    That is JSON syntax, so msgspec keeps it in a ``Raw``, but no reader holds it: the
    entity's state (orjson) answered 500 for every read from then on, and an id retry of it
    failed to compare. Only a text that could hold such a number is parsed.

    orjson is tried first: a text it takes passes either way, and it is cheaper than the
    screen for the ~1 KB payloads of the benchmarks (0.7 µs against 3.4: its 290-digit
    branch tries every byte, and hex text matches the exponent branch anyway). Only a text
    it refuses goes through the screen, so what is refused, and why, is unchanged.
    """
    try:
        orjson.loads(raw)
        return
    except orjson.JSONDecodeError:
        pass
    if _WIDE_NUMBER_RE.search(raw) is None:
        return
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(
            f"{field} is JSON that readers cannot hold ({exc.msg}): numbers must be in the "
            "range of a 64-bit float",
            field=field,
        ) from None


def check_json(raw: bytes, field: str) -> None:
    """ValidationError naming ``field`` unless ``raw`` is one JSON value the readers take.

    For a ``Raw`` no decoder has seen: the embedded ``Store`` takes ``msgspec.Raw`` from the
    caller, and ``{not json`` was stored, shipped to followers and served inside query pages
    (an HTTP body that is not JSON) while the entity's state failed for good. orjson is the
    reader that builds entity state, and refuses what it cannot hold (invalid UTF-8, a lone
    surrogate escape, a number past a double).
    """
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"{field} is not valid JSON: {exc.msg}", field=field) from None


_bytes_decoder = msgspec.json.Decoder(bytes)


def decode_base64_payload(raw: bytes) -> bytes:
    """The bytes of a ``payload_encoding: "base64"`` payload (a JSON string of standard,
    padded base64); ValidationError naming ``payload`` otherwise."""
    try:
        return _bytes_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValidationError(
            f'a "base64" payload must be a JSON string of standard base64: {exc}',
            field="payload",
        ) from None


def prepare(
    ev: EventIn, limits: Limits, *, json_checked: bool = False
) -> tuple[bytes, str, str, str, bytes, bytes | None, bool]:
    """Validate one incoming event.

    Returns ``(id_bytes, tenant_id, entity_id, event_type, payload, metadata, binary)``; the
    id is empty when the client gave none (the store assigns one); ``binary``: the payload is
    bytes (decoded from base64), not JSON text. Raises ValidationError or LimitExceeded naming
    the field. ``json_checked``: payload and metadata come from msgspec's decoder, which
    checked their syntax (the HTTP routes); else they are parsed.
    """
    validate_tenant_id(ev.tenant_id)
    validate_entity_id(ev.entity_id, limits)
    validate_event_type(ev.event_type, limits)
    binary = ev.payload_encoding == "base64"
    if not binary and ev.payload_encoding != "json":
        raise ValidationError(
            f"payload_encoding must be one of {', '.join(PAYLOAD_ENCODINGS)}, "
            f"not {ev.payload_encoding[:32]!r}",
            field="payload_encoding",
        )
    payload = bytes(ev.payload)
    if binary:
        payload = decode_base64_payload(payload)
    if len(payload) > limits.payload_bytes_max:
        raise LimitExceeded(
            f"payload is {len(payload)} bytes; the limit is {limits.payload_bytes_max}",
            field="payload",
            limit=limits.payload_bytes_max,
        )
    if not binary:
        if not json_checked:
            check_json(payload, "payload")
        check_utf8(payload, "payload")
        check_numbers(payload, "payload")
    metadata: bytes | None = None
    if ev.metadata is not None:
        metadata = bytes(ev.metadata)
        if not json_checked and len(metadata) <= limits.metadata_bytes_max:
            check_json(metadata, "metadata")
        first = _first_json_byte(metadata)
        if first == ord("n"):
            metadata = None
        elif first != ord("{"):
            raise ValidationError("metadata must be a JSON object or null", field="metadata")
        elif len(metadata) > limits.metadata_bytes_max:
            raise LimitExceeded(
                f"metadata is {len(metadata)} bytes; the limit is {limits.metadata_bytes_max}",
                field="metadata",
                limit=limits.metadata_bytes_max,
            )
        else:
            check_utf8(metadata, "metadata")
            check_numbers(metadata, "metadata")
    if ev.expected_version is not None and ev.expected_version < 0:
        raise ValidationError("expected_version must be >= 0", field="expected_version")
    event_id = ev.id.bytes if ev.id is not None else b""
    return event_id, ev.tenant_id, ev.entity_id, ev.event_type, payload, metadata, binary


_json_decoder_event = msgspec.json.Decoder(EventIn)
_json_decoder_batch = msgspec.json.Decoder(BatchIn)


def _decode_error(exc: msgspec.DecodeError) -> ValidationError | MalformedJson:
    text = str(exc)
    if text.startswith(("JSON is malformed", "Input data was truncated")):
        return MalformedJson(f"malformed JSON: {text}")
    return ValidationError(text)


def _too_deep() -> ValidationError:
    # msgspec recurses once per level, also to skip over a Raw value, and gives up at Python's
    # recursion limit (~1,000 levels less the caller's stack): a body that deep is refused as
    # a whole (which field is unknown), however deep the stack happened to be
    return ValidationError(
        f"JSON nested too deeply (Python's limit is {sys.getrecursionlimit()} levels, less "
        "what the server's own calls use)"
    )


def decode_event_json(data: bytes) -> EventIn:
    """Decode one event from JSON; ValidationError with a clear message on any defect."""
    try:
        return _json_decoder_event.decode(data)
    except msgspec.DecodeError as exc:
        raise _decode_error(exc) from exc
    except RecursionError:
        raise _too_deep() from None


def decode_batch_json(data: bytes) -> BatchIn:
    try:
        return _json_decoder_batch.decode(data)
    except msgspec.DecodeError as exc:
        raise _decode_error(exc) from exc
    except RecursionError:
        raise _too_deep() from None
