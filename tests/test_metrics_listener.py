"""``--metrics-listen``: Prometheus scrapes ``/metrics`` on a port of its own without
credentials, while ``/metrics`` on the API port keeps needing its role, and nothing but the
metrics is reachable through the scrape port."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from walship.apikeys import ApiKeyFile, Role
from walship.testing.process import NodeProcess

_METRICS_RE = re.compile(r" metrics=(http://\S+)")


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "walship", "serve", "--data-dir", str(tmp_path / "d"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _metrics_url(node: NodeProcess) -> str:
    match = _METRICS_RE.search(node.start_line)
    assert match, node.start_line
    return match.group(1)


def test_the_metrics_port_needs_no_credentials_and_serves_nothing_else(tmp_path: Path) -> None:
    keys = ApiKeyFile(tmp_path / "keys.json")
    read_key = keys.create(Role.READ, None)[1]
    admin_key = keys.create(Role.ADMIN, None)[1]
    node = NodeProcess(
        tmp_path / "data",
        fsync="never",
        extra_args=[
            "--api-keys-file",
            str(tmp_path / "keys.json"),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    ).start()
    try:
        scrape = _metrics_url(node)
        assert scrape.endswith("/metrics") and not scrape.startswith(node.url)
        r = httpx.post(
            f"{node.url}/api/v1/events",
            json={"entity_id": "e", "event_type": "t", "payload": 1},
            headers={"X-API-Key": admin_key},
        )
        assert r.status_code == 200, r.text
        # the scraper: no credentials, the same series the API port publishes
        r = httpx.get(scrape)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert re.search(r"^walship_last_lsn\S* 1\.0$", r.text, re.MULTILINE), r.text[:2000]
        assert httpx.head(scrape).status_code == 200
        # the API port's /metrics still needs its role
        assert httpx.get(f"{node.url}/metrics").status_code == 401
        assert httpx.get(f"{node.url}/metrics", headers={"X-API-Key": read_key}).status_code == 403
        api = httpx.get(f"{node.url}/metrics", headers={"X-API-Key": admin_key})
        assert api.status_code == 200 and "walship_last_lsn" in api.text
        # nothing else is reachable through the scrape port, with or without a key
        base = scrape.removesuffix("/metrics")
        for path in ("/api/v1/events/query", "/api/v1/stats", "/health", "/ui", "/metrics/"):
            r = httpx.get(f"{base}{path}", headers={"X-API-Key": admin_key})
            assert r.status_code == 404 and r.json()["error"] == "not_found", (path, r.text)
        r = httpx.post(scrape, json={"entity_id": "e", "event_type": "t", "payload": 1})
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
        assert r.headers["allow"] == "GET, HEAD"
    finally:
        assert node.stop() == 0
    # stopped with the node
    with pytest.raises(httpx.ConnectError):
        httpx.get(scrape, timeout=5)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("9100", "--metrics-listen must be HOST:PORT"),
        ("127.0.0.1:99999", "--metrics-listen must be HOST:PORT"),
        (":9100", "--metrics-listen must be HOST:PORT"),
    ],
)
def test_a_bad_metrics_address_is_one_line_and_exit_2(
    tmp_path: Path, value: str, says: str
) -> None:
    done = _serve(tmp_path, "--metrics-listen", value, "--check")
    assert done.returncode == 2, done
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_metrics_port_in_use_stops_the_start_with_one_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        done = _serve(tmp_path, "--http-port", "0", "--metrics-listen", f"127.0.0.1:{port}")
    finally:
        taken.close()
    assert done.returncode == 1, done
    assert f"cannot listen for metrics on 127.0.0.1:{port}" in done.stderr, done.stderr
