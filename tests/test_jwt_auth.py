"""JWT bearer tokens on the HTTP API: what is accepted, everything that must be refused, and
key rotation through the key file while the app runs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from walship.http import create_app
from walship.http.auth import AuthSettings
from walship.jwtauth import JwtVerifier
from walship.node import Node, NodeConfig

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

AUD, ISS = "walship", "https://idp.test/"
SECRET = b"an-hs256-secret-of-at-least-32-bytes!!"
QUERY = "/api/v1/events/query"


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": "svc-orders",
        "aud": AUD,
        "iss": ISS,
        "iat": now,
        "exp": now + 300,
        "role": "write",
        "tenants": ["acme"],
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand: ``alg: none`` or an HMAC over any bytes (what an attacker does)."""
    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if key is None:
        return signing + "."
    return f"{signing}.{_b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())}"


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Api:
    def __init__(self, client: TestClient, key_file: Path) -> None:
        self.client = client
        self.key_file = key_file

    def get(self, token: str, path: str = QUERY, **params: Any) -> Any:
        return self.client.get(path, params=params, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    key_file = tmp_path / "jwt.key"
    key_file.write_bytes(SECRET)
    node = Node.open(NodeConfig(tmp_path / "data", checkpoints=False))
    verifier = JwtVerifier(key_file, audience=AUD, issuer=ISS, check_ms=1)
    app = create_app(node, auth=AuthSettings(required=True, jwt=verifier))
    try:
        with TestClient(app) as client:
            yield Api(client, key_file)
    finally:
        node.close()


def _refused(response: Any, says: str, token: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"] == "unauthorized" and says in body["message"], body
    signature = token.rsplit(".", maxsplit=1)[-1]
    assert token not in response.text and (not signature or signature not in response.text)


def test_a_valid_hs256_token_acts_with_its_role_and_tenants(api: Api) -> None:
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    ev = {"tenant_id": "acme", "entity_id": "e", "event_type": "t", "payload": 1}
    r = api.client.post("/api/v1/events", json=ev, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert api.get(token).json()["count"] == 1
    r = api.get(token, tenant_id="globex")
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    # role write, some tenants: those tenants' figures, not the node's
    stats = api.get(token, "/api/v1/stats").json()
    assert stats["tenants"]["acme"] == {"events": 1, "entities": 1} and "wal_bytes" not in stats
    admin = jwt.encode(_claims(role="admin", tenants="*"), SECRET, algorithm="HS256")
    assert "wal_bytes" in api.get(admin, "/api/v1/stats").json()


def test_expired_not_yet_valid_wrong_audience_or_issuer_are_refused(api: Api) -> None:
    now = int(time.time())
    for claims, says in (
        (_claims(exp=now - 120), "expired"),
        (_claims(nbf=now + 120), "not valid yet"),
        (_claims(aud="someone-else"), "wrong audience"),
        (_claims(aud=None), "required claim"),
        (_claims(iss="https://evil.test/"), "wrong issuer"),
        (_claims(exp=None), "required claim"),
        (_claims(role=None), "no 'role' claim"),
        (_claims(role="root"), "not usable"),
    ):
        token = jwt.encode(claims, SECRET, algorithm="HS256")
        _refused(api.get(token), says, token)
    token = jwt.encode(_claims(), b"another-secret-of-at-least-32-bytes!!!", algorithm="HS256")
    _refused(api.get(token), "signature", token)


def test_alg_none_and_unknown_algorithms_are_refused(api: Api) -> None:
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": "None"}, {"alg": "HS512"}):
        token = _unsigned(header, _claims(), None if "none" in header["alg"].lower() else SECRET)
        _refused(api.get(token), "not accepted", token)
    _refused(api.get("a.b.c"), "malformed", "a.b.c")


def test_an_hs256_token_signed_with_the_rsa_public_key_is_refused(api: Api) -> None:
    """Algorithm confusion: the server holds an RSA public key; an attacker who has it (it is
    public) uses its PEM bytes as an HMAC secret."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(api.key_file, pem)
    time.sleep(0.01)
    good = jwt.encode(_claims(), private, algorithm="RS256")
    assert api.get(good).status_code == 200  # the file was re-read: RS256 now
    forged = _unsigned({"alg": "HS256", "typ": "JWT"}, _claims(role="admin", tenants="*"), pem)
    _refused(api.get(forged, "/api/v1/stats"), "no HS256 key", forged)
    # the same with the key's text as a JWKS would carry it: still not an HMAC key
    forged = _unsigned({"alg": "HS256"}, _claims(), pem.strip())
    _refused(api.get(forged), "no HS256 key", forged)


def test_keys_rotate_through_the_key_file_without_a_restart(api: Api, caplog: Any) -> None:
    old = jwt.encode(_claims(), SECRET, algorithm="HS256")
    assert api.get(old).status_code == 200
    # an ES256 JWKS with two keys by kid replaces the HS256 secret
    first, second = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key())), "kid": kid}
            for kid, k in (("k1", first), ("k2", second))
        ]
    }
    for item in jwks["keys"]:
        item["alg"] = "ES256"
    with caplog.at_level(logging.INFO):
        _write(api.key_file, json.dumps(jwks).encode())
        time.sleep(0.01)
        new = jwt.encode(_claims(), second, algorithm="ES256", headers={"kid": "k2"})
        assert api.get(new).status_code == 200
    _refused(api.get(old), "no HS256 key", old)
    wrong_kid = jwt.encode(_claims(), second, algorithm="ES256", headers={"kid": "k1"})
    _refused(api.get(wrong_kid), "signature", wrong_kid)
    unknown = jwt.encode(_claims(), first, algorithm="ES256", headers={"kid": "k9"})
    _refused(api.get(unknown), "no ES256 key", unknown)
    # a broken file keeps the keys in force
    _write(api.key_file, b"{ not json")
    time.sleep(0.01)
    assert api.get(new).status_code == 200
    logged = caplog.text
    for token in (old, new, wrong_kid):
        assert token not in logged
    assert SECRET.decode() not in logged


def test_serve_refuses_jwt_flags_without_a_key_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from walship.cli.main import app

    runner = CliRunner()
    base = ["serve", "--data-dir", str(tmp_path / "d"), "--check"]
    result = runner.invoke(app, [*base, "--jwt-audience", "x"])
    assert result.exit_code == 2 and "need --jwt-key-file" in result.output
    short = tmp_path / "short.key"
    short.write_text("too short")
    result = runner.invoke(app, [*base, "--jwt-key-file", str(short)])
    assert result.exit_code == 2 and "at least 32 bytes" in result.output
    good = tmp_path / "good.key"
    good.write_bytes(SECRET)
    result = runner.invoke(app, [*base, "--jwt-key-file", str(good), "--http-host", "0.0.0.0"])
    assert result.exit_code == 0 and "auth required and JWT" in result.output
