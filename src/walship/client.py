"""Python clients for a node's HTTP API: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both build the request, send it with httpx and decode the answer with msgspec into the small
result types below. A non-2xx answer raises the WalshipError subclass named by its ``error``
code, with the server's details and the HTTP ``status``; a transport failure raises
``Unavailable``.

Given several node URLs, a client finds the leader, follows a 409's ``leader_url`` and keeps
a write going through a failover (``client_routing.py`` decides where each request goes).
``append`` gives every event an id when the caller did not, and a write is sent again byte
for byte, so a write stored before a failure is answered with its original receipt
(``duplicate``), never stored twice. Reads go to the leader, or with
``read_from="followers"`` to followers, waiting there for this client's last write
(``min_lsn``) unless ``read_your_writes=False``.

::

    with Client(["http://10.0.0.1:3900", "http://10.0.0.2:3900"]) as client:
        receipt = client.append("order-1", "order.placed", {"total": 42})
        for event in client.iter_query(entity_id="order-1"):
            ...
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from walship import subscriber
from walship.client_routing import ReadFrom, RetryPolicy, Router
from walship.errors import Unavailable, WalshipError, error_class_for
from walship.httptls import httpx_verify
from walship.peers import PeerView

DEFAULT_URL = "http://127.0.0.1:3900"
DEFAULT_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 2.0
"""How long a client waits for one node's ``/health`` while looking for the leader."""
PROBE_ROUNDS_MAX = 2
"""Rounds of ``/health`` per search: the given URLs, then leaders their followers named."""

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


class EntityEventsPage(msgspec.Struct, frozen=True):
    """A page of one entity's events by version; ``next_version`` continues in ``direction``."""

    tenant_id: str
    entity_id: str
    version: int
    direction: str
    events: list[Event]
    count: int
    next_version: int | None


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
    {
        "entity_id",
        "event_type",
        "event_type_prefix",
        "tenant_id",
        "since",
        "until",
        "from_lsn",
        "to_lsn",
        "limit",
        "min_lsn",
        "min_lsn_wait_ms",
    }
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
    tenant_id: str, as_of: str | datetime | None, as_of_lsn: int | None, min_lsn: int | None
) -> dict[str, str | int]:
    params: dict[str, str | int] = {"tenant_id": tenant_id}
    if as_of is not None:
        params["as_of"] = _time(as_of)
    if as_of_lsn is not None:
        params["as_of_lsn"] = as_of_lsn
    if min_lsn is not None:
        params["min_lsn"] = min_lsn
    return params


def _state_path(entity_id: str) -> str:
    # the entity id may contain '/' and '?': quote everything but unreserved characters
    return f"/api/v1/entities/{quote(entity_id, safe='')}/state"


def _entity_path(entity_id: str, what: str) -> str:
    return f"/api/v1/entities/{quote(entity_id, safe='')}/{what}"


def _entity_events_params(
    tenant_id: str, from_version: int, to_version: int | None, direction: str, limit: int | None
) -> dict[str, str | int]:
    params: dict[str, str | int] = {
        "tenant_id": tenant_id,
        "from_version": from_version,
        "direction": direction,
    }
    if to_version is not None:
        params["to_version"] = to_version
    if limit is not None:
        params["limit"] = limit
    return params


def _event_path(event_id: str | uuid.UUID) -> str:
    return f"/api/v1/events/{uuid.UUID(str(event_id))}"


def _auth_headers(headers: Mapping[str, str] | None, api_key: str | None) -> dict[str, str]:
    out = dict(headers or {})
    if api_key is not None:
        out["Authorization"] = f"Bearer {api_key.strip()}"
    return out


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


def _view(url: str, response: httpx.Response) -> PeerView:
    """A node's ``/health`` answer as a view (an error view when it is not a health body)."""
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict) and "role" in body:
        return PeerView(url, health=body)
    return PeerView(url, error=f"HTTP {response.status_code} without a health document")


def _last_lsn(result: AppendReceipt | BatchReceipt) -> int:
    return result.last_lsn if isinstance(result, BatchReceipt) else result.lsn


def _with_min_lsn(params: dict[str, Any], min_lsn: int | None) -> dict[str, Any]:
    # a min_lsn the caller gave wins over the client's own
    if min_lsn is None or "min_lsn" in params:
        return params
    return {**params, "min_lsn": min_lsn}


def _unavailable(exc: httpx.TransportError, url: str) -> Unavailable:
    if isinstance(exc, httpx.TimeoutException):
        return Unavailable(
            f"{url}: no answer in time ({exc!r}); a write may or may not have been stored",
            url=url,
        )
    return Unavailable(f"{url}: {exc!r}", url=url)


W = TypeVar("W", AppendReceipt, BatchReceipt)


class Client:
    """Blocking client for one node or a whole cluster. Use as a context manager, or call
    ``close``. Safe to share between threads.

    ``base_url`` is one URL or several (the nodes of a cluster, in any order). ``read_from``
    (``"leader"``, ``"followers"``, ``"any"``) and ``read_your_writes`` route reads; ``retry``
    bounds how long a write keeps trying through a failover (``RetryPolicy(attempts_max=1)``
    sends it once). ``api_key`` (``wsk_…``) is sent as ``Authorization: Bearer``; for HTTPS,
    ``ca_file`` names the CA that signed the nodes' certificates (``verify`` takes an
    ``ssl.SSLContext`` or False instead) and ``cert`` a client certificate (path, or
    ``(cert, key)``) for nodes that require one.
    """

    def __init__(
        self,
        base_url: str | Sequence[str] = DEFAULT_URL,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        read_from: ReadFrom | str = ReadFrom.LEADER,
        read_your_writes: bool = True,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
        ca_file: str | Path | None = None,
        verify: bool | ssl.SSLContext = True,
        cert: tuple[str | Path, str | Path] | str | Path | None = None,
    ) -> None:
        self._router = Router(base_url, read_from=read_from, read_your_writes=read_your_writes)
        self.base_url = self._router.urls[0]
        self.retry = retry or RetryPolicy()
        headers = _auth_headers(headers, api_key)
        verify = httpx_verify(verify, ca_file, cert)
        self._http = httpx.Client(
            timeout=timeout, transport=transport, headers=headers, verify=verify
        )

    @property
    def urls(self) -> list[str]:
        """The node URLs this client was given."""
        return list(self._router.urls)

    @property
    def leader_url(self) -> str | None:
        """The node this client believes leads; None until it knows."""
        return self._router.leader

    @property
    def last_write_lsn(self) -> int:
        """The lsn of this client's last answered write (0 before any): reads wait for it."""
        return self._router.last_write_lsn

    def _send(self, method: str, url: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url + path, **kwargs)
        except httpx.TransportError as exc:
            raise _unavailable(exc, url + path) from exc

    def _probe(self, url: str) -> PeerView:
        try:
            return _view(url, self._http.get(url + "/health", timeout=PROBE_TIMEOUT_S))
        except httpx.TransportError as exc:
            return PeerView(url, error=repr(exc))

    def find_leader(self) -> str | None:
        """Ask the nodes' ``/health`` which one leads; its URL, None when none does now."""
        urls = self._router.probe_urls()
        for _ in range(PROBE_ROUNDS_MAX):
            if not urls:
                break
            urls = self._router.learn([self._probe(u) for u in urls])
        return self._router.leader

    def _write(self, path: str, content: bytes, kind: type[W]) -> W:
        """POST to the leader; through a failover, the same bytes again (see the module)."""
        policy, router = self.retry, self._router
        deadline = time.monotonic() + policy.deadline_s
        url = router.leader or self.find_leader() or router.urls[0]
        attempt = waits = 0
        while True:
            attempt += 1
            try:
                response = self._send("POST", url, path, content=content, headers=_CT)
                result = _decode(response, kind)
            except WalshipError as exc:
                retry = router.after_write_error(url, exc)  # raises when sending cannot help
                if attempt >= policy.attempts_max or time.monotonic() >= deadline:
                    raise
                if retry.url is not None:
                    url = retry.url
                    continue
                waits += 1
                time.sleep(min(policy.backoff_s(waits), max(deadline - time.monotonic(), 0)))
                url = self.find_leader() or router.urls[waits % len(router.urls)]
                continue
            router.wrote(url, _last_lsn(result))
            return result

    def _read(
        self,
        path: str,
        params: dict[str, Any],
        kind: type[T],
        *,
        waits: bool = True,
        prefer: str | None = None,
        floor: int = 0,
    ) -> tuple[T, str]:
        """GET from the nodes ``read_from`` names, in turn; the answer and who gave it.
        ``waits``: the path takes ``min_lsn``; ``floor``: an lsn the answer must reflect."""
        router = self._router
        if router.needs_discovery():
            self.find_leader()
        last: WalshipError | None = None
        for url in router.read_targets(prefer):
            sent = _with_min_lsn(params, router.min_lsn_for(url, floor)) if waits else params
            try:
                return _decode(self._send("GET", url, path, params=sent), kind), url
            except WalshipError as exc:
                router.read_failed(url, exc)  # raises unless another node may answer
                last = exc
        assert last is not None
        raise last

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
        return self._write("/api/v1/events", _encoder.encode(body), AppendReceipt)

    def append_batch(self, events: Iterable[Mapping[str, Any]]) -> BatchReceipt:
        """Append events all or nothing; each is a dict of event fields (``id`` or ``event_id``)."""
        return self._write("/api/v1/events/batch", _batch(events), BatchReceipt)

    def query(self, *, cursor: str | None = None, **filters: Any) -> QueryPage:
        """One page of events in lsn order. Filters: entity_id, event_type, tenant_id,
        since, until (str or datetime), from_lsn, to_lsn, limit, min_lsn, min_lsn_wait_ms."""
        params = _params({**filters, "cursor": cursor})
        return self._read("/api/v1/events/query", params, QueryPage)[0]

    def iter_query(self, **filters: Any) -> Iterator[Event]:
        """Every matching event in lsn order, following cursors page by page (on one node
        while it answers; another must have reached the last lsn seen)."""
        cursor: str | None = None
        url: str | None = None
        seen = 0
        while True:
            params = _params({**filters, "cursor": cursor})
            page, url = self._read(
                "/api/v1/events/query", params, QueryPage, prefer=url, floor=seen
            )
            yield from page.events
            if page.next_cursor is None:
                return
            cursor = page.next_cursor
            seen = max(seen, page.events[-1].lsn if page.events else 0)

    def entity_state(
        self,
        entity_id: str,
        *,
        tenant_id: str = "default",
        as_of: str | datetime | None = None,
        as_of_lsn: int | None = None,
        min_lsn: int | None = None,
    ) -> EntityStateResult:
        """The entity's merged state; NotFound when it has no events (up to ``as_of``)."""
        params = _state_params(tenant_id, as_of, as_of_lsn, min_lsn)
        return self._read(_state_path(entity_id), params, EntityStateResult)[0]

    def subscribe(
        self,
        *,
        from_lsn: int = 1,
        give_up_after_s: float = subscriber.GIVE_UP_AFTER_S,
        **filters: Any,
    ) -> Iterator[Event]:
        """Every matching event from ``from_lsn`` on (history, then live), in lsn order, each
        once; reconnects after the last event delivered when the connection drops. Filters:
        tenant_id, entity_id, event_type, event_type_prefix. Never ends by itself: break out."""
        # every node given, in turn: a follower serves what it has applied, from the same lsn
        return subscriber.subscribe(
            self._http, self.urls, Event, from_lsn, filters, give_up_after_s
        )

    def entity_events(
        self,
        entity_id: str,
        *,
        tenant_id: str = "default",
        from_version: int = 1,
        to_version: int | None = None,
        direction: str = "forward",
        limit: int | None = None,
    ) -> EntityEventsPage:
        """One page of the entity's events by version (``direction`` forward or backward)."""
        params = _entity_events_params(tenant_id, from_version, to_version, direction, limit)
        return self._read(_entity_path(entity_id, "events"), params, EntityEventsPage)[0]

    def entity_version(self, entity_id: str, *, tenant_id: str = "default") -> int:
        """The entity's current version (0: no event)."""
        path = _entity_path(entity_id, "version")
        body = self._read(path, {"tenant_id": tenant_id}, dict[str, Any])[0]
        return int(body["version"])

    def event(self, event_id: str | uuid.UUID) -> Event:
        """The event with this id; NotFound when there is none."""
        return self._read(_event_path(event_id), {}, Event)[0]

    def stats(self) -> dict[str, Any]:
        return self._read("/api/v1/stats", {}, dict[str, Any], waits=False)[0]

    def health(self, url: str | None = None) -> dict[str, Any]:
        """The health document of the node at ``url`` (default: the first URL given), also
        when it answers 503 (``status`` says why)."""
        return _health(self._send("GET", (url or self.base_url).rstrip("/"), "/health"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {' '.join(self._router.urls)} leader={self._router.leader}>"


class AsyncClient:
    """asyncio client for one node or a whole cluster; the same methods and options as
    ``Client``, awaited."""

    def __init__(
        self,
        base_url: str | Sequence[str] = DEFAULT_URL,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        read_from: ReadFrom | str = ReadFrom.LEADER,
        read_your_writes: bool = True,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
        ca_file: str | Path | None = None,
        verify: bool | ssl.SSLContext = True,
        cert: tuple[str | Path, str | Path] | str | Path | None = None,
    ) -> None:
        self._router = Router(base_url, read_from=read_from, read_your_writes=read_your_writes)
        self.base_url = self._router.urls[0]
        self.retry = retry or RetryPolicy()
        headers = _auth_headers(headers, api_key)
        verify = httpx_verify(verify, ca_file, cert)
        self._http = httpx.AsyncClient(
            timeout=timeout, transport=transport, headers=headers, verify=verify
        )

    @property
    def urls(self) -> list[str]:
        return list(self._router.urls)

    @property
    def leader_url(self) -> str | None:
        return self._router.leader

    @property
    def last_write_lsn(self) -> int:
        return self._router.last_write_lsn

    async def _send(self, method: str, url: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, url + path, **kwargs)
        except httpx.TransportError as exc:
            raise _unavailable(exc, url + path) from exc

    async def _probe(self, url: str) -> PeerView:
        try:
            return _view(url, await self._http.get(url + "/health", timeout=PROBE_TIMEOUT_S))
        except httpx.TransportError as exc:
            return PeerView(url, error=repr(exc))

    async def find_leader(self) -> str | None:
        urls = self._router.probe_urls()
        for _ in range(PROBE_ROUNDS_MAX):
            if not urls:
                break
            urls = self._router.learn(await asyncio.gather(*(self._probe(u) for u in urls)))
        return self._router.leader

    async def _write(self, path: str, content: bytes, kind: type[W]) -> W:
        policy, router = self.retry, self._router
        deadline = time.monotonic() + policy.deadline_s
        url = router.leader or await self.find_leader() or router.urls[0]
        attempt = waits = 0
        while True:
            attempt += 1
            try:
                response = await self._send("POST", url, path, content=content, headers=_CT)
                result = _decode(response, kind)
            except WalshipError as exc:
                retry = router.after_write_error(url, exc)
                if attempt >= policy.attempts_max or time.monotonic() >= deadline:
                    raise
                if retry.url is not None:
                    url = retry.url
                    continue
                waits += 1
                await asyncio.sleep(
                    min(policy.backoff_s(waits), max(deadline - time.monotonic(), 0))
                )
                url = await self.find_leader() or router.urls[waits % len(router.urls)]
                continue
            router.wrote(url, _last_lsn(result))
            return result

    async def _read(
        self,
        path: str,
        params: dict[str, Any],
        kind: type[T],
        *,
        waits: bool = True,
        prefer: str | None = None,
        floor: int = 0,
    ) -> tuple[T, str]:
        router = self._router
        if router.needs_discovery():
            await self.find_leader()
        last: WalshipError | None = None
        for url in router.read_targets(prefer):
            sent = _with_min_lsn(params, router.min_lsn_for(url, floor)) if waits else params
            try:
                return _decode(await self._send("GET", url, path, params=sent), kind), url
            except WalshipError as exc:
                router.read_failed(url, exc)
                last = exc
        assert last is not None
        raise last

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
        return await self._write("/api/v1/events", _encoder.encode(body), AppendReceipt)

    async def append_batch(self, events: Iterable[Mapping[str, Any]]) -> BatchReceipt:
        return await self._write("/api/v1/events/batch", _batch(events), BatchReceipt)

    async def query(self, *, cursor: str | None = None, **filters: Any) -> QueryPage:
        params = _params({**filters, "cursor": cursor})
        return (await self._read("/api/v1/events/query", params, QueryPage))[0]

    async def iter_query(self, **filters: Any) -> AsyncIterator[Event]:
        cursor: str | None = None
        url: str | None = None
        seen = 0
        while True:
            params = _params({**filters, "cursor": cursor})
            page, url = await self._read(
                "/api/v1/events/query", params, QueryPage, prefer=url, floor=seen
            )
            for event in page.events:
                yield event
            if page.next_cursor is None:
                return
            cursor = page.next_cursor
            seen = max(seen, page.events[-1].lsn if page.events else 0)

    async def entity_state(
        self,
        entity_id: str,
        *,
        tenant_id: str = "default",
        as_of: str | datetime | None = None,
        as_of_lsn: int | None = None,
        min_lsn: int | None = None,
    ) -> EntityStateResult:
        params = _state_params(tenant_id, as_of, as_of_lsn, min_lsn)
        return (await self._read(_state_path(entity_id), params, EntityStateResult))[0]

    def subscribe(
        self,
        *,
        from_lsn: int = 1,
        give_up_after_s: float = subscriber.GIVE_UP_AFTER_S,
        **filters: Any,
    ) -> AsyncIterator[Event]:
        """``Client.subscribe`` as an async iterator (``async for event in client.subscribe()``)."""
        return subscriber.subscribe_async(
            self._http, self.urls, Event, from_lsn, filters, give_up_after_s
        )

    async def entity_events(
        self,
        entity_id: str,
        *,
        tenant_id: str = "default",
        from_version: int = 1,
        to_version: int | None = None,
        direction: str = "forward",
        limit: int | None = None,
    ) -> EntityEventsPage:
        params = _entity_events_params(tenant_id, from_version, to_version, direction, limit)
        return (await self._read(_entity_path(entity_id, "events"), params, EntityEventsPage))[0]

    async def entity_version(self, entity_id: str, *, tenant_id: str = "default") -> int:
        path = _entity_path(entity_id, "version")
        body = (await self._read(path, {"tenant_id": tenant_id}, dict[str, Any]))[0]
        return int(body["version"])

    async def event(self, event_id: str | uuid.UUID) -> Event:
        return (await self._read(_event_path(event_id), {}, Event))[0]

    async def stats(self) -> dict[str, Any]:
        return (await self._read("/api/v1/stats", {}, dict[str, Any], waits=False))[0]

    async def health(self, url: str | None = None) -> dict[str, Any]:
        return _health(await self._send("GET", (url or self.base_url).rstrip("/"), "/health"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<AsyncClient {' '.join(self._router.urls)} leader={self._router.leader}>"
