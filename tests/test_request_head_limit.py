"""A request's line and headers are bounded as they arrive (431, connection closed): the HTTP
parser used to hold a 20 MB header whole and answer 200. Bodies, pipelined requests and
headers split across packets are not affected."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from walship.limits import DEFAULT_LIMITS
from walship.testing.process import NodeProcess

HEAD_MAX = DEFAULT_LIMITS.request_head_bytes_max


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("head-limit")
    proc = NodeProcess(root / "data", fsync="never").start()
    try:
        yield proc
    finally:
        assert proc.stop() == 0


def _exchange(node: NodeProcess, chunks: list[bytes], pause_s: float = 0.0) -> bytes:
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-send: the answer was written before the close
        answer = b""  # every exchange here ends with the server closing the connection
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
        return answer


def _get(path: str, headers: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: n\r\n" + headers + b"\r\n"


def test_a_huge_header_is_refused_with_431_and_the_connection_closed(node: NodeProcess) -> None:
    answer = _exchange(node, [_get("/health/live", b"X-Big: " + b"a" * 2_000_000 + b"\r\n")])
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "limit_exceeded" and body["limit"] == HEAD_MAX


def test_a_header_trickled_in_pieces_is_counted_across_them(node: NodeProcess) -> None:
    piece = b"a" * 16_384
    chunks = [b"GET /health/live HTTP/1.1\r\nHost: n\r\nX-Big: ", *[piece] * 8]
    answer = _exchange(node, chunks, pause_s=0.02)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_bodies_headers_within_the_limit_and_pipelining_still_work(node: NodeProcess) -> None:
    events = [
        {"entity_id": f"e-{i}", "event_type": "t.x", "payload": {"pad": "p" * 500}}
        for i in range(1_000)
    ]
    body = json.dumps({"events": events}).encode()  # ~0.5 MB in one send, head and body
    head = (
        b"POST /api/v1/events/batch HTTP/1.1\r\nHost: n\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nX-Pad: %s\r\n\r\n" % (len(body), b"h" * (HEAD_MAX - 500))
    )
    answer = _exchange(node, [head + body + _get("/health/live", b"connection: close\r\n")])
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer[-300:]


def _read_chunks(sock: socket.socket, until: bytes, raw: bytes = b"") -> tuple[bytes, bytes]:
    """The body of a chunked answer, each chunk checked as it is framed (hex size, CRLF, that
    many bytes, CRLF), read until ``until`` is in it; and the bytes read past its last chunk."""
    body = b""
    while until not in body:
        data = sock.recv(65536)
        assert data, "the server closed the stream"
        raw += data
        while True:
            size_end = raw.find(b"\r\n")
            if size_end < 0:
                break
            size = int(raw[:size_end], 16)
            if len(raw) < size_end + 2 + size + 2:
                break
            chunk_end = size_end + 2 + size
            assert raw[chunk_end : chunk_end + 2] == b"\r\n", raw[chunk_end : chunk_end + 10]
            assert size > 0, "the stream ended"
            body += raw[size_end + 2 : chunk_end]
            raw = raw[chunk_end + 2 :]
    return body, raw


def test_a_stream_is_chunked_exactly_from_history_into_the_live_tail(node: NodeProcess) -> None:
    """Stream chunks go out without uvicorn's copy (``ChunkWriterCycle``): each is still
    framed to the byte, for history pages and for the live tail's shared frames alike."""
    import httpx

    def write(n: int) -> list[int]:
        events = [
            {"entity_id": f"c-{i}", "event_type": "t.c", "payload": {"i": i}} for i in range(n)
        ]
        r = httpx.post(f"{node.url}/api/v1/events/batch", json={"events": events}, timeout=20)
        assert r.status_code == 200, r.text
        return [receipt["lsn"] for receipt in r.json()["receipts"]]

    first = write(3)
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(_get(f"/api/v1/events/stream?from_lsn={first[0]}"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head
        body, rest = _read_chunks(sock, b"\nid: %d:" % first[-1])
        live = write(200)  # sent from the live tail, the same bytes to every stream
        body += _read_chunks(sock, b"\nid: %d:" % live[-1], rest)[0]
    ids = [int(line[4:].split(b":")[0]) for line in body.split(b"\n") if line.startswith(b"id: ")]
    assert ids == first + live
