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

from walship.errors import MalformedMsgpack, UnsupportedMediaType, ValidationError
from walship.events import base64_json

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
# curl -d sends form-urlencoded unless told otherwise; such a body was always read as JSON
_JSON_TYPES = frozenset({"", JSON, "application/x-www-form-urlencoded"})

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder()


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


def _binary_payload(event: dict[str, Any]) -> None:
    """A ``bin`` payload becomes the JSON body's base64 payload, in place."""
    payload = event.get("payload")
    if not isinstance(payload, bytes | bytearray | memoryview):
        return
    encoding = event.get("payload_encoding", "base64")
    if encoding != "base64":
        raise ValidationError(
            f"a bin payload is binary; payload_encoding {str(encoding)[:32]!r} says otherwise",
            field="payload_encoding",
        )
    event["payload"] = base64_json(bytes(payload))[1:-1].decode("ascii")
    event["payload_encoding"] = "base64"


def msgpack_to_json(data: bytes, *, batch: bool) -> bytes:
    """The JSON body a msgpack write body stands for (see the module); MalformedMsgpack when
    it is not one msgpack value, ValidationError when a value has no JSON form."""
    try:
        body = _msgpack_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise MalformedMsgpack(f"malformed msgpack: {exc}") from None
    except RecursionError:
        raise ValidationError("msgpack nested too deeply") from None
    events = body.get("events") if batch and isinstance(body, dict) else [body]
    if isinstance(events, list):
        for event in events:
            if isinstance(event, dict):
                _binary_payload(event)
    _check_json_form(body, "body")
    return _json_encoder.encode(body)
