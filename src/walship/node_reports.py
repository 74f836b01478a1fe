"""Every node's ``/health`` as a blocking caller sees it: one ``NodeReport`` per URL.

``walship status`` and ``walship demo`` show these (``cli/status.py`` draws the tables); a
node that does not answer, or answers with something that is not a walship health document,
is a report saying why, never an exception. The URLs are asked at once from a few threads,
so a dead node costs one timeout, not one per node. (``peers.py`` is the asyncio flavour the
node itself uses to compare with its peers.)
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

CONNECT_TIMEOUT_S = 1.0
READ_TIMEOUT_S = 2.0
_FETCH_THREADS_MAX = 16
_REASON_CHARS_MAX = 80


@dataclass(frozen=True)
class NodeReport:
    """What one URL answered: its health document, or why there is none."""

    url: str
    health: dict[str, Any] | None = None
    error: str | None = None
    http_status: int | None = None

    @property
    def answered(self) -> bool:
        return self.health is not None

    @property
    def role(self) -> str | None:
        return None if self.health is None else str(self.health.get("role"))

    @property
    def node_id(self) -> str:
        return "?" if self.health is None else str(self.health.get("node_id", "?"))

    @property
    def replication(self) -> dict[str, Any]:
        found = None if self.health is None else self.health.get("replication")
        return found if isinstance(found, dict) else {}

    def as_json(self) -> dict[str, Any]:
        if self.health is not None:
            return {"url": self.url, "http_status": self.http_status, "health": self.health}
        return {"url": self.url, "http_status": self.http_status, "error": self.error}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {READ_TIMEOUT_S:g} s"
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= _REASON_CHARS_MAX else text[: _REASON_CHARS_MAX - 1] + "…"


def fetch_health(client: httpx.Client, url: str) -> NodeReport:
    """GET ``url/health``. A node answering 503 with its health document still counts."""
    try:
        response = client.get(f"{url}/health")
    except httpx.InvalidURL as exc:
        return NodeReport(url, error=f"bad URL: {_reason(exc)}")
    except (httpx.HTTPError, OSError) as exc:
        return NodeReport(url, error=f"unreachable: {_reason(exc)}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "status" in body and "role" in body:
        return NodeReport(url, health=body, http_status=response.status_code)
    return NodeReport(
        url,
        error=f"not a walship node: HTTP {response.status_code} from /health",
        http_status=response.status_code,
    )


def collect(client: httpx.Client, urls: Sequence[str]) -> list[NodeReport]:
    """Ask every URL at once (a dead node costs one timeout, not one per node), in order."""
    if not urls:
        return []
    workers = min(len(urls), _FETCH_THREADS_MAX)
    with ThreadPoolExecutor(workers, thread_name_prefix="walship-status") as pool:
        return list(pool.map(lambda url: fetch_health(client, url), urls))


def make_client(verify: bool | ssl.SSLContext = True) -> httpx.Client:
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    return httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, verify=verify)
