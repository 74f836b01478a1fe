"""What ``Client`` and ``AsyncClient`` share: building requests, reading answers, and the
retry logic of a call as a plan (no I/O).

A plan is a generator that yields what it needs done -- ``Send`` a request, ``Sleep``,
``Probe`` nodes' ``/health`` -- and is sent back the outcome (an ``httpx.Response`` or the
``Unavailable`` a transport failure became; nothing; the health views). It returns the
call's result or raises its error. ``Client`` runs plans with blocking I/O and
``AsyncClient`` with asyncio, so both follow exactly one piece of logic (the way
``replication/protocol.py`` keeps sockets out of the protocol).

Retries are safe by construction: a write's body, with every event id in it, is built once
before the first send, so a write stored before a failure is answered ``duplicate`` with its
original receipt. Transport errors and 503s are retried (writes and reads, which are
idempotent), at most ``RetryPolicy.attempts_max`` sends within ``deadline_s``, with
exponential backoff and full jitter between rounds; a 4xx is never sent again, except a 409
from a follower that names the leader (it goes there).
"""

from __future__ import annotations

import base64
import ssl
import time
import uuid
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from walship.client_routing import RetryPolicy, Router
from walship.errors import (
    TlsVerificationFailed,
    Unavailable,
    WaitTimeout,
    WalshipError,
    error_class_for,
)
from walship.peers import PeerView

T = TypeVar("T")

PROBE_TIMEOUT_S = 2.0
"""How long a client waits for one node's ``/health`` while looking for the leader."""
PROBE_ROUNDS_MAX = 2
"""Rounds of ``/health`` per search: the given URLs, then leaders their followers named."""

JSON_CONTENT = {"content-type": "application/json"}
BINARY_TYPES = (bytes, bytearray, memoryview)
_encoder = msgspec.json.Encoder()


# ---------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Send:
    """Send one request to ``url + path``; the answer is the response or ``Unavailable``."""

    method: str
    url: str
    path: str
    params: Mapping[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    timeout: float | None = None

    @property
    def target(self) -> str:
        return self.url + self.path

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``httpx``'s ``request`` for this send."""
        timeout = self.timeout if self.timeout is not None else httpx.USE_CLIENT_DEFAULT
        return {
            "params": self.params,
            "content": self.content,
            "headers": self.headers,
            "timeout": timeout,
        }


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Probe:
    """Ask each URL's ``/health`` (at once where the runner can); the answer is the views."""

    urls: tuple[str, ...]


Action = Send | Sleep | Probe
Plan = Generator[Action, Any, T]


def transport_failure(exc: Exception, url: str) -> WalshipError:
    """The Unavailable a failed send becomes (``OSError``s too: a socket error that escaped
    httpx, e.g. ``EBADF``, is a transport failure like any other); a certificate that did not
    verify is TlsVerificationFailed instead, which no retry can mend."""
    if _cert_not_verified(exc):
        return TlsVerificationFailed(f"{url}: the server's TLS certificate did not verify ({exc})")
    if isinstance(exc, httpx.TimeoutException):
        return Unavailable(
            f"{url}: no answer in time ({exc!r}); a write may or may not have been stored",
            url=url,
        )
    return Unavailable(f"{url}: {exc!r}", url=url)


def _cert_not_verified(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:  # httpx wraps the ssl error (cause or context)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


# ---------------------------------------------------------------------------------- answers


def error_of(response: httpx.Response) -> WalshipError:
    """The WalshipError an error answer stands for, with its details and HTTP status; a
    503 without a walship body (a proxy's) is Unavailable, which callers retry."""
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
        kind = Unavailable if response.status_code == 503 else WalshipError
        exc = kind(f"HTTP {response.status_code} without a walship error body: {text}")
    exc.status = response.status_code
    return exc


def decode(answer: httpx.Response | WalshipError, kind: type[T]) -> T:
    """The answer decoded as ``kind``; raises the error it is or holds."""
    if isinstance(answer, WalshipError):
        raise answer
    if answer.status_code >= 400:
        raise error_of(answer)
    return msgspec.json.decode(answer.content, type=kind)


def health_of(answer: httpx.Response | WalshipError) -> dict[str, Any]:
    # an unhealthy node answers 503 with its health document, not an error body
    if isinstance(answer, httpx.Response) and answer.status_code == 503:
        body = msgspec.json.decode(answer.content)
        if isinstance(body, dict) and "status" in body:
            return body
    return decode(answer, dict[str, Any])


def peer_view(url: str, answer: httpx.Response | WalshipError) -> PeerView:
    """A node's ``/health`` answer as a view (an error view when it is not a health body)."""
    if isinstance(answer, WalshipError):
        return PeerView(url, error=answer.message)
    try:
        body = msgspec.json.decode(answer.content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict) and "role" in body:
        return PeerView(url, health=body)
    return PeerView(url, error=f"HTTP {answer.status_code} without a health document")


def unbase64(value: Any) -> bytes:
    """The bytes of a ``payload_encoding: "base64"`` value (as the server sends them)."""
    return base64.b64decode(value) if isinstance(value, str) else bytes(value)


# ---------------------------------------------------------------------------------- requests


def event_body(
    entity_id: str,
    event_type: str,
    payload: Any,
    tenant_id: str,
    metadata: Mapping[str, Any] | None,
    event_id: str | uuid.UUID | None,
    expected_version: int | None,
) -> dict[str, Any]:
    """One event as the API takes it, with an id (generated here when not given)."""
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
    return _binary_as_base64(body)


def _binary_as_base64(event: dict[str, Any]) -> dict[str, Any]:
    """``bytes`` payloads travel as base64 with ``payload_encoding`` saying so."""
    payload = event.get("payload")
    if isinstance(payload, BINARY_TYPES):
        event["payload"] = base64.b64encode(bytes(payload)).decode("ascii")
        event["payload_encoding"] = "base64"
    return event


def encode_event(*args: Any) -> bytes:
    """``event_body(*args)`` encoded: the bytes every attempt of the write sends."""
    return _encoder.encode(event_body(*args))


def encode_batch(events: Iterable[Mapping[str, Any]], extra: Mapping[str, Any] | None) -> bytes:
    """Encode a batch; ``event_id`` is accepted for ``id``, a missing id is generated, a
    ``bytes`` payload goes as base64; ``extra``: other top-level fields of the batch."""
    out = []
    for ev in events:
        item = dict(ev)
        if "event_id" in item:
            item["id"] = item.pop("event_id")
        if item.get("id") is None:
            item["id"] = str(uuid.uuid4())
        out.append(_binary_as_base64(item))
    return _encoder.encode({**(extra or {}), "events": out})


def write_params(ack_mode: str | None) -> dict[str, str]:
    """A stricter acknowledgement mode for one write (``semi-sync``, ``quorum:N``, ``sync``)."""
    return {} if ack_mode is None else {"ack_mode": ack_mode}


QUERY_FILTERS = frozenset(
    {
        "entity_id",
        "event_type",
        "event_type_prefix",
        "tenant_id",
        "since",
        "until",
        "from_lsn",
        "to_lsn",
        "from_position",
        "to_position",
        "limit",
        "min_lsn",
        "min_lsn_wait_ms",
    }
)


def time_text(value: str | datetime) -> str:
    return value.isoformat() if isinstance(value, datetime) else value


def query_params(filters: Mapping[str, Any]) -> dict[str, str | int]:
    """The query's parameters; TypeError names filters the route does not take."""
    unknown = set(filters) - QUERY_FILTERS - {"cursor"}
    if unknown:
        raise TypeError(f"unknown query filters: {sorted(unknown)}")
    params: dict[str, str | int] = {}
    for key, value in filters.items():
        if value is None:
            continue
        params[key] = time_text(value) if key in ("since", "until") else value
    return params


def optional(**values: Any) -> dict[str, Any]:
    """The parameters that are set (None means: the server's default)."""
    return {
        k: time_text(v) if isinstance(v, datetime) else v
        for k, v in values.items()
        if v is not None
    }


def entity_path(entity_id: str, what: str) -> str:
    # the entity id may contain '/' and '?': quote everything but unreserved characters
    return f"/api/v1/entities/{quote(entity_id, safe='')}/{what}"


def event_path(event_id: str | uuid.UUID) -> str:
    return f"/api/v1/events/{uuid.UUID(str(event_id))}"


# ---------------------------------------------------------------------------------- plans


def find_leader_plan(router: Router) -> Plan[str | None]:
    """Ask the nodes' ``/health`` which one leads; its URL, None when none does now."""
    urls = router.probe_urls()
    for _ in range(PROBE_ROUNDS_MAX):
        if not urls:
            break
        views = yield Probe(tuple(urls))
        urls = router.learn(views)
    return router.leader


class _Attempts:
    """The bounds of one call's retries: sends, deadline and backoff rounds."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.deadline = time.monotonic() + policy.deadline_s
        self.sent = 0
        self.waits = 0

    def may_retry(self) -> bool:
        return self.sent < self.policy.attempts_max and time.monotonic() < self.deadline

    def backoff(self) -> Sleep:
        self.waits += 1
        left = max(self.deadline - time.monotonic(), 0.0)
        return Sleep(min(self.policy.backoff_s(self.waits), left))


def write_plan(
    router: Router,
    policy: RetryPolicy,
    path: str,
    content: bytes,
    kind: type[T],
    params: Mapping[str, str],
    last_lsn: Any,
) -> Plan[T]:
    """POST ``content`` to the leader; through a failover or a transport error, the same
    bytes again (see the module). ``last_lsn(result)``: the lsn reads should wait for."""
    attempts = _Attempts(policy)
    url = router.leader or (yield from find_leader_plan(router)) or router.urls[0]
    while True:
        attempts.sent += 1
        answer = yield Send("POST", url, path, params, content, JSON_CONTENT)
        try:
            result = decode(answer, kind)
        except WalshipError as exc:
            retry = router.after_write_error(url, exc)  # raises when sending cannot help
            if not attempts.may_retry():
                raise
            if retry.url is not None:
                url = retry.url
                continue
            yield attempts.backoff()
            found = yield from find_leader_plan(router)
            url = found or router.urls[attempts.waits % len(router.urls)]
            continue
        router.wrote(url, last_lsn(result))
        return result


def read_plan(
    router: Router,
    policy: RetryPolicy,
    path: str,
    params: Mapping[str, Any],
    kind: type[T],
    *,
    waits: bool = True,
    prefer: str | None = None,
    floor: int = 0,
) -> Plan[tuple[T, str]]:
    """GET from the nodes ``read_from`` names, in turn, and in rounds with backoff while
    none can answer (transport errors, 503s; reads are idempotent; not a ``min_lsn`` wait
    that expired everywhere: each node waited as asked); the answer and who gave it.
    ``waits``: the path takes ``min_lsn``; ``floor``: an lsn the answer must reflect."""
    attempts = _Attempts(policy)
    while True:
        if router.needs_discovery():
            yield from find_leader_plan(router)
        last: WalshipError | None = None
        for url in router.read_targets(prefer):
            sent = dict(params)
            if waits:
                need = router.min_lsn_for(url, floor)
                # a min_lsn the caller gave wins over the client's own
                if need is not None and "min_lsn" not in sent:
                    sent["min_lsn"] = need
            attempts.sent += 1
            answer = yield Send("GET", url, path, sent)
            try:
                return decode(answer, kind), url
            except WalshipError as exc:
                router.read_failed(url, exc)  # raises unless another node may answer
                last = exc
            if not attempts.may_retry():
                break
        assert last is not None
        # a node that did not reach min_lsn in time already waited as long as asked
        if isinstance(last, WaitTimeout) or not attempts.may_retry():
            raise last
        yield attempts.backoff()


class QueryPages:
    """Where ``iter_query`` stands: the cursor, the node that served the last page (the
    cursor is good on that node; another must have reached the last lsn seen)."""

    def __init__(self, filters: Mapping[str, Any]) -> None:
        self.filters = dict(filters)
        query_params(self.filters)  # bad filters raise before the first page
        self.cursor: str | None = None
        self.url: str | None = None
        self.seen = 0
        self.done = False

    def plan(self, router: Router, policy: RetryPolicy, kind: type[T]) -> Plan[tuple[T, str]]:
        params = query_params({**self.filters, "cursor": self.cursor})
        return read_plan(
            router, policy, "/api/v1/events/query", params, kind, prefer=self.url, floor=self.seen
        )

    def advance(self, next_cursor: str | None, last_lsn: int | None, url: str) -> None:
        self.url = url
        self.cursor = next_cursor
        self.done = next_cursor is None
        if last_lsn is not None:
            self.seen = max(self.seen, last_lsn)
