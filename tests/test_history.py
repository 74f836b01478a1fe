"""Outside readers of the Parquet history (``walship.history``, ``walship sql``) while the
store checkpoints and compacts; forcing a checkpoint (``walship checkpoint``, the admin
endpoint); a clean stop leaving every event in Parquet."""

from __future__ import annotations

import bisect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import msgspec
import pytest
from typer.testing import CliRunner

from tests.cluster import wal_records
from tests.conftest import make_event
from walship import history
from walship.cli.main import app
from walship.errors import NotFound, Unavailable
from walship.limits import Limits
from walship.storage.manifest import CheckpointManifest, read_manifest, save_manifest
from walship.storage.parquet import PartInfo
from walship.storage.pins import READERS_DIR, pin_history, sweep_stale_pins
from walship.store import Store, StoreConfig
from walship.testing.process import NodeProcess
from walship.wal import FsyncPolicy

runner = CliRunner()
TOKEN = "history-test-admin-token"
READER = Path(__file__).with_name("history_reader.py")
ROOT = Path(__file__).resolve().parent.parent


def open_store(path: Path, *, checkpoints: bool = False, limits: Limits | None = None) -> Store:
    return Store.open(
        StoreConfig(
            path,
            fsync=FsyncPolicy.parse("never"),
            checkpoints=checkpoints,
            limits=limits or Limits(compaction_fanin_min=2),
        )
    )


def fill(store: Store, parts: int, per_part: int = 30) -> int:
    """Append ``parts`` checkpoints of ``per_part`` events; the events written."""
    for p in range(parts):
        store.append_batch([make_event(f"acct-{(p * per_part + i) % 7}") for i in range(per_part)])
        store.checkpoint()
    return parts * per_part


def duck_count(con: duckdb.DuckDBPyConnection, table: str = "events") -> int:
    row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# ------------------------------------------------------------------ pins, in one process


def test_snapshot_stays_readable_after_a_compaction_deletes_its_parts(data_dir: Path) -> None:
    with open_store(data_dir) as store:
        written = fill(store, 4)
        con = duckdb.connect()
        with history.open_snapshot(data_dir) as snap:
            snap.duckdb_view(con)
            originals = [data_dir / "checkpoints" / "parts" / f.name for f in snap.files]
            assert len(originals) == 4 and all(p.exists() for p in originals)
            while store.compact() is not None:
                pass
            assert not any(p.exists() for p in originals)  # compacted away under the reader
            assert duck_count(con) == written
            assert snap.dataset().count_rows() == written
            with history.open_snapshot(data_dir) as newer:
                assert len(newer.files) == 1
                assert newer.events == written
        assert snap.closed
        assert list((data_dir / READERS_DIR).iterdir()) == []  # links gone with the pin


def test_view_on_a_data_dir_without_checkpoint_is_empty_with_the_schema(data_dir: Path) -> None:
    with open_store(data_dir) as store:
        store.append(make_event())
        con = duckdb.connect()
        snap = history.duckdb_view(con, data_dir)
        assert (snap.last_lsn, snap.events, snap.files) == (0, 0, [])
        assert duck_count(con) == 0
        columns = {name: kind for name, kind, *_ in con.execute("DESCRIBE events").fetchall()}
        assert columns["timestamp"] == "TIMESTAMP WITH TIME ZONE"
        assert columns["lsn"] == "BIGINT" and columns["payload"] == "VARCHAR"
        assert snap.dataset().count_rows() == 0
        store.checkpoint()
        newer = history.duckdb_view(con, data_dir)  # the view moves to the newest checkpoint
        assert snap.closed and not newer.closed
        assert duck_count(con) == 1


def test_a_view_keeps_its_pin_while_the_connection_lives(data_dir: Path) -> None:
    """A snapshot nobody holds but a DuckDB view still reads is not released under it."""
    with open_store(data_dir) as store:
        written = fill(store, 3)
        con = duckdb.connect()
        history.duckdb_view(con, data_dir, name="hist")  # return value dropped
        while store.compact() is not None:
            pass
        assert duck_count(con, "hist") == written
        assert len(list((data_dir / READERS_DIR).iterdir())) == 1
        del con
        assert list((data_dir / READERS_DIR).iterdir()) == []


def test_files_context_lists_the_parts_of_one_manifest(data_dir: Path) -> None:
    with open_store(data_dir) as store:
        written = fill(store, 3)
        with history.files(data_dir) as paths:
            assert [p.name for p in paths] == [p.file for p in store.manifest.parts]
            con = duckdb.connect()
            listed = ", ".join(f"'{p}'" for p in paths)
            assert duck_count(con, f"read_parquet([{listed}])") == written


def test_pin_of_a_reader_that_died_is_swept_and_a_live_one_is_not(data_dir: Path) -> None:
    with open_store(data_dir) as store:
        fill(store, 2)
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time; from walship import history; "
                "s = history.open_snapshot(sys.argv[1]); print(s.files[0], flush=True); "
                "time.sleep(600)",
                str(data_dir),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            pinned = Path(child.stdout.readline().strip())
            assert pinned.exists()
            with history.open_snapshot(data_dir) as live:
                assert sweep_stale_pins(data_dir) == 0  # both held
                child.kill()
                child.wait(10)
                assert sweep_stale_pins(data_dir) == 1  # the dead one's lock went with it
                assert not pinned.parent.exists()
                assert live.files[0].exists() and not live.closed
        finally:
            child.kill()
            child.wait(10)


def test_compaction_sweeps_the_pins_of_dead_readers(data_dir: Path) -> None:
    with open_store(data_dir) as store:
        fill(store, 2)
        stale = data_dir / READERS_DIR / "12345-dead"
        stale.mkdir(parents=True)
        os.link(data_dir / "checkpoints" / "parts" / store.manifest.parts[0].file, stale / "x")
        assert store.compact() is not None
        assert not stale.exists()


def test_an_idle_store_sweeps_the_pins_of_dead_readers(data_dir: Path) -> None:
    """A reader killed while its pin held parts that were merged away keeps their space
    until someone sweeps; a node that no longer merges (idle) does it in the background."""
    limits = Limits(compaction_fanin_min=2, pin_sweep_interval_ms=100)
    with open_store(data_dir, checkpoints=True, limits=limits) as store:
        fill(store, 2)
        wait_for(lambda: store.compactions >= 1 and len(store.manifest.parts) == 1)
        stale = data_dir / READERS_DIR / "12345-dead"
        stale.mkdir(parents=True)
        os.link(data_dir / "checkpoints" / "parts" / store.manifest.parts[0].file, stale / "x")
        wait_for(lambda: not stale.exists())
        assert store.compactions == 1  # swept with no merge since


def wait_for(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_manifest_whose_parts_never_appear_fails_within_the_timeout(data_dir: Path) -> None:
    (data_dir / "checkpoints" / "parts").mkdir(parents=True)
    part = PartInfo("0000000000000001-0000000000000002.parquet", 1, 2, 2, 10, "", 0, 0, [])
    save_manifest(data_dir / "checkpoints", CheckpointManifest(last_lsn=2, parts=[part]))
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="could not pin a whole checkpoint"):
        pin_history(data_dir, timeout_ms=300)
    assert time.monotonic() - t0 < 10
    assert list((data_dir / READERS_DIR).iterdir()) == []  # the failed pin cleaned up


def test_a_pin_taken_when_parts_were_just_replaced_retries_with_the_new_manifest(
    data_dir: Path,
) -> None:
    """What a reader sees when a compaction swaps the manifest and deletes the parts between
    its read of the manifest and its links: parts that are gone (or not the same file any
    more). It reads the manifest again and pins that one."""
    with open_store(data_dir) as store:
        written = fill(store, 2)
        good = store.manifest
    checkpoints = data_dir / "checkpoints"
    gone = PartInfo("00000000000000ff-00000000000000ff.parquet", 255, 255, 1, 10, "", 0, 0, [])
    resized = msgspec.structs.replace(good.parts[0], bytes=good.parts[0].bytes + 1)
    for stale in ([*good.parts, gone], [resized, *good.parts[1:]]):
        save_manifest(checkpoints, msgspec.structs.replace(good, parts=stale))
        swap = threading.Timer(0.3, save_manifest, (checkpoints, good))
        swap.start()
        try:
            with pin_history(data_dir, timeout_ms=30_000) as pin:
                assert pin.manifest == good
                assert [f.name for f in pin.files] == [p.file for p in good.parts]
                con = duckdb.connect()
                listed = ", ".join(f"'{f}'" for f in pin.files)
                assert duck_count(con, f"read_parquet([{listed}])") == written
        finally:
            swap.join()


def test_a_directory_that_is_not_a_data_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not a walship data dir"):
        history.open_snapshot(tmp_path)
    assert not (tmp_path / READERS_DIR).exists()


# ------------------------------------------------------------------ readers in another process


class Timeline:
    """Values sampled over time (``time.monotonic``): what held at any earlier instant."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.values: list[int] = []

    def add(self, value: int) -> None:
        self.times.append(time.monotonic())
        self.values.append(value)

    def at(self, t: float) -> int:
        """The last value sampled at or before ``t`` (0 before any)."""
        i = bisect.bisect_right(self.times, t)
        return self.values[i - 1] if i else 0


def test_duckdb_counts_through_pins_under_ingest_checkpoints_and_merges(tmp_path: Path) -> None:
    """A reader in another process counts the history again and again while the store ingests,
    checkpoints every ~100 ms and merges parts every few checkpoints: never an error, never a
    row twice, never more rows than were written, never fewer than were checkpointed."""
    data_dir = tmp_path / "data"
    stop_file = tmp_path / "stop"
    limits = Limits(
        memtable_events_max=150,
        checkpoint_interval_ms=100,
        compaction_fanin_min=3,
        parquet_row_group_rows=64,
    )
    store = open_store(data_dir, checkpoints=True, limits=limits)
    written = Timeline()  # events whose append had started
    checkpointed = Timeline()  # events in the manifest on disk
    done = threading.Event()

    def write() -> None:
        n = 0
        while not done.is_set():
            batch = [make_event(f"acct-{(n + i) % 50}") for i in range(25)]
            n += len(batch)
            written.add(n)
            store.append_batch(batch)
            time.sleep(0.005)

    def watch() -> None:
        while not done.is_set():
            checkpointed.add(store.manifest.events)
            time.sleep(0.01)

    reader = subprocess.Popen(
        [sys.executable, str(READER), str(data_dir), str(stop_file)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    threads = [threading.Thread(target=f, daemon=True) for f in (write, watch)]
    rounds: list[dict[str, Any]] = []
    cli_rounds: list[tuple[float, float, int]] = []
    try:
        assert reader.stdout is not None
        assert json.loads(reader.stdout.readline()) == {"ready": True}
        for thread in threads:
            thread.start()
        t0 = time.monotonic()
        while True:
            elapsed = time.monotonic() - t0
            # ends as soon as enough happened (~8 s idle); the cap only bounds a loaded machine
            if elapsed > 150 or (
                elapsed > 6
                and store.compactions >= 4
                and store.checkpoints_taken >= 12
                and len(cli_rounds) >= 2
            ):
                break
            if len(cli_rounds) < 2:
                cli_rounds.append(count_with_walship_sql(data_dir))
            else:
                time.sleep(0.2)
        stop_file.touch()
        out, _ = reader.communicate(timeout=60)
    finally:
        done.set()
        stop_file.touch()
        reader.kill()
        for thread in threads:
            thread.join(30)
        stats = store.stats()
        store.close()
    rounds = [json.loads(line) for line in out.splitlines()]
    errors = [r["error"] for r in rounds if "error" in r]
    assert errors == []
    assert stats["compactions"] >= 4 and stats["checkpoints_taken"] >= 12, stats
    assert len(rounds) >= 10
    for r in rounds:
        assert r["rows"] == r["lsns"] == r["again"] == r["arrow"] == r["events"], r
        assert r["max_lsn"] <= r["last_lsn"], r
        assert r["rows"] <= written.at(r["t1"]), r
        assert r["rows"] >= checkpointed.at(r["t0"]), r
    assert len({r["last_lsn"] for r in rounds}) >= 3  # the reader followed new checkpoints
    assert len(cli_rounds) >= 2
    for t0, t1, n in cli_rounds:
        assert checkpointed.at(t0) <= n <= written.at(t1), (t0, t1, n)


def count_with_walship_sql(data_dir: Path) -> tuple[float, float, int]:
    """``walship sql`` counting the history in its own process: (start, end, count)."""
    t0 = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "walship",
            "sql",
            str(data_dir),
            "SELECT count(*) AS n, count(DISTINCT lsn) AS lsns FROM events",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    t1 = time.monotonic()
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["n"] == row["lsns"], row
    return t0, t1, int(row["n"])


# ------------------------------------------------------------------ walship sql


def test_sql_command_counts_the_checkpointed_history(data_dir: Path) -> None:
    with open_store(data_dir, checkpoints=True) as store:
        written = fill(store, 2, per_part=10)
        store.append(make_event())  # in the memtable until the close
    query = "SELECT count(*) AS n, count(DISTINCT entity_id) AS e FROM events"
    as_json = runner.invoke(app, ["sql", str(data_dir), query, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == {"n": written + 1, "e": 7}  # the close checkpointed
    as_csv = runner.invoke(app, ["sql", str(data_dir), query, "--format", "csv"])
    assert as_csv.stdout.splitlines() == ['"n","e"', f"{written + 1},7"]
    table = runner.invoke(app, ["sql", str(data_dir), "SELECT count(*) AS n FROM events"])
    assert table.exit_code == 0 and f"{written + 1}" in table.stdout
    assert not any((data_dir / READERS_DIR).iterdir())


def test_sql_command_errors_are_one_line(tmp_path: Path, data_dir: Path) -> None:
    with open_store(data_dir) as store:
        fill(store, 1)
    bad = runner.invoke(app, ["sql", str(data_dir), "SELEC 1"])
    assert bad.exit_code == 1
    assert (
        bad.stderr.startswith("walship: query failed: Parser Error") and bad.stderr.count("\n") == 1
    )
    missing = runner.invoke(app, ["sql", str(tmp_path / "nowhere"), "SELECT 1"])
    assert missing.exit_code == 1
    assert "is not a walship data dir" in missing.stderr


def test_sql_command_without_duckdb_says_how_to_install_it(data_dir: Path) -> None:
    with open_store(data_dir) as store:
        fill(store, 1)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['duckdb'] = None; "
            "from walship.cli.main import main; sys.argv = ['walship', *sys.argv[1:]]; main()",
            "sql",
            str(data_dir),
            "SELECT 1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "walship: walship sql needs DuckDB: pip install 'walship[sql]' (or pip install duckdb)"
    )


# ------------------------------------------------------------------ forcing a checkpoint


def test_checkpoint_command_on_a_stopped_data_dir(data_dir: Path, tmp_path: Path) -> None:
    crash = (
        "import os, sys; from tests.conftest import make_event; "
        "from tests.test_history import open_store; "
        "s = open_store(__import__('pathlib').Path(sys.argv[1])); "
        "s.append_batch([make_event() for _ in range(5)]); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", crash, str(data_dir)], cwd=ROOT, check=True, timeout=60)
    assert read_manifest(data_dir / "checkpoints") is None  # the events are only in the WAL
    result = runner.invoke(app, ["checkpoint", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "checkpointed 5 events" in result.stdout
    manifest = read_manifest(data_dir / "checkpoints")
    assert manifest is not None and manifest.events == 5
    again = runner.invoke(app, ["checkpoint", "--data-dir", str(data_dir)])
    assert "nothing new to checkpoint" in again.stdout
    neither = runner.invoke(app, ["checkpoint"])
    assert neither.exit_code == 2
    not_data = runner.invoke(app, ["checkpoint", "--data-dir", str(tmp_path / "nowhere")])
    assert not_data.exit_code == 1 and "not a walship data dir" in not_data.stderr
    assert not (tmp_path / "nowhere").exists()


def test_checkpoint_command_keeps_every_wal_segment(data_dir: Path) -> None:
    """Which WAL a follower still needs is known to the leader (its retention slots), not to
    a store opened offline: a checkpoint taken by ``walship checkpoint --data-dir`` removes no
    segment, or the leader's followers would need a snapshot when it starts again (DESIGN
    invariant 6). The node removes them at its own next checkpoint, slots in hand."""
    store = open_store(data_dir, limits=Limits(segment_bytes_max=4096))
    for _ in range(10):
        store.append_batch([make_event() for _ in range(10)])
    store.close()  # checkpoints off: every event is in the WAL only
    segments = sorted(p.name for p in (data_dir / "wal").glob("*.wal"))
    assert len(segments) > 2
    result = runner.invoke(app, ["checkpoint", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "checkpointed 100 events" in result.stdout
    assert sorted(p.name for p in (data_dir / "wal").glob("*.wal")) == segments
    assert [r.lsn for r in wal_records(data_dir)] == list(range(1, 101))


def test_checkpoint_command_refuses_a_data_dir_a_store_has_open(data_dir: Path) -> None:
    with open_store(data_dir) as store:
        store.append(make_event())
        result = runner.invoke(app, ["checkpoint", "--data-dir", str(data_dir)])
        assert result.exit_code == 1
        assert "is in use by" in result.stderr and f"pid {os.getpid()}" in result.stderr
        assert result.stderr.count("\n") == 1
        assert store.stats()["memtable_events"] == 1


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NodeProcess]:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    node = NodeProcess(
        tmp_path / "node",
        fsync="never",
        extra_args=["--role", "leader", "--admin-token-file", str(token_file)],
    )
    with node:
        node.start()
        yield node


def post_events(node: NodeProcess, count: int) -> None:
    events = [
        {"entity_id": f"e-{i % 3}", "event_type": "t.x", "payload": {"i": i}} for i in range(count)
    ]
    r = httpx.post(f"{node.url}/api/v1/events/batch", json={"events": events}, timeout=15)
    assert r.status_code == 200, r.text


def test_checkpoint_endpoint_needs_the_admin_token(server: NodeProcess, tmp_path: Path) -> None:
    post_events(server, 7)
    url = f"{server.url}/internal/checkpoint"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url, headers=headers, timeout=15)
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "unauthorized"
    assert httpx.get(f"{server.url}/api/v1/stats").json()["memtable_events"] == 7
    r = httpx.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=15)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["events_written"] == 7 and body["events"] == 7 and body["part"]
    stats = httpx.get(f"{server.url}/api/v1/stats").json()
    assert stats["memtable_events"] == 0 and stats["parquet_events"] == 7
    with history.open_snapshot(server.data_dir) as snap:
        assert snap.events == 7 and snap.last_lsn == body["checkpoint_lsn"]


def test_checkpoint_command_against_a_running_node(server: NodeProcess, tmp_path: Path) -> None:
    post_events(server, 4)
    token_file = tmp_path / "admin.token"
    no_token = runner.invoke(app, ["checkpoint", server.url], env={"WALSHIP_ADMIN_TOKEN": None})
    assert no_token.exit_code == 2 and "no admin token" in no_token.stderr
    wrong = tmp_path / "wrong.token"
    wrong.write_text("nope\n")
    refused = runner.invoke(app, ["checkpoint", server.url, "--admin-token-file", str(wrong)])
    assert refused.exit_code == 1 and "answered 401" in refused.stderr
    ok = runner.invoke(app, ["checkpoint", server.url, "--admin-token-file", str(token_file)])
    assert ok.exit_code == 0, ok.output
    assert "checkpointed 4 events" in ok.stdout and "covers lsn <=" in ok.stdout
    sql = runner.invoke(
        app, ["sql", str(server.data_dir), "SELECT count(*) AS n FROM events", "--format", "json"]
    )
    assert json.loads(sql.stdout) == {"n": 4}


# ------------------------------------------------------------------ a clean stop checkpoints


def test_sigterm_leaves_every_event_in_parquet(server: NodeProcess) -> None:
    post_events(server, 12)
    assert server.stop() == 0
    manifest = read_manifest(server.data_dir / "checkpoints")
    assert manifest is not None and manifest.events == 12
    with open_store(server.data_dir) as store:
        stats = store.stats()
        assert stats["memtable_events"] == 0 and stats["events"] == 12


def test_store_close_checkpoints_the_memtable(data_dir: Path) -> None:
    store = open_store(data_dir, checkpoints=True)
    store.append_batch([make_event() for _ in range(9)])
    assert store.stats()["memtable_events"] == 9
    store.close()
    with history.open_snapshot(data_dir) as snap:
        assert snap.events == 9
    reopened = open_store(data_dir)
    try:
        assert reopened.stats()["memtable_events"] == 0
        assert reopened.stats()["events"] == 9
    finally:
        reopened.close()


def test_store_close_with_checkpoints_off_keeps_the_wal_only(data_dir: Path) -> None:
    store = open_store(data_dir, checkpoints=False)
    store.append(make_event())
    store.close()
    assert read_manifest(data_dir / "checkpoints") is None


def test_a_stop_goes_on_when_its_checkpoint_fails(data_dir: Path) -> None:
    store = open_store(data_dir, checkpoints=True)
    store.append_batch([make_event() for _ in range(3)])
    parts = data_dir / "checkpoints" / "parts"
    aside = data_dir / "parts-aside"
    parts.rename(aside)
    parts.write_bytes(b"")  # a file where the part should go: the checkpoint cannot write it
    store.close()
    parts.unlink()
    aside.rename(parts)
    assert read_manifest(data_dir / "checkpoints") is None
    reopened = open_store(data_dir)
    try:
        assert reopened.stats()["events"] == 3  # replayed from the WAL
    finally:
        reopened.close()


def test_server_stop_signal_is_handled(server: NodeProcess) -> None:
    """SIGINT (Ctrl-C) is a clean stop too."""
    post_events(server, 2)
    assert server.process is not None
    server.process.send_signal(signal.SIGINT)
    assert server.wait_exit(30) == 0
    manifest = read_manifest(server.data_dir / "checkpoints")
    assert manifest is not None and manifest.events == 2
