"""A small asyncio client for etcd's v3 JSON gateway (leases, keys, transactions) over httpx.

Only what automatic failover needs: grant / keep alive / revoke a lease, range and put keys,
delete, and a transaction (compare-and-swap). Keys and values are bytes on the wire as base64;
64-bit ids travel as decimal strings (the gateway's grpc-gateway encoding). Each call tries
the endpoints in order and raises ``EtcdUnavailable`` (retriable) when none answers within
``timeout_s``; an error answer from etcd is an ``EtcdError``.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from walship.errors import InvalidInput, ReplicationError


class EtcdError(ReplicationError):
    """etcd answered with an error."""

    code = "etcd_error"


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered in time."""

    code = "etcd_unavailable"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The key just past every key starting with ``prefix`` (etcd's range_end for a prefix)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class RangeResult:
    kvs: list[KeyValue]
    revision: int  # the store's revision when it was read


def compare_absent(key: bytes) -> dict[str, Any]:
    """Txn compare: ``key`` does not exist."""
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}


def compare_value(key: bytes, value: bytes) -> dict[str, Any]:
    return {"key": _b64(key), "result": "EQUAL", "target": "VALUE", "value": _b64(value)}


def compare_lease(key: bytes, lease: int) -> dict[str, Any]:
    """Txn compare: ``key`` is attached to ``lease``."""
    return {"key": _b64(key), "result": "EQUAL", "target": "LEASE", "lease": str(lease)}


def compare_mod_below(key: bytes, revision: int, range_end: bytes | None = None) -> dict[str, Any]:
    """Txn compare: no key in ``[key, range_end)`` was modified at or after ``revision``."""
    out: dict[str, Any] = {
        "key": _b64(key),
        "result": "LESS",
        "target": "MOD",
        "mod_revision": str(revision),
    }
    if range_end is not None:
        out["range_end"] = _b64(range_end)
    return out


def put_op(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


class EtcdClient:
    """One httpx client over the endpoints of one etcd cluster. Close with ``aclose``."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float = 1.0) -> None:
        self.endpoints = [e.strip().rstrip("/") for e in endpoints if e.strip()]
        if not self.endpoints:
            raise InvalidInput("--etcd needs at least one endpoint URL")
        self.endpoints = [e if "://" in e else f"http://{e}" for e in self.endpoints]
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), trust_env=False)
        self._preferred = 0

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for i in range(len(self.endpoints)):
            index = (self._preferred + i) % len(self.endpoints)
            try:
                response = await self._client.post(f"{self.endpoints[index]}{path}", json=body)
            except httpx.HTTPError as exc:
                last = exc
                continue
            self._preferred = index
            try:
                answer = response.json()
            except ValueError as exc:
                raise EtcdError(f"etcd {path}: not JSON (HTTP {response.status_code})") from exc
            if response.status_code != 200 or "error" in answer:
                raise EtcdError(f"etcd {path}: {answer.get('message') or answer}")
            result: dict[str, Any] = answer.get("result", answer)
            return result
        raise EtcdUnavailable(f"no etcd endpoint answered {path}: {last!r}")

    async def grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its id."""
        answer = await self._call("/v3/lease/grant", {"TTL": ttl_s})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; the TTL it now has (0: it has expired)."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """Revoke ``lease`` (its keys go); a lease already gone is fine."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdUnavailable:
            raise
        except EtcdError:
            pass

    async def get(self, key: bytes, *, prefix: bool = False) -> RangeResult:
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        answer = await self._call("/v3/kv/range", body)
        kvs = [
            KeyValue(
                base64.b64decode(kv["key"]),
                base64.b64decode(kv.get("value", "")),
                int(kv.get("create_revision", 0)),
                int(kv.get("mod_revision", 0)),
                int(kv.get("lease", 0)),
            )
            for kv in answer.get("kvs", [])
        ]
        return RangeResult(kvs, int(answer.get("header", {}).get("revision", 0)))

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        await self._call("/v3/kv/put", put_op(key, value, lease)["request_put"])

    async def delete(self, key: bytes) -> None:
        await self._call("/v3/kv/deleterange", {"key": _b64(key)})

    async def txn(
        self,
        compare: Sequence[dict[str, Any]],
        success: Sequence[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
    ) -> bool:
        """Run a transaction; True when every compare held (the success ops ran)."""
        answer = await self._call(
            "/v3/kv/txn",
            {"compare": list(compare), "success": list(success), "failure": list(failure)},
        )
        return bool(answer.get("succeeded", False))
