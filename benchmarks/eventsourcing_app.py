"""The ``eventsourcing`` library on walship and on its own recorders (issue 13).

One workload per persistence module, each in a fresh place:
  (a) write: ``--events`` aggregate events through an application, one command (load the
      aggregate from the application's cache, trigger an event, save) per event, spread over
      ``--events / 10`` aggregates
  (b) read back: every aggregate loaded from the store (no cache, no snapshots)
  (c) projection: the whole notification log read in pages of 500 and every event
      reconstructed (a balance per aggregate)
  (d) insert cost against the aggregate's length: one aggregate saved ``--versions`` times;
      p50 of its last 50 saves against 50 saves of new aggregates (version 1) made between
      them (the target: within 1.2x)

Modules: walship embedded (``WALSHIP_DATA_DIR``, fsync always), walship over HTTP to a leader
with two followers in ``semi-sync`` (``WALSHIP_URLS``, fsync always), and the library's SQLite
recorder (a file). PostgreSQL runs too when Debian's ``postgresql`` (``initdb``, ``pg_ctl``)
and ``psycopg`` are installed (``pip install 'eventsourcing[postgres]'``), else it is listed
as skipped and why. Run: ``python benchmarks/eventsourcing_app.py [--quick]``; results in
results/eventsourcing.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

sys.path.insert(0, str(Path(__file__).parent))
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from common import free_port, percentile, save
from replication import Cluster

TARGETS = {"insert_p50_growth_max": 1.2}
PAGE = 500


class Account(Aggregate):
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = Decimal("0")

    @event("Credited")
    def credit(self, amount: Decimal) -> None:
        self.balance += amount


class Accounts(Application[UUID]):
    def open(self, owner: str) -> UUID:
        account = Account(owner)
        self.save(account)
        return account.id

    def credit(self, account_id: UUID, amount: Decimal) -> None:
        account: Account = self.repository.get(account_id)
        account.credit(amount)
        self.save(account)


def workload(env: dict[str, str], events: int, versions: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    aggregates = max(1, events // 10)
    # the application's cache keeps write commands from reading whole streams: (a) measures
    # the store's writes; (b) then reads every aggregate through a fresh application
    app = Accounts(env={**env, "AGGREGATE_CACHE_MAXSIZE": str(aggregates)})
    t0 = time.perf_counter()
    ids = [app.open(f"owner-{i}") for i in range(aggregates)]
    for i in range(events - aggregates):
        app.credit(ids[i % aggregates], Decimal(i % 100))
    elapsed = time.perf_counter() - t0
    out["write_events_per_s"] = round(events / elapsed)
    app.close()

    reader = Accounts(env=env)
    t0 = time.perf_counter()
    total = sum(reader.repository.get(i).balance for i in ids)
    elapsed = time.perf_counter() - t0
    out["read_aggregates_per_s"] = round(aggregates / elapsed)

    t0 = time.perf_counter()
    balances: dict[UUID, Decimal] = {}
    seen = 0
    start = 1
    while True:
        page = reader.recorder.select_notifications(start, PAGE)
        for notification in page:
            domain_event = reader.mapper.to_domain_event(notification)
            if isinstance(domain_event, Account.Credited):
                balances[domain_event.originator_id] = (
                    balances.get(domain_event.originator_id, Decimal(0)) + domain_event.amount
                )
            seen += 1
        if len(page) < PAGE:
            break
        start = page[-1].id + 1
    elapsed = time.perf_counter() - t0
    if seen != events or sum(balances.values()) != total:
        raise RuntimeError(f"projection saw {seen} of {events} events")
    out["projection_events_per_s"] = round(seen / elapsed)
    reader.close()

    # the last 50 saves of one long aggregate against 50 saves of new ones (version 1) made
    # in between them: the same moments, so the disk's mood (fsync) weighs on both alike
    app = Accounts(env=env)
    account = Account("long")
    at_last: list[float] = []
    at_first: list[float] = []
    for i in range(versions):
        if i:
            account.credit(Decimal(1))
        t0 = time.perf_counter()
        app.save(account)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        if i >= versions - 50:
            at_last.append(elapsed_ms)
            fresh = Account("new")
            t0 = time.perf_counter()
            app.save(fresh)
            at_first.append((time.perf_counter() - t0) * 1000)
    app.close()
    first = percentile(at_first, 50)
    last = percentile(at_last, 50)
    out["insert_p50_ms_at_version_1"] = round(first, 3)
    out[f"insert_p50_ms_at_version_{versions}"] = round(last, 3)
    out["insert_p50_growth"] = round(last / first, 2)
    return out


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL (Debian's binaries) on a free port; its settings."""
    bindir = next(
        (p for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None
    )
    if bindir is None:
        raise LookupError("Debian's postgresql is not installed (apt-get install postgresql)")
    import psycopg  # noqa: F401  (the library's PostgreSQL module needs both)
    import psycopg_pool  # noqa: F401

    data = root / "pg"
    port = free_port()
    run_as: list[str] = []
    if os.getuid() == 0:  # initdb refuses root
        run_as = ["runuser", "-u", "postgres", "--"]
        root.chmod(0o777)
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "bench", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "pg.log"),
         "-o", f"-p {port} -k {root} -c fsync=on", "start"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    try:
        yield {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": "postgres",
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(port),
            "POSTGRES_USER": "bench",
            "POSTGRES_PASSWORD": "",
        }
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            check=False,
            capture_output=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--versions", type=int, default=2_000)
    ap.add_argument("--quick", action="store_true", help="a small run that proves it works")
    args = ap.parse_args()
    if args.quick:
        args.events, args.versions = 500, 200
    results: dict[str, Any] = {"events": args.events, "versions": args.versions, "runs": {}}
    runs: dict[str, Any] = results["runs"]
    root = Path(tempfile.mkdtemp(prefix="walship-es-bench-"))
    try:
        print("walship embedded", flush=True)
        runs["walship_embedded"] = workload(
            {
                "PERSISTENCE_MODULE": "walship.eventsourcing",
                "WALSHIP_DATA_DIR": str(root / "embedded"),
                "WALSHIP_FSYNC": "always",
            },
            args.events,
            args.versions,
        )
        print(f"  {runs['walship_embedded']}", flush=True)

        print("walship over HTTP, a leader and two followers in semi-sync", flush=True)
        cluster = Cluster(root / "cluster", "semi-sync", 2)
        try:
            cluster.wait_in_sync(2)
            urls = [cluster.leader.url, *(f.url for f in cluster.followers)]
            runs["walship_http_semi_sync"] = workload(
                {"PERSISTENCE_MODULE": "walship.eventsourcing", "WALSHIP_URLS": ",".join(urls)},
                args.events,
                args.versions,
            )
        finally:
            cluster.close()
        print(f"  {runs['walship_http_semi_sync']}", flush=True)

        print("eventsourcing's SQLite recorder", flush=True)
        runs["sqlite"] = workload(
            {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(root / "es.db")},
            args.events,
            args.versions,
        )
        print(f"  {runs['sqlite']}", flush=True)

        print("eventsourcing's PostgreSQL recorder", flush=True)
        try:
            with postgres(root) as env:
                runs["postgres"] = workload(env, args.events, args.versions)
            print(f"  {runs['postgres']}", flush=True)
        except (LookupError, ImportError, subprocess.CalledProcessError) as exc:
            results["postgres_skipped"] = str(exc)
            print(f"  skipped: {exc}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sqlite = runs["sqlite"]
    results["ratios_to_sqlite"] = {
        name: {
            key: round(value / sqlite[key], 2)
            for key, value in run.items()
            if key.endswith("_per_s") and sqlite.get(key)
        }
        for name, run in runs.items()
        if name != "sqlite"
    }
    results["targets"] = TARGETS
    print(f"ratios to SQLite: {results['ratios_to_sqlite']}")
    print(f"wrote {save('eventsourcing', results)}")


if __name__ == "__main__":
    main()
