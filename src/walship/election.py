"""Automatic failover on etcd (opt-in: ``walship serve --etcd URLS --cluster NAME``).

etcd does the consensus; walship only uses its lease, transaction and range primitives:

* ``/walship/NAME/leader`` holds the leader's ``{node_id, term, replication_address, url}``,
  attached to a lease the leader keeps alive. The leader accepts writes only while it holds
  the key *and* its lease is surely alive: until ``sent + TTL - margin`` of its last
  successful keep-alive (sent before etcd renewed it, so etcd's own expiry is later). A
  leader cut off from etcd therefore stops taking writes before its lease can expire, and
  so before anyone else can be elected; it is then fenced for good.
* ``/walship/NAME/term`` holds the highest term ever elected, so terms are unique.
* When the leader key is gone, every follower publishes its position under
  ``/walship/NAME/candidates/NODE`` (with a lease: a dead candidate drops out), waits a
  settle period, and only the best ``(term, lsn, node_id)`` among the live candidates tries
  the compare-and-swap: leader key absent, term key unchanged, and no candidate key created
  or changed since it read them. So only the most caught-up live follower can win; it
  promotes itself (term = etcd term + 1, above anything it has seen), and the others
  repoint to the address in the key.
* ``/walship/NAME/in_sync`` holds the leader's newest in-sync set (``replication/insync.py``),
  written (while it holds the key) before the set counts for any write. A candidate also
  publishes the set it stored; the best candidate takes the key only when it can prove it
  holds every write answered ``replicated`` -- every member of the newest set it sees, in
  etcd or among the candidates, is a live candidate -- unless the node runs with
  ``--unclean-election``. Otherwise nobody is elected until a member is back (Kafka's
  ``unclean.leader.election.enable=false``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from walship.errors import WalshipError
from walship.etcd import (
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    compare_absent,
    compare_lease,
    compare_mod_below,
    prefix_end,
    put_op,
)
from walship.replication.insync import (
    InSyncRecord,
    Witness,
    decode_record,
    may_lose,
    unclean_reason,
)

if TYPE_CHECKING:
    from walship.node import Node

log = logging.getLogger(__name__)


class LeaderInfo(msgspec.Struct):
    node_id: str
    term: int
    replication_address: str | None = None
    url: str | None = None


class Candidate(msgspec.Struct):
    node_id: str
    last_term: int
    last_lsn: int
    in_sync: InSyncRecord | None = None  # the newest in-sync set it stored

    def witness(self) -> Witness:
        return Witness(self.node_id, (self.last_term, self.last_lsn), self.in_sync)

    @property
    def rank(self) -> tuple[int, int, str]:
        return self.last_term, self.last_lsn, self.node_id


class EtcdElection:
    """The etcd side of one node: holds the leader key, or watches it and campaigns."""

    def __init__(
        self,
        node: Node,
        client: EtcdClient,
        cluster: str,
        *,
        ttl_s: int = 5,
        settle_s: float = 1.0,
        poll_s: float = 0.2,
        url: str | None = None,
        unclean: bool = False,
    ) -> None:
        self.node = node
        self.client = client
        self.cluster = cluster
        self.ttl_s = ttl_s
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.url = url
        self.unclean = unclean  # elect a candidate that may lack replicated writes
        self.refusing: str | None = None  # why the best candidate (this node) does not run
        base = f"/walship/{cluster}/".encode()
        self.leader_key = base + b"leader"
        self.term_key = base + b"term"
        self.candidates = base + b"candidates/"
        self.in_sync_key = base + b"in_sync"
        self.margin_s = min(1.0, ttl_s / 4)
        self.lease = 0
        self.lease_deadline = 0.0  # monotonic: writes stop before this
        self.holding = False
        self.state = "starting"
        self.last_error: str | None = None
        self.leader_seen: LeaderInfo | None = None
        self._task: asyncio.Task[None] | None = None
        self._following: tuple[str, int] | None = None  # the leader (node, term) followed
        self._unconnected_polls = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="etcd-election")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.lease:
            # a clean stop hands leadership over at once instead of after the TTL
            with contextlib.suppress(WalshipError, OSError):
                async with asyncio.timeout(1.0):
                    await self.client.revoke(self.lease)
        self.lease, self.holding = 0, False
        await self.client.aclose()

    def write_block(self) -> str | None:
        """Why a leader must refuse writes now (None: it may take them)."""
        if not self.holding:
            return f"this node does not hold the leader key of cluster {self.cluster} in etcd"
        if time.monotonic() >= self.lease_deadline - self.margin_s:
            return "the etcd leader lease could not be renewed in time"
        return None

    def status(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "state": self.state,
            "holding": self.holding,
            "lease_left_s": round(max(self.lease_deadline - time.monotonic(), 0.0), 3)
            if self.holding
            else None,
            "leader": None if self.leader_seen is None else msgspec.to_builtins(self.leader_seen),
            "last_error": self.last_error,
            "refusing": self.refusing,
            "unclean_election": self.unclean,
        }

    async def publish_in_sync(self, record: InSyncRecord) -> None:
        """Put the leader's new in-sync set in etcd, only while this node holds the leader
        key with its lease (a deposed leader's stale set never lands). A leader that has not
        taken the key yet (it is starting) waits for it; EtcdError when it is fenced or etcd
        refuses: the leader tries again, and the set does not count until then."""
        while not self.holding or not self.lease:
            leader = self.node.leader
            if leader is None or leader.fenced is not None:
                raise EtcdError("this node does not hold the leader key: the in-sync set waits")
            await asyncio.sleep(self.poll_s)
        ok = await self.client.txn(
            [compare_lease(self.leader_key, self.lease)],
            [put_op(self.in_sync_key, msgspec.json.encode(record))],
        )
        if not ok:
            raise EtcdError("the leader key is no longer this node's: in-sync set not stored")

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while True:
            try:
                leader = self.node.leader
                if leader is not None and leader.fenced is None:
                    await self._lead()
                else:
                    await self._follow()
            except asyncio.CancelledError:
                raise
            except WalshipError as exc:
                self.last_error = exc.message
                log.warning("etcd election: %s", exc.message)
                await asyncio.sleep(self.poll_s)
            except Exception as exc:  # never let the election die silently
                self.last_error = repr(exc)
                log.exception("etcd election failed; retrying")
                await asyncio.sleep(self.poll_s)

    def _fence(self, reason: str) -> None:
        self.holding = False
        self.state = "fenced"
        leader = self.node.leader
        if leader is not None:
            leader.fence(reason)

    async def _current(self) -> tuple[LeaderInfo | None, int]:
        """The leader key's value (None when absent) and the term key's mod revision."""
        found = await self.client.get(self.leader_key)
        info = msgspec.json.decode(found.kvs[0].value, type=LeaderInfo) if found.kvs else None
        self.leader_seen = info
        return info, found.revision

    async def _etcd_term(self) -> tuple[int, int]:
        """The highest term etcd has seen and its key's mod revision (0, 0 when unset)."""
        found = await self.client.get(self.term_key)
        if not found.kvs:
            return 0, 0
        return int(found.kvs[0].value or b"0"), found.kvs[0].mod_revision

    def _info(self, term: int) -> bytes:
        return msgspec.json.encode(
            LeaderInfo(self.node.node_id, term, self.node.replication_address(), self.url)
        )

    # ------------------------------------------------------------------ leading

    async def _lead(self) -> None:
        node = self.node
        if not self.holding:
            self.state = "acquiring"
            info, _ = await self._current()
            term = node.store.log.current_term.value
            etcd_term, term_rev = await self._etcd_term()
            if info is not None and not (info.node_id == node.node_id and info.term == term):
                self._fence(f"etcd says {info.node_id} leads term {info.term}")
                return
            if etcd_term > term:
                self._fence(f"etcd has seen term {etcd_term}, above this leader's {term}")
                return
            lease = await self.client.grant(self.ttl_s)
            sent = time.monotonic()
            compare = [_term_unchanged(self.term_key, term_rev)]
            if info is None:
                compare.append(compare_absent(self.leader_key))
            else:  # our own key from before a restart: take it over with the new lease
                compare.append(_same_value(self.leader_key, info))
            ok = await self.client.txn(
                compare,
                [
                    put_op(self.leader_key, self._info(term), lease),
                    put_op(self.term_key, b"%d" % term),
                ],
            )
            if not ok:
                await self.client.revoke(lease)
                await asyncio.sleep(self.poll_s)
                return
            self.lease, self.lease_deadline, self.holding = lease, sent + self.ttl_s, True
            log.info("etcd: holding the leader key of %s (term %d)", self.cluster, term)
        self.state = "leader"
        await self._keep_alive()

    async def _keep_alive(self) -> None:
        """Renew the lease every TTL/3 until it is lost (then fence)."""
        interval = self.ttl_s / 3
        while True:
            await asyncio.sleep(min(interval, max(self.lease_deadline - time.monotonic(), 0) / 2))
            sent = time.monotonic()
            try:
                async with asyncio.timeout(max(self.lease_deadline - sent - self.margin_s, 0.05)):
                    ttl = await self.client.keepalive(self.lease)
            except (EtcdUnavailable, TimeoutError) as exc:
                self.last_error = f"keep-alive failed: {exc}"
                if time.monotonic() >= self.lease_deadline - self.margin_s:
                    self._fence("the etcd leader lease could not be renewed before it expired")
                    return
                continue
            if ttl <= 0:
                self._fence("the etcd leader lease expired")
                return
            self.lease_deadline = sent + ttl
            self.last_error = None
            leader = self.node.leader
            if leader is None or leader.fenced is not None:
                self.holding = False
                return

    # ------------------------------------------------------------------ following

    async def _follow(self) -> None:
        node = self.node
        info, _ = await self._current()
        if info is None:
            if node.follower is not None:
                await self._campaign()
            else:
                self.state = "fenced"  # a deposed leader waits for the new one
                await asyncio.sleep(self.poll_s)
            return
        self.state = "following"
        address = info.replication_address
        if info.node_id != node.node_id and address:
            follower = node.follower
            leader = (info.node_id, info.term)
            if follower is None or (leader != self._following and self._should_repoint(address)):
                log.warning(
                    "etcd: %s leads term %d at %s; following it", info.node_id, info.term, address
                )
                await node.repoint(address)
                self._following = leader
            elif follower.connected:
                # the link it has reaches this leader (perhaps by another address: a proxy)
                self._following = leader
        await asyncio.sleep(self.poll_s)

    def _should_repoint(self, address: str) -> bool:
        """A new leader in the key: follow it, unless this is the first one seen and the
        follower may still be connecting to it by its own configured address."""
        follower = self.node.follower
        if follower is None or follower.leader_address == address:
            return False
        if self._following is not None:
            return True
        self._unconnected_polls += 1
        return self._unconnected_polls * self.poll_s > 2.0

    async def _campaign(self) -> None:
        """Publish this follower's position; the best live candidate takes the key."""
        node = self.node
        self.state = "campaigning"
        lease = await self.client.grant(self.ttl_s)
        key = self.candidates + node.node_id.encode()
        try:
            pos = node.position()
            me = Candidate(node.node_id, pos.term.value, pos.lsn.value, node.in_sync_file.record)
            await self.client.put(key, msgspec.json.encode(me), lease)
            log.info(
                "etcd: no leader in %s; candidate at %d/%d", self.cluster, me.last_term, me.last_lsn
            )
            await asyncio.sleep(self.settle_s)
            deadline = time.monotonic() + 3 * self.ttl_s
            while time.monotonic() < deadline:
                info, _ = await self._current()
                if info is not None:
                    return  # someone won: _follow repoints to it
                found = await self.client.get(self.candidates, prefix=True)
                rivals = [msgspec.json.decode(kv.value, type=Candidate) for kv in found.kvs]
                best = max(rivals, key=lambda c: c.rank, default=None)
                mine = best is not None and best.node_id == node.node_id
                if mine and await self._may_run(rivals) and await self._take(found.revision):
                    return
                await self.client.keepalive(lease)
                await asyncio.sleep(self.poll_s)
        finally:
            with contextlib.suppress(WalshipError):
                await self.client.revoke(lease)

    async def _may_run(self, rivals: list[Candidate]) -> bool:
        """Whether this node, the best candidate, may take the key: it can prove it holds
        every write answered ``replicated`` (``unclean_reason``), or runs ``--unclean-election``
        (and says what may be lost)."""
        found = await self.client.get(self.in_sync_key)
        in_etcd = decode_record(found.kvs[0].value) if found.kvs else None
        me = self.node.witness()
        others = [c.witness() for c in rivals if c.node_id != me.node_id]
        reason = unclean_reason(me, others, [in_etcd])
        if reason is None:
            self.refusing = None
            return True
        if self.unclean:
            log.error("etcd: %s", may_lose(me, reason))
            return True
        if reason != self.refusing:
            log.error(
                "etcd: not taking the leader key of %s: %s cannot prove it holds every write "
                "answered replicated: %s (start it with --unclean-election to elect it anyway)",
                self.cluster,
                me.node_id,
                reason,
            )
        self.refusing = reason
        self.state = "refusing"
        return False

    async def _take(self, candidates_revision: int) -> bool:
        """The compare-and-swap; on success, promote this node. True when it won."""
        node = self.node
        follower = node.follower
        etcd_term, term_rev = await self._etcd_term()
        known = max(
            node.store.log.current_term.value,
            0 if follower is None else follower.known_term,
            node.role_state.record.term_seen,
        )
        term = max(etcd_term, known) + 1
        lease = await self.client.grant(self.ttl_s)
        sent = time.monotonic()
        ok = await self.client.txn(
            [
                compare_absent(self.leader_key),
                _term_unchanged(self.term_key, term_rev),
                compare_mod_below(
                    self.candidates, candidates_revision + 1, prefix_end(self.candidates)
                ),
            ],
            [put_op(self.leader_key, self._info(term), lease), put_op(self.term_key, b"%d" % term)],
        )
        if not ok:
            await self.client.revoke(lease)
            return False
        self.lease, self.lease_deadline, self.holding = lease, sent + self.ttl_s, True
        log.warning("etcd: won the election of %s for term %d; promoting", self.cluster, term)
        try:
            await node.promote(force=True, term=term)
        except WalshipError as exc:
            log.error("etcd: promotion after winning failed: %s", exc.message)
            self.holding = False
            await self.client.revoke(lease)
            self.lease = 0
            raise
        # the listener's port is known now (it may have been chosen at run time)
        await self.client.put(self.leader_key, self._info(term), lease)
        return True


def _term_unchanged(key: bytes, mod_revision: int) -> dict[str, Any]:
    if mod_revision == 0:
        return compare_absent(key)
    return {
        "key": compare_absent(key)["key"],
        "result": "EQUAL",
        "target": "MOD",
        "mod_revision": str(mod_revision),
    }


def _same_value(key: bytes, info: LeaderInfo) -> dict[str, Any]:
    from walship.etcd import compare_value

    return compare_value(key, msgspec.json.encode(info))
