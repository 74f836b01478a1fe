"""A headless Chromium driven over the DevTools protocol, for the tests of the status page.

Debian's ``chromium`` is started with ``--remote-debugging-port=0`` and a profile of its own in
a temp dir; the port it picked is read from ``DevToolsActivePort`` there, and one page target
is driven through a websocket (``websockets``' sync client, already a dependency of uvicorn).
Every URL the page requests is recorded, so a test can show that nothing came from elsewhere.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 30.0


class BrowserError(AssertionError):
    pass


class Browser:
    """One headless Chromium with one page; ``close`` (or ``with``) stops it."""

    def __init__(self, profile: Path, *, width: int = 1360, height: int = 1100) -> None:
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed")
        profile.mkdir(parents=True, exist_ok=True)
        self.requests: list[str] = []
        self.request_headers: list[tuple[str, dict[str, str]]] = []  # (url, headers) of each
        self._ids = itertools.count(1)
        self._stack = contextlib.ExitStack()  # the websocket
        self._log = open(profile / "chromium.log", "wb")  # noqa: SIM115  # closed in close()
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",  # tests run as root in CI
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )
        try:
            port = self._wait_for_port(profile / "DevToolsActivePort")
            self._ws = self._connect_page(port)
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call("Network.enable")
        except BaseException:
            self.close()
            raise

    def _wait_for_port(self, path: Path) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrowserError(f"chromium exited with {self.process.returncode}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(path.read_text().splitlines()[0])
            time.sleep(0.1)
        raise BrowserError(f"chromium wrote no {path.name} within {START_TIMEOUT_S} s")

    def _connect_page(self, port: int) -> ClientConnection:
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t.get("type") == "page")
        websocket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        return self._stack.enter_context(websocket)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events met meanwhile are noted)."""
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"no answer to {method} within {CALL_TIMEOUT_S} s")
            message = json.loads(self._ws.recv(timeout=left))
            if message.get("method") == "Network.requestWillBeSent":
                request = message["params"]["request"]
                self.requests.append(request["url"])
                self.request_headers.append((request["url"], dict(request.get("headers", {}))))
            if message.get("id") == call_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def open(self, url: str, timeout_s: float = 30.0) -> None:
        """Navigate to ``url`` and wait until the document has loaded."""
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout_s, f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        answer = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression}: {answer['exceptionDetails']}")
        return answer.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        """Poll ``expression`` until it is truthy; BrowserError naming ``what`` otherwise."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while True:
            try:
                last = self.evaluate(expression)
            except BrowserError as exc:
                last = exc
            if last and not isinstance(last, BrowserError):
                return last
            if time.monotonic() > deadline:
                raise BrowserError(
                    f"timed out after {timeout_s} s waiting for {what}; last: {last}"
                )
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not just the window) at ``path``."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = self.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
