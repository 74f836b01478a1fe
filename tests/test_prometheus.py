"""Prometheus and Grafana: what real nodes publish passes ``promtool check metrics``, the alert
rules in ``deploy/prometheus`` pass ``promtool check rules`` and their unit tests, and the rules
and the Grafana dashboard only ask for series that nodes publish.

promtool comes with Debian's ``prometheus`` package (``.ci/run`` installs it when it may);
without it the tests that need it skip, saying so.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import (
    Cluster,
    http,
    replication_address,
    wait_caught_up,
    wait_until,
    write_events,
)
from walship.node import Node, NodeConfig
from walship.replication.config import ReplicationConfig
from walship.wal import FsyncPolicy

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "walship-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "walship-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "walship.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian's prometheus package; .ci/run installs it as root)",
)

# the alerts the operators' issue asks for, by what they watch
REQUIRED_ALERTS = {
    "WalshipRetentionExhaustionSoon",
    "WalshipFollowerLagOverBudget",
    "WalshipNoFollowerInSync",
    "WalshipWritesDegraded",
    "WalshipLeaderFenced",
    "WalshipWalFailed",
}

_METRIC_NAME = re.compile(r"\bwalship_[a-zA-Z0-9_:]*")
# Grafana's variables, replaced by something PromQL parses
_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$job": ".*",
    "$instance": ".*",
}


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    """Run promtool; AssertionError with its output unless it exits 0."""
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{output}"
    return output


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``/metrics`` of a semi-sync leader and its follower, after replicated writes."""
    with Cluster(tmp_path_factory.mktemp("prometheus")) as cluster:
        leader = cluster.start_leader("n1", args=["--ack-mode", "semi-sync"])
        follower = cluster.start_follower("n2", replication_address(leader))
        write_events(leader, 60)
        wait_caught_up(leader, follower)
        # the in-sync gauge follows the set once its record is published (the leader's
        # monitor, every 50 ms): a scrape right after the catch-up may still say 0
        wait_until(
            lambda: "walship_replication_in_sync 1.0" in http().get(f"{leader.url}/metrics").text,
            15,
            "the leader to publish its follower in sync",
        )
        yield {
            "leader": http().get(f"{leader.url}/metrics").text,
            "follower": http().get(f"{follower.url}/metrics").text,
        }


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` → value of every sample in a scrape."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def published_names(*texts: str) -> set[str]:
    """Every metric and sample name in the scrapes (``_total``, ``_bucket`` … included), and
    the families declared without a sample yet (a follower's per-follower gauges)."""
    names: set[str] = set()
    for text in texts:
        names |= set(re.findall(r"^# TYPE (\S+)", text, flags=re.MULTILINE))
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            names |= {s.name for s in family.samples}
    return names


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}


def dashboard_exprs() -> list[str]:
    """Every query of the dashboard (panels, rows' panels, template variables)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def as_promql(expr: str) -> str:
    for variable, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know in: {expr}"
    return expr


# ---------------------------------------------------------------------- metrics


@needs_promtool
@pytest.mark.slow
@pytest.mark.parametrize("role", ["leader", "follower"])
def test_a_real_nodes_metrics_pass_promtool_check_metrics(
    scrapes: dict[str, str], role: str
) -> None:
    output = promtool("check", "metrics", stdin=scrapes[role])
    assert output.strip() == "", output


@pytest.mark.slow
def test_lag_is_published_in_seconds_with_the_budget_and_role_beside_it(
    scrapes: dict[str, str],
) -> None:
    leader, follower = samples(scrapes["leader"]), samples(scrapes["follower"])
    names = published_names(*scrapes.values())
    assert not [n for n in names if re.search(r"_(ms|milliseconds|us|ns)(_|$)", n)], names
    # the leader's view of its follower, and the follower's own view, both in seconds
    lag = leader["walship_replication_follower_lag_seconds{node_id=n2}"]
    assert 0 <= lag < 5, lag  # caught up: well under --max-lag-ms
    assert "walship_replication_lag_seconds" in follower
    assert leader["walship_replication_max_lag_seconds"] == 5.0  # the default --max-lag-ms 5000
    assert (leader["walship_is_leader"], follower["walship_is_leader"]) == (1, 0)
    # semi-sync needs one follower in sync; a follower needs none
    assert leader["walship_replication_in_sync_required"] == 1
    assert follower["walship_replication_in_sync_required"] == 0
    assert leader["walship_replication_in_sync"] == 1
    assert leader["walship_replication_retention_slots"] == 1
    assert (leader["walship_replication_fenced"], follower["walship_replication_fenced"]) == (0, 0)


def test_a_deposed_leader_repointed_to_follow_no_longer_reports_itself_fenced(
    tmp_path: Path,
) -> None:
    """The fenced gauge follows the node's role: a leader object that was fenced and then
    replaced by a follower must not leave the alert firing for ever."""
    config = NodeConfig(
        tmp_path / "data",
        fsync=FsyncPolicy.parse("never"),
        checkpoints=False,
        replication=ReplicationConfig(secret=b"s" * 32),
    )
    node = Node.open(config)
    try:
        registry = node.store.metrics.registry

        def value(name: str) -> float | None:
            return registry.get_sample_value(name)  # type: ignore[no-any-return]

        assert (value("walship_replication_fenced"), value("walship_is_leader")) == (0, 1)
        assert node.leader is not None
        node.leader.fence("a newer term exists (test)", 2)
        assert value("walship_replication_fenced") == 1
        asyncio.run(node.repoint("127.0.0.1:9"))
        assert (value("walship_replication_fenced"), value("walship_is_leader")) == (0, 0)
        assert value("walship_replication_in_sync_required") == 0
    finally:
        node.close()


# ---------------------------------------------------------------------- alert rules


@needs_promtool
def test_alert_rules_pass_promtool_check_rules() -> None:
    output = promtool("check", "rules", str(RULES))
    assert "SUCCESS" in output, output


@needs_promtool
def test_alert_rules_unit_tests_pass() -> None:
    output = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in output, output


def test_every_required_alert_exists_and_has_a_unit_test() -> None:
    alerts = set(rule_exprs())
    assert alerts >= REQUIRED_ALERTS, REQUIRED_ALERTS - alerts
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert firing == alerts, f"rules without a unit test that fires them: {alerts - firing}"


@pytest.mark.slow
def test_rules_and_dashboard_ask_only_for_series_nodes_publish(scrapes: dict[str, str]) -> None:
    published = published_names(*scrapes.values())
    exprs = {f"rule {name}": expr for name, expr in rule_exprs().items()}
    exprs |= {f"dashboard query {i}": e for i, e in enumerate(dashboard_exprs())}
    assert len(exprs) > 20, exprs  # the dashboard was read
    for where, expr in exprs.items():
        names = set(_METRIC_NAME.findall(expr))
        assert names, f"{where} asks for no walship series: {expr}"
        unknown = names - published
        assert not unknown, f"{where} asks for series no node publishes: {sorted(unknown)}"


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule), with Grafana's variables filled in."""
    exprs = dashboard_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"walship:dashboard_query_{i}", "expr": as_promql(expr)}
                    for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    output = promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(exprs)} rules found" in output, output


def test_dashboard_is_grafana_json_over_a_prometheus_datasource() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "walship" and board["title"] == "walship"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"] for p in panels).lower()
    for subject in ("leader", "term", "lag", "in sync", "ingest", "fsync", "degraded", "snapshot"):
        assert subject in titles, subject
