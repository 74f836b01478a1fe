"""API keys: who may call a node's HTTP API, with which role, for which tenants.

A key reads ``wsk_<id>_<secret>``: ``id`` (12 hex digits) names it in listings, logs and
revocations; ``secret`` (256 random bits) is shown once, when the key is created, and never
stored. The key file (JSON, mode 0600, replaced atomically) keeps per key its role, tenants, a
random salt and ``HMAC-SHA256(salt, secret)``. A fast salted hash is enough here, unlike for
passwords: the secret has 256 bits of entropy, so there is nothing to guess, and a slow hash
would cost every request. Comparisons of hashes are constant-time.

``ApiKeyFile`` reads and edits the file (``walship keys``); ``ApiKeyRing`` is what a server
holds: the keys of the file as last loaded, reloaded when the file changes (checked at most
every ``api_keys_check_ms``) or on ``reload()`` (SIGHUP). A file that cannot be loaded at a
reload keeps the previous keys in force and is logged, without any secret.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from walship.errors import InvalidInput, ValidationError
from walship.events import validate_tenant_id
from walship.fsutil import fsync_dir
from walship.limits import DEFAULT_LIMITS

log = logging.getLogger(__name__)

KEY_PREFIX = "wsk_"
ALL_TENANTS = "*"
FILE_FORMAT = "walship-api-keys"
FILE_VERSION = 1
_ID_HEX_CHARS = 12
_SECRET_BYTES = 32
_SALT_BYTES = 16
_FILE_BYTES_MAX = 16 * 1024 * 1024  # ~50,000 keys; a bigger file is not a key file


class Role(enum.IntEnum):
    """What a credential may do; each role includes the ones below it."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise InvalidInput(f"role must be read, write or admin, not {text!r}") from None

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: a key (or the admin token), its role and tenants.

    ``tenants`` None means every tenant. ``anonymous``: no credentials, on a node started with
    ``--auth none``."""

    name: str
    role: Role
    tenants: frozenset[str] | None
    anonymous: bool = False

    def may(self, role: Role) -> bool:
        return self.role >= role

    def may_use(self, tenant_id: str) -> bool:
        return self.tenants is None or tenant_id in self.tenants

    def describe_tenants(self) -> str:
        return "every tenant" if self.tenants is None else ", ".join(sorted(self.tenants))


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as the file stores it (no secret)."""

    key_id: str
    role: Role
    tenants: frozenset[str] | None
    salt: bytes
    digest: bytes
    created: str
    revoked: str | None = None
    name: str | None = None

    def principal(self) -> Principal:
        return Principal(f"key {self.key_id}", self.role, self.tenants)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.key_id,
            "role": str(self.role),
            "tenants": [ALL_TENANTS] if self.tenants is None else sorted(self.tenants),
            "salt": self.salt.hex(),
            "hash": self.digest.hex(),
            "created": self.created,
            "revoked": self.revoked,
            "name": self.name,
        }

    @classmethod
    def from_json(cls, raw: Any, where: str) -> ApiKey:
        if not isinstance(raw, dict):
            raise InvalidInput(f"{where}: a key must be a JSON object")
        try:
            key_id = str(raw["id"])
            if len(key_id) != _ID_HEX_CHARS or not _is_hex(key_id):
                raise InvalidInput(f"{where}: bad key id")
            return cls(
                key_id=key_id,
                role=Role.parse(str(raw["role"])),
                tenants=parse_tenants(raw["tenants"]),
                salt=bytes.fromhex(str(raw["salt"])),
                digest=bytes.fromhex(str(raw["hash"])),
                created=str(raw.get("created", "")),
                revoked=None if raw.get("revoked") is None else str(raw["revoked"]),
                name=None if raw.get("name") is None else str(raw["name"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{where}: malformed key entry ({type(exc).__name__})") from exc


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def parse_tenants(values: Iterable[str] | str) -> frozenset[str] | None:
    """Tenant ids (comma-separated or a list); None for ``*`` (every tenant)."""
    items = [values] if isinstance(values, str) else list(values)
    names = {part.strip() for item in items for part in str(item).split(",") if part.strip()}
    if not names:
        raise InvalidInput("a key needs at least one tenant (or '*' for every tenant)")
    if ALL_TENANTS in names:
        if len(names) > 1:
            raise InvalidInput("'*' already means every tenant; give it alone")
        return None
    try:
        return frozenset(validate_tenant_id(name) for name in names)
    except ValidationError as exc:
        raise InvalidInput(exc.message) from exc


def _digest(salt: bytes, secret: str) -> bytes:
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


def split_key(text: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a presented key; None when it is not shaped like a walship key."""
    if not text.startswith(KEY_PREFIX):
        return None
    rest = text[len(KEY_PREFIX) :]
    key_id, sep, secret = rest[:_ID_HEX_CHARS], rest[_ID_HEX_CHARS : _ID_HEX_CHARS + 1], rest[13:]
    if sep != "_" or not secret or not _is_hex(key_id):
        return None
    return key_id, secret


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiKeyFile:
    """The key file at ``path``: load, create, revoke (``walship keys``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[ApiKey]:
        """Every key in the file (revoked ones too); [] when the file does not exist.

        InvalidInput naming the file when it cannot be read or is not a key file."""
        try:
            with self.path.open("rb") as f:
                data = f.read(_FILE_BYTES_MAX + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise InvalidInput(f"cannot read key file {self.path}: {exc.strerror}") from exc
        return parse_key_file(data, str(self.path))

    def create(
        self, role: Role, tenants: frozenset[str] | None, name: str | None = None
    ) -> tuple[ApiKey, str]:
        """Add a new key; it and its full text (``wsk_…``, shown once and never stored)."""
        keys = self.load()
        taken = {k.key_id for k in keys}
        key_id = secrets.token_hex(_ID_HEX_CHARS // 2)
        while key_id in taken:
            key_id = secrets.token_hex(_ID_HEX_CHARS // 2)
        secret = secrets.token_urlsafe(_SECRET_BYTES)
        salt = secrets.token_bytes(_SALT_BYTES)
        key = ApiKey(key_id, role, tenants, salt, _digest(salt, secret), _now(), name=name)
        self._write([*keys, key])
        return key, f"{KEY_PREFIX}{key_id}_{secret}"

    def revoke(self, key_id: str) -> ApiKey:
        """Mark the key revoked (kept in the file for the record); InvalidInput when unknown."""
        keys = self.load()
        for i, key in enumerate(keys):
            if key.key_id == key_id:
                if key.revoked is not None:
                    return key
                keys[i] = _replace_revoked(key)
                self._write(keys)
                return keys[i]
        raise InvalidInput(f"no key {key_id!r} in {self.path}")

    def _write(self, keys: list[ApiKey]) -> None:
        body = {"format": FILE_FORMAT, "version": FILE_VERSION, "keys": [k.to_json() for k in keys]}
        data = (json.dumps(body, indent=2) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        # 0600 from the first byte: the file holds no secrets, but its hashes and tenant map
        # are nobody else's business
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by the umask; this is not
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)


def _replace_revoked(key: ApiKey) -> ApiKey:
    from dataclasses import replace

    return replace(key, revoked=_now())


def parse_key_file(data: bytes, where: str) -> list[ApiKey]:
    """The keys of a key file's bytes; InvalidInput naming ``where`` when malformed."""
    if len(data) > _FILE_BYTES_MAX:
        raise InvalidInput(f"{where} is larger than {_FILE_BYTES_MAX} bytes: not a key file")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"{where} is not JSON: not a walship key file") from exc
    if not isinstance(body, dict) or body.get("format") != FILE_FORMAT:
        raise InvalidInput(f"{where} is not a walship key file (format {FILE_FORMAT!r})")
    if body.get("version") != FILE_VERSION:
        raise InvalidInput(f"{where}: key file version {body.get('version')!r} is not supported")
    raw = body.get("keys")
    if not isinstance(raw, list):
        raise InvalidInput(f"{where}: 'keys' must be a list")
    keys = [ApiKey.from_json(item, f"{where} key #{i}") for i, item in enumerate(raw)]
    ids = [k.key_id for k in keys]
    if len(set(ids)) != len(ids):
        raise InvalidInput(f"{where}: a key id appears twice")
    return keys


class ApiKeyRing:
    """The keys a server accepts, as last loaded from its key file; see the module."""

    def __init__(self, path: Path, *, check_ms: int = DEFAULT_LIMITS.api_keys_check_ms) -> None:
        self.path = path
        self.check_s = check_ms / 1000
        self.reloads = 0
        self._keys: Mapping[str, ApiKey] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._load(strict=True)

    def __len__(self) -> int:
        return len(self._keys)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        # inode too: an atomic replace within one mtime tick still shows as a change
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self, *, strict: bool) -> None:
        stamp = self._file_stamp()
        try:
            if stamp is None:
                raise InvalidInput(f"key file {self.path} does not exist")
            keys = ApiKeyFile(self.path).load()
        except InvalidInput as exc:
            if strict:
                raise
            log.warning("key file not reloaded, the previous keys stay in force: %s", exc.message)
            self._stamp = stamp  # say it once per change, not at every request
            return
        self._keys = {k.key_id: k for k in keys if k.revoked is None}
        self._stamp = stamp
        self.reloads += 1
        log.info("loaded %d active API keys from %s", len(self._keys), self.path)

    def reload(self) -> None:
        """Load the file again now (SIGHUP)."""
        self._load(strict=False)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.check_s
        if self._file_stamp() != self._stamp:
            self._load(strict=False)

    def verify(self, text: str) -> Principal | None:
        """The principal of a presented key; None when it matches no active key."""
        self._maybe_reload()
        parts = split_key(text)
        if parts is None:
            return None
        key_id, secret = parts
        key = self._keys.get(key_id)
        if key is None:
            return None
        if not hmac.compare_digest(_digest(key.salt, secret), key.digest):
            return None
        return key.principal()
