"""Other nodes as seen through their ``/health``: role, term and end of log.

Used by ``promote`` (refuse a candidate that another node it can see is ahead of), by
``walship failover`` and by the etcd campaign. A node that does not answer is a view with an
``error``, never an exception.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from walship.replication.insync import InSyncRecord, Witness, decode_record

CONNECT_TIMEOUT_S = 1.0
READ_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class PeerView:
    """What one URL answered."""

    url: str
    health: dict[str, Any] | None = None
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.health is not None

    def _get(self, key: str, default: Any = None) -> Any:
        return default if self.health is None else self.health.get(key, default)

    @property
    def node_id(self) -> str:
        return str(self._get("node_id", "?"))

    @property
    def role(self) -> str | None:
        role = self._get("role")
        return None if role is None else str(role)

    @property
    def term(self) -> int:
        return int(self._get("term", 0))

    @property
    def position(self) -> tuple[int, int]:
        """``(term of the last record, last lsn)``: how caught up the node is."""
        return int(self._get("last_term", 0)), int(self._get("last_lsn", 0))

    @property
    def fenced(self) -> str | None:
        fenced = self._get("fenced")
        return None if fenced is None else str(fenced)

    @property
    def in_sync_record(self) -> InSyncRecord | None:
        """The newest in-sync set this node made (a leader) or stored (a follower)."""
        return decode_record(self._get("in_sync_set"))

    def witness(self) -> Witness:
        return Witness(self.node_id, self.position, self.in_sync_record)

    @property
    def replication_address(self) -> str | None:
        """Where this node listens for followers (a leader; a follower's future listener)."""
        found = self._get("replication_address")
        return None if found is None else str(found)


def normalize_url(raw: str) -> str:
    """``host:port`` → ``http://host:port``; no trailing slash."""
    url = raw.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def split_urls(text: str | None) -> list[str]:
    """URLs from a comma-separated list (blanks dropped)."""
    return [normalize_url(u) for u in (text or "").split(",") if u.strip()]


async def fetch_views(urls: Sequence[str], verify: bool | ssl.SSLContext = True) -> list[PeerView]:
    """``/health`` of every URL at once, in the order given (``verify``: HTTPS trust)."""
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=timeout, verify=verify) as client:

        async def one(url: str) -> PeerView:
            try:
                response = await client.get(f"{url}/health")
                body = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                return PeerView(url, error=f"{type(exc).__name__}: {exc}".strip(": "))
            if not isinstance(body, dict) or "last_lsn" not in body:
                return PeerView(url, error=f"HTTP {response.status_code}: not a walship node")
            return PeerView(url, health=body)

        return list(await asyncio.gather(*(one(normalize_url(u)) for u in urls)))
