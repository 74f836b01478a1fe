"""API keys: the key file, ``walship keys``, and a server that reloads its keys while running."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from walship.apikeys import ApiKeyFile, ApiKeyRing, Role, parse_tenants
from walship.cli.main import app
from walship.client import Client
from walship.errors import Forbidden, InvalidInput, Unauthorized
from walship.testing.process import NodeProcess

runner = CliRunner()


def _create(file: Path, *args: str) -> str:
    result = runner.invoke(app, ["keys", "create", "--file", str(file), *args])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_create_prints_the_key_once_and_stores_only_a_salted_hash(tmp_path: Path) -> None:
    file = tmp_path / "keys.json"
    key = _create(file, "--tenant", "acme", "--role", "write")
    again = _create(file, "--tenant", "acme", "--role", "write")
    assert key.startswith("wsk_") and len(key.splitlines()) == 1 and key != again
    text = file.read_text()
    secret = key.split("_", 2)[2]
    assert secret not in text and key not in text
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    entries = json.loads(text)["keys"]
    assert entries[0]["salt"] != entries[1]["salt"]  # per-key salt
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind
    ring = ApiKeyRing(file)
    principal = ring.verify(key)
    assert principal is not None and principal.role == Role.WRITE
    assert principal.tenants == frozenset({"acme"})
    assert ring.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None


def test_list_shows_ids_roles_and_tenants_never_secrets(tmp_path: Path) -> None:
    file = tmp_path / "keys.json"
    key = _create(file, "--tenant", "*", "--role", "admin", "--name", "ops")
    result = runner.invoke(app, ["keys", "list", "--file", str(file), "--json"])
    assert result.exit_code == 0, result.output
    (doc,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert doc["role"] == "admin" and doc["tenants"] == ["*"] and doc["name"] == "ops"
    assert doc["id"] in key and key.split("_", 2)[2] not in result.stdout
    assert "hash" not in doc and "salt" not in doc


def test_revoke_by_id_and_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    file = tmp_path / "keys.json"
    key = _create(file, "--tenant", "acme,globex")
    key_id = key.split("_")[1]
    assert ApiKeyRing(file).verify(key) is not None
    result = runner.invoke(app, ["keys", "revoke", key_id, "--file", str(file)])
    assert result.exit_code == 0 and f"revoked key {key_id}" in result.stdout
    assert ApiKeyRing(file).verify(key) is None
    for args in (
        ["keys", "revoke", "000000000000", "--file", str(file)],
        ["keys", "create", "--file", str(file), "--tenant", "acme", "--role", "root"],
        ["keys", "create", "--file", str(file), "--tenant", "bad tenant!"],
        ["keys", "create", "--file", str(file), "--tenant", "*,acme"],
        ["keys", "list", "--file", str(tmp_path / "missing.json")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)


def test_a_file_that_is_not_a_key_file_is_refused_naming_it(tmp_path: Path) -> None:
    file = tmp_path / "keys.json"
    for body in (b"not json", b"[]", b'{"format": "other"}', b'{"format": "walship-api-keys"}'):
        file.write_bytes(body)
        with pytest.raises(InvalidInput, match=r"keys\.json"):
            ApiKeyFile(file).load()
    with pytest.raises(InvalidInput):
        parse_tenants([])


def test_the_ring_reloads_a_changed_file_and_keeps_old_keys_when_it_breaks(
    tmp_path: Path,
) -> None:
    file = tmp_path / "keys.json"
    first = ApiKeyFile(file).create(Role.READ, frozenset({"acme"}))[1]
    ring = ApiKeyRing(file, check_ms=1)
    second = ApiKeyFile(file).create(Role.READ, None)[1]
    time.sleep(0.01)
    assert ring.verify(second) is not None  # created after the ring loaded
    ApiKeyFile(file).revoke(first.split("_")[1])
    time.sleep(0.01)
    assert ring.verify(first) is None
    file.write_text("{ broken")
    time.sleep(0.01)
    assert ring.verify(second) is not None  # a broken file changes nothing


def test_sighup_reloads_the_ring_at_once(tmp_path: Path) -> None:
    from walship.cli.serve_security import reload_keys_on_sighup
    from walship.http.auth import AuthSettings

    file = tmp_path / "keys.json"
    ApiKeyFile(file).create(Role.READ, None)
    ring = ApiKeyRing(file, check_ms=3_600_000)  # never looks at the file by itself
    ring.verify("wsk_000000000000_x")  # the first look happened; the next is an hour away
    key = ApiKeyFile(file).create(Role.READ, None)[1]
    assert ring.verify(key) is None
    previous = signal.getsignal(signal.SIGHUP)
    try:
        reload_keys_on_sighup(AuthSettings(required=True, keys=ring))
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while ring.verify(key) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGHUP, previous)


def _serve(tmp_path: Path, *extra: str) -> NodeProcess:
    return NodeProcess(tmp_path / "data", fsync="never", extra_args=list(extra))


def test_serve_requires_keys_reloads_them_on_change_and_on_sighup(tmp_path: Path) -> None:
    file = tmp_path / "keys.json"
    reader = _create(file, "--tenant", "acme", "--role", "read")
    node = _serve(tmp_path, "--api-keys-file", str(file)).start()
    try:
        url = f"{node.url}/api/v1/events/query"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"X-API-Key": reader}).status_code == 200
        with Client(node.url, api_key=reader) as client:
            assert client.query(tenant_id="acme").count == 0
            with pytest.raises(Forbidden, match="tenant 'globex'"):
                client.query(tenant_id="globex")
            with pytest.raises(Forbidden, match="role read"):
                client.append("e", "t", 1, tenant_id="acme")
        with Client(node.url) as client, pytest.raises(Unauthorized):
            client.query()
        writer = _create(file, "--tenant", "acme", "--role", "write")
        deadline = time.monotonic() + 30
        event = {"tenant_id": "acme", "entity_id": "e", "event_type": "t", "payload": 1}
        while True:  # picked up from the file's change, without a signal
            r = httpx.post(f"{node.url}/api/v1/events", json=event, headers={"X-API-Key": writer})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        # revoke and signal
        result = runner.invoke(app, ["keys", "revoke", writer.split("_")[1], "--file", str(file)])
        assert result.exit_code == 0
        assert node.process is not None
        node.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while httpx.get(url, headers={"X-API-Key": writer}).status_code != 401:
            assert time.monotonic() < deadline, "the revoked key is still accepted"
            time.sleep(0.05)
        assert node.process.poll() is None  # SIGHUP reloads; it does not stop the node
        log = node.log()
        assert reader not in log and writer not in log
        assert reader.split("_", 2)[2] not in log
    finally:
        assert node.stop() == 0


def test_serve_without_keys_warns_and_stays_on_loopback(tmp_path: Path) -> None:
    node = _serve(tmp_path).start()
    try:
        assert "authentication is off" in node.log()
        assert httpx.get(f"{node.url}/api/v1/stats").status_code == 200
    finally:
        node.stop()
    for host in ("0.0.0.0", "::"):
        result = runner.invoke(
            app,
            ["serve", "--data-dir", str(tmp_path / "d2"), "--http-host", host, "--check"],
        )
        assert result.exit_code == 2, result.output
        assert "refusing to serve without authentication" in result.output
        assert not (tmp_path / "d2").exists()
    result = runner.invoke(
        app,
        [
            "serve",
            "--data-dir",
            str(tmp_path / "d2"),
            "--http-host",
            "0.0.0.0",
            "--allow-unauthenticated",
            "--check",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "auth none" in result.output
    keys = tmp_path / "k.json"
    _create(keys, "--tenant", "*")
    args = ["serve", "--data-dir", str(tmp_path / "d2"), "--http-host", "0.0.0.0"]
    result = runner.invoke(app, [*args, "--api-keys-file", str(keys), "--check"])
    assert result.exit_code == 0 and "auth required with 1 API keys" in result.output
    for bad in (["--auth", "sometimes"], ["--auth", "required"], ["--api-keys-file", "nope"]):
        result = runner.invoke(app, ["serve", "--data-dir", str(tmp_path / "d2"), *bad, "--check"])
        assert result.exit_code == 2, (bad, result.output)
