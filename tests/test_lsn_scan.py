"""Reading Parquet parts in lsn order (what a subscription catching up does): a part's rows
are sorted by entity, so the scan decodes a part once per slab of lsns and serves the pages
of that slab from it; pages of any size, over any lsn window, return exactly what a filtered
full read would."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pyarrow.parquet as pq
import pytest

from walship.events import EventIn
from walship.limits import Limits
from walship.storage import parquet
from walship.storage.query import QueryFilter
from walship.store import Store, StoreConfig
from walship.wal import FsyncPolicy

LIMITS = Limits(parquet_row_group_rows=64, compaction_fanin_min=1_000)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(StoreConfig(tmp_path / "d", fsync=FsyncPolicy.parse("never"), limits=LIMITS))
    try:
        for part in range(3):
            for first in range(0, 600, 100):
                s.append_batch(
                    [
                        EventIn(
                            entity_id=f"e-{(i * 31) % 97}",
                            event_type="t.x",
                            payload=msgspec.Raw(msgspec.json.encode({"i": i})),
                        )
                        for i in range(part * 1000 + first, part * 1000 + first + 100)
                    ]
                )
            s.checkpoint()
        yield s
    finally:
        s.close()


class DecodedRows:
    """Counts the rows every Parquet row-group read decodes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        one, many = pq.ParquetFile.read_row_group, pq.ParquetFile.read_row_groups

        def read_one(file: Any, i: int, *a: Any, **kw: Any) -> Any:
            table = one(file, i, *a, **kw)
            self.rows += table.num_rows
            return table

        def read_many(file: Any, groups: Any, *a: Any, **kw: Any) -> Any:
            table = many(file, groups, *a, **kw)
            self.rows += table.num_rows
            return table

        monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_one)
        monkeypatch.setattr(pq.ParquetFile, "read_row_groups", read_many)


def scan(store: Store, page: int, flt: QueryFilter = QueryFilter()) -> list[int]:
    out: list[int] = []
    after = flt.from_lsn - 1
    while True:
        window = QueryFilter(from_lsn=after + 1, to_lsn=flt.to_lsn)
        result = store.query(window, page)
        out += [e.lsn for e in result.events]
        if result.next_cursor is None:
            return out
        after = result.events[-1].lsn


def test_an_lsn_scan_decodes_each_part_about_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(store.manifest.parts) == 3
    decoded = DecodedRows(monkeypatch)
    assert scan(store, page=50) == list(range(1, 1_801))
    # pages of 50 through parts of 600 rows in 10 row groups: reading every row group for
    # each page would decode 12 times the log
    assert decoded.rows <= 2 * 1_800, decoded.rows


@pytest.mark.parametrize("slab_rows", [40, 1_000])
def test_lsn_windows_and_pages_match_a_filtered_read(
    store: Store, monkeypatch: pytest.MonkeyPatch, slab_rows: int
) -> None:
    monkeypatch.setattr(parquet, "SCAN_SLAB_ROWS", slab_rows)
    every = [e.lsn for e in store.query(QueryFilter(tenant_id="default"), 10_000).events]
    assert every == list(range(1, 1_801))  # read by the filtered path, not the scan
    rng = random.Random(slab_rows)
    for _ in range(12):
        lo = rng.randint(1, 1_800)
        hi = rng.randint(lo, 1_900)
        page = rng.choice([7, 50, 333, 2_000])
        got = scan(store, page, QueryFilter(from_lsn=lo, to_lsn=hi))
        assert got == [lsn for lsn in every if lo <= lsn <= hi], (lo, hi, page)
    events = store.query(QueryFilter(from_lsn=590, to_lsn=610), 100).events
    assert [msgspec.json.decode(e.payload)["i"] for e in events] == [
        *range(589, 600),
        *range(1_000, 1_010),
    ]
