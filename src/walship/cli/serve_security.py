"""``walship serve``'s HTTP security flags: ``--auth``, ``--api-keys-file``, HTTPS.

Checked before anything is opened, like the other flags (one line, exit 2 when wrong). The
safe default: a node given a key file requires credentials; one given none runs with
``--auth none``, says so on stderr, and refuses to listen anywhere but loopback unless
``--allow-unauthenticated`` says that is meant.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from walship.apikeys import ApiKeyRing
from walship.errors import InvalidInput
from walship.http.auth import AuthSettings

AUTH_MODES = ("required", "none")


@dataclass(frozen=True)
class HttpTls:
    """``--http-tls-cert``/``--http-tls-key`` (and ``--http-tls-client-ca`` for mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def cert_reqs(self) -> ssl.VerifyMode:
        return ssl.CERT_NONE if self.client_ca is None else ssl.CERT_REQUIRED


def auth_settings(
    mode: str | None, keys_file: Path | None, admin_token: str | None
) -> AuthSettings:
    """The auth settings the flags ask for; InvalidInput naming the flag when they clash."""
    if mode is not None and mode not in AUTH_MODES:
        raise InvalidInput(f"--auth must be required or none, not {mode!r}")
    required = (keys_file is not None) if mode is None else mode == "required"
    if required and keys_file is None and admin_token is None:
        raise InvalidInput("--auth required needs --api-keys-file (or at least an admin token)")
    ring = None
    if keys_file is not None:
        if not keys_file.is_file():
            raise InvalidInput(
                f"--api-keys-file {keys_file}: no such file (create it with `walship keys "
                f"create --file {keys_file} ...`)"
            )
        ring = ApiKeyRing(keys_file)  # InvalidInput when it is not a key file
    return AuthSettings(required=required, keys=ring)


def http_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> HttpTls | None:
    """The HTTPS settings, their files loaded once to prove them; None for plain HTTP."""
    if cert is None and key is None:
        if client_ca is not None:
            raise InvalidInput("--http-tls-client-ca needs --http-tls-cert and --http-tls-key")
        return None
    if cert is None or key is None:
        raise InvalidInput("--http-tls-cert and --http-tls-key go together")
    for flag, path in (
        ("--http-tls-cert", cert),
        ("--http-tls-key", key),
        ("--http-tls-client-ca", client_ca),
    ):
        if path is not None and not path.is_file():
            raise InvalidInput(f"{flag} {path}: no such file")
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise InvalidInput(f"cannot load the HTTP TLS files: {exc}") from exc
    return HttpTls(cert, key, client_ca)


def is_loopback(host: str, port: int) -> bool | None:
    """Whether every address ``host`` resolves to for listening is a loopback address; None
    when it does not resolve (binding it then fails with its own message)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return None
    for *_, address in infos:
        ip = ipaddress.ip_address(address[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        if not (mapped or ip).is_loopback:
            return False
    return bool(infos)


def unauthenticated_refusal(host: str, port: int, allow: bool) -> str | None:
    """Why a node with ``--auth none`` must not listen on ``host``; None when it may."""
    if allow or is_loopback(host, port) is not False:
        return None
    return (
        f"refusing to serve without authentication on {host}, which is not a loopback "
        "address: give --api-keys-file (and --auth required), or --allow-unauthenticated "
        "if every client that can reach it is trusted"
    )


def reload_keys_on_sighup(settings: AuthSettings) -> None:
    """``kill -HUP`` makes the server read its key file again at once."""
    ring = settings.keys
    if ring is None or not hasattr(signal, "SIGHUP"):
        return
    signal.signal(signal.SIGHUP, lambda signum, frame: ring.reload())
