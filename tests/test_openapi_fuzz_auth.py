"""Property tier, with ``--auth required``: schemathesis drives every operation of the schema
without credentials, with a tenant-scoped write key and with an admin key. No answer is a 5xx
(but the documented 504 of an expired ``min_lsn`` wait), none without credentials is anything
but 401 outside the open routes, none to the scoped key carries another tenant's data, and
the events written before the fuzzing are unchanged after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import make_event
from walship.apikeys import ApiKeyFile, ApiKeyRing, Role
from walship.http import create_app
from walship.http.auth import ROUTE_ACCESS, AuthSettings
from walship.http.stream import STREAM_PATH
from walship.limits import Limits
from walship.node import Node, NodeConfig
from walship.wal import FsyncPolicy

EXAMPLES = int(os.environ.get("WALSHIP_API_FUZZ_EXAMPLES", "15"))
LIMITS = Limits(min_lsn_wait_ms_max=50, batch_events_max=50, query_limit_max=200)
SECRET = f"OTHER-TENANT-{uuid.uuid4().hex}"

_DATA = Path(tempfile.mkdtemp(prefix="walship-api-fuzz-auth-"))
_KEYS = ApiKeyFile(_DATA / "keys.json")
SCOPED = _KEYS.create(Role.WRITE, frozenset({"default", "acme"}))[1]
ADMIN = _KEYS.create(Role.ADMIN, None)[1]
NODE = Node.open(
    NodeConfig(_DATA / "data", fsync=FsyncPolicy.parse("never"), limits=LIMITS, checkpoints=False)
)
# written before the fuzzing, in a tenant the scoped key does not have
NODE.store.append_batch(
    [
        make_event(f"hidden-{i}", "secret.kept", payload={"s": SECRET}, tenant_id="globex")
        for i in range(3)
    ]
)
_AUTH = AuthSettings(required=True, keys=ApiKeyRing(_DATA / "keys.json"))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(NODE, auth=_AUTH))

# a subscription answers an endless stream a generated call would wait on; its refusals are
# in test_http_auth.py (the table and test_subscriptions_see_only_their_tenants)
schema = schema.exclude(path=STREAM_PATH)

_OPEN_PATHS = {k.split(" ", 1)[1] for k, v in ROUTE_ACCESS.items() if v.role is None}


def _snapshot() -> list[tuple[Any, ...]]:
    from walship.storage.query import QueryFilter

    events = NODE.store.query(QueryFilter(tenant_id="globex"), 100, None).events
    return [(e.id, e.lsn, e.entity_id, bytes(e.payload)) for e in events]


@pytest.fixture(scope="module", autouse=True)
def _close_node() -> Iterator[None]:
    before = _snapshot()
    yield
    try:
        assert len(before) == 3 and _snapshot() == before, "fuzzing changed stored events"
    finally:
        NODE.close()
        shutil.rmtree(_DATA, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@pytest.mark.parametrize("who", ["nobody", "scoped", "admin"])
def test_no_request_gets_a_server_error_or_another_tenants_data(case: Any, who: str) -> None:
    headers = {"nobody": {}, "scoped": {"X-API-Key": SCOPED}, "admin": {"X-API-Key": ADMIN}}[who]
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "x-api-key"}
    response = case.call(headers=headers)
    status = response.status_code
    if status == 504:
        assert response.json()["error"] == "wait_timeout", response.text
        return
    assert status < 500, response.text
    if (
        who == "nobody"
        and case.path not in _OPEN_PATHS
        and "authorization" not in {k.lower() for k in case.headers}
    ):
        assert status == 401, response.text
    if who != "admin":
        assert SECRET not in response.text
