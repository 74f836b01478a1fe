"""Addresses for real networks: a node bound to a wildcard publishes only what it advertises.

The parsing and derivation rules are checked alone; then three real nodes bind ``0.0.0.0``
(distinct ports) and advertise ``127.0.0.2``, ``127.0.0.3`` and ``127.0.0.4`` (loopback
addresses that need no setup), through a manual failover and an etcd failover: every address
they publish -- start line, ``/health``, the leader's status, a follower's 409, the promote
answer and ``walship failover``'s hand-off, the etcd leader key -- is the advertised one,
never a wildcard, while a client keeps writing.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.client_writer import ClientWriter, check_held
from tests.cluster import event, health, query_all, replication, wait_caught_up, wait_until
from tests.etcd_server import EtcdServer, running_etcd
from tests.failover_cluster import assert_receipts_held
from tests.fixed_cluster import AnyNodeWriter, FixedCluster, Ports, free_port, start_all
from walship.advertise import AdvertisedAddress, AdvertisedUrl, advertised_host, is_wildcard
from walship.cli.main import app
from walship.errors import InvalidInput
from walship.etcd import EtcdClient
from walship.testing.process import NodeProcess

runner = CliRunner()
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
FAST_ACKS = ["--ack-timeout-ms", "1000", "--max-lag-ms", "2000"]


# ---------------------------------------------------------------------------------- rules


def test_wildcards_are_recognised() -> None:
    for host in ("0.0.0.0", "::", "[::]", ""):
        assert is_wildcard(host)
    for host in ("127.0.0.1", "::1", "node-1.example"):
        assert not is_wildcard(host)


def test_advertised_url_takes_the_listening_port_unless_given() -> None:
    assert AdvertisedUrl.parse("http://127.0.0.2").url(3900) == "http://127.0.0.2:3900"
    assert AdvertisedUrl.parse("https://db-1:443/").url(3900) == "https://db-1:443"
    assert AdvertisedUrl.parse("http://[fd00::1]:80").url(3900) == "http://[fd00::1]:80"
    for bad in ("127.0.0.2:3900", "ftp://h", "http://", "http://0.0.0.0:1", "http://h/x"):
        with pytest.raises(InvalidInput):
            AdvertisedUrl.parse(bad)


def test_advertised_replication_address_forms() -> None:
    assert AdvertisedAddress.parse("127.0.0.3").address(3910) == "127.0.0.3:3910"
    assert AdvertisedAddress.parse("db-1:4000").address(3910) == "db-1:4000"
    assert AdvertisedAddress.parse("[fd00::1]").address(3910) == "[fd00::1]:3910"
    assert AdvertisedAddress.parse("[fd00::1]:7").address(3910) == "[fd00::1]:7"
    for bad in ("0.0.0.0", "[::]:3910", "h:0", "h:x", "[fd00::1", "a b"):
        with pytest.raises(InvalidInput):
            AdvertisedAddress.parse(bad)


def test_a_wildcard_bind_publishes_the_flag_then_the_other_flag_then_the_host_name() -> None:
    def nothing() -> str | None:
        return None

    assert advertised_host("0.0.0.0", "a", "b", "x", nothing) == "a"
    assert advertised_host("0.0.0.0", None, "b", "x", nothing) == "b"
    assert advertised_host("10.0.0.5", None, None, "x", nothing) == "10.0.0.5"
    assert advertised_host("::", None, None, "x", lambda: "db-1") == "db-1"
    with pytest.raises(InvalidInput, match="--advertise-http-url"):
        advertised_host("0.0.0.0", None, None, "--http-host", nothing)


def test_serve_refuses_a_wildcard_advertised_address_in_one_line(tmp_path: Path) -> None:
    for flag, value in (
        ("--advertise-http-url", "http://0.0.0.0:3900"),
        ("--advertise-replication-address", "::"),
    ):
        result = runner.invoke(app, ["serve", "--data-dir", str(tmp_path), flag, value])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "wildcard" in lines[0], result.output


def test_serve_on_a_wildcard_without_a_usable_name_refuses_to_start_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No advertise flag, a wildcard bind and a machine without a host name: exit 1, one line
    naming the flags, nothing left bound or locked (a second try gets the same answer)."""
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    args = ["serve", "--data-dir", str(tmp_path / "d"), "--http-host", "0.0.0.0"]
    args += ["--http-port", "0", "--replication-secret-file", str(secret)]
    args += ["--allow-unauthenticated"]  # a wildcard bind without keys is refused otherwise
    for _ in range(2):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert "--advertise-http-url" in lines[0] and "0.0.0.0" in lines[0]


# ---------------------------------------------------------------------------------- clusters


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FixedCluster]:
    root = tmp_path / "cluster"
    print(f"cluster data dirs and node logs: {root}")
    with FixedCluster(root) as c:
        yield c
    problems = c.log_problems()
    if problems:
        pytest.fail("unhandled errors in the node logs:\n" + "\n".join(problems), pytrace=False)


def wildcard_node(
    cluster: FixedCluster, index: int, args: list[str], *, by_env: bool = False
) -> tuple[NodeProcess, str]:
    """Node ``n{index}`` bound to 0.0.0.0, advertising ``HOSTS[index]`` (by flags, or by the
    environment variables); its advertised replication address."""
    host = HOSTS[index]
    ports = Ports(free_port("0.0.0.0"), free_port("0.0.0.0"))
    advertise = {
        "WALSHIP_ADVERTISE_HTTP_URL": f"http://{host}",
        "WALSHIP_ADVERTISE_REPLICATION_ADDRESS": host,
    }
    flags = [] if by_env else ["--advertise-http-url", advertise["WALSHIP_ADVERTISE_HTTP_URL"]]
    flags += [] if by_env else ["--advertise-replication-address", host]
    flags += ["--allow-unauthenticated"]  # a wildcard bind without API keys: on purpose here
    node, _ = cluster.add(f"n{index}", [*flags, *args], bind="0.0.0.0", ports=ports)
    if by_env:
        node.env = advertise
    return node, f"{host}:{ports.replication}"


def published(node: NodeProcess) -> list[str]:
    """Every address in the node's health document (URLs and HOST:PORTs, anywhere in it)
    that the node publishes (not the source address a follower connected from)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k != "address":  # a session's: where the follower connects from
                    walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and (value.startswith("http") or value.count(":") == 1):
            host = value.removeprefix("http://").rsplit(":", 1)[0]
            if host.replace(".", "").isdigit() or host.startswith("0.0.0.0"):
                found.append(value)

    walk(health(node))
    return found


def check_published(nodes: list[NodeProcess], advertised: dict[str, str]) -> None:
    """No wildcard anywhere; each node's own URL and replication address are advertised."""
    for node in nodes:
        h = health(node)
        host = node.url.removeprefix("http://").rsplit(":", 1)[0]
        assert host in HOSTS, node.url
        assert h["url"] == node.url
        assert h["replication_address"] == advertised[node.node_id]
        for value in published(node):
            assert "0.0.0.0" not in value, (node.node_id, value)
            assert any(h_ in value for h_ in HOSTS), (node.node_id, value)
        assert "0.0.0.0" not in node.start_line.split(" data=")[0].split(" listen=")[0]


def read_only_leader_url(node: NodeProcess) -> str:
    r = httpx.post(f"{node.url}/api/v1/events", json=event(1), timeout=10)
    assert r.status_code == 409, r.text
    url: str = r.json()["leader_url"]
    return url


def test_wildcard_nodes_publish_only_advertised_addresses_through_a_manual_failover(
    cluster: FixedCluster,
) -> None:
    leader, leader_address = wildcard_node(
        cluster, 0, ["--role", "leader", "--ack-mode", "semi-sync", *FAST_ACKS]
    )
    leader.start()
    follower_args = ["--role", "follower", "--leader", leader_address]
    f1, f1_address = wildcard_node(cluster, 1, follower_args)
    f2, f2_address = wildcard_node(cluster, 2, follower_args, by_env=True)
    start_all([f1, f2])
    nodes = [leader, f1, f2]
    advertised = {"n0": leader_address, "n1": f1_address, "n2": f2_address}
    assert f" replication={leader_address}" in leader.start_line
    assert f" listen=0.0.0.0:{leader.url.rsplit(':', 1)[1]}" in leader.start_line
    wait_until(lambda: replication(leader)["in_sync_count"] == 2, 20, "both in sync")
    assert replication(leader)["listening"] == leader_address
    check_published(nodes, advertised)
    assert read_only_leader_url(f1) == leader.url
    assert read_only_leader_url(f2) == leader.url

    writer = AnyNodeWriter([n.url for n in nodes]).start()
    # and a Client given the three advertised URLs, the leader not first
    clients = [ClientWriter([f1.url, f2.url, leader.url], f"client-{n}").start() for n in (1, 2)]
    wait_until(lambda: len(writer.accepted()) >= 20, 20, "writes")
    wait_until(lambda: all(c.count() >= 10 for c in clients), 30, "client writes")
    leader.kill()
    failover = runner.invoke(
        app,
        [
            "failover",
            "--nodes",
            ",".join(n.url for n in nodes),
            "--admin-token-file",
            str(cluster.token_file),
        ],
    )
    assert failover.exit_code == 0, failover.output
    new = next(n for n in (f1, f2) if health(n)["role"] == "leader")
    other = f2 if new is f1 else f1
    new_address = advertised[new.node_id]
    assert f"followers connect to {new_address}" in failover.output
    handed = [ln for ln in failover.output.splitlines() if ln.startswith("repointed")]
    assert handed and all(ln.endswith(f"to {new_address}") for ln in handed)  # the hand-off
    wait_until(lambda: replication(other)["connected"], 20, "the other follower to follow")
    assert replication(other)["leader"] == new_address
    assert replication(new)["listening"] == new_address
    assert read_only_leader_url(other) == new.url
    mark = len(writer.accepted())
    wait_until(lambda: len(writer.accepted()) >= mark + 20, 20, "writes on the new leader")
    wait_until(lambda: all(c.count(term=2) >= 10 for c in clients), 60, "client writes after")

    # the old leader comes back with its command line and follows, by advertised addresses
    leader.start()
    wait_until(lambda: health(leader)["role"] == "follower", 30, "the old leader to follow")
    assert replication(leader)["leader"] == new_address
    assert read_only_leader_url(leader) == new.url
    writer.stop()
    for c in clients:
        c.join()
    check_published(nodes, advertised)
    wait_caught_up(new, other, leader)
    check_held(clients, query_all(leader))
    receipts = writer.receipts()
    ids = [r["event_id"] for r in receipts]
    assert len(ids) == len(set(ids))
    replicated = [r for r in receipts if r["durability"] == "replicated"]
    wait_caught_up(new, other, leader)
    assert_receipts_held(other, replicated)
    assert_receipts_held(leader, replicated)


def etcd_leader_key(url: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        client = EtcdClient([url])
        try:
            found = await client.get(b"/walship/c1/leader")
        finally:
            await client.aclose()
        assert found.kvs, "no leader key"
        value: dict[str, Any] = json.loads(found.kvs[0].value)
        return value

    return asyncio.run(read())


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path / "etcd") as server:
        yield server


def test_wildcard_nodes_publish_only_advertised_addresses_through_an_etcd_failover(
    etcd: EtcdServer, cluster: FixedCluster
) -> None:
    election = ["--etcd", etcd.url, "--cluster", "c1", "--etcd-ttl-s", "2"]
    election += ["--etcd-settle-ms", "500"]
    leader, leader_address = wildcard_node(
        cluster, 0, ["--role", "leader", "--ack-mode", "semi-sync", *FAST_ACKS, *election]
    )
    leader.start()
    wait_until(lambda: health(leader)["election"]["holding"], 10, "the leader to hold the key")
    follower_args = ["--role", "follower", "--leader", leader_address, *election]
    f1, f1_address = wildcard_node(cluster, 1, follower_args)
    f2, f2_address = wildcard_node(cluster, 2, follower_args)
    start_all([f1, f2])
    nodes = [leader, f1, f2]
    advertised = {"n0": leader_address, "n1": f1_address, "n2": f2_address}
    key = etcd_leader_key(etcd.url)
    assert (key["replication_address"], key["url"]) == (leader_address, leader.url)
    wait_until(lambda: replication(leader)["in_sync_count"] == 2, 20, "both in sync")
    check_published(nodes, advertised)

    writer = AnyNodeWriter([n.url for n in nodes]).start()
    clients = [ClientWriter([f2.url, leader.url, f1.url], f"client-{n}").start() for n in (1, 2)]
    wait_until(lambda: len(writer.accepted()) >= 20, 20, "writes")
    wait_until(lambda: all(c.count() >= 10 for c in clients), 30, "client writes")
    leader.kill()
    new = wait_until(
        lambda: next((n for n in (f1, f2) if health(n)["role"] == "leader"), None),
        20,
        "a follower to be elected",
    )
    other = f2 if new is f1 else f1
    new_address = advertised[new.node_id]
    key = wait_until(
        lambda: (k := etcd_leader_key(etcd.url))["node_id"] == new.node_id and k,
        10,
        "the new leader key",
    )
    assert (key["replication_address"], key["url"]) == (new_address, new.url)
    wait_until(lambda: replication(other)["leader"] == new_address, 20, "the other to follow")
    wait_until(lambda: replication(other)["connected"], 20, "the other to connect")
    assert read_only_leader_url(other) == new.url
    mark = len(writer.accepted())
    wait_until(lambda: len(writer.accepted()) >= mark + 20, 20, "writes on the new leader")
    term = health(new)["term"]
    wait_until(lambda: all(c.count(term=term) >= 10 for c in clients), 60, "client writes after")
    writer.stop()
    for c in clients:
        c.join()
    check_published([new, other], advertised)
    wait_caught_up(new, other)
    check_held(clients, query_all(other))
    receipts = writer.receipts()
    ids = [r["event_id"] for r in receipts]
    assert len(ids) == len(set(ids))
    wait_caught_up(new, other)
    assert_receipts_held(other, [r for r in receipts if r["durability"] == "replicated"])
