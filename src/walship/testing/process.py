"""Run ``walship serve`` as a child process: start, wait until ready, stop, kill.

Used by ``walship demo``, ``walship verify``, the tests and the benchmarks; it lives in the
library, not in ``cli/``, so that ``verify/`` needs nothing of the CLI. The child's stdout and
stderr go to a log file, never to a pipe nobody drains (a full pipe would stall the server).
The server is started with ``--http-port 0`` unless a port is given, and its URL is read from
its start line, so there is no window in which another process can take a port chosen in
advance.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

START_LINE_MARK = "serving "
"""``walship serve``'s start line reads ``walship NODE serving URL ...``: the URL follows this.

Defined here, with the parser that depends on it; the serve command prints it.
"""

_URL_RE = re.compile(re.escape(START_LINE_MARK) + r"(https?://\S+)")
_REPLICATION_RE = re.compile(r" replication=(\S+)")


class NodeStartError(RuntimeError):
    """The child exited or did not become healthy in time; the message holds its log tail."""


class NodeProcess:
    """One ``walship serve`` child. Use as a context manager: the child never outlives it."""

    def __init__(
        self,
        data_dir: Path,
        *,
        node_id: str = "walship-1",
        host: str = "127.0.0.1",
        port: int = 0,
        fsync: str = "always",
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        self.data_dir = data_dir
        self.verify = verify  # HTTPS trust for its /health (a node with --http-tls-cert)
        self.node_id = node_id
        self.host = host
        self.port = port
        self.fsync = fsync
        self.extra_args = list(extra_args)
        self.log_path = log_path or data_dir.parent / f"{node_id}.log"
        self.env = env
        self.url = ""
        self.start_line = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "walship",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--http-host",
            self.host,
            "--http-port",
            str(self.port),
            "--node-id",
            self.node_id,
            "--fsync",
            self.fsync,
            *self.extra_args,
        ]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the child without waiting for it (``wait_ready`` waits)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.node_id} is already running (pid {self.process.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal reaches only the parent
            )
        self.url = ""
        return self.process

    def start(self, timeout_s: float = 30.0) -> NodeProcess:
        """Start the child and wait until ``/health`` answers; NodeStartError otherwise."""
        self.spawn()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait for the start line, then for ``/health`` to answer 200."""
        proc = self._require_process()
        deadline = time.monotonic() + timeout_s
        while not self.url:
            match = _URL_RE.search(self.log())
            if match:
                self.url = match.group(1)
                self.start_line = next(
                    line for line in self.log().splitlines() if START_LINE_MARK in line
                )
                break
            self._check_alive(proc)
            if time.monotonic() > deadline:
                raise NodeStartError(
                    f"{self.node_id}: no start line after {timeout_s} s{self._tail()}"
                )
            time.sleep(0.02)
        with httpx.Client(timeout=2.0, verify=self.verify) as client:
            while True:
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                self._check_alive(proc)
                if time.monotonic() > deadline:
                    raise NodeStartError(
                        f"{self.node_id}: /health not answering after {timeout_s} s{self._tail()}"
                    )
                time.sleep(0.05)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (graceful: the node flushes and closes its WAL); SIGKILL after ``timeout_s``.

        Returns the exit code (negative for a signal, as subprocess reports it).
        """
        proc = self.process
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the child (a crash: nothing is flushed) and reap it."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        """Wait for a child that is expected to exit by itself; kill it after ``timeout_s``."""
        proc = self._require_process()
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    @property
    def replication_address(self) -> str | None:
        """A leader's replication listener ``HOST:PORT`` from its start line.

        None before the start line, on a follower, and on a leader that does not listen
        (``replication=off``: no shared secret).
        """
        # the last match: the note ends the line, after the data dir (which could contain it)
        found = _REPLICATION_RE.findall(self.start_line)
        if not found or found[-1] == "off":
            return None
        return str(found[-1])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """What the child wrote since its last start."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"{self.node_id} was never started")
        return self.process

    def _check_alive(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            raise NodeStartError(
                f"{self.node_id} exited with code {proc.returncode} while starting{self._tail()}"
            )

    def _tail(self, lines: int = 20) -> str:
        tail = self.log().splitlines()[-lines:]
        return (":\n    " + "\n    ".join(tail)) if tail else ""

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self.kill()

    def __repr__(self) -> str:
        state = "RUNNING" if self.running else "STOPPED"
        return f"<NodeProcess {self.node_id} {state} {self.url or '-'}>"
