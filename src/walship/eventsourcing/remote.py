"""The recorders' backend over HTTP (``WALSHIP_URLS``), through ``walship.Client``.

The client finds the leader, follows it through a failover and sends a write again with the
same event ids (a write stored before the failure is answered as a duplicate, never stored
twice), so the recorders inherit that. Payloads travel as base64 with
``payload_encoding: "base64"`` and come back the same bytes.
"""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import orjson

from walship.client import AppendReceipt, BatchReceipt, Client
from walship.errors import NotFound, WaitTimeout
from walship.eventsourcing.backend import ORIGINATOR_VERSION_KEY, NewEvent, Row

# How long one idle subscription's long poll waits for the node to move (then asks again).
# Leaving a subscription waits for the poll under way, so this bounds how long that takes.
_LONG_POLL_MS = 500
# The most events one request asks for (the server's ``query_limit_max`` is 10,000).
_PAGE_EVENTS_MAX = 1_000


class _Receipt(AppendReceipt, frozen=True):
    position: int = 0  # the event's position in its tenant


class _BatchAnswer(BatchReceipt, frozen=True):
    """The answer to a batch, with each event's tenant position (a ``BatchReceipt``, so the
    client learns the lsn it wrote, for reading its own writes on followers)."""

    receipts: list[_Receipt]


def _payload(event: dict[str, Any]) -> bytes:
    """The bytes a payload was written as (a JSON payload: its JSON text)."""
    payload = event["payload"]
    if event.get("payload_encoding") == "base64":
        return base64.b64decode(payload)
    return orjson.dumps(payload)


def row_of(event: dict[str, Any]) -> Row:
    version = int(event["version"])
    meta = event.get("metadata")
    originator_version = version
    if isinstance(meta, dict):
        originator_version = int(meta.get(ORIGINATOR_VERSION_KEY, version))
    return Row(
        event["entity_id"],
        version,
        originator_version,
        event["event_type"],
        _payload(event),
        int(event.get("position", 0)),
        int(event["lsn"]),
    )


def _event_json(tenant_id: str, ev: NewEvent) -> dict[str, Any]:
    out: dict[str, Any] = {
        # a fresh id per call: the client sends the same id again through a failover
        "id": str(uuid.uuid4()),
        "tenant_id": tenant_id,
        "entity_id": ev.entity_id,
        "event_type": ev.event_type,
        "payload": base64.b64encode(ev.payload).decode("ascii"),
        "payload_encoding": "base64",
    }
    if ev.originator_version is not None:
        out["metadata"] = {ORIGINATOR_VERSION_KEY: ev.originator_version}
    if ev.expected_version is not None:
        out["expected_version"] = ev.expected_version
    return out


class HttpBackend:
    """``Backend`` over one or more walship nodes."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        return self.client._read(path, params, dict[str, Any])[0]

    def append(
        self, tenant_id: str, events: Sequence[NewEvent], tracking: tuple[str, int] | None
    ) -> list[tuple[int, int]]:
        body: dict[str, Any] = {"events": [_event_json(tenant_id, ev) for ev in events]}
        if tracking is not None:
            body["tracking"] = {
                "consumer": tracking[0],
                "position": tracking[1],
                "tenant_id": tenant_id,
            }
        answer = self.client._write("/api/v1/events/batch", orjson.dumps(body), _BatchAnswer)
        return [(r.version, r.position) for r in answer.receipts]

    def entity_events(
        self,
        tenant_id: str,
        entity_id: str,
        from_version: int,
        to_version: int | None,
        *,
        backward: bool,
        limit: int,
    ) -> list[Row]:
        params: dict[str, Any] = {
            "tenant_id": tenant_id,
            "from_version": from_version,
            "direction": "backward" if backward else "forward",
            "limit": min(limit, _PAGE_EVENTS_MAX),
        }
        if to_version is not None:
            params["to_version"] = to_version
        page = self._get(f"/api/v1/entities/{quote(entity_id, safe='')}/events", params)
        return [row_of(ev) for ev in page["events"]]

    def by_position(
        self,
        tenant_id: str,
        from_position: int,
        to_position: int | None,
        limit: int,
        event_type: str | None,
    ) -> list[Row]:
        out: list[Row] = []
        while len(out) < limit:
            params: dict[str, Any] = {
                "tenant_id": tenant_id,
                "from_position": from_position,
                "limit": min(limit - len(out), _PAGE_EVENTS_MAX),
            }
            if to_position is not None:
                params["to_position"] = to_position
            if event_type is not None:
                params["event_type"] = event_type
            page = self._get("/api/v1/events/query", params)
            rows = [row_of(ev) for ev in page["events"]]
            out.extend(rows)
            if page.get("next_cursor") is None or not rows:
                break
            from_position = rows[-1].position + 1
        return out

    def _position(self, tenant_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._get(
            f"/api/v1/tenants/{quote(tenant_id, safe='')}/position", {}
        )
        return answer

    def tenant_position(self, tenant_id: str) -> int:
        return int(self._position(tenant_id)["position"])

    def consumer_position(self, tenant_id: str, consumer: str) -> int | None:
        try:
            answer = self._get(
                f"/api/v1/consumers/{quote(consumer, safe='')}", {"tenant_id": tenant_id}
            )
        except NotFound:
            return None
        return int(answer["position"])

    def wait_for_more(
        self, tenant_id: str, after_position: int, timeout_s: float, wake: threading.Event
    ) -> None:
        now = self._position(tenant_id)
        if int(now["position"]) > after_position or wake.is_set():
            return
        # a long poll: the query waits (``min_lsn``) until the node has made anything past
        # the lsn it showed visible, then the caller reads its tenant's events again
        lsn = int(now["lsn"]) + 1
        wait_ms = max(1, min(_LONG_POLL_MS, int(timeout_s * 1000)))
        params = {
            "tenant_id": tenant_id,
            "from_lsn": lsn,
            "limit": 1,
            "min_lsn": lsn,
            "min_lsn_wait_ms": wait_ms,
        }
        try:
            self._get("/api/v1/events/query", params)
        except WaitTimeout:
            return

    def notify(self) -> None:
        """Nothing to do: the long polls see every writer's events."""

    def close(self) -> None:
        self.client.close()
