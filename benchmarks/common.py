"""Helpers shared by the benchmarks: payloads, a server subprocess, percentiles, results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"
PAYLOAD_NOTE = "x" * 900


_RANDOM = os.urandom(4 << 20).hex()


def event(i: int, entities: int = 10_000) -> dict[str, Any]:
    """A ~1 KB event (as the issue's targets assume), about half of it incompressible."""
    start = (i * 7919) % (len(_RANDOM) - 450)
    note = _RANDOM[start : start + 450] + PAYLOAD_NOTE[:450]
    return {
        "entity_id": f"account-{i % entities}",
        "event_type": "account.credited",
        "payload": {"amount": i % 997, "currency": "EUR", "seq": i, "note": note},
        "metadata": {"source": "bench", "trace": f"{i:016x}"},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(round(p / 100 * (len(ordered) - 1)), len(ordered) - 1)
    return ordered[k]


@contextlib.contextmanager
def server(data_dir: Path, *extra: str, port: int | None = None) -> Iterator[str]:
    """Run ``walship serve`` in a subprocess; yields its base URL; always stops it."""
    port = port or free_port()
    env = dict(os.environ)
    cmd = [
        sys.executable, "-m", "walship", "serve",
        "--data-dir", str(data_dir), "--http-host", "127.0.0.1", "--http-port", str(port),
        "--fsync", "always", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"server exited: {err}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy")
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RawHttp:
    """A keep-alive HTTP/1.1 client on one socket, for latency: a request costs it a
    ``sendall`` and a ``recv`` or two, where httpx adds ~0.5 ms of Python per request — as
    much as the replication being measured. Answers must carry Content-Length (walship's do).
    """

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.host = host
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._recv()
        header, _, rest = data.partition(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (h.partition(b":") for h in lines[1:])
                      if k.strip().lower() == b"content-length")  # fmt: skip
        while len(rest) < length:
            rest += self._recv()
        return status, rest[:length]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def save(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    results = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine(), **results}  # fmt: skip
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"entity_id":"acct-%d","event_type":"account.credited",'
    .. '"payload":{"amount":%d,"note":"%s"}}', counter % 10000, counter, string.rep("x", 900))
  return wrk.format(nil, "/api/v1/events", nil, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_single(url: str, seconds: float, clients: int = 64) -> dict[str, Any]:
    """Single-event POSTs from ``clients`` wrk connections for ``seconds``: requests, errors,
    events/s and latency p50/p99. Needs ``wrk`` (``apt-get install wrk``)."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk not installed (apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
        script = f.name
    try:
        out = subprocess.run(
            ["wrk", "-t2", f"-c{clients}", f"-d{max(1, round(seconds))}s", "-s", script, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script)
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    requests, duration_us, errors, p50, p99 = map(int, line.split()[1:])
    return {
        "requests": requests,
        "errors": errors,
        "events_per_s": round(requests / (duration_us / 1e6)),
        "p50_ms": round(p50 / 1000, 3),
        "p99_ms": round(p99 / 1000, 3),
    }
