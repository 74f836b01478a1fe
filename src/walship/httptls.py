"""The client side of a node's HTTPS: which certificates to trust, which one to present, and
where a secret may travel in the clear.

Used by ``Client``/``AsyncClient`` and by every CLI command that calls a node.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from walship.errors import InvalidInput

PathLike = str | Path


def client_ssl_context(
    ca_file: PathLike | None = None,
    cert_file: PathLike | None = None,
    key_file: PathLike | None = None,
) -> ssl.SSLContext:
    """A context that verifies the node against ``ca_file`` (default: the system's CAs) and
    presents ``cert_file``/``key_file`` when mutual TLS asks for a certificate.

    InvalidInput naming the file when one cannot be loaded."""
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        if cert_file is not None:
            context.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
        elif key_file is not None:
            raise InvalidInput("a client key needs its certificate too")
    except (OSError, ssl.SSLError) as exc:
        named = ", ".join(str(p) for p in (ca_file, cert_file, key_file) if p is not None)
        raise InvalidInput(f"cannot load TLS files ({named}): {exc}") from exc
    return context


def httpx_verify(
    verify: bool | ssl.SSLContext = True,
    ca_file: PathLike | None = None,
    cert: tuple[PathLike, PathLike] | PathLike | None = None,
) -> bool | ssl.SSLContext:
    """What to give httpx as ``verify``: ``verify`` itself unless a CA file or a client
    certificate asks for a context of our own."""
    if ca_file is None and cert is None:
        return verify
    if verify is False:
        raise InvalidInput("verify=False and a CA file contradict each other")
    cert_file, key_file = (
        (cert if isinstance(cert, tuple) else (cert, None)) if cert else (None, None)
    )
    if isinstance(verify, ssl.SSLContext):
        if cert_file is not None:
            verify.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
        return verify
    return client_ssl_context(ca_file, cert_file, key_file)


def is_loopback_url(url: str) -> bool:
    """Whether the URL names this machine (``localhost`` or a loopback address)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_secret_transport(url: str, allow_insecure: bool) -> None:
    """InvalidInput when a secret would cross the network unencrypted: plain HTTP to another
    machine, unless ``allow_insecure``."""
    if allow_insecure or urlsplit(url).scheme == "https" or is_loopback_url(url):
        return
    raise InvalidInput(
        f"refusing to send the admin credential over plain HTTP to {url}: use https:// "
        "(the node's --http-tls-cert), or --allow-insecure-admin on a trusted network"
    )
