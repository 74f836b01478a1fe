"""The addresses a node publishes: its HTTP URL and its replication ``HOST:PORT``.

A node *binds* one address and *advertises* another: what it tells followers (the leader's
URL in a Welcome, named by a follower's 409), etcd (the leader key), ``walship failover``
(the promoted node's replication address, handed to every other node) and ``/health``. A
wildcard bind (``0.0.0.0``, ``::``) is reachable on every interface but names none of them,
so it is never advertised: ``--advertise-http-url`` / ``--advertise-replication-address`` say
what to publish; without them a wildcard bind publishes the host name of the machine (when it
resolves) and otherwise the node refuses to start.

Pure functions: the CLI turns their ``InvalidInput`` into one-line errors.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from walship.errors import InvalidInput

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def is_wildcard(host: str) -> bool:
    """True for a bind address that means "every interface"."""
    return host.strip() in WILDCARD_HOSTS


def bracket(host: str) -> str:
    """``host`` as it goes before ``:PORT`` (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class AdvertisedUrl:
    """``--advertise-http-url``: scheme and host, and a port unless the listening one applies."""

    scheme: str
    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str, what: str = "--advertise-http-url") -> AdvertisedUrl:
        """InvalidInput for anything but ``http(s)://HOST[:PORT]`` with a usable host."""
        try:
            parts = urlsplit(text.strip())
            port = parts.port
        except ValueError as exc:
            raise InvalidInput(f"{what} must be http://HOST[:PORT], not {text!r}") from exc
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not host or parts.path not in ("", "/"):
            raise InvalidInput(f"{what} must be http://HOST[:PORT], not {text!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise InvalidInput(f"{what} must be http://HOST[:PORT], not {text!r}")
        if is_wildcard(host):
            raise InvalidInput(f"{what} names a wildcard address ({host}), which no client reaches")
        return cls(parts.scheme, host, port)

    def url(self, listening_port: int) -> str:
        """The URL, with ``listening_port`` when none was given."""
        return f"{self.scheme}://{bracket(self.host)}:{self.port or listening_port}"


@dataclass(frozen=True)
class AdvertisedAddress:
    """``--advertise-replication-address``: ``HOST`` or ``HOST:PORT`` (IPv6 in brackets)."""

    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str, what: str = "--advertise-replication-address") -> AdvertisedAddress:
        text = text.strip()
        host, port = text, None
        if text.startswith("["):
            inner, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise InvalidInput(f"{what} must be HOST or HOST:PORT, not {text!r}")
            host, digits = inner, rest[1:]
            port = _port(digits, text, what) if rest else None
        elif text.count(":") == 1:
            host, _, digits = text.partition(":")
            port = _port(digits, text, what)
        if not host or "/" in host or any(c.isspace() for c in host):
            raise InvalidInput(f"{what} must be HOST or HOST:PORT, not {text!r}")
        if is_wildcard(host):
            raise InvalidInput(
                f"{what} names a wildcard address ({host}), which no follower reaches"
            )
        return cls(host, port)

    def address(self, listening_port: int) -> str:
        """``HOST:PORT``, with ``listening_port`` when none was given."""
        return f"{bracket(self.host)}:{self.port or listening_port}"


def _port(digits: str, text: str, what: str) -> int:
    if not digits.isdigit() or not 0 < int(digits) < 65536:
        raise InvalidInput(f"{what} must be HOST or HOST:PORT, not {text!r}")
    return int(digits)


def machine_host(resolve: Callable[[str], object] = socket.gethostbyname) -> str | None:
    """This machine's host name when it resolves (what a wildcard bind publishes by default);
    None when it does not."""
    name = socket.gethostname()
    if not name:
        return None
    try:
        resolve(name)
    except OSError:
        return None
    return name


def advertised_host(
    bind_host: str,
    explicit: str | None,
    other: str | None,
    what: str,
    machine: Callable[[], str | None] = machine_host,
) -> str:
    """The host to publish for a listener bound to ``bind_host``.

    ``explicit`` (its advertise flag) wins, then ``other`` (the host of the other advertise
    flag: one name usually serves both), then a bind host that is not a wildcard, then the
    machine's host name. InvalidInput (one line, naming the flags) when none is usable.
    """
    for host in (explicit, other):
        if host:
            return host
    if not is_wildcard(bind_host):
        return bind_host.strip("[]")
    found = machine()
    if found:
        return found
    raise InvalidInput(
        f"{what} is bound to the wildcard {bind_host or '(all)'} and this machine's host "
        "name does not resolve: pass --advertise-http-url and --advertise-replication-address"
    )
