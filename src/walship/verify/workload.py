"""The write workload: a few concurrent writers, every request and answer recorded.

Each writer sends one request at a time to whichever node the harness says leads: a single
event (most of the time) or a small batch, spread over a few entities, every event with a
client-chosen UUID drawn from the run's seed. A request that fails or gets no answer is retried
with the same ids (a few times, with a short pause), so a write whose answer was lost shows up
as a ``duplicate`` receipt rather than a second event — and the checker can tell every write
apart by its ids.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import httpx

from walship.verify.cluster import VerifyCluster
from walship.verify.config import VerifyConfig
from walship.verify.history import History, Outcome, WriteOp

ATTEMPTS_MAX = 8
SINGLE_SHARE = 0.7
EVENT_TYPE = "verify.write"


class Workload:
    """``config.writers`` writers against ``cluster`` until ``stop`` is set."""

    def __init__(self, cluster: VerifyCluster, history: History, config: VerifyConfig) -> None:
        self.cluster = cluster
        self.history = history
        self.config = config

    async def run(self, stop: asyncio.Event) -> None:
        limits = httpx.Limits(max_connections=self.config.writers * 2)
        timeout = httpx.Timeout(self.config.request_timeout_s, connect=2.0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            await asyncio.gather(
                *(self._writer(w, client, stop) for w in range(1, self.config.writers + 1))
            )

    async def _writer(self, writer: int, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        cfg = self.config
        rng = random.Random(f"{cfg.seed}/writer/{writer}")
        seq = 0
        while not stop.is_set():
            count = 1 if rng.random() < SINGLE_SHARE else rng.randint(2, cfg.batch_events_max)
            events: list[dict[str, Any]] = []
            for _ in range(count):
                seq += 1
                events.append(
                    {
                        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                        "entity_id": f"e{rng.randrange(cfg.entities)}",
                        "event_type": EVENT_TYPE,
                        "payload": {"writer": writer, "seq": seq},
                    }
                )
            for attempt in range(1, ATTEMPTS_MAX + 1):
                if await self.send(client, writer, attempt, events):
                    break
                if stop.is_set():
                    break
                await _sleep_unless(stop, rng.uniform(0.05, 0.25))
            await _sleep_unless(stop, rng.uniform(0.001, 0.008))

    async def send(
        self, client: httpx.AsyncClient, writer: int, attempt: int, events: list[dict[str, Any]]
    ) -> bool:
        """One request to the current leader; True when it was answered 200 (its outcome is
        in the history). Writer 0 is the fault scheduler's own (``rejoin``'s ballast)."""
        node_id, url = self.cluster.write_target
        op = self.history.begin(
            writer, attempt, node_id, [e["id"] for e in events], [e["entity_id"] for e in events]
        )
        try:
            if len(events) == 1:
                response = await client.post(f"{url}/api/v1/events", json=events[0])
            else:
                response = await client.post(f"{url}/api/v1/events/batch", json={"events": events})
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self.history.end(op, Outcome.UNREACHABLE, error=type(exc).__name__)
            return False
        except httpx.TimeoutException as exc:
            self.history.end(op, Outcome.TIMEOUT, error=type(exc).__name__)
            return False
        except httpx.TransportError as exc:
            self.history.end(op, Outcome.BROKEN, error=f"{type(exc).__name__}: {exc}"[:200])
            return False
        return self._record_answer(op, response, batch=len(events) > 1)

    def _record_answer(self, op: WriteOp, response: httpx.Response, *, batch: bool) -> bool:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            error = response.text[:200]
            if isinstance(body, dict):
                error = f"{body.get('error')}: {str(body.get('message'))[:160]}"
            self.history.end(op, Outcome.REJECTED, status=response.status_code, error=error)
            return False
        receipts = body["receipts"] if batch else [body]
        self.history.end(op, Outcome.OK, status=200, receipts=receipts)
        return True


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stop`` is set meanwhile."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass
