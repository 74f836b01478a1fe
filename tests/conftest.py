from __future__ import annotations

import os

# The CLI's tables take their width from COLUMNS when printing to a pipe (as under CliRunner):
# the tests expect the natural width, whatever the shell exported, and pytest-xdist's workers
# run with COLUMNS=80. Removed before anything imports walship.cli (its consoles read it once).
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from walship.events import EventIn
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy


def make_event(entity: str = "acct-1", etype: str = "acct.credited", **kw: object) -> EventIn:
    payload = kw.pop("payload", {"amount": 1})
    return EventIn(
        entity_id=entity,
        event_type=etype,
        payload=msgspec.Raw(msgspec.json.encode(payload)),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(StoreConfig(tmp_path / "data", fsync=FsyncPolicy.parse("never")))
    try:
        yield s
    finally:
        s.close()


# ---------------------------------------------------------------------------------- xdist

# scripts/check runs the tests on several pytest-xdist workers (--dist loadfile): a worker takes
# a whole file, so a module's fixtures (a node, a cluster) start once and its tests keep their
# order. The files are handed out in collection order (--no-loadscope-reorder), which puts the
# longest files first: started last, one of them would leave the other workers idle while it
# finishes. The longest measured (2 cores) lead, then the other files with a ``slow`` test,
# then the rest, each in file order.
LONGEST_FILES_FIRST = (
    "test_verify",
    "test_failover",
    "test_ui",
    "test_clean_failover",
    "test_deploy",
    "test_eventsourcing",  # the library's own cases (unittest: no slow mark to go by)
    "test_many_subscribers",
    "test_tenant_positions_cluster",
    "test_etcd_failover",
    "test_replication",
    "test_advertise",
    "test_run_it_yourself",
    "test_cli_status",
    "test_http_tls",
)


def _rename(item: pytest.Item, nodeid: str) -> None:
    """Give ``item`` the node id ``nodeid`` (pytest >= 9.2 keeps a structured id)."""
    current = getattr(item, "_id", None)
    if current is not None and hasattr(current, "parse"):
        item._id = type(current).parse(nodeid)
    else:
        item._nodeid = nodeid
    assert item.nodeid == nodeid, (item.nodeid, nodeid)


@pytest.hookimpl(tryfirst=True)  # before xdist reports the collection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: n for n, name in enumerate(LONGEST_FILES_FIRST)}
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}

    def order(item: pytest.Item) -> int:
        if item.path.stem in rank:
            return rank[item.path.stem]
        return len(rank) + (item.path not in slow_files)

    items.sort(key=order)  # stable: the tests of a file keep their order
    # schemathesis gives every operation's test the function's node id: xdist tells tests
    # apart by node id and would run only one of them, so each gets its own (its name's)
    seen = Counter(item.nodeid for item in items)
    for item in items:
        if seen[item.nodeid] > 1:
            _rename(item, f"{item.nodeid.rpartition('::')[0]}::{item.name}")
