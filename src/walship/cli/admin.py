"""``walship promote``, ``walship repoint`` and ``walship failover``: change who leads;
``walship forget-follower``: release the WAL a departed follower's slot keeps.

All of them call the nodes' admin endpoints with the admin token (``--admin-token-file`` or
``$WALSHIP_ADMIN_TOKEN``) and print what was done, one line per change. ``failover`` reads
every node's ``/health``, promotes the most caught-up reachable follower by ``(term, lsn)``
of its last record, and repoints every other reachable node to it; it exits non-zero, saying
why, when there is no candidate or the promotion is refused -- among others when the
candidate cannot prove it holds every write answered ``replicated`` (a member of the last
in-sync set is unreachable), unless ``--unclean``, which then says what may be lost.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from walship.admin_client import AdminAccess, AdminError, admin_call
from walship.admin_token import ADMIN_TOKEN_ENV, load_admin_token
from walship.cli.connect import (
    AllowInsecureAdmin,
    ApiKeyFile,
    CaFile,
    ClientCert,
    ClientKey,
    read_api_key,
    tls_verify,
)
from walship.cli.output import fail, say, warn
from walship.errors import InvalidInput
from walship.peers import PeerView, fetch_views, split_urls

TokenFile = Annotated[
    Path | None,
    typer.Option(
        "--admin-token-file",
        envvar="WALSHIP_ADMIN_TOKEN_FILE",
        help=f"File holding the admin token (else ${ADMIN_TOKEN_ENV}).",
    ),
]


UncleanFlag = Annotated[
    bool,
    typer.Option(
        "--unclean",
        help="Promote although the candidate cannot prove it holds every write answered "
        "replicated (a member of the last in-sync set is unreachable): what only that member "
        "holds is lost. The command says what.",
    ),
]


def _token(path: Path | None, api_key_file: Path | None = None) -> str:
    """The admin credential: the admin token (file or environment), else an admin API key."""
    if api_key_file is not None:
        if path is not None:
            fail("give --admin-token-file or --api-key-file, not both", 2)
        return read_api_key(api_key_file)
    try:
        token = load_admin_token(path)
    except InvalidInput as exc:
        fail(exc.message, 2)
    if token is None:
        fail(
            f"no admin token: pass --admin-token-file or set {ADMIN_TOKEN_ENV} (or "
            "--api-key-file with an admin key)",
            2,
        )
    return token


def admin_access(
    token_file: Path | None,
    api_key_file: Path | None,
    ca_file: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    allow_insecure: bool,
) -> AdminAccess:
    """The admin options of a command, checked (exit 2 when wrong)."""
    return AdminAccess(
        _token(token_file, api_key_file),
        tls_verify(ca_file, client_cert, client_key),
        allow_insecure,
    )


def promote_command(
    url: Annotated[str, typer.Argument(help="HTTP URL of the follower to promote.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Promote even if it is behind, or its leader is alive."),
    ] = False,
    peers: Annotated[
        str | None,
        typer.Option("--peers", help="URLs of the other nodes to compare with (comma-separated)."),
    ] = None,
    unclean: UncleanFlag = False,
    admin_token_file: TokenFile = None,
    api_key_file: ApiKeyFile = None,
    ca_file: CaFile = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    allow_insecure_admin: AllowInsecureAdmin = False,
) -> None:
    """Promote a follower to leader of a new term."""
    access = admin_access(
        admin_token_file, api_key_file, ca_file, client_cert, client_key, allow_insecure_admin
    )
    params = {"force": "true" if force else "false", "unclean": "true" if unclean else "false"}
    if peers:
        params["peers"] = ",".join(split_urls(peers))
    try:
        answer = admin_call(url, "/internal/promote", access, **params)
    except AdminError as exc:
        fail(f"promote refused: {exc}")
    if not answer.get("changed", True):
        say(f"{answer['node_id']} already leads term {answer['term']}")
        return
    if answer.get("unclean"):
        warn(str(answer["unclean"]))
    say(
        f"promoted {answer['node_id']} to leader of term {answer['term']} from lsn "
        f"{answer['first_lsn']}; followers connect to {answer['replication_address']}"
    )


def repoint_command(
    url: Annotated[str, typer.Argument(help="HTTP URL of the node to repoint.")],
    leader: Annotated[
        str, typer.Option("--leader", help="The new leader's replication HOST:PORT.")
    ],
    admin_token_file: TokenFile = None,
    api_key_file: ApiKeyFile = None,
    ca_file: CaFile = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    allow_insecure_admin: AllowInsecureAdmin = False,
) -> None:
    """Make a node follow another leader (a leader is demoted; its unreplicated tail goes to
    lost-and-found)."""
    access = admin_access(
        admin_token_file, api_key_file, ca_file, client_cert, client_key, allow_insecure_admin
    )
    try:
        answer = admin_call(url, "/internal/repoint", access, leader=leader)
    except AdminError as exc:
        fail(f"repoint failed: {exc}")
    say(f"{answer['node_id']} ({answer['was']}) now follows {leader}")


def forget_follower_command(
    url: Annotated[str, typer.Argument(help="HTTP URL of the leader.")],
    node_id: Annotated[str, typer.Argument(help="The departed follower's node id.")],
    admin_token_file: TokenFile = None,
    api_key_file: ApiKeyFile = None,
    ca_file: CaFile = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    allow_insecure_admin: AllowInsecureAdmin = False,
) -> None:
    """Forget a follower that is gone for good, releasing the WAL its slot kept."""
    access = admin_access(
        admin_token_file, api_key_file, ca_file, client_cert, client_key, allow_insecure_admin
    )
    try:
        answer = admin_call(url, "/internal/forget-follower", access, node_id=node_id)
    except AdminError as exc:
        fail(f"forget-follower refused: {exc}")
    say(
        f"{answer['node_id']} forgot follower {answer['forgotten']} (its slot held WAL from "
        f"lsn {answer['slot_lsn'] + 1}, released at the next checkpoint)"
    )


def _position(view: PeerView) -> str:
    term, lsn = view.position
    return f"{term}/{lsn}"


def failover_command(
    nodes: Annotated[
        str,
        typer.Option("--nodes", help="HTTP URLs of every node of the cluster, comma-separated."),
    ],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Go on although a leader still answers (it is demoted too) or the candidate "
            "is still connected to it.",
        ),
    ] = False,
    unclean: UncleanFlag = False,
    admin_token_file: TokenFile = None,
    api_key_file: ApiKeyFile = None,
    ca_file: CaFile = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    allow_insecure_admin: AllowInsecureAdmin = False,
) -> None:
    """Promote the most caught-up reachable follower and repoint every other node to it."""
    access = admin_access(
        admin_token_file, api_key_file, ca_file, client_cert, client_key, allow_insecure_admin
    )
    urls = split_urls(nodes)
    if not urls:
        fail("--nodes needs at least one URL", 2)
    for url in urls:  # before anything is asked: refuse the whole run, not half of it
        try:
            access.check_url(url)
        except InvalidInput as exc:
            fail(exc.message, 2)
    views = asyncio.run(fetch_views(urls, verify=access.verify))
    for view in views:
        if view.answered:
            extra = f", fenced: {view.fenced}" if view.fenced else ""
            say(f"  {view.node_id:<12} {view.url}  {view.role} at {_position(view)}{extra}")
        else:
            say(f"  {'?':<12} {view.url}  unreachable ({view.error})")
    live = [v for v in views if v.answered and v.role == "leader" and v.fenced is None]
    if live and not force:
        names = ", ".join(f"{v.node_id} ({v.url})" for v in live)
        fail(
            f"a leader still answers: {names}. Failover is for a dead leader; use --force to "
            "demote it too (its writes nobody else has go to lost-and-found)"
        )
    followers = [v for v in views if v.answered and v.role == "follower"]
    if not followers:
        fail("no reachable follower to promote")
    best = max(followers, key=lambda v: v.position)  # the first given wins a tie
    say(f"promoting {best.node_id} ({best.url}) at {_position(best)}")
    others = [v.url for v in views if v.url != best.url]
    params = {
        "force": "true" if force else "false",
        "unclean": "true" if unclean else "false",
        "peers": ",".join(others),
    }
    try:
        answer = admin_call(best.url, "/internal/promote", access, **params)
    except AdminError as exc:
        fail(f"promotion refused, nothing changed: {exc}")
    if answer.get("unclean"):
        warn(str(answer["unclean"]))
    address = answer.get("replication_address")
    say(
        f"promoted {answer['node_id']} to leader of term {answer['term']} from lsn "
        f"{answer.get('first_lsn')}; followers connect to {address}"
    )
    if not address:
        fail("the new leader does not listen for followers (no replication secret?)")
    failed = 0
    for view in views:
        if view.url == best.url:
            continue
        if not view.answered:
            warn(
                f"{view.url} is unreachable: when it is back, run "
                f"`walship repoint {view.url} --leader {address}`"
            )
            continue
        try:
            answer = admin_call(view.url, "/internal/repoint", access, leader=str(address))
        except AdminError as exc:
            warn(f"repoint of {view.node_id} failed: {exc}")
            failed += 1
            continue
        say(f"repointed {answer['node_id']} ({answer['was']}) to {address}")
    if failed:
        raise typer.Exit(1)
