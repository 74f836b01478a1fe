"""The HTTP face of stream reads: ``GET /api/v1/entities/{id}/events`` (version ranges, both
directions, paged), ``/version`` and ``GET /api/v1/events/{event_id}``, over events in Parquet
parts and the memtable; and bad input on each of them is a 4xx JSON error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from walship.http import create_app
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.wal import FsyncPolicy

LIMITS = Limits(parquet_row_group_rows=4, query_limit_max=50, query_limit_default=10)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node.open(
        NodeConfig(
            tmp_path / "data", fsync=FsyncPolicy.parse("never"), limits=LIMITS, checkpoints=False
        )
    )
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def api(node: Node) -> Iterator[TestClient]:
    with TestClient(create_app(node)) as client:
        yield client


@pytest.fixture
def log(api: TestClient, node: Node) -> list[dict[str, Any]]:
    """Three parts and a memtable; entity ``a/b`` has 24 events among others."""
    for part in range(4):
        for i in range(5):
            events = [
                {"entity_id": entity, "event_type": "x.y", "payload": {"p": part, "i": i}}
                for entity in ("a/b", "other", "a/b", "zz", "a/b", "a/b")
            ]
            assert api.post("/api/v1/events/batch", json={"events": events}).status_code == 200
        if part < 3:
            node.store.checkpoint()
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 50, **({"cursor": cursor} if cursor else {})}
        page = api.get("/api/v1/events/query", params=params).json()
        out.extend(page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def read(api: TestClient, entity: str = "a/b", **params: Any) -> dict[str, Any]:
    response = api.get(f"/api/v1/entities/{entity}/events", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_pages_forward_and_backward_equal_the_filtered_full_scan(
    api: TestClient, log: list[dict[str, Any]]
) -> None:
    stream = [e for e in log if e["entity_id"] == "a/b"]
    assert [e["version"] for e in stream] == list(range(1, 81))
    for direction, params, want in [
        ("forward", {}, stream),
        ("forward", {"from_version": 17, "to_version": 61}, stream[16:61]),
        ("backward", {}, stream[::-1]),
        ("backward", {"from_version": 5, "to_version": 70}, stream[4:70][::-1]),
    ]:
        got: list[dict[str, Any]] = []
        body = read(api, direction=direction, limit=7, **params)
        for _ in range(100):  # bounded: a wrong next_version must fail, not loop
            assert body["version"] == 80 and body["direction"] == direction
            got.extend(body["events"])
            if body["next_version"] is None:
                break
            key = "from_version" if direction == "forward" else "to_version"
            body = read(api, direction=direction, limit=7, **{**params, key: body["next_version"]})
        else:
            raise AssertionError(f"paging {direction} {params} did not end")
        assert got == want, (direction, params)


def test_current_version_and_read_by_id(api: TestClient, log: list[dict[str, Any]]) -> None:
    assert api.get("/api/v1/entities/a/b/version").json()["version"] == 80
    assert api.get("/api/v1/entities/nobody/version").json()["version"] == 0
    assert api.get("/api/v1/entities/zz/version", params={"tenant_id": "t"}).json() == {
        "tenant_id": "t",
        "entity_id": "zz",
        "version": 0,
    }
    for ev in (log[0], log[50], log[-1]):
        assert api.get(f"/api/v1/events/{ev['id']}").json() == ev
    missing = api.get("/api/v1/events/00000000-0000-7000-8000-000000000000")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_a_range_past_the_end_is_empty(api: TestClient, log: list[dict[str, Any]]) -> None:
    body = read(api, from_version=81)
    assert body["events"] == [] and body["next_version"] is None and body["version"] == 80
    assert read(api, "nobody")["events"] == []
    assert read(api, from_version=10, to_version=5)["events"] == []


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/entities/a/events", {"from_version": -1}),
        ("/api/v1/entities/a/events", {"to_version": -3}),
        ("/api/v1/entities/a/events", {"from_version": 2**63}),
        ("/api/v1/entities/a/events", {"from_version": "one"}),
        ("/api/v1/entities/a/events", {"limit": 0}),
        ("/api/v1/entities/a/events", {"limit": 10**9}),
        ("/api/v1/entities/a/events", {"direction": "sideways"}),
        ("/api/v1/entities/a/events", {"from_versoin": 2}),
        ("/api/v1/entities/a/events", {"tenant_id": "t" * 500}),
        ("/api/v1/entities/a/version", {"verison": 1}),
        ("/api/v1/events/not-a-uuid", {}),
        ("/api/v1/events/00000000-0000-7000-8000-000000000000", {"x": 1}),
    ],
)
def test_bad_input_is_a_4xx_json_error(api: TestClient, path: str, params: dict[str, Any]) -> None:
    response = api.get(path, params=params)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "invalid_parameter"
