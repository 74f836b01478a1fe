"""Python clients for a node's HTTP API: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both are thin: they build the request, send it with httpx and decode the answer with msgspec
into the small result types below. A non-2xx answer raises the WalshipError subclass named by
its ``error`` code, with the server's details and the HTTP ``status``; a transport failure
raises ``Unavailable``.

``append`` gives every event an id when the caller did not, so sending the same call again
after a timeout is safe: the server answers a repeated id with the original receipt.

::

    with Client("http://127.0.0.1:3900") as client:
        receipt = client.append("order-1", "order.placed", {"total": 42})
        for event in client.iter_query(entity_id="order-1"):
            ...
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from walship.errors import Unavailable, WalshipError, error_class_for

DEFAULT_URL = "http://127.0.0.1:3900"
DEFAULT_TIMEOUT_S = 30.0

T = TypeVar("T")


class AppendReceipt(msgspec.Struct, frozen=True):
    """Where an appended event is in the log and how durable it was when answered."""

    event_id: str
    lsn: int
    term: int
    version: int
    timestamp: str
    durability: str
    duplicate: bool = False


class BatchReceipt(msgspec.Struct, frozen=True):
    receipts: list[AppendReceipt]
    count: int
    first_lsn: int
    last_lsn: int


class Event(msgspec.Struct, frozen=True):
    """A stored event as queries return it."""

    id: str
    tenant_id: str
    entity_id: str
    event_type: str
    payload: Any
    metadata: dict[str, Any] | None
    timestamp: str
    version: int
    lsn: int
    term: int


class QueryPage(msgspec.Struct, frozen=True):
    events: list[Event]
    next_cursor: str | None
    count: int


class EntityStateResult(msgspec.Struct, frozen=True):
    """An entity's payloads merged in lsn order, up to its ``version``/``last_lsn``."""

    tenant_id: str
    entity_id: str
    version: int
    state: Any
    last_lsn: int
    updated: str | None
    events: int


_encoder = msgspec.json.Encoder()
_CT = {"content-type": "application/json"}
_QUERY_FILTERS = frozenset(
    {"entity_id", "event_type", "tenant_id", "since", "until", "from_lsn", "to_lsn", "limit"}
)


def _event(
    entity_id: str,
    event_type: str,
    payload: Any,
    tenant_id: str,
    metadata: Mapping[str, Any] | None,
    event_id: str | uuid.UUID | None,
    expected_version: int | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(event_id or uuid.uuid4()),
        "tenant_id": tenant_id,
        "entity_id": entity_id,
        "event_type": event_type,
        "payload": payload,
    }
    if metadata is not None:
        body["metadata"] = metadata
    if expected_version is not None:
        body["expected_version"] = expected_version
    return body


def _batch(events: Iterable[Mapping[str, Any]]) -> bytes:
    """Encode a batch; ``event_id`` is accepted for ``id``, and a missing id is generated."""
    out = []
    for ev in events:
        item = dict(ev)
        if "event_id" in item:
            item["id"] = item.pop("event_id")
        if item.get("id") is None:
            item["id"] = uuid.uuid4()
        out.append(item)
    return _encoder.encode({"events": out})


def _time(value: str | datetime) -> str:
    return value.isoformat() if isinstance(value, datetime) else value


def _params(filters: Mapping[str, Any]) -> dict[str, str | int]:
    unknown = set(filters) - _QUERY_FILTERS - {"cursor"}
    if unknown:
        raise TypeError(f"unknown query filters: {sorted(unknown)}")
    params: dict[str, str | int] = {}
    for key, value in filters.items():
        if value is None:
            continue
        params[key] = _time(value) if key in ("since", "until") else value
    return params


def _state_params(
    tenant_id: str, as_of: str | datetime | None, as_of_lsn: int | None
) -> dict[str, str | int]:
    params: dict[str, str | int] = {"tenant_id": tenant_id}
    if as_of is not None:
        params["as_of"] = _time(as_of)
    if as_of_lsn is not None:
        params["as_of_lsn"] = as_of_lsn
    return params


def _state_path(entity_id: str) -> str:
    # the entity id may contain '/' and '?': quote everything but unreserved characters
    return f"/api/v1/entities/{quote(entity_id, safe='')}/state"


def _error(response: httpx.Response) -> WalshipError:
    """The WalshipError an error answer stands for, with its details and HTTP status."""
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        details = {k: v for k, v in body.items() if k not in ("error", "message")}
        message = str(body.get("message", body["error"]))
        exc = error_class_for(body["error"])(message, **details)
    else:
        text = response.text[:200]
        exc = WalshipError(f"HTTP {response.status_code} without a walship error body: {text}")
    exc.status = response.status_code
    return exc


def _decode(response: httpx.Response, kind: type[T]) -> T:
    if response.status_code >= 400:
        raise _error(response)
    return msgspec.json.decode(response.content, type=kind)


def _health(response: httpx.Response) -> dict[str, Any]:
    # an unhealthy node answers 503 with its health document, not an error body
    if response.status_code == 503:
        body = msgspec.json.decode(response.content)
        if isinstance(body, dict) and "status" in body:
            return body
    return _decode(response, dict[str, Any])


def _unavailable(exc: httpx.TransportError, url: str) -> Unavailable:
    if isinstance(exc, httpx.TimeoutException):
        return Unavailable(
            f"{url}: no answer in time ({exc!r}); a write may or may not have been stored",
            url=url,
        )
    return Unavailable(f"{url}: {exc!r}", url=url)


class Client:
    """Blocking client for one node. Use as a context manager, or call ``close``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, transport=transport, headers=headers
        )

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unavailable(exc, self.base_url + path) from exc

    def append(
        self,
        entity_id: str,
        event_type: str,
        payload: Any,
        *,
        tenant_id: str = "default",
        metadata: Mapping[str, Any] | None = None,
        event_id: str | uuid.UUID | None = None,
        expected_version: int | None = None,
    ) -> AppendReceipt:
        """Append one event; VersionConflict when ``expected_version`` does not match."""
        body = _event(
            entity_id, event_type, payload, tenant_id, metadata, event_id, expected_version
        )
        response = self._send("POST", "/api/v1/events", content=_encoder.encode(body), headers=_CT)
        return _decode(response, AppendReceipt)

    def append_batch(self, events: Iterable[Mapping[str, Any]]) -> BatchReceipt:
        """Append events all or nothing; each is a dict of event fields (``id`` or ``event_id``)."""
        response = self._send("POST", "/api/v1/events/batch", content=_batch(events), headers=_CT)
        return _decode(response, BatchReceipt)

    def query(self, *, cursor: str | None = None, **filters: Any) -> QueryPage:
        """One page of events in lsn order. Filters: entity_id, event_type, tenant_id,
        since, until (str or datetime), from_lsn, to_lsn, limit."""
        params = _params({**filters, "cursor": cursor})
        return _decode(self._send("GET", "/api/v1/events/query", params=params), QueryPage)

    def iter_query(self, **filters: Any) -> Iterator[Event]:
        """Every matching event in lsn order, following cursors page by page."""
        cursor: str | None = None
        while True:
            page = self.query(cursor=cursor, **filters)
            yield from page.events
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def entity_state(
        self,
        entity_id: str,
        *,
        tenant_id: str = "default",
        as_of: str | datetime | None = None,
        as_of_lsn: int | None = None,
    ) -> EntityStateResult:
        """The entity's merged state; NotFound when it has no events (up to ``as_of``)."""
        params = _state_params(tenant_id, as_of, as_of_lsn)
        return _decode(self._send("GET", _state_path(entity_id), params=params), EntityStateResult)

    def stats(self) -> dict[str, Any]:
        return _decode(self._send("GET", "/api/v1/stats"), dict[str, Any])

    def health(self) -> dict[str, Any]:
        """The node's health document, also when it answers 503 (``status`` says why)."""
        return _health(self._send("GET", "/health"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.base_url}>"


class AsyncClient:
    """asyncio client for one node; the same methods as ``Client``, awaited."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport, headers=headers
        )

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unavailable(exc, self.base_url + path) from exc

    async def append(
        self,
        entity_id: str,
        event_type: str,
        payload: Any,
        *,
        tenant_id: str = "default",
        metadata: Mapping[str, Any] | None = None,
        event_id: str | uuid.UUID | None = None,
        expected_version: int | None = None,
    ) -> AppendReceipt:
        body = _event(
            entity_id, event_type, payload, tenant_id, metadata, event_id, expected_version
        )
        content = _encoder.encode(body)
        response = await self._send("POST", "/api/v1/events", content=content, headers=_CT)
        return _decode(response, AppendReceipt)

    async def append_batch(self, events: Iterable[Mapping[str, Any]]) -> BatchReceipt:
        content = _batch(events)
        response = await self._send("POST", "/api/v1/events/batch", content=content, headers=_CT)
        return _decode(response, BatchReceipt)

    async def query(self, *, cursor: str | None = None, **filters: Any) -> QueryPage:
        params = _params({**filters, "cursor": cursor})
        return _decode(await self._send("GET", "/api/v1/events/query", params=params), QueryPage)

    async def iter_query(self, **filters: Any) -> AsyncIterator[Event]:
        cursor: str | None = None
        while True:
            page = await self.query(cursor=cursor, **filters)
            for event in page.events:
                yield event
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def entity_state(
        self,
        entity_id: str,
        *,
        tenant_id: str = "default",
        as_of: str | datetime | None = None,
        as_of_lsn: int | None = None,
    ) -> EntityStateResult:
        params = _state_params(tenant_id, as_of, as_of_lsn)
        response = await self._send("GET", _state_path(entity_id), params=params)
        return _decode(response, EntityStateResult)

    async def stats(self) -> dict[str, Any]:
        return _decode(await self._send("GET", "/api/v1/stats"), dict[str, Any])

    async def health(self) -> dict[str, Any]:
        return _health(await self._send("GET", "/health"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<AsyncClient {self.base_url}>"
