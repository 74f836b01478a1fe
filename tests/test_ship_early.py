"""Shipping before the leader's fsync, made safe (README, "Shipping before the leader's fsync").

* The WAL shows a written group to early cursors (``flushed_lsn``) before its fsync, and to
  nobody else until that fsync is done.
* A follower's store shows nothing past the leader's durable lsn it was told: queries, entity
  state, tenant positions, its checkpoints.
* A leader start leads a new term, before its first write.
* End to end, with the leader's fsync held open by the test hook: a follower that speaks
  protocol v3 receives the record but does not show it; an older follower is not shipped it;
  the leader is killed, loses the record (its WAL cut back to what was synced, as a power
  loss would), restarts in a new term, and the follower's record is cut -- exactly it, not
  the whole old term -- and every log matches the leader's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import (
    Cluster,
    assert_same_wal,
    health,
    http,
    last_lsn,
    post_event,
    query_all,
    replication,
    wait_caught_up,
    wait_until,
)
from tests.conftest import make_event
from walship.limits import Limits
from walship.position import Term
from walship.replication.early_ship import DurableNotice, ships_early
from walship.replication.handshake import PROTOCOL_VERSIONS_ENV
from walship.replication.protocol import (
    SUPPORTED_VERSIONS,
    LeaderDurable,
    hello_version,
    takes_leader_durable,
    takes_parts,
)
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.testing.process import NodeProcess
from walship.wal import FsyncPolicy
from walship.wal.cursor import WalCursor
from walship.wal.fsync_hold import HOLD_FSYNC_ENV, FsyncHold
from walship.wal.log import Wal
from walship.wal.truncate import truncate_wal

# ---------------------------------------------------------------------------------- pure parts


def test_versions_say_what_a_follower_takes() -> None:
    assert [takes_leader_durable(v) for v in SUPPORTED_VERSIONS] == [False, False, True, True]
    assert [takes_parts(v) for v in SUPPORTED_VERSIONS] == [False, True, False, True]
    # a node playing a walship from before v3 (the test hook) says the version before
    assert hello_version(4, (1, 2)) == 2
    assert hello_version(3, (1, 2)) == 1
    assert hello_version(3, SUPPORTED_VERSIONS) == 3


def test_durable_notice_tells_each_rise_once_and_only_to_v3_followers() -> None:
    notice = DurableNotice(True)
    assert notice.due(2, 5) == LeaderDurable(term=2, lsn=5)
    assert notice.due(2, 5) is None
    assert notice.due(2, 7) == LeaderDurable(term=2, lsn=7)
    old = DurableNotice(False)
    assert old.due(2, 5) is None
    assert ships_early(True, True, notice)
    assert not ships_early(True, True, old)  # an older follower would show what may be lost
    assert not ships_early(True, False, notice)  # a term this process did not begin
    assert not ships_early(False, True, notice)


# ---------------------------------------------------------------------------------- the WAL


def test_wal_shows_a_group_to_early_cursors_before_its_fsync_and_to_others_after(
    tmp_path: Path,
) -> None:
    hold = tmp_path / "hold"
    wal = Wal.open(tmp_path / "wal", fsync=FsyncPolicy.parse("always"))
    try:
        wal.begin_term(Term(1))
        wal.append([b"first"]).done.result(10)
        hold.touch()
        wal.fsync_hold = FsyncHold(hold)
        result = wal.append([b"second"])
        wait_until(lambda: wal.flushed_lsn.value == 2, 10, "the group to be written")
        assert wal.written_lsn.value == 1 and wal.synced_lsn.value == 1
        assert not result.done.done()
        early, durable = WalCursor(wal, 2, early=True), WalCursor(wal, 2)
        shipped = early.read(1 << 20)
        assert shipped is not None and (shipped.first_lsn, shipped.last_lsn) == (2, 2)
        assert durable.read(1 << 20) is None
        files_only = WalCursor(wal, 2)
        files_only.early = True
        got = files_only.read_files(1 << 20)
        assert got is not None and got.last_lsn == 2
        hold.unlink()
        result.done.result(10)
        assert wal.written_lsn.value == 2 and wal.synced_lsn.value == 2
        late = durable.read(1 << 20)
        assert late is not None and late.last_lsn == 2
        for cursor in (early, durable, files_only):
            cursor.close()
    finally:
        hold.unlink(missing_ok=True)
        wal.close()


# ---------------------------------------------------------------------------------- the store


def test_store_shows_and_checkpoints_nothing_past_the_leaders_durable_lsn(
    tmp_path: Path,
) -> None:
    store = Store.open(StoreConfig(tmp_path, fsync=FsyncPolicy.parse("never")))
    try:
        store.append(make_event("a"))
        store.append(make_event("b"))
        store.append(make_event("b"))
        store.visible_bound.set(1)
        assert store.visible_lsn == 1
        assert [e.lsn for e in store.query(QueryFilter(), limit=10).events] == [1]
        with pytest.raises(Exception, match="no events"):
            store.entity_state("b")
        assert store.tenant_position("default") == (1, 1)
        part = store.checkpoint()
        assert part is not None and part.last_lsn == 1  # not the records it may not show
        assert store.manifest.last_lsn == 1
        store.visible_bound.set(3)
        assert store.visible_lsn == 3
        assert store.entity_state("b").version == 2
        assert store.tenant_position("default") == (3, 3)
        part = store.checkpoint()
        assert part is not None and part.last_lsn == 3
    finally:
        store.close()


# ---------------------------------------------------------------------------------- processes


def start_leader(cluster: Cluster, hold: Path, fsync: str = "always") -> NodeProcess:
    proc = cluster.node(
        "leader",
        [
            "--role",
            "leader",
            "--replication-port",
            "0",
            "--replication-secret-file",
            str(cluster.secret_file),
        ],
        fsync,
    )
    proc.env = {HOLD_FSYNC_ENV: str(hold)}
    return proc.start()


def start_follower(
    cluster: Cluster, node_id: str, leader: str, env: dict[str, str] | None = None
) -> NodeProcess:
    proc = cluster.node(
        node_id,
        [
            "--role",
            "follower",
            "--leader",
            leader,
            "--replication-secret-file",
            str(cluster.secret_file),
        ],
        "always",
    )
    proc.env = env
    return proc.start()


def takes_writes(node: NodeProcess) -> bool:
    """The leader's guard let it write: it confirmed its leadership, or had nobody to ask."""
    state: str = health(node)["leadership"]["state"]
    return state in ("confirmed", "unchecked")


def get(node: NodeProcess, path: str) -> httpx.Response:
    return http().get(f"{node.url}{path}")


def test_leader_start_leads_a_new_term_before_its_first_write(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        leader = start_leader(cluster, tmp_path / "no-hold", fsync="never")
        assert post_event(leader, {"entity_id": "e", "event_type": "t", "payload": {}}).is_success
        first = health(leader)["term"]
        leader.stop()
        cluster.restart(leader)
        assert health(leader)["term"] == first + 1
        receipt = post_event(leader, {"entity_id": "e", "event_type": "t", "payload": {}}).json()
        assert (receipt["lsn"], receipt["term"]) == (2, first + 1)
        leader.stop()
        cluster.restart(leader)
        assert health(leader)["term"] == first + 2


def test_a_v3_follower_of_a_leader_before_v3_shows_everything_it_is_shipped(
    tmp_path: Path,
) -> None:
    """A leader from before v3 refuses the v3 hello; the follower says v1 and treats what it
    is shipped as durable there (that leader ships nothing else)."""
    with Cluster(tmp_path) as cluster:
        leader = cluster.node(
            "leader",
            [
                "--role",
                "leader",
                "--replication-port",
                "0",
                "--replication-secret-file",
                str(cluster.secret_file),
            ],
            "never",
        )
        leader.env = {PROTOCOL_VERSIONS_ENV: "1,2"}
        leader.start()
        assert leader.replication_address is not None
        follower = start_follower(cluster, "f", leader.replication_address)
        for i in range(3):
            answer = post_event(leader, {"entity_id": f"e{i}", "event_type": "t", "payload": {}})
            assert answer.is_success, answer.text
        end = wait_caught_up(leader, follower)  # applied: visible, so not bounded
        seen = health(follower)
        assert (seen["visible_lsn"], seen["leader_durable_lsn"]) == (end, None)
        assert [e["lsn"] for e in query_all(follower)] == list(range(1, end + 1))


def test_follower_hides_what_the_leader_may_lose_and_cuts_it_after_the_leaders_crash(
    tmp_path: Path,
) -> None:
    hold = tmp_path / "hold-fsync"
    with Cluster(tmp_path) as cluster:
        leader = start_leader(cluster, hold)
        address = leader.replication_address
        assert address is not None
        port = int(address.rsplit(":", 1)[1])
        new = start_follower(cluster, "f-new", address)
        old = start_follower(cluster, "f-old", address, {PROTOCOL_VERSIONS_ENV: "1,2"})
        for i in range(3):
            answer = post_event(leader, {"entity_id": f"e{i}", "event_type": "t", "payload": {}})
            assert answer.is_success, answer.text
        base = wait_caught_up(leader, new, old)
        term = health(leader)["term"]

        # the leader's fsync is held: its write is in its file, not durable
        hold.touch()
        answers: list[Any] = []

        def write() -> None:
            try:
                answers.append(
                    post_event(leader, {"entity_id": "lost", "event_type": "t", "payload": {}})
                )
            except httpx.HTTPError as exc:
                answers.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        wait_until(
            lambda: replication(new)["durable_lsn"] == base + 1,
            30,
            "the v3 follower to hold the record the leader has not fsynced",
        )
        assert health(leader)["synced_lsn"] == base
        assert not answers  # not acknowledged: the leader's own fsync is not done
        # ... and the follower shows none of it
        seen = health(new)
        assert (seen["last_lsn"], seen["visible_lsn"], seen["leader_durable_lsn"]) == (
            base + 1,
            base,
            base,
        )
        assert [e["lsn"] for e in query_all(new)] == list(range(1, base + 1))
        assert get(new, "/api/v1/entities/lost/state").status_code == 404
        assert get(new, "/api/v1/tenants/default/position").json()["lsn"] == base
        assert get(new, "/api/v1/stats").json()["visible_lsn"] == base
        # an older follower is shipped only what the leader made durable
        assert replication(old)["durable_lsn"] == base
        assert health(old)["last_lsn"] == base

        # the follower stops (it keeps the record); the leader dies before its fsync, and
        # a power loss takes the record from its file
        new.stop()
        leader.kill()
        writer.join(30)
        truncate_wal(cluster.data_dir("leader") / "wal", base, Limits().record_bytes_max)
        hold.unlink()
        cluster.restart(leader, replication_port=port)
        wait_until(lambda: takes_writes(leader), 30, "the restarted leader to take writes")
        assert health(leader)["term"] == term + 1  # a new term, before any write
        for i in range(2):  # new records at the lost one's lsn and after, in the new term
            answer = post_event(leader, {"entity_id": f"n{i}", "event_type": "t", "payload": {}})
            assert answer.is_success, answer.text
        cluster.restart(new)
        end = wait_caught_up(leader, new, old)
        assert end == base + 2
        repair = replication(new)["last_repair"]
        # exactly the lost record is cut: the old term ends where the leader's log does
        assert repair is not None and (repair["kept_lsn"], repair["cut_records"]) == (base, 1)
        assert get(new, "/api/v1/entities/lost/state").status_code == 404
        assert get(new, "/api/v1/entities/n1/state").status_code == 200
        assert last_lsn(new) == end
        codes = cluster.stop_all()
        assert set(codes.values()) == {0}, codes
        for follower in ("f-new", "f-old"):
            assert_same_wal(cluster.data_dir("leader"), cluster.data_dir(follower))
