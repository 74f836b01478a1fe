"""Body formats of the HTTP API: JSON, and msgpack for callers with binary payloads.

A write body is JSON unless its ``Content-Type`` says msgpack (``application/msgpack``); in a
msgpack body a ``bin`` payload is binary (stored as those bytes) and any other payload is a
value with a JSON form (maps with string keys, finite floats, no ``bin``/ext elsewhere), stored
as JSON text like a JSON body's. The msgpack body is turned into the JSON one it stands for
and read by the same decoder, so both formats accept exactly the same fields and rules.

An answer is msgpack when ``Accept`` names msgpack before JSON; a binary payload is then a
``bin`` value, and JSON payloads are their values. Error answers are always JSON.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import Any

import msgspec

from walship.errors import LimitExceeded, MalformedMsgpack, UnsupportedMediaType, ValidationError
from walship.events import base64_json
from walship.limits import Limits

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
# curl -d sends form-urlencoded unless told otherwise; such a body was always read as JSON
_JSON_TYPES = frozenset({"", JSON, "application/x-www-form-urlencoded"})

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder()
_shallow_map = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])
_shallow_list = msgspec.msgpack.Decoder(list[msgspec.Raw])
_raw_decoder = msgspec.msgpack.Decoder(msgspec.Raw)

FIELD_BYTES_MAX = 64 * 1024
"""The msgpack of a body's value other than a payload or metadata (ids, names, a tracking)."""
MAP_FIELDS_MAX = 256
"""Fields of a body or an event map (it has about ten; each costs objects before any check)."""


class Media(enum.Enum):
    JSON = JSON
    MSGPACK = MSGPACK

    def encode(self, value: Any) -> bytes:
        return (
            _msgpack_encoder.encode(value) if self is Media.MSGPACK else _json_encoder.encode(value)
        )


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _media_type(text: str) -> str:
    return text.split(";", 1)[0].strip().lower()


def request_media(headers: Iterable[tuple[bytes, bytes]]) -> Media:
    """The format of a request body by its ``Content-Type``; UnsupportedMediaType (415) for
    one that is neither JSON nor msgpack."""
    media = _media_type(_header(headers, b"content-type") or "")
    if media in _JSON_TYPES or media.endswith("+json"):
        return Media.JSON
    if media in _MSGPACK_TYPES:
        return Media.MSGPACK
    raise UnsupportedMediaType(
        f"a body of type {media[:64]!r} is not read here: send {JSON} or {MSGPACK}",
        content_type=media[:64],
    )


def response_media(headers: Iterable[tuple[bytes, bytes]]) -> Media:
    """msgpack when ``Accept`` names a msgpack type before any JSON one; else JSON."""
    accept = _header(headers, b"accept")
    if not accept or "msgpack" not in accept:
        return Media.JSON
    for item in accept.split(","):
        media = _media_type(item)
        if media in _MSGPACK_TYPES and not item.replace(" ", "").endswith(";q=0"):
            return Media.MSGPACK
        if media == JSON or media.endswith("+json"):
            return Media.JSON
    return Media.JSON


def _no_json_form(field: str, value: object) -> ValidationError:
    return ValidationError(
        f"{field} holds a msgpack {type(value).__name__}, which has no JSON form (only a whole "
        "payload may be binary)",
        field=field,
    )


def _check_json_form(value: object, field: str) -> None:
    """ValidationError unless ``value`` (decoded msgpack) has a JSON form as it is: a silent
    conversion (an int key to text, bytes to base64) would store something not sent."""
    stack = [value]
    while stack:
        item = stack.pop()
        if item is None or isinstance(item, bool | int | str):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValidationError(f"{field} holds {item}, which JSON cannot hold", field=field)
            continue
        if isinstance(item, list):
            stack.extend(item)
            continue
        if isinstance(item, dict):
            for key, inner in item.items():
                if not isinstance(key, str):
                    raise ValidationError(
                        f"{field} holds a map key that is not a string ({type(key).__name__})",
                        field=field,
                    )
                stack.append(inner)
            continue
        raise _no_json_form(field, item)


def _binary_as_base64(payload: object, encoding: object) -> str:
    """A ``bin`` payload as the JSON body's base64 text (``payload_encoding`` must allow it)."""
    if encoding is not None and encoding != "base64":
        raise ValidationError(
            f"a bin payload is binary; payload_encoding {str(encoding)[:32]!r} says otherwise",
            field="payload_encoding",
        )
    assert isinstance(payload, bytes | bytearray | memoryview)
    return base64_json(bytes(payload))[1:-1].decode("ascii")


def _value(raw: msgspec.Raw, field: str, bytes_max: int) -> Any:
    """One value of the body, decoded only when its msgpack is within ``bytes_max``: a byte of
    msgpack (an empty map) becomes a ~64-byte object, so a whole 32 MiB body decoded at once
    took gigabytes before any limit was looked at."""
    if len(raw) > bytes_max:
        raise LimitExceeded(
            f"{field} takes {len(raw)} bytes of msgpack, over the limit of {bytes_max}",
            field=field,
            limit=bytes_max,
        )
    try:
        return _msgpack_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise MalformedMsgpack(f"malformed msgpack in {field}: {exc}") from None
    except RecursionError:
        raise ValidationError(f"msgpack nested too deeply in {field}", field=field) from None


def _length(data: bytes | msgspec.Raw) -> int:
    """The element count a msgpack map or array header says; 0 for any other value."""
    raw = memoryview(data)
    first = raw[0] if raw.nbytes else 0
    if 0x80 <= first <= 0x9F:
        return first & 0x0F
    if first in (0xDC, 0xDE):
        return int.from_bytes(raw[1:3], "big")
    if first in (0xDD, 0xDF):
        return int.from_bytes(raw[1:5], "big")
    return 0


def _shallow(
    decoder: msgspec.msgpack.Decoder[Any],
    raw: bytes | msgspec.Raw,
    field: str,
    shape: str,
    count_max: int,
) -> Any:
    """A map or array whose values stay msgpack (``Raw``); LimitExceeded, before decoding,
    for more elements than ``count_max`` (each would take a ``Raw`` object)."""
    if _length(raw) > count_max:
        raise LimitExceeded(
            f"{field} has {_length(raw)} elements, over the limit of {count_max}",
            field=field,
            limit=count_max,
        )
    try:
        try:
            return decoder.decode(raw)
        except msgspec.ValidationError:
            # one msgpack value of another shape, or not msgpack at all (JSON sent as it)?
            _raw_decoder.decode(raw)  # skips the value: no object is built
            raise ValidationError(f"{field} must be a msgpack {shape}", field=field) from None
    except msgspec.DecodeError as exc:
        raise MalformedMsgpack(f"malformed msgpack: {exc}") from None
    except RecursionError:  # skipping a nested value recurses too
        raise ValidationError(f"msgpack nested too deeply in {field}", field=field) from None


def _map_json(raw: bytes | msgspec.Raw, field: str, limits: Limits, *, event: bool) -> msgspec.Raw:
    """The JSON of a msgpack map (the body, or an event), one value at a time."""
    fields: dict[str, msgspec.Raw] = _shallow(
        _shallow_map, raw, field, "map with string keys", MAP_FIELDS_MAX
    )
    out: dict[str, msgspec.Raw] = {}
    binary: str | None = None
    for key, value in fields.items():
        name = f"{field}.{key}"[:64]
        if event and key == "payload":
            # base64 text of a 1 MiB payload, or floats (9 bytes each) take more than its JSON
            decoded = _value(value, name, 2 * limits.payload_bytes_max)
            if isinstance(decoded, bytes | bytearray | memoryview):
                encoding = fields.get("payload_encoding")
                binary = _binary_as_base64(
                    decoded,
                    None if encoding is None else _value(encoding, name, FIELD_BYTES_MAX),
                )
                continue
        elif event and key == "metadata":
            decoded = _value(value, name, 2 * limits.metadata_bytes_max)
        else:
            decoded = _value(value, name, FIELD_BYTES_MAX)
        _check_json_form(decoded, "body")
        out[key] = msgspec.Raw(_json_encoder.encode(decoded))
    if binary is not None:
        out["payload"] = msgspec.Raw(_json_encoder.encode(binary))
        out["payload_encoding"] = msgspec.Raw(b'"base64"')
    return msgspec.Raw(_json_encoder.encode(out))


def msgpack_to_json(data: bytes, *, batch: bool, limits: Limits) -> bytes:
    """The JSON body a msgpack write body stands for (see the module); MalformedMsgpack when
    it is not one msgpack value, ValidationError when a value has no JSON form or the body is
    not a map, LimitExceeded when a value's msgpack is over its field's limit (checked before
    it is decoded: the body is decoded value by value, never whole)."""
    if not batch:
        return bytes(_map_json(data, "body", limits, event=True))
    fields: dict[str, msgspec.Raw] = _shallow(
        _shallow_map, data, "body", "map with string keys", MAP_FIELDS_MAX
    )
    out: dict[str, msgspec.Raw] = {}
    for key, value in fields.items():
        if key == "events":
            items: list[msgspec.Raw] = _shallow(
                _shallow_list, value, "events", "array", limits.batch_events_max
            )
            out[key] = msgspec.Raw(
                b"[%s]"
                % b",".join(
                    bytes(_map_json(item, f"events[{i}]", limits, event=True))
                    for i, item in enumerate(items)
                )
            )
        else:
            decoded = _value(value, f"body.{key}"[:64], FIELD_BYTES_MAX)
            _check_json_form(decoded, "body")
            out[key] = msgspec.Raw(_json_encoder.encode(decoded))
    return _json_encoder.encode(out)
