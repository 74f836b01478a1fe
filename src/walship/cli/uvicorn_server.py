"""A uvicorn server that reports when it is ready and lets its caller finish the shutdown.

Imported only by ``walship serve``, so the other commands do not pay for importing uvicorn.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Generator
from types import FrameType

import uvicorn

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NodeServer(uvicorn.Server):
    """``uvicorn.Server`` with a ready callback and no re-raised stop signal.

    Stock uvicorn re-raises the SIGTERM/SIGINT it caught once it has drained, which kills the
    process before ``walship serve`` can close the node (flush and fsync the WAL). Here the
    signal is only recorded in ``stop_signal``; the caller closes the node and exits 0.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        on_started: Callable[[], None],
        on_draining: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._on_draining = on_draining
        self.stop_signal: int | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits for open responses to finish before the node stops, and a
        # subscription never finishes on its own: tell them to end first
        if self._on_draining is not None:
            self._on_draining()
        await super().shutdown(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self._stop) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = sig
        # a second Ctrl-C skips waiting for open connections (uvicorn's own behaviour)
        self.handle_exit(sig, frame)
