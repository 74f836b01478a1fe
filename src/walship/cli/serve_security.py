"""``walship serve``'s HTTP security flags: ``--auth``, ``--api-keys-file``, JWT, HTTPS.

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
from typing import TYPE_CHECKING, Annotated

import typer

from walship.errors import InvalidInput

if TYPE_CHECKING:  # imported when used: other commands do not pay for FastAPI and PyJWT
    from walship.http.auth import AuthSettings

AUTH_MODES = ("required", "none")

RateLimitFlag = Annotated[
    float,
    typer.Option(
        "--rate-limit-per-key",
        envvar="WALSHIP_RATE_LIMIT_PER_KEY",
        min=0,
        help="Requests a second each API key or JWT subject may send on average (0: no limit); "
        "past it, 429 with Retry-After.",
    ),
]
RateBurstFlag = Annotated[
    int,
    typer.Option(
        "--rate-burst-per-key",
        envvar="WALSHIP_RATE_BURST_PER_KEY",
        min=0,
        help="Requests a key may send at once above its rate (default: one second's worth).",
    ),
]
ConcurrentFlag = Annotated[
    int,
    typer.Option(
        "--concurrent-per-key",
        envvar="WALSHIP_CONCURRENT_PER_KEY",
        min=0,
        help="Requests each key may have in flight (0: no limit); more get 429 at once.",
    ),
]

# the flags of `walship serve` that this module checks
ApiKeysFileFlag = Annotated[
    Path | None,
    typer.Option(
        "--api-keys-file",
        envvar="WALSHIP_API_KEYS_FILE",
        help="API keys (from `walship keys create`) that may call the HTTP API; re-read "
        "when the file changes or on SIGHUP. Given, --auth defaults to required.",
    ),
]
AuthFlag = Annotated[
    str | None,
    typer.Option(
        "--auth",
        envvar="WALSHIP_AUTH",
        help="required (every route but /health* needs a key) or none (warned about; "
        "loopback only unless --allow-unauthenticated). Default: required with "
        "--api-keys-file, else none.",
    ),
]
AllowUnauthenticatedFlag = Annotated[
    bool,
    typer.Option(
        "--allow-unauthenticated",
        envvar="WALSHIP_ALLOW_UNAUTHENTICATED",
        help="Let a node with --auth none listen on a non-loopback address.",
    ),
]
JwtKeyFileFlag = Annotated[
    Path | None,
    typer.Option(
        "--jwt-key-file",
        envvar="WALSHIP_JWT_KEY_FILE",
        help="Accept JWT bearer tokens verified with this file's key: a JWKS, a PEM public "
        "key (RS256/ES256) or an HS256 secret; re-read on change or SIGHUP.",
    ),
]
JwtAudienceFlag = Annotated[
    str | None,
    typer.Option("--jwt-audience", envvar="WALSHIP_JWT_AUDIENCE", help="Required `aud`."),
]
JwtIssuerFlag = Annotated[
    str | None,
    typer.Option("--jwt-issuer", envvar="WALSHIP_JWT_ISSUER", help="Required `iss`."),
]
MetricsAuthFlag = Annotated[
    str,
    typer.Option(
        "--metrics-auth",
        envvar="WALSHIP_METRICS_AUTH",
        help="What /metrics needs under --auth required: admin, read (a key of every tenant) "
        "or none (open to a scraper that reaches the node).",
    ),
]
MetricsListenFlag = Annotated[
    str | None,
    typer.Option(
        "--metrics-listen",
        envvar="WALSHIP_METRICS_LISTEN",
        help="Also serve GET /metrics, without credentials and nothing else, on this "
        "HOST:PORT (plain HTTP): for Prometheus on an internal address, while /metrics on "
        "the API port keeps needing --metrics-auth.",
    ),
]
HttpTlsCaFlag = Annotated[
    Path | None,
    typer.Option(
        "--http-tls-ca",
        envvar="WALSHIP_HTTP_TLS_CA",
        help="CA that signed the other nodes' HTTPS certificates: a promotion asks --peers' "
        "/health over HTTPS trusting it (default: the system's CAs).",
    ),
]
HttpTlsCertFlag = Annotated[
    Path | None,
    typer.Option(
        "--http-tls-cert", envvar="WALSHIP_HTTP_TLS_CERT", help="Serve HTTPS: certificate."
    ),
]
HttpTlsKeyFlag = Annotated[
    Path | None,
    typer.Option("--http-tls-key", envvar="WALSHIP_HTTP_TLS_KEY", help="Serve HTTPS: private key."),
]
HttpTlsClientCaFlag = Annotated[
    Path | None,
    typer.Option(
        "--http-tls-client-ca",
        envvar="WALSHIP_HTTP_TLS_CLIENT_CA",
        help="Mutual TLS: refuse HTTPS clients without a certificate signed by this CA.",
    ),
]


@dataclass(frozen=True)
class HttpTls:
    """``--http-tls-cert``/``--http-tls-key`` (and ``--http-tls-client-ca`` for mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def cert_reqs(self) -> ssl.VerifyMode:
        return ssl.CERT_NONE if self.client_ca is None else ssl.CERT_REQUIRED


@dataclass(frozen=True)
class JwtFlags:
    """``--jwt-key-file``, ``--jwt-audience``, ``--jwt-issuer``, and the per-key limits."""

    key_file: Path | None = None
    audience: str | None = None
    issuer: str | None = None
    rate_per_s: float = 0.0
    burst: int = 0
    concurrent: int = 0
    metrics_auth: str = "admin"


def auth_settings(
    mode: str | None,
    keys_file: Path | None,
    admin_token: str | None,
    jwt_flags: JwtFlags | None = None,
) -> AuthSettings:
    """The auth settings the flags ask for; InvalidInput naming the flag when they clash."""
    from walship.apikeys import ApiKeyRing, Role
    from walship.http.auth import AuthSettings
    from walship.http.ratelimit import RateLimits
    from walship.jwtauth import JwtVerifier

    jwt_flags = jwt_flags or JwtFlags()
    if mode is not None and mode not in AUTH_MODES:
        raise InvalidInput(f"--auth must be required or none, not {mode!r}")
    given = keys_file is not None or jwt_flags.key_file is not None
    required = given if mode is None else mode == "required"
    if required and not given and admin_token is None:
        raise InvalidInput(
            "--auth required needs --api-keys-file or --jwt-key-file (or at least an admin token)"
        )
    if jwt_flags.key_file is None and (jwt_flags.audience or jwt_flags.issuer):
        raise InvalidInput("--jwt-audience and --jwt-issuer need --jwt-key-file")
    verifier = None
    if jwt_flags.key_file is not None:
        if not jwt_flags.key_file.is_file():
            raise InvalidInput(f"--jwt-key-file {jwt_flags.key_file}: no such file")
        verifier = JwtVerifier(
            jwt_flags.key_file, audience=jwt_flags.audience, issuer=jwt_flags.issuer
        )
    ring = None
    if keys_file is not None:
        if not keys_file.is_file():
            raise InvalidInput(
                f"--api-keys-file {keys_file}: no such file (create it with `walship keys "
                f"create --file {keys_file} ...`)"
            )
        ring = ApiKeyRing(keys_file)  # InvalidInput when it is not a key file
    limits = RateLimits(jwt_flags.rate_per_s, jwt_flags.burst, jwt_flags.concurrent)
    if jwt_flags.metrics_auth not in ("admin", "read", "none"):
        raise InvalidInput(
            f"--metrics-auth must be admin, read or none, not {jwt_flags.metrics_auth!r}"
        )
    metrics_role = None if jwt_flags.metrics_auth == "none" else Role.parse(jwt_flags.metrics_auth)
    return AuthSettings(
        required=required,
        keys=ring,
        jwt=verifier,
        rate_limits=limits,
        metrics_role=metrics_role,
    )


def metrics_address(text: str) -> tuple[str, int]:
    """``--metrics-listen HOST:PORT`` (port 0: any free one, shown in the start line)."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidInput(f"--metrics-listen must be HOST:PORT, not {text!r}")
    return host, int(port)


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


def peer_verify(tls: HttpTls | None, ca: Path | None) -> bool | ssl.SSLContext:
    """How a node trusts its peers' HTTPS: ``ca`` (``--http-tls-ca``), presenting its own
    certificate when it has one (peers may require client certificates). InvalidInput naming
    the file when it cannot be loaded."""
    if ca is None:
        return True
    if not ca.is_file():
        raise InvalidInput(f"--http-tls-ca {ca}: no such file")
    from walship.httptls import client_ssl_context

    if tls is None:
        return client_ssl_context(ca)
    return client_ssl_context(ca, tls.cert, tls.key)


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
    ring, verifier = settings.keys, settings.jwt
    if (ring is None and verifier is None) or not hasattr(signal, "SIGHUP"):
        return

    def reload(signum: int, frame: object) -> None:
        for source in (ring, verifier):
            if source is not None:
                source.reload()

    signal.signal(signal.SIGHUP, reload)
