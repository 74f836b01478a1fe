"""The node's write path: admission, the store's queue, the WAL's wait, the acknowledgement.

Every way in (the HTTP routes and their ASGI fast lane, tests, an embedding program with an
event loop) appends through ``append_pending``: the node must be a writable leader and the
requested ack mode one it can honour (refused before anything is written, so a retry cannot
store twice); writes wait at the recovery-point budget while in-sync followers lag; the events
are queued with ``Store.submit`` (a short lock; in a thread when the store pushes back), the
WAL's group-commit futures are awaited, and the node confirms the mode's acknowledgements and
fills in the receipts' durability. Callers only decode before and encode after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Future

from walship.events import EventIn, TrackingIn
from walship.node import Node
from walship.replication.acks import AckMode
from walship.store import PendingAppend
from walship.wal.log import WriteOutcome
from walship.wire import Receipt


async def wait_written(fut: Future[WriteOutcome]) -> WriteOutcome:
    """Await a WAL write future from the event loop without being able to cancel it."""
    if fut.done():
        return fut.result()
    # shield: the WAL shares one future among a whole group commit, and a cancelled request
    # (client gone) must not cancel it for everyone else
    return await asyncio.shield(asyncio.wrap_future(fut))


async def append_events(
    node: Node, events: Sequence[EventIn], ack_mode: str | None = None
) -> list[Receipt]:
    """``append_pending``'s receipts."""
    pending = await append_pending(node, events, ack_mode)
    return pending.receipts


async def append_pending(
    node: Node,
    events: Sequence[EventIn],
    ack_mode: str | None = None,
    tracking: TrackingIn | None = None,
) -> PendingAppend:
    """Queue events in the WAL, wait until they are written and acknowledged as the write's
    mode asks (the server's, or a stricter ``ack_mode``); receipts in input order.

    An ack mode that does not parse is refused (InvalidInput, 400) before anything is written:
    refused after the write, a retry would store the events twice."""
    requested = AckMode.parse(ack_mode) if ack_mode else None
    leader = node.check_writable()
    node.check_ack_mode(requested, leader)
    # the recovery-point budget: while in-sync followers lag too far, writes wait here,
    # before the WAL (so a client gone meanwhile left nothing behind)
    if await leader.lag_budget.admit():
        # it waited: this node may have been demoted or fenced meanwhile
        leader = node.check_writable()
        node.check_ack_mode(requested, leader)
    store = node.store
    if store.writes.would_block():
        # backpressure (checkpoints or the WAL writer behind): wait in a thread, not the loop
        pending = await asyncio.to_thread(
            store.submit, events, json_checked=True, tracking=tracking
        )
    else:
        # decoded: the syntax is checked
        pending = store.submit(events, json_checked=True, tracking=tracking)
    outcome: WriteOutcome | None = None
    for fut in pending.waits_on:
        outcome = await wait_written(fut)
    if pending.done is not None:
        outcome = await wait_written(pending.done)
    pending.finish(outcome)
    await node.confirm(pending, requested, leader)
    return pending
