"""Server-Sent Events as walship writes and reads them: frames, the resume position, a decoder.

No I/O here: the HTTP route (``http/stream.py``) and the clients (``client.py``) share these
definitions. A subscription's frames are ``id: <lsn>:<term>`` + ``data: <event JSON>`` per
event (the event's lsn and the term that wrote it, in decimal, so a client reconnecting with
``Last-Event-ID`` resumes right after it, and the node can tell whether that event is still on
its log or a failover repair cut it), comment lines (``: keepalive``) that keep idle proxies
from closing the connection, and a last ``event: cut`` frame when a repair cut the log under
the stream. A plain ``<lsn>`` id (what walship sent before) is still taken on resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from walship.errors import InvalidParameter
from walship.limits import LSN_MAX

MEDIA_TYPE = "text/event-stream"
KEEPALIVE = b": keepalive\n\n"
RETRY_MS = 1_000  # what a browser's EventSource waits before it reconnects
LAST_EVENT_ID_CHARS_MAX = 40  # digits of LSN_MAX, a colon, digits of a term
CUT_EVENT = "cut"  # the ``event:`` name of the frame that ends a stream whose log was cut
LINE_BYTES_MAX = 8 * 1024 * 1024  # a client refuses longer lines (an event is at most ~1 MiB)


def encode_event(lsn: int, term: int, data: bytes) -> bytes:
    """One event frame; ``data`` is one line of JSON (msgspec never writes a newline)."""
    return b"id: %d:%d\ndata: %s\n\n" % (lsn, term, data)


def encode_cut(data: bytes) -> bytes:
    """The frame that ends a stream whose log a repair cut; no ``id``, so a browser's
    ``EventSource`` resumes (and is refused) from the last event it really had."""
    return b"event: %s\ndata: %s\n\n" % (CUT_EVENT.encode(), data)


def resume_id(lsn: int, term: int) -> str:
    """The ``Last-Event-ID`` that resumes right after the event at ``lsn`` of ``term``."""
    return f"{lsn}:{term}"


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a consumer resumes: after ``lsn``, which it had from ``term`` (None: not said)."""

    lsn: int
    term: int | None = None


def _decimal(text: str, most: int) -> bool:
    return bool(text) and text.isascii() and text.isdigit() and int(text) <= most


def parse_last_event_id(text: str) -> ResumePoint:
    """The position a ``Last-Event-ID`` names: ``<lsn>:<term>`` as walship sends it, or a
    plain decimal ``<lsn>``.

    InvalidParameter (400) for anything else: a resume position that cannot be read must not
    silently become "from the start" or "from now".
    """
    lsn, colon, term = text.partition(":")
    if (
        len(text) > LAST_EVENT_ID_CHARS_MAX
        or not _decimal(lsn, LSN_MAX)
        or (colon and not _decimal(term, LSN_MAX))
    ):
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise InvalidParameter(
            "Last-Event-ID must be the id of the last event received (<lsn>:<term> or <lsn>, "
            f"decimal), not {shown!r}",
            field="last-event-id",
        )
    return ResumePoint(int(lsn), int(term) if colon else None)


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event: its ``id`` (None when the frame had none), its data and its
    ``event`` name ("message" unless the frame named one, as for ``cut``)."""

    id: str | None
    data: str
    event: str = "message"


class SseDecoder:
    """Turns the lines of an event stream into events (comments and ``retry`` are dropped)."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._event = "message"
        self._data: list[str] = []

    def feed_line(self, line: str) -> SseEvent | None:
        """Take one line (without its end); the event it completes, if any."""
        if len(line) > LINE_BYTES_MAX:
            raise ValueError(f"event stream line of {len(line)} characters")
        if not line:
            if not self._data:
                self._id, self._event = None, "message"
                return None
            event = SseEvent(self._id, "\n".join(self._data), self._event)
            self._id, self._event, self._data = None, "message", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\x00" not in value:
            self._id = value
        elif name == "event":
            self._event = value or "message"
        return None

    def feed_lines(self, lines: Iterator[str]) -> Iterator[SseEvent]:
        for line in lines:
            event = self.feed_line(line)
            if event is not None:
                yield event
