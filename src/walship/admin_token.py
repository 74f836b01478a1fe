"""The admin token: read from a file, else from ``$WALSHIP_ADMIN_TOKEN``.

One loader for both ends: ``walship serve`` reads the token its ``/internal/*`` routes check,
and the admin commands (``promote``, ``repoint``, ``failover``, ...) read the one they send.
"""

from __future__ import annotations

import os
from pathlib import Path

from walship.errors import InvalidInput

ADMIN_TOKEN_ENV = "WALSHIP_ADMIN_TOKEN"  # noqa: S105 (a variable name)


def load_admin_token(
    path: Path | None, environ: dict[str, str] | os._Environ[str] | None = None
) -> str | None:
    """The admin token from the file at ``path``, else from ``$WALSHIP_ADMIN_TOKEN``; None
    when neither is set. InvalidInput for an unreadable file or an empty token."""
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise InvalidInput(f"cannot read admin token file {path}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"cannot read admin token file {path}: not UTF-8 text ({exc.reason} at byte "
                f"{exc.start})"
            ) from exc
        source = f"file {path}"
    else:
        value = (os.environ if environ is None else environ).get(ADMIN_TOKEN_ENV)
        if value is None:
            return None
        token, source = value.strip(), ADMIN_TOKEN_ENV
    if not token:
        raise InvalidInput(f"the admin token from {source} is empty")
    return token
