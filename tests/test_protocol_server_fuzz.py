"""Property tier over real TCP: generated garbage sent to a running leader's replication port.

``tests/test_protocol.py`` fuzzes the sans-I/O decoder; this sends the same kinds of input —
arbitrary bytes, well-framed frames of any type with any payload, a valid hello followed by
garbage, frames announcing any length — to a real ``walship serve`` leader, each on its own
connection. Every connection must be closed by the leader within a few seconds (refused,
never left hanging), and afterwards the leader is healthy, has not grown its memory beyond a
frame's worth, logged no unhandled error, and its real follower never lost its stream.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cluster import (
    Cluster,
    health,
    raw_connection,
    read_until_closed,
    replication,
    replication_address,
    rss_bytes,
    wait_caught_up,
    write_events,
)
from walship.replication.protocol import PROTOCOL_VERSION, Hello, encode, make_nonce
from walship.testing.process import NodeProcess
from walship.wal.record import crc32c

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

EXAMPLES = int(os.environ.get("WALSHIP_FUZZ_EXAMPLES", "60"))
RSS_GROWTH_MAX = 64 * 1024 * 1024


def frame_with(payload: bytes, code: int, *, length: int | None = None) -> bytes:
    """A frame with valid checksums around any payload (optionally announcing another length)."""
    head = struct.pack(">IB", len(payload) if length is None else length, code)
    crc = crc32c(payload, crc32c(head[4:]))
    return head + struct.pack(">II", crc32c(head), crc) + payload


def hello() -> bytes:
    return encode(Hello(PROTOCOL_VERSION, "walship", "fuzzer", "follower", make_nonce()))


garbage = st.binary(min_size=1, max_size=4096)
framed = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=512)), min_size=1, max_size=4)
inputs = st.one_of(
    garbage,
    framed.map(lambda frames: b"".join(frame_with(p, code) for code, p in frames)),
    garbage.map(lambda tail: hello() + tail),
    st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=256)).map(
        lambda t: frame_with(t[2], t[0], length=t[1])
    ),
)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    root = tmp_path_factory.mktemp("fuzzed-cluster")
    with Cluster(root) as cluster:
        leader = cluster.start_leader()
        follower = cluster.start_follower("f1", replication_address(leader))
        write_events(leader, 100)
        wait_caught_up(leader, follower)
        yield leader, follower
        problems = cluster.log_problems()
    assert not problems, "unhandled errors in the node logs:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def rss_before(nodes: tuple[NodeProcess, NodeProcess]) -> int:
    return rss_bytes(nodes[0])


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=inputs)
def test_leader_closes_every_connection_that_sends_garbage(
    nodes: tuple[NodeProcess, NodeProcess], rss_before: int, data: bytes
) -> None:
    leader, _ = nodes
    with raw_connection(replication_address(leader)) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # then EOF: a partial frame cannot wait for more
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed before everything was sent: fine
        read_until_closed(sock, timeout_s=5)  # AssertionError if the leader keeps it open


def test_after_the_fuzz_the_leader_is_healthy_and_its_follower_never_noticed(
    nodes: tuple[NodeProcess, NodeProcess], rss_before: int
) -> None:
    leader, follower = nodes
    assert health(leader)["status"] == "healthy"
    write_events(leader, 100, start=100)
    assert wait_caught_up(leader, follower) == 200
    status = replication(follower)
    assert status["connected"] is True and status["reconnects"] == 0
    assert [s["node_id"] for s in replication(leader)["followers"]] == ["f1"]
    grown = rss_bytes(leader) - rss_before
    assert grown < RSS_GROWTH_MAX, f"the leader grew by {grown / 2**20:.1f} MiB"
