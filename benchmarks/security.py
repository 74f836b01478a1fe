"""What authentication and TLS cost on the HTTP benchmarks (issue 14).

One node per configuration — ``--auth none``, an API key (``X-API-Key``), a JWT (HS256,
``Authorization: Bearer``), each over plain HTTP and over HTTPS (a P-256 certificate) — with
``--fsync always`` and ~1 KB events, measuring:

  (a) HTTP batches of 1,000 events over 4 connections: events/s
  (b) HTTP single events from 64 clients (wrk, keep-alive): events/s
  (c) single-write latency on one keep-alive connection: p50 and p99

and each figure as a ratio to the same run with ``--auth none`` over plain HTTP (target: at
least 0.9 for batches). Connections are kept alive, as clients do: the TLS handshake is paid
once per connection, and what is measured is the per-request cost (checking a key or a token,
encrypting the bytes).

Run: ``python benchmarks/security.py [--quick]``. Results go to
``benchmarks/results/security.json`` (not for ``--quick``), and the table of docs/benchmarks.md
is printed.
The figures mean something only on an otherwise idle machine; ``--quick`` only shows that it
runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).parent))
from common import event, percentile, save

TARGETS = {"batch_ratio_min": 0.9}
HS256_SECRET = b"walship-benchmark-hs256-secret-of-32-bytes-or-more"


@dataclass(frozen=True)
class Setup:
    """One configuration: how the node authenticates and whether it serves HTTPS."""

    auth: str  # "none", "api-key", "jwt"
    tls: bool

    @property
    def name(self) -> str:
        return f"{self.auth}/{'https' if self.tls else 'http'}"


SETUPS = [Setup(auth, tls) for tls in (False, True) for auth in ("none", "api-key", "jwt")]


def make_files(d: Path) -> dict[str, Any]:
    """A key file with one write key of every tenant, an HS256 secret and a token made with
    it, a self-signed certificate for 127.0.0.1: what every setup needs."""
    import jwt

    from walship.apikeys import ApiKeyFile, Role

    keys = d / "keys.json"
    api_key = ApiKeyFile(keys).create(Role.WRITE, None)[1]
    secret = d / "jwt.key"
    secret.write_bytes(HS256_SECRET)
    claims = {"sub": "bench", "role": "write", "tenants": "*", "exp": int(time.time()) + 86_400}
    token = jwt.encode(claims, HS256_SECRET, algorithm="HS256")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(d / "http.key"), "-out", str(d / "http.crt")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return {"keys": keys, "api_key": api_key, "secret": secret, "token": token, "dir": d}


def node_args(setup: Setup, files: dict[str, Any]) -> list[str]:
    args: list[str] = []
    if setup.auth == "api-key":
        args += ["--api-keys-file", str(files["keys"])]
    elif setup.auth == "jwt":
        args += ["--jwt-key-file", str(files["secret"]), "--auth", "required"]
    if setup.tls:
        d = files["dir"]
        args += ["--http-tls-cert", str(d / "http.crt"), "--http-tls-key", str(d / "http.key")]
    return args


def headers_of(setup: Setup, files: dict[str, Any]) -> dict[str, str]:
    if setup.auth == "api-key":
        return {"X-API-Key": files["api_key"]}
    if setup.auth == "jwt":
        return {"Authorization": f"Bearer {files['token']}"}
    return {}


def client_tls(setup: Setup, files: dict[str, Any]) -> ssl.SSLContext | bool:
    if not setup.tls:
        return True
    return ssl.create_default_context(cafile=str(files["dir"] / "http.crt"))


# ---------------------------------------------------------------------- (a) batches


async def _batches(url: str, bodies: list[bytes], headers: dict[str, str], verify: Any) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60, verify=verify) as client:
            while not queue.empty():
                r = await client.post(
                    "/api/v1/events/batch",
                    content=queue.get_nowait(),
                    headers={**headers, "content-type": "application/json"},
                )
                r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(4)))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- (b) single events

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%(headers)s
counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"entity_id":"acct-%%d","event_type":"account.credited",'
    .. '"payload":{"amount":%%d,"note":"%%s"}}', counter %% 10000, counter, string.rep("x", 900))
  return wrk.format(nil, "/api/v1/events", nil, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d\\n", summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout))
end
"""


def _single(url: str, headers: dict[str, str], seconds: int, tmp: Path) -> dict[str, Any]:
    lines = "\n".join(f"wrk.headers[{k!r}] = {v!r}" for k, v in headers.items())
    script = tmp / "single.lua"
    script.write_text(WRK_SCRIPT % {"headers": lines})
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    requests, duration_us, errors = map(int, line.split()[1:])
    return {"single_events_per_s": round(requests / (duration_us / 1e6)), "single_errors": errors}


# ---------------------------------------------------------------------- (c) latency


class KeepAlive:
    """One keep-alive HTTP/1.1 connection (TLS when given a context) on a raw socket: httpx
    adds ~0.5 ms of Python per request, more than what is measured here."""

    def __init__(self, url: str, headers: dict[str, str], tls: ssl.SSLContext | None) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = tls.wrap_socket(sock, server_hostname=host) if tls else sock
        self.head = f"POST /api/v1/events HTTP/1.1\r\nHost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )

    def post(self, body: bytes) -> int:
        self.sock.sendall(
            f"{self.head}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body
        )  # fmt: skip
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._recv()
        header, _, rest = data.partition(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        length = next(int(v) for k, _, v in (h.partition(b":") for h in lines[1:])
                      if k.strip().lower() == b"content-length")  # fmt: skip
        while len(rest) < length:
            rest += self._recv()
        return int(lines[0].split()[1])

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def _latency(url: str, headers: dict[str, str], tls: Any, writes: int) -> dict[str, Any]:
    conn = KeepAlive(url, headers, tls if isinstance(tls, ssl.SSLContext) else None)
    times = []
    try:
        for i in range(writes):
            body = msgspec.json.encode(event(i))
            t0 = time.perf_counter()
            status = conn.post(body)
            times.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise RuntimeError(f"single write answered {status}")
    finally:
        conn.close()
    warm = times[min(50, len(times) // 10) :]  # the first writes warm caches up
    return {
        "single_p50_ms": round(percentile(warm, 50), 3),
        "single_p99_ms": round(percentile(warm, 99), 3),
    }


# ---------------------------------------------------------------------- the runs


def run_setup(setup: Setup, files: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict:
    from walship.testing.process import NodeProcess

    headers = headers_of(setup, files)
    verify = client_tls(setup, files)
    bodies = [
        msgspec.json.encode({"events": [event(b * 1000 + i) for i in range(1000)]})
        for b in range(args.batch_events // 1000)
    ]
    result: dict[str, Any] = {}
    for part in ("batch", "single", "latency"):  # a fresh node for each: same starting point
        data = tmp / f"{setup.auth}-{'tls' if setup.tls else 'plain'}-{part}"
        node = NodeProcess(
            data, fsync="always", extra_args=node_args(setup, files), verify=verify
        ).start()
        try:
            if part == "batch":
                elapsed = asyncio.run(_batches(node.url, bodies, headers, verify))
                result["batch_events_per_s"] = round(len(bodies) * 1000 / elapsed)
            elif part == "single":
                if shutil.which("wrk") is None:
                    result["single_error"] = "wrk not installed (apt-get install wrk)"
                else:
                    result.update(_single(node.url, headers, args.seconds, tmp))
            else:
                result.update(_latency(node.url, headers, verify, args.writes))
        finally:
            node.stop()
    return result


def ratios(results: dict[str, dict[str, Any]]) -> None:
    """Each figure against ``none/http``'s (latency: base / this, so above 1 is faster)."""
    base = results["none/http"]
    for figures in results.values():
        for key, higher_is_better in (
            ("batch_events_per_s", True),
            ("single_events_per_s", True),
            ("single_p50_ms", False),
        ):
            if key in figures and key in base and figures[key] and base[key]:
                a, b = figures[key], base[key]
                figures[f"{key}_ratio"] = round(a / b if higher_is_better else b / a, 3)


def table(results: dict[str, dict[str, Any]]) -> str:
    """docs/benchmarks.md's table: each setup's figures and their ratios to ``none/http``."""
    out = [
        "| setup | HTTP batches of 1,000 | HTTP single events, 64 clients "
        "| single write p50 / p99 |",
        "|---|---|---|---|",
    ]
    for name, f in results.items():
        batch = f"{f.get('batch_events_per_s', '?'):,} events/s"
        single = f"{f.get('single_events_per_s', '?'):,} events/s"
        latency = f"{f.get('single_p50_ms', '?')} / {f.get('single_p99_ms', '?')} ms"
        if name != "none/http":
            batch += f" (ratio {f.get('batch_events_per_s_ratio', '?')})"
            single += f" (ratio {f.get('single_events_per_s_ratio', '?')})"
            latency += f" (ratio {f.get('single_p50_ms_ratio', '?')})"
        out.append(f"| {name} | {batch} | {single} | {latency} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-events", type=int, default=200_000)
    ap.add_argument("--seconds", type=int, default=10, help="of each wrk run")
    ap.add_argument("--writes", type=int, default=3_000, help="single writes timed one by one")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: shows that it runs")
    # scripts/bench passes its arguments to every benchmark: --tiny is --quick here, and the
    # peer and the part worker are replication.py's and ingest.py's
    ap.add_argument("--tiny", action="store_true", help="the same as --quick")
    ap.add_argument("--peer", choices=["postgres", "none"], help="(replication.py only)")
    ap.add_argument("--no-part-worker", action="store_true", help="(ingest/replication only)")
    ap.add_argument("--physical-followers", action="store_true", help="(replication only)")
    args = ap.parse_args()
    args.quick = args.quick or args.tiny
    if args.quick:
        args.batch_events, args.seconds, args.writes = 4_000, 1, 200
    if shutil.which("openssl") is None:
        sys.exit("benchmarks/security.py needs the openssl command (for a test certificate)")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="walship-bench-security-") as tmp:
        root = Path(tmp)
        files = make_files(root)
        for setup in SETUPS:
            print(f"{setup.name} ...", flush=True)
            results[setup.name] = run_setup(setup, files, args, root)
    ratios(results)
    print(json.dumps(results, indent=2))
    print(table(results))
    if args.quick:  # figures of tiny runs mean nothing: they do not replace measured ones
        print("--quick: not written to benchmarks/results")
        return
    sizes = {k: v for k, v in vars(args).items() if k != "quick"}
    path = save("security", {"targets": TARGETS, "sizes": sizes, "setups": results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
