"""A real etcd for the automatic failover tests: one member on 127.0.0.1, ports chosen at run
time, data in a temporary directory, always stopped.

Tests skip (saying why) only when the ``etcd`` binary is missing; ``.ci/run`` installs
Debian's ``etcd-server`` so CI runs them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, attempts: int = 3) -> EtcdServer:
        binary = shutil.which("etcd")
        if binary is None:
            pytest.skip("etcd is not installed (apt-get install etcd-server; .ci/run does)")
        for _ in range(attempts):
            client, peer = free_port(), free_port()
            self.url = f"http://127.0.0.1:{client}"
            peer_url = f"http://127.0.0.1:{peer}"
            data = self.root / "etcd-data"
            shutil.rmtree(data, ignore_errors=True)
            log = open(self.root / "etcd.log", "ab")  # noqa: SIM115 (closed with the process)
            self.process = subprocess.Popen(
                [
                    binary,
                    "--name",
                    "walship-test",
                    "--data-dir",
                    str(data),
                    "--listen-client-urls",
                    self.url,
                    "--advertise-client-urls",
                    self.url,
                    "--listen-peer-urls",
                    peer_url,
                    "--initial-advertise-peer-urls",
                    peer_url,
                    "--initial-cluster",
                    f"walship-test={peer_url}",
                    "--log-level",
                    "warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            self.stop()  # a port taken meanwhile, or too slow: try other ports
        raise RuntimeError(f"etcd did not start; see {self.root / 'etcd.log'}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextmanager
def running_etcd(root: Path) -> Iterator[EtcdServer]:
    root.mkdir(parents=True, exist_ok=True)
    server = EtcdServer(root)
    try:
        yield server.start()
    finally:
        server.stop()
