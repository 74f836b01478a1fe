"""Python clients for a node's HTTP API: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both build the request, send it with httpx and decode the answer with msgspec into the small
result types below; what a call does (where it goes, what it retries) is one plan in
``client_calls.py`` that each runs with its own I/O. A non-2xx answer raises the WalshipError
subclass named by its ``error`` code, with the server's details and the HTTP ``status``; a
transport failure raises ``Unavailable`` once retries are spent. A ``bytes`` payload is sent
as binary and read back as ``bytes``.

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
import functools
import inspect
import ssl
import threading
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from walship import subscriber, wire
from walship.client_calls import (
    PROBE_TIMEOUT_S,
    Action,
    Plan,
    Probe,
    QueryPages,
    Send,
    Sleep,
    encode_batch,
    encode_event,
    entity_path,
    event_path,
    find_leader_plan,
    health_of,
    optional,
    peer_view,
    query_params,
    read_plan,
    transport_failure,
    unbase64,
    write_params,
    write_plan,
)
from walship.client_routing import ReadFrom, RetryPolicy, Router
from walship.errors import WalshipError
from walship.httptls import httpx_verify
from walship.peers import PeerView

DEFAULT_URL = "http://127.0.0.1:3900"
DEFAULT_TIMEOUT_S = 30.0

T = TypeVar("T")


# The answers' fields are defined once, in ``wire.py``, where the server builds them; these
# frozen subclasses re-declare only the fields that read differently on the client's side
# (mypy sees a narrower type there: the decoder, not an assignment, fills them). They are
# frozen over the server's mutable types, which msgspec allows and mypy's dataclass rule does
# not (hence its ``misc`` ignores), and keep every field when turned back into builtins
# (``omit_defaults=False``), as they always did.


class AppendReceipt(wire.Receipt, frozen=True):  # type: ignore[misc]
    """Where an appended event is in the log and how durable it was when answered."""


class BatchReceipt(wire.BatchReceipts, frozen=True, omit_defaults=False):  # type: ignore[misc]
    receipts: list[AppendReceipt]  # type: ignore[assignment]
    tracking: dict[str, Any] | None = None  # type: ignore[assignment]  # a dict, as always


class Event(wire.EventOut, frozen=True, omit_defaults=False):  # type: ignore[misc]
    """A stored event as queries return it; a binary payload is ``bytes``."""

    payload: Any
    metadata: dict[str, Any] | None  # type: ignore[assignment]
    position: int = 0  # 0: a server without positions

    def __post_init__(self) -> None:
        if self.payload_encoding == "base64":  # ``payload`` was sent as bytes
            msgspec.structs.force_setattr(self, "payload", unbase64(self.payload))


class QueryPage(wire.QueryPage, frozen=True):  # type: ignore[misc]
    events: list[Event]  # type: ignore[assignment]


class EntityEventsPage(wire.EntityEvents, frozen=True):  # type: ignore[misc]
    """A page of one entity's events by version; ``next_version`` continues in ``direction``."""

    events: list[Event]  # type: ignore[assignment]


class EntityStateResult(wire.EntityState, frozen=True, omit_defaults=False):
    """An entity's payloads merged in lsn order, up to its ``version``/``last_lsn``; a
    binary last payload makes ``state`` its ``bytes``."""

    def __post_init__(self) -> None:
        if self.state_encoding == "base64":
            msgspec.structs.force_setattr(self, "state", unbase64(self.state))


class TenantPositionResult(wire.TenantPosition, frozen=True):  # type: ignore[misc]
    """A tenant's last position visible on the node that answered (0: none), and its lsn."""


class ConsumerPositionResult(wire.ConsumerAnswer, frozen=True):  # type: ignore[misc]
    """The last position a consumer tracked with a batch, and the lsn of that append."""


W = TypeVar("W", AppendReceipt, BatchReceipt)


def _last_lsn(result: AppendReceipt | BatchReceipt) -> int:
    return result.last_lsn if isinstance(result, BatchReceipt) else result.lsn


def _auth_headers(headers: Mapping[str, str] | None, api_key: str | None) -> dict[str, str]:
    out = dict(headers or {})
    if api_key is not None:
        out["Authorization"] = f"Bearer {api_key.strip()}"
    return out


class _Calls:
    """The request side both clients share: routing state, retry policy, and a plan for
    each call with its public signature. ``_blocking``/``_awaited`` turn a plan into the
    method of ``Client``/``AsyncClient``, so each call is written once."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        read_from: ReadFrom | str,
        read_your_writes: bool,
        retry: RetryPolicy | None,
    ) -> None:
        self._router = Router(base_url, read_from=read_from, read_your_writes=read_your_writes)
        self.base_url = self._router.urls[0]
        self.retry = retry or RetryPolicy()

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

    def _write(self, path: str, content: bytes, kind: type[W], ack_mode: str | None) -> Plan[W]:
        return write_plan(
            self._router, self.retry, path, content, kind, write_params(ack_mode), _last_lsn
        )

    def _read(
        self, path: str, params: Mapping[str, Any], kind: type[T], *, waits: bool = True
    ) -> Plan[T]:
        found, _ = yield from read_plan(self._router, self.retry, path, params, kind, waits=waits)
        return found

    def _plan_find_leader(self) -> Plan[str | None]:
        """Ask the nodes' ``/health`` which one leads; its URL, None when none does now."""
        return find_leader_plan(self._router)

    def _plan_append(
        self,
        entity_id: str,
        event_type: str,
        payload: Any,
        *,
        tenant_id: str = "default",
        metadata: Mapping[str, Any] | None = None,
        event_id: str | uuid.UUID | None = None,
        expected_version: int | None = None,
        ack_mode: str | None = None,
    ) -> Plan[AppendReceipt]:
        """Append one event (a ``bytes`` payload is stored as binary); VersionConflict when
        ``expected_version`` does not match. ``ack_mode``: a stricter acknowledgement for
        this write (``semi-sync``, ``quorum:N``, ``sync``)."""
        # encoded once, before the first send: every retry carries the same event id
        content = encode_event(
            entity_id, event_type, payload, tenant_id, metadata, event_id, expected_version
        )
        return self._write("/api/v1/events", content, AppendReceipt, ack_mode)

    def _plan_append_batch(
        self,
        events: Iterable[Mapping[str, Any]],
        *,
        ack_mode: str | None = None,
        tracking: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Plan[BatchReceipt]:
        """Append events all or nothing; each is a dict of event fields (``id`` or
        ``event_id``; a ``bytes`` payload is binary). ``tracking``: ``{"consumer", "position",
        "tenant_id"}`` stored in the same append (TrackingConflict, nothing stored, unless
        above the consumer's stored position; a retry of the batch that stored it, same ids,
        is answered as a duplicate); ``events`` may then be empty. ``extra``: more top-level
        fields of the batch body."""
        fields = {**(extra or {}), **({} if tracking is None else {"tracking": dict(tracking)})}
        content = encode_batch(events, fields)
        return self._write("/api/v1/events/batch", content, BatchReceipt, ack_mode)

    def _plan_query(self, /, *, cursor: str | None = None, **filters: Any) -> Plan[QueryPage]:
        """One page of events in lsn order. Filters: entity_id, event_type,
        event_type_prefix, tenant_id, since, until (str or datetime), from_lsn, to_lsn,
        from_position, to_position (with tenant_id), limit, min_lsn, min_lsn_wait_ms."""
        params = query_params({**filters, "cursor": cursor})
        return self._read("/api/v1/events/query", params, QueryPage)

    def _plan_entity_state(
        self,
        entity_id: str,
        *,
        tenant_id: str = "default",
        as_of: str | datetime | None = None,
        as_of_lsn: int | None = None,
        min_lsn: int | None = None,
        min_lsn_wait_ms: int | None = None,
    ) -> Plan[EntityStateResult]:
        """The entity's merged state; NotFound when it has no events (up to ``as_of``)."""
        params = optional(
            tenant_id=tenant_id,
            as_of=as_of,
            as_of_lsn=as_of_lsn,
            min_lsn=min_lsn,
            min_lsn_wait_ms=min_lsn_wait_ms,
        )
        return self._read(entity_path(entity_id, "state"), params, EntityStateResult)

    def _plan_entity_events(
        self,
        entity_id: str,
        *,
        tenant_id: str = "default",
        from_version: int = 1,
        to_version: int | None = None,
        direction: str = "forward",
        limit: int | None = None,
        min_lsn: int | None = None,
        min_lsn_wait_ms: int | None = None,
    ) -> Plan[EntityEventsPage]:
        """One page of the entity's events by version (``direction`` forward or backward)."""
        params = optional(
            tenant_id=tenant_id,
            from_version=from_version,
            to_version=to_version,
            direction=direction,
            limit=limit,
            min_lsn=min_lsn,
            min_lsn_wait_ms=min_lsn_wait_ms,
        )
        return self._read(entity_path(entity_id, "events"), params, EntityEventsPage)

    def _plan_entity_version(
        self,
        entity_id: str,
        *,
        tenant_id: str = "default",
        min_lsn: int | None = None,
        min_lsn_wait_ms: int | None = None,
    ) -> Plan[int]:
        """The entity's current version (0: no event)."""
        params = optional(tenant_id=tenant_id, min_lsn=min_lsn, min_lsn_wait_ms=min_lsn_wait_ms)
        path = entity_path(entity_id, "version")
        body = yield from self._read(path, params, wire.EntityVersion)
        return body.version

    def _plan_event(
        self,
        event_id: str | uuid.UUID,
        *,
        min_lsn: int | None = None,
        min_lsn_wait_ms: int | None = None,
    ) -> Plan[Event]:
        """The event with this id; NotFound when there is none."""
        params = optional(min_lsn=min_lsn, min_lsn_wait_ms=min_lsn_wait_ms)
        return self._read(event_path(event_id), params, Event)

    def _plan_tenant_position(self, tenant_id: str = "default") -> Plan[TenantPositionResult]:
        """The tenant's last position visible on the node that answers (0: none yet)."""
        path = f"/api/v1/tenants/{quote(tenant_id, safe='')}/position"
        # with min_lsn on a follower: a position read after a write counts that write
        return self._read(path, {}, TenantPositionResult)

    def _plan_consumer_position(
        self, name: str, *, tenant_id: str = "default"
    ) -> Plan[ConsumerPositionResult]:
        """The consumer's last tracked position; NotFound when it has tracked none."""
        path = f"/api/v1/consumers/{quote(name, safe='')}"
        return self._read(path, {"tenant_id": tenant_id}, ConsumerPositionResult)

    def _plan_stats(self) -> Plan[dict[str, Any]]:
        """The statistics of the node that answers."""
        return self._read("/api/v1/stats", {}, dict[str, Any], waits=False)

    def _plan_health(self, url: str | None = None) -> Plan[dict[str, Any]]:
        """The health document of the node at ``url`` (default: the first URL given), also
        when it answers 503 (``status`` says why)."""
        answer = yield Send("GET", (url or self.base_url).rstrip("/"), "/health")
        return health_of(answer)


P = ParamSpec("P")


def _named(method: Callable[..., Any], plan: Callable[..., Any]) -> None:
    """Give ``method`` the plan's name (less ``_plan_``), docstring and signature, with the
    plan's result as what it returns (``help`` and IDEs show the call, not the plan)."""
    functools.update_wrapper(method, plan)
    del method.__wrapped__  # type: ignore[attr-defined]
    method.__name__ = plan.__name__.removeprefix("_plan_")
    method.__qualname__ = method.__name__
    signature = inspect.signature(plan)
    returns = signature.return_annotation
    if isinstance(returns, str) and returns.startswith("Plan[") and returns.endswith("]"):
        signature = signature.replace(return_annotation=returns[5:-1])
    method.__signature__ = signature  # type: ignore[attr-defined]


def _blocking(plan: Callable[Concatenate[Any, P], Plan[T]]) -> Callable[Concatenate[Client, P], T]:
    """The ``Client`` method that runs ``plan`` with blocking I/O."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(plan(self, *args, **kwargs))

    _named(method, plan)
    return method


def _awaited(
    plan: Callable[Concatenate[Any, P], Plan[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """The ``AsyncClient`` method that runs ``plan`` with asyncio."""

    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(plan(self, *args, **kwargs))

    _named(method, plan)
    return method


class _ThreadClients:
    """One ``httpx.Client`` per thread that uses a ``Client``.

    Why: the issue behind this saw ``EBADF`` from the connection pool of one ``httpx.Client``
    shared by 100 threads. With a pool per thread no socket is ever used by two threads;
    the pools of threads that ended are closed as new threads come (and all by ``close``).
    A caller's own ``transport`` is one pool already (and closing any client closes it):
    then every thread shares one client.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._shared = httpx.Client(**options) if options.get("transport") else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[tuple[threading.Thread, httpx.Client]] = []
        self._closed = False

    def get(self) -> httpx.Client:
        if self._shared is not None:
            return self._shared
        http: httpx.Client | None = getattr(self._local, "http", None)
        if http is not None:
            return http
        http = httpx.Client(**self._options)
        with self._lock:
            if self._closed:
                http.close()
                raise RuntimeError("the client is closed")
            ended = [other for thread, other in self._all if not thread.is_alive()]
            self._all = [(t, c) for t, c in self._all if t.is_alive()]
            self._all.append((threading.current_thread(), http))
        for other in ended:
            other.close()
        self._local.http = http
        return http

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._all = self._all, []
        for _, http in clients:
            http.close()
        if self._shared is not None:
            self._shared.close()


class Client(_Calls):
    """Blocking client for one node or a whole cluster. Use as a context manager, or call
    ``close``. Safe to share between threads (each has its own connection pool).

    ``base_url`` is one URL or several (the nodes of a cluster, in any order). ``read_from``
    (``"leader"``, ``"followers"``, ``"any"``) and ``read_your_writes`` route reads; ``retry``
    bounds how long a call keeps trying through transport errors, 503s and a failover
    (``RetryPolicy(attempts_max=1)`` sends once). ``api_key`` (``wsk_…``) is sent as
    ``Authorization: Bearer``; for HTTPS, ``ca_file`` names the CA that signed the nodes'
    certificates (``verify`` takes an ``ssl.SSLContext`` or False instead) and ``cert`` a
    client certificate (path, or ``(cert, key)``) for nodes that require one.
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
        super().__init__(base_url, read_from, read_your_writes, retry)
        verify = httpx_verify(verify, ca_file, cert)
        if verify is True:  # one context for every thread's pool, not one load each
            verify = ssl.create_default_context()
        self._clients = _ThreadClients(
            timeout=timeout,
            transport=transport,
            headers=_auth_headers(headers, api_key),
            verify=verify,
        )

    @property
    def _http(self) -> httpx.Client:
        return self._clients.get()

    def _run(self, plan: Plan[T]) -> T:
        """Run a plan with blocking I/O."""
        answer: Any = None
        while True:
            try:
                action = plan.send(answer)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            answer = self._do(action)

    def _do(self, action: Action) -> Any:
        if isinstance(action, Sleep):
            time.sleep(action.seconds)
            return None
        if isinstance(action, Probe):
            return [self._probe(url) for url in action.urls]
        return self._send(action)

    def _send(self, send: Send) -> httpx.Response | WalshipError:
        try:
            return self._http.request(send.method, send.target, **send.options())
        except (httpx.TransportError, OSError) as exc:
            return transport_failure(exc, send.target)

    def _probe(self, url: str) -> PeerView:
        return peer_view(url, self._send(Send("GET", url, "/health", timeout=PROBE_TIMEOUT_S)))

    find_leader = _blocking(_Calls._plan_find_leader)
    append = _blocking(_Calls._plan_append)
    append_batch = _blocking(_Calls._plan_append_batch)
    query = _blocking(_Calls._plan_query)
    entity_state = _blocking(_Calls._plan_entity_state)
    entity_events = _blocking(_Calls._plan_entity_events)
    entity_version = _blocking(_Calls._plan_entity_version)
    event = _blocking(_Calls._plan_event)
    tenant_position = _blocking(_Calls._plan_tenant_position)
    consumer_position = _blocking(_Calls._plan_consumer_position)
    stats = _blocking(_Calls._plan_stats)
    health = _blocking(_Calls._plan_health)

    def iter_query(self, **filters: Any) -> Iterator[Event]:
        """Every matching event in lsn order, following cursors page by page (on one node
        while it answers; another must have reached the last lsn seen)."""
        pages = QueryPages(filters)
        while not pages.done:
            page, url = self._run(pages.plan(self._router, self.retry, QueryPage))
            pages.advance(page.next_cursor, page.events[-1].lsn if page.events else None, url)
            yield from page.events

    def subscribe(
        self,
        *,
        from_lsn: int = 1,
        give_up_after_s: float = subscriber.GIVE_UP_AFTER_S,
        **filters: Any,
    ) -> subscriber.Subscription[Event]:
        """Every matching event from ``from_lsn`` on (history, then live), in lsn order, each
        once; reconnects after the last event delivered when the connection drops. Filters:
        tenant_id, entity_id, event_type, event_type_prefix, from_position (with tenant_id:
        events from that tenant position on). Never ends by itself: break out, or call its
        ``close()`` (from any thread: the iterating one stops at once). Iterate it from one
        thread."""
        # every node given, in turn: a follower serves what it has applied, from the same lsn
        return subscriber.subscribe(
            self._http, self.urls, Event, from_lsn, filters, give_up_after_s
        )

    def close(self) -> None:
        self._clients.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {' '.join(self._router.urls)} leader={self._router.leader}>"


class AsyncClient(_Calls):
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
        super().__init__(base_url, read_from, read_your_writes, retry)
        self._http = httpx.AsyncClient(
            timeout=timeout,
            transport=transport,
            headers=_auth_headers(headers, api_key),
            verify=httpx_verify(verify, ca_file, cert),
        )

    async def _run(self, plan: Plan[T]) -> T:
        """Run a plan with asyncio (a Probe asks every node at once)."""
        answer: Any = None
        while True:
            try:
                action = plan.send(answer)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            answer = await self._do(action)

    async def _do(self, action: Action) -> Any:
        if isinstance(action, Sleep):
            await asyncio.sleep(action.seconds)
            return None
        if isinstance(action, Probe):
            return await asyncio.gather(*(self._probe(url) for url in action.urls))
        return await self._send(action)

    async def _send(self, send: Send) -> httpx.Response | WalshipError:
        try:
            return await self._http.request(send.method, send.target, **send.options())
        except (httpx.TransportError, OSError) as exc:
            return transport_failure(exc, send.target)

    async def _probe(self, url: str) -> PeerView:
        answer = await self._send(Send("GET", url, "/health", timeout=PROBE_TIMEOUT_S))
        return peer_view(url, answer)

    find_leader = _awaited(_Calls._plan_find_leader)
    append = _awaited(_Calls._plan_append)
    append_batch = _awaited(_Calls._plan_append_batch)
    query = _awaited(_Calls._plan_query)
    entity_state = _awaited(_Calls._plan_entity_state)
    entity_events = _awaited(_Calls._plan_entity_events)
    entity_version = _awaited(_Calls._plan_entity_version)
    event = _awaited(_Calls._plan_event)
    tenant_position = _awaited(_Calls._plan_tenant_position)
    consumer_position = _awaited(_Calls._plan_consumer_position)
    stats = _awaited(_Calls._plan_stats)
    health = _awaited(_Calls._plan_health)

    async def iter_query(self, **filters: Any) -> AsyncIterator[Event]:
        """``Client.iter_query`` as an async iterator."""
        pages = QueryPages(filters)
        while not pages.done:
            page, url = await self._run(pages.plan(self._router, self.retry, QueryPage))
            pages.advance(page.next_cursor, page.events[-1].lsn if page.events else None, url)
            for event in page.events:
                yield event

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
