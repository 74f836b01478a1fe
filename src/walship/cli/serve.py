"""``walship serve``: run one node behind uvicorn until SIGTERM/SIGINT, then close it cleanly.

Start-up is ordered so that a bad flag costs nothing: the fsync policy is parsed, the data dir
is checked for writing and the port is bound *before* the node opens (recovery may take a
while and may truncate a torn WAL tail). Every expected failure is one line on stderr and a
non-zero exit: 2 for bad flags and for a corrupt WAL (which names file and offset), 1 for the
rest (unwritable dir, port in use).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import signal
import socket
import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from walship.admin_token import ADMIN_TOKEN_ENV, load_admin_token
from walship.advertise import AdvertisedAddress, AdvertisedUrl, advertised_host, bracket
from walship.cli.config import CONFIG_ENV, EXIT_BAD_CONFIG, load_config, settings_of
from walship.cli.output import fail, say, warn
from walship.cli.serve_security import (
    AllowUnauthenticatedFlag,
    ApiKeysFileFlag,
    AuthFlag,
    ConcurrentFlag,
    HttpTls,
    HttpTlsCaFlag,
    HttpTlsCertFlag,
    HttpTlsClientCaFlag,
    HttpTlsKeyFlag,
    JwtAudienceFlag,
    JwtFlags,
    JwtIssuerFlag,
    JwtKeyFileFlag,
    MetricsAuthFlag,
    MetricsListenFlag,
    RateBurstFlag,
    RateLimitFlag,
    auth_settings,
    http_tls,
    metrics_address,
    peer_verify,
    reload_keys_on_sighup,
    unauthenticated_refusal,
)
from walship.dirlock import DataDirLock
from walship.errors import CorruptionError, InvalidInput, WalshipError
from walship.limits import DEFAULT_LIMITS, Limits
from walship.peers import split_urls
from walship.runtime import settle, tune_process
from walship.testing.process import START_LINE_MARK
from walship.wal import FsyncPolicy

if TYPE_CHECKING:
    from walship.http.auth import AuthSettings
    from walship.node import Node
    from walship.replication.config import ReplicationConfig

EXIT_CORRUPTION = 2

_BACKLOG = 2048  # uvicorn's default
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

log = logging.getLogger("walship.serve")


def serve_command(
    ctx: typer.Context,
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
    role: Annotated[
        str, typer.Option("--role", envvar="WALSHIP_ROLE", help="leader or follower.")
    ] = "leader",
    leader: Annotated[
        str | None,
        typer.Option(
            "--leader",
            envvar="WALSHIP_LEADER",
            help="Follower: the leader's replication address HOST:PORT.",
        ),
    ] = None,
    replication_host: Annotated[
        str | None,
        typer.Option(
            "--replication-host",
            envvar="WALSHIP_REPLICATION_HOST",
            help="Address of the replication listener of a leader, or of a follower once "
            "promoted (default: --http-host).",
        ),
    ] = None,
    advertise_http_url: Annotated[
        str | None,
        typer.Option(
            "--advertise-http-url",
            envvar="WALSHIP_ADVERTISE_HTTP_URL",
            help="The URL other nodes and clients reach this node at, http://HOST[:PORT] "
            "(default: --http-host, or the machine's host name when that is a wildcard; the "
            "port defaults to the listening one).",
        ),
    ] = None,
    advertise_replication_address: Annotated[
        str | None,
        typer.Option(
            "--advertise-replication-address",
            envvar="WALSHIP_ADVERTISE_REPLICATION_ADDRESS",
            help="HOST[:PORT] followers reach this node's replication listener at (default: "
            "--replication-host, else the host of --advertise-http-url, else the machine's "
            "host name; the port defaults to the listening one).",
        ),
    ] = None,
    replication_port: Annotated[
        int,
        typer.Option(
            "--replication-port",
            envvar="WALSHIP_REPLICATION_PORT",
            min=0,
            max=65535,
            help="Replication listener port of a leader, or of a follower once promoted; 0 "
            "picks a free one.",
        ),
    ] = 3910,
    replication_secret_file: Annotated[
        Path | None,
        typer.Option(
            "--replication-secret-file",
            envvar="WALSHIP_REPLICATION_SECRET_FILE",
            help="Shared secret for replication (else $WALSHIP_REPLICATION_SECRET). Without "
            "one a leader does not listen for followers.",
        ),
    ] = None,
    cluster_id: Annotated[
        str,
        typer.Option("--cluster-id", envvar="WALSHIP_CLUSTER_ID", help="Cluster name."),
    ] = "walship",
    ack_mode: Annotated[
        str,
        typer.Option(
            "--ack-mode",
            envvar="WALSHIP_ACK_MODE",
            help="What a write waits for: async, semi-sync, quorum:N or sync.",
        ),
    ] = "async",
    ack_timeout_ms: Annotated[
        int,
        typer.Option("--ack-timeout-ms", envvar="WALSHIP_ACK_TIMEOUT_MS", min=1),
    ] = 5_000,
    on_ack_timeout: Annotated[
        str,
        typer.Option(
            "--on-ack-timeout",
            envvar="WALSHIP_ON_ACK_TIMEOUT",
            help="degrade (answer `degraded`, record it) or fail (answer 503).",
        ),
    ] = "degrade",
    max_lag_ms: Annotated[
        int,
        typer.Option(
            "--max-lag-ms",
            envvar="WALSHIP_MAX_LAG_MS",
            min=1,
            help="A follower further behind than this leaves the in-sync set.",
        ),
    ] = 5_000,
    max_replication_lag_ms: Annotated[
        int,
        typer.Option(
            "--max-replication-lag-ms",
            envvar="WALSHIP_MAX_REPLICATION_LAG_MS",
            min=0,
            help="Recovery-point budget: slow writes down (never fail them) so that in-sync "
            "followers lag less than this; below --max-lag-ms. 0: off.",
        ),
    ] = 0,
    min_in_sync: Annotated[
        int,
        typer.Option(
            "--min-in-sync",
            envvar="WALSHIP_MIN_IN_SYNC",
            min=0,
            help="Fewer in-sync followers than this: waiting writes degrade or fail at once.",
        ),
    ] = 1,
    wal_retention_bytes_max: Annotated[
        int,
        typer.Option(
            "--wal-retention-bytes-max",
            envvar="WALSHIP_WAL_RETENTION_BYTES_MAX",
            min=0,
            help="WAL kept for a lagging follower, at most; past it the follower needs a snapshot.",
        ),
    ] = 1 << 30,
    serve_snapshots: Annotated[
        bool,
        typer.Option(
            "--serve-snapshots",
            envvar="WALSHIP_SERVE_SNAPSHOTS",
            help="While a follower: serve snapshots to other followers on --replication-port "
            "while caught up, so the leader need not (the leader redirects followers here).",
        ),
    ] = False,
    catch_up_from: Annotated[
        str | None,
        typer.Option(
            "--catch-up-from",
            envvar="WALSHIP_CATCH_UP_FROM",
            help="Follower: when a snapshot is needed, fetch it from the follower serving "
            "snapshots at this replication HOST:PORT first (the leader still vouches for it; "
            "falls back to the leader).",
        ),
    ] = None,
    segment_bytes_max: Annotated[
        int,
        typer.Option(
            "--segment-bytes-max",
            envvar="WALSHIP_SEGMENT_BYTES_MAX",
            min=4096,
            help="WAL segment size at which a new segment starts.",
        ),
    ] = DEFAULT_LIMITS.segment_bytes_max,
    memtable_events_max: Annotated[
        int,
        typer.Option(
            "--memtable-events-max",
            envvar="WALSHIP_MEMTABLE_EVENTS_MAX",
            min=1,
            help="Events held in memory before a checkpoint to Parquet.",
        ),
    ] = DEFAULT_LIMITS.memtable_events_max,
    checkpoint_interval_ms: Annotated[
        int,
        typer.Option(
            "--checkpoint-interval-ms",
            envvar="WALSHIP_CHECKPOINT_INTERVAL_MS",
            min=1,
            help="Checkpoint recent events at least this often.",
        ),
    ] = DEFAULT_LIMITS.checkpoint_interval_ms,
    compaction_fanin_min: Annotated[
        int,
        typer.Option(
            "--compaction-fanin-min",
            envvar="WALSHIP_COMPACTION_FANIN_MIN",
            min=2,
            help="Parquet parts of one size class merged together; more parts per query, "
            "fewer rewrites of each event.",
        ),
    ] = DEFAULT_LIMITS.compaction_fanin_min,
    part_worker: Annotated[
        bool,
        typer.Option(
            "--part-worker/--no-part-worker",
            envvar="WALSHIP_PART_WORKER",
            help="Write checkpoint and merged Parquet parts in worker processes (merges at "
            "lower priority), off the GIL of the process that serves and replicates; "
            "--no-part-worker keeps them in this process (~400 MB less memory).",
        ),
    ] = True,
    physical_followers: Annotated[
        bool,
        typer.Option(
            "--physical-followers/--no-physical-followers",
            envvar="WALSHIP_PHYSICAL_FOLLOWERS",
            help="A leader ships its Parquet parts to followers, which install them verified "
            "instead of encoding their own (replication protocol v2; a follower of a leader "
            "that does not speak it follows with v1 and checkpoints itself). Off by default: "
            "under sustained load followers fall back to their own checkpoints and do not "
            "merge them.",
        ),
    ] = False,
    ship_before_fsync: Annotated[
        bool,
        typer.Option(
            "--ship-before-fsync/--no-ship-before-fsync",
            envvar="WALSHIP_SHIP_BEFORE_FSYNC",
            help="A leader ships records to followers as soon as they are in its WAL file, "
            "while its own fsync runs (as Raft does), to followers that bound their reads by "
            "the leader's durable lsn (protocol v3); acknowledgements still wait for its fsync.",
        ),
    ] = True,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", envvar="WALSHIP_TLS_CERT", help="TLS certificate (PEM)."),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option("--tls-key", envvar="WALSHIP_TLS_KEY", help="TLS private key (PEM)."),
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            envvar="WALSHIP_TLS_CA",
            help="CA that signed the peer's certificate (leader: for client certificates).",
        ),
    ] = None,
    tls_require_client_cert: Annotated[
        bool,
        typer.Option(
            "--tls-require-client-cert",
            envvar="WALSHIP_TLS_REQUIRE_CLIENT_CERT",
            help="Leader: refuse followers without a certificate signed by --tls-ca.",
        ),
    ] = False,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            "--admin-token-file",
            envvar="WALSHIP_ADMIN_TOKEN_FILE",
            help=f"File holding the admin token for /internal/* (else ${ADMIN_TOKEN_ENV}). "
            "Without one, admin endpoints answer 401.",
        ),
    ] = None,
    api_keys_file: ApiKeysFileFlag = None,
    auth: AuthFlag = None,
    allow_unauthenticated: AllowUnauthenticatedFlag = False,
    jwt_key_file: JwtKeyFileFlag = None,
    jwt_audience: JwtAudienceFlag = None,
    jwt_issuer: JwtIssuerFlag = None,
    rate_limit_per_key: RateLimitFlag = 0.0,
    rate_burst_per_key: RateBurstFlag = 0,
    concurrent_per_key: ConcurrentFlag = 0,
    metrics_auth: MetricsAuthFlag = "admin",
    metrics_listen: MetricsListenFlag = None,
    http_tls_cert: HttpTlsCertFlag = None,
    http_tls_key: HttpTlsKeyFlag = None,
    http_tls_client_ca: HttpTlsClientCaFlag = None,
    http_tls_ca: HttpTlsCaFlag = None,
    peers: Annotated[
        str | None,
        typer.Option(
            "--peers",
            envvar="WALSHIP_PEERS",
            help="HTTP URLs of the other nodes, comma-separated: a promotion asks them first "
            "and refuses when one is further ahead; a leader asks them (and the followers it "
            "knows) before it takes writes after a start, and follows a newer leader.",
        ),
    ] = None,
    etcd: Annotated[
        str | None,
        typer.Option(
            "--etcd",
            envvar="WALSHIP_ETCD",
            help="Automatic failover: etcd endpoint URLs, comma-separated (needs --cluster).",
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster", envvar="WALSHIP_CLUSTER", help="Automatic failover: the cluster's name."
        ),
    ] = None,
    etcd_ttl_s: Annotated[
        int,
        typer.Option(
            "--etcd-ttl-s",
            envvar="WALSHIP_ETCD_TTL_S",
            min=2,
            max=600,
            help="The leader lease's TTL: a dead leader is replaced after about this long.",
        ),
    ] = 5,
    etcd_settle_ms: Annotated[
        int,
        typer.Option(
            "--etcd-settle-ms",
            envvar="WALSHIP_ETCD_SETTLE_MS",
            min=0,
            help="How long candidates wait for each other before the best one takes the lead.",
        ),
    ] = 1_000,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar=CONFIG_ENV,
            is_eager=True,
            callback=apply_config_file,
            help="TOML file of settings, each key a flag's name without -- (flags and "
            "environment variables override it).",
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Check the settings and the files they name, print them and exit 0, "
            "without creating or opening anything.",
        ),
    ] = False,
    unclean_election: Annotated[
        bool,
        typer.Option(
            "--unclean-election",
            envvar="WALSHIP_UNCLEAN_ELECTION",
            help="Automatic failover: let this node be elected although it cannot prove it "
            "holds every write answered replicated (a member of the last in-sync set is "
            "down); what only that member holds is lost. Off: the election waits for it.",
        ),
    ] = False,
) -> None:
    """Run a node: WAL + store + HTTP API, until SIGTERM or Ctrl-C.

    Every flag can also be set from the environment as WALSHIP_<FLAG>, e.g. WALSHIP_DATA_DIR,
    or in the --config file; a flag wins over the environment, which wins over the file.
    """
    try:
        policy = FsyncPolicy.parse(fsync)
    except InvalidInput as exc:
        fail(f"invalid --fsync: {exc.message}", 2)
    level = log_level.lower()
    if level not in _LOG_LEVELS:
        fail(f"invalid --log-level: must be one of {', '.join(_LOG_LEVELS)}, not {log_level!r}", 2)
    configure_logging(level)
    try:
        replication = replication_config(
            role=role,
            leader=leader,
            host=replication_host or http_host,
            port=replication_port,
            secret_file=replication_secret_file,
            cluster_id=cluster_id,
            ack_mode=ack_mode,
            ack_timeout_ms=ack_timeout_ms,
            on_ack_timeout=on_ack_timeout,
            max_lag_ms=max_lag_ms,
            min_in_sync=min_in_sync,
            wal_retention_bytes_max=wal_retention_bytes_max,
            max_replication_lag_ms=max_replication_lag_ms,
            tls=(tls_cert, tls_key, tls_ca, tls_require_client_cert),
            serve_snapshots=serve_snapshots,
            catch_up_from=catch_up_from,
            physical_followers=physical_followers,
            ship_before_fsync=ship_before_fsync,
        )
    except InvalidInput as exc:
        fail(f"invalid replication flags: {exc.message}", 2)
    try:
        limits = dataclasses.replace(
            DEFAULT_LIMITS,
            segment_bytes_max=segment_bytes_max,
            memtable_events_max=memtable_events_max,
            checkpoint_interval_ms=checkpoint_interval_ms,
            compaction_fanin_min=compaction_fanin_min,
        )
    except InvalidInput as exc:
        fail(f"invalid limits: {exc.message}", 2)
    try:
        admin_token = load_admin_token(admin_token_file)
    except InvalidInput as exc:
        fail(f"invalid admin token: {exc.message}", 2)
    try:
        auth_mode = auth_settings(
            auth,
            api_keys_file,
            admin_token,
            JwtFlags(
                jwt_key_file,
                jwt_audience,
                jwt_issuer,
                rate_limit_per_key,
                rate_burst_per_key,
                concurrent_per_key,
                metrics_auth,
            ),
        )
        tls = http_tls(http_tls_cert, http_tls_key, http_tls_client_ca)
        peers_verify = peer_verify(tls, http_tls_ca)
    except InvalidInput as exc:
        fail(exc.message, 2)
    if not auth_mode.required:
        refusal = unauthenticated_refusal(http_host, http_port, allow_unauthenticated)
        if refusal is not None:
            fail(refusal, 2)
    metrics_at = None
    if metrics_listen:
        try:
            metrics_at = metrics_address(metrics_listen)
        except InvalidInput as exc:
            fail(exc.message, 2)
    if (etcd is None) != (cluster is None):
        fail("automatic failover needs both --etcd and --cluster", 2)
    try:
        adv_url = None if not advertise_http_url else AdvertisedUrl.parse(advertise_http_url)
        adv_repl = (
            None
            if not advertise_replication_address
            else AdvertisedAddress.parse(advertise_replication_address)
        )
    except InvalidInput as exc:
        fail(f"invalid advertised address: {exc.message}", 2)
    if check:
        say(
            f"walship: settings OK: node {node_id}, data {data_dir}, "
            f"http{'s' if tls else ''} {http_host}:{http_port}, role {role}, "
            f"{_replication_summary(replication)}, fsync {policy}, "
            f"admin token {'set' if admin_token else 'not set'}, "
            f"auth {_auth_summary(auth_mode)}"
            + (f", metrics listener {metrics_listen}" if metrics_at else "")
            + (f", etcd cluster {cluster}" if cluster else "")
        )
        return
    data_dir = _prepare_data_dir(data_dir)
    dir_lock = _lock_data_dir(data_dir)  # before binding: a second server says why it stops
    try:
        sock = _bind(http_host, http_port)
    except BaseException:
        dir_lock.release()
        raise
    metrics_sock = None
    if metrics_at is not None:
        try:
            metrics_sock = _listen(*metrics_at, "--metrics-listen", " for metrics")
        except _BindError as exc:
            sock.close()
            dir_lock.release()
            fail(exc.message)
    try:
        replication = _advertise(
            replication,
            http_host,
            sock.getsockname()[1],
            adv_url,
            adv_repl,
            etcd is not None,
            https=tls is not None,
        )
    except InvalidInput as exc:
        sock.close()
        dir_lock.release()
        fail(f"cannot start: {exc.message}")
    try:
        node = _open_node(
            data_dir,
            node_id,
            policy,
            http_host,
            sock.getsockname()[1],
            role,
            replication,
            limits,
            admin_token=admin_token,
            peers=tuple(split_urls(peers)),
            peer_verify=peers_verify,
            dir_lock=dir_lock,
            ack_pinned=any(_given(ctx, name) for name in ACK_FLAGS),
            part_worker=part_worker,
        )
    except KeyboardInterrupt:
        sock.close()
        fail("interrupted while opening the node", 130)
    except BaseException:
        sock.close()
        raise
    _bind_replication(node, sock)
    if etcd is not None and cluster is not None:
        _attach_election(
            node, etcd, cluster, etcd_ttl_s, etcd_settle_ms, sock, tls, unclean=unclean_election
        )
    _run(node, sock, level, auth_mode, tls, metrics_sock)


QUIET_LOGGERS = ("httpx", "httpcore")
"""Libraries that log every request at info: the etcd client polls and renews a few times a
second (an idle follower logged ~5 lines a second). They speak at ``debug`` only."""


def configure_logging(level: str) -> None:
    """Log lines on stderr at ``level`` and above; info lines say what changed, not what
    happens on every tick, so the chatty libraries are held to warnings unless debugging."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if level != "debug":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def apply_config_file(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--config``'s callback (eager, so it runs before the other options are read): the
    file's settings become click's ``default_map``, which flags and environment override."""
    if value is None:
        return None
    try:
        settings = load_config(value, settings_of(serve_command))
    except InvalidInput as exc:
        fail(exc.message, EXIT_BAD_CONFIG)
    ctx.default_map = {**(ctx.default_map or {}), **settings}
    return value


def _auth_summary(settings: AuthSettings) -> str:
    keys = f" with {len(settings.keys)} API keys" if settings.keys is not None else ""
    tokens = " and JWT" if settings.jwt is not None else ""
    return ("required" if settings.required else "none") + keys + tokens


def _replication_summary(replication: ReplicationConfig) -> str:
    if replication.leader is not None:
        serves = ", serves snapshots" if replication.serve_snapshots else ""
        return f"follows {replication.leader}{serves}"
    if replication.secret is None:
        return "replication off (no secret)"
    return f"replication {replication.host}:{replication.port} ack {replication.ack_mode}"


ACK_FLAGS = ("ack_mode", "ack_timeout_ms", "on_ack_timeout", "min_in_sync", "max_lag_ms")
"""The cluster's write guarantee: given on purpose, they win over what a leader said."""


def _given(ctx: typer.Context, name: str) -> bool:
    """True when the flag ``name`` was set (command line, environment), not defaulted."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def _advertise(
    replication: ReplicationConfig,
    http_host: str,
    http_port: int,
    adv_url: AdvertisedUrl | None,
    adv_repl: AdvertisedAddress | None,
    elected: bool,
    *,
    https: bool = False,
) -> ReplicationConfig:
    """``replication`` with the addresses this node publishes (``advertise.py``).

    A node that replicates (it has the secret) or is elected must publish usable addresses:
    InvalidInput when a wildcard bind leaves none. A standalone node bound to a wildcard
    without a usable name publishes no URL.
    """
    url_host, repl_host = (
        None if adv_url is None else adv_url.host,
        None if adv_repl is None else adv_repl.host,
    )
    needed = replication.secret is not None or elected
    try:
        host = advertised_host(http_host, url_host, repl_host, "--http-host")
    except InvalidInput:
        if needed:
            raise
        return replication
    scheme = ("https" if https else "http") if adv_url is None else adv_url.scheme
    port = http_port if adv_url is None or adv_url.port is None else adv_url.port
    url = f"{scheme}://{bracket(host)}:{port}"
    if replication.secret is None:
        return dataclasses.replace(replication, http_url=url)
    return dataclasses.replace(
        replication,
        http_url=url,
        advertise_host=advertised_host(replication.host, repl_host, url_host, "--replication-host"),
        advertise_port=None if adv_repl is None else adv_repl.port,
    )


def _attach_election(
    node: Node,
    endpoints: str,
    cluster: str,
    ttl_s: int,
    settle_ms: int,
    sock: socket.socket,
    tls: HttpTls | None,
    *,
    unclean: bool = False,
) -> None:
    from walship.election import EtcdElection
    from walship.etcd import EtcdClient

    host, port = sock.getsockname()[:2]
    election = EtcdElection(
        node,
        EtcdClient(endpoints.split(",")),
        cluster,
        ttl_s=ttl_s,
        settle_s=settle_ms / 1000,
        url=node.replication.http_url or _url(host, port, tls is not None),
        unclean=unclean,
    )
    node.coordinator = election
    node.write_gate = election.write_block


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


def _lock_data_dir(path: Path) -> DataDirLock:
    """Take the data dir's lock for this server; exit 1 naming the holder's pid if it is held."""
    try:
        return DataDirLock.acquire(path)
    except WalshipError as exc:
        fail(f"cannot start: {exc.message}")


def _bind_replication(node: Node, http_sock: socket.socket) -> None:
    """Bind a leader's replication listener (or a follower's that serves snapshots) now, so
    that a port in use or a host that does
    not resolve is a one-line start-up error (exit 1) rather than a failure inside the
    server's start-up; on failure the node is closed first (its WAL flushed)."""
    leader, server = node.leader, node.snapshot_server
    if leader is None and server is None:
        return  # a follower listens only once promoted or to serve snapshots
    config = node.replication
    if config.secret is None:
        return  # without a secret nobody connects
    host, port = config.host, config.port
    try:
        sock = _listen(host, port, "--replication-host", " for replication")
        if leader is not None:
            leader.adopt_listener(sock)
        elif server is not None:
            server.adopt_listener(sock)
    except _BindError as exc:
        http_sock.close()
        node.close()
        fail(exc.message)


class _BindError(WalshipError):
    """A listening socket could not be had (the message says why)."""


def _bind(host: str, port: int) -> socket.socket:
    """The HTTP listening socket on ``host:port``; exit 1 when that is impossible."""
    try:
        return _listen(host, port, "--http-host", "")
    except _BindError as exc:
        fail(exc.message)


def _listen(host: str, port: int, flag: str, purpose: str) -> socket.socket:
    """A listening socket on ``host:port``; _BindError saying why when that is impossible."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise _BindError(f"cannot resolve {flag} {host!r}: {exc.strerror}") from exc
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
        raise _BindError(f"cannot listen{purpose} on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def replication_config(
    *,
    role: str,
    leader: str | None,
    host: str,
    port: int,
    secret_file: Path | None,
    cluster_id: str,
    ack_mode: str,
    ack_timeout_ms: int,
    on_ack_timeout: str,
    max_lag_ms: int,
    min_in_sync: int,
    wal_retention_bytes_max: int,
    tls: tuple[Path | None, Path | None, Path | None, bool],
    serve_snapshots: bool = False,
    catch_up_from: str | None = None,
    max_replication_lag_ms: int = 0,
    physical_followers: bool = False,
    ship_before_fsync: bool = True,
) -> ReplicationConfig:
    """Check the replication flags together; InvalidInput naming the first bad one."""
    from walship.replication.acks import AckMode
    from walship.replication.config import (
        ReplicationConfig,
        client_ssl_context,
        parse_address,
        server_ssl_context,
    )
    from walship.replication.protocol import SECRET_ENV, load_secret

    if role not in ("leader", "follower"):
        raise InvalidInput(f"--role must be leader or follower, not {role!r}")
    if max_replication_lag_ms >= max_lag_ms:
        # a follower that far behind has left the in-sync set: the budget would hold nothing
        raise InvalidInput(
            f"--max-replication-lag-ms {max_replication_lag_ms} must be below --max-lag-ms "
            f"{max_lag_ms} (a follower further behind leaves the in-sync set and is not held "
            "to the budget)"
        )
    if role == "follower":
        if not leader:
            raise InvalidInput("a follower needs --leader HOST:PORT")
        parse_address(leader, "--leader")
    if catch_up_from:
        parse_address(catch_up_from, "--catch-up-from")
    secret = None
    if secret_file is not None or os.environ.get(SECRET_ENV):
        secret = load_secret(secret_file)
    elif role == "follower":
        raise InvalidInput(
            f"a follower needs the replication secret: --replication-secret-file or {SECRET_ENV}"
        )
    cert, key, ca, require = tls
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path is not None and not path.is_file():
            raise InvalidInput(f"{flag} {path}: no such file")
    server_ssl = client_ssl = None
    try:
        # both ends: a follower may be promoted, a leader repointed
        if cert is not None and key is not None:
            server_ssl = server_ssl_context(cert, key, ca, require)
        elif role == "leader" and cert is not None:
            raise InvalidInput("--tls-cert needs --tls-key")
        if ca is not None or cert is not None:
            client_ssl = client_ssl_context(ca, cert, key)
    except (OSError, ValueError) as exc:
        named = ", ".join(
            f"{flag} {path}"
            for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca))
            if path is not None
        )
        raise InvalidInput(f"cannot load TLS files ({named}): {exc}") from exc
    return ReplicationConfig(
        secret=secret,
        cluster_id=cluster_id,
        host=host,
        port=port,
        ack_mode=AckMode.parse(ack_mode),
        ack_timeout_ms=ack_timeout_ms,
        on_ack_timeout=on_ack_timeout,
        max_lag_ms=max_lag_ms,
        min_in_sync=min_in_sync,
        wal_retention_bytes_max=wal_retention_bytes_max,
        max_replication_lag_ms=max_replication_lag_ms,
        leader=leader,
        server_ssl=server_ssl,
        client_ssl=client_ssl,
        serve_snapshots=serve_snapshots,
        catch_up_from=catch_up_from or None,
        physical_followers=physical_followers,
        ship_before_fsync=ship_before_fsync,
    )


def _open_node(
    data_dir: Path,
    node_id: str,
    fsync: FsyncPolicy,
    host: str,
    port: int,
    role: str = "leader",
    replication: ReplicationConfig | None = None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    admin_token: str | None = None,
    peers: tuple[str, ...] = (),
    peer_verify: bool | ssl.SSLContext = True,
    dir_lock: DataDirLock | None = None,
    ack_pinned: bool = False,
    part_worker: bool = False,
) -> Node:
    """Open and recover the node; exit 2 naming file and offset when the WAL is corrupt."""
    from walship.node import Node, NodeConfig, Role
    from walship.replication.config import ReplicationConfig

    config = NodeConfig(
        data_dir=data_dir,
        node_id=node_id,
        fsync=fsync,
        http_host=host,
        http_port=port,
        role=Role(role),
        replication=replication or ReplicationConfig(),
        limits=limits,
        admin_token=admin_token,
        peers=peers,
        ack_pinned=ack_pinned,
        peer_verify=peer_verify,
        part_worker=part_worker,
    )
    tune_process()
    try:
        return Node.open(config, dir_lock=dir_lock)
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


def _replication_note(node: Node) -> str:
    if node.leader is not None:
        if node.leader.port is None:
            return " replication=off"
        return f" replication={node.replication_address()}"
    assert node.follower is not None
    server = node.snapshot_server
    serves = "" if server is None or server.address is None else f" snapshots={server.address}"
    return f" leader={node.follower.leader_address}{serves}"


def _url(host: str, port: int, https: bool = False) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if https else 'http'}://{shown}:{port}"


def _run(
    node: Node,
    sock: socket.socket,
    log_level: str,
    auth: AuthSettings,
    tls: HttpTls | None,
    metrics_sock: socket.socket | None = None,
) -> None:
    """Serve until a signal; always close the node (WAL written and fsynced) afterwards."""
    import uvicorn

    from walship.http.app import create_app
    from walship.http.server import NodeServer, http_protocol, metrics_server

    host, port = sock.getsockname()[:2]
    companions, metrics_note = [], ""
    if metrics_sock is not None:  # --metrics-listen
        companions.append((metrics_server(node, log_level), metrics_sock))
        metrics_note = f" metrics={_url(*metrics_sock.getsockname()[:2])}/metrics"

    def started() -> None:
        settle()  # everything the server needs is loaded: keep it out of later collections
        health = node.health()
        bound = _url(host, port, tls is not None)
        published = node.replication.http_url or bound
        listen = "" if published == bound else f" listen={bound.split('://', 1)[1]}"
        if not auth.required:
            warn(
                f"authentication is off (--auth none): anyone who can reach {bound} reads "
                "and writes every tenant"
            )
        print(
            f"walship {node.node_id} {START_LINE_MARK}{published}{listen} "
            f"role={health['role']} term={health['term']} last_lsn={health['last_lsn']} "
            f"fsync={node.config.fsync} data={node.config.data_dir}{_replication_note(node)}"
            f"{metrics_note}",
            flush=True,
        )

    reload_keys_on_sighup(auth)
    config = uvicorn.Config(
        create_app(node, auth=auth),
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        # the request head is bounded either way: by our protocol on httptools, by h11's own
        http=http_protocol(node.limits.request_head_bytes_max),
        h11_max_incomplete_event_size=node.limits.request_head_bytes_max,
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=10,
        server_header=False,
        ssl_certfile=None if tls is None else tls.cert,
        ssl_keyfile=None if tls is None else tls.key,
        ssl_ca_certs=None if tls is None or tls.client_ca is None else str(tls.client_ca),
        ssl_cert_reqs=ssl.CERT_NONE if tls is None else tls.cert_reqs,
    )
    server = NodeServer(config, started, node.end_subscriptions, companions)
    code = 0
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits 3 when the app's lifespan start-up fails
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
        try:
            node.close()
        except Exception as exc:
            log.exception("closing the node failed")
            fail(f"closing the node failed: {exc}")
    if server.stop_signal is not None:
        log.info("stopped by %s; WAL flushed and closed", signal.Signals(server.stop_signal).name)
    if code:
        raise typer.Exit(code)
