"""The status page (``/ui``, ``/`` redirecting to it) and the API reference (``/docs``): served
whole by the node, with nothing from the internet, and, in a headless Chromium against a real
three-node cluster, showing what the cluster does while it does it.

The browser test saves screenshots of each step under ``artifacts/ui-screenshots/`` (or
``$WALSHIP_UI_SCREENSHOTS``), which CI keeps. Chromium comes from Debian's ``chromium`` package
(``.ci/run`` installs it when it may); without it that test skips, saying so.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import CHROMIUM, Browser
from tests.cluster import (
    Cluster,
    Writers,
    event,
    post_event,
    replication_address,
    wait_caught_up,
    wait_until,
    write_events,
)
from tests.test_cli_lostfound import lost_files
from walship.http import create_app
from walship.http.ui import CONTENT_SECURITY_POLICY, UI_ROUTES
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.wal import FsyncPolicy

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(
    os.environ.get("WALSHIP_UI_SCREENSHOTS") or ROOT / "artifacts" / "ui-screenshots"
)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    node = Node.open(NodeConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never")))
    try:
        with TestClient(create_app(node)) as client:
            yield client
    finally:
        node.close()


# ---------------------------------------------------------------------- served whole


def test_root_redirects_to_the_status_page(api: TestClient) -> None:
    response = api.get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/ui"


@pytest.mark.parametrize("path", ["/ui", "/docs"])
def test_pages_load_nothing_from_elsewhere(api: TestClient, path: str) -> None:
    """Every script and style inline, every link to this node; the CSP forbids the rest."""
    response = api.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    html = response.text
    links = re.findall(r"""\b(?:src|href|action)\s*=\s*["']([^"']*)["']""", html)
    assert links, "the page links to its own endpoints"
    assert all(link.startswith("/") and not link.startswith("//") for link in links), links
    assert "<link" not in html  # no stylesheet, font or icon to fetch
    assert not re.search(r"<script[^>]*\bsrc=", html)
    assert not re.search(r"cdn\.|jsdelivr|unpkg|googleapis|cloudflare", html, re.IGNORECASE)
    # any URL in the text is the SVG namespace, which is a name and never fetched
    assert set(re.findall(r"https?://[^\s\"'<>)]+", html)) <= {"http://www.w3.org/2000/svg"}


def test_swagger_ui_and_redoc_from_a_cdn_are_off_and_the_schema_stays(api: TestClient) -> None:
    assert api.get("/redoc").status_code == 404
    assert "swagger-ui" not in api.get("/docs").text.lower()
    schema = api.get("/openapi.json").json()
    assert "/api/v1/events" in schema["paths"]
    # the pages are not part of the JSON API the schema describes
    assert not set(UI_ROUTES) & set(schema["paths"])


@pytest.mark.parametrize("path", UI_ROUTES)
def test_the_pages_are_read_only(api: TestClient, path: str) -> None:
    for method in ("POST", "PUT", "DELETE"):
        response = api.request(method, path)
        assert response.status_code == 405, (method, path)
        assert response.json()["error"] == "method_not_allowed"


def test_lost_found_listing_summarizes_each_file_and_names_a_damaged_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = NodeConfig(
        data_dir,
        fsync=FsyncPolicy.parse("never"),
        limits=Limits(lost_found_files_listed_max=2),
    )
    node = Node.open(config)
    try:
        with TestClient(create_app(node)) as api:
            assert api.get("/api/v1/replication/lost-found").json() == {
                "files": [],
                "total_files": 0,
            }
            first, second = lost_files(data_dir)
            body = api.get("/api/v1/replication/lost-found").json()
            assert body["total_files"] == 2
            assert [f["name"] for f in body["files"]] == [first, second]
            summary = body["files"][0]
            assert summary["records"] == 3
            assert (summary["first_lsn"], summary["last_lsn"]) == (101, 103)
            assert summary["terms"] == [1]
            assert summary["acknowledged"] == {"degraded": 2, "local_or_unanswered": 1}
            assert summary["error"] is None and summary["bytes"] > 0
            # a third file, damaged: listed with what is wrong, the oldest beyond the limit
            damaged = data_dir / "lost-found" / "zzzz-damaged.jsonl"
            damaged.write_text('{"lsn": 1}\n')
            body = api.get("/api/v1/replication/lost-found").json()
            assert body["total_files"] == 3
            assert [f["name"] for f in body["files"]] == [second, damaged.name]
            assert "line 1" in body["files"][1]["error"]
            assert body["files"][1]["records"] == 0
    finally:
        node.close()


# ---------------------------------------------------------------------- in a browser

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (Debian's chromium package; .ci/run installs it as root)",
)

ROWS = "document.querySelectorAll('#followers tr[data-follower]')"


def row_state(follower: str) -> str:
    row = f"document.querySelector('#followers tr[data-follower=\"{follower}\"]')"
    return f"{row}?.dataset.state"


def lag_points(follower: str) -> str:
    return (
        f"Number((document.querySelector('#lag-ms-chart polyline[data-series=\"{follower}\"]')"
        " || {dataset: {points: 0}}).dataset.points)"
    )


@needs_chromium
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_status_page_in_chromium_follows_a_three_node_cluster(tmp_path: Path) -> None:
    """The page renders the cluster; its lag chart grows while writes run; a stopped follower
    shows as not connected within seconds, and while writes run its retention slot gets a
    forecast; a degraded range appears at risk and turns to
    "since replicated" once a follower holding it returns; a follower's page lists its
    lost-and-found files; /docs renders. Nothing the browser loads comes from anywhere but
    the nodes."""
    shots = SCREENSHOTS
    for old in shots.glob("*.png") if shots.is_dir() else []:
        old.unlink()
    with Cluster(tmp_path / "cluster") as cluster:
        leader = cluster.start_leader(
            "n1",
            args=[
                *("--ack-mode", "semi-sync", "--ack-timeout-ms", "300"),
                *("--max-replication-lag-ms", "3000"),
            ],
        )
        address = replication_address(leader)
        n2 = cluster.start_follower("n2", address)
        n3 = cluster.start_follower("n3", address)
        write_events(leader, 200)
        wait_caught_up(leader, n2, n3)
        origins = {node.url for node in (leader, n2, n3)}

        with Browser(tmp_path / "chromium") as browser:
            # 1. the cluster as the leader sees it
            browser.open(f"{leader.url}/")  # redirected to /ui
            assert browser.evaluate("location.pathname") == "/ui"
            browser.wait_for(f"{ROWS}.length === 2", 30, "both followers' rows")
            for follower in ("n2", "n3"):
                browser.wait_for(
                    f"{row_state(follower)} === 'streaming'", 30, f"{follower} streaming"
                )
            assert browser.evaluate("document.getElementById('node-id').textContent") == "n1"
            assert browser.evaluate("document.getElementById('role').textContent") == "leader"
            cluster_text = browser.evaluate("document.getElementById('cluster').innerText")
            assert "semi-sync" in cluster_text and "2/2 (min 1)" in cluster_text
            assert "lag budget 3.0 s (within" in cluster_text, cluster_text
            browser.screenshot(shots / "01-cluster.png")

            # 2. the lag chart and the ingest rate move while writes run
            before = browser.evaluate(lag_points("n2"))
            writers = Writers(leader.url, threads=1, batch=100).start()
            try:
                browser.wait_for(f"{lag_points('n2')} >= {before + 4}", 30, "the lag chart to grow")
                browser.wait_for(
                    "window.walshipUi.rates['events/s'].some(([, v]) => v > 0)",
                    30,
                    "an ingest rate above 0",
                )
                browser.screenshot(shots / "02-writes-running.png")
            finally:
                writers.stop()
            assert browser.evaluate("window.walshipUi.lagRecords.n2.length") >= before + 4

            # 3. a stopped follower shows as not connected within seconds
            n3.stop()
            t0 = time.monotonic()
            browser.wait_for(f"{row_state('n3')} === 'not connected'", 15, "n3 not connected")
            assert time.monotonic() - t0 < 10
            browser.screenshot(shots / "03-follower-stopped.png")

            # 3b. writes run while n3 is away: its retention slot gets a forecast
            slot_row = "document.querySelector('#slots tr[data-slot=\"n3\"]')"
            writers = Writers(leader.url, threads=1, batch=100).start()
            try:
                browser.wait_for(
                    f"Number({slot_row}?.dataset.exhaustion) > 0", 30, "n3's retention forecast"
                )
            finally:
                writers.stop()
            assert "not growing" not in browser.evaluate(f"{slot_row}.innerText")
            browser.screenshot(shots / "03b-retention-forecast.png")

            # 4. with no follower, writes degrade: the range appears, at risk
            n2.stop()
            browser.wait_for(f"{row_state('n2')} === 'not connected'", 15, "n2 not connected")
            receipts = [post_event(leader, event(10_000 + i)).json() for i in range(3)]
            assert {r["durability"] for r in receipts} == {"degraded"}, receipts
            last = receipts[-1]["lsn"]
            degraded_row = "document.querySelector('#degraded-ranges tr[data-range]')"
            browser.wait_for(f"{degraded_row}?.dataset.state === 'at risk'", 15, "a range at risk")
            assert str(last) in browser.evaluate(f"{degraded_row}.dataset.range")
            browser.screenshot(shots / "04-degraded-at-risk.png")

            # 5. the follower returns, catches up: the range is since replicated
            cluster.restart(n2)
            origins.add(n2.url)  # a new HTTP port
            wait_until(
                lambda: browser.evaluate(f"{degraded_row}?.dataset.state") == "since replicated",
                30,
                "the degraded range to turn since replicated",
            )
            # the ledger's own record: when, and to whom
            assert "to n2" in browser.evaluate(f"{degraded_row}.innerText")
            assert browser.evaluate("window.walshipUi.errors") == 0
            browser.screenshot(shots / "05-since-replicated.png")

            # 6. a follower's own page
            browser.open(f"{n2.url}/ui")
            browser.wait_for(
                "document.getElementById('role').textContent === 'follower'", 30, "n2's page"
            )
            browser.wait_for(
                "document.getElementById('cluster').innerText.includes('connected yes')",
                30,
                "n2 connected to its leader",
            )
            follower_text = browser.evaluate("document.getElementById('cluster').innerText")
            assert address in follower_text
            # records a repair cut from this node: the page lists the files by whole name
            names = lost_files(cluster.data_dir("n2"))
            for name in names:
                browser.wait_for(
                    f"!!document.querySelector('#lost-found-files tr[data-file=\"{name}\"]')",
                    30,
                    f"lost-and-found file {name} on the page",
                )
            browser.screenshot(shots / "06-follower-page.png")

            # 7. the API reference, drawn from /openapi.json
            browser.open(f"{leader.url}/docs")
            operations = browser.wait_for("window.walshipDocs?.operations", 30, "the API docs")
            assert operations >= 10
            docs_text = browser.evaluate("document.body.innerText")
            assert "/api/v1/events/query" in docs_text and "Append one event" in docs_text
            browser.screenshot(shots / "07-docs.png")

            fetched = [url for url in browser.requests if "://" in url]
            assert fetched, "the browser recorded its requests"
            foreign = [u for u in fetched if not any(u.startswith(o) for o in origins)]
            assert not foreign, f"loaded from elsewhere: {foreign}"
    for name in ("01-cluster", "03-follower-stopped", "05-since-replicated", "07-docs"):
        png = shots / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@needs_chromium
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_status_page_under_auth_required_asks_for_a_key_and_sends_it_as_a_header(
    tmp_path: Path,
) -> None:
    """With ``--auth required`` the page shows what /health tells anyone and asks for a key;
    a key it is given is kept for the tab (a reload keeps it) and sent as ``X-API-Key`` on its
    data calls, never in a URL; a read key of one tenant shows that tenant's figures and says
    which parts it may not see; an admin key of every tenant shows everything."""
    from walship.apikeys import ApiKeyFile, Role
    from walship.testing.process import NodeProcess

    keys = ApiKeyFile(tmp_path / "keys.json")
    read_acme = keys.create(Role.READ, frozenset({"acme"}))[1]
    admin = keys.create(Role.ADMIN, None)[1]
    node = NodeProcess(
        tmp_path / "data",
        fsync="never",
        extra_args=["--api-keys-file", str(tmp_path / "keys.json")],
    ).start()
    shots = SCREENSHOTS
    try:
        for tenant, count in (("acme", 3), ("globex", 5)):
            for i in range(count):
                body = {**event(i), "tenant_id": tenant}
                r = post_event(node, body, headers={"X-API-Key": admin})
                assert r.status_code == 200, r.text

        def use_key(key: str) -> None:
            browser.evaluate(
                f"document.getElementById('key-input').value = {key!r};"
                "document.getElementById('key-use').click(); true"
            )

        def auth_state() -> Any:
            return browser.evaluate("window.walshipUi.auth")

        with Browser(tmp_path / "chromium") as browser:
            # 1. no key: the open /health renders, the page asks for a key
            browser.open(f"{node.url}/ui")
            browser.wait_for("window.walshipUi.auth.needed === true", 30, "the page to ask")
            assert browser.evaluate("getComputedStyle(document.getElementById('auth')).display")
            assert browser.evaluate("document.getElementById('node-id').textContent") == (
                node.node_id
            )
            browser.screenshot(shots / "auth-01-key-asked.png")

            # 2. a wrong key: still asked, saying it was not accepted
            use_key("wsk_000000000000_not-a-key")
            browser.wait_for(
                "document.getElementById('auth-why').textContent.includes('did not accept')",
                30,
                "the wrong key to be refused",
            )

            # 3. a read key of tenant acme: its figures, and what it may not see
            use_key(read_acme)
            browser.wait_for(
                "window.walshipUi.auth.needed === false && "
                "window.walshipUi.stats?.tenants?.acme?.events === 3",
                30,
                "acme's figures with the read key",
            )
            state = auth_state()
            assert {"/metrics", "/api/v1/replication/degraded"} <= set(state["refused"]), state
            figures = browser.evaluate("document.getElementById('write-figures').innerText")
            assert "events of acme" in figures and "globex" not in figures, figures
            assert "globex" not in browser.evaluate("document.body.innerText")
            browser.screenshot(shots / "auth-02-read-key-of-one-tenant.png")

            # 4. the tab keeps the key: a reload asks nothing
            browser.open(f"{node.url}/ui")
            browser.wait_for(
                "window.walshipUi.polls > 1 && window.walshipUi.stats?.tenants?.acme", 30, "reload"
            )
            assert auth_state()["needed"] is False

            # 5. an admin key of every tenant: everything, nothing refused
            browser.evaluate("document.getElementById('key-forget').click(); true")
            use_key(admin)
            browser.wait_for(
                "window.walshipUi.stats?.events === 8 && window.walshipUi.auth.refused.length "
                "=== 0 && window.walshipUi.auth.needed === false && "
                "getComputedStyle(document.getElementById('auth')).display === 'none'",
                30,
                "the node's figures with the admin key",
            )
            browser.wait_for(
                "window.walshipUi.rates['events/s'].length > 0", 30, "rates from /metrics"
            )
            browser.screenshot(shots / "auth-03-admin-key.png")

            # the keys went in headers to this node only, never in a URL or the page
            for key in (read_acme, admin):
                assert not [u for u in browser.requests if key in u or key[-20:] in u]
                assert key not in browser.evaluate("document.documentElement.outerHTML")
            sent = {h.get("X-API-Key") for u, h in browser.request_headers if "/api/v1/" in u}
            assert {read_acme, admin} <= sent, sent
            assert all(u.startswith(node.url) for u in browser.requests if "://" in u)
    finally:
        assert node.stop() == 0
