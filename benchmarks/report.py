"""Render benchmarks/results/*.json as the README's Markdown tables (figure beside target).

Run: ``python benchmarks/report.py`` after ``ingest.py``, ``replication.py``,
``subscriptions.py`` (and ``sustained.py``, which ``scripts/bench --sustained`` runs).
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
    "sustained": [
        ("throughput, last / second million (tenth of the run)", "last_to_second_window_ratio",
         ">=", "x"),
        ("sync ingest over the whole run", "events_per_s", "", "events/s"),
        ("write amplification (Parquet writes per event), leader",
         "leader_write_amplification", "", "x"),
        ("write amplification, follower-1", "follower_1_write_amplification", "", "x"),
        ("write amplification, follower-2", "follower_2_write_amplification", "", "x"),
        ("peak RSS (VmHWM), leader", "leader_peak_rss_mb", "", "MB"),
        ("peak RSS, follower-1", "follower_1_peak_rss_mb", "", "MB"),
        ("peak RSS, follower-2", "follower_2_peak_rss_mb", "", "MB"),
        ("CPU per event, leader", "leader_cpu_us_per_event", "", "µs"),
        ("CPU per event, follower-1", "follower_1_cpu_us_per_event", "", "µs"),
        ("CPU per event, follower-2", "follower_2_cpu_us_per_event", "", "µs"),
        ("CPU per event, three nodes and the load generator",
         "cpu_us_per_event_with_load_generator", "", "µs"),
        ("disk per event at the end, leader", "leader_disk_bytes_per_event", "", "bytes"),
        ("followers' logs identical to the leader's", "followers_identical", "", ""),
    ],
}  # fmt: skip


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
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
    note = f" -- {data['note']}" if data.get("note") else ""
    lines = [
        f"Measured {data.get('when', '?')} ({data.get('machine', {}).get('cpus', '?')} CPUs)"
        f"{note}.",
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
        shown = _fmt(value) if value is None or isinstance(value, bool) else f"{_fmt(value)} {unit}"
        lines.append(f"| {label} | {goal} | {shown} | {met} |")
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


def sustained_detail() -> str:
    """The sustained run per window (events/s, each node's CPU per event and RSS) and each
    node's CPU per event per thread."""
    path = RESULTS / "sustained.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    nodes = list(data.get("nodes", {}))
    head = " | ".join(f"{n} µs/event, RSS MB" for n in nodes)
    lines = [f"| window ({_fmt(data.get('window_events'))} events) | events/s | {head} |",
             "|---" * (2 + len(nodes)) + "|"]  # fmt: skip
    for w in data.get("windows", []):
        cells = " | ".join(
            f"{_fmt(w.get(f'{n}_cpu_us_per_event'))}, {_fmt(w.get(f'{n}_rss_mb'))}" for n in nodes
        )
        lines.append(f"| {w['window']} | {_fmt(w['events_per_s'])} | {cells} |")
    lines += ["", "| node | CPU µs per event, per thread |", "|---|---|"]
    for node, figures in data.get("nodes", {}).items():
        threads = ", ".join(
            f"{name} {_fmt(us)}" for name, us in figures["cpu_us_per_event_by_thread"].items()
        )
        lines.append(f"| {node} | {threads} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    for name in ROWS:
        print(f"### {name}\n")
        print(table(name))
        if name == "sustained":
            print(sustained_detail())
    print("### walship and PostgreSQL\n")
    print(peer_table())


if __name__ == "__main__":
    main()
