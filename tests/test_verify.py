"""Fault tier: ``walship verify`` as CI runs it, and against deliberately broken servers.

The passing runs are the product's claim measured on every change: a 3-node cluster written to
under a seeded schedule of kills, restarts, partitions, delays, bit flips, pauses and
failovers loses no acknowledged write. The mutant runs prove the measurement has teeth: the
same command, pointed at a server that answers before it has written (``tests/mutants/``),
exits 1 and names the check that caught it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from walship.cli.main import app
from walship.verify.cluster import failover_available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

runner = CliRunner()


def verify(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """Run ``walship verify`` in-process; exit code, JSON report and printed output."""
    report = tmp_path / "report.json"
    data = tmp_path / "cluster"
    result = runner.invoke(app, ["verify", "--report", str(report), "--data-dir", str(data), *args])
    print(result.output)  # the whole report, shown when a test fails
    assert report.exists(), f"no report written: {result.output}\n{result.exception!r}"
    return result.exit_code, json.loads(report.read_text()), result.output


SEED_1_FAULTS = "kill,restart,partition,delay,corrupt,pause,failover,rejoin"
"""The kinds seed 1 picks from. A seed's schedule depends on the list it chooses in, so it is
named here: seed 1 keeps failing over an isolated leader when kinds are added, and each new
kind runs on a seed of its own."""


def test_verify_seed_1_with_every_process_and_link_fault_passes(tmp_path: Path) -> None:
    code, report, output = verify(
        tmp_path, "--duration", "30s", "--seed", "1", "--faults", SEED_1_FAULTS
    )
    assert code == 0, output
    assert report["ok"] and report["failed_checks"] == [] and not report["harness_errors"]
    assert report["seed"] == 1 and "PASS" in output
    # a rejoin holds the schedule for the seconds a new leader needs to remove its WAL
    assert report["faults_total"] >= 4, report["faults_injected"]
    writes = report["writes"]
    assert writes["receipts_by_durability"].get("replicated", 0) > 1_000
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["replicated_on_every_node"]["checked"] > 1_000
    assert checks["acks_durable_at_crash"]["checked"] >= 1  # at least one kill -9 was checked
    if failover_available():
        injected = report["faults_injected"]
        assert injected.get("failover", 0) + injected.get("rejoin", 0) >= 1, injected
        # an isolated leader was failed over: its tail went to lost-and-found and was checked
        assert checks["lost_found_accounted"]["checked"] > 0


def test_verify_another_seed_in_quorum_mode_passes(tmp_path: Path) -> None:
    code, report, output = verify(
        tmp_path, "--duration", "20s", "--seed", "6", "--ack-mode", "quorum:2"
    )
    assert code == 0, output
    assert report["settings"]["ack_mode"] == "quorum:2"
    # seed 6 draws a rejoin second, which holds the schedule for ~10 s of its 20
    assert report["faults_total"] >= 2


def test_verify_catches_a_follower_that_acks_before_writing(tmp_path: Path) -> None:
    """Mutant: followers ack a batch on receipt and write it 0.3 s later. Seed 2's first
    kill hits a streaming follower, whose disk then lacks writes it had confirmed."""
    code, report, output = verify(
        tmp_path,
        "--duration",
        "8s",
        "--seed",
        "2",
        "--faults",
        "kill",
        "--server-module",
        "tests.mutants.follower_acks_early",
    )
    assert code == 1, output
    assert "acks_durable_at_crash" in report["failed_checks"]
    assert "FAIL acks_durable_at_crash" in output and "seed 2" in output
    assert "confirmed it to the leader" in output
    assert report["history_around_violations"]["acks_durable_at_crash"]


def test_verify_catches_a_leader_that_answers_before_writing(tmp_path: Path) -> None:
    """Mutant: the leader answers ``local`` without waiting for its WAL write. Seed 1's first
    kill hits the leader, which comes back without writes it had acknowledged."""
    code, report, output = verify(
        tmp_path,
        "--duration",
        "8s",
        "--seed",
        "1",
        "--faults",
        "kill",
        "--ack-mode",
        "async",
        "--server-module",
        "tests.mutants.leader_answers_early",
    )
    assert code == 1, output
    assert {"acks_durable_at_crash", "acknowledged_survive"} <= set(report["failed_checks"])
    assert "answered local by n1" in output


def test_verify_deposed_leader_rejoining_after_wal_removal_on_a_new_seed_passes(
    tmp_path: Path,
) -> None:
    """The ``rejoin`` fault alone, on a seed of its own: an isolated leader's degraded tail
    must reach its lost-and-found although the new leader removed the WAL at its position."""
    code, report, output = verify(
        tmp_path, "--duration", "8s", "--seed", "11", "--faults", "rejoin"
    )
    assert code == 0, output
    assert report["faults_injected"].get("rejoin", 0) >= 1
    assert report["settings"]["segment_bytes_max"] <= 64 * 1024
    checks = {c["name"]: c for c in report["checks"]}
    info = checks["rejoin_tail_accounted"]["info"]
    assert info.get("rejoins_after_wal_removal", 0) >= 1, report["fault_log"]
    assert info.get("tail_in_lost_found", 0) > 0, "the isolated leader should hold a tail"


def test_verify_catches_a_snapshot_that_replaces_a_deposed_leaders_tail(tmp_path: Path) -> None:
    """Mutant: divergence judged only where records remain (walship before issue 17): the
    rejoining leader installs a snapshot over its tail, which vanishes without a trace."""
    code, report, output = verify(
        tmp_path,
        "--duration",
        "8s",
        "--seed",
        "11",
        "--faults",
        "rejoin",
        "--server-module",
        "tests.mutants.snapshot_replaces_tail",
    )
    assert code == 1, output
    assert {"rejoin_tail_accounted", "lost_found_accounted"} <= set(report["failed_checks"])
    assert "cut without a trace" in output


def test_verify_acker_down_refuses_the_follower_that_lacks_replicated_writes(
    tmp_path: Path,
) -> None:
    """Seed 12, fault ``acker_down`` only: the leader is killed while the follower that
    acknowledged its latest writes is paused; the other follower's promotion is refused and
    the acker, once back, leads with every ``replicated`` write."""
    code, report, output = verify(
        tmp_path, "--duration", "8s", "--seed", "12", "--faults", "acker_down"
    )
    assert code == 0, output
    assert report["faults_injected"].get("acker_down", 0) >= 1, report["fault_log"]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["no_unclean_promotion"]["checked"] >= 1
    assert any("refused (409)" in line for line in report["fault_log"]), report["fault_log"]
    assert checks["replicated_on_every_node"]["checked"] > 100


def test_verify_catches_a_promotion_that_loses_replicated_writes(tmp_path: Path) -> None:
    """Mutant: promotion without the in-sync check (walship before clean failover). The same
    seed promotes the lagging follower, and the writes only the acker held are flagged."""
    code, report, output = verify(
        tmp_path,
        "--duration",
        "8s",
        "--seed",
        "12",
        "--faults",
        "acker_down",
        "--server-module",
        "tests.mutants.unclean_promotion",
    )
    assert code == 1, output
    assert {"no_unclean_promotion", "replicated_on_every_node"} <= set(report["failed_checks"])
    assert "answered replicated before it were beyond its log" in output


@pytest.mark.timeout(60)
def test_verify_shows_a_progress_bar_of_the_workload(tmp_path: Path) -> None:
    """A short run on one node: the bar (on stderr, so the report on stdout stays clean)
    follows the seconds written under faults and the requests so far, to 100%."""
    code, report, output = verify(
        tmp_path, "--nodes", "1", "--duration", "2s", "--faults", "none", "--seed", "3"
    )
    assert code == 0, output
    (bar,) = [line for line in output.splitlines() if line.startswith("writing under faults")]
    assert "2/2 s" in bar and "100%" in bar, bar
    assert f"({report['writes']['requests']} requests, 0 faults)" in bar, bar
