"""Calling a node's admin endpoints (``/internal/...``) with the admin credential.

``walship promote``/``repoint``/``failover``/``forget-follower``/``checkpoint`` use this; the
credential never crosses the network in the clear unless the caller allows it, and a node's
refusal comes back as an ``AdminError`` carrying the node's own message.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import httpx

from walship.errors import InvalidInput
from walship.httptls import check_secret_transport
from walship.peers import normalize_url

ADMIN_TIMEOUT_S = 30.0


class AdminError(Exception):
    """An admin call failed; the message says how."""


@dataclass(frozen=True)
class AdminAccess:
    """What an admin call sends and checks: the credential, TLS trust, the plain-HTTP rule."""

    credential: str
    verify: bool | ssl.SSLContext = True
    allow_insecure: bool = False

    def check_url(self, url: str) -> None:
        """InvalidInput when the credential would cross the network in the clear."""
        check_secret_transport(url, self.allow_insecure)

    def __repr__(self) -> str:  # never show the credential
        return f"AdminAccess(verify={self.verify!r}, allow_insecure={self.allow_insecure})"


def admin_call(url: str, path: str, access: AdminAccess, **params: str) -> dict[str, Any]:
    """POST an admin endpoint; its JSON answer, or AdminError with the node's message.

    Refused before anything is sent when the credential would travel in the clear."""
    target = normalize_url(url)
    try:
        access.check_url(target)
    except InvalidInput as exc:
        raise AdminError(exc.message) from exc
    try:
        response = httpx.post(
            f"{target}{path}",
            params=params,
            headers={"Authorization": f"Bearer {access.credential}"},
            timeout=ADMIN_TIMEOUT_S,
            verify=access.verify,
        )
    except httpx.HTTPError as exc:
        raise AdminError(f"{url}: {type(exc).__name__}: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or not isinstance(body, dict):
        message = body.get("message") if isinstance(body, dict) else None
        raise AdminError(f"{url} answered {response.status_code}: {message or response.text}")
    return body
