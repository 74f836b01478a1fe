"""A Server-Sent Events reader for tests: a thread reads one subscription into a queue, so a
test can wait for events with a deadline, or check that none arrives, and cut the connection."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from typing import Any

import httpx
import msgspec

from walship.sse import SseDecoder


class SseReader:
    """One open subscription at ``url`` (a full URL with its query), read in a thread."""

    def __init__(
        self,
        url: str,
        *,
        last_event_id: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        headers = dict(headers or {})
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self._client = httpx.Client(timeout=httpx.Timeout(30.0, read=None))
        self._request = self._client.build_request("GET", url, headers=headers)
        self._response: httpx.Response | None = None
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.comments = 0
        self.cut: dict[str, Any] | None = None  # the ``event: cut`` frame that ended the stream
        self.error: BaseException | None = None
        self.status: int | None = None
        self.refusal = ""  # the body of an answer other than 200
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(30), "the subscription did not start"
        assert self.status == 200, f"subscription answered {self.status}: {self.refusal}"

    def _run(self) -> None:
        decoder = SseDecoder()
        try:
            self._response = self._client.send(self._request, stream=True)
            self.status = self._response.status_code
            if self.status != 200:
                self.refusal = self._response.read().decode(errors="replace")
            self._started.set()
            for line in self._response.iter_lines():
                if line.startswith(":"):
                    self.comments += 1
                ev = decoder.feed_line(line)
                if ev is not None and ev.event == "cut":
                    self.cut = msgspec.json.decode(ev.data)
                elif ev is not None:
                    body = msgspec.json.decode(ev.data)
                    assert ev.id == f"{body['lsn']}:{body['term']}", (ev.id, body)
                    self.events.put(body)
        except (httpx.HTTPError, RuntimeError) as exc:  # closed under us: the test cut it
            self.error = exc
        finally:
            self._started.set()

    def take(self, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """The next ``count`` events (AssertionError when they do not come in time)."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < count:
            remaining = deadline - time.monotonic()
            try:
                out.append(self.events.get(timeout=max(remaining, 0.01)))
            except queue.Empty:
                raise AssertionError(
                    f"got {len(out)} of {count} events in {timeout_s} s "
                    f"(last lsn {out[-1]['lsn'] if out else None}, error {self.error!r})"
                ) from None
        return out

    def take_until(self, lsn: int, since: int = 0, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Events up to and including the one at ``lsn`` (or the first beyond it), the last
        one already had being at ``since``."""
        out: list[dict[str, Any]] = []
        while (out[-1]["lsn"] if out else since) < lsn:
            out.extend(self.take(1, timeout_s))
        return out

    def drain(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.events.get_nowait())
        return out

    def close(self) -> None:
        """Cut the connection (the client goes away) and stop the thread."""
        if self._response is not None:
            # a blocking read in the thread only ends when the socket does
            stream = self._response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._client.close()
        self._thread.join(10)

    def __enter__(self) -> SseReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
