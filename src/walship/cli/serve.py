"""``walship serve``: run one node behind uvicorn until SIGTERM/SIGINT, then close it cleanly.

Start-up is ordered so that a bad flag costs nothing: the fsync policy is parsed, the data dir
is checked for writing and the port is bound *before* the node opens (recovery may take a
while and may truncate a torn WAL tail). Every expected failure is one line on stderr and a
non-zero exit: 2 for bad flags and for a corrupt WAL (which names file and offset), 1 for the
rest (unwritable dir, port in use).
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from walship.cli.output import fail
from walship.errors import CorruptionError, InvalidInput, WalshipError
from walship.wal import FsyncPolicy

if TYPE_CHECKING:
    from walship.node import Node

EXIT_CORRUPTION = 2
START_LINE_MARK = "serving "
"""The start line reads ``walship NODE serving URL ...``; process.py finds the URL after it."""

_BACKLOG = 2048  # uvicorn's default
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

log = logging.getLogger("walship.serve")


def serve_command(
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir", envvar="WALSHIP_DATA_DIR", help="Where the node keeps its data."
        ),
    ] = Path("walship-data"),
    http_host: Annotated[
        str, typer.Option("--http-host", envvar="WALSHIP_HTTP_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    http_port: Annotated[
        int,
        typer.Option(
            "--http-port",
            envvar="WALSHIP_HTTP_PORT",
            min=0,
            max=65535,
            help="HTTP port; 0 picks a free one (printed in the start line).",
        ),
    ] = 3900,
    node_id: Annotated[
        str, typer.Option("--node-id", envvar="WALSHIP_NODE_ID", help="This node's name.")
    ] = "walship-1",
    fsync: Annotated[
        str,
        typer.Option(
            "--fsync",
            envvar="WALSHIP_FSYNC",
            help="WAL fsync policy: always, never or interval:MS.",
        ),
    ] = "always",
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level",
            envvar="WALSHIP_LOG_LEVEL",
            help="critical, error, warning, info or debug.",
        ),
    ] = "info",
) -> None:
    """Run a node: WAL + store + HTTP API, until SIGTERM or Ctrl-C.

    Every flag can also be set from the environment as WALSHIP_<FLAG>, e.g. WALSHIP_DATA_DIR.
    """
    try:
        policy = FsyncPolicy.parse(fsync)
    except InvalidInput as exc:
        fail(f"invalid --fsync: {exc.message}", 2)
    level = log_level.lower()
    if level not in _LOG_LEVELS:
        fail(f"invalid --log-level: must be one of {', '.join(_LOG_LEVELS)}, not {log_level!r}", 2)
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    data_dir = _prepare_data_dir(data_dir)
    sock = _bind(http_host, http_port)
    try:
        node = _open_node(data_dir, node_id, policy, http_host, sock.getsockname()[1])
    except KeyboardInterrupt:
        sock.close()
        fail("interrupted while opening the node", 130)
    except BaseException:
        sock.close()
        raise
    _run(node, sock, level)


def _prepare_data_dir(path: Path) -> Path:
    """Create the data dir if needed and prove it is writable; exit 1 with the reason if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create data dir {path}: {exc.strerror or exc}")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".walship-probe-"):
            pass
    except OSError as exc:
        fail(f"data dir {path} is not writable: {exc.strerror or exc}")
    return path.resolve()


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; exit 1 when that is impossible."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        fail(f"cannot resolve --http-host {host!r}: {exc.strerror}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # lets a restarted node take its port back while old connections sit in TIME_WAIT;
        # a port another process listens on is still refused
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # listen now: a bound socket that is not listening does not keep a second
        # `walship serve` (also using SO_REUSEADDR) off the same port
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    return sock


def _open_node(data_dir: Path, node_id: str, fsync: FsyncPolicy, host: str, port: int) -> Node:
    """Open and recover the node; exit 2 naming file and offset when the WAL is corrupt."""
    from walship.node import Node, NodeConfig

    config = NodeConfig(
        data_dir=data_dir, node_id=node_id, fsync=fsync, http_host=host, http_port=port
    )
    try:
        return Node.open(config)
    except CorruptionError as exc:
        where = ""
        file, offset = exc.details.get("file"), exc.details.get("offset")
        if file is not None and str(file) not in exc.message:
            where = f" (file {file}, offset {offset})"
        fail(
            f"cannot start: corrupt data: {exc.message}{where}. "
            f"`walship wal verify {data_dir}` shows the whole log",
            EXIT_CORRUPTION,
        )
    except InvalidInput as exc:
        fail(f"cannot start: {exc.message}", 2)
    except WalshipError as exc:
        fail(f"cannot start: {exc.message}")
    except OSError as exc:
        fail(f"cannot start: {exc}")


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _run(node: Node, sock: socket.socket, log_level: str) -> None:
    """Serve until a signal; always close the node (WAL written and fsynced) afterwards."""
    import uvicorn

    from walship.cli.uvicorn_server import NodeServer
    from walship.http.app import create_app

    host, port = sock.getsockname()[:2]

    def started() -> None:
        health = node.health()
        print(
            f"walship {node.node_id} {START_LINE_MARK}{_url(host, port)} "
            f"role={health['role']} term={health['term']} last_lsn={health['last_lsn']} "
            f"fsync={node.config.fsync} data={node.config.data_dir}",
            flush=True,
        )

    config = uvicorn.Config(
        create_app(node),
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    server = NodeServer(config, started)
    code = 0
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits 3 when the app's lifespan start-up fails
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sock.close()
        try:
            node.close()
        except Exception as exc:
            log.exception("closing the node failed")
            fail(f"closing the node failed: {exc}")
    if server.stop_signal is not None:
        log.info("stopped by %s; WAL flushed and closed", signal.Signals(server.stop_signal).name)
    if code:
        raise typer.Exit(code)
