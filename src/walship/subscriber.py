"""The client side of subscriptions: iterate a node's event stream, and resume after the last
event delivered whenever the connection drops.

Used by ``Client.subscribe`` and ``AsyncClient.subscribe``. An event is handed to the caller
once: after a transport error, a 503 or the server ending the stream (it is draining), the
iterator connects again (to the next URL it was given, after a short backoff) with
``Last-Event-ID`` set to the lsn and term of the last event it yielded, so the server goes on
right after it. Errors that asking again cannot cure (4xx: a bad filter) are raised at once;
so is ``Unavailable`` when no node has answered for ``give_up_after_s``, and ``LogCut`` when a
failover repair cut events this iterator had yielded (the server's ``event: cut``, or a 409
``log_cut`` on resume): the consumer must rebuild from a position it trusts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import httpx
import msgspec

from walship.client_calls import error_of
from walship.errors import Unavailable, WalshipError, error_class_for
from walship.sse import CUT_EVENT, SseDecoder, SseEvent

STREAM_PATH = "/api/v1/events/stream"
STREAM_READ_TIMEOUT_S = 60.0  # several server keepalives (15 s): silence this long is a dead link
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
GIVE_UP_AFTER_S = 60.0
FILTERS = frozenset({"tenant_id", "entity_id", "event_type", "event_type_prefix", "from_position"})


class HasLsn(Protocol):
    @property
    def lsn(self) -> int: ...


E = TypeVar("E", bound=HasLsn)


class _Reconnect(Exception):
    """The stream broke in a way that connecting again can mend."""


def stream_params(from_lsn: int, filters: Mapping[str, Any]) -> dict[str, str | int]:
    """The subscription's query parameters; TypeError names filters the route does not take."""
    unknown = set(filters) - FILTERS
    if unknown:
        raise TypeError(f"unknown subscription filters: {sorted(unknown)}")
    if from_lsn < 0:
        raise ValueError(f"from_lsn must be >= 0, not {from_lsn}")
    params: dict[str, str | int] = {k: v for k, v in filters.items() if v is not None}
    params["from_lsn"] = from_lsn
    return params


def _refusal_of(body: Any, status: int) -> WalshipError:
    """The error a ``cut`` frame's JSON stands for (LogCut), with ``status`` as its HTTP one."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        details = {k: v for k, v in body.items() if k not in ("error", "message")}
        exc = error_class_for(body["error"])(str(body.get("message", body["error"])), **details)
    else:
        exc = WalshipError(f"a subscription ended with an unreadable cut frame: {body!r:.200}")
    exc.status = status
    return exc


def _check(response: httpx.Response) -> None:
    """Raise a 4xx refusal; _Reconnect for a 5xx (a node starting, draining, overloaded)."""
    if response.status_code >= 500:
        raise _Reconnect(f"HTTP {response.status_code}")
    if response.status_code >= 400:
        raise error_of(response)


class _Resume:
    """Where the iterator stands: the last lsn yielded, which URL is next, the backoff."""

    def __init__(self, urls: Sequence[str], from_lsn: int, give_up_after_s: float) -> None:
        if not urls:
            raise ValueError("subscribe needs at least one URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.after = max(from_lsn, 1) - 1
        self.after_term: int | None = None  # the term of the event at ``after``, once one came
        self.turn = 0
        self.failures = 0
        self.failing_since: float | None = None
        self.give_up_after_s = give_up_after_s
        self.last_error = ""

    def request(
        self, params: dict[str, str | int]
    ) -> tuple[str, dict[str, str | int], dict[str, str]]:
        url = self.urls[self.turn % len(self.urls)] + STREAM_PATH
        if self.after > 0:
            resume = (
                str(self.after) if self.after_term is None else f"{self.after}:{self.after_term}"
            )
            return url, {**params, "from_lsn": self.after + 1}, {"Last-Event-ID": resume}
        return url, params, {}

    def connected(self) -> None:
        self.failures = 0
        self.failing_since = None

    def accept(self, sse: SseEvent, kind: type[E]) -> E | None:
        """The event a frame carries; None for one already delivered. LogCut for the frame
        that says a repair cut the log under the stream."""
        if sse.event == CUT_EVENT:
            raise _refusal_of(msgspec.json.decode(sse.data), 409)
        event = msgspec.json.decode(sse.data, type=kind)
        if event.lsn <= self.after:
            return None  # already delivered (never sent twice by walship; cheap to be sure)
        self.after = event.lsn
        self.after_term = getattr(event, "term", None)
        return event

    def failed(self, why: str) -> float:
        """The pause before the next attempt; Unavailable once failing too long."""
        now = time.monotonic()
        self.last_error = why
        if self.failing_since is None:
            self.failing_since = now
        elif now - self.failing_since > self.give_up_after_s:
            raise Unavailable(
                f"no node answered the subscription for {self.give_up_after_s:.0f} s "
                f"(last: {why}); resume from lsn {self.after + 1}",
                resume_from_lsn=self.after + 1,
            )
        self.turn += 1
        self.failures += 1
        return min(BACKOFF_FIRST_S * 2.0 ** (self.failures - 1), BACKOFF_MAX_S)


class Subscription(Iterator[E]):
    """``subscribe``'s iterator, with a ``close`` that any thread may call: the thread
    iterating it (blocked reading the stream, or waiting to connect again) stops at once and
    its ``next`` raises StopIteration. Closing a generator from another thread is refused
    while it runs, and closing a socket another thread reads does not wake that read: the
    connection is shut down instead."""

    def __init__(
        self, http: httpx.Client, state: _Resume, params: dict[str, str | int], kind: type[E]
    ) -> None:
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._events = _follow(http, state, params, kind, self)

    def __iter__(self) -> Subscription[E]:
        return self

    def __next__(self) -> E:
        return next(self._events)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """End the subscription from any thread (its iterator ends; no reconnect)."""
        with self._lock:
            self._closed.set()
            sock, self._socket = self._socket, None
        if sock is not None:
            _shut_down(sock)

    def opened(self, response: httpx.Response) -> None:
        """The iterating thread connected: keep the socket for ``close`` (none behind a
        caller's own transport: then it ends at the next chunk or keepalive)."""
        stream = response.extensions.get("network_stream")
        sock = None if stream is None else stream.get_extra_info("socket")
        with self._lock:
            if not self._closed.is_set():
                self._socket = sock
                return
        if sock is not None:  # closed while connecting
            _shut_down(sock)

    def pause(self, seconds: float) -> None:
        """Wait before connecting again; at once when closed meanwhile."""
        self._closed.wait(seconds)


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its reader
        sock.shutdown(socket.SHUT_RDWR)


def subscribe(
    http: httpx.Client,
    urls: Sequence[str],
    kind: type[E],
    from_lsn: int,
    filters: Mapping[str, Any],
    give_up_after_s: float = GIVE_UP_AFTER_S,
) -> Subscription[E]:
    """Every matching event from ``from_lsn`` on, in lsn order, once; never ends by itself
    (``close`` it from any thread).

    Bad arguments (an unknown filter) raise here, not at the first ``next``.
    """
    params = stream_params(from_lsn, filters)
    return Subscription(http, _Resume(urls, from_lsn, give_up_after_s), params, kind)


def _follow(
    http: httpx.Client,
    state: _Resume,
    params: dict[str, str | int],
    kind: type[E],
    subscription: Subscription[E],
) -> Iterator[E]:
    timeout = httpx.Timeout(10.0, read=STREAM_READ_TIMEOUT_S)
    while not subscription.closed:
        url, query, headers = state.request(params)
        try:
            with http.stream("GET", url, params=query, headers=headers, timeout=timeout) as r:
                if r.status_code >= 400:
                    r.read()
                _check(r)
                state.connected()
                subscription.opened(r)
                decoder = SseDecoder()
                for chunk in r.iter_bytes():
                    if subscription.closed:  # no socket to shut down: at the next keepalive
                        return
                    for sse in decoder.feed(chunk):
                        if (event := state.accept(sse, kind)) is not None:
                            yield event
            why = "the server ended the stream"
        except (httpx.TransportError, _Reconnect) as exc:
            why = repr(exc)
        if subscription.closed:
            return
        subscription.pause(state.failed(why))


def subscribe_async(
    http: httpx.AsyncClient,
    urls: Sequence[str],
    kind: type[E],
    from_lsn: int,
    filters: Mapping[str, Any],
    give_up_after_s: float = GIVE_UP_AFTER_S,
) -> AsyncIterator[E]:
    """``subscribe`` for asyncio."""
    params = stream_params(from_lsn, filters)
    return _follow_async(http, _Resume(urls, from_lsn, give_up_after_s), params, kind)


async def _follow_async(
    http: httpx.AsyncClient, state: _Resume, params: dict[str, str | int], kind: type[E]
) -> AsyncIterator[E]:
    timeout = httpx.Timeout(10.0, read=STREAM_READ_TIMEOUT_S)
    while True:
        url, query, headers = state.request(params)
        try:
            async with http.stream("GET", url, params=query, headers=headers, timeout=timeout) as r:
                if r.status_code >= 400:
                    await r.aread()
                _check(r)
                state.connected()
                decoder = SseDecoder()
                async for chunk in r.aiter_bytes():
                    for sse in decoder.feed(chunk):
                        if (event := state.accept(sse, kind)) is not None:
                            yield event
            why = "the server ended the stream"
        except (httpx.TransportError, _Reconnect) as exc:
            why = repr(exc)
        await asyncio.sleep(state.failed(why))
