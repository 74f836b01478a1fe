"""Render benchmarks/results/*.json as the README's Markdown tables (figure beside target).

Run: ``python benchmarks/report.py`` after ``ingest.py``, ``replication.py`` and
``subscriptions.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

ROWS = {
    "ingest": [
        ("in-process batch append (1,000/batch)", "inprocess_batch_events_per_s", ">=", "events/s"),
        ("HTTP batches of 1,000", "http_batch_events_per_s", ">=", "events/s"),
        ("HTTP single events, 64 clients", "http_single_events_per_s", ">=", "events/s"),
        ("query by entity at 1,000,000 events, p50", "query_entity_p50_ms", "<=", "ms"),
        ("peak RSS ingesting 1,000,000 events", "peak_rss_mb", "<=", "MB"),
    ],
    "replication": [
        ("batch ingest, sync, 2 followers", "sync_batch_events_per_s", ">=", "events/s"),
        ("replication lag p99 at half the async rate", "lag_p99_ms", "<=", "ms"),
        ("catch-up of an empty follower via WAL", "catchup_wal_records_per_s", ">=", "records/s"),
        ("catch-up via snapshot", "catchup_snapshot_mb_per_s", ">=", "MB/s"),
        ("single write p50, semi-sync", "semi_sync_single_p50_ms", "<=", "ms"),
    ],
    "subscriptions": [
        ("catch-up of one subscriber from lsn 0", "catchup_events_per_s", ">=", "events/s"),
        ("live delivery p99 at 10,000 events/s", "live_latency_p99_ms", "<=", "ms"),
        ("ingest with 100 live subscribers / none", "ingest_ratio_100_live", ">=", "x"),
        ("RSS with 1,000 idle subscribers", "rss_idle_subscribers_mb", "", "MB"),
    ],
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(name: str) -> str:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return f"_{path.name} not found: run benchmarks/{name}.py_\n"
    data = json.loads(path.read_text())
    targets = data.get("targets", {})
    lines = [
        f"Measured {data.get('when', '?')} ({data.get('machine', {}).get('cpus', '?')} CPUs).",
        "",
        "| benchmark | target | walship | met |",
        "|---|---|---|---|",
    ]
    for label, key, op, unit in ROWS[name]:
        value, target = data.get(key), targets.get(key)
        met = ""
        if op and isinstance(value, int | float) and isinstance(target, int | float):
            met = "yes" if (value >= target if op == ">=" else value <= target) else "**no**"
        goal = f"{op} {_fmt(target)} {unit}" if op else "recorded"
        lines.append(f"| {label} | {goal} | {_fmt(value)} {unit} | {met} |")
    return "\n".join(lines) + "\n"


def peer_table() -> str:
    """walship beside PostgreSQL (one run of replication.py with ``--peer postgres``)."""
    path = RESULTS / "replication.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    rows = data.get("peer")
    if not rows:
        return "_no PostgreSQL figures: run benchmarks/replication.py --peer postgres_\n"
    lines = [
        f"Measured {data.get('when', '?')}, {data.get('pg_version', 'PostgreSQL')}"
        + (f" -- {data['note']}" if data.get("note") else "") + ".",
        "",
        "| figure | walship | PostgreSQL | walship / PG | target | met |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in rows:
        target = "" if row["target_ratio"] is None else f"{row['op']} {row['target_ratio']}"
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]
        lines.append(
            f"| {row['figure']} | {_fmt(row['walship'])} {row['unit']} | "
            f"{_fmt(row['postgres'])} {row['unit']} | {_fmt(row['ratio'])} | {target} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    for name in ROWS:
        print(f"### {name}\n")
        print(table(name))
    print("### walship and PostgreSQL\n")
    print(peer_table())


if __name__ == "__main__":
    main()
