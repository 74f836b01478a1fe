"""``walship keys create|list|revoke``: the API keys a node accepts (``--api-keys-file``).

``create`` prints the new key once, alone on stdout (``KEY=$(walship keys create ...)``); what
it is for goes to stderr. The file keeps only a salted hash of it (``apikeys.py``). A running
node picks up a change within a second, or at once on SIGHUP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from walship.apikeys import ALL_TENANTS, ApiKey, ApiKeyFile, Role, parse_tenants
from walship.cli.output import err_console, fail, say
from walship.errors import InvalidInput

app = typer.Typer(
    help="API keys for the HTTP API: create (printed once), list, revoke.",
    no_args_is_help=True,
)

KeyFile = Annotated[
    Path,
    typer.Option("--file", envvar="WALSHIP_API_KEYS_FILE", help="The key file (created if new)."),
]


@app.command("create")
def create_command(
    file: KeyFile,
    tenant: Annotated[
        list[str],
        typer.Option(
            "--tenant",
            help="A tenant the key may use (repeat, or comma-separated); '*' for every tenant.",
        ),
    ],
    role: Annotated[
        str, typer.Option("--role", help="read, write (includes read) or admin (everything).")
    ] = "read",
    name: Annotated[
        str | None, typer.Option("--name", help="A label shown by `walship keys list`.")
    ] = None,
) -> None:
    """Create a key and print it once on stdout; only its hash is stored."""
    try:
        parsed_role = Role.parse(role)
        tenants = parse_tenants(tenant)
        key, text = ApiKeyFile(file).create(parsed_role, tenants, name)
    except InvalidInput as exc:
        fail(exc.message, 2)
    except OSError as exc:
        fail(f"cannot write key file {file}: {exc.strerror or exc}")
    typer.echo(text)
    err_console.print(
        f"created key {key.key_id} (role {key.role}, tenants {_tenants(key)}) in {file}; "
        "it is shown only now",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )


def _tenants(key: ApiKey) -> str:
    return ALL_TENANTS if key.tenants is None else ",".join(sorted(key.tenants))


def _load(file: Path) -> list[ApiKey]:
    if not file.is_file():
        fail(f"no key file {file}", 2)
    try:
        return ApiKeyFile(file).load()
    except InvalidInput as exc:
        fail(exc.message, 2)


@app.command("list")
def list_command(
    file: KeyFile,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per key.")] = False,
) -> None:
    """List the keys (ids, roles, tenants; never a secret or hash)."""
    for key in _load(file):
        status = f"revoked {key.revoked}" if key.revoked else "active"
        if as_json:
            doc = {
                "id": key.key_id,
                "role": str(key.role),
                "tenants": _tenants(key).split(","),
                "created": key.created,
                "revoked": key.revoked,
                "name": key.name,
            }
            typer.echo(json.dumps(doc))
        else:
            label = f"  {key.name}" if key.name else ""
            say(f"{key.key_id}  {key.role!s:<5}  {_tenants(key):<20}  {status}{label}")


@app.command("revoke")
def revoke_command(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `walship keys list`).")],
    file: KeyFile,
) -> None:
    """Revoke a key: nodes refuse it once they see the file change (or get SIGHUP)."""
    _load(file)
    try:
        key = ApiKeyFile(file).revoke(key_id)
    except InvalidInput as exc:
        fail(exc.message, 2)
    except OSError as exc:
        fail(f"cannot write key file {file}: {exc.strerror or exc}")
    say(f"revoked key {key.key_id} (role {key.role}, tenants {_tenants(key)})")
