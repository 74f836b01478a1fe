"""How a CLI command reaches a node: HTTPS trust, client certificate, the credential it sends.

The options are parsed here; the admin call itself (``AdminAccess``, ``admin_call``) is library
code in ``admin_client.py``.

Every command that calls a node takes the same options from here (``--ca-file``,
``--client-cert``/``--client-key``; admin commands also ``--api-key-file`` and
``--allow-insecure-admin``), so they behave alike.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated

import typer

from walship.cli.output import fail
from walship.errors import InvalidInput
from walship.httptls import client_ssl_context

CaFile = Annotated[
    Path | None,
    typer.Option(
        "--ca-file",
        envvar="WALSHIP_CA_FILE",
        help="Trust nodes' HTTPS certificates signed by this CA (PEM).",
    ),
]
ClientCert = Annotated[
    Path | None,
    typer.Option(
        "--client-cert",
        envvar="WALSHIP_CLIENT_CERT",
        help="Client certificate (PEM) for nodes started with --http-tls-client-ca.",
    ),
]
ClientKey = Annotated[
    Path | None,
    typer.Option("--client-key", envvar="WALSHIP_CLIENT_KEY", help="The client certificate's key."),
]
ApiKeyFile = Annotated[
    Path | None,
    typer.Option(
        "--api-key-file",
        envvar="WALSHIP_API_KEY_FILE",
        help="File holding an admin API key (wsk_…), instead of the admin token.",
    ),
]
AllowInsecureAdmin = Annotated[
    bool,
    typer.Option(
        "--allow-insecure-admin",
        help="Send the admin credential over plain HTTP to a non-loopback address.",
    ),
]


def tls_verify(
    ca_file: Path | None, client_cert: Path | None, client_key: Path | None
) -> bool | ssl.SSLContext:
    """What httpx should verify with; exits 2 naming the file when one cannot be loaded."""
    if ca_file is None and client_cert is None and client_key is None:
        return True
    for flag, path in (("--ca-file", ca_file), ("--client-cert", client_cert)):
        if path is not None and not path.is_file():
            fail(f"{flag} {path}: no such file", 2)
    try:
        return client_ssl_context(ca_file, client_cert, client_key)
    except InvalidInput as exc:
        fail(exc.message, 2)


def read_api_key(path: Path) -> str:
    """The key in the file (first line, trimmed); exits 2 when unreadable or empty."""
    try:
        key = path.read_text().strip()
    except OSError as exc:
        fail(f"cannot read --api-key-file {path}: {exc.strerror or exc}", 2)
    if not key:
        fail(f"--api-key-file {path} is empty", 2)
    return key
