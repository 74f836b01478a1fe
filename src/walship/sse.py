"""Server-Sent Events as walship writes and reads them: frames, the resume position, a decoder.

No I/O here: the HTTP route (``http/stream.py``) and the clients (``client.py``) share these
definitions. A subscription's frames are ``id: <lsn>`` + ``data: <event JSON>`` per event
(the ``id`` is the event's lsn in decimal, so a client reconnecting with ``Last-Event-ID``
resumes right after it), and comment lines (``: keepalive``) that keep idle proxies from
closing the connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from walship.errors import InvalidParameter
from walship.limits import LSN_MAX

MEDIA_TYPE = "text/event-stream"
KEEPALIVE = b": keepalive\n\n"
RETRY_MS = 1_000  # what a browser's EventSource waits before it reconnects
LAST_EVENT_ID_CHARS_MAX = 19  # digits of LSN_MAX
LINE_BYTES_MAX = 8 * 1024 * 1024  # a client refuses longer lines (an event is at most ~1 MiB)


def encode_event(lsn: int, data: bytes) -> bytes:
    """One event frame; ``data`` is one line of JSON (msgspec never writes a newline)."""
    return b"id: %d\ndata: %s\n\n" % (lsn, data)


def parse_last_event_id(text: str) -> int:
    """The lsn a ``Last-Event-ID`` names (decimal, as walship sends it).

    InvalidParameter (400) for anything else: a resume position that cannot be read must not
    silently become "from the start" or "from now".
    """
    if (
        not text
        or len(text) > LAST_EVENT_ID_CHARS_MAX
        or not text.isascii()
        or not text.isdigit()
        or int(text) > LSN_MAX
    ):
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise InvalidParameter(
            f"Last-Event-ID must be the decimal lsn of the last event received, not {shown!r}",
            field="last-event-id",
        )
    return int(text)


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event: its ``id`` (None when the frame had none) and its data."""

    id: str | None
    data: str


class SseDecoder:
    """Turns the lines of an event stream into events (comments and ``retry`` are dropped)."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._data: list[str] = []

    def feed_line(self, line: str) -> SseEvent | None:
        """Take one line (without its end); the event it completes, if any."""
        if len(line) > LINE_BYTES_MAX:
            raise ValueError(f"event stream line of {len(line)} characters")
        if not line:
            if not self._data:
                self._id = None
                return None
            event = SseEvent(self._id, "\n".join(self._data))
            self._id, self._data = None, []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\x00" not in value:
            self._id = value
        return None

    def feed_lines(self, lines: Iterator[str]) -> Iterator[SseEvent]:
        for line in lines:
            event = self.feed_line(line)
            if event is not None:
                yield event
