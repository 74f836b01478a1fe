"""Storage faults: a full disk and a failing fsync, against a real store behind the HTTP API.

The promises: when the disk fills, writes are refused with a clear 507 ``storage_full`` while
reads go on and ``/health`` says why; nothing on disk is corrupted; once space is back, writes
resume without a restart at the next lsn (the refused ones never took effect: a retry with
the same ids stores them once), and a restart recovers every acknowledged write exactly once,
gapless. An fsync error is fatal for
the WAL (PostgreSQL's "fsyncgate"): the node refuses every later write with 503 and reports
unhealthy, and never retries the fsync as if the data were safe.

The full disk is a real one: an 8 MiB tmpfs mounted for the test (root only; skipped, saying
why, elsewhere). The fsync error is injected in-process, by replacing the ``os`` module the
WAL calls with one whose ``fdatasync`` fails with EIO.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import walship.wal.log as wal_log
from walship.cli.main import app as cli_app
from walship.http import create_app
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.wal import FsyncPolicy

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

DISK_MIB = 8
LIMITS = Limits(segment_bytes_max=1 << 20)  # 1 MiB segments: several fit before the disk fills
PAYLOAD = "x" * 2000
BATCH = 20


def open_node(data_dir: Path, fsync: str = "always") -> Node:
    return Node.open(
        NodeConfig(data_dir, fsync=FsyncPolicy.parse(fsync), limits=LIMITS, checkpoints=False)
    )


def batch(n: int = BATCH) -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid4()),
            "entity_id": f"acct-{k % 4}",
            "event_type": "acct.credited",
            "payload": {"note": PAYLOAD},
        }
        for k in range(n)
    ]


def all_events(api: TestClient) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 10_000}
        if cursor:
            params["cursor"] = cursor
        response = api.get("/api/v1/events/query", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        out.extend(page["events"])
        cursor = page["next_cursor"]
        if not cursor:
            return out


def assert_intact(events: list[dict[str, Any]], acked: set[str]) -> None:
    """Every acknowledged id is there exactly once and lsns run 1..N."""
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event is stored twice"
    assert acked <= set(ids), f"{len(acked - set(ids))} acknowledged events are gone"
    lsns = [e["lsn"] for e in events]
    assert lsns == list(range(1, len(lsns) + 1)), "the log has a gap"


# ---------------------------------------------------------------------------------- full disk


def _mount(path: Path, size_mib: int, *, remount: bool = False) -> None:
    options = f"{'remount,' if remount else ''}size={size_mib}m"
    source = [] if remount else ["tmpfs"]
    cmd = ["mount", *(["-t", "tmpfs"] if not remount else []), "-o", options, *source, str(path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs at ``tmp_path/disk`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        _mount(disk, DISK_MIB)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {exc.stderr}")
    try:
        yield disk
    finally:
        result = subprocess.run(["umount", str(disk)], capture_output=True, check=False)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


def fill(api: TestClient) -> tuple[set[str], dict[str, Any]]:
    """Append batches until the disk is full; the acknowledged ids and the first refusal (with
    the refused events under ``events``)."""
    acked: set[str] = set()
    for _ in range(10 * DISK_MIB * 1024 * 1024 // (BATCH * len(PAYLOAD))):
        events = batch()
        response = api.post("/api/v1/events/batch", json={"events": events})
        if response.status_code != 200:
            return acked, {"status": response.status_code, "events": events, **response.json()}
        acked.update(r["event_id"] for r in response.json()["receipts"])
    raise AssertionError(f"wrote {len(acked)} events to a {DISK_MIB} MiB disk without filling it")


def wait_for_writes(api: TestClient, event: dict[str, Any]) -> dict[str, Any]:
    """Post ``event`` until it is taken (space is back); its receipt. Fails after 2 s."""
    deadline = time.monotonic() + 2
    while (response := api.post("/api/v1/events", json=event)).status_code != 200:
        assert response.status_code == 507, response.text
        assert time.monotonic() < deadline, response.text
        time.sleep(0.05)
    receipt: dict[str, Any] = response.json()
    return receipt


def test_full_disk_refuses_writes_with_507_keeps_reads_and_recovers_after_restart(
    small_disk: Path,
) -> None:
    data_dir = small_disk / "data"
    node = open_node(data_dir)
    try:
        with TestClient(create_app(node)) as api:
            acked, refusal = fill(api)
            assert len(acked) > 1_000
            assert refusal["status"] == 507
            assert refusal["error"] == "storage_full"
            assert "no space left" in refusal["message"]

            # every later write is refused the same way, at once, single or batch
            one = api.post("/api/v1/events", json=batch(1)[0])
            assert one.status_code == 507 and one.json()["error"] == "storage_full"
            # reads go on, and see exactly what was acknowledged (not the refused writes)
            assert_intact(all_events(api), acked)
            assert {e["id"] for e in all_events(api)} == acked
            state = api.get("/api/v1/entities/acct-1/state")
            assert state.status_code == 200 and state.json()["version"] > 0
            health = api.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "unhealthy"
            assert "no space left" in health.json()["wal_failed"]

            # space comes back: writes resume (the test below looks closer), health recovers
            _mount(small_disk, 4 * DISK_MIB, remount=True)
            acked.add(wait_for_writes(api, batch(1)[0])["event_id"])
            assert api.get("/health").status_code == 200
    finally:
        node.close()

    # nothing is corrupted: the refused group was cut away before it was refused
    checked = CliRunner().invoke(cli_app, ["wal", "verify", str(data_dir)])
    assert checked.exit_code == 0, checked.output
    assert "corrupt" not in checked.output

    node = open_node(data_dir)
    try:
        with TestClient(create_app(node)) as api:
            assert api.get("/health").status_code == 200
            events = all_events(api)
            assert_intact(events, acked)
            resumed = api.post("/api/v1/events/batch", json={"events": batch()})
            assert resumed.status_code == 200, resumed.text
            assert resumed.json()["first_lsn"] == events[-1]["lsn"] + 1
    finally:
        node.close()


def test_writes_resume_when_space_returns_without_a_restart(small_disk: Path) -> None:
    """The disk fills mid-run and is grown again: the next write gets the next lsn, the
    refused batch retried with the same ids is stored once (it never took effect), and the
    log on disk reads back exactly as acknowledged, with a restart and without."""
    data_dir = small_disk / "data"
    node = open_node(data_dir)
    try:
        with TestClient(create_app(node)) as api:
            acked, refusal = fill(api)
            assert refusal["status"] == 507
            last_acked = all_events(api)[-1]["lsn"]
            assert api.get("/health").json()["last_lsn"] == last_acked  # no lsn of the refused
            _mount(small_disk, 4 * DISK_MIB, remount=True)
            receipt = wait_for_writes(api, batch(1)[0])
            assert receipt["lsn"] == last_acked + 1
            acked.add(receipt["event_id"])

            retried = api.post("/api/v1/events/batch", json={"events": refusal["events"]})
            assert retried.status_code == 200, retried.text
            assert not any(r["duplicate"] for r in retried.json()["receipts"])
            assert retried.json()["first_lsn"] == last_acked + 2
            acked.update(r["event_id"] for r in retried.json()["receipts"])
            events = all_events(api)
            assert_intact(events, acked)
            assert {e["id"] for e in events} == acked
            health = api.get("/health").json()
            assert health["status"] == "healthy" and health["wal_failed"] is None
            assert health["last_lsn"] == events[-1]["lsn"]
    finally:
        node.close()

    checked = CliRunner().invoke(cli_app, ["wal", "verify", str(data_dir)])
    assert checked.exit_code == 0, checked.output
    node = open_node(data_dir)
    try:
        with TestClient(create_app(node)) as api:
            assert {e["id"] for e in all_events(api)} == acked
            assert_intact(all_events(api), acked)
    finally:
        node.close()


# ---------------------------------------------------------------------------------- fsync error


class FailingFsync:
    """Stands in for the ``os`` module inside ``walship.wal.log``: ``fdatasync`` fails with
    EIO once armed; every call (and every ``pwrite``) is counted."""

    def __init__(self) -> None:
        self.armed = False
        self.fsyncs = 0
        self.failed_fsyncs = 0
        self.pwrites = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fdatasync(self, fd: int) -> None:
        self.fsyncs += 1
        if self.armed:
            self.failed_fsyncs += 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fdatasync(fd)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self.pwrites += 1
        return os.pwrite(fd, data, offset)


@pytest.fixture
def failing_fsync(monkeypatch: pytest.MonkeyPatch) -> FailingFsync:
    fake = FailingFsync()
    monkeypatch.setattr(wal_log, "os", fake)
    return fake


@pytest.mark.parametrize("fsync", ["always", "interval:20"])
def test_fsync_error_is_fatal_for_the_wal_and_never_retried(
    tmp_path: Path, failing_fsync: FailingFsync, monkeypatch: pytest.MonkeyPatch, fsync: str
) -> None:
    data_dir = tmp_path / "data"
    node = open_node(data_dir, fsync)
    acked: set[str] = set()
    try:
        with TestClient(create_app(node)) as api:
            for _ in range(3):
                response = api.post("/api/v1/events/batch", json={"events": batch(5)})
                assert response.status_code == 200
                acked.update(r["event_id"] for r in response.json()["receipts"])
            failing_fsync.armed = True
            doomed = batch(1)[0]
            response = api.post("/api/v1/events", json=doomed)
            if response.status_code == 200:
                # interval: answered before the background fsync, and the receipt says so
                assert fsync != "always"
                assert response.json()["durability"] == "buffered"
                acked.add(doomed["id"])
            else:
                # the write's own group commit hit the error: it is not acknowledged
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "wal_failed"
            deadline = time.monotonic() + 5
            while api.get("/health").status_code != 503:
                assert time.monotonic() < deadline, "the failed fsync did not fail the WAL"
                time.sleep(0.02)
            assert failing_fsync.failed_fsyncs == 1
            fsyncs, pwrites = failing_fsync.fsyncs, failing_fsync.pwrites

            for _ in range(3):
                refused = api.post("/api/v1/events", json=batch(1)[0])
                assert refused.status_code == 503
                assert refused.json()["error"] == "wal_failed"
                assert "restart" in refused.json()["message"]
            time.sleep(0.1)  # an interval writer would have retried by now
            assert (failing_fsync.fsyncs, failing_fsync.pwrites) == (fsyncs, pwrites), (
                "the WAL touched the disk again after a failed fsync"
            )
            health = api.get("/health").json()
            assert health["status"] == "unhealthy"
            assert "Input/output error" in health["wal_failed"]
            visible = {e["id"] for e in all_events(api)}
            assert visible >= (acked - {doomed["id"]})
    finally:
        node.close()

    # restart (a working disk): everything acknowledged is there once, the log is gapless;
    # the write refused with 503 may or may not have reached the disk, but never twice
    monkeypatch.setattr(wal_log, "os", os)
    node = open_node(data_dir, fsync)
    try:
        with TestClient(create_app(node)) as api:
            events = all_events(api)
            assert_intact(events, acked)
            assert [e["id"] for e in events].count(doomed["id"]) <= 1
            assert api.post("/api/v1/events", json=batch(1)[0]).status_code == 200
    finally:
        node.close()


# ------------------------------------------------------------------- a promotion that cannot write


def test_a_promotion_that_cannot_write_its_first_record_leaves_a_follower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promotion writes the new term's first record before the node calls itself leader: when
    that write fails (here a full disk), the node is still a follower, on disk too, and a
    retry takes a higher term."""
    from walship.errors import StorageFull
    from walship.node import Role
    from walship.replication.config import ReplicationConfig

    node = Node.open(
        NodeConfig(
            tmp_path / "f1",
            node_id="f1",
            role=Role.FOLLOWER,
            admin_token="token",
            checkpoints=False,
            replication=ReplicationConfig(secret=b"s3cret", leader="127.0.0.1:9"),
        )
    )
    real_append_system = node.store.append_system

    def full(event_type: str, payload: bytes) -> int:
        raise StorageFull("no space left for the WAL (test)")

    monkeypatch.setattr(node.store, "append_system", full)
    admin = {"authorization": "Bearer token"}
    try:
        with TestClient(create_app(node)) as api:
            refused = api.post("/internal/promote?force=true", headers=admin)
            assert refused.status_code == 507, refused.text
            assert node.role == Role.FOLLOWER and node.leader is None
            assert node.follower is not None and node.follower.close_reason is None  # again
            assert api.get("/health").json()["role"] == "follower"
            assert node.role_state.record.role != Role.LEADER  # a restart comes up following
            failed_term = node.store.wal.terms.current.value
            assert node.role_state.record.term_seen >= failed_term

            monkeypatch.setattr(node.store, "append_system", real_append_system)
            promoted = api.post("/internal/promote?force=true", headers=admin)
            assert promoted.status_code == 200, promoted.text
            assert node.role == Role.LEADER
            assert node.store.wal.terms.current.value > failed_term
            assert node.role_state.record.role == Role.LEADER
    finally:
        node.close()


def test_a_newer_term_that_could_not_be_saved_is_saved_by_the_next_try(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The role record changes only once it is on disk: after a failed save, the same newer
    term is written again (a fence retries it), never taken as saved."""
    import walship.role_state as role_state_mod
    from walship.role_state import RoleState

    state = RoleState(tmp_path)
    real_write = role_state_mod.atomic_write

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(role_state_mod, "atomic_write", full)
    with pytest.raises(OSError):
        state.saw_term(7)
    assert state.record.term_seen == 0
    monkeypatch.setattr(role_state_mod, "atomic_write", real_write)
    state.saw_term(7)
    assert RoleState(tmp_path).record.term_seen == 7
