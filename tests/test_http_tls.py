"""HTTPS on a node's HTTP API (``--http-tls-cert``/``--http-tls-key``, mutual TLS with
``--http-tls-client-ca``): real ``walship serve`` processes on 127.0.0.1, the Python client
and the CLI on the other end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from walship.cli.main import app
from walship.client import Client
from walship.errors import InvalidInput, TlsVerificationFailed, Unavailable
from walship.httptls import check_secret_transport, client_ssl_context
from walship.testing.process import NodeProcess

from .pki import HAVE_OPENSSL, make_pki

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL, reason="needs openssl")
runner = CliRunner()
TOKEN = "tls-test-admin-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _node(tmp_path: Path, pki: Path, *extra: str, client_cert: bool = False) -> NodeProcess:
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    cert = (pki / "follower.pem", pki / "follower.key") if client_cert else (None, None)
    return NodeProcess(
        tmp_path / "data",
        fsync="never",
        extra_args=[
            "--http-tls-cert",
            str(pki / "leader.pem"),
            "--http-tls-key",
            str(pki / "leader.key"),
            "--admin-token-file",
            str(token),
            *extra,
        ],
        verify=client_ssl_context(pki / "ca.pem", *cert),
    )


@pytest.fixture
def https_node(tmp_path: Path, pki: Path) -> Iterator[NodeProcess]:
    node = _node(tmp_path, pki).start()
    try:
        yield node
    finally:
        assert node.stop() == 0


def test_a_client_without_the_ca_is_refused_and_one_with_it_writes_and_reads(
    https_node: NodeProcess, pki: Path
) -> None:
    assert https_node.url.startswith("https://127.0.0.1:")
    # a certificate that does not verify is a setting to fix: raised at once, never retried
    # (the default policy retries an unreachable node for ~30 s)
    started = time.monotonic()
    with Client(https_node.url) as client, pytest.raises(TlsVerificationFailed, match="CERT"):
        client.append("e-1", "t.x", {"n": 1})
    assert time.monotonic() - started < 10
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{https_node.url}/health")
    # plain HTTP to the HTTPS port gets no answer a client could mistake for the API
    with pytest.raises(httpx.HTTPError):
        httpx.get(https_node.url.replace("https://", "http://") + "/health").raise_for_status()
    with Client(https_node.url, ca_file=pki / "ca.pem") as client:
        receipt = client.append("e-1", "t.x", {"n": 1})
        assert client.query(entity_id="e-1").events[0].lsn == receipt.lsn


def test_cli_commands_work_over_https_with_the_ca_file(
    https_node: NodeProcess, pki: Path, tmp_path: Path
) -> None:
    ca = str(pki / "ca.pem")
    result = runner.invoke(app, ["status", https_node.url, "--json"])
    assert result.exit_code == 1  # without the CA the node is unreachable
    result = runner.invoke(app, ["status", https_node.url, "--json", "--ca-file", ca])
    assert result.exit_code == 0, result.output
    assert '"role": "leader"' in result.stdout
    with Client(https_node.url, ca_file=ca) as client:
        client.append("e-1", "t.x", {"n": 1})
    token = str(tmp_path / "admin.token")
    args = ["checkpoint", https_node.url, "--admin-token-file", token]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "CERTIFICATE" in result.output.upper()
    result = runner.invoke(app, [*args, "--ca-file", ca])
    assert result.exit_code == 0, result.output
    assert "checkpointed 1 events" in result.stdout


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path, pki: Path) -> None:
    node = _node(
        tmp_path, pki, "--http-tls-client-ca", str(pki / "ca.pem"), client_cert=True
    ).start()
    try:
        ca = pki / "ca.pem"
        with Client(node.url, ca_file=ca, retry=None) as client, pytest.raises(Unavailable):
            client.health()
        cert = (pki / "follower.pem", pki / "follower.key")
        with Client(node.url, ca_file=ca, cert=cert) as client:
            assert client.health()["role"] == "leader"
            client.append("e-1", "t.x", {"n": 1})
        base = ["status", node.url, "--json", "--ca-file", str(ca)]
        assert runner.invoke(app, base).exit_code == 1
        with_cert = [*base, "--client-cert", str(cert[0]), "--client-key", str(cert[1])]
        result = runner.invoke(app, with_cert)
        assert result.exit_code == 0, result.output
    finally:
        assert node.stop() == 0


def test_admin_credentials_never_go_over_plain_http_to_another_machine(tmp_path: Path) -> None:
    for url in ("http://127.0.0.1:3900", "http://localhost:3900", "http://[::1]:3900"):
        check_secret_transport(url, allow_insecure=False)
    check_secret_transport("https://10.1.2.3:3900", allow_insecure=False)
    check_secret_transport("http://10.1.2.3:3900", allow_insecure=True)
    for url in ("http://10.1.2.3:3900", "http://db.example.com:3900"):
        with pytest.raises(InvalidInput, match="plain HTTP"):
            check_secret_transport(url, allow_insecure=False)
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    # refused before any connection is tried (the address is a blackhole, TEST-NET-1)
    for command in (
        ["checkpoint", "http://192.0.2.1:3900"],
        ["promote", "http://192.0.2.1:3900"],
        ["failover", "--nodes", "http://192.0.2.1:3900"],
    ):
        result = runner.invoke(app, [*command, "--admin-token-file", str(token)])
        assert result.exit_code != 0
        assert "refusing to send the admin credential over plain HTTP" in result.output
        assert TOKEN not in result.output


def test_serve_refuses_bad_tls_flags_in_one_line(tmp_path: Path, pki: Path) -> None:
    base = ["serve", "--data-dir", str(tmp_path / "d"), "--check"]
    cert, key = str(pki / "leader.pem"), str(pki / "leader.key")
    for flags, says in (
        (["--http-tls-cert", cert], "go together"),
        (["--http-tls-client-ca", str(pki / "ca.pem")], "needs --http-tls-cert"),
        (["--http-tls-cert", cert, "--http-tls-key", str(tmp_path / "nope")], "no such file"),
        (["--http-tls-cert", key, "--http-tls-key", key], "cannot load"),
    ):
        result = runner.invoke(app, [*base, *flags])
        assert result.exit_code == 2, (flags, result.output)
        assert says in result.output
    result = runner.invoke(app, [*base, "--http-tls-cert", cert, "--http-tls-key", key])
    assert result.exit_code == 0 and "https 127.0.0.1" in result.output


def test_a_promotion_sees_its_https_peers_through_http_tls_ca(tmp_path: Path, pki: Path) -> None:
    """A follower asks its ``--peers`` before it takes the lead; over HTTPS it must trust their
    CA, or a live leader would look unreachable and be ignored (two leaders)."""
    secret = tmp_path / "replication.secret"
    secret.write_text("a-replication-secret-for-tls-tests")
    (tmp_path / "l").mkdir()
    (tmp_path / "f").mkdir()
    leader = _node(
        tmp_path / "l", pki, "--replication-secret-file", str(secret), "--replication-port", "0"
    )
    leader.start()
    try:
        follower = _node(
            tmp_path / "f",
            pki,
            "--role",
            "follower",
            "--leader",
            "127.0.0.1:1",  # not connected: only --peers can show the leader is alive
            "--replication-secret-file",
            str(secret),
            "--peers",
            leader.url,
            "--http-tls-ca",
            str(pki / "ca.pem"),
        )
        follower.node_id = "f1"
        follower.start()
        try:
            result = runner.invoke(
                app,
                [
                    "promote",
                    follower.url,
                    "--ca-file",
                    str(pki / "ca.pem"),
                    "--admin-token-file",
                    str(tmp_path / "f" / "admin.token"),
                ],
            )
            assert result.exit_code == 1, result.output
            assert "is a live leader" in result.output
        finally:
            assert follower.stop() == 0
    finally:
        assert leader.stop() == 0
