"""The PostgreSQL peer of the replication benchmark (issue 15): the same figures, measured on
a PostgreSQL primary with two streaming standbys on loopback, in the same run as walship's.

Debian's ``postgresql`` package (``apt-get install -y postgresql``; ``scripts/bench`` installs
it when it is missing and it runs as root) and the ``bench`` extra (psycopg) are needed. The
benchmark makes the three servers itself: ``initdb`` into a temporary directory, two
``pg_basebackup`` copies with replication slots, ports chosen at run time, 127.0.0.1 only; run as
root it runs them as the ``postgres`` user. They are stopped and deleted at the end.

The same ~1.1 KB events as walship's (``common.event``), one row each, payload and metadata as
``jsonb``, with a primary key and an index by entity (walship keeps the same two lookups):

- batch ingest: 4 connections each sending ``COPY`` of 1,000 rows in one transaction;
- single writes: ``pgbench`` (C, as ``wrk`` is for walship) with one single-row ``INSERT`` per
  transaction, 1 client (p50/p99) and 64 clients (events/s);
- ack settings: walship ``async`` = no synchronous standby (``synchronous_commit = on``: the
  primary still flushes its own WAL, as walship's leader fsyncs before it answers),
  ``semi-sync`` = ``ANY 1 (s1, s2)``, ``quorum:2`` and ``sync`` = ``ANY 2 (s1, s2)``, plus
  ``synchronous_commit = off`` (no flush waited for at all) for scale;
- replication lag at half the async rate: ``pg_stat_replication.flush_lag`` sampled every 10 ms;
- catch-up of a stopped standby: rows/s (and WAL MB/s) replayed from the moment it connects;
- a base copy of the whole primary (``pg_basebackup``), MB/s and rows/s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from common import event, free_port, percentile

# walship's ack mode -> (synchronous_standby_names, synchronous_commit)
ACK_SETTINGS = {
    "async": ("", "on"),
    "semi-sync": ("ANY 1 (s1, s2)", "on"),
    "quorum:2": ("ANY 2 (s1, s2)", "on"),
    "sync": ("ANY 2 (s1, s2)", "on"),
    "commit-off": ("", "off"),
}
TABLE = """
DROP TABLE IF EXISTS events;
CREATE TABLE events (
    lsn bigserial PRIMARY KEY,
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    tenant_id text NOT NULL DEFAULT 'default',
    entity_id text NOT NULL,
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    ts timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_entity ON events (tenant_id, entity_id, lsn);
"""
CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockets}'
fsync = on
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
max_connections = 120
shared_buffers = 256MB
max_wal_size = 4GB
wal_sender_timeout = 60s
hot_standby = on
hot_standby_feedback = on
"""
# pgbench's single-event script: the same shape and size as walship's wrk body
PGBENCH_SCRIPT = (
    "\\set n random(1, 1000000000)\n"
    "INSERT INTO events (entity_id, event_type, payload) VALUES ('acct-' || (:n % 10000), "
    "'account.credited', jsonb_build_object('amount', :n, 'note', '" + "x" * 900 + "'));\n"
)


class PostgresMissing(RuntimeError):
    """PostgreSQL's server binaries or the psycopg driver are not installed."""


def pg_bindir() -> Path:
    """The newest installed PostgreSQL's ``bin`` directory (Debian's layout, or on PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: p.parts)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise PostgresMissing(
        "PostgreSQL is not installed: `apt-get install -y postgresql` (scripts/bench does it "
        "when run as root), or run with --peer none"
    )


def _psycopg() -> Any:
    try:
        import psycopg  # optional: only the peer needs it
    except ImportError as exc:
        raise PostgresMissing(
            "psycopg is not installed: `.venv/bin/pip install -e '.[bench]'` (scripts/bench "
            "does it), or run with --peer none"
        ) from exc
    return psycopg


class PgNode:
    """One PostgreSQL server under ``directory`` on 127.0.0.1:``port``."""

    def __init__(self, cluster: PgCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.directory = cluster.root / name
        self.port = free_port()
        self.running = False

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def configure(self, extra: str = "") -> None:
        conf = CONF.format(port=self.port, sockets=self.cluster.root)
        with open(self.directory / "postgresql.conf", "a") as f:
            f.write(conf + extra)
        # pg_basebackup copies the primary's auto.conf (ALTER SYSTEM): start from a clean one
        (self.directory / "postgresql.auto.conf").write_text("")
        self.cluster.own(self.directory)

    def start(self) -> None:
        log = self.cluster.root / f"{self.name}.log"
        self.cluster.run(
            "pg_ctl", "-D", str(self.directory), "-l", str(log), "-w", "-t", "60", "start"
        )
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.cluster.run("pg_ctl", "-D", str(self.directory), "-m", "fast", "-w", "stop")
            self.running = False

    def connect(self, autocommit: bool = True) -> Any:
        return _psycopg().connect(self.dsn, autocommit=autocommit)


class PgCluster:
    """A primary and ``standbys`` streaming standbys (s1, s2, ...) with replication slots."""

    def __init__(self, root: Path, standbys: int = 2) -> None:
        self.bindir = pg_bindir()
        self.check_driver()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.as_postgres = os.geteuid() == 0  # initdb refuses root
        self.own(root)
        os.chmod(root, 0o755)
        self.primary = PgNode(self, "primary")
        self.standbys: list[PgNode] = []
        try:
            self.run("initdb", "-D", str(self.primary.directory), "-A", "trust", "-U", "postgres",
                     "--no-instructions", "-E", "UTF8")  # fmt: skip
            self.primary.configure()
            self.primary.start()
            for i in range(standbys):
                self.standbys.append(self.add_standby(f"s{i + 1}"))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def check_driver() -> None:
        """Raise PostgresMissing when psycopg is not installed."""
        _psycopg()

    def own(self, path: Path) -> None:
        if self.as_postgres:
            shutil.chown(path, "postgres", "postgres")
            for p in path.rglob("*"):
                shutil.chown(p, "postgres", "postgres")

    def run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        done = subprocess.run(
            cmd,
            user="postgres" if self.as_postgres else None,
            cwd=self.root,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def base_backup(self, directory: Path, slot: str | None) -> float:
        """``pg_basebackup`` of the primary into ``directory``; returns the seconds it took."""
        slot_args = ["-C", "-S", slot] if slot else []
        t0 = time.perf_counter()
        port = str(self.primary.port)
        self.run("pg_basebackup", "-h", "127.0.0.1", "-p", port, "-U", "postgres",
                 "-D", str(directory), "-X", "stream", "-c", "fast", *slot_args)  # fmt: skip
        return time.perf_counter() - t0

    def add_standby(self, name: str) -> PgNode:
        node = PgNode(self, name)
        self.base_backup(node.directory, slot=name)
        node.configure(
            f"primary_conninfo = 'host=127.0.0.1 port={self.primary.port} user=postgres "
            f"application_name={name}'\nprimary_slot_name = '{name}'\n"
        )
        (node.directory / "standby.signal").touch()
        self.own(node.directory)
        node.start()
        return node

    def settings(self, mode: str) -> None:
        """Apply walship ack mode ``mode``'s PostgreSQL equivalent (ALTER SYSTEM + reload)."""
        names, commit = ACK_SETTINGS[mode]
        with self.primary.connect() as conn:
            conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
            conn.execute(f"ALTER SYSTEM SET synchronous_commit = '{commit}'")
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                row = conn.execute("SHOW synchronous_standby_names").fetchone()
                if row[0] == names:
                    return
                time.sleep(0.02)
        raise RuntimeError("PostgreSQL did not take the new settings")

    def reset_table(self) -> None:
        with self.primary.connect() as conn:
            conn.execute(TABLE)
            conn.execute("CHECKPOINT")

    def wait_streaming(self, count: int, timeout_s: float = 60) -> None:
        """Wait until ``count`` standbys stream and have replayed everything written so far."""
        deadline = time.monotonic() + timeout_s
        with self.primary.connect() as conn:
            while time.monotonic() < deadline:
                rows = conn.execute(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' "
                    "AND replay_lsn >= pg_current_wal_lsn()"
                ).fetchone()
                if rows[0] >= count:
                    return
                time.sleep(0.05)
        raise RuntimeError(f"{count} PostgreSQL standbys did not get in sync")

    def close(self) -> None:
        for node in [*self.standbys, self.primary]:
            with contextlib.suppress(Exception):
                node.stop()


@contextlib.contextmanager
def cluster(standbys: int = 2) -> Iterator[PgCluster]:
    root = Path(tempfile.mkdtemp(prefix="walship-pg-bench-"))
    try:
        c = PgCluster(root, standbys)
        try:
            yield c
        finally:
            c.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _copy_text(value: str) -> str:
    """A field in COPY's text format: backslash, tab and newlines escaped."""
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def copy_batches(n: int, offset: int = 0, rows: int = 1000) -> list[bytes]:
    """COPY text-format bodies of ``rows`` events each, built before the clock starts."""
    out = []
    for b in range(n // rows):
        lines = []
        for i in range(rows):
            ev = event(offset + b * rows + i)
            lines.append(
                "\t".join(
                    (
                        _copy_text(ev["entity_id"]),
                        ev["event_type"],
                        _copy_text(msgspec.json.encode(ev["payload"]).decode()),
                        _copy_text(msgspec.json.encode(ev["metadata"]).decode()),
                    )
                )
            )
        out.append(("\n".join(lines) + "\n").encode())
    return out


def ingest(node: PgNode, bodies: list[bytes], concurrency: int = 4) -> float:
    """Send every body as one COPY transaction from ``concurrency`` connections; seconds."""
    queue = list(reversed(bodies))
    lock = threading.Lock()
    errors: list[BaseException] = []
    conns = [node.connect(autocommit=False) for _ in range(concurrency)]

    def worker(conn: Any) -> None:
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    body = queue.pop()
                with (
                    conn.cursor() as cur,
                    cur.copy(
                        "COPY events (entity_id, event_type, payload, metadata) FROM STDIN"
                    ) as copy,
                ):
                    copy.write(body)
                conn.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in conns]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    if errors:
        raise errors[0]
    return elapsed


def throughput(c: PgCluster, n: int, modes: list[str]) -> dict[str, Any]:
    """Batch ingest per ack mode, each into a new table."""
    out: dict[str, Any] = {}
    bodies = copy_batches(n)
    for mode in modes:
        c.settings(mode)
        c.reset_table()
        c.wait_streaming(len(c.standbys))
        elapsed = ingest(c.primary, bodies)
        out[f"pg_{_key(mode)}_batch_events_per_s"] = round(n / elapsed)
        print(f"  postgres {mode}: {out[f'pg_{_key(mode)}_batch_events_per_s']} events/s",
              flush=True)  # fmt: skip
    return out


def throughput_alone(n: int) -> dict[str, Any]:
    """Batch ingest on a primary without standbys (walship's no-follower figure)."""
    with cluster(standbys=0) as c:
        c.reset_table()
        elapsed = ingest(c.primary, copy_batches(n))
    rate = round(n / elapsed)
    print(f"  postgres alone: {rate} events/s", flush=True)
    return {"pg_none_batch_events_per_s": rate}


def pgbench(c: PgCluster, clients: int, *, seconds: float = 0, count: int = 0) -> dict[str, Any]:
    """Single-row INSERTs from ``clients`` pgbench clients, for ``seconds`` or ``count`` each:
    events/s and per-transaction latency p50/p99 (from pgbench's own log)."""
    work = c.root / f"pgbench-{clients}"
    work.mkdir(exist_ok=True)
    (work / "insert.sql").write_text(PGBENCH_SCRIPT)
    c.own(work)
    length = ["-T", str(max(1, round(seconds)))] if seconds else ["-t", str(count)]
    t0 = time.perf_counter()
    c.run("pgbench", "-n", "-h", "127.0.0.1", "-p", str(c.primary.port), "-U", "postgres",
          "-c", str(clients), "-j", str(min(clients, 2)), *length, "-f", str(work / "insert.sql"),
          "-l", "--log-prefix", str(work / "log"), "postgres")  # fmt: skip
    elapsed = time.perf_counter() - t0
    latencies: list[float] = []
    first_us, last_us = None, None
    for log in work.glob("log*"):
        for line in log.read_text().splitlines():
            fields = line.split()
            latencies.append(int(fields[2]) / 1000)
            end_us = int(fields[4]) * 1_000_000 + int(fields[5])
            start_us = end_us - int(fields[2])
            first_us = start_us if first_us is None else min(first_us, start_us)
            last_us = end_us if last_us is None else max(last_us, end_us)
        log.unlink()
    span = (last_us - first_us) / 1e6 if first_us is not None and last_us is not None else elapsed
    return {
        "events": len(latencies),
        "events_per_s": round(len(latencies) / span) if span > 0 else 0,
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
    }


def single_writes(c: PgCluster, modes: list[str], count: int, seconds: float) -> dict[str, Any]:
    """Per mode: one client's latency over ``count`` inserts; 64 clients' rate over ``seconds``."""
    out: dict[str, Any] = {}
    for mode in modes:
        c.settings(mode)
        c.reset_table()
        c.wait_streaming(len(c.standbys))
        k = _key(mode)
        one = pgbench(c, 1, count=count)
        out[f"pg_{k}_single_p50_ms"] = one["p50_ms"]
        out[f"pg_{k}_single_p99_ms"] = one["p99_ms"]
        many = pgbench(c, 64, seconds=seconds)
        out[f"pg_{k}_single64_events_per_s"] = many["events_per_s"]
        out[f"pg_{k}_single64_p50_ms"] = many["p50_ms"]
        out[f"pg_{k}_single64_p99_ms"] = many["p99_ms"]
        print(f"  postgres {mode}: single p50 {one['p50_ms']} ms, 64 clients "
              f"{many['events_per_s']} events/s", flush=True)  # fmt: skip
    return out


def lag(c: PgCluster, mode: str, rate: float, seconds: float) -> dict[str, Any]:
    """Pace COPYs of 100 rows at ``rate`` events/s; sample ``flush_lag`` every 10 ms."""
    c.settings(mode)
    c.reset_table()
    c.wait_streaming(len(c.standbys))
    samples: list[float] = []
    stop = threading.Event()

    def sampler() -> None:
        with c.primary.connect() as conn:
            while not stop.is_set():
                for (lag_s,) in conn.execute(
                    "SELECT extract(epoch FROM flush_lag) FROM pg_stat_replication"
                ).fetchall():
                    # NULL: the standby has confirmed everything and nothing new was written
                    samples.append(float(lag_s) * 1000 if lag_s is not None else 0.0)
                time.sleep(0.01)

    bodies = copy_batches(max(100, round(rate * seconds)), rows=100)
    thread = threading.Thread(target=sampler)
    thread.start()
    try:
        with c.primary.connect(autocommit=False) as conn:
            interval = 100 / rate
            next_at = time.monotonic()
            for body in bodies:
                with (
                    conn.cursor() as cur,
                    cur.copy(
                        "COPY events (entity_id, event_type, payload, metadata) FROM STDIN"
                    ) as copy,
                ):
                    copy.write(body)
                conn.commit()
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    finally:
        stop.set()
        thread.join()
    k = _key(mode)
    return {
        f"pg_{k}_lag_rate_events_per_s": round(rate),
        f"pg_{k}_lag_samples": len(samples),
        f"pg_{k}_lag_p50_ms": round(percentile(samples, 50), 3),
        f"pg_{k}_lag_p99_ms": round(percentile(samples, 99), 3),
    }


def catch_up(c: PgCluster, n: int) -> dict[str, Any]:
    """Stop standby s2, ingest ``n`` events, start it again: rows/s replayed from the moment
    it connects (and from its start); then a base copy of the whole primary."""
    out: dict[str, Any] = {}
    c.settings("async")
    c.reset_table()
    c.wait_streaming(len(c.standbys))
    standby = c.standbys[-1]
    standby.stop()
    with c.primary.connect() as conn:
        start_lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        ingest(c.primary, copy_batches(n))
        conn.execute("CHECKPOINT")
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        wal_bytes = int(
            conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (target, start_lsn)).fetchone()[0]
        )
        t0 = time.perf_counter()
        standby.start()
        connected = None
        while True:
            row = conn.execute(
                "SELECT replay_lsn >= %s FROM pg_stat_replication WHERE application_name = %s",
                (target, standby.name),
            ).fetchone()
            if row is not None and connected is None:
                connected = time.perf_counter()
            if row is not None and row[0]:
                break
            time.sleep(0.005)
        done = time.perf_counter()
        assert connected is not None
        out["pg_catchup_wal_seconds"] = round(done - connected, 3)
        out["pg_catchup_wal_seconds_with_start"] = round(done - t0, 3)
        out["pg_catchup_wal_records_per_s"] = round(n / (done - connected))
        out["pg_catchup_wal_mb_per_s"] = round(wal_bytes / 1e6 / (done - connected), 1)
        size = int(conn.execute("SELECT pg_database_size('postgres')").fetchone()[0])
        rows = int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    seconds = c.base_backup(c.root / "base-copy", slot=None)
    shutil.rmtree(c.root / "base-copy", ignore_errors=True)
    out["pg_base_copy_seconds"] = round(seconds, 3)
    out["pg_base_copy_mb_per_s"] = round(size / 1e6 / seconds, 1)
    out["pg_base_copy_records_per_s"] = round(rows / seconds)
    print(f"  postgres catch-up: {out['pg_catchup_wal_records_per_s']} rows/s; base copy "
          f"{out['pg_base_copy_mb_per_s']} MB/s", flush=True)  # fmt: skip
    return out


def _key(mode: str) -> str:
    return mode.replace("-", "_").replace(":", "")


def run(
    events: int,
    catchup_events: int,
    *,
    lag_seconds: float,
    latency_count: int,
    single_seconds: float,
) -> dict[str, Any]:
    """Every PostgreSQL figure, as ``pg_*`` keys for results/replication.json."""
    out: dict[str, Any] = {"pg_version": _version()}
    out.update(throughput_alone(events))
    with cluster() as c:
        out.update(throughput(c, events, ["async", "semi-sync", "sync", "commit-off"]))
        out["pg_quorum2_batch_events_per_s"] = out["pg_sync_batch_events_per_s"]  # both ANY 2
        rate = out["pg_async_batch_events_per_s"] / 2
        for mode in ("async", "sync"):
            out.update(lag(c, mode, rate, lag_seconds))
        out["pg_lag_p99_ms"] = out["pg_sync_lag_p99_ms"]  # the yardstick: ANY 2
        print(f"  postgres lag p99 at {round(rate)} events/s: async "
              f"{out['pg_async_lag_p99_ms']} ms, ANY 2 {out['pg_sync_lag_p99_ms']} ms",
              flush=True)  # fmt: skip
        out.update(single_writes(c, ["async", "semi-sync", "sync"], latency_count, single_seconds))
        out.update(catch_up(c, catchup_events))
    return out


def _version() -> str:
    done = subprocess.run([str(pg_bindir() / "postgres"), "--version"], capture_output=True,
                          text=True, check=False)  # fmt: skip
    return done.stdout.strip()
