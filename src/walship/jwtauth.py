"""JWT bearer tokens: verified against the keys of a key file, turned into a Principal.

The key file (``--jwt-key-file``) is one of: a JWKS (``{"keys": [...]}``, keys chosen by
``kid``), a PEM public key (RSA → RS256, EC P-256 → ES256), or anything else, taken as the
HS256 shared secret (at least 32 bytes). Each key accepts exactly one algorithm, the one its
kind implies, and the token's header must name that algorithm: ``alg: none``, an algorithm
walship does not take, and a token whose ``alg`` does not fit the key (an HS256 token "signed"
with an RSA public key: algorithm confusion) are all refused before any signature check.

Claims: ``exp`` is required; ``nbf`` is honoured; ``aud``/``iss`` must match when the server
is given ``--jwt-audience``/``--jwt-issuer``; ``role`` (read, write, admin) and ``tenants`` (a
list, or ``"*"``) say what the token may do. The file is re-read when it changes (keys rotate
without a restart) or on ``reload()``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from walship.apikeys import Principal, Role, parse_tenants
from walship.errors import InvalidInput, Unauthorized
from walship.limits import DEFAULT_LIMITS

log = logging.getLogger(__name__)

ALGORITHMS = ("HS256", "RS256", "ES256")
_HS256_SECRET_BYTES_MIN = 32
_KEY_FILE_BYTES_MAX = 1024 * 1024
_SUBJECT_SHOWN_CHARS = 64


@dataclass(frozen=True)
class VerificationKey:
    kid: str | None
    algorithm: str
    key: Any  # bytes (HS256) or a cryptography public key


def parse_key_file(data: bytes, where: str) -> list[VerificationKey]:
    """The verification keys in a key file's bytes; InvalidInput naming ``where``."""
    text = data.strip()
    if text.startswith(b"{"):
        return _jwks(text, where)
    if text.startswith(b"-----BEGIN"):
        try:
            public = load_pem_public_key(text)
        except ValueError as exc:
            raise InvalidInput(f"{where}: not a PEM public key ({exc})") from exc
        if isinstance(public, rsa.RSAPublicKey):
            return [VerificationKey(None, "RS256", public)]
        if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1":
            return [VerificationKey(None, "ES256", public)]
        raise InvalidInput(f"{where}: only RSA and EC P-256 public keys are taken")
    if len(text) < _HS256_SECRET_BYTES_MIN:
        raise InvalidInput(
            f"{where}: an HS256 secret needs at least {_HS256_SECRET_BYTES_MIN} bytes"
        )
    return [VerificationKey(None, "HS256", text)]


def _jwks(text: bytes, where: str) -> list[VerificationKey]:
    try:
        body = json.loads(text)
        found = jwt.PyJWKSet.from_dict(body).keys
    except (ValueError, jwt.PyJWTError, RecursionError) as exc:
        raise InvalidInput(f"{where}: not a usable JWKS ({type(exc).__name__})") from exc
    keys = []
    for item in found:
        if item.algorithm_name not in ALGORITHMS:
            raise InvalidInput(f"{where}: key {item.key_id!r} uses {item.algorithm_name}")
        keys.append(VerificationKey(item.key_id, item.algorithm_name, item.key))
    if not keys:
        raise InvalidInput(f"{where}: the JWKS holds no keys")
    return keys


class JwtVerifier:
    """Verify bearer tokens against the key file at ``path`` (see the module)."""

    def __init__(
        self,
        path: Path,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        check_ms: int = DEFAULT_LIMITS.api_keys_check_ms,
        leeway_ms: int = DEFAULT_LIMITS.jwt_clock_skew_ms,
    ) -> None:
        self.path = path
        self.audience = audience
        self.issuer = issuer
        self.check_s = check_ms / 1000
        self.leeway_s = leeway_ms / 1000
        self._keys: list[VerificationKey] = []
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._load(strict=True)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self, *, strict: bool) -> None:
        stamp = self._file_stamp()
        try:
            try:
                with self.path.open("rb") as f:
                    data = f.read(_KEY_FILE_BYTES_MAX + 1)
            except OSError as exc:
                raise InvalidInput(f"cannot read JWT key file {self.path}: {exc.strerror}") from exc
            if len(data) > _KEY_FILE_BYTES_MAX:
                raise InvalidInput(f"JWT key file {self.path} is too large")
            keys = parse_key_file(data, f"JWT key file {self.path}")
        except InvalidInput as exc:
            if strict:
                raise
            log.warning("JWT keys not reloaded, the previous ones stay in force: %s", exc.message)
            self._stamp = stamp
            return
        self._keys, self._stamp = keys, stamp
        log.info("loaded %d JWT verification keys from %s", len(keys), self.path)

    def reload(self) -> None:
        self._load(strict=False)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_s
            if self._file_stamp() != self._stamp:
                self._load(strict=False)

    def verify(self, token: str) -> Principal:
        """The principal a valid token stands for; Unauthorized saying what is wrong with it
        (never repeating it)."""
        self._maybe_reload()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed bearer token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise Unauthorized(f"token algorithm {str(alg)[:16]!r} is not accepted")
        candidates = [
            k for k in self._keys if k.algorithm == alg and (kid is None or k.kid in (None, kid))
        ]
        if not candidates:
            raise Unauthorized(f"no {alg} key for this token (kid {str(kid)[:32]!r})")
        failure: Unauthorized | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway_s,
                    options={"require": ["exp"], "verify_aud": self.audience is not None},
                )
            except jwt.InvalidSignatureError:
                failure = Unauthorized("token signature does not verify")
                continue
            except jwt.PyJWTError as exc:
                raise Unauthorized(f"token refused: {_reason(exc)}") from None
            return _principal(claims)
        assert failure is not None
        raise failure


def _reason(exc: jwt.PyJWTError) -> str:
    reasons = {
        jwt.ExpiredSignatureError: "expired",
        jwt.ImmatureSignatureError: "not valid yet (nbf)",
        jwt.InvalidAudienceError: "wrong audience",
        jwt.InvalidIssuerError: "wrong issuer",
        jwt.MissingRequiredClaimError: "a required claim is missing",
    }
    for kind, text in reasons.items():
        if isinstance(exc, kind):
            return text
    return type(exc).__name__


def _principal(claims: dict[str, Any]) -> Principal:
    subject = str(claims.get("sub", "?"))[:_SUBJECT_SHOWN_CHARS]
    try:
        role = Role.parse(str(claims["role"]))
        tenants = parse_tenants(claims["tenants"])
    except KeyError as exc:
        raise Unauthorized(f"token has no {exc.args[0]!r} claim") from None
    except (InvalidInput, TypeError) as exc:
        raise Unauthorized(f"token claims are not usable: {exc}") from None
    return Principal(f"token of {subject!r}", role, tenants)
