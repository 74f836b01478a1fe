"""Unit tier for ``walship verify``'s checker: each check fed a small hand-made history and
final logs, once clean and once with exactly the defect it exists to catch.

No processes here: this is what proves a check *can* fail. ``tests/test_verify.py`` runs the
real thing, and ``tests/mutants/`` shows it failing against broken servers.
"""

from __future__ import annotations

import json
from hashlib import blake2b
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from walship.verify.checker import CheckResult, FinalView, RunFacts, run_checks, write_summary
from walship.verify.cluster import NodeFinal
from walship.verify.config import FAULT_KINDS, VerifyConfig, parse_duration_s, parse_faults
from walship.verify.history import CrashImage, History, Outcome, Rejoin
from walship.verify.report import EXIT_OK, EXIT_VIOLATION, Report


def uid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012x}"


def chain(lsn: int, term: int) -> bytes:
    return blake2b(f"{lsn}/{term}".encode(), digest_size=8).digest()


def final(node_id: str, records: list[tuple[int, int, str]], **kw: Any) -> NodeFinal:
    """A node whose WAL holds ``records`` (lsn, term, id) and whose API serves the same."""
    wal = [(lsn, term, chain(lsn, term), eid) for lsn, term, eid in records]
    versions: dict[str, int] = {}
    events = []
    for lsn, term, eid in records:
        if not eid:
            continue
        entity = f"e{lsn % 2}"
        versions[entity] = versions.get(entity, 0) + 1
        events.append(
            {"id": eid, "lsn": lsn, "term": term, "entity_id": entity, "version": versions[entity]}
        )
    last = records[-1][0] if records else 0
    base: dict[str, Any] = {
        "role": "leader" if node_id == "n1" else "follower",
        "term": 1,
        "last_lsn": last,
        "events": events,
        "wal": wal,
    }
    base.update(kw)
    return NodeFinal(node_id, **base)


def answered(history: History, node: str, receipts: list[dict[str, Any]]) -> None:
    op = history.begin(1, 1, node, [r["event_id"] for r in receipts], ["e"] * len(receipts))
    history.end(op, Outcome.OK, status=200, receipts=receipts)


def receipt(n: int, lsn: int, durability: str = "replicated", term: int = 1) -> dict[str, Any]:
    version = sum(1 for k in range(1, lsn + 1) if k % 2 == lsn % 2)
    return {
        "event_id": uid(n),
        "lsn": lsn,
        "term": term,
        "version": version,
        "durability": durability,
        "required": 1 if durability == "replicated" else 0,
        "acked_by": ["n2"] if durability == "replicated" else [],
        "duplicate": False,
    }


LOG = [(lsn, 1, uid(lsn)) for lsn in range(1, 11)]
FACTS = RunFacts(leader_id="n1", converged_s=0.5, converge_timeout_s=60, failover_used=False)


def checks(history: History, finals: list[NodeFinal], facts: RunFacts = FACTS) -> dict[str, Any]:
    return {c.name: c for c in run_checks(history, finals, facts)}


def failed(results: dict[str, CheckResult]) -> set[str]:
    return {name for name, c in results.items() if not c.passed}


def clean_history() -> History:
    history = History()
    for lsn in range(1, 11):
        answered(history, "n1", [receipt(lsn, lsn)])
    return history


def test_a_clean_run_passes_every_check() -> None:
    results = checks(clean_history(), [final("n1", LOG), final("n2", LOG)])
    assert failed(results) == set()
    assert results["replicated_on_every_node"].checked == 10


def test_a_replicated_write_missing_on_a_follower_fails() -> None:
    follower = [r for r in LOG if r[0] != 4] + [(4, 1, uid(99))]
    follower.sort()
    results = checks(clean_history(), [final("n1", LOG), final("n2", follower)])
    assert "replicated_on_every_node" in failed(results)
    assert "logs_identical" in failed(results)
    message = results["replicated_on_every_node"].violations[0].message
    assert uid(4) in message and "n2 holds" in message


def test_an_acknowledged_write_lost_on_the_leader_fails() -> None:
    history = clean_history()
    answered(history, "n1", [receipt(11, 11, "local")])
    results = checks(history, [final("n1", LOG), final("n2", LOG)])
    assert failed(results) == {"acknowledged_survive"}
    assert results["acknowledged_survive"].violations[0].event_ids == {uid(11)}


def test_a_local_write_cut_into_lost_and_found_is_accounted_for_a_replicated_one_is_not() -> None:
    history = clean_history()
    answered(history, "n1", [receipt(11, 11, "degraded")])
    lost = {"lsn": 11, "term": 1, "acknowledged": "degraded", "event": {"id": uid(11)}}
    finals = [final("n1", LOG, lost_found=[lost]), final("n2", LOG)]
    results = checks(history, finals)
    assert failed(results) == set()
    assert results["acknowledged_survive"].info == {"cut_to_lost_found": 1}

    history = clean_history()
    answered(history, "n1", [receipt(11, 11, "replicated")])
    results = checks(history, finals)
    assert {"acknowledged_survive", "lost_found_accounted", "replicated_on_every_node"} <= failed(
        results
    )


def test_a_gap_a_duplicate_and_a_version_skip_are_each_caught() -> None:
    gap = [r for r in LOG if r[0] != 5]
    assert "no_lsn_gap" in failed(checks(History(), [final("n1", gap)]))

    twice = [*LOG[:-1], (10, 1, uid(3))]
    results = checks(History(), [final("n1", twice)])
    assert "no_duplicate_ids" in failed(results)

    skipped = final("n1", LOG)
    skipped.events[-1]["version"] += 1
    assert failed(checks(History(), [skipped])) == {"entity_versions"}


def test_a_divergent_chain_is_caught_even_when_lsn_term_and_id_agree() -> None:
    other = final("n2", LOG)
    lsn, term, _, eid = other.wal[6]
    other.wal[6] = (lsn, term, b"\x00" * 8, eid)
    results = checks(clean_history(), [final("n1", LOG), other])
    assert failed(results) == {"logs_identical"}
    assert "record 7" in results["logs_identical"].violations[0].message


def test_an_ack_not_on_disk_at_the_crash_is_caught() -> None:
    history = clean_history()
    # n2 (a follower, in every receipt's acked_by) was killed after all ten answers with
    # only lsn 1..6 on its disk: it confirmed writes it had not written
    on_disk = {lsn: (1, uid(lsn)) for lsn in range(1, 7)}
    history.crashes.append(CrashImage("n2", history.now() + 1, "follower", 1, on_disk))
    results = checks(history, [final("n1", LOG), final("n2", LOG)])
    assert failed(results) == {"acks_durable_at_crash"}
    assert results["acks_durable_at_crash"].violation_count == 4
    assert "confirmed it to the leader" in results["acks_durable_at_crash"].violations[0].message


def test_a_record_on_disk_at_a_crash_that_vanished_untraced_is_caught() -> None:
    history = clean_history()
    on_disk = {lsn: (1, uid(lsn)) for lsn in range(1, 11)} | {11: (1, uid(11))}
    history.crashes.append(CrashImage("n1", history.now() + 1, "leader", 1, on_disk))
    results = checks(history, [final("n1", LOG), final("n2", LOG)])
    assert failed(results) == {"lost_found_accounted"}
    lost = {"lsn": 11, "term": 1, "acknowledged": "local_or_unanswered", "event": {"id": uid(11)}}
    results = checks(history, [final("n1", LOG, lost_found=[lost]), final("n2", LOG)])
    assert failed(results) == set()


def test_a_deposed_leaders_tail_replaced_by_a_snapshot_without_a_trace_is_caught() -> None:
    """n1 answered lsn 1..10 replicated and 11..12 degraded, then was deposed; n2 took term 2
    at lsn 11 and removed its WAL up to lsn 49 before n1 rejoined."""
    history = clean_history()
    answered(history, "n1", [receipt(11, 11, "degraded"), receipt(12, 12, "degraded")])
    on_disk = {lsn: (1, uid(lsn)) for lsn in range(1, 13)}
    image = CrashImage("n1", history.now() + 1, "leader", 1, on_disk)
    history.crashes.append(image)
    history.rejoins.append(Rejoin("n1", image, "n2", 50))
    log = [*LOG, (11, 2, uid(111)), (12, 2, uid(112))]
    facts = RunFacts(leader_id="n2", converged_s=0.5, converge_timeout_s=60, failover_used=True)
    tail = [
        {"lsn": lsn, "term": 1, "acknowledged": "degraded", "event": {"id": uid(lsn)}}
        for lsn in (11, 12)
    ]
    results = checks(history, [final("n1", log, lost_found=tail), final("n2", log)], facts)
    assert failed(results) == set()
    assert results["rejoin_tail_accounted"].info == {
        "rejoins": 1,
        "rejoins_after_wal_removal": 1,
        "tail_in_lost_found": 2,
    }

    results = checks(history, [final("n1", log), final("n2", log)], facts)
    assert "rejoin_tail_accounted" in failed(results)
    assert results["rejoin_tail_accounted"].violation_count == 2
    assert "cut without a trace" in results["rejoin_tail_accounted"].violations[0].message

    understated = [{**tail[0], "acknowledged": "local_or_unanswered"}, tail[1]]
    results = checks(history, [final("n1", log, lost_found=understated), final("n2", log)], facts)
    assert failed(results) == {"rejoin_tail_accounted"}
    assert "answered degraded" in results["rejoin_tail_accounted"].violations[0].message

    # a write n1 had answered replicated that the final leader lacks
    answered_late = clean_history()
    answered(answered_late, "n1", [receipt(11, 11, "replicated")])
    answered_late.crashes.append(image)
    answered_late.rejoins.append(Rejoin("n1", image, "n2", 50))
    results = checks(answered_late, [final("n1", log, lost_found=tail), final("n2", log)], facts)
    assert "rejoin_tail_accounted" in failed(results)
    messages = [v.message for v in results["rejoin_tail_accounted"].violations]
    assert any("answered replicated by n1" in m and "is lost" in m for m in messages)


def test_no_convergence_fails_and_the_report_exits_non_zero(tmp_path: Path) -> None:
    facts = RunFacts(leader_id="n1", converged_s=None, converge_timeout_s=60, failover_used=False)
    history = clean_history()
    results = run_checks(history, [final("n1", LOG), final("n2", LOG[:5])], facts)
    report = Report(seed=7, settings={"nodes": 2}, root=str(tmp_path), checks=results)
    assert report.exit_code == EXIT_VIOLATION
    assert {"converged", "logs_identical", "replicated_on_every_node"} <= set(report.failed_checks)
    path = tmp_path / "report.json"
    report.write_json(path)
    doc = json.loads(path.read_text())
    assert doc["seed"] == 7 and doc["ok"] is False and "converged" in doc["failed_checks"]
    passing = Report(
        seed=7, settings={}, root="", checks=run_checks(history, [final("n1", LOG)], FACTS)
    )
    assert passing.exit_code == EXIT_OK


def test_history_excerpt_shows_the_requests_and_the_faults_around_them() -> None:
    history = History()
    history.fault("kill", "n1 (leader)", "inject", "SIGKILL")
    answered(history, "n1", [receipt(1, 1)])
    history.fault("pause", "n2", "inject", "SIGSTOP")
    lines = history.excerpt({uid(1)})
    assert len(lines) == 3
    assert "kill" in lines[0] and "ok replicated" in lines[1] and "pause" in lines[2]
    summary = write_summary(history, FinalView.of(final("n1", LOG)))
    assert summary["receipts_by_durability"] == {"replicated": 1}


def test_the_whole_history_is_written_as_json_lines_in_time_order(tmp_path: Path) -> None:
    history = History()
    history.fault("kill", "n1 (leader)", "inject", "SIGKILL")
    answered(history, "n1", [receipt(1, 1)])
    history.write_jsonl(tmp_path / "history.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [entry["type"] for entry in lines] == ["fault", "write"]
    assert lines[1]["outcome"] == "ok" and lines[1]["receipts"][0]["event_id"] == uid(1)


def test_config_parsing() -> None:
    assert parse_duration_s("60s") == 60 and parse_duration_s("2m") == 120
    assert parse_duration_s("500ms") == 0.5 and parse_duration_s("7") == 7
    assert parse_faults("all") == FAULT_KINDS and parse_faults("none") == ()
    assert parse_faults("kill, pause,kill") == ("kill", "pause")
    from walship.errors import InvalidInput

    with pytest.raises(InvalidInput):
        parse_faults("kill,meteor")
    with pytest.raises(InvalidInput):
        parse_duration_s("soon")
    with pytest.raises(InvalidInput):
        VerifyConfig(nodes=0)


def test_cli_refuses_bad_arguments_before_starting_anything() -> None:
    from walship.cli.main import app

    result = CliRunner().invoke(app, ["verify", "--faults", "kill,meteor"])
    assert result.exit_code == 2
    assert "unknown fault 'meteor'" in result.output
